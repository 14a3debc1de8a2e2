"""The decomposition stage: the factorized student from the plan (weight or activation fit), kept
in RUN/state/ for a resumed run."""

from __future__ import annotations

import copy
import logging

from torch import nn

from lrcompress.commands.job import (
    Decomposed,
    Job,
    calibration_batches,
    fit_of,
    is_custom,
    skeleton_of,
)
from lrcompress.model.checkpoint import read_checkpoint
from lrcompress.model.input_stats import (
    collect_input_stats,
    fit_report,
)
from lrcompress.model.plan import Plan
from lrcompress.model.surgery import decompose_
from lrcompress.model.weights import build_compressed, save_compressed
from lrcompress.util.io import write_json

log = logging.getLogger(__name__)


def decompose_stage(job: Job, source: nn.Module, plan: Plan, fresh: bool = False) -> Decomposed:
    """The factorized student (decomposed from ``source``, or re-read after a resume unless
    ``fresh``)."""
    run = job.run
    if run.has_state("decomposed.safetensors") and not fresh:
        student = build_compressed(plan) if not is_custom(job) else skeleton_of(job.model, plan)
        student.load_state_dict(read_checkpoint(run.state("decomposed.safetensors"))[0])
        dec = run.read_state_json("decomposed.json")
        out = Decomposed(student, dec["rel_error"], dec["retries"], dec.get("fit"))
    else:
        stats = batches = None
        if fit_of(job.cfg, job.loaders.calib is not None) == "activation":
            batches = calibration_batches(job)
            stats, fit_skipped = collect_input_stats(source, batches, plan)
        job.progress.stage("decomposing", total=len(plan.layers))
        student = copy.deepcopy(source).cpu()
        res = decompose_(student, plan, progress=lambda _n: job.progress.advance(), stats=stats)
        out = Decomposed(student, {r.name: r.rel_error for r in res},
                         {r.name: r.retries for r in res if r.retries})
        if stats is not None:
            out.fit = fit_report(source, student, plan, batches, res, fit_skipped)
        if run.writes:  # decomposed.safetensors last: its presence means the stage is complete
            write_json(run.state("decomposed.json"),
                       {"rel_error": out.rel_errors, "retries": out.retries, "fit": out.fit})
            save_compressed(student, plan, run.state("decomposed.safetensors"))
    out.student.to(job.device).eval()
    return out
