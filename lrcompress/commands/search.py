"""``lrcompress search``: from a checkpoint and a data spec to a compressed model in RUN/.

This module turns the command's inputs (a checkpoint, an architecture name, a data spec) into a
:class:`~lrcompress.commands.compress.Job` — every input validated before RUN/ is created, so bad
input leaves nothing behind — and runs the job's stages (:mod:`lrcompress.commands.compress`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lrcompress.commands.compress import (
    CompressConfig,
    CompressResult,
    Job,
    Loaders,
    build_problem,
    prepare_latency,
    resolve_device,
    run_stages,
)
from lrcompress.commands.run_dir import RunDir
from lrcompress.data import build_loaders, parse_data_spec, resolve_preprocess
from lrcompress.errors import UserError
from lrcompress.model.loading import load_model
from lrcompress.model.plan import Plan
from lrcompress.util.progress import Progress

# The command's configuration is the job's (one class; the old name stays for the CLI's users).
SearchConfig = CompressConfig


def fingerprint(model_spec: str, data_spec: str, cfg: CompressConfig, extra: dict) -> dict:
    """What must be equal for a re-run to continue the previous one."""
    d = cfg.resume_dict()
    path = Path(model_spec)
    if path.is_file():
        st = path.stat()
        d["checkpoint"] = {"path": str(path.resolve()), "size": st.st_size,
                           "mtime_ns": st.st_mtime_ns}
    else:
        d["checkpoint"] = {"spec": model_spec}
    d["data_spec"] = data_spec
    d.update(extra)
    return json.loads(json.dumps(d, default=list))


def search(model_spec: str, data_spec: str, out_dir, cfg: CompressConfig, *, arch=None,
           num_classes=None, in_chans=None, trust_pickle=False, progress: Progress | None = None,
           command: list[str] | None = None) -> CompressResult:
    """Run the whole job into ``out_dir``; an interrupted run of the same command resumes.

    Stage state lives in RUN/state/: the chosen plan, the decomposed weights, and each
    fine-tuning epoch. Every input is checked before RUN/ is created or changed.
    """
    progress = progress or Progress()
    t = time.perf_counter()
    fp = fingerprint(model_spec, data_spec, cfg, {"arch": arch, "num_classes": num_classes,
                                                  "in_chans": in_chans})
    run = RunDir(out_dir, fp, cfg.overwrite)
    run.check()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    progress.stage("loading model")
    lm = load_model(model_spec, arch=arch, num_classes=num_classes, in_chans=in_chans,
                    trust_pickle=trust_pickle)
    if lm.plan is not None:
        raise UserError(f"{model_spec} is already compressed by lrcompress. Search the original "
                        "checkpoint instead.")
    model, info = lm.model, lm.info
    dspec = parse_data_spec(data_spec)
    pre = resolve_preprocess(model, dspec, input_size=cfg.input_size, mean=cfg.mean,
                             std=cfg.std, in_chans=info.in_chans)
    problem = build_problem(model, info, pre.input_size, cfg)
    given_plan = _read_plan(cfg, info.arch)
    built = build_loaders(dspec, pre, cfg.data, num_classes=info.num_classes)
    latency = prepare_latency(problem, model, tuple(pre.input_size), cfg, progress)
    loaders = Loaders(built.calib, built.train, built.test, description=data_spec,
                      batch_size=cfg.data.batch_size)
    job = Job(model, info, tuple(pre.input_size), problem, loaders, cfg, device, run, progress,
              given_plan, command, latency=latency)
    job.times["load"] = time.perf_counter() - t
    return run_stages(job)


def _read_plan(cfg: CompressConfig, arch: str) -> Plan | None:
    if not cfg.plan_path:
        return None
    plan = Plan.from_json(Path(cfg.plan_path).read_text())
    if plan.arch != arch:
        raise UserError(f"--plan {cfg.plan_path} was made for {plan.arch}, not {arch}.")
    return plan


__all__ = ["SearchConfig", "build_problem", "fingerprint", "resolve_device", "search"]
