"""``bisect``: one relative singular-value threshold δ found by binary search on the calibration
loss (seed 001, "theory-driven rank selection", methods.md §5.1–5.3; Algorithms SVDRankApprox
and RankSelection).

Theorems 1–2 bound the loss change by Σ_l σ^l_{k+1}/σ^l_1, so one global δ applied layer-wise
controls it: ``k_l(δ) = max{k : σ_k/σ_1 ≥ δ}`` (⚑ the seed's "k σ_k" is a typo) on the spectrum
of the output-channel unfolding W_(1), mapped onto the layer's options as in ``_spectral``.
RankSelection: l = 0, u = 1; while u − l ≥ Δδ: δ = (l + u)/2 (⚑ midpoint), plan at δ, measure the
calibration loss (``ctx.batches``); if the loss increase over the original model is below
``max_loss_increase``, l ← δ, else u ← δ (⚑ loop on u − l only). The result is the plan at l.

[PROPOSAL] acceptance is on the *increase* (loss − floss < ε), not |floss − loss|: a truncation
that lowers the calibration loss is not a reason to stop. The seed has no budget; lrcompress
then makes the δ-plan meet the target with ``allocate``: if it is over the budget it sheds where
the spectrum says least is lost (score −σ_{k+1}/σ_1, or the calibration-loss model of
``_signals``), and if under, it spends the slack with the same scores. The trace records δ, the
δ-plan's loss increase, and which of the budget or the tolerance was binding.

Config (``ctx.config["bisect"]``, a dict of overrides):

* ``max_loss_increase`` (float > 0, default 0.02 nats absolute; methods.md §5.3 [PROPOSAL]).
* ``delta_tol`` (Δδ, default 1e-3).
* ``eval_batches`` (int or None, default None = all of ``ctx.batches``): batches per evaluation.
* ``shed_scores`` ("spectrum", default, or "loss_model"): scores for shedding / topping up;
  "loss_model" decomposes every option of every layer (slow for CP).
"""

from __future__ import annotations

from lrcompress.errors import UserError
from lrcompress.rank.problem import DENSE, allocate
from lrcompress.rank.spectral import (
    LayerSpectrum,
    Trials,
    choice_for,
    finite,
    layer_spectra,
    read_config,
    strictly_increasing,
)
from lrcompress.rank.svt import kept_above

DEFAULTS = {"max_loss_increase": 0.02, "delta_tol": 1e-3, "eval_batches": None,
            "shed_scores": "spectrum"}


def spectrum_scores(layers: list[LayerSpectrum]) -> list[list[float]]:
    """−σ_{r+1}/σ_1 per option: the largest relative singular value the option drops."""
    scores = []
    for ls in layers:
        top = ls.sv[0] if ls.sv[0] > 0 else 1.0
        row = []
        for j in range(ls.dense + 1):
            r = ls.rank_of(j)
            row.append(0.0 if j == ls.dense or r >= ls.full else -float(ls.sv[r]) / top)
        scores.append(strictly_increasing(row))
    return scores


def _loss_model_scores(ctx, choice, batches) -> list[list[float]]:
    from lrcompress.rank.signals import (
        batches_key,
        error_curves,
        loss_model_scores,
        sensitivities,
    )

    ref = [j if lo.options[j].factorization != DENSE else len(lo.options) - 2
           for lo, j in zip(ctx.problem.layers, choice)]
    key = batches_key(ctx.batches)  # the batches the statistics came from
    errs = error_curves(ctx.model, ctx.problem, ctx.cache, stats=ctx.stats, stats_key=key)
    sens = sensitivities(ctx.model, ctx.problem, ref, batches, ctx.device, ctx.cache,
                         stats=ctx.stats, stats_key=key)
    return [strictly_increasing(row) for row in loss_model_scores(errs, sens, ref)]


def select(ctx) -> tuple:
    cfg = read_config(ctx, "bisect", DEFAULTS)
    eps, tol = float(cfg["max_loss_increase"]), float(cfg["delta_tol"])
    if not eps > 0 or not 0 < tol < 1:
        raise UserError(f"bisect: max_loss_increase must be > 0 and delta_tol in (0, 1), got "
                        f"{cfg['max_loss_increase']} and {cfg['delta_tol']}.")
    if cfg["shed_scores"] not in ("spectrum", "loss_model"):
        raise UserError(f"bisect: shed_scores must be 'spectrum' or 'loss_model', got "
                        f"{cfg['shed_scores']!r}.")
    problem = ctx.problem
    problem.check_feasible()
    layers = layer_spectra(ctx, "bisect")
    nb = cfg["eval_batches"]
    batches = ctx.batches if nb is None else ctx.batches[:int(nb)]
    trials = Trials(ctx, batches)
    base = trials.base

    def plan_at(delta):
        return choice_for(layers, [kept_above(ls.sv, delta) for ls in layers])

    lo_d, hi_d = 0.0, 1.0
    best = plan_at(0.0)  # keeps every singular value: the dense model
    best_inc = trials.loss(best) - base
    history = []
    while hi_d - lo_d >= tol:
        delta = (lo_d + hi_d) / 2
        choice = plan_at(delta)
        inc = trials.loss(choice) - base
        ok = inc < eps
        history.append({"delta": delta, "loss_increase": finite(inc), "accepted": ok})
        if ok:
            lo_d, best, best_inc = delta, choice, inc
        else:
            hi_d = delta

    before = problem.cost_of(best)
    if cfg["shed_scores"] == "loss_model":
        scores = _loss_model_scores(ctx, best, batches)
    else:
        scores = spectrum_scores(layers)
    final = allocate(problem, scores, start=best)
    trace = {
        "delta": lo_d, "max_loss_increase": eps, "base_loss": base,
        "loss_increase": best_inc, "binding": "budget" if before > problem.budget else "tolerance",
        "delta_plan_cost_ratio": before / problem.base_cost,
        "cost_ratio": problem.cost_of(final) / problem.base_cost,
        "layers_changed": sum(a != b for a, b in zip(best, final)),
        "delta_plan": {lo.spec.name: lo.options[j].rank if lo.options[j].factorization != DENSE
                       else "dense" for lo, j in zip(problem.layers, best)},
        "loss_evaluations": trials.evals, "decompositions": trials.decompositions,
        "search": history, "failed_decompositions": trials.failed,
    }
    return problem.to_plan(final, "bisect"), trace
