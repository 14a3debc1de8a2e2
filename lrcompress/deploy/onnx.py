"""ONNX export, graph checks and ONNX Runtime sessions.

Exporter: ``torch.onnx.export(dynamo=True, external_data=False)``. Since torch 2.9 the
``torch.export``-based exporter is the default and the TorchScript one (``dynamo=False``) warns that
it "will be removed", so lrcompress uses the supported path. The dynamo path writes weights to a
side file (``model.onnx.data``) by default; ``external_data=False`` keeps ``model.onnx`` one
self-contained file, which is what a compressed image model (far below protobuf's 2 GB limit)
should ship as: one file to copy, hash and load. Opset 18 is torchlib's native opset, so no version
conversion runs after the export.

Parity: the exported graph is run in ONNX Runtime on real inputs and compared with PyTorch,
elementwise ``|ort − torch| ≤ atol + rtol·|torch|`` (numpy's ``allclose``), by default
``rtol=1e-3, atol=1e-4`` in float32. A mismatch raises :class:`ParityError`; it is never a warning.

``onnxruntime`` and ``onnxruntime-gpu`` install the same ``onnxruntime`` module and silently
shadow each other, so a requested CUDA provider is verified with ``session.get_providers()``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass

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
    max_rel_diff: float  # max |ort − torch| / max(|torch|, atol)
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


def export_onnx(model: nn.Module, input_size, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = False):
    """``model`` -> a checked, self-contained ``onnx.ModelProto`` (batch 1 unless dynamic)."""
    import onnx

    check_opset(opset)
    model = model.eval()
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
    custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node
                     if n.domain not in ("", "ai.onnx")})
    if custom:
        raise OnnxExportError(f"The exported graph uses non-standard operators {custom}; "
                              "lrcompress only ships graphs of standard ONNX operators.")
    return proto


def op_counts(proto) -> dict[str, int]:
    """How many nodes of each operator type the graph has (top-level graph)."""
    return dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))


def ort_session(model_bytes: bytes, threads: int = 0, device: str = "cpu"):
    """An ONNX Runtime session on ``device`` (cpu | cuda), checked to really run there.

    ``threads``: intra-op threads (0: ONNX Runtime's default, one per physical core). Spinning is
    off so that an idle session's threads never steal cores from the one being timed.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
    diff = np.abs(got - ref)
    bound = atol + rtol * np.abs(ref)
    max_rel = float((diff / np.maximum(np.abs(ref), atol)).max())
    agree = float((got.argmax(1) == ref.argmax(1)).mean()) if ref.ndim == 2 else 1.0
    par = Parity(len(x), rtol, atol, float(diff.max()), max_rel, agree,
                 tuple(sess.get_providers()), source)
    if not np.isfinite(got).all() or (diff > bound).any():
        bad = int((diff > bound).sum())
        raise ParityError(f"model.onnx does not match PyTorch: {bad} of {diff.size} outputs "
                          f"differ by more than atol={atol} + rtol={rtol}·|torch| (largest "
                          f"difference {par.max_abs_diff:.3g}) on {par.n} {source} inputs. "
                          "Nothing was written. Re-run with --debug and report it.")
    return par
