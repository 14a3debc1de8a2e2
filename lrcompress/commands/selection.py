"""The rank-selection stage: the plan re-read, given, or chosen by the rank method (with the
run-time estimate announced first and, under the activation fit, rene's candidate statistics)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from lrcompress.commands.decompose import sequential_fit_estimate
from lrcompress.commands.job import DATA_METHODS, CompressConfig, Job, fit_of, re_estimates_bn
from lrcompress.commands.run_dir import RunDir
from lrcompress.errors import UserError
from lrcompress.measure.estimate import RunEstimate, forward_seconds
from lrcompress.model.input_stats import (
    collect_layer_stats,
    kinds_for,
)
from lrcompress.model.plan import Plan
from lrcompress.rank import SelectContext, get_estimator, get_method
from lrcompress.rank.problem import RankProblem
from lrcompress.rank.selection_state import SelectionState
from lrcompress.rank.signals import Cache
from lrcompress.util.progress import Progress
from lrcompress.util.resources import rebatch, retry_halving
from lrcompress.util.run_files import (
    CACHE_DIR,
    PLAN_FILE,
    SIGNALS_FILE,
)

log = logging.getLogger(__name__)


def select_stage(job: Job, source: nn.Module, batches: list) -> tuple[Plan, dict]:
    """The plan: re-read after a resume, the given ``--plan``, or chosen by the rank method."""
    run, cfg = job.run, job.cfg
    if run.has_state(PLAN_FILE):
        plan = Plan.from_json(run.state(PLAN_FILE).read_text())
        trace = run.read_state_json("trace.json")
    elif job.given_plan is not None:
        plan, trace = job.given_plan, {"reapplied": str(cfg.plan_path)}
    else:
        plan, trace = select_ranks(source, job.problem, batches, cfg, job.device, run,
                                   tick=job.progress.advance, progress=job.progress,
                                   estimate=lambda rows: announce_estimate(job, source, batches,
                                                                           rows))
        plan = replace(plan, target=cfg.target)  # solved at a corrected latency budget, maybe
    keep_plan(job, plan, trace)
    return plan, trace


def announce_estimate(job: Job, source: nn.Module, batches: list, rows) -> RunEstimate:
    """One line before the search: every stage's units × the measured cost of one (the rank
    method's own ``rows``; a forward, and a forward + backward, of the original on a calibration
    batch; the original's measured evaluation). Kept as ``job.estimate`` for the report."""
    cfg, est = job.cfg, RunEstimate()
    x = (batches[0][0] if batches else  # no data: a batch of zeros of the input's shape
         torch.zeros(job.loaders.batch_size or 1, *job.input_size)).to(job.device)
    fwd = forward_seconds(source, x)
    sequential = (sequential_fit_estimate(source, job.problem, batches, fwd)
                  if batches and fit_of(cfg, True) == "sequential" else None)
    for row in rows:
        est.add(*row)  # a "decomposition" row: the weight fits (the report's comparison)
    if sequential is not None:
        est.add(*sequential)
    if not rows:
        est.unknown.append(f"rank selection ({cfg.method})")
    t_eval = job.times.get("eval_original")
    if t_eval is not None:
        est.add("evaluation", 2 + cfg.finetune.enabled, "test passes", t_eval)
    if re_estimates_bn(job, source):
        est.add("BatchNorm re-estimation", cfg.bn_batches, "batches", fwd)
    if cfg.finetune.enabled and job.loaders.train is not None:
        steps = cfg.finetune.max_steps or cfg.finetune.epochs * len(job.loaders.train)
        est.add("fine-tuning", steps, "steps", forward_seconds(source, x, backward=True) + fwd)
    job.progress.info(est.line())
    job.estimate = est.to_dict()
    return est


def keep_plan(job: Job, plan: Plan, trace: dict) -> None:
    """The chosen plan and its trace in RUN/state/ (a resumed run starts from them)."""
    job.run.write_state_json("trace.json", trace)
    job.run.write_state_text(PLAN_FILE, plan.to_json() + "\n")
    job.run.remove_state(f"search-{job.cfg.method}.pt")  # superseded by the plan


