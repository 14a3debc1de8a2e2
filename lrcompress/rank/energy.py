"""``energy``: keep a fixed fraction of each layer's spectral energy (Yang et al. 2020, "Learning
low-rank deep neural networks via singular vector orthogonality regularization and singular value
sparsification", arXiv 2004.09031; methods.md §5.2).

Per layer, the smallest k with ``Σ_{j≤k} σ_j² ≥ (1 − e)·Σ_j σ_j²`` over the spectrum of the
output-channel unfolding W_(1); k is mapped onto the layer's offered options (``_spectral``).
Yang et al. pick e by hand (1e-4 … 1e-1); here e is bisected so the plan meets the budget
[PROPOSAL], and the plan is then topped up with the allocator (scores that keep each layer's rank
in proportion to its energy rank at the solution, ``_spectral.profile_scores``) so that at most
about one rank step of the budget is left unspent.

Config (``ctx.config["energy"]``, a dict of overrides):

* ``top_up`` (bool, default True): spend the slack the bisection leaves; False returns the raw
  energy-threshold plan (still within budget).
"""

from __future__ import annotations

import numpy as np

from lrcompress.rank.spectral import (
    choice_for,
    finish,
    layer_spectra,
    profile_scores,
    read_config,
    solve,
)

DEFAULTS = {"top_up": True}


def energy_ranks(sv: np.ndarray, kept: float) -> int:
    """Smallest k whose leading k singular values hold ``kept`` of Σσ² (1 ≤ k ≤ len(sv))."""
    cum = np.cumsum(sv**2)
    if cum[-1] <= 0:
        return 1
    k = int(np.searchsorted(cum, kept * cum[-1], side="left")) + 1
    return min(max(k, 1), len(sv))


def select(ctx) -> tuple:
    cfg = read_config(ctx, "energy", DEFAULTS)
    layers = layer_spectra(ctx, "energy")

    def ranks(kept):
        return [energy_ranks(ls.sv, kept) for ls in layers]

    kept, choice = solve(ctx.problem, lambda f: choice_for(layers, ranks(f)), 0.0, 1.0)
    ks = ranks(kept)
    trace = {"energy_kept": kept, "e": 1.0 - kept,
             "spectrum_ranks": {ls.name: k for ls, k in zip(layers, ks)}}
    return finish(ctx, "energy", choice, profile_scores(layers, ks), trace, cfg["top_up"])
