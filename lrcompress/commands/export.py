"""``export``: deployable artifacts of a RUN, verified, with measured latency.

``export_run(RUN, cfg)`` writes ``model.onnx`` (checked with ``onnx.checker`` and against PyTorch in
ONNX Runtime on real inputs), validates ``model.safetensors`` (reloaded with ``lrcompress.load``,
outputs bit-exact, header plan equal to ``plan.json``; copied when another output folder is
given), measures latency of the original and compressed models, and adds an ``export`` section to
``report.json`` (then rewrites ``report.md``/``report.html``; the parts an export skips keep what
an earlier export recorded). Every file is staged under a temporary name and all are renamed into
place only after everything succeeded: a failed export leaves RUN/ exactly as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lrcompress.data import DataConfig, build_loaders, parse_data_spec, resolve_preprocess
from lrcompress.deploy.onnx import (
    DEFAULT_OPSET,
    EXPORTER,
    INPUT_NAME,
    OUTPUT_NAME,
    check_opset,
    check_parity,
    export_onnx,
    merged_chains,
    op_counts,
)
from lrcompress.errors import LrcError, UserError
from lrcompress.measure.latency import LatencyConfig, compare
from lrcompress.model.arch import build, parse_arch
from lrcompress.model.loading import load_model
from lrcompress.model.plan import Plan
from lrcompress.model.weights import load
from lrcompress.report.schema import read_report
from lrcompress.report.write import remove_stale_plots, render_reports
from lrcompress.util.io import atomic_path, file_sha256, json_default
from lrcompress.util.progress import Progress
from lrcompress.util.run_files import (
    FINGERPRINT_FILE,
    MODEL_FILE,
    ONNX_FILE,
    PLAN_FILE,
    REPORT_FILE,
    STATE_DIR,
)

log = logging.getLogger(__name__)
FORMATS = ("onnx", "safetensors")


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[str, ...] = FORMATS  # which artifacts: onnx, safetensors
    opset: int = DEFAULT_OPSET  # ONNX opset (18: torch's native one)
    dynamic_batch: bool = False  # model.onnx takes any batch size (else batch 1)
    output: str | None = None  # folder for model.onnx / model.safetensors (None: RUN/ itself)
    data: str | None = None  # parity inputs from this data spec (None: the run's own)
    parity_samples: int = 32  # inputs compared between PyTorch and ONNX Runtime
    rtol: float = 1e-3  # parity: |ort − torch| <= atol + rtol·max|torch| per sample (float32)
    atol: float = 1e-4
    latency: LatencyConfig | None = field(default_factory=LatencyConfig)  # None: no timing

    def __post_init__(self):
        fm = tuple(dict.fromkeys(f.strip().lower() for f in self.formats if f.strip()))
        bad = [f for f in fm if f not in FORMATS]
        if bad or not fm:
            raise UserError(f"Unknown --format {','.join(bad) or '(none)'}: choose from "
                            f"{', '.join(FORMATS)}, comma-separated (e.g. onnx,safetensors).")
        object.__setattr__(self, "formats", fm)
        check_opset(self.opset)
        if self.parity_samples < 1:
            raise UserError(f"parity_samples {self.parity_samples} must be >= 1.")
        if self.rtol < 0 or self.atol < 0:
            raise UserError(f"--rtol {self.rtol} / --atol {self.atol} must be >= 0.")


@dataclass
class ExportResult:
    run_dir: Path
    files: list[Path]  # artifacts written (model.onnx, a safetensors copy)
    section: dict  # what was added to report.json under "export"
    report: dict  # the whole updated report


def parity_inputs(report: dict, model: nn.Module, n: int, data: str | None = None):
    """(inputs, description): the first ``n`` test images of the run's data, preprocessed as
    the search did; seeded random inputs (said so) when that data is no longer available."""
    spec = data or report["data"].get("eval_spec") or report["data"]["spec"]
    conf = report.get("config") or {}
    m = report["model"]
    try:
        dspec = parse_data_spec(spec)
        pre = resolve_preprocess(model, dspec, input_size=m["input_size"], mean=conf.get("mean"),
                                 std=conf.get("std"), in_chans=m["in_chans"])
        # Only the images are compared: labels that do not fit the classifier do not matter.
        dcfg = DataConfig(batch_size=n, test_subset=n, seed=int(report.get("seed") or 0),
                          allow_class_mismatch=True)
        loaders = build_loaders(dspec, pre, dcfg, num_classes=m["num_classes"])
        x, _ = next(iter(loaders.test))
        return x, f"test images of {spec}"
    except UserError as e:
        if data:  # asked for explicitly: the user must know it failed
            raise
        log.warning("parity inputs: the run's data %s is not available (%s); using seeded "
                    "random inputs instead (pass --data to use real ones)", spec, e)
        x = torch.randn(n, *m["input_size"], generator=torch.Generator().manual_seed(0))
        return x, f"random (the run's data {spec} is not available here)"


def original_model(run: Path, report: dict, plan: Plan) -> tuple[nn.Module, str]:
    """The dense model the run started from, or (said so) the architecture with random weights
    when its checkpoint is gone; latency does not depend on the weights."""
    m = report["model"]
    cands = [m.get("source")]
    fp = run / STATE_DIR / FINGERPRINT_FILE
    if fp.exists():  # the absolute path, for runs started from another working directory
        cands.append((json.loads(fp.read_text()).get("checkpoint") or {}).get("path"))
    for src in cands:
        if src and src != "random" and Path(src).is_file():
            return load_model(src, arch=m["arch"]).model, f"checkpoint {src}"
    log.warning("the original checkpoint %s is gone: the latency comparison uses %s with "
                "random weights (latency does not depend on the weights)", m.get("source"),
                plan.arch)
    model = build(parse_arch(plan.arch), plan.num_classes, plan.in_chans)
    return model.eval(), f"random weights ({m.get('source')} not found)"


def _rel(path: Path, run: Path) -> str:
    try:
        return str(path.resolve().relative_to(run.resolve()))
    except ValueError:
        return str(path.resolve())


def export_run(run_dir, cfg: ExportConfig = ExportConfig(),
               progress: Progress | None = None) -> ExportResult:
    """Export RUN's compressed model (see the module docstring); all or nothing."""
    progress = progress or Progress()
    run = Path(run_dir)
    report = read_report(run)
    st_path = run / MODEL_FILE
    if not st_path.is_file():
        raise UserError(f"{run} has no model.safetensors: it is not a finished run. Run "
                        "`lrcompress search ... -o RUN` first.")
    out = Path(cfg.output) if cfg.output else run
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a folder.")
    lm = load_model(str(st_path))
    compressed, plan = lm.model.eval(), Plan.from_dict(lm.plan)
    input_size = tuple(report["model"]["input_size"])
    t0 = time.perf_counter()
    x, source = parity_inputs(report, compressed, cfg.parity_samples, cfg.data)
    section: dict = {"formats": list(cfg.formats), "output": _rel(out, run)}
    files: list[Path] = []
    onnx_bytes = None
    with contextlib.ExitStack() as stage:  # every file renamed into place only on success
        if "onnx" in cfg.formats:
            progress.stage("exporting ONNX")
            proto = export_onnx(compressed, input_size, opset=cfg.opset,
                                dynamic_batch=cfg.dynamic_batch)
            onnx_bytes = proto.SerializeToString()
            progress.stage("checking ONNX Runtime against PyTorch")
            par = check_parity(compressed, onnx_bytes, x, dynamic_batch=cfg.dynamic_batch,
                               rtol=cfg.rtol, atol=cfg.atol, source=source)
            dest = out / ONNX_FILE
            tmp = stage.enter_context(atomic_path(dest))
            tmp.write_bytes(onnx_bytes)
            files.append(dest)
            section["onnx"] = {
                "path": _rel(dest, run), "bytes": len(onnx_bytes),
                "sha256": hashlib.sha256(onnx_bytes).hexdigest(), "exporter": EXPORTER,
                "opset": cfg.opset, "dynamic_batch": cfg.dynamic_batch,
                "input": {"name": INPUT_NAME,
                          "shape": ["batch" if cfg.dynamic_batch else 1, *input_size]},
                "output": OUTPUT_NAME, "ops": op_counts(proto),
                # chains on 1×1 maps multiplied into fewer 1×1 convs (deploy.merge_linear_chains)
                "merged_chains": merged_chains(proto),
                "checker": "onnx.checker.check_model(full_check=True) passed",
                "parity": par.to_dict(),
            }
        if "safetensors" in cfg.formats:
            progress.stage("validating model.safetensors")
            section["safetensors"] = _validate_safetensors(run, st_path, compressed, plan, x,
                                                           report)
            if out.resolve() != run.resolve():
                dest = out / MODEL_FILE
                tmp = stage.enter_context(atomic_path(dest))
                shutil.copyfile(st_path, tmp)
                if file_sha256(tmp) != section["safetensors"]["sha256"]:
                    raise LrcError(f"the copy of {st_path} to {dest} differs from the original.")
                files.append(dest)
                section["safetensors"]["copied_to"] = _rel(dest, run)
        if cfg.latency is not None:
            section["latency"] = _latency(run, report, plan, compressed, input_size, cfg,
                                          onnx_bytes, progress)
        section["seconds"] = round(time.perf_counter() - t0, 3)
        # An export of some formats only keeps what an earlier one measured of the others
        # (the model in RUN/ never changes, so those figures still hold).
        report = {**report, "export": {**(report.get("export") or {}), **section}}
        progress.stage("writing")
        text = json.dumps(report, indent=1, default=json_default) + "\n"
        stage.enter_context(atomic_path(run / REPORT_FILE)).write_text(text, encoding="utf-8")
        rendered = render_reports(report)
        for name, data in rendered.items():
            tmp = stage.enter_context(atomic_path(run / name))
            tmp.write_bytes(data)
    remove_stale_plots(run, rendered)
    progress.end()
    return ExportResult(run, files, section, report)


