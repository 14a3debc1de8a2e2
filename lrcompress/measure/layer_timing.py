"""Timing one layer's candidates: the engine, the standalone graphs, and the round-robin clock.

A *candidate* is what one layer could become: its dense conv/linear (``factorization="dense"``) or a
factorization at a rank. What is timed is exactly what would run for it, as a small standalone
graph fed a random input of the layer's real shape: ``(batch, in_ch, H, W)`` for a conv,
``(batch, in_features)`` for a classifier and ``(batch, tokens, in_features)`` for a token-wise
linear layer (as :func:`lrcompress.measure.latency.layer_input`).

* ONNX Runtime engines run a graph built directly with ``onnx.helper`` from the chain's layers:
  one ``Conv`` per conv (kernel, strides, pads, dilations, group as in the module), ``Gemm``
  (``transB=1``) per linear layer on a 2-D input and ``MatMul`` (+ ``Add`` for a bias) on a 3-D
  one — the nodes ``torch.onnx.export`` emits for these modules, without its cost (seconds per
  graph). Opset 18, static shapes, random weights. Sessions: :func:`lrcompress.deploy.onnx.
  session_options` (``ORT_ENABLE_ALL``, ``intra_op_num_threads = threads``, one inter-op thread,
  sequential execution, no spinning), the options of the parity and whole-model sessions.
* PyTorch engines run the chain module itself (``eval``, ``inference_mode``) at ``threads``
  intra-op threads.

:func:`round_robin` times the candidates of one layer interleaved, one run of each per repeat with
the order rotating, so that drift on a shared machine hits them alike; each gets the median and
inter-quartile range of ``repeats`` timed runs after ``warmup`` untimed ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lrcompress.deploy.onnx import DEFAULT_OPSET, GPU_HINT
from lrcompress.deploy.onnx import ort_session as deploy_session
from lrcompress.errors import UserError
from lrcompress.factorizations import get_factorization
from lrcompress.measure.latency import (
    Timing,
    cpu_count,
    layer_input,
    round_robin_times,
    summarize,
    torch_threads,
)
from lrcompress.model.layers import LayerSpec

ENGINES = ("ort-cpu", "torch-cpu", "ort-cuda", "torch-cuda")
DENSE = "dense"
INPUT = "x"
OUTPUT = "y"


# ---------------------------------------------------------------------------------------------
# engine and candidates
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    """Where candidates are timed: ``name`` in :data:`ENGINES`, intra-op ``threads`` (0: every
    core this process may use, resolved at construction) and ``batch`` (the input's batch size)."""

    name: str = "ort-cpu"
    threads: int = 1
    batch: int = 1

    def __post_init__(self):
        if self.name not in ENGINES:
            raise UserError(f"Unknown latency engine {self.name!r}: use one of "
                            f"{', '.join(ENGINES)} (runtime-device).")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise UserError(f"Latency engine threads {self.threads!r} must be an int >= 0 "
                            "(0: all cores; 1, the default, gives the most stable timings).")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise UserError(f"Latency engine batch {self.batch!r} must be an int >= 1.")
        if self.threads == 0:
            object.__setattr__(self, "threads", cpu_count())

    @property
    def runtime(self) -> str:
        """``"ort"`` or ``"torch"``."""
        return self.name.split("-")[0]

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda"``."""
        return self.name.split("-")[1]

    def check_available(self) -> None:
        """UserError, saying what is missing and how to get it, when this engine cannot run."""
        if self.name == "ort-cuda":
            import onnxruntime as ort

            have = ort.get_available_providers()
            if "CUDAExecutionProvider" not in have:
                raise UserError(
                    "Latency engine ort-cuda needs ONNX Runtime's CUDAExecutionProvider, but the "
                    f"installed onnxruntime {ort.__version__} only has {', '.join(have)}. "
                    + GPU_HINT + " Or time on the CPU with --latency-engine ort-cpu.")
        elif self.name == "torch-cuda" and not torch.cuda.is_available():
            raise UserError(
                f"Latency engine torch-cuda needs a CUDA GPU, but torch {torch.__version__} sees "
                "none (torch.cuda.is_available() is False). Install a CUDA build of torch on a "
                "machine with an NVIDIA GPU and driver, check CUDA_VISIBLE_DEVICES, or time on "
                "the CPU with torch-cpu or ort-cpu.")


@dataclass(frozen=True)
class Candidate:
    """One thing a layer can become: ``factorization`` (a name or ``"dense"``) at ``rank``
    (anything the factorization's ``rank_from`` accepts; 0 for dense)."""

    factorization: str
    rank: int | tuple[int, ...] = 0


def as_candidate(x) -> Candidate:
    """A Candidate from a Candidate, an ``Option``/``LayerPlan`` (``.factorization``, ``.rank``), a
    ``(factorization, rank)`` pair or the string ``"dense"``."""
    if isinstance(x, Candidate):
        return x
    if isinstance(x, str):
        if x != DENSE:
            raise ValueError(f"a candidate given as a string must be 'dense', got {x!r}")
        return Candidate(DENSE)
    if isinstance(x, tuple) and len(x) == 2:
        return Candidate(str(x[0]), x[1])
    if hasattr(x, "factorization") and hasattr(x, "rank"):
        return Candidate(x.factorization, x.rank)
    raise ValueError(f"not a candidate: {x!r} (want an Option, (factorization, rank) or 'dense')")


# ---------------------------------------------------------------------------------------------
# modules and graphs
# ---------------------------------------------------------------------------------------------


def dense_module(spec: LayerSpec) -> nn.Module:
    """The layer as it is: an ``nn.Conv2d`` / ``nn.Linear`` of the spec's shape."""
    if spec.kind == "linear":
        return nn.Linear(spec.in_ch, spec.out_ch, bias=spec.bias)
    return nn.Conv2d(spec.in_ch, spec.out_ch, spec.kernel, stride=spec.stride,
                     padding=spec.padding, dilation=spec.dilation, groups=spec.groups,
                     bias=spec.bias)


def candidate_module(spec: LayerSpec, cand: Candidate, seed: int = 0) -> nn.Module:
    """The module that would run for ``cand`` (the factorization's chain, or the dense layer),
    in eval mode with seeded random weights (scaled by 1/√fan-in, so activations stay O(1))."""
    if cand.factorization == DENSE:
        mod = dense_module(spec)
    else:
        mod = get_factorization(cand.factorization).skeleton(spec, cand.rank)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mod.parameters():
            fan_in = max(1, p[0].numel()) if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return mod.eval()


def compute_layers(module: nn.Module) -> list[nn.Module]:
    """The conv/linear layers of a candidate module, in execution order."""
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def input_shape(spec: LayerSpec, batch: int) -> tuple[int, ...]:
    """The layer's input shape at ``batch`` (linear: 2-D for one token, else 3-D)."""
    return spec.input_shape(batch)


def _conv_out(shape, m: nn.Conv2d) -> tuple[int, ...]:
    hw = [(n + 2 * p - d * (k - 1) - 1) // s + 1
          for n, k, s, p, d in zip(shape[2:], m.kernel_size, m.stride, m.padding, m.dilation)]
    return (shape[0], m.out_channels, *hw)


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy()


def _layer_nodes(m: nn.Module, i: int, src: str, dst: str, rank3: bool):
    """(nodes, initializers) for one conv/linear layer reading ``src`` and writing ``dst``."""
    from onnx import helper, numpy_helper

    w, b = f"w{i}", f"b{i}"
    inits = [numpy_helper.from_array(_array(m.weight), w)]
    if m.bias is not None:
        inits.append(numpy_helper.from_array(_array(m.bias), b))
    if isinstance(m, nn.Conv2d):
        (ph, pw), ins = m.padding, [src, w] + ([b] if m.bias is not None else [])
        node = helper.make_node("Conv", ins, [dst], kernel_shape=list(m.kernel_size),
                                strides=list(m.stride), pads=[ph, pw, ph, pw],
                                dilations=list(m.dilation), group=m.groups)
        return [node], inits
    if not rank3:
        ins = [src, w] + ([b] if m.bias is not None else [])
        return [helper.make_node("Gemm", ins, [dst], transB=1)], inits
    inits[0] = numpy_helper.from_array(np.ascontiguousarray(_array(m.weight).T), w)
    if m.bias is None:
        return [helper.make_node("MatMul", [src, w], [dst])], inits
    return [helper.make_node("MatMul", [src, w], [f"{dst}_mm"]),
            helper.make_node("Add", [f"{dst}_mm", b], [dst])], inits


def layer_graph(spec: LayerSpec, module: nn.Module, batch: int = 1, opset: int = DEFAULT_OPSET):
    """A standalone ``onnx.ModelProto`` running ``module``'s conv/linear layers (with its
    weights) on an input of the layer's shape at ``batch``; input ``x``, output ``y``."""
    import onnx
    from onnx import TensorProto, helper

    shape = input_shape(spec, batch)
    layers = compute_layers(module)
    nodes, inits, src, cur = [], [], INPUT, shape
    for i, m in enumerate(layers):
        dst = OUTPUT if i == len(layers) - 1 else f"h{i}"
        ns, ws = _layer_nodes(m, i, src, dst, rank3=len(shape) == 3)
        nodes += ns
        inits += ws
        cur = _conv_out(cur, m) if isinstance(m, nn.Conv2d) else (*cur[:-1], m.out_features)
        src = dst
    graph = helper.make_graph(
        nodes, f"{spec.name or 'layer'}", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT,
                                                                           list(shape))],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, list(cur))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="lrcompress.layer_timing")
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    return model


