"""``export``: deployable artifacts of a RUN, verified, with measured latency.

``export_run(RUN, cfg)`` writes ``model.onnx`` (checked with ``onnx.checker`` and against PyTorch in
ONNX Runtime on real inputs), validates ``model.safetensors`` (its sha256 is the one search
recorded in report.json; it reloads deterministically; header plan equal to ``plan.json``; copied
when another output folder is given), measures latency of the original and compressed models,
and adds an ``export`` section to ``report.json`` (then rewrites ``report.md``/``report.html``;
the parts an export skips keep what an earlier export recorded). With ``onnx-int8`` it also writes
``model.int8.onnx`` (:mod:`lrcompress.commands.export_int8`) and times the four models together.
Every file is staged under a temporary name and all are renamed into place only after everything
succeeded: a failed export leaves RUN/ exactly as it was.

Trust: RUN/ is locked while export writes it; a run whose files differ from the checksums in
report.json is refused (``allow_modified`` overrides); in another ``-o`` folder an existing
model.onnx / model.safetensors is replaced only with ``overwrite`` and only when an earlier export
wrote it there (``lrcompress-export.json`` records its sha256) and nobody changed it since.
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

from lrcompress.commands.export_int8 import INT8_FILE, ORIGINAL_INT8_FILE, int8_stage
from lrcompress.commands.run_dir import RunDir, read_manifest, verify_files
from lrcompress.data import DataConfig, build_loaders, parse_data_spec, resolve_preprocess
from lrcompress.deploy.int8 import (
    Int8Config,
    cpu_features,
    int8_latency_rows,
    int8_tradeoff,
    quantize_only,
    slower_warnings,
)
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
from lrcompress.report.write import PLOT_DIR, remove_stale_plots, render_reports
from lrcompress.util.folder_lock import FolderLock
from lrcompress.util.io import atomic_path, file_sha256, json_default
from lrcompress.util.progress import Progress
from lrcompress.util.run_files import (
    EXPORT_MANIFEST,
    FINGERPRINT_FILE,
    MODEL_FILE,
    ONNX_FILE,
    PLAN_FILE,
    REPORT_FILE,
    STATE_DIR,
)

log = logging.getLogger(__name__)
FORMATS = ("onnx", "safetensors")  # the default artifacts
ALL_FORMATS = (*FORMATS, "onnx-int8")  # onnx-int8: model.int8.onnx (export --int8)


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[str, ...] = FORMATS  # which artifacts: onnx, safetensors
    opset: int = DEFAULT_OPSET  # ONNX opset (18: torch's native one)
    dynamic_batch: bool = False  # model.onnx takes any batch size (else batch 1)
    output: str | None = None  # folder for model.onnx / model.safetensors (None: RUN/ itself)
    overwrite: bool = False  # replace model.onnx / model.safetensors an earlier export wrote there
    allow_modified: bool = False  # export a run whose files differ from their recorded sha256
    data: str | None = None  # parity inputs from this data spec (None: the run's own)
    parity_samples: int = 32  # inputs compared between PyTorch and ONNX Runtime
    rtol: float = 1e-3  # parity: |ort − torch| <= atol + rtol·max|torch| per sample (float32)
    atol: float = 1e-4
    latency: LatencyConfig | None = field(default_factory=LatencyConfig)  # None: no timing
    int8: Int8Config | None = None  # INT8 settings (None: defaults, used with onnx-int8)

    def __post_init__(self):
        fm = tuple(dict.fromkeys(f.strip().lower() for f in self.formats if f.strip()))
        bad = [f for f in fm if f not in ALL_FORMATS]
        if bad or not fm:
            raise UserError(f"Unknown --format {','.join(bad) or '(none)'}: choose from "
                            f"{', '.join(ALL_FORMATS)}, comma-separated (e.g. onnx,safetensors).")
        object.__setattr__(self, "formats", fm)
        if "onnx-int8" in fm and self.int8 is None:
            object.__setattr__(self, "int8", Int8Config())
        if self.output is not None and not str(self.output).strip():
            raise UserError('-o "" is an empty path: give the folder to write model.onnx and '
                            "model.safetensors to, or leave -o out to write them into RUN/.")
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
    run = Path(run_dir)
    read_report(run)  # a clear error for a folder that is not a finished run
    with FolderLock(run):  # one writer of RUN/ at a time
        return _export_locked(run, cfg, progress or Progress())


def _export_locked(run: Path, cfg: ExportConfig, progress: Progress) -> ExportResult:
    report = read_report(run)  # again, under the lock
    st_path = run / MODEL_FILE
    if not st_path.is_file():
        raise UserError(f"{run} has no model.safetensors: it is not a finished run. Run "
                        "`lrcompress search ... -o RUN` first.")
    modified = verify_files(run, report, cfg.allow_modified)
    out = Path(cfg.output) if cfg.output else run
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a folder.")
    names = [n for f, n in (("onnx", ONNX_FILE), ("onnx-int8", INT8_FILE),
                            ("onnx-int8", ORIGINAL_INT8_FILE), ("safetensors", MODEL_FILE))
             if f in cfg.formats and (n != MODEL_FILE or not _same_folder(out, run))]
    _check_destinations(run, out, names, cfg.overwrite, report)
    lm = load_model(str(st_path))
    compressed, plan = lm.model.eval(), Plan.from_dict(lm.plan)
    input_size = tuple(report["model"]["input_size"])
    t0 = time.perf_counter()
    x, source = parity_inputs(report, compressed, cfg.parity_samples, cfg.data)
    section: dict = {"formats": list(cfg.formats), "output": _rel(out, run)}
    files: list[Path] = []
    written: dict[str, str] = {}  # file name -> sha256 of what this export wrote
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
            written[ONNX_FILE] = hashlib.sha256(onnx_bytes).hexdigest()
            section["onnx"] = {
                "path": _rel(dest, run), "bytes": len(onnx_bytes),
                "sha256": written[ONNX_FILE], "exporter": EXPORTER,
                "opset": cfg.opset, "dynamic_batch": cfg.dynamic_batch,
                "input": {"name": INPUT_NAME,
                          "shape": ["batch" if cfg.dynamic_batch else 1, *input_size]},
                "output": OUTPUT_NAME, "ops": op_counts(proto),
                # chains on 1×1 maps multiplied into fewer 1×1 convs (deploy.merge_linear_chains)
                "merged_chains": merged_chains(proto),
                "checker": "onnx.checker.check_model(full_check=True) passed",
                "parity": par.to_dict(),
            }
        timing = None
        if "onnx-int8" in cfg.formats:
            original, weights = original_model(run, report, plan)
            original_random = weights.startswith("random")
            q = int8_stage(run, report, compressed, original, [lp.name for lp in plan.layers],
                           input_size, cfg.int8, opset=cfg.opset, data=cfg.data,
                           original_random=original_random, progress=progress)
            dest = out / INT8_FILE
            stage.enter_context(atomic_path(dest)).write_bytes(q.compressed)
            files.append(dest)
            written[INT8_FILE] = q.section["sha256"]
            section["int8"] = {**q.section, "path": _rel(dest, run)}
            timing = q.timing
        if "safetensors" in cfg.formats:
            progress.stage("validating model.safetensors")
            section["safetensors"] = _validate_safetensors(run, st_path, compressed, plan, x,
                                                           report, modified)
            if not _same_folder(out, run):
                dest = out / MODEL_FILE
                tmp = stage.enter_context(atomic_path(dest))
                shutil.copyfile(st_path, tmp)
                if file_sha256(tmp) != section["safetensors"]["sha256"]:
                    raise LrcError(f"the copy of {st_path} to {dest} differs from the original.")
                files.append(dest)
                section["safetensors"]["copied_to"] = _rel(dest, run)
        if cfg.latency is not None:
            section["latency"] = _latency(run, report, plan, compressed, input_size, cfg,
                                          onnx_bytes, progress, timing)
            if timing:
                section["int8"]["latency"] = _int8_latency(section["latency"])
                sha = _int8_advice(stage, out, run, section["int8"], timing, original_random)
                if sha is not None:
                    files.append(out / ORIGINAL_INT8_FILE)
                    written[ORIGINAL_INT8_FILE] = sha
        section["seconds"] = round(time.perf_counter() - t0, 3)
        # An export of some formats only keeps what an earlier one measured of the others
        # (the model in RUN/ never changes, so those figures still hold).
        report = {**report, "export": {**(report.get("export") or {}), **section}}
        progress.stage("writing")
        rendered = render_reports(report)
        for name, data in rendered.items():
            tmp = stage.enter_context(atomic_path(run / name))
            tmp.write_bytes(data)
        same = _same_folder(out, run)
        if "safetensors" in section and not same:
            written[MODEL_FILE] = section["safetensors"]["sha256"]
        report["files"] = _files_after_export(report, rendered, written if same else {})
        if not same:
            _stage_export_manifest(stage, out, run, written)
        text = json.dumps(report, indent=1, default=json_default) + "\n"
        stage.enter_context(atomic_path(run / REPORT_FILE)).write_text(text, encoding="utf-8")
        RunDir(run).record(*rendered, *(written if same else []))
    remove_stale_plots(run, rendered)
    progress.end()
    return ExportResult(run, files, section, report)


def _same_folder(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _check_destinations(run: Path, out: Path, names: list[str], overwrite: bool,
                        report: dict) -> None:
    """Export replaces only files lrcompress wrote: in RUN/ those its manifest lists (or, for a
    model.int8.onnx from before it was listed, the one report.json records by sha256); in
    another folder, with --overwrite, those an earlier export recorded there and nobody changed
    since. Never the run's own model, and never into another run's folder."""
    if not _same_folder(out, run) and out.is_dir() and read_manifest(out) is not None:
        raise UserError(f"-o {out} is another lrcompress run: exporting into it would mix two "
                        "runs' files. Choose another -o (e.g. a new deploy/ folder).")
    ours = (read_manifest(run) or set()) if _same_folder(out, run) else _export_record(out)
    old_int8 = run / INT8_FILE
    if (_same_folder(out, run) and old_int8.is_file()
            and ((report.get("export") or {}).get("int8") or {}).get("sha256")
            == file_sha256(old_int8)):
        ours = {*ours, INT8_FILE}
    for name in names:
        dest = out / name
        if not (dest.exists() or dest.is_symlink()):
            continue
        if dest.resolve() == (run / MODEL_FILE).resolve():
            raise UserError(f"{dest} is {run / MODEL_FILE} itself (the run's own model): "
                            "exporting there would replace the input. Choose another -o.")
        if _same_folder(out, run):
            if name not in ours:
                raise UserError(f"{dest} was not written by lrcompress (the run's "
                                f"{STATE_DIR}/manifest.json does not list it), so export will "
                                "not replace it. Move it away, or export with -o DIR.")
            continue
        if not overwrite:
            raise UserError(f"{dest} exists. Pass --overwrite to replace it (only a file an "
                            "earlier `lrcompress export` wrote there, unchanged since), or "
                            "choose another -o.")
        if ours.get(name) != file_sha256(dest):
            raise UserError(f"{dest} was not written by `lrcompress export` (or was changed "
                            f"since: {out / EXPORT_MANIFEST} does not record its sha256), so "
                            "--overwrite will not replace it. Move it away, or choose another "
                            "-o.")


def _export_record(out: Path) -> dict[str, str]:
    """{file: sha256} of what earlier exports wrote into ``out`` ({} if none)."""
    path = out / EXPORT_MANIFEST
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def _stage_export_manifest(stage: contextlib.ExitStack, out: Path, run: Path,
                           written: dict[str, str]) -> None:
    """``out/lrcompress-export.json``: the sha256 of every file export wrote there, so a later
    ``export -o out --overwrite`` knows which files are lrcompress's (renamed in with them)."""
    record = {k: v for k, v in _export_record(out).items() if (out / k).is_file()}
    text = json.dumps({"written_by": "lrcompress export", "run": str(run.resolve()),
                       "files": {**record, **written}}, indent=1) + "\n"
    stage.enter_context(atomic_path(out / EXPORT_MANIFEST)).write_text(text, encoding="utf-8")


