"""Shared machinery of the spectrum-based rank selectors (energy, vbmf, lsvt, gsvt, bisect, isvt).

A layer's *spectrum* is the singular values of its output-channel unfolding
``W_(1) ∈ R^{T × S·kh·kw}`` (the weight itself for a linear layer), computed in float64 with
``torch.linalg.svdvals`` and cached (``RUN/cache``) under a hash of the weight. Every selector
here turns a scalar knob θ into one *spectrum rank* k per layer, maps k onto the layer's offered
options, finds the θ that meets the budget by bisection, and tops the plan up with
:func:`~._problem.allocate`, so no method wastes more than about one rank step.

Mapping a spectrum rank k to an option: the largest offered option with rank ≤ k; below the
smallest option, the smallest; past the largest offered option, the dense layer. [PROPOSAL]: k at
or beyond the spectrum length (no singular value dropped) also means dense, which matters for
CP, whose offered ranks can exceed ``min(T, S·kh·kw)``: "keep every singular value" is lossless
only for the dense layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lrcompress.errors import UserError
from lrcompress.factorizations import DecompositionError, get_factorization, single_threaded
from lrcompress.rank.problem import DENSE, RankProblem, allocate
from lrcompress.rank.signals import calib_loss, weight_key

BISECT_ITERS = 60


@dataclass
class LayerSpectrum:
    """One candidate layer as the spectral selectors see it."""

    name: str
    sv: np.ndarray  # singular values of W_(1), descending, float64
    ranks: np.ndarray  # ranks of the factorized options, ascending
    index: list[int]  # their option indices (same order)
    dense: int  # option index of the dense layer

    @property
    def full(self) -> int:
        """Spectrum length: min(T, S·kh·kw)."""
        return len(self.sv)

    @property
    def dense_rank(self) -> int:
        """The rank that stands for "dense" in the top-up scores."""
        return max(self.full, int(self.ranks[-1]) + 1)

    def __post_init__(self):
        self._pos = {j: p for p, j in enumerate(self.index)}

    def rank_of(self, j: int) -> int:
        return self.dense_rank if j == self.dense else int(self.ranks[self._pos[j]])

    def option_for(self, k: float) -> int:
        """Option index for spectrum rank k (see the module docstring)."""
        if k >= self.full or k > self.ranks[-1]:
            return self.dense
        pos = int(np.searchsorted(self.ranks, k, side="right")) - 1
        return self.index[max(pos, 0)]


def read_config(ctx, method: str, defaults: dict) -> dict:
    """``ctx.config[method]`` (a plain dict of overrides) merged over ``defaults``."""
    given = ctx.config.get(method) or {}
    if not isinstance(given, dict):
        raise UserError(f"--method {method}: its config must be a dict of overrides, got "
                        f"{type(given).__name__}.")
    bad = sorted(set(given) - set(defaults))
    if bad:
        raise UserError(f"--method {method}: unknown config key(s) {bad}; valid keys: "
                        f"{', '.join(sorted(defaults)) or 'none'}.")
    return {**defaults, **given}


def single_method(problem: RankProblem, method: str) -> str:
    """The one factorization the problem offers (linear layers and 1×1 convs offer "svd"
    under every --decomp); UserError for multi-method (auto) problems."""
    per_layer = [{o.factorization for o in lo.options if o.factorization != DENSE}
                 for lo in problem.layers]
    names = set().union(*per_layer)
    if len(names) > 1:
        names.discard("svd")
    if len(names) != 1 or any(len(n) > 1 for n in per_layer):
        raise UserError(f"--method {method} needs a single factorization: use --decomp svd, "
                        "tucker2, cp, cp4 or tt (--decomp auto needs --method rene).")
    return names.pop()


def unfolding(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-1 (T × S·kh·kw) or mode-2 (S × T·kh·kw) unfolding of a conv/linear weight, float64."""
    w = weight.detach().to(torch.float64)
    if mode == 2:
        w = w.transpose(0, 1)
    return w.reshape(w.shape[0], -1)


@torch.no_grad()
def spectrum(weight: torch.Tensor, name: str, cache, mode: int = 1) -> np.ndarray:
    """Singular values of the mode-``mode`` unfolding (descending), cached by weight hash."""
    key = f"spectrum/{mode}/{name}/{weight_key(weight)}"
    hit = cache.get(key)
    if hit is None:
        m = unfolding(weight, mode)
        with single_threaded(m.device):
            hit = torch.linalg.svdvals(m).cpu().tolist()
        cache.put(key, hit)
    return np.asarray(hit, dtype=np.float64)


def layer_spectra(ctx, method: str) -> list[LayerSpectrum]:
    """Checks the problem has one factorization and builds a :class:`LayerSpectrum` per layer."""
    single_method(ctx.problem, method)
    out = []
    for lo in ctx.problem.layers:
        fact = sorted((o.rank, j) for j, o in enumerate(lo.options) if o.factorization != DENSE)
        weight = ctx.model.get_submodule(lo.spec.name).weight
        out.append(LayerSpectrum(lo.spec.name, spectrum(weight, lo.spec.name, ctx.cache),
                                 np.array([r for r, _ in fact], dtype=np.float64),
                                 [j for _, j in fact], len(lo.options) - 1))
        ctx.tick()
    return out


