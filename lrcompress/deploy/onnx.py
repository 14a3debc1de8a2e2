"""ONNX export, graph checks and ONNX Runtime sessions.

Exporter: ``torch.onnx.export(dynamo=True, external_data=False)``. Since torch 2.9 the
``torch.export``-based exporter is the default and the TorchScript one (``dynamo=False``) warns that
it "will be removed", so lrcompress uses the supported path. The dynamo path writes weights to a
side file (``model.onnx.data``) by default; ``external_data=False`` keeps ``model.onnx`` one
self-contained file, which is what a compressed image model (far below protobuf's 2 GB limit)
should ship as: one file to copy, hash and load. Opset 18 is torchlib's native opset, so no version
conversion runs after the export.

Parity: the exported graph is run in ONNX Runtime on real inputs and compared with PyTorch
relative to each sample's output scale, ``|ort − torch| ≤ atol + rtol·max|torch of that sample|``,
by default ``rtol=1e-3, atol=1e-4`` in float32. Float32 rounding grows with the size of the values
(EfficientNet-B0 logits around 130 differ by 5.8e-4 between the two runtimes, 4.5e-6 of their
scale), so an elementwise ``rtol·|torch|`` would call noise on near-zero logits a mismatch; an error
that is a thousandth of the sample's largest output is not. The top-1 agreement on the parity
inputs is reported beside it. A mismatch raises :class:`ParityError` with the outputs' error; it is
never a warning.

``onnxruntime`` and ``onnxruntime-gpu`` install the same ``onnxruntime`` module and silently
shadow each other, so a requested CUDA provider is verified with ``session.get_providers()``.

Sessions: every ONNX Runtime session lrcompress opens — the parity check, whole-model timing and
per-candidate layer timing — takes its options from :func:`session_options`: graph optimization
``ORT_ENABLE_ALL`` (on the CPU this adds, over ``ORT_ENABLE_EXTENDED``, the NCHWc layout transform:
every conv of resnet18 then runs as one blocked ``com.microsoft.nchwc::Conv`` with its Relu and
residual Add fused, and the whole graph gets one ReorderOutput at the end; at 1 thread it makes
resnet18 on 28×28 inputs 2.2× (batch 1) to 4.6× (batch 64) faster than ``ORT_ENABLE_EXTENDED``).

What the exported graph holds (issue 14, timm resnet18 with tt chains): each factorized layer is
its chain's ``Conv`` nodes and nothing else — no Transpose/Reshape/Identity/Cast. BatchNorm is
already folded into the preceding conv (the last conv of a chain) by the exporter's optimizer
(``optimize=True``); ORT would fold it too. Graph rewrite (:func:`merge_linear_chains`): a chain
running on a 1×1 feature map — where a k×k conv only ever reads its centre tap, the rest being
padding, so it is a 1×1 conv — becomes a run of 1×1 convs with no nonlinearity between them, and
consecutive ones are multiplied into one wherever that does fewer multiply-accumulates.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from lrcompress.errors import LrcError, UserError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
ONNX_MAX_BYTES = 2**31 - 1  # protobuf's limit on one serialized message
EXPORTER = "torch.onnx.export(dynamo=True, external_data=False)"
GPU_HINT = ("onnxruntime and onnxruntime-gpu install the same `onnxruntime` module, so whichever "
            "was installed last wins. For CUDA: `pip uninstall -y onnxruntime onnxruntime-gpu && "
            "pip install 'lrcompress[gpu]'` (or `pip install onnxruntime-gpu`), and check the "
            "CUDA/cuDNN versions that onnxruntime-gpu release needs.")


class OnnxExportError(LrcError):
    """torch.onnx.export could not export the model, or the graph failed onnx.checker."""


class ParityError(LrcError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the stated tolerance."""


