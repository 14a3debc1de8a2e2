"""``lrcompress search``: from a checkpoint (and a data spec) to a compressed model in RUN/.

This module turns the command's inputs (a checkpoint, an architecture name, data specs) into a
:class:`~lrcompress.commands.compress.Job` — every input validated before RUN/ is created, so bad
input leaves nothing behind — and runs the job's stages (:mod:`lrcompress.commands.compress`).

Without a data spec the job is data-free: calibration and training inputs are synthesised from
the model's BatchNorm statistics (:mod:`lrcompress.calib.synthesize`), and accuracy is measured
only on an ``eval_spec``'s test split.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from lrcompress.batches import UserBatches, top1_labeller
from lrcompress.commands.compress import (
    CompressConfig,
    CompressResult,
    Job,
    Loaders,
    SynthConfig,
    build_problem,
    check_batchnorm_batches,
    check_data_free,
    check_given_plan,
    prepare_latency,
    resolve_device,
    run_stages,
)
from lrcompress.commands.run_dir import RunDir
from lrcompress.data import build_loaders, files_digest, parse_data_spec, resolve_preprocess
from lrcompress.errors import UserError
from lrcompress.model.loading import load_model
from lrcompress.model.plan import Plan
from lrcompress.util.progress import Progress

# The command's configuration is the job's (one class; the old name stays for the CLI's users).
SearchConfig = CompressConfig


def fingerprint(model_spec: str, data_spec: str | None, cfg: CompressConfig, extra: dict) -> dict:
    """What must be equal for a re-run to continue the previous one: the settings, the
    checkpoint file, the plan file's contents and the data's files (not just their names, so
    an edited plan or changed data is never mistaken for the same run)."""
    d = cfg.resume_dict()
    path = Path(model_spec)
    if path.is_file():
        st = path.stat()
        d["checkpoint"] = {"path": str(path.resolve()), "size": st.st_size,
                           "mtime_ns": st.st_mtime_ns}
    else:
        d["checkpoint"] = {"spec": model_spec}
    d["data_spec"] = data_spec
    if cfg.plan_path:
        d["plan_sha256"] = _sha256(Path(cfg.plan_path))
    d.update(extra)
    for key in ("data_spec", "eval_spec"):
        if d.get(key):
            d[key.replace("_spec", "_files")] = files_digest(d[key])
    return json.loads(json.dumps(d, default=list))


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:  # unreadable: refused when the plan is read, with its own message
        return None


def search(model_spec: str, data_spec: str | None, out_dir, cfg: CompressConfig, *, arch=None,
           num_classes=None, in_chans=None, trust_pickle=False, progress: Progress | None = None,
           command: list[str] | None = None, eval_spec: str | None = None,
           synth: SynthConfig | None = None) -> CompressResult:
    """Run the whole job into ``out_dir``; an interrupted run of the same command resumes.

    Stage state lives in RUN/state/: the chosen plan, the decomposed weights, and each
    fine-tuning epoch. Every input is checked before RUN/ is created or changed.
    ``data_spec`` None: data-free (inputs synthesised as ``synth`` says, default SynthConfig());
    ``eval_spec``: the test split accuracy is measured on (default: ``data_spec``'s).
    """
    progress = progress or Progress()
    t = time.perf_counter()
    synth = (synth or SynthConfig()) if data_spec is None else None
    fp = fingerprint(model_spec, data_spec, cfg, {
        "arch": arch, "num_classes": num_classes, "in_chans": in_chans, "eval_spec": eval_spec,
        **({"synth": synth.to_dict()} if synth else {})})
    run = RunDir(out_dir, fp, cfg.overwrite, inputs=_input_paths(model_spec, data_spec, eval_spec))
    run.check()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    progress.stage("loading model")
    model, info = _load_original(model_spec, arch, num_classes, in_chans, trust_pickle)
    given_plan = _read_plan(cfg)
    dspec, espec = (parse_data_spec(s) if s else None for s in (data_spec, eval_spec))
    size = cfg.input_size or (given_plan.input_size if given_plan is not None else None)
    pre = resolve_preprocess(model, dspec or espec, input_size=size, mean=cfg.mean,
                             std=cfg.std, in_chans=info.in_chans, recorded=info.recorded())
    problem = build_problem(model, info, pre.input_size, cfg)
    if given_plan is not None:
        cfg = check_given_plan(given_plan, problem, cfg, f"--plan {cfg.plan_path}")
    if dspec is None:
        check_data_free(model, cfg, info.arch)
        check_batchnorm_batches(model, cfg, {"calib": synth.samples, "train": synth.samples})
    loaders = _loaders(model, device, dspec, espec, pre, cfg, info.num_classes)
    loaders.description, loaders.eval_description = data_spec or "none (data-free)", eval_spec
    latency = prepare_latency(problem, model, tuple(pre.input_size), cfg, progress)
    job = Job(model, info, tuple(pre.input_size), problem, loaders, cfg, device, run, progress,
              given_plan, command, latency=latency, synth=synth, norm=(pre.mean, pre.std))
    job.times["load"] = time.perf_counter() - t
    return run_stages(job)


def _load_original(model_spec: str, arch, num_classes, in_chans, trust_pickle):
    """(model, info) of the uncompressed model to search (a compressed one is refused)."""
    lm = load_model(model_spec, arch=arch, num_classes=num_classes, in_chans=in_chans,
                    trust_pickle=trust_pickle)
    if lm.plan is not None:
        raise UserError(f"{model_spec} is already compressed by lrcompress. Search the original "
                        "checkpoint instead.")
    return lm.model, lm.info


def _loaders(model, device, dspec, espec, pre, cfg: CompressConfig, num_classes) -> Loaders:
    """Calibration and training batches from ``dspec`` (None: data-free, filled in by the
    synthesis stage; unlabelled ones labelled by the original's top-1), test batches from
    ``espec`` when given, else from ``dspec``."""
    calib = train = test = None
    if dspec is not None:
        built = build_loaders(dspec, pre, cfg.data, num_classes=num_classes)
        calib, train, test = built.calib, built.train, built.test
        check_batchnorm_batches(model, cfg, {"calib": len(calib.dataset),
                                             "train": len(train.dataset)})
        if not built.labelled:
            label = top1_labeller(model, device)
            calib, train = (UserBatches(dl, what, input_shape=None, labeller=label)
                            for dl, what in ((calib, "calib"), (train, "train")))
    if espec is not None:
        test = build_loaders(espec, pre, cfg.data, num_classes=num_classes).test
        if test is None:
            raise UserError(f"--eval-data {espec} has no labelled test split (a flat image "
                            "folder is unlabelled): give DIR/val/CLASS/* images or a dataset.")
    return Loaders(calib, train, test, batch_size=cfg.data.batch_size)


def _input_paths(model_spec: str, *data_specs: str | None) -> list[Path]:
    """The files and folders the command reads (--overwrite must not remove any of them)."""
    paths = [Path(model_spec)]
    for spec in data_specs:
        kind, _, root = (spec or "").partition(":")
        if root and kind.strip().lower() != "synthetic":
            paths.append(Path(root.strip()).expanduser())
    return paths


def _read_plan(cfg: CompressConfig) -> Plan | None:
    """The ``--plan`` file, parsed (checked against the model by check_given_plan)."""
    if not cfg.plan_path:
        return None
    path = Path(cfg.plan_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"Cannot read --plan {path}: {e}. Give a plan.json written by "
                        "`lrcompress search`.") from e
    return Plan.from_json(text)


__all__ = ["SearchConfig", "build_problem", "fingerprint", "resolve_device", "search"]
