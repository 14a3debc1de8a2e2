"""The decomposition stage: the factorized student from the plan (weight or activation fit), kept
in RUN/state/ for a resumed run."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace

from torch import nn

from lrcompress.commands.job import (
    Decomposed,
    Job,
    calibration_batches,
    fit_of,
    is_custom,
    skeleton_of,
)
from lrcompress.factorizations import get_factorization
from lrcompress.model.checkpoint import read_checkpoint
from lrcompress.model.input_stats import (
    ReferenceInputs,
    collect_input_stats,
    collect_paired_stats,
    fit_report,
    kinds_for,
    moment_cost,
    needs,
    no_fit_note,
)
from lrcompress.model.plan import Plan
from lrcompress.model.surgery import decompose_
from lrcompress.model.weights import build_compressed, save_compressed
from lrcompress.rank.problem import DENSE, RankProblem
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
        fit = fit_of(job.cfg, job.loaders.calib is not None)
        batches = calibration_batches(job) if fit != "weight" else None
        if fit == "sequential":
            student, res, fit_skipped = sequential_decompose(job, source, plan, batches)
        else:
            stats = fit_skipped = None
            if fit == "activation":
                stats, fit_skipped = collect_input_stats(source, batches, plan)
            job.progress.stage("decomposing", total=len(plan.layers))
            student = copy.deepcopy(source).cpu()
            res = decompose_(student, plan, progress=lambda _n: job.progress.advance(),
                             stats=stats)
        out = Decomposed(student, {r.name: r.rel_error for r in res},
                         {r.name: r.retries for r in res if r.retries})
        if fit != "weight":
            out.fit = fit_report(source, student, plan, batches, res, fit_skipped, kind=fit)
        if run.writes:  # decomposed.safetensors last: its presence means the stage is complete
            write_json(run.state("decomposed.json"),
                       {"rel_error": out.rel_errors, "retries": out.retries, "fit": out.fit})
            save_compressed(student, plan, run.state("decomposed.safetensors"))
    out.student.to(job.device).eval()
    return out


def sequential_decompose(job: Job, source: nn.Module, plan: Plan, batches: list):
    """The sequential activation fit: layer by layer in the plan's order, each fitted on the
    inputs the already-compressed layers before it produce, toward the original's output
    (``factorizations.corrected_weight``). One forward of the student per layer and batch,
    stopped at the layer; the original's layer inputs come from :class:`ReferenceInputs` (one
    forward per batch and window of layers). Returns ``(student, results, skipped)``."""
    job.progress.stage("decomposing (sequential fit)", total=len(plan.layers))
    device = next(source.parameters()).device
    student = copy.deepcopy(source).to(device)
    want = needs(plan)
    reference = ReferenceInputs(source, batches, [lp.name for lp in plan.layers
                                                  if lp.name in want])
    results, skipped = [], {}
    for lp in plan.layers:
        stats = None
        if lp.name in want:
            stats, note = collect_paired_stats(source, student, batches, lp.name, lp.spec,
                                               want[lp.name], reference=reference)
            if note:
                skipped[lp.name] = note
        else:
            skipped[lp.name] = no_fit_note(lp.factorization)
        results += decompose_(student, replace(plan, layers=[lp]),
                              stats=None if stats is None else {lp.name: stats})
        job.progress.advance()
    return student.cpu(), results, skipped


# The sequential fit's run-time probe's time source; tests swap it.
clock = time.perf_counter
PROBE_BATCHES = 2  # batches the probe collects its statistics on


def sequential_fit_estimate(source: nn.Module, problem: RankProblem, batches: list,
                            forward_s: float) -> tuple[str, int, str, float] | None:
    """The sequential fit's estimate row (stage, units, unit, seconds per unit), from two
    probes: the statistics of the layer with the most moment work (on the first
    ``PROBE_BATCHES`` batches, scaled to all of them) and the fit of the layer with the widest
    second moment (the largest solve) at its largest useful rank. Every layer is then costed as
    the student's forward stopped at it (``forward_s`` per batch for the whole model, half on
    average), its statistics scaled by their work and its decomposition by width³ from the
    probes' (``input_stats.moment_cost``); the original's layer inputs add one whole forward
    per batch (:class:`ReferenceInputs`). None when no layer has an activation fit."""
    cands = []
    for i, lo in enumerate(problem.layers):
        kinds = kinds_for(lo.spec, {o.factorization for o in lo.options})
        work, width = moment_cost(lo.spec, kinds) if kinds else (0, 0)
        if width:
            cands.append((i, kinds, work, width))
    if not cands or not batches:
        return None
    probe = batches[:PROBE_BATCHES]  # statistics scale with the batches: timed on a few
    iw, kinds_w, work0, _ = max(cands, key=lambda c: c[2])
    t0 = clock()
    stats = _probe_stats(source, problem.layers[iw].spec, kinds_w, probe)
    t1 = clock()
    i, kinds, _, width0 = max(cands, key=lambda c: c[3])
    lo = problem.layers[i]
    if i != iw:
        stats = _probe_stats(source, lo.spec, kinds, probe)
    top = max((o for o in lo.options if o.factorization != DENSE), key=lambda o: o.rank)
    mod = source.get_submodule(lo.spec.name)
    t2 = clock()
    get_factorization(top.factorization).from_weight(mod.weight, mod.bias, lo.spec, top.rank,
                                                     stats=stats)
    t3 = clock()
    per_stats = (t1 - t0) * len(batches) / len(probe)
    n_fwd = len(batches) * forward_s / 2  # the student's, stopped at the layer
    total = len(batches) * forward_s + sum(
        n_fwd + per_stats * work / work0 + (t3 - t2) * (width / width0) ** 3
        for _, _, work, width in cands)
    return ("decomposition: sequential fit", len(cands), "layers", total / len(cands))


def _probe_stats(source: nn.Module, spec, kinds, batches):
    """The paired statistics of one layer of ``source`` against itself (the probe's work)."""
    return collect_paired_stats(source, source, batches, spec.name, spec, kinds)[0]
