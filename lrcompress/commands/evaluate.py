"""``eval``: top-1/top-5, loss, MACs, params and latency of any model, original or compressed.

MODEL_OR_RUN is anything :func:`lrcompress.load_model` accepts. For a RUN (or its
``model.safetensors`` with ``report.json`` beside it) the input size and normalisation default to
those the search used, so ``eval RUN`` reproduces the run's own figures on the same data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from lrcompress.commands.run_dir import verify_files
from lrcompress.data import DataConfig, build_loaders, parse_data_spec, resolve_preprocess
from lrcompress.errors import UserError
from lrcompress.measure.latency import LatencyConfig, measure
from lrcompress.measure.metrics import evaluate, independent_macs, param_count
from lrcompress.model.loading import load_model
from lrcompress.report.schema import read_report
from lrcompress.util.progress import Progress
from lrcompress.util.run_files import MODEL_FILE, REPORT_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    data: DataConfig = field(default_factory=DataConfig)  # batch size, test subset, workers
    input_size: tuple[int, int, int] | None = None  # None: the run's, else the model's/data's
    mean: tuple[float, ...] | None = None  # None: the run's, else the model's data config
    std: tuple[float, ...] | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N (accuracy only; latency has its own)
    latency: LatencyConfig | None = field(  # None: no timing
        default_factory=lambda: LatencyConfig(per_layer=False))


def _run_report(spec: str, allow_modified: bool) -> dict | None:
    """The report of the run ``spec`` points at (RUN/ or RUN/model.safetensors), if any, once
    the run's files are checked against the checksums it records."""
    p = Path(spec)
    run = p if p.is_dir() else p.parent if p.name == MODEL_FILE else None
    if run is None or not (run / REPORT_FILE).is_file():
        return None
    report = read_report(run)
    verify_files(run, report, allow_modified)
    return report


def eval_model(spec: str, data_spec: str, cfg: EvalConfig = EvalConfig(), *, arch=None,
               num_classes=None, in_chans=None, trust_pickle=False,
               progress: Progress | None = None, allow_modified: bool = False) -> dict:
    """Evaluate ``spec`` on the test split of ``data_spec``; a JSON-ready dict. A RUN whose
    files differ from the checksums in its report.json is refused unless ``allow_modified``."""
    from lrcompress.commands.search import resolve_device
    from lrcompress.deploy.onnx import export_onnx

    progress = progress or Progress()
    run_report = _run_report(spec, allow_modified)
    progress.stage("loading model")
    lm = load_model(spec, arch=arch, num_classes=num_classes, in_chans=in_chans,
                    trust_pickle=trust_pickle)
    model, info = lm.model.eval(), lm.info
    rep = run_report if lm.plan is not None else None
    conf = (rep or {}).get("config") or {}
    size = cfg.input_size or ((rep or {}).get("model") or {}).get("input_size") or info.input_size
    dspec = parse_data_spec(data_spec)
    pre = resolve_preprocess(model, dspec, input_size=size, mean=cfg.mean or conf.get("mean"),
                             std=cfg.std or conf.get("std"), in_chans=info.in_chans,
                             recorded=info.recorded())
    loaders = build_loaders(dspec, pre, cfg.data, num_classes=info.num_classes)
    if loaders.test is None:
        raise UserError(f"--data {data_spec} is a flat folder of unlabelled images: accuracy "
                        "needs labels. Give DIR/val/CLASS/* images or a labelled dataset.")
    device = resolve_device(cfg.device)
    progress.stage("evaluating", total=len(loaders.test.dataset))
    acc = evaluate(model.to(device), loaders.test, device, progress=progress.advance)
    model.cpu()
    macs = independent_macs(model, pre.input_size)
    lat = None
    if cfg.latency is not None:
        onnx_models = None
        if cfg.latency.onnxruntime:
            progress.stage("exporting a dynamic-batch ONNX graph for timing")
            onnx_models = {"model": export_onnx(model, pre.input_size,
                                                dynamic_batch=True).SerializeToString()}
        n = len(cfg.latency.batches) * ((len(cfg.latency.threads) if onnx_models else 0)
                                        + (1 if cfg.latency.torch else 0))
        progress.stage("measuring latency", total=n)
        lat = measure({"model": model}, pre.input_size, cfg.latency, onnx_models,
                      progress=progress.advance)
        lat["config"] = cfg.latency.to_dict()
    progress.end()
    return {
        "model": {"spec": str(spec), "arch": info.arch, "source": info.source,
                  "num_classes": info.num_classes, "in_chans": info.in_chans,
                  "compressed": lm.plan is not None,
                  "factorized_layers": len(lm.plan["layers"]) if lm.plan else 0},
        "data": {"spec": str(dspec), "input_size": list(pre.input_size), "mean": list(pre.mean),
                 "std": list(pre.std), "test_samples": acc.n},
        "accuracy": acc.to_dict(),
        "macs": macs,
        "macs_counted_by": "torch.utils.flop_counter.FlopCounterMode",
        "params": param_count(model),
        "device": str(device),
        "latency": lat,
    }
