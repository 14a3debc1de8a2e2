"""LoRITa's post-training truncations (arXiv 2405.03089, TMLR; code ``XitongSystem/LoRITa``;
methods.md §4.3): ``lsvt``, ``gsvt`` and ``isvt``, made to meet a cost budget.

LoRITa sweeps its knob while watching (test-set) accuracy; lrcompress fixes a FLOPs/params
budget instead, so each knob is solved for the budget and the plan topped up with the allocator
(at most about one rank step unspent). Spectra are those of the output-channel unfolding W_(1),
mapped onto each layer's offered options as in ``_spectral``.

* ``lsvt`` (local / "uniform compression", ``uniform_decompose_cnn``): every layer keeps the same
  fraction ρ of its spectrum length, k = ⌊ρ·min(m, n)⌋. ρ is bisected for the budget
  [PROPOSAL: LoRITa steps ρ down by 3 % while watching accuracy].
* ``gsvt`` (global, ``layer_decompose_cnn``): spectra normalised by σ₁ and pooled; one threshold
  τ on σ/σ₁ keeps, per layer, #{k : σ_k/σ₁ ≥ τ}. τ is bisected for the budget [PROPOSAL: LoRITa
  zeroes the smallest ρ % of the pool, ρ = 1 %, 2 %, …]. Every candidate layer, conv or linear,
  is in the one normalised pool (LoRITa pools linear layers separately, unnormalised, and only
  with ``--compress_fc``; methods.md §4.3 calls that a likely bug) [PROPOSAL].
* ``isvt`` (``iter_training``, methods.md §4.3(b)), without fine-tuning: start every layer at its
  largest offered option; each round, for every layer, try cutting it alone by ``grid`` options,
  measure the calibration loss (``ctx.batches``) with all current chains swapped in, and commit the
  cut with the lowest loss increase *per unit of cost saved* [PROPOSAL: LoRITa commits the lowest
  loss and stops on test accuracy; a budget needs the per-cost rate], until the budget holds.
  ``grid`` is ⌈(options − 1)/steps⌉ per layer (LoRITa: a fixed 8 or 32 ranks, halved on
  failure). The budget is then topped up with scores from the losses measured along the way.
  Each (layer, option) is decomposed at most once; the trace counts the loss evaluations.

Config (``ctx.config[name]``, dicts of overrides):

* lsvt, gsvt — ``top_up`` (bool, default True): spend the slack the bisection leaves.
* isvt — ``steps`` (int, default 8): cuts from the largest option down to the smallest, per layer;
  ``refresh`` ("all", default, or "lazy"): "all" re-measures every layer's cut each round as
  LoRITa does (rounds × layers evaluations); "lazy" keeps the other layers' last measurement and
  re-measures only the best-looking cut until it stays best (lazy greedy; ~2–3 evaluations per
  round, for large models) [PROPOSAL]; ``eval_batches`` (int or None, default 4): calibration
  batches per loss evaluation (None = all of ``ctx.batches``).
"""

from __future__ import annotations

import math

import numpy as np

from lrcompress.errors import UserError
from lrcompress.rank.spectral import (
    Trials,
    choice_for,
    finish,
    finite,
    layer_spectra,
    profile_scores,
    read_config,
    single_method,
    solve,
    strictly_increasing,
)

SVT_DEFAULTS = {"top_up": True}
ISVT_DEFAULTS = {"steps": 8, "refresh": "all", "eval_batches": 4}


def select_lsvt(ctx) -> tuple:
    cfg = read_config(ctx, "lsvt", SVT_DEFAULTS)
    layers = layer_spectra(ctx, "lsvt")
    rho, choice = solve(ctx.problem,
                        lambda r: choice_for(layers, [r * ls.full for ls in layers]), 0.0, 1.0)
    trace = {"rank_fraction": rho}
    return finish(ctx, "lsvt", choice, profile_scores(layers, [ls.full for ls in layers]), trace,
                  cfg["top_up"])


def kept_above(sv: np.ndarray, tau: float) -> int:
    """#{k : σ_k/σ₁ ≥ τ} (at least 1)."""
    if sv[0] <= 0:
        return 1
    return max(1, int(np.count_nonzero(sv / sv[0] >= tau)))


