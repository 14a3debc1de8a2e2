"""``vbmf``: ranks from empirical variational Bayesian matrix factorization, scaled to the budget.

EVBMF (Nakajima et al., JMLR 14:1–37, 2013, "Global analytic solution of fully-observed
variational Bayesian matrix factorization"), as Kim et al. (ICLR 2016) use it for Tucker-2
ranks; the formulas are methods.md §3, transcribed from the reference implementation
(CasvandenBogaard/VBMF): the noise variance σ² minimises the free energy Ω(σ²) by a bounded 1-D
search, and the rank is the number of singular values above the EVB threshold
``√(M σ² (1 + τ̄)(1 + α/τ̄))``, τ̄ = 2.5129·√α.

Per layer the rank is the EVBMF rank of the output-channel unfolding W_(1) (T × S·kh·kw, the
weight itself for a linear layer); for ``tucker2`` also of the input-channel unfolding W_(2)
(S × T·kh·kw), and the tied rank is the larger of the two. Optional MUSCO-style weakening
(Gusak et al. 2019) per unfolding: ``r = r_full − w·(r_full − r_vbmf)``, r_full the unfolding's
spectrum length, then at least ``min_rank``.

VBMF ignores any target, so [PROPOSAL] its ranks are scaled: layer i gets spectrum rank c·r_i
(mapped onto its offered options as in ``_spectral``), c is bisected so the plan meets the budget,
and the slack is spent with scores −(1 − r/(A·r_i))² that keep VBMF's profile across layers
(``_spectral.profile_scores``). The trace records the unscaled VBMF ranks and c.

Config (``ctx.config["vbmf"]``, a dict of overrides):

* ``weaken`` (float in [0, 1], default 1.0): w above; 1 = pure VBMF, 0 = full rank everywhere
  (the CLI's ``--vbmf-weaken``).
* ``min_rank`` (int ≥ 1, default 1): floor on each layer's VBMF rank (methods.md §3 mentions a
  public implementation with 21); a random-weight layer is pure noise to VBMF (rank 0).
* ``top_up`` (bool, default True): spend the slack the bisection leaves.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from lrcompress.errors import UserError
from lrcompress.factorizations import single_threaded
from lrcompress.rank.spectral import (
    choice_for,
    finish,
    layer_spectra,
    profile_scores,
    read_config,
    single_method,
    solve,
    spectrum,
)

DEFAULTS = {"weaken": 1.0, "min_rank": 1, "top_up": True}
TAU_BAR = 2.5129  # τ̄ = 2.5129·√α (Nakajima et al. 2013)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _free_energy(sigma2: float, L: int, M: int, s2: np.ndarray, residual: float,
                 xubar: float) -> float:
    """Ω(σ²) of methods.md §3 step 4 (up to constants)."""
    alpha = L / M
    x = s2 / (M * sigma2)
    low = x <= xubar
    z2, z1 = x[low], x[~low]
    t = _tau(z1, alpha)
    return float(np.sum(z2 - np.log(z2)) + np.sum(z1 - t) + np.sum(np.log((t + 1.0) / z1))
                 + alpha * np.sum(np.log(t / alpha + 1.0)) + residual / (M * sigma2)
                 + (L - len(s2)) * np.log(sigma2))


def evbmf_spectrum(sv, shape: tuple[int, int], residual: float = 0.0) -> tuple[int, float]:
    """EVBMF ``(rank, σ²)`` from the singular values of an ``shape`` matrix.

    ``sv`` may be the leading H ≤ min(shape) values, ``residual`` = ‖V‖²_F − Σ sv² then.
    """
    L, M = sorted(int(n) for n in shape)
    s = np.sort(np.asarray(sv, dtype=np.float64))[::-1][:L]
    H = len(s)
    if H == 0 or s[0] <= 0:
        return 0, 0.0
    alpha = L / M
    tau_bar = TAU_BAR * math.sqrt(alpha)
    xubar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    # Work in units where the upper bound is 1: Brent's absolute tolerance then means the same
    # thing for a conv kernel (σ² ~ 1e-4) as for a unit-variance matrix; the rank is unchanged.
    ub = (float(np.sum(s**2)) + residual) / (L * M)
    s2 = np.maximum(s**2 / ub, 1e-300)  # an exact zero is constant in Ω; keep log() finite
    res = residual / ub
    e_h = int(min(math.ceil(L / (1.0 + alpha)) - 1, H)) - 1
    tail = min(e_h + 1, H - 1)
    lb = max(s2[tail] / (M * xubar), float(np.mean(s2[tail:])) / M, 1e-12)
    if lb >= 1.0:
        sigma2 = 1.0
    else:
        opt = minimize_scalar(_free_energy, args=(L, M, s2, res, xubar), bounds=(lb, 1.0),
                              method="bounded", options={"xatol": lb * 1e-6, "maxiter": 1000})
        sigma2 = float(opt.x)
    rank = int(np.count_nonzero(s2 > M * sigma2 * xubar))
    return rank, sigma2 * ub


def evbmf(matrix) -> tuple[int, float]:
    """Empirical VBMF of a matrix: the estimated rank and noise variance σ²."""
    m = torch.as_tensor(matrix).detach().to(dtype=torch.float64, device="cpu")
    if m.ndim != 2:
        raise ValueError(f"evbmf needs a matrix, got shape {tuple(m.shape)}.")
    with single_threaded(m.device):  # see factorizations._base: threads contend on shared cores
        sv = torch.linalg.svdvals(m).numpy()
    return evbmf_spectrum(sv, tuple(m.shape))


def _weakened(r_vbmf: int, full: int, w: float) -> float:
    return full - w * (full - r_vbmf)


def select(ctx) -> tuple:
    cfg = read_config(ctx, "vbmf", DEFAULTS)
    w, floor = float(cfg["weaken"]), int(cfg["min_rank"])
    if not 0.0 <= w <= 1.0 or floor < 1:
        raise UserError(f"vbmf: weaken must be in [0, 1] and min_rank >= 1, got {w} and "
                        f"{cfg['min_rank']}.")
    method = single_method(ctx.problem, "vbmf")
    layers = layer_spectra(ctx, "vbmf")
    raw, ref = {}, []
    for lo, ls in zip(ctx.problem.layers, layers):
        weight = ctx.model.get_submodule(ls.name).weight
        shape1 = (weight.shape[0], weight[0].numel())
        r1, _ = evbmf_spectrum(ls.sv, shape1)
        r = _weakened(r1, ls.full, w)
        raw[ls.name] = [r1]
        if method == "tucker2" and weight.ndim == 4 and tuple(lo.spec.kernel) != (1, 1):
            sv2 = spectrum(weight, ls.name, ctx.cache, mode=2)
            r2, _ = evbmf_spectrum(sv2, (weight.shape[1], weight.numel() // weight.shape[1]))
            r = max(r, _weakened(r2, len(sv2), w))
            raw[ls.name].append(r2)
        ref.append(max(float(floor), r))

    problem = ctx.problem
    c_max = max(ls.dense_rank / r for ls, r in zip(layers, ref))

    def choice_at(c):
        return choice_for(layers, [c * r for r in ref])

    c, choice = solve(problem, choice_at, 0.0, c_max)
    trace = {"scale": c, "weaken": w, "min_rank": floor,
             "vbmf_ranks": {k: v[0] if len(v) == 1 else v for k, v in raw.items()}}
    return finish(ctx, "vbmf", choice, profile_scores(layers, ref), trace, cfg["top_up"])