def _files_after_export(report: dict, rendered: dict, in_run: dict[str, str]) -> dict:
    """report.json's ``files`` after export rewrote the reports (plots it no longer draws
    removed) and wrote ``in_run`` (name -> sha256: model.onnx, model.int8.onnx) into RUN/; the
    model's own checksum stays what search recorded."""
    files = {k: v for k, v in (report.get("files") or {}).items()
             if not k.startswith(f"{PLOT_DIR}/")}
    files.update({k: hashlib.sha256(v).hexdigest() for k, v in rendered.items()})
    files.update(in_run)
    return dict(sorted(files.items()))


def _validate_safetensors(run: Path, path: Path, model: nn.Module, plan: Plan, x, report,
                          modified: list[str]):
    """The weights are the ones search wrote (their sha256 is the one report.json records)
    and reload deterministically; the header's plan agrees with plan.json and the report."""
    sha = file_sha256(path)
    recorded = (report.get("files") or {}).get(MODEL_FILE)
    if recorded is None:
        same_as_run = "not checked: report.json records no checksum (an older lrcompress)"
    elif recorded == sha:
        same_as_run = "sha256 equals the one search recorded in report.json"
    else:
        same_as_run = (f"MODIFIED since search wrote it (sha256 {sha[:12]}…, recorded "
                       f"{recorded[:12]}…): exported anyway, --allow-modified")
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
    return {"path": _rel(path, run), "bytes": path.stat().st_size, "sha256": sha,
            "recorded_sha256": recorded, "same_as_run": same_as_run,
            "modified_files": modified,
            "reload": "lrcompress.load twice: identical weights and bit-exact outputs",
            "macs": plan.macs, "params": plan.params}