def select_gsvt(ctx) -> tuple:
    cfg = read_config(ctx, "gsvt", SVT_DEFAULTS)
    layers = layer_spectra(ctx, "gsvt")

    def ranks(tau):
        return [kept_above(ls.sv, tau) for ls in layers]

    # θ = 1 − τ, so that the cost grows with θ.
    theta, choice = solve(ctx.problem, lambda t: choice_for(layers, ranks(1.0 - t)), 0.0, 1.0)
    tau = 1.0 - theta
    ks = ranks(tau)
    pool = np.concatenate([ls.sv / ls.sv[0] for ls in layers if ls.sv[0] > 0])
    trace = {"threshold": tau, "pooled_fraction_dropped": float(np.mean(pool < tau)),
             "spectrum_ranks": {ls.name: k for ls, k in zip(layers, ks)}}
    return finish(ctx, "gsvt", choice, profile_scores(layers, ks), trace, cfg["top_up"])


def _path_scores(problem, visited: list[dict[int, float]]) -> list[list[float]]:
    """Top-up scores from ISVT's own measurements: −(loss increase accumulated along the layer's
    cuts), interpolated in cost between measured options, dense above the start; made strictly
    increasing so every upgrade counts."""
    kind = problem.target.kind
    scores = []
    for lo, seen in zip(problem.layers, visited):
        cost = [o.cost(kind) for o in lo.options]
        js = sorted(seen)
        xs = [cost[j] for j in js]
        ys = [-seen[j] for j in js]
        row = [float(np.interp(cost[j], xs, ys)) for j in range(len(cost))]
        row[-1] = max(row[:-1]) if len(row) > 1 else 0.0  # dense: never worse than any cut
        scores.append(strictly_increasing(row))
    return scores


def select_isvt(ctx) -> tuple:
    cfg = read_config(ctx, "isvt", ISVT_DEFAULTS)
    if cfg["refresh"] not in ("all", "lazy"):
        raise UserError(f"isvt: refresh must be 'all' or 'lazy', got {cfg['refresh']!r}.")
    if int(cfg["steps"]) < 1:
        raise UserError(f"isvt: steps must be 1 or more, got {cfg['steps']!r}.")
    problem = ctx.problem
    single_method(problem, "isvt")
    problem.check_feasible()
    kind, budget = problem.target.kind, problem.budget
    nb = cfg["eval_batches"]
    trials = Trials(ctx, ctx.batches if nb is None else ctx.batches[:int(nb)])
    n_layers = len(problem.layers)
    cur = [len(lo.options) - 2 for lo in problem.layers]  # largest factorized option
    grid = [max(1, math.ceil((len(lo.options) - 1) / int(cfg["steps"]))) for lo in problem.layers]
    visited = [{j: 0.0} for j in cur]

    def cost(i, j):
        return problem.layers[i].options[j].cost(kind)

    base = trials.base
    loss_cur = trials.loss(cur)
    start_loss = loss_cur
    est: dict[int, tuple[float, bool]] = {}  # layer -> (loss of its cut, measured in this state)

    def measure(i):
        trial = list(cur)
        trial[i] = max(0, cur[i] - grid[i])
        est[i] = (trials.loss(trial), True)

    def rate(i):
        saved = cost(i, cur[i]) - cost(i, max(0, cur[i] - grid[i]))
        return (est[i][0] - loss_cur) / saved if saved > 0 else math.inf

    rounds = 0
    while problem.cost_of(cur) > budget:
        live = [i for i in range(n_layers) if cur[i] > 0]
        if not live:  # cannot happen for a feasible problem
            break
        for i in live:
            if cfg["refresh"] == "all" or i not in est:
                measure(i)
        while True:
            best = min(live, key=lambda i: (rate(i), i))
            if est[best][1]:
                break
            measure(best)  # lazy: the leader's number is stale; re-measure it and look again
        new = max(0, cur[best] - grid[best])
        visited[best][new] = visited[best][cur[best]] + (est[best][0] - loss_cur)
        loss_cur = est[best][0]
        cur[best] = new
        rounds += 1
        est = {i: (v, False) for i, (v, _) in est.items() if i != best}
    trace = {"refresh": cfg["refresh"], "steps": int(cfg["steps"]), "rounds": rounds,
             "loss_evaluations": trials.evals, "decompositions": trials.decompositions,
             "base_loss": base, "start_loss": finite(start_loss), "greedy_loss": finite(loss_cur),
             "failed_decompositions": trials.failed}
    return finish(ctx, "isvt", cur, _path_scores(problem, visited), trace)


__all__ = ["select_gsvt", "select_isvt", "select_lsvt"]