def choice_for(layers: list[LayerSpectrum], ks) -> list[int]:
    return [ls.option_for(k) for ls, k in zip(layers, ks)]


def solve(problem: RankProblem, choice_at: Callable[[float], list[int]], lo: float, hi: float,
          iters: int = BISECT_ITERS) -> tuple[float, list[int]]:
    """Largest θ in [lo, hi] whose choice fits the budget; the cost must not fall as θ grows."""
    problem.check_feasible()

    def fits(c):
        return problem.cost_of(c) <= problem.budget

    top = choice_at(hi)
    if fits(top):
        return hi, top
    for _ in range(iters):
        mid = (lo + hi) / 2
        if fits(choice_at(mid)):
            lo = mid
        else:
            hi = mid
    choice = choice_at(lo)
    if not fits(choice):  # even θ = lo is over: the smallest options everywhere (feasible)
        choice = [0] * len(problem.layers)
    return lo, choice


def profile_scores(layers: list[LayerSpectrum], ref: list[float]) -> list[list[float]]:
    """Top-up scores that keep a method's rank profile: −(1 − r/(A·ref_i))² per option.

    ``ref_i > 0`` is the layer's relative share under the method (its VBMF rank, its spectrum
    length, ...). A = max_i dense_rank_i/ref_i puts every option (dense included) at x ≤ 1, so the
    score rises strictly with the rank (the allocator then leaves less than one step unspent) and
    is concave: spending favours the layers that lag furthest behind their profile, as in
    ``uniform``. [PROPOSAL]
    """
    ref = [max(float(r), 1e-9) for r in ref]
    scale = max(ls.dense_rank / r for ls, r in zip(layers, ref))
    scores = []
    for ls, r in zip(layers, ref):
        row = [0.0] * (ls.dense + 1)
        for j in range(ls.dense + 1):
            row[j] = -((1.0 - ls.rank_of(j) / (scale * r)) ** 2)
        scores.append(row)
    return scores


def strictly_increasing(row: list[float], eps: float = 1e-9) -> list[float]:
    """Raise each entry to at least the previous one + eps (options are in cost order), so that
    every upgrade has a positive gain and the allocator spends all it can."""
    out = []
    for v in row:
        out.append(v if not out else max(v, out[-1] + eps))
    return out


def finish(ctx, method: str, choice: list[int], scores, trace: dict, top_up: bool = True
           ) -> tuple:
    """Top up (or shed) with ``allocate`` and record the cost before and after in the trace."""
    problem = ctx.problem
    final = allocate(problem, scores, start=choice) if top_up else list(choice)
    trace.update({
        "cost_ratio_before_top_up": problem.cost_of(choice) / problem.base_cost,
        "cost_ratio": problem.cost_of(final) / problem.base_cost,
        "layers_topped_up": sum(a != b for a, b in zip(choice, final)),
    })
    return problem.to_plan(final, method), trace


def finite(x: float) -> float | None:
    """``x`` for a JSON trace: None where a failed decomposition made a loss infinite."""
    return float(x) if math.isfinite(x) else None


class Trials:
    """Calibration loss of the model with some layers swapped for their factorized chains.

    Chains are built once per (layer, option) and kept, so a search never decomposes the same
    layer at the same rank twice; losses are memoised per choice. A decomposition that fails
    numerically (CP-ALS, :class:`DecompositionError`) makes the trial's loss +inf.
    """

    def __init__(self, ctx, batches):
        self.ctx = ctx
        self.batches = batches
        self.chains: dict[tuple[int, int], torch.nn.Module | None] = {}
        self.memo: dict[tuple[int, ...], float] = {}
        self.evals = 0
        self.failed: list[str] = []
        self._base = None

    @property
    def base(self) -> float:
        """Calibration loss of the original model."""
        if self._base is None:
            with torch.no_grad():
                self._base = calib_loss(self.ctx.model, self.batches, self.ctx.device)
        return self._base

    def chain(self, i: int, j: int):
        if (i, j) not in self.chains:
            lo = self.ctx.problem.layers[i]
            o = lo.options[j]
            mod = self.ctx.model.get_submodule(lo.spec.name)
            try:
                with torch.no_grad():
                    self.chains[i, j] = get_factorization(o.factorization).from_weight(
                        mod.weight, mod.bias, lo.spec, o.rank)
            except DecompositionError as err:
                self.failed.append(str(err))
                self.chains[i, j] = None
        return self.chains[i, j]

    @property
    def decompositions(self) -> int:
        return len(self.chains)

    def loss(self, choice) -> float:
        from lrcompress.model.surgery import swap_modules

        key = tuple(choice)
        if key in self.memo:
            return self.memo[key]
        swap = {}
        for i, (lo, j) in enumerate(zip(self.ctx.problem.layers, choice)):
            if lo.options[j].factorization != DENSE:
                ch = self.chain(i, j)
                if ch is None:
                    self.memo[key] = math.inf
                    return math.inf
                swap[lo.spec.name] = ch
        with torch.no_grad(), swap_modules(self.ctx.model, swap):
            val = calib_loss(self.ctx.model, self.batches, self.ctx.device)
        self.evals += 1
        self.ctx.tick()
        self.memo[key] = val
        return val