def _int8_advice(stage: contextlib.ExitStack, out: Path, run: Path, int8: dict, timing: dict,
                 original_random: bool) -> str | None:
    """The INT8 rows' trade-off sentence (``int8_tradeoff``); where it advises quantizing the
    original alone, the original's INT8 graph (already quantized, timed and checked with the
    compressed one) is staged as original.int8.onnx and named in it. Returns that file's
    sha256 (None: no advice, or no real original to write)."""
    lat = int8["latency"]
    graph = timing.get("original_int8")
    sha = None
    if (not original_random and graph is not None
            and quantize_only(lat["runs"], int8["accuracy"])):
        stage.enter_context(atomic_path(out / ORIGINAL_INT8_FILE)).write_bytes(graph)
        sha = hashlib.sha256(graph).hexdigest()
        int8["original_int8_file"] = {"path": _rel(out / ORIGINAL_INT8_FILE, run),
                                      "bytes": len(graph), "sha256": sha}
    lat["tradeoff"] = int8_tradeoff(lat["runs"], int8["accuracy"],
                                    (int8.get("original_int8_file") or {}).get("path"))
    return sha


def _int8_latency(lat: dict) -> dict:
    rows = int8_latency_rows(lat["runs"])
    cpu = cpu_features()
    warnings = slower_warnings(rows, cpu, lat["config"]["slower_margin"])
    for w in warnings:
        log.warning("%s", w)
    return {"runs": rows, "cpu": cpu, "warnings": warnings}


