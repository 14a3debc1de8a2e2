"""INT8 export: scale balancing inside factorized chains, ONNX Runtime static quantization (QDQ,
per-channel weights) and the checks around it.

Quantizer: ONNX Runtime's own tools (``onnxruntime.quantization``). The float graph is first
pre-processed as ONNX Runtime recommends (``quant_pre_process``: symbolic and ONNX shape
inference, then ONNX Runtime's basic graph optimizations, which fold BatchNorm into the
convolutions), then quantized by ``quantize_static`` in the QDQ format (QuantizeLinear /
DequantizeLinear pairs around each quantized operator, which ONNX Runtime's CPU kernels fuse into
integer operators), with per-output-channel weight scales. Activations are uint8 and weights int8,
ONNX Runtime's choice for x86 CPUs; activation ranges come from calibration batches
(``minmax``, ``entropy`` or ``percentile``).

Scale balancing (:func:`balance_chains`): a factorized layer is a chain of convolutions (or linear
layers) with no nonlinearity between them, so channel ``j`` of one factor's output can be
multiplied by ``s_j`` and the next factor's input channel ``j`` divided by ``s_j`` without
changing the chain's function (depthwise factors in between pass the scale through, their bias
scaled with it). With ``s_j = sqrt(r2_j / r1_j)`` — ``r1_j`` the largest weight of output channel
``j`` of the first factor, ``r2_j`` that of input channel ``j`` of the next — both weights of
channel ``j`` end with the same range ``sqrt(r1_j r2_j)``, so no intermediate channel is a few
large values dwarfing the rest of a per-tensor activation scale (the cross-layer equalization of
Nagel et al., "Data-Free Quantization", 2019, applied within the chain, where it is exact).
Off by default (``--int8-balance`` turns it on): with per-channel weight scales it did not help
trained models. test_resnet trained on Fashion-MNIST (82.55 %), tt/tucker2 at 0.5/0.3 MACs, 2000
test images: INT8 top-1 balanced vs plain +0.05, +0.05, +0.55, -0.25 points (noise) and agreement
with FP32 predictions lower in all four (97.95-98.20 % vs 98.25-98.75 %). It only helped chains
decomposed from random weights (test_resnet, agreement 92 % vs 77 %), whose factor ranges span
two to three decades.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lrcompress.errors import LrcError, UserError

log = logging.getLogger(__name__)

CALIBRATIONS = ("minmax", "entropy", "percentile")
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
# The instruction sets that make int8 dot products fast on x86 (VNNI: one instruction per
# 4-element int8 dot product, no 16-bit intermediate that can saturate; AMX: int8 tile matmul).
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


class Int8AccuracyError(LrcError):
    """The INT8 graph lost more top-1 than allowed (exit code 3: nothing was written)."""


@dataclass(frozen=True)
class Int8Config:
    calibration: str = "minmax"  # activation ranges: minmax | entropy | percentile
    batches: int = 8  # calibration batches
    batch_size: int = 32  # samples per calibration batch
    max_drop: float = 0.5  # most top-1 points INT8 may lose against FP32 (ORT, same inputs)
    exclude: tuple[str, ...] = ()  # layers (module names) kept in float
    balance: bool = False  # scale balancing inside factorized chains (off: see the docstring)
    reduce_range: bool = False  # 7-bit weights (for x86 CPUs without VNNI)

    def __post_init__(self):
        method = self.calibration.strip().lower()
        if method not in CALIBRATIONS:
            raise UserError(f"Unknown --int8-calibration {self.calibration!r}: choose "
                            f"{', '.join(CALIBRATIONS)} (minmax is the default; entropy or "
                            "percentile clip outliers).")
        object.__setattr__(self, "calibration", method)
        if self.batches < 1 or self.batch_size < 1:
            raise UserError(f"--int8-batches {self.batches} (of {self.batch_size} samples) must "
                            "be >= 1, e.g. --int8-batches 8.")
        if not self.max_drop >= 0:
            raise UserError(f"--int8-max-drop {self.max_drop} must be >= 0 top-1 points.")
        names = tuple(dict.fromkeys(n.strip() for n in self.exclude if n.strip()))
        object.__setattr__(self, "exclude", names)

    def to_dict(self) -> dict:
        return {**asdict(self), "exclude": list(self.exclude)}


# ------------------------------------------------------------------------- scale balancing


def _is_depthwise(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups > 1
            and m.groups == m.in_channels == m.out_channels)


def _is_dense(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def _groups(chain: nn.Sequential) -> list[tuple[int, list[int], int]]:
    """``(i, through, k)``: factor ``i``'s output channels reach factor ``k``'s input channels
    one to one, through the depthwise factors ``through``."""
    mods, out = list(chain), []
    for i, m in enumerate(mods[:-1]):
        if not _is_dense(m):
            continue
        k, through = i + 1, []
        while k < len(mods) and _is_depthwise(mods[k]):
            through.append(k)
            k += 1
        if k < len(mods) and _is_dense(mods[k]):
            out.append((i, through, k))
    return out


def _out_range(m: nn.Module) -> torch.Tensor:
    return m.weight.detach().abs().flatten(1).amax(1)


def _in_range(m: nn.Module) -> torch.Tensor:
    return m.weight.detach().abs().transpose(0, 1).flatten(1).amax(1)


def _shape(s: torch.Tensor, w: torch.Tensor, axis: int) -> torch.Tensor:
    view = [1] * w.dim()
    view[axis] = -1
    return s.view(view).to(w.dtype)


@torch.no_grad()
def _balance_pair(mods: list[nn.Module], i: int, through: list[int], k: int) -> float:
    """Rescale one link of a chain; returns max |log s| (0: already balanced)."""
    r1, r2 = _out_range(mods[i]), _in_range(mods[k])
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, (r2 / torch.where(ok, r1, 1)).sqrt(), torch.ones_like(r1))
    s = s.double()
    a, b = mods[i], mods[k]
    a.weight.mul_(_shape(s, a.weight, 0))
    if a.bias is not None:
        a.bias.mul_(s.to(a.bias.dtype))
    for t in through:
        if mods[t].bias is not None:
            mods[t].bias.mul_(s.to(mods[t].bias.dtype))
    b.weight.div_(_shape(s, b.weight, 1))
    return float(s.log().abs().max())


def balance_chain(chain: nn.Sequential, sweeps: int = 20, tol: float = 1e-3) -> int:
    """Balance one chain in place (sweeps over its links until every scale is within ``tol`` of
    1 in log); returns the number of links balanced."""
    links, mods = _groups(chain), list(chain)
    for _ in range(sweeps):
        if max((_balance_pair(mods, *g) for g in links), default=0.0) < tol:
            break
    return len(links)


def balance_chains(model: nn.Module, names: Iterable[str]) -> tuple[nn.Module, list[str]]:
    """``(model', balanced)``: a copy of ``model`` with the factorized chains ``names`` (modules
    that are ``nn.Sequential`` chains) scale-balanced; the same function up to float rounding."""
    import copy

    model = copy.deepcopy(model)
    done = []
    for name in names:
        chain = model.get_submodule(name)
        if isinstance(chain, nn.Sequential) and balance_chain(chain):
            done.append(name)
    return model, done


def chain_spread(model: nn.Module, names: Iterable[str]) -> float:
    """The largest ratio of biggest to smallest per-channel weight range at the links of the
    chains ``names`` (what balancing shrinks; 1 is perfectly even)."""
    worst = 1.0
    for name in names:
        chain = model.get_submodule(name)
        if not isinstance(chain, nn.Sequential):
            continue
        mods = list(chain)
        for i, _, k in _groups(chain):
            for r in (_out_range(mods[i]), _in_range(mods[k])):
                r = r[r > 0]
                if len(r):
                    worst = max(worst, float(r.max() / r.min()))
    return worst


# ---------------------------------------------------------------------------- graph helpers


def weighted_nodes(proto) -> dict[str, str]:
    """``{node name: module name}`` of the graph's Conv/Gemm/MatMul nodes whose weight is a
    parameter named ``MODULE.weight`` (torch's exporter keeps parameter names)."""
    inits = {t.name for t in proto.graph.initializer}
    out = {}
    for n in proto.graph.node:
        if n.op_type in WEIGHTED_OPS and len(n.input) > 1:
            w = n.input[1]
            for suffix in ("_DequantizeLinear_Output", "_quantized"):
                w = w.removesuffix(suffix)
            if w.endswith(".weight") and (w in inits or n.input[1] != w):
                out[n.name] = w[: -len(".weight")]
    return out


def _under(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def nodes_for(proto, layers: Iterable[str], strict: bool = True) -> list[str]:
    """Node names of the weighted nodes inside each of ``layers`` (module names, or node names);
    ``strict``: a layer naming no node is bad input."""
    mods = weighted_nodes(proto)
    out = []
    for layer in layers:
        hit = [n for n, m in mods.items() if _under(m, layer) or n == layer]
        if not hit and strict:
            some = ", ".join(sorted(set(mods.values()))[:8])
            raise UserError(f"--int8-exclude {layer} names no layer of the graph: give module "
                            f"names such as {some} (the layer names in report.md), "
                            "comma-separated.")
        out += hit
    return list(dict.fromkeys(out))


def _producers(proto) -> dict[str, object]:
    return {o: n for n in proto.graph.node for o in n.output}


def unquantized(proto, layers: Iterable[str]) -> list[str]:
    """Weighted nodes inside ``layers`` that do not run between QDQ pairs: their data and weight
    inputs must come from DequantizeLinear and their output feed only QuantizeLinear. Returns
    the node names (empty when every one is quantized)."""
    prod = _producers(proto)
    users: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outputs = {o.name for o in proto.graph.output}
    bad = []
    layers = list(layers)
    for name, mod in weighted_nodes(proto).items():
        if not any(_under(mod, la) for la in layers):
            continue
        node = next(n for n in proto.graph.node if n.name == name)
        ins_ok = all(getattr(prod.get(i), "op_type", None) == "DequantizeLinear"
                     for i in node.input[:2])
        out = node.output[0]
        nxt = users.get(out, [])
        out_ok = out not in outputs and bool(nxt) and all(
            u.op_type == "QuantizeLinear" for u in nxt)
        if not (ins_ok and out_ok):
            bad.append(name)
    return bad


# ------------------------------------------------------------------------------ quantizing


class _Reader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over numpy batches."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self.input_name, self.batches, self.i = input_name, batches, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


def quantize(model_bytes: bytes, calib: list[np.ndarray], cfg: Int8Config,
             exclude_nodes: list[str] = ()) -> bytes:
    """The float graph ``model_bytes`` (dynamic batch) quantized to INT8 (QDQ, per-channel
    weights), activations calibrated on ``calib`` (N×C×H×W float32 batches)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    from lrcompress.deploy.onnx import INPUT_NAME

    reader = type("Reader", (_Reader, CalibrationDataReader), {})(INPUT_NAME, list(calib))
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration]
    with tempfile.TemporaryDirectory(prefix="lrc-int8-") as d:
        pre, out = Path(d) / "pre.onnx", Path(d) / "int8.onnx"
        # ORT's calibrators print progress with print(): keep it off lrcompress's stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(onnx.load_from_string(model_bytes), str(pre))
            quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=cfg.reduce_range,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(exclude_nodes), calibrate_method=method)
        return out.read_bytes()


def check_graph(model_bytes: bytes):
    """The INT8 graph as a ModelProto, after ``onnx.checker.check_model(full_check=True)``."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise LrcError(f"The INT8 graph fails onnx.checker: {e}. This is a bug: re-run with "
                       "--debug and report it.") from e
    return proto


# ---------------------------------------------------------------------------- measurements


def predict(model_bytes: bytes, batches: Iterable[np.ndarray]) -> np.ndarray:
    """Logits of the graph on every batch (ONNX Runtime CPU, all threads), concatenated."""
    from lrcompress.deploy.onnx import INPUT_NAME, ort_session

    sess = ort_session(model_bytes, threads=0)
    return np.concatenate([sess.run(None, {INPUT_NAME: x})[0] for x in batches])


def top1(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else round(100 * float((logits.argmax(1) == labels).mean()), 4)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of samples (%) on which two models predict the same class."""
    return round(100 * float((a.argmax(1) == b.argmax(1)).mean()), 4)


def noisiest_layers(model_bytes: bytes, x: np.ndarray, k: int = 3) -> list[tuple[str, float]]:
    """``[(layer, error)]``: the ``k`` quantized layers whose input activation loses the most to
    8-bit rounding on ``x`` (relative L2 error of quantize→dequantize, from the graph's own
    scales), largest first — the candidates for ``--int8-exclude``."""
    import onnx
    from onnx import numpy_helper

    from lrcompress.deploy.onnx import INPUT_NAME

    proto = onnx.load_from_string(model_bytes)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    mods, prod = weighted_nodes(proto), _producers(proto)
    taps = {}  # float tensor -> (scale, zero point, layer)
    for name, mod in mods.items():
        node = next(n for n in proto.graph.node if n.name == name)
        dq = prod.get(node.input[0])
        q = prod.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and q.input[1] in inits:
            taps.setdefault(q.input[0], (inits[q.input[1]], inits[q.input[2]], mod))
    if not taps:
        return []
    for t in taps:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    names = list(taps)
    from lrcompress.deploy.onnx import ort_session

    sess = ort_session(proto.SerializeToString(), threads=0)
    vals = sess.run(names, {INPUT_NAME: x})
    errs = {}
    for t, v in zip(names, vals):
        scale, zp, mod = taps[t]
        lo, hi = (0, 255) if zp.dtype == np.uint8 else (-128, 127)
        zpf = zp.astype(np.float64)
        if zpf == lo:  # the quantizer dropped a Relu here: clipping at 0 is its job, no error
            v = np.maximum(v, 0)
        q = np.clip(np.round(v / scale) + zpf, lo, hi)
        err = np.linalg.norm((q - zpf) * scale - v) / max(np.linalg.norm(v), 1e-12)
        errs[mod] = max(errs.get(mod, 0.0), float(err))
    return sorted(errs.items(), key=lambda kv: -kv[1])[:k]


def cpu_features(path: str = "/proc/cpuinfo") -> dict:
    """The int8-relevant instruction sets of this CPU (from ``/proc/cpuinfo``'s flags)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return {"flags": [], "vnni": None, "source": f"{path} not readable"}
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    have = [f for f in INT8_FLAGS if f in flags]
    return {"flags": have, "vnni": any(f in flags for f in VNNI_FLAGS), "source": path}


MODEL_NAMES = ("original", "compressed", "original_int8", "compressed_int8")


def int8_latency_rows(runs: list[dict]) -> list[dict]:
    """The ONNX Runtime rows that timed all four models, with every model's speed-up over the
    original FP32 model and the two INT8 ratios."""
    out = []
    for r in runs:
        ms = r["median_ms"]
        if r["engine"] != "onnxruntime" or any(n not in ms for n in MODEL_NAMES):
            continue
        out.append({"engine": r["engine"], "device": r["device"], "threads": r["threads"],
                    "all_threads": r.get("all_threads"), "batch": r["batch"],
                    "median_ms": {n: ms[n] for n in MODEL_NAMES},
                    "iqr_ms": {n: r["iqr_ms"][n] for n in MODEL_NAMES},
                    "speedup": {n: round(ms["original"] / ms[n], 4) for n in MODEL_NAMES},
                    "int8_over_fp32": round(ms["compressed"] / ms["compressed_int8"], 4),
                    "lowrank_over_int8": round(ms["original_int8"] / ms["compressed_int8"], 4)})
    return out


# When low-rank + INT8 is "not worth it" over quantizing the original alone: less than this
# speed-up over the original's INT8 graph in every configuration timed (about the spread of
# these measurements), or less than TRADE_SPEEDUP while losing more than TRADE_POINTS of top-1
# (mobilenetv2 tt @0.5, 2026-12-03: 1.16–1.19× at 1 thread for 0.88 points).
# benchmarks/RESULTS_int8.md: mobilenetv2 gained 1.02–1.30× for 1.5–4.8 points (quantize only),
# resnet18 3.3–3.7× for 0.1–0.3 (low-rank + INT8).
NEGLIGIBLE_SPEEDUP = 1.10
TRADE_SPEEDUP, TRADE_POINTS = 1.5, 0.5


def _int8_top1(accuracy: dict) -> tuple[float | None, float | None]:
    """(original INT8, compressed INT8) top-1 %, None where not measured."""
    t = accuracy.get("top1") or {}
    return t.get("original_int8"), t.get("compressed_int8")


def quantize_only(rows: list[dict], accuracy: dict) -> bool:
    """Whether low-rank adds too little on top of INT8 (see NEGLIGIBLE_SPEEDUP, TRADE_*)."""
    if not rows:
        return False
    hi = max(r["lowrank_over_int8"] for r in rows)
    a, b = _int8_top1(accuracy)
    loss = None if a is None or b is None else a - b
    return hi < NEGLIGIBLE_SPEEDUP or (loss is not None and hi < TRADE_SPEEDUP
                                       and loss > TRADE_POINTS)


def int8_tradeoff(rows: list[dict], accuracy: dict, original_file: str | None = None
                  ) -> str | None:
    """One sentence on low-rank + INT8 against quantizing the original alone: the speed-up over
    the original's INT8 graph (range over the configurations timed) and the top-1 difference,
    and, where :func:`quantize_only`, the advice to quantize only (naming ``original_file``,
    the original's INT8 graph, when it was written). None when there is nothing to compare."""
    if not rows:
        return None
    gains = [r["lowrank_over_int8"] for r in rows]
    where = "; ".join(f"{g:.2f}× at {r['threads'] or 'all'} thread(s), batch {r['batch']}"
                      for g, r in zip(gains, rows))
    a, b = _int8_top1(accuracy)
    acc = ("top-1 not compared (no labels, or no original to measure)" if a is None or b is None
           else f"top-1 {b:.2f} % vs {a:.2f} % ({b - a:+.2f} points)")
    text = (f"Against quantizing the original alone, low-rank + INT8 runs {min(gains):.2f}–"
            f"{max(gains):.2f}× faster ({where}); {acc}.")
    if quantize_only(rows, accuracy):
        text += (" Low-rank adds little on top of INT8 for this model: quantizing the original "
                 "alone is likely the better trade (its INT8 graph was timed and checked here "
                 "with the same settings" + (f"; written as {original_file}" if original_file
                                             else "") + ").")
    return text


def slower_warnings(rows: list[dict], cpu: dict, margin: float = 0.05) -> list[str]:
    """A warning for each configuration where an INT8 graph runs slower than its FP32 one (by
    more than ``margin``, the timing noise allowed), then one on this CPU's instruction sets."""
    out = []
    for r in rows:
        ms = r["median_ms"]
        slow = [f"{n}: {ms[f'{n}_int8']:.3f} ms INT8 vs {ms[n]:.3f} ms FP32"
                for n in ("compressed", "original") if ms[f"{n}_int8"] > ms[n] * (1 + margin)]
        if slow:
            out.append(f"INT8 is slower than FP32 on {r['device']}, {r['threads']} thread(s), "
                       f"batch {r['batch']} ({'; '.join(slow)}).")
    if out:
        have = ", ".join(cpu["flags"]) or "none of " + ", ".join(INT8_FLAGS)
        if cpu.get("vnni"):
            hint = ("This CPU has VNNI/AMX int8 instructions, so the cost is elsewhere: small "
                    "layers where the QuantizeLinear/DequantizeLinear work outweighs the int8 "
                    "speed-up (try a larger batch, or --int8-exclude the small layers).")
        else:
            hint = ("Without VNNI (avx512_vnni / avx_vnni / amx_int8) ONNX Runtime multiplies "
                    "uint8 by int8 through 16-bit sums that can saturate; --int8-reduce-range "
                    "(7-bit weights) avoids the saturation, and INT8 is rarely faster here.")
        out.append(f"This CPU's int8 instruction sets: {have}. {hint}")
    return out


def drop_advice(cfg: Int8Config, noisy: list[tuple[str, float]]) -> str:
    others = [m for m in CALIBRATIONS if m != cfg.calibration]
    tips = [f"try --int8-calibration {others[0]} or {others[1]}"]
    if noisy:
        names = ",".join(n for n, _ in noisy)
        errs = ", ".join(f"{n} {100 * e:.1f} %" for n, e in noisy)
        tips.append(f"keep the most sensitive layers in float with --int8-exclude {names} (the "
                    f"8-bit rounding error of their inputs: {errs})")
    if not cfg.balance:
        tips.append("try scale balancing (--int8-balance)")
    tips.append("more calibration data (--int8-batches)")
    return "; ".join(tips) + "."


def check_drop(drop: float | None, cfg: Int8Config, advice: str, what: str) -> None:
    if drop is not None and not math.isnan(drop) and drop > cfg.max_drop:
        raise Int8AccuracyError(f"INT8 loses {drop:.2f} top-1 points against FP32 ({what}), "
                                f"more than --int8-max-drop {cfg.max_drop:g}. Nothing was "
                                f"written. To fix it: {advice} Or allow a larger drop with "
                                "--int8-max-drop.")


__all__ = ["CALIBRATIONS", "Int8AccuracyError", "Int8Config", "MODEL_NAMES", "agreement",
           "balance_chain", "balance_chains", "chain_spread", "check_drop", "check_graph",
           "cpu_features", "drop_advice", "int8_latency_rows", "int8_tradeoff", "noisiest_layers",
           "nodes_for", "predict", "quantize", "quantize_only", "slower_warnings", "top1",
           "unquantized", "weighted_nodes"]