@dataclass(frozen=True)
class Parity:
    n: int  # samples compared
    rtol: float
    atol: float
    max_abs_diff: float
    max_rel_diff: float  # max over samples of max |ort − torch| / max |torch| (that sample's)
    output_scale: float  # max |torch| over all outputs compared
    top1_agreement: float  # fraction of samples whose argmax agrees
    providers: tuple[str, ...]  # the providers ONNX Runtime actually used
    inputs: str  # where the inputs came from

    def to_dict(self) -> dict:
        return {**asdict(self), "providers": list(self.providers)}


def check_opset(opset: int) -> int:
    import onnx

    top = onnx.defs.onnx_opset_version()
    if not DEFAULT_OPSET <= opset <= top:
        raise UserError(f"--opset {opset} is not supported: torch's exporter emits opset "
                        f"{DEFAULT_OPSET} and can target up to {top} with this onnx. Use "
                        f"--opset {DEFAULT_OPSET} (the default) for the widest runtime support.")
    return opset


MERGED_KEY = "lrcompress.merged_chains"  # metadata_props key: the chains merge_linear_chains merged


def _io_hw(model: nn.Module, input_size) -> dict[str, tuple]:
    """``{conv name: (input H×W, output H×W)}`` of every ``nn.Conv2d``, from one forward pass
    (None for a conv called on more than one size)."""
    seen: dict[str, tuple | None] = {}

    def hook(name, inputs, output):
        io = (tuple(inputs[0].shape[2:]), tuple(output.shape[2:]))
        seen[name] = io if seen.get(name, io) == io else None

    hooks = [m.register_forward_hook(lambda m, i, o, n=n: hook(n, i, o))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
    return seen


def _as_matrix(conv: nn.Conv2d, io) -> torch.Tensor | None:
    """The conv as an ``out × in`` matrix when it is one (a 1×1 map in and out, or a 1×1 kernel
    without padding or stride), else None. On a 1×1 map a k×k conv only reads the tap that lands
    on the one real pixel (all others read zero padding)."""
    if conv.groups != 1 or conv.padding_mode != "zeros" or io is None:
        return None
    (in_hw, out_hw), taps = io, []
    for n, o, k, s, p, d in zip(in_hw, out_hw, conv.kernel_size, conv.stride, conv.padding,
                                conv.dilation):
        if n == o == 1 and p % d == 0 and p // d < k:
            taps.append(p // d)
        elif k == 1 and s == 1 and p == 0:
            taps.append(0)
        else:
            return None
    return conv.weight[:, :, taps[0], taps[1]]


def _best_split(mats: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Contiguous groups ``[(i, j), ...]`` of a run of matrices (applied in order) whose products
    cost the fewest multiply-accumulates per position (a group ``i..j`` costs in_i · out_j)."""
    n = len(mats)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest cover of mats[:j]
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):  # shortest group first: a tie does not merge
            c = best[i] + mats[i].shape[1] * mats[j - 1].shape[0]
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j:
        groups.append((cut[j], j - 1))
        j = cut[j]
    return groups[::-1]


def _merged_conv(convs: list[nn.Conv2d], mats: list[torch.Tensor]) -> nn.Conv2d:
    """One 1×1 conv computing ``convs`` applied in order (weights ``mats``, biases carried)."""
    w, b = mats[0], convs[0].bias
    for c, m in zip(convs[1:], mats[1:]):
        w = m @ w
        b = None if b is None else m @ b
        if c.bias is not None:
            b = c.bias if b is None else b + c.bias
    out = nn.Conv2d(w.shape[1], w.shape[0], 1, bias=b is not None).to(w.dtype)
    out.weight.data.copy_(w[:, :, None, None])
    if b is not None:
        out.bias.data.copy_(b)
    return out


def merge_linear_chains(model: nn.Module, input_size) -> tuple[nn.Module, list[str]]:
    """``(model', names)``: every factorized chain (an ``nn.Sequential`` of ``nn.Conv2d`` only)
    whose consecutive linear-map convs (see :func:`_as_matrix`) are cheaper multiplied together is
    rebuilt with fewer convs; ``model'`` is a copy (``model`` itself when nothing changes). It
    computes the same function, up to float rounding. On timm resnet18 at 28×28 input the tt chains
    of layer4 (1×1 maps; 1×1 → 3×3 → 1×1 at rank 232 of 512) become two 1×1 convs: 236k instead of
    290k MACs each, and the model 5 % (batch 64) to 12 % (batch 1) faster in ONNX Runtime."""
    chains = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.Sequential) and len(m) > 1
              and all(isinstance(c, nn.Conv2d) for c in m)]
    if not chains:
        return model, []
    io = _io_hw(model, input_size)
    plans = {}
    with torch.no_grad():
        for name, seq in chains:
            mats = [_as_matrix(c, io.get(f"{name}.{i}")) for i, c in enumerate(seq)]
            layout, i = [], 0
            while i < len(seq):
                j = i
                while j < len(seq) and mats[j] is not None:
                    j += 1
                if j == i:
                    layout.append((i, i, False))
                    i += 1
                    continue
                layout += [(i + a, i + b, b > a) for a, b in _best_split(mats[i:j])]
                i = j
            if any(m for _, _, m in layout):
                plans[name] = layout
    if not plans:
        return model, []
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, layout in plans.items():
            seq = model.get_submodule(name)
            old = list(seq)
            mats = [_as_matrix(c, io.get(f"{name}.{i}")) for i, c in enumerate(old)]
            new = [_merged_conv(old[a:b + 1], mats[a:b + 1]) if merge else old[a]
                   for a, b, merge in layout]
            for k in range(len(old) - 1, -1, -1):
                del seq[k]
            for m in new:
                seq.append(m)
    return model, sorted(plans)


def export_onnx(model: nn.Module, input_size, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = False):
    """``model`` -> a checked, self-contained ``onnx.ModelProto`` (batch 1 unless dynamic), with
    its linear chains merged (:func:`merge_linear_chains`; the names are in the graph's
    ``metadata_props`` under :data:`MERGED_KEY`)."""
    import onnx

    check_opset(opset)
    model, merged = merge_linear_chains(model.eval(), input_size)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if nbytes > ONNX_MAX_BYTES * 0.95:
        raise OnnxExportError(f"The model's weights take {nbytes / 2**30:.2f} GiB: a single "
                              "model.onnx is limited to 2 GiB. External-data export is not "
                              "supported in this version; use model.safetensors.")
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2 if dynamic_batch else 1, *input_size, generator=gen)
    kw = {}
    if dynamic_batch:
        # An example batch of 2: torch.export specialises a dimension that is 0 or 1.
        kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=65536)},)
    try:
        prog = torch.onnx.export(model, (example,), dynamo=True, external_data=False,
                                 opset_version=opset, input_names=[INPUT_NAME],
                                 output_names=[OUTPUT_NAME], verbose=False, optimize=True, **kw)
        proto = prog.model_proto
    except Exception as e:  # noqa: BLE001 - any exporter failure is reported as one
        raise OnnxExportError(f"torch.onnx.export (dynamo) failed: {type(e).__name__}: "
                              f"{str(e)[:600]}. Re-run with --debug for the traceback; "
                              "model.safetensors is unaffected.") from e
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise OnnxExportError(f"The exported graph fails onnx.checker: {e}") from e
    if merged:
        proto.metadata_props.add(key=MERGED_KEY, value=",".join(merged))
    custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node
                     if n.domain not in ("", "ai.onnx")})
    if custom:
        raise OnnxExportError(f"The exported graph uses non-standard operators {custom}; "
                              "lrcompress only ships graphs of standard ONNX operators.")
    return proto


def op_counts(proto) -> dict[str, int]:
    """How many nodes of each operator type the graph has (top-level graph)."""
    return dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))


def merged_chains(proto) -> list[str]:
    """The chains :func:`export_onnx` merged (from the graph's metadata)."""
    for p in proto.metadata_props:
        if p.key == MERGED_KEY:
            return p.value.split(",") if p.value else []
    return []


def session_options(threads: int = 0):
    """The ``onnxruntime.SessionOptions`` of every session lrcompress opens (parity, whole-model
    and per-layer timing), so they cannot drift apart: graph optimization ``ORT_ENABLE_ALL``,
    ``threads`` intra-op threads (0: ONNX Runtime's default, one per physical core), one inter-op
    thread, sequential execution, and no spinning, so that an idle session's threads never steal
    cores from the one being timed."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def ort_session(model_bytes: bytes, threads: int = 0, device: str = "cpu"):
    """An ONNX Runtime session on ``device`` (cpu | cuda) with :func:`session_options`, checked
    to really run there."""
    import onnxruntime as ort

    so = session_options(threads)
    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    elif device == "cuda":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        raise UserError(f"Unknown ONNX Runtime device {device!r}: use cpu or cuda.")
    sess = ort.InferenceSession(model_bytes, so, providers=providers)
    active = sess.get_providers()
    if active[0] != providers[0]:
        raise UserError(f"ONNX Runtime was asked for {providers[0]} but runs on {active}. "
                        + GPU_HINT)
    return sess


def check_parity(model: nn.Module, model_bytes: bytes, inputs: torch.Tensor, *,
                 dynamic_batch: bool, rtol: float = 1e-3, atol: float = 1e-4,
                 source: str = "") -> Parity:
    """Run the graph in ONNX Runtime (CPU) and PyTorch on ``inputs``; raise on a mismatch."""
    sess = ort_session(model_bytes, threads=0)
    x = inputs.detach().float().cpu()
    if dynamic_batch:
        got = sess.run(None, {INPUT_NAME: x.numpy()})[0]
    else:  # a batch-1 graph: one sample at a time
        got = np.concatenate([sess.run(None, {INPUT_NAME: x[i:i + 1].numpy()})[0]
                              for i in range(len(x))])
    with torch.no_grad():
        ref = model.eval()(x).float().numpy()
    if got.shape != ref.shape:
        raise ParityError(f"ONNX Runtime returned shape {got.shape}, PyTorch {ref.shape}.")
    par, bad = compare_outputs(got, ref, rtol, atol)
    par = replace(par, providers=tuple(sess.get_providers()), inputs=source)
    if bad:
        raise ParityError(f"model.onnx does not match PyTorch on {par.n} {source} inputs: "
                          f"{bad} of {par.n} samples differ by more than atol={atol} + "
                          f"rtol={rtol}·(the sample's largest |output|); the worst differs by "
                          f"{par.max_rel_diff:.3g} of its scale ({par.max_abs_diff:.3g} on "
                          f"outputs up to {par.output_scale:.3g}), top-1 agreement "
                          f"{100 * par.top1_agreement:.1f} %. This is more than float32 rounding. "
                          "Nothing was written. Re-run with --debug and report it.")
    return par


def compare_outputs(got: np.ndarray, ref: np.ndarray, rtol: float,
                    atol: float) -> tuple[Parity, int]:
    """(parity figures, number of samples out of tolerance) of ONNX Runtime's ``got`` against
    PyTorch's ``ref`` (first axis: samples), each sample judged relative to its own scale."""
    n = len(ref)
    diff = np.abs(got.astype(np.float64) - ref).reshape(n, -1)
    scale = np.abs(ref).astype(np.float64).reshape(n, -1).max(axis=1)
    finite = np.isfinite(got).reshape(n, -1).all(axis=1)
    worst = np.where(finite, diff.max(axis=1), np.inf)
    bad = int((worst > atol + rtol * scale).sum())
    rel = worst / np.maximum(scale, np.finfo(np.float32).tiny)
    agree = float((got.argmax(1) == ref.argmax(1)).mean()) if ref.ndim == 2 else 1.0
    par = Parity(n, rtol, atol, float(worst.max()), float(rel.max()), float(scale.max()), agree,
                 (), "")
    return par, bad