def _latency(run, report, plan, compressed, input_size, cfg: ExportConfig, onnx_bytes,
             progress, timing: dict[str, bytes] | None = None) -> dict:
    """``timing``: dynamic-batch graphs already made (the INT8 stage's four), timed together."""
    lat = cfg.latency
    original, weights = original_model(run, report, plan)
    onnx_models = None
    if lat.onnxruntime and timing:
        onnx_models = timing
    elif lat.onnxruntime:
        progress.stage("exporting dynamic-batch graphs for timing")
        comp = onnx_bytes if cfg.dynamic_batch and onnx_bytes else export_onnx(
            compressed, input_size, opset=cfg.opset, dynamic_batch=True).SerializeToString()
        orig = export_onnx(original, input_size, opset=cfg.opset,
                           dynamic_batch=True).SerializeToString()
        onnx_models = {"original": orig, "compressed": comp}
    per_engine = len(lat.threads) * len(lat.batches) + (  # CPU rows, then the CUDA ones
        len(lat.batches) if torch.cuda.is_available() else 0)
    n_runs = per_engine * (bool(lat.onnxruntime) + bool(lat.torch))
    n_layers = len(plan.layers) if lat.per_layer else 0
    progress.stage("measuring latency", total=n_runs + n_layers)
    tot = report["totals"]
    res = compare(original, compressed, input_size, lat,
                  ideal_speedup=tot["macs_before"] / tot["macs_after"], onnx_models=onnx_models,
                  plan=plan, progress=progress.advance)
    res["original_weights"] = weights
    res["input_size"] = list(input_size)
    return res


__all__ = ["ALL_FORMATS", "ExportConfig", "ExportResult", "export_run", "FORMATS"]