def _validate_safetensors(run: Path, path: Path, model: nn.Module, plan: Plan, x, report):
    reloaded = load(path)
    a, b = model.state_dict(), reloaded.state_dict()
    if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
        raise LrcError(f"{path} does not reload to the same weights twice: the file is corrupt.")
    with torch.no_grad():
        same = torch.equal(model(x), reloaded.eval()(x))
    if not same:
        raise LrcError(f"{path} reloads to a model whose outputs differ: it is not deterministic.")
    plan_json = run / PLAN_FILE
    if plan_json.exists():
        on_disk = Plan.from_json(plan_json.read_text())
        if on_disk.to_dict()["layers"] != plan.to_dict()["layers"]:
            raise UserError(f"{plan_json} and the plan in {path}'s header differ: the run was "
                            "modified by hand. Re-run the search.")
    if plan.macs != report["totals"]["macs_after"]:
        raise UserError(f"{path} holds a plan of {plan.macs} MACs but report.json says "
                        f"{report['totals']['macs_after']}: the files come from different runs.")
    return {"path": _rel(path, run), "bytes": path.stat().st_size, "sha256": file_sha256(path),
            "reload": "lrcompress.load: weights and outputs bit-exact", "macs": plan.macs,
            "params": plan.params}


def _latency(run, report, plan, compressed, input_size, cfg: ExportConfig, onnx_bytes,
             progress) -> dict:
    lat = cfg.latency
    original, weights = original_model(run, report, plan)
    onnx_models = None
    if lat.onnxruntime:
        progress.stage("exporting dynamic-batch graphs for timing")
        comp = onnx_bytes if cfg.dynamic_batch and onnx_bytes else export_onnx(
            compressed, input_size, opset=cfg.opset, dynamic_batch=True).SerializeToString()
        orig = export_onnx(original, input_size, opset=cfg.opset,
                           dynamic_batch=True).SerializeToString()
        onnx_models = {"original": orig, "compressed": comp}
    n_runs = (len(lat.threads) * len(lat.batches) if lat.onnxruntime else 0) + (
        len(lat.batches) if lat.torch else 0)
    n_layers = len(plan.layers) if lat.per_layer else 0
    progress.stage("measuring latency", total=n_runs + n_layers)
    tot = report["totals"]
    res = compare(original, compressed, input_size, lat,
                  ideal_speedup=tot["macs_before"] / tot["macs_after"], onnx_models=onnx_models,
                  plan=plan, progress=progress.advance)
    res["original_weights"] = weights
    res["input_size"] = list(input_size)
    return res


__all__ = ["ExportConfig", "ExportResult", "export_run", "FORMATS"]