def ort_session(model_bytes: bytes, engine: Engine):
    """An ONNX Runtime session on the engine's device with the shipped session options
    (:func:`lrcompress.deploy.onnx.session_options`), checked to run there."""
    return deploy_session(model_bytes, threads=engine.threads, device=engine.device)


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def round_robin(fns: Sequence[Callable[[], object]], repeats: int, warmup: int,
                sync: Callable[[], None] | None = None,
                clock: Callable[[], float] = time.perf_counter) -> list[Timing]:
    """Each function run ``warmup`` times untimed, then ``repeats`` times timed, interleaved: one
    run of each per repeat, starting one further along each time. ``clock`` is in seconds."""
    return [summarize(ts) for ts in round_robin_times(fns, repeats, warmup, sync, clock)]


class MeasuringTimer:
    """The real timer: ``timer(spec, candidates) -> [Timing]`` (same order), every candidate of
    the layer timed in one :func:`round_robin` on ``engine``. Any callable with this signature
    (returning Timings or plain milliseconds) can stand in for it, e.g. a deterministic fake in
    tests."""

    def __init__(self, engine: Engine, repeats: int = 20, warmup: int = 5, seed: int = 0):
        if repeats < 1 or warmup < 0:
            raise UserError(f"repeats {repeats} must be >= 1 and warmup {warmup} >= 0.")
        self.engine, self.repeats, self.warmup, self.seed = engine, repeats, warmup, seed

    def __call__(self, spec: LayerSpec, candidates: Sequence[Candidate]) -> list[Timing]:
        eng = self.engine
        x = layer_input(spec, eng.batch, torch.Generator().manual_seed(self.seed))
        mods = [candidate_module(spec, c, self.seed) for c in candidates]
        if eng.runtime == "ort":
            fns = [self._ort_fn(spec, m, x) for m in mods]
            return round_robin(fns, self.repeats, self.warmup)
        sync = None
        if eng.device == "cuda":
            x, mods, sync = x.cuda(), [m.cuda() for m in mods], torch.cuda.synchronize
        fns = [_torch_fn(m, x) for m in mods]
        with torch_threads(eng.threads):
            return round_robin(fns, self.repeats, self.warmup, sync)

    def _ort_fn(self, spec: LayerSpec, module: nn.Module, x: torch.Tensor):
        sess = ort_session(layer_graph(spec, module, self.engine.batch).SerializeToString(),
                           self.engine)
        if self.engine.device == "cpu":
            feed = {INPUT: x.numpy()}
            return lambda: sess.run(None, feed)
        import onnxruntime as ort

        # On the GPU the input stays on the device, as inside a whole model; Run() returns after
        # the device work is done (ORT synchronises its stream at the end of a run by default).
        binding = sess.io_binding()
        binding.bind_ortvalue_input(INPUT, ort.OrtValue.ortvalue_from_numpy(x.numpy(), "cuda", 0))
        binding.bind_output(OUTPUT, "cuda")
        return lambda: sess.run_with_iobinding(binding)


def _torch_fn(module: nn.Module, x: torch.Tensor):
    def run():
        with torch.inference_mode():
            return module(x)

    return run