def select_ranks(model: nn.Module, problem: RankProblem, batches: list, cfg: CompressConfig,
                 device, run: RunDir | None = None, tick=None,
                 progress: Progress | None = None, estimate=None) -> tuple[Plan, dict]:
    """Run the rank method ``cfg.method`` on ``problem``: returns ``(plan, trace)``.
    ``estimate``, when given, first receives the method's run-time rows (empty when it has no
    probe) before the search starts."""
    run = run or RunDir(None)
    if progress is not None:
        progress.stage(f"rank selection ({cfg.method})")
    if cfg.method in DATA_METHODS and not batches:
        raise UserError(f"The rank method {cfg.method!r} needs calibration data (calib=...). "
                        "Give a few hundred inputs, synth=SynthConfig() to synthesise them from "
                        "the model's BatchNorm statistics, or use method='uniform'.")
    cache_dir = cfg.cache_dir or (run.path / CACHE_DIR if run.enabled else None)
    if run.enabled and cfg.cache_dir is None:
        run.record(f"{CACHE_DIR}/{SIGNALS_FILE}")
    cache = Cache(None if cache_dir is None else Path(cache_dir) / SIGNALS_FILE)
    t0 = time.perf_counter()
    logits: list = []  # the original's outputs on the batches, when the statistics' pass ran
    stats = search_stats(model, problem, batches, cfg, progress, logits)
    t_stats = time.perf_counter() - t0
    state = (SelectionState(run.state(f"search-{cfg.method}.pt"), run.fingerprint_text)
             if run.enabled else None)
    ctx = SelectContext(model, problem, batches, device, cache, cfg.seed,
                        {**cfg.method_config, "rene": cfg.rene},
                        tick=tick or (lambda: None), state=state,
                        stage=progress.stage if progress is not None else
                        (lambda name, total=None: None), stats=stats,
                        logits=logits if len(logits) == len(batches) else None)

    if estimate is not None:
        probe = get_estimator(cfg.method)
        rows = probe(ctx) if probe is not None and batches else []
        if rows and stats:  # already spent: counted so that the total is the run's
            rows = [("rank selection: input statistics", 1, "pass", t_stats), *rows]
        estimate(rows)

    def select(size):  # --auto-batch: the same calibration samples in smaller batches
        ctx.batches = rebatch(batches, size)
        if size != first:
            ctx.logits = None  # measured on the batches as they were
        return get_method(cfg.method)(ctx)

    first = batches[0][0].shape[0] if batches else 1
    trainable = [p.requires_grad for p in model.parameters()]
    try:  # a method may freeze the model's weights to train its own variables (rene's α)
        (plan, trace), calib_bs = retry_halving(select, first, enabled=cfg.auto_batch,
                                                what="the rank search")
    finally:
        for p, flag in zip(model.parameters(), trainable):
            p.requires_grad_(flag)
    trace["calib_batch_size"] = calib_bs
    trace["candidate_fit"] = "activation" if stats else "weight"
    return plan, trace


def search_stats(model: nn.Module, problem: RankProblem, batches: list, cfg: CompressConfig,
                 progress: Progress | None = None, logits: list | None = None) -> dict | None:
    """The input statistics the data-reading rank methods score their options with under an
    output-aware fit (one pass over the calibration batches, every eligible layer): rene's
    candidates, the sensitivity and bisect error curves and sensitivities. None: weight fits
    (the weight fit, no batches, or rene with ``fit_candidates`` off). ``logits`` receives the
    model's outputs on the batches when the pass runs."""
    if (cfg.method not in DATA_METHODS or not batches or fit_of(cfg, True) == "weight"
            or (cfg.method == "rene" and not cfg.rene.fit_candidates)):
        return None
    want = {lo.spec.name: kinds_for(lo.spec, {o.factorization for o in lo.options})
            for lo in problem.layers}
    want = {n: k for n, k in want.items() if k}
    if not want:
        return None
    if progress is not None:
        progress.stage("input statistics for the activation-fitted options")
    stats, _ = collect_layer_stats(model, batches, {lo.spec.name: lo.spec
                                                    for lo in problem.layers}, want,
                                   outputs=logits)
    return stats
