"""Latency targets in the job: the layer-time table before the search, the reachability check
with measured extreme plans, and the stage that measures the compressed model whole and
re-solves with corrected costs when it misses."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import torch
from torch import nn

from lrcompress.commands.decompose import decompose_stage
from lrcompress.commands.job import CompressConfig, Decomposed, Job, skeleton_of
from lrcompress.commands.selection import keep_plan, select_ranks
from lrcompress.errors import TargetError, UserError
from lrcompress.measure.latency_target import (
    LatencyConfig,
    check_engine,
    corrected_ratio,
    make_table,
    measure_whole,
    next_budget,
    option_times,
)
from lrcompress.model.narrow import narrowed_copy
from lrcompress.model.plan import Plan, Target
from lrcompress.rank.problem import RankProblem
from lrcompress.util.progress import Progress

log = logging.getLogger(__name__)


def prepare_latency(problem: RankProblem, model: nn.Module, input_size,
                    cfg: CompressConfig, progress: Progress | None = None) -> dict | None:
    """Before any work: every candidate's measured time on the latency engine (the options
    snapped to latency steps, nothing slower than dense) and the original measured whole.
    None unless the job has a latency target or ``--latency-aware``."""
    if not cfg.measures_latency:
        return None
    lat = cfg.latency
    check_engine(lat)
    if progress is not None:
        progress.stage(f"measuring candidate latencies ({lat.engine}, {lat.threads} thread(s), "
                       f"batch {lat.batch})")
    table = make_table(lat, cfg.cache_dir)
    # A MACs/params target keeps each layer's smallest rank: --latency-aware must not make a
    # target unreachable that the plain search reaches.
    options, summary = option_times(problem.layers, table, snap=True,
                                    keep_smallest=cfg.target.kind != "latency")
    kept = []
    for lo, opts in zip(problem.layers, options):
        lo.options = opts
        if len(opts) > 1:
            kept.append(lo)
        else:  # every chain is as slow as the dense layer, or slower: it stays dense
            problem.skipped[lo.spec.name] = (f"no factorized candidate is faster than the dense "
                                             f"layer on {lat.engine}")
    if not kept:
        raise UserError(f"On {lat.engine} (batch {lat.batch}, {lat.threads} thread(s)) no "
                        "factorized candidate of any layer is faster than the dense layer, so no "
                        "plan can make this model faster there. Try another --decomp, a larger "
                        "--latency-batch, or another --latency-engine.")
    problem.layers = kept
    summary["layers_without_faster_candidate"] = len(options) - len(kept)
    narrowed = _narrowed_copy(model, problem)
    whole = measure_whole(model, narrowed, input_size, lat)
    problem.base_latency = whole.original_ms
    out = {"config": lat.to_dict(), "table": summary,
           "original_ms": whole.original_ms, "original_iqr_ms": whole.original_iqr_ms}
    if narrowed is not None:  # the layers' savings are taken from the narrowed model's time
        problem.start_latency = whole.compressed_ms
        out["narrowed_ms"] = whole.compressed_ms
    floor = check_reachable(problem, model, input_size, lat)
    if floor is not None:
        out["floor"] = floor
    return out


def _narrowed_copy(model: nn.Module, problem: RankProblem) -> nn.Module | None:
    """``--narrow-hidden``: a copy of ``model`` at the narrowed widths, for timing (None
    without narrowing)."""
    return None if problem.narrowing is None else narrowed_copy(model, problem.narrowing.blocks)


def _fastest_measured(problem: RankProblem, model: nn.Module, input_size, lat: LatencyConfig):
    """The faster, measured whole, of two extreme plans: every layer at its fastest candidate by
    the layer times, and every layer at its fewest MACs (the layer times miss graph effects such
    as layout changes between blocked and unblocked kernels, so the first is not always the
    fastest). Returns its timing and the layer times' estimate of its ratio. A plan both rules
    pick is measured once."""
    best = None
    choices = [problem.cheapest_choice(kind) for kind in ("latency", "flops")]
    for choice in (choices if choices[0] != choices[1] else choices[:1]):
        plan = problem.to_plan(choice, "fastest")
        w = measure_whole(model, timing_model(model, plan), input_size, lat)
        if best is None or w.ratio < best[0].ratio:
            best = (w, problem.cost_of(choice) / problem.base_cost)
    return best


def check_reachable(problem: RankProblem, model: nn.Module, input_size,
                    lat: LatencyConfig) -> dict | None:
    """Refuse a target no plan reaches. Under a latency target the additive model's floor (every
    layer at its fastest candidate) only decides when it meets the target; when it does not,
    the extreme plans of :func:`_fastest_measured` are built (seeded weights: latency does not
    depend on their values) and measured whole. If the faster meets the target, the additive
    model was pessimistic: the first solve's budget is corrected by the measured share of the
    predicted saving, and the measured floor is returned; otherwise the refusal quotes the
    measured ratio."""
    if problem.target.kind != "latency":
        problem.check_feasible()
        return None
    estimated = problem.min_cost() / problem.base_cost
    target = problem.target.ratio
    if estimated <= target:
        return None
    w, plan_estimate = _fastest_measured(problem, model, input_size, lat)
    if w.ratio > target + w.spread:
        ask = (f"Ask for {math.ceil(w.ratio * 100) / 100:.2f} or more, --include more layers, "
               "or use another --decomp." if w.ratio < 1 else
               "Factorizing this model does not make it faster on this engine and batch: try "
               "another --latency-batch or --latency-engine, or --decomp.")
        raise TargetError(
            f"--target-latency {target:.4g} cannot be reached: the fastest of the plans tried "
            f"(every one of the {len(problem.layers)} factorizable layers at its fastest "
            f"measured candidate, or at its fewest MACs; the rest as it is), measured whole, "
            f"runs at {w.ratio:.3f} ± {w.spread:.3f} of the original ({w.original_ms:.3f} ms on "
            f"{lat.engine}, batch {lat.batch}, {lat.threads} thread(s)). {ask}")
    start = max(corrected_ratio(target, plan_estimate, w.ratio, target), estimated * (1 + 1e-9))
    problem.target = Target("latency", start)
    return {"estimated": round(estimated, 4), "measured": round(w.ratio, 4),
            "spread": round(w.spread, 4), "first_budget": round(start, 4)}


def latency_stage(job: Job, source: nn.Module, batches: list, plan: Plan,
                  dec: Decomposed) -> tuple[Plan, Decomposed]:
    """Measure the student whole against the original; under a latency target that is missed
    by more than the measurement's spread, re-solve with the corrected budget (up to
    ``max_resolves`` times). Records every attempt in ``job.latency``."""
    lat, target, problem = job.cfg.latency, job.cfg.target, job.problem
    attempts, solved_at = [], problem.target.ratio  # check_reachable may have corrected it
    while True:
        job.progress.stage(f"measuring latency, original vs compressed ({lat.engine})")
        whole = measure_whole(job.model, dec.student, job.input_size, lat)
        row = {"solved_at": solved_at, "macs_ratio": plan.macs_ratio, **whole.to_dict()}
        if target.kind == "latency":
            row["estimated_ratio"] = problem.cost_of(problem.choice_of(plan)) / problem.base_cost
        attempts.append(row)
        if target.kind != "latency" or whole.ratio <= target.ratio + whole.spread:
            break
        if len(attempts) > lat.max_resolves:
            break
        wanted = next_budget(target.ratio, row["estimated_ratio"], whole.ratio, solved_at,
                             problem.min_cost() / problem.base_cost)
        if wanted is None:
            row["stop"] = ("the measured savings are too small for the target even at the "
                           "fastest candidates")
            break
        solved_at = wanted
        new = _resolve(job, source, batches, solved_at)
        if new is None:
            row["stop"] = "the corrected budget is below what any plan can reach"
            break
        plan, dec = new
    problem.target = target
    job.latency = {**(job.latency or {}), **_latency_verdict(target, attempts)}
    if target.kind == "latency" and not job.latency["met"] and lat.strict:
        raise UserError(job.latency["summary"] + " (--strict-target).")
    return plan, dec


def _resolve(job: Job, source: nn.Module, batches: list, ratio: float):
    """Select and decompose again at budget ``ratio`` (None: that budget is unreachable)."""
    try:
        job.problem.target = Target("latency", ratio)
        job.problem.check_feasible()
    except (TargetError, UserError):
        return None
    plan, trace = select_ranks(source, job.problem, batches, job.cfg, job.device, job.run,
                               tick=job.progress.advance, progress=job.progress)
    plan = replace(plan, target=job.cfg.target)
    keep_plan(job, plan, trace)
    return plan, decompose_stage(job, source, plan, fresh=True)


def _latency_verdict(target: Target, attempts: list[dict]) -> dict:
    last = attempts[-1]
    out = {"attempts": attempts, "measured_ratio": last["ratio"], "spread": last["spread"],
           "macs_ratio": last["macs_ratio"], "speedup": round(1 / last["ratio"], 4)}
    if target.kind != "latency":
        out["summary"] = (f"measured latency {last['ratio']:.3f} of the original (speed-up "
                          f"{1 / last['ratio']:.2f}x, ideal {1 / last['macs_ratio']:.2f}x)")
        return out
    met = last["ratio"] <= target.ratio + last["spread"]
    verdict = "meets" if met else "MISSES"
    out.update(target=target.ratio, met=met, summary=(
        f"measured latency {last['ratio']:.3f} ± {last['spread']:.3f} of the original "
        f"{verdict} the target {target.ratio:.3f} after {len(attempts)} attempt(s)"))
    return out


def timing_model(model: nn.Module, plan: Plan, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with the plan's chains, for timing only: their weights small seeded
    normals. (Empty chains hold whatever memory held; denormal or non-finite values make the
    CPU's arithmetic, and so the timing, many times slower.)"""
    m = skeleton_of(model, plan)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lp in plan.layers:
            for p in m.get_submodule(lp.name).parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)
    return m
