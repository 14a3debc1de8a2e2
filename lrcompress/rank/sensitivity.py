"""``sensitivity``: ranks from a per-layer calibration-loss model, allocated greedily to the target.

For each candidate layer i, the calibration loss is measured once with that layer alone factorized
at its *smallest* useful rank (a deep truncation, so the loss change stands well above the noise
of a few calibration batches); with the relative reconstruction errors e_i(r) of every option this
gives the model ΔL_i(r) ≈ s_i · (e_i(r) / e_i(r_min))² (``_signals.loss_model_scores``). The
greedy knapsack of ``_problem.allocate`` then keeps the options with the least predicted loss per
MAC (or parameter) until the budget is met exactly. [PROPOSAL]: the additive, quadratic loss
model is ours (in the spirit of second-order saliency and of methods.md §5's loss-bound rank
selection); it is the rank-selection part that `rene` reuses for its final budget repair.

Config (``ctx.config["sensitivity"]``): ``calib_batches`` (default 4) — batches per measurement.
"""

from __future__ import annotations

from lrcompress.errors import UserError
from lrcompress.rank.problem import allocate
from lrcompress.rank.signals import batches_key, error_curves, loss_model_scores, sensitivities

KEYS = {"calib_batches"}


def truncation_scores(ctx, errs, n_batches: int = 4, progress=None, stats: dict | None = None):
    """(scores, sensitivities): each layer's calibration-loss response when it alone is cut to
    its smallest useful rank, turned by the loss model into minus the predicted loss increase of
    every option (``scores[i][j]``). `rene` starts its logits from these scores."""
    ref = [0] * len(ctx.problem.layers)
    sens = sensitivities(ctx.model, ctx.problem, ref, ctx.batches[:n_batches], ctx.device,
                         ctx.cache, progress=progress, stats=stats,
                         stats_key=batches_key(ctx.batches))
    return loss_model_scores(errs, sens, ref), sens


def select(ctx) -> tuple:
    cfg = dict(ctx.config.get("sensitivity") or {})
    unknown = set(cfg) - KEYS
    if unknown:
        raise UserError(f"Unknown sensitivity settings {sorted(unknown)}: valid are "
                        f"{sorted(KEYS)}.")
    n = int(cfg.get("calib_batches", 4))
    problem = ctx.problem
    problem.check_feasible()
    errs = error_curves(ctx.model, problem, ctx.cache, stats=ctx.stats,
                        stats_key=batches_key(ctx.batches))
    scores, sens = truncation_scores(ctx, errs, n, progress=lambda _n: ctx.tick(),
                                     stats=ctx.stats)
    choice = allocate(problem, scores)
    trace = {"sensitivity": {lo.spec.name: s for lo, s in zip(problem.layers, sens)},
             "calib_batches": min(n, len(ctx.batches))}
    return problem.to_plan(choice, "sensitivity"), trace
