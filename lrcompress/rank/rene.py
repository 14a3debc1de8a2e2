"""``rene``: the softmax rank search of RENE (arXiv 2409.03555), made to hit a cost target.

Faithful to the paper (methods.md §2):

* every candidate layer gets a candidate rank set and one logit α per candidate, p = softmax(α),
  α initialised to 0; each candidate has its *own* factor set, initialised by decomposing the
  pretrained weight at that rank (§2.2);
* the layer computes with the mixed dense weight W_mix = Σ_r p_r Ŵ(r) (one conv, §2.2);
* alternating updates (§2.4): a *weight step* on the factors minimising the reconstruction error
  of W_mix (data-free; SGD-Nesterov), then an *α step* on a calibration batch; a warm-up of
  weight-only steps starts every search step;
* multi-step narrowing (§2.5, Figure 3): around the chosen r̄, candidates r̄ ± s/2 at step s/f,
  branches and logits re-initialised, until the step reaches one grid unit.

Where we depart, and why ([PROPOSAL], methods.md §2.3 and §10):

* **Budget.** The paper's L_r = γ Σ(E[r]/max r)^β has no notion of a FLOPs target and collapses
  or overshoots on real checkpoints (§10.1–10.2). Here the rank coefficients are
  p_i = softmax(α_i − μ·C_i/B), where C_i are the candidates' MACs (or params) and μ ≥ 0 is one
  global multiplier re-solved by bisection after every α step so that the whole model's expected
  cost E_p[C] equals the budget B (when it would exceed it). That is the exact Gibbs/Lagrangian
  solution for the budget constraint, so the target holds by construction at every iteration,
  and the α optimiser only ever sees the calibration loss. (A first version used dual ascent on
  a penalty λ·E[C]/B; the cost gradients swamped Adam's moment estimates and the search
  collapsed to 5 % of the MACs.) γ and β are therefore not used.
* **Ranks.** Candidates live on the layer's own grid of useful ranks, [1, break-even) rounded to
  ``--rank-multiple`` (§10.3), spread evenly over it (10 per layer, like the paper's CIFAR grid).
  Layers that cannot pay off (a 1-channel stem) are never candidates (§10.1). Keeping the layer
  dense is one more candidate (its "factors" are the pretrained weight, fixed): without it every
  layer had to be factorized, and the repair had to undo the search wherever the best plan
  keeps a layer whole (resnet18 / Fashion-MNIST at 30 % of the parameters keeps stages 1–3
  dense).
* **α optimiser.** Adam (lr 0.05) on the logits instead of SGD 1e-3, so that p moves within the
  100 iterations on every layer size; the factors keep the paper's SGD-Nesterov.
* **Choice.** Each step's r̄ is the candidate nearest the layer's expected cost, not the argmax
  (see :func:`expected_cost_choice`).
* **Objective.** The α step minimises the KL divergence to the original model's outputs on the
  calibration batch (``alpha_loss="kd"``) rather than the labels' cross-entropy: it measures the
  damage the compression does, with less variance than the labels (``"ce"`` is the paper's).
* **Prior.** Every step's logits start from the second-order loss model of ``_signals`` (minus
  each candidate's predicted calibration-loss increase, over τ = 0.02 nats) rather than from 0,
  so the search refines a data-driven allocation instead of a cost-only one. On resnet18 /
  Fashion-MNIST at tucker2, 30 % MACs this took the plan from 83.0 % to 86.7 % top-1 before
  fine-tuning (uniform: 77.0 %). ``prior="zero"`` is the paper's. τ = 0.02 rather than 0.05
  (a stronger prior) gained 0.35 points on average over tt/tucker2 at 30 %/50 % MACs (tucker2
  at 50 %: 88.03 → 88.41, uniform 88.01).
* **No weight step, shorter steps.** The paper alternates a weight step (the candidates'
  factors trained so that their *mixture* matches the layer) with every α step, after a
  weight-only warm-up. The candidates here start as the fits that would ship at their rank
  (activation-fitted under an output-aware fit), and the shipped layer is one candidate, not
  the mixture; so by default they keep those factors (``weight_steps=False``: no warm-up, each
  candidate weight formed once per step) and each step runs 12 α iterations at lr 0.4 instead
  of 100 at 0.05 (about the same total logit movement). Measured on 2026-12-03 (all 10k test
  images, ``--fit sequential``): resnet18 tt at 30 % MACs the same plan with and without the
  weight step (89.07 % as decomposed), and at 25 and 12 iterations (the latter with 2 loss
  batches); tucker2 at 50 % the same plan (89.08 %); mobilenetv2 at 50 % 82.03 → 82.01 →
  82.25 %, at 30 % 79.45 → 81.04 → 81.12 %; rank selection 276 s → 37 s on resnet18 and
  101 s → 18 s on mobilenetv2. ``weight_steps=True`` (``--search-weight-steps``) restores
  the paper's alternation.
* **Repair.** The searched plan is then made to meet the budget exactly by the greedy allocator
  (``_problem.allocate``), scoring options with the calibration-loss model of ``_signals``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lrcompress.factorizations import (
    LayerStats,
    SolveMemo,
    Whitener,
    get_factorization,
    whitener,
)
from lrcompress.model.costs import dense_macs
from lrcompress.model.surgery import swap_modules
from lrcompress.rank.problem import DENSE, LayerOptions, RankProblem
from lrcompress.recover.losses import kd_loss
from lrcompress.util.config import require
from lrcompress.util.numerics import NonFiniteGuard, all_finite, first_nonfinite

log = logging.getLogger(__name__)

# The search's time source (its per-part seconds and the run-time estimate); tests swap it.
clock = time.perf_counter


@dataclass(frozen=True)
class ReneConfig:
    # α iterations per search step (RENE's code: 100 at lr 1e-3 SGD; here 12 Adam steps at
    # lr_alpha 0.4: the same plans or top-1 within noise as 100 at 0.05 or 25 at 0.2, measured)
    iters: int = 12
    warmup: int = 20  # weight-only iterations before each step, with weight_steps (paper §5.1)
    n_candidates: int = 10  # initial candidates per layer and factorization (paper: 10 on CIFAR)
    refine: int = 10  # f: the candidate step shrinks by this factor per narrowing
    lr_w: float = 1e-3  # SGD-Nesterov (momentum 0.9) on the factors (paper, CIFAR)
    lr_alpha: float = 0.4  # Adam on the logits [PROPOSAL]
    grad_clip: float | None = None  # the RENE README recommends 5 for CP
    probes: int = 64  # Gaussian probes for the weight-step estimate on large layers
    alpha_optimizer: str = "adam"  # adam | normsgd (gradient / its global max-abs) [PROPOSAL]
    # α step objective: "ce" (the paper: calibration cross-entropy) or "kd" (KL divergence to
    # the original model's calibration logits: a lower-variance signal of the damage done).
    alpha_loss: str = "kd"
    # Initial logits: "zero" (the paper) or "loss_model" (α_r = −ΔL̂(r)/τ from the
    # second-order loss model of _signals, τ = prior_temp nats) [PROPOSAL].
    prior: str = "loss_model"
    prior_temp: float = 0.02
    # Calibration batches each loss-model measurement (prior and repair: one per layer) runs
    # (2 and 4 gave the same plans on resnet18 tt 30 % and top-1 within noise on mobilenetv2).
    loss_batches: int = 2
    # Early stop of a narrowing step [PROPOSAL]: every ``stop_every`` α iterations, once at least
    # ``min_iters`` were run, the step ends when no layer's rank distribution moved by more than
    # ``stop_tol`` in total variation (½Σ|p − p'|) since the previous check. 0 runs all ``iters``.
    stop_tol: float = 0.0
    min_iters: int = 20
    stop_every: int = 5
    # Weight steps leave out candidates whose probability is below this (0: none) [PROPOSAL].
    weight_floor: float = 0.0
    # Exact speed-ups (the same numbers either way; off only to check that): one reconstruction
    # per iteration shared by the α and weight steps, candidate factors kept across steps.
    exact_speedups: bool = True
    # Under the run's activation fit (SelectContext.stats given): fit the candidates' initial
    # factors to the layers' outputs and keep the weight step in the same Σ-norm, so the search
    # compares the factors that will ship. False: weight-fitted candidates, ‖·‖_F weight step.
    fit_candidates: bool = True
    # RENE's weight step (§2.4) on the candidates' factors. False (the default, [PROPOSAL]):
    # every candidate keeps the factors it was fitted with (what would ship at that rank), the
    # warm-up is skipped and each layer's candidate weights are formed once per narrowing step.
    weight_steps: bool = False

    @property
    def warmup_iters(self) -> int:
        """Weight-only iterations that start each step (none without the weight step)."""
        return self.warmup if self.weight_steps else 0

    def __post_init__(self):
        require("--search-tol", self.stop_tol, at_least=0, why="0 runs every --search-iters")
        if (self.iters < 1 or self.warmup < 0 or self.n_candidates < 2 or self.refine < 2
                or self.loss_batches < 1):
            raise ValueError(f"bad ReneConfig {self}: iters>=1, warmup>=0, n_candidates>=2, "
                             "refine>=2, loss_batches>=1")
        if self.alpha_loss not in ("ce", "kd") or self.prior not in ("zero", "loss_model"):
            raise ValueError(f"bad ReneConfig {self}: alpha_loss ce|kd, prior zero|loss_model")
        if self.prior_temp <= 0:
            raise ValueError(f"bad ReneConfig {self}: prior_temp must be > 0")
        if self.stop_tol < 0 or self.min_iters < 1 or self.stop_every < 1 or not (
                0 <= self.weight_floor < 1):
            raise ValueError(f"bad ReneConfig {self}: stop_tol>=0, min_iters>=1, stop_every>=1, "
                             "0<=weight_floor<1")


def _chain_apply(seq: nn.Sequential, factors, x):
    """Run a factorized chain with the given factor tensors (no bias) as its weights."""
    names = [n for n, _ in seq.named_parameters()]
    return functional_call(seq, dict(zip(names, factors)), (x,))


class MixedLayer(nn.Module):
    """A conv/linear layer computing with Σ_r softmax(α)_r Ŵ(r) over candidate factor sets.

    Two exact ways to compute it, chosen per layer by cost (methods.md §2.2 notes they are
    equivalent, convolution being linear in the weight): mix the *weights* (one conv with the
    mixed dense weight; cheap for small layers at high resolution) or mix the *outputs* of the
    candidate chains (cheap when the dense weight is large and the feature map small and the
    weight step re-forms every candidate's weight each iteration, as in the last stage of a CNN
    at 28×28). With frozen factors (no weight step) the weights are formed once per step
    (:meth:`prepare`), stacked, and cut to the kernel taps that meet the input
    (:func:`_live_taps`), so mixing weights is the cheaper way almost everywhere.
    """

    def __init__(self, base: nn.Module, spec, cands: list[tuple[int, str, int]], factors,
                 batch: int, probes: int, white: Whitener | None = None, frozen: bool = False):
        super().__init__()
        self.spec = spec
        self.cands = cands  # (option index, method, rank)
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            self.conv_args = dict(stride=base.stride, padding=base.padding,
                                  dilation=base.dilation, groups=base.groups)
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        self.register_buffer("target", base.weight.detach().clone())
        self.branches = nn.ModuleList(
            nn.ParameterList([nn.Parameter(f.detach().clone()) for f in fs]) for fs in factors)
        self.alpha = nn.Parameter(torch.zeros(len(cands), device=base.weight.device))
        self.register_buffer("shift", torch.zeros(len(cands), device=base.weight.device))
        # A dense candidate (keep the layer as it is) has no factors: its weight is the target.
        self.facts = [None if m == DENSE else get_factorization(m) for _, m, _ in cands]
        dev, dt = base.weight.device, base.weight.dtype
        nobias = replace(spec, bias=False)
        # The probe spec: one receptive field in, one position out, no padding or stride, so a
        # chain maps a probe z to W_(1)·vec(z) (the weight as a matrix times a vector).
        kh, kw = spec.kernel
        dh, dw = spec.dilation
        field = ((kh - 1) * dh + 1, (kw - 1) * dw + 1) if self.is_conv else (1, 1)
        self.probe_spec = replace(nobias, stride=(1, 1), padding=(0, 0), in_hw=field,
                                  out_hw=(1, 1), copies=1)
        self.chains, self.probe_chains = [], []
        dense = math.prod(spec.weight_shape)
        recon_cost = out_cost = probe_cost = 0
        for f, (_, _, r) in zip(self.facts, cands):
            if f is None:
                self.chains.append(None)
                self.probe_chains.append(None)
                out_cost += batch * dense_macs(spec)
                continue
            self.chains.append(f.skeleton(nobias, r, dtype=dt, device=dev))
            self.probe_chains.append(f.skeleton(self.probe_spec, r, dtype=dt, device=dev))
            recon_cost += dense * f.scalar_rank(f.rank_from(spec, r))
            out_cost += batch * f.macs(spec, r)
            probe_cost += probes * f.macs(self.probe_spec, r)
        # Outer kernel taps that only ever meet zero padding (a 3×3 conv on a 1×1 map) are cut
        # off the mixed weight: the same outputs and α gradients, a smaller product and conv.
        self.live = _live_taps(spec) if self.is_conv and frozen else None
        if frozen:
            # factors fixed: the candidate weights are formed once per step, and each iteration
            # mixes them (one K × weight product, forward and backward) and runs one dense layer
            kept = 1.0 if self.live is None else self.live.fraction
            recon_cost = (len(cands) * dense * 2 + batch * dense_macs(spec)) * kept
        self.mix_outputs = out_cost < recon_cost
        self.probe_weights = probe_cost < recon_cost
        self.n_probes = probes
        self.reuse_recon = True
        # The weight step's norm: ‖·‖_F, or the Σ-norm ‖(·) L‖_F of the activation fit (what
        # the candidates' initial factors minimise), so the step keeps what they were fitted for.
        if white is not None and self.is_conv and tuple(spec.dilation) != (1, 1):
            white = None  # the probe field of a dilated conv holds more pixels than taps
        self.white = None if white is None else white.to(dt, dev)
        self.register_buffer("target_norm", self._sq_norm(self.target).detach())
        self._stash: tuple[tuple[int, ...], list[torch.Tensor]] | None = None
        # Factors frozen (no weight step): the candidate weights are formed once (prepare).
        self.frozen = frozen
        self._frozen_recon: torch.Tensor | None = None

    def probs(self) -> torch.Tensor:
        """p = softmax(α − μ·c): the budget shift μ·c is set by the projection each iteration."""
        return torch.softmax(self.alpha - self.shift, dim=0)

    def recon(self) -> list[torch.Tensor]:
        return [self.target if f is None else f.reconstruct(list(b), self.spec)
                for f, b in zip(self.facts, self.branches)]

    def _versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.branches.parameters())

    def drop_stash(self) -> None:
        self._stash = None

    def prepare(self) -> None:
        """Frozen factors mixed as weights: form the candidates' weights now (once per step),
        stacked as one K × (weight size) matrix that p mixes in one product (live taps only)."""
        if self.frozen and not self.mix_outputs and self._frozen_recon is None:
            cut = (lambda w: w) if self.live is None else self.live.cut
            with torch.no_grad():
                self._frozen_recon = torch.stack([cut(w).reshape(-1) for w in self.recon()])

    def stashed_recon(self) -> list[torch.Tensor]:
        """:meth:`recon`, taken from the last forward pass when the factors have not changed
        since (their in-place version counters say so): the α step's forward and the next
        weight step reconstruct the same factors, so one reconstruction serves both (exact)."""
        stash, self._stash = self._stash, None
        if stash is not None and stash[0] == self._versions():
            return stash[1]
        return self.recon()

    def _dense_apply(self, w: torch.Tensor, x: torch.Tensor, bias=None,
                     probe: bool = False) -> torch.Tensor:
        """The layer with weight ``w``; ``probe``: on the probe spec (no stride or padding)."""
        if not self.is_conv:
            return F.linear(x, w, bias)
        args = {"dilation": self.conv_args["dilation"]} if probe else self.conv_args
        return F.conv2d(x, w, bias, **args)

    def weight_loss(self, p: torch.Tensor, gen: torch.Generator, floor: float = 0.0
                    ) -> torch.Tensor:
        """‖W − Σ_r p_r Ŵ(r)‖² / ‖W‖², exactly or (for large layers) by Gaussian probes:
        E_z‖A z‖² = ‖A‖²_F for z ~ N(0, I) (Hutchinson), an unbiased estimate.

        ``floor`` > 0 leaves the candidates with p_r < floor out of the mixture (the most
        probable one always stays): their gradient is p_r times that of the mixture, so this
        step would barely move them, and their chains are not run."""
        t = self.target
        keep = [k for k in range(len(self.cands)) if floor <= 0 or p[k] >= floor
                or k == int(p.argmax())]
        norm = self.target_norm.clamp_min(1e-30)
        if not self.probe_weights:
            recon = self.stashed_recon()
            w = sum(p[k] * recon[k] for k in keep)
            return self._sq_norm(w - t) / norm
        z = self._probes(gen).to(t)
        want = self._dense_apply(t, z, probe=True)
        got = sum(p[k] * (want if self.probe_chains[k] is None
                          else _chain_apply(self.probe_chains[k], list(self.branches[k]), z))
                  for k in keep)
        return (got - want).pow(2).sum() / self.n_probes / norm

    def _sq_norm(self, w: torch.Tensor) -> torch.Tensor:
        """‖w‖²_F, or ‖w L‖²_F under the activation fit's whitener."""
        if self.white is None:
            return w.pow(2).sum()
        return self.white.right(w.reshape(w.shape[0], -1)).pow(2).sum()

    def _probes(self, gen: torch.Generator) -> torch.Tensor:
        """Probe inputs: z ~ N(0, I), or z = L g (so E‖A z‖² = ‖A L‖²) under the whitener."""
        shape = self.probe_spec.in_hw if self.is_conv else ()
        if self.white is None:
            return torch.randn(self.n_probes, self.spec.in_ch, *shape, generator=gen)
        return self.white.sample(self.n_probes, gen).reshape(self.n_probes, self.spec.in_ch,
                                                             *shape)

    def forward(self, x):
        p = self.probs()
        if self.mix_outputs:
            # Factors detached (the α step must not move them), but NOT under no_grad: the
            # gradient has to reach x, or every layer upstream gets no α gradient at all.
            outs = [self._dense_apply(self.target, x) if c is None
                    else _chain_apply(c, [f.detach() for f in b], x)
                    for c, b in zip(self.chains, self.branches)]
            y = sum(pk * o for pk, o in zip(p, outs))
            if self.bias is not None:
                y = y + (self.bias.view(1, -1, 1, 1) if self.is_conv else self.bias)
            return y
        if self.frozen:
            if self.live is not None and tuple(x.shape[-2:]) != self.live.in_hw:
                # the layer also runs at another size (the cut holds only at the measured one)
                self.live, self._frozen_recon = None, None
            self.prepare()
            mixed = p.to(self._frozen_recon.dtype) @ self._frozen_recon
            if self.live is None:
                return self._dense_apply(mixed.view_as(self.target), x, self.bias)
            return self.live.apply(mixed, x, self.bias, self.conv_args)
        if self.reuse_recon and not self.probe_weights and torch.is_grad_enabled():
            recon = self.recon()  # with its graph: the next weight step reuses it
            self._stash = (self._versions(), recon)
            recon = [wk.detach() for wk in recon]
        else:
            with torch.no_grad():
                recon = self.recon()
        return self._dense_apply(sum(pk * wk for pk, wk in zip(p, recon)), x, self.bias)


@dataclass(frozen=True)
class _LiveTaps:
    """A conv's kernel cut to the taps that meet its input (:func:`_live_taps`)."""

    shape: tuple[int, int, int, int]  # the cut weight's
    rows: slice
    cols: slice
    padding: tuple[int, int]
    in_hw: tuple[int, int]
    fraction: float  # live taps / all taps

    def cut(self, w: torch.Tensor) -> torch.Tensor:
        return w[:, :, self.rows, self.cols]

    def apply(self, flat: torch.Tensor, x: torch.Tensor, bias, conv_args: dict) -> torch.Tensor:
        """The conv with the cut weight ``flat`` on ``x`` (of the measured size ``in_hw``)."""
        return F.conv2d(x, flat.view(self.shape), bias, **{**conv_args, "padding": self.padding})


def _live_taps(spec) -> _LiveTaps | None:
    """The taps of a k×k conv that meet its input at some output position, where the others
    form a symmetric border (cut off with the padding reduced by as much, the outputs are the
    same); None when every tap is live or the cut is not symmetric."""
    cuts = []
    for k, s, p, d, n in zip(spec.kernel, spec.stride, spec.padding, spec.dilation, spec.in_hw):
        out = (n + 2 * p - d * (k - 1) - 1) // s + 1
        live = [t for t in range(k) if any(0 <= o * s - p + t * d < n for o in range(out))]
        a = live[0] if live else 0
        ok = live and a == k - 1 - live[-1] and p - a * d >= 0
        cuts.append(a if ok else 0)
    if not any(cuts):
        return None
    (a, b), (kh, kw) = cuts, spec.kernel
    rows, cols = slice(a, kh - a), slice(b, kw - b)
    shape = (spec.out_ch, spec.in_ch // spec.groups, kh - 2 * a, kw - 2 * b)
    padding = (spec.padding[0] - a * spec.dilation[0], spec.padding[1] - b * spec.dilation[1])
    return _LiveTaps(shape, rows, cols, padding, tuple(spec.in_hw),
                     (kh - 2 * a) * (kw - 2 * b) / (kh * kw))


def initial_candidates(lo: LayerOptions, n: int) -> tuple[list[int], dict[str, int]]:
    """~n evenly spaced option indices per factorization (largest rank always in), plus keeping
    the layer dense; step sizes (dense: 1, final once chosen)."""
    by_method: dict[str, list[int]] = {}
    for j, o in enumerate(lo.options):
        if o.factorization != DENSE:
            by_method.setdefault(o.factorization, []).append(j)
    cands, steps = [], {DENSE: 1}
    for m, idx in by_method.items():
        idx.sort(key=lambda j: lo.options[j].rank)
        s = max(1, math.ceil(len(idx) / n))
        pick = idx[::-1][::s][::-1]  # from the top, so the largest useful rank is a candidate
        cands += pick
        steps[m] = s
    cands.append(len(lo.options) - 1)
    return cands, steps


def planned_steps(steps: list[dict[str, int]], refine: int) -> int:
    """How many narrowing steps the search will run: a layer whose candidate step is s needs
    one more step after each narrowing while s > 1 (s → max(1, ⌊s/f⌋), as :func:`narrow`)."""
    most = 1
    for per_method in steps:
        for s in per_method.values():
            n = 1
            while s > 1:
                s, n = max(1, s // refine), n + 1
            most = max(most, n)
    return most


def narrow(lo: LayerOptions, best: int, step: int, refine: int) -> tuple[list[int], int]:
    """Figure 3's rule in grid units: r̄ ± step/2 at step ⌊step/f⌋ (at least one grid unit)."""
    m = lo.options[best].factorization
    idx = sorted((j for j, o in enumerate(lo.options) if o.factorization == m),
                 key=lambda j: lo.options[j].rank)
    pos = idx.index(best)
    new = max(1, step // refine)
    half = step // 2
    lo_i, hi_i = max(0, pos - half), min(len(idx) - 1, pos + half)
    return sorted({idx[k] for k in range(lo_i, hi_i + 1, new)} | {best}), new


def softmax_search(ctx, cfg: ReneConfig, prior: list[list[float]] | None = None,
                   factors: CandidateFactors | None = None,
                   probed: dict | None = None) -> tuple[list[int], dict]:
    """Run the multi-step search; returns (chosen option per layer, trace).

    ``prior[i][j]``, when given, is minus the predicted loss increase of option j of layer i;
    every step's logits start at prior/τ instead of 0. ``probed``: the run-time probe's mixed
    layers (:func:`estimate`), which the first step reuses where its candidates are the same.
    """
    problem: RankProblem = ctx.problem
    kind = problem.target.kind
    model = ctx.model
    torch.manual_seed(ctx.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    teacher = None
    if cfg.alpha_loss == "kd":
        teacher = ctx.logits
        if teacher is None:
            with torch.no_grad():
                model.eval()
                teacher = [model(x.to(ctx.device)).float() for x, _ in ctx.batches]
    state = []  # per layer: (candidate option indices, step per method)
    for lo in problem.layers:
        cands, steps = initial_candidates(lo, cfg.n_candidates)
        state.append((cands, steps))
    trace = {"config": asdict(cfg), "steps": []}
    step_no = 0
    if factors is None or not cfg.exact_speedups:
        factors = CandidateFactors(model, keep=cfg.exact_speedups, stats=ctx.stats)
    n_steps = planned_steps([steps for _, steps in state], cfg.refine)
    ckpt = _StepCheckpoint(ctx, cfg, prior is not None)
    resumed = ckpt.load()
    if resumed is not None:
        step_no, state, trace = resumed
        log.info("rene: resuming after search step %d", step_no)
    while True:
        step_no += 1
        torch.manual_seed(ctx.seed + step_no)  # each step reproducible on its own (resume)
        of = f"step {step_no} of {n_steps}"
        ctx.stage(f"rank selection (rene): {of}, candidate factors per layer",
                  total=len(problem.layers))
        t0 = clock()
        mixed = _mixed_layers(ctx, cfg, state, prior, factors, probed)
        probed = None  # the probe's candidates are the first step's only
        t1 = clock()
        if cfg.weight_steps:
            ctx.stage(f"rank selection (rene): {of}, weight and rank iterations "
                      f"({cfg.warmup} weight-only first)", total=cfg.warmup + cfg.iters)
        else:
            ctx.stage(f"rank selection (rene): {of}, rank iterations", total=cfg.iters)
        step_trace = _optimise(ctx, problem, mixed, cfg, kind, teacher)
        step_trace["seconds"]["decompose"] = round(t1 - t0, 3)
        choice = expected_cost_choice(problem, list(mixed.values()))
        step_trace["chosen_ranks"] = {
            lo.spec.name: [lo.options[j].factorization, lo.options[j].rank]
            for lo, j in zip(problem.layers, choice)}
        step_trace["chosen_cost_ratio"] = problem.cost_of(choice) / problem.base_cost
        trace["steps"].append(step_trace)
        log.info("rene step %d: expected-cost plan at %.3f of the cost (target %.3f)",
                 step_no, step_trace["chosen_cost_ratio"], problem.target.ratio)
        # Narrow: a layer is done when its step is one grid unit; all done -> stop.
        new_state, done = [], True
        for lo, (_cands, steps), j in zip(problem.layers, state, choice):
            s = steps[lo.options[j].factorization]
            if s <= 1:
                new_state.append(([j], {lo.options[j].factorization: 1}))
                continue
            done = False
            nc, ns = narrow(lo, j, s, cfg.refine)
            new_state.append((nc, {lo.options[j].factorization: ns}))
        state = new_state
        if done or all(len(c) == 1 for c, _ in state):
            return choice, trace
        ckpt.save(step_no, state, trace)


class CandidateFactors:
    """Every candidate's initial factors, decomposed once per (layer, factorization, rank) for
    the whole search: a later narrowing step asks again for the ranks it keeps (r̄ at least), and
    a layer already narrowed to one rank asks for it at every step. The decompositions are
    deterministic and a rank's factors do not depend on which other ranks are decomposed with it
    (one shared SVD/HOSVD per call, truncated), so a cached entry equals a fresh one."""

    def __init__(self, model: nn.Module, keep: bool = True,
                 stats: dict[str, LayerStats] | None = None):
        self.model, self.keep = model, keep
        self.stats = stats or {}  # the activation fit's input statistics per layer, if any
        self.store: dict[tuple[str, str, int], list[torch.Tensor]] = {}
        self.computed = 0  # decompositions actually run (the rest came from the store)
        # a later step's new ranks take leading blocks of the layer's earlier activation-fit
        # solve (same factors up to rounding; with keep, like the store)
        self.solves = SolveMemo() if keep else None

    def get(self, lo: LayerOptions, js: list[int]) -> dict[int, list[torch.Tensor]]:
        """Option index -> factors (empty for the dense option), for the options ``js``."""
        weight = self.model.get_submodule(lo.spec.name).weight.detach()
        if not self.keep:
            self.store.clear()
        per_method: dict[str, list[int]] = {}
        for j in js:
            o = lo.options[j]
            if o.factorization != DENSE and self._key(lo, j) not in self.store:
                per_method.setdefault(o.factorization, []).append(j)
        for m, todo in per_method.items():
            with self.solves.active() if self.solves else contextlib.nullcontext():
                fs = get_factorization(m).decompose_many(
                    weight, lo.spec, [lo.options[j].rank for j in todo],
                    stats=self.stats.get(lo.spec.name))
            self.store.update((self._key(lo, j), f) for j, f in zip(todo, fs))
            self.computed += len(todo)
        return {j: [] if lo.options[j].factorization == DENSE else self.store[self._key(lo, j)]
                for j in js}

    def whitener(self, lo: LayerOptions) -> Whitener | None:
        """The Σ-norm the layer's candidates were fitted under (None: the weight fit's norm)."""
        return whitener(self.stats.get(lo.spec.name), lo.spec)

    @staticmethod
    def _key(lo: LayerOptions, j: int) -> tuple[str, str, int]:
        return lo.spec.name, lo.options[j].factorization, lo.options[j].rank


def _mixed_layers(ctx, cfg: ReneConfig, state, prior, factors: CandidateFactors,
                  reuse: dict | None = None) -> dict:
    """One :class:`MixedLayer` per layer over its current candidates, logits at the prior.
    ``reuse``: mixed layers of an earlier pass (the run-time probe's) over the same candidates
    with frozen factors, taken as they are with their logits reset (the same layers)."""
    mixed = {}
    for i, (lo, (cands, _)) in enumerate(zip(ctx.problem.layers, state)):
        cl = [(j, lo.options[j].factorization, lo.options[j].rank) for j in cands]
        mx = (reuse or {}).get(lo.spec.name)
        # (a probe layer whose factors a weight step moved is not frozen: never taken)
        if mx is None or mx.cands != cl or not mx.frozen or not cfg.exact_speedups:
            mx = _mixed_layer(ctx, cfg, lo, cl, factors)
        with torch.no_grad():
            mx.alpha.zero_()
            mx.alpha.grad = None
            if prior is not None:
                mx.alpha.copy_(torch.tensor([prior[i][j] / cfg.prior_temp for j in cands]))
        mixed[lo.spec.name] = mx
        ctx.tick()
    return mixed


def _mixed_layer(ctx, cfg: ReneConfig, lo: LayerOptions, cl, factors: CandidateFactors
                 ) -> MixedLayer:
    by_j = factors.get(lo, [j for j, _, _ in cl])
    mx = MixedLayer(ctx.model.get_submodule(lo.spec.name), lo.spec, cl, [by_j[j] for j, _, _ in cl],
                    batch=ctx.batches[0][0].shape[0], probes=cfg.probes,
                    # the Σ-norm weighs only the weight step: not formed without it
                    white=factors.whitener(lo) if cfg.weight_steps else None,
                    frozen=not cfg.weight_steps)
    mx.reuse_recon = cfg.exact_speedups
    if mx.frozen:
        mx.branches.requires_grad_(False)
    mx.prepare()
    return mx


class _StepCheckpoint:
    """The search state after each narrowing step (candidate sets, step sizes, trace) through the
    pipeline's ``ctx.state`` (RUN/state/search-rene.pt, tied to the run's fingerprint), so that a
    killed search resumes at the last finished step. Each step starts from fresh decompositions
    and logits and reseeds the RNG, so nothing else needs saving."""

    def __init__(self, ctx, cfg: ReneConfig, with_prior: bool):
        self.store = getattr(ctx, "state", None)
        self.key = json.dumps({"config": asdict(cfg), "seed": ctx.seed, "prior": with_prior,
                               "target": [ctx.problem.target.kind, ctx.problem.target.ratio],
                               "layers": [[lo.spec.name, len(lo.options)]
                                          for lo in ctx.problem.layers]}, sort_keys=True)

    def load(self):
        d = self.store.load() if self.store is not None else None
        if not isinstance(d, dict) or d.get("key") != self.key:
            return None
        return d["step_no"], [(c, s) for c, s in d["state"]], json.loads(d["trace"])

    def save(self, step_no: int, state, trace) -> None:
        if self.store is not None:
            self.store.save({"key": self.key, "step_no": step_no,
                             "state": [[c, s] for c, s in state], "trace": json.dumps(trace)})


def project_budget(mixed: list[MixedLayer], costs: list[torch.Tensor], fixed: float,
                   budget: float, iters: int = 50) -> tuple[float, float]:
    """Find μ ≥ 0 with E_p[cost] = budget for p_i = softmax(α_i − μ·c_i/budget), and set it.

    This is the exact Lagrangian (Gibbs) solution of "minimise the search loss subject to the
    expected cost meeting the budget", solved by bisection on the single multiplier μ (E[cost]
    falls monotonically as μ grows). When the unshifted distribution already fits, μ = 0.
    Returns (μ, expected cost).
    """
    with torch.no_grad():
        scaled = [c / budget for c in costs]

        def expected(mu: float) -> float:
            return fixed + sum(float((torch.softmax(mx.alpha - mu * c, 0) * cc).sum())
                               for mx, c, cc in zip(mixed, scaled, costs))

        lo, hi = 0.0, 1.0
        if expected(0.0) <= budget:
            hi = 0.0
        else:
            while expected(hi) > budget and hi < 1e6:
                lo, hi = hi, hi * 4
            for _ in range(iters):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if expected(mid) <= budget else (mid, hi)
        for mx, c in zip(mixed, scaled):
            mx.shift.copy_(hi * c)
        return hi, expected(hi)


def expected_cost_choice(problem: RankProblem, layers: list[MixedLayer]) -> list[int]:
    """Per layer, the candidate whose cost is nearest the layer's expected cost E_p[C_i].

    The projection keeps Σ_i E_p[C_i] on budget, so this plan lands near the target as a whole.
    Each layer's independent argmax does not: with the mean on budget, the modes summed to 12 %
    of the MACs for a 30 % target (the distributions put a little mass on costly ranks). This is
    RENE's expected-rank view (its L_r is a function of E_p[r]) read in cost units.
    """
    kind = problem.target.kind
    choice = []
    for lo, mx in zip(problem.layers, layers):
        p = mx.probs().detach()
        costs = [lo.options[j].cost(kind) for j, _, _ in mx.cands]
        mean = float(sum(pk * c for pk, c in zip(p.tolist(), costs)))
        k = min(range(len(costs)), key=lambda i: (abs(costs[i] - mean), -float(p[i])))
        choice.append(mx.cands[k][0])
    return choice


def _optimise(ctx, problem, mixed: dict, cfg: ReneConfig, kind: str, teacher=None) -> dict:
    params_w = [p for mx in mixed.values() for p in mx.branches.parameters()]
    alphas = [mx.alpha for mx in mixed.values()]
    opt_w = (torch.optim.SGD(params_w, lr=cfg.lr_w, momentum=0.9, nesterov=True)
             if cfg.weight_steps else None)  # the factors stay fixed without the weight step
    opt_a = torch.optim.Adam(alphas, lr=cfg.lr_alpha)
    layers = list(mixed.values())
    costs = [torch.tensor([float(lo.options[j].cost(kind)) for j, _, _ in mx.cands],
                          device=mx.alpha.device) for lo, mx in zip(problem.layers, layers)]
    fixed = float(problem.fixed_cost)
    budget = float(problem.budget)
    hist = {"ce": [], "expected_cost_ratio": [], "mu": [], "recon": []}
    batches = ctx.batches
    model = ctx.model
    gen = torch.Generator().manual_seed(ctx.seed)
    health = _Health(mixed, hist)
    clock = _StepClock()
    watch = Convergence(layers, cfg)
    # oneDNN's CPU backward crashed the process (SIGSEGV, heap corruption) on a resnet18 with
    # 8-channel layers at 224×224; no single conv reproduced it. Layers that narrow cost nothing
    # on the reference kernels, which are 3.5× slower on resnet18-sized layers, so only
    # narrow models take them.
    use_onednn = min(min(mx.spec.in_ch, mx.spec.out_ch) for mx in layers) >= 16
    hist["onednn_backward"] = use_onednn
    with swap_modules(model, mixed):
        model.eval()  # BN statistics stay those of the pretrained model
        mu, exp_cost = project_budget(layers, costs, fixed, budget)
        warmup = cfg.warmup_iters
        for it in range(warmup + cfg.iters):
            if not cfg.weight_steps:
                rec_loss = None
            else:
                rec_loss = _weight_step(layers, opt_w, params_w, gen, cfg, health, it)
            if it < warmup:
                clock.lap("warmup")
                ctx.tick()
                continue
            clock.lap("weight")
            # α step (Eq. 9): calibration CE through the budget-projected distribution.
            b = it % len(batches)
            x, y = batches[b]
            opt_a.zero_grad(set_to_none=True)
            out = model(x.to(ctx.device)).float()
            if teacher is None:
                ce = F.cross_entropy(out, y.to(ctx.device))
            else:
                ce = kd_loss(out, teacher[b])
            with contextlib.nullcontext() if use_onednn else _without_onednn():
                ce.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(alphas, cfg.grad_clip)
            if not health.ok("α", ce, alphas, f"iteration {it}"):
                clock.lap("alpha")
                ctx.tick()
                continue
            if cfg.alpha_optimizer == "normsgd":
                _normsgd_step(alphas, cfg.lr_alpha)
            else:
                opt_a.step()
            mu, exp_cost = project_budget(layers, costs, fixed, budget)
            ce_v = ce.item()
            hist["ce"].append(round(ce_v, 5))
            hist["expected_cost_ratio"].append(round(exp_cost / problem.base_cost, 5))
            hist["mu"].append(round(mu, 5))
            if rec_loss is not None:
                hist["recon"].append(round(rec_loss.item(), 6))
            clock.lap("alpha")
            ctx.tick()
            if watch.settled(len(hist["ce"])):
                for _ in range(warmup + cfg.iters - it - 1):
                    ctx.tick()  # the stage ends at its announced size
                break
    for mx in layers:
        mx.drop_stash()
    hist["seconds"] = clock.seconds()
    hist["alpha_iters"] = len(hist["ce"])
    if watch.shifts:
        hist["p_shift"] = watch.shifts
    return hist


def _weight_step(layers: list[MixedLayer], opt_w, params_w, gen, cfg: ReneConfig, health,
                 it: int) -> torch.Tensor:
    """Weight step (Eq. 8): data-free, mixture reconstruction, p held fixed."""
    opt_w.zero_grad(set_to_none=True)
    rec_loss = sum(mx.weight_loss(mx.probs().detach(), gen, cfg.weight_floor) for mx in layers)
    rec_loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(params_w, cfg.grad_clip)
    if health.ok("weight", rec_loss, params_w, f"iteration {it}"):
        opt_w.step()
    return rec_loss


def _normsgd_step(alphas: list[torch.Tensor], lr: float) -> None:
    """One global scale for every logit: layers keep their relative sensitivity (Adam's
    per-coordinate scaling lets insensitive layers move as fast as sensitive ones, which a
    shared budget turns into the wrong trade)."""
    with torch.no_grad():
        top = max(float(a.grad.abs().max()) for a in alphas if a.grad is not None)
        for a in alphas:
            if a.grad is not None and top > 0:
                a -= lr * a.grad / top


class _StepClock:
    """Wall seconds per part of a narrowing step (warm-up, weight steps, α steps)."""

    def __init__(self):
        self.t = clock()
        self.parts: dict[str, float] = {}

    def lap(self, part: str) -> None:
        now = clock()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.t
        self.t = now

    def seconds(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.parts.items()}


class Convergence:
    """Whether a narrowing step's rank distributions have settled (``ReneConfig.stop_tol``).

    Every ``stop_every`` α iterations it measures the largest total-variation distance
    ½Σ_r|p_r − p'_r| of any layer's distribution from the previous check (``shifts``); the step
    may stop when that falls below ``stop_tol``, never before ``min_iters`` α iterations."""

    def __init__(self, layers: list[MixedLayer], cfg: ReneConfig):
        self.layers, self.cfg = layers, cfg
        self.last: list[torch.Tensor] | None = None
        self.shifts: list[float] = []

    def settled(self, n_alpha: int) -> bool:
        cfg = self.cfg
        if n_alpha % cfg.stop_every:
            return False
        with torch.no_grad():
            now = [mx.probs().detach().clone() for mx in self.layers]
        last, self.last = self.last, now
        if last is None:
            return False
        shift = max(float((a - b).abs().sum()) / 2 for a, b in zip(now, last))
        self.shifts.append(round(shift, 6))
        return cfg.stop_tol > 0 and n_alpha >= cfg.min_iters and shift < cfg.stop_tol


@contextlib.contextmanager
def _without_onednn():
    """torch's reference CPU kernels instead of oneDNN (setting the flag warns about TF32 on
    Intel GPUs, which is irrelevant here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


class _Health:
    """Skips (rolls back) a search step whose loss or gradients are NaN/Inf; one
    :class:`~lrcompress.util.numerics.NonFiniteGuard` per step kind stops the search after 3
    in a row, naming the stage and the first layer whose logits or factors went bad."""

    ADVICE = ("Exclude that layer (--exclude), choose another --decomp, or lower the search "
              "learning rates.")

    def __init__(self, mixed: dict, hist: dict):
        self.mixed, self.hist = mixed, hist
        self.guards = {k: NonFiniteGuard(f"Rank search (rene, {k} step)", advice=self.ADVICE)
                       for k in ("weight", "α")}

    def ok(self, stage: str, loss: torch.Tensor, params, where: str) -> bool:
        if all_finite([loss]) and all_finite(p.grad for p in params):
            self.guards[stage].ok()
            return True
        self.hist.setdefault("skipped_steps", []).append(stage)
        culprit = first_nonfinite(
            (name, t) for name, mx in self.mixed.items()
            for t in (mx.alpha, mx.alpha.grad, *mx.branches.parameters(),
                      *(f.grad for f in mx.branches.parameters())))
        self.guards[stage].skip(where, "loss or gradient", culprit)
        return False


def estimate(ctx) -> list[tuple[str, int, str, float]]:
    """The search's run time as rows (stage, units, unit, seconds per unit), from a probe: the
    first step's candidates decomposed (kept in ``ctx.scratch`` for the search) and timed, then
    one warm-up and two joint iterations timed. Later steps have fewer candidates; their
    iterations are scaled by the candidate count (:func:`narrowed_counts`). The early stop
    (``stop_tol``) can only shorten the steps: the estimate assumes every iteration runs."""
    from lrcompress.rank.signals import calib_loss

    cfg = ctx.config.get("rene") or ReneConfig()
    problem = ctx.problem
    for p in ctx.model.parameters():
        p.requires_grad_(False)
    state = [initial_candidates(lo, cfg.n_candidates) for lo in problem.layers]
    factors = CandidateFactors(ctx.model, keep=cfg.exact_speedups, stats=ctx.stats)
    ctx.stage("estimating the run time: rene probe (candidate factors, 3 iterations)",
              total=len(problem.layers) + 3)
    t0 = clock()
    mixed = _mixed_layers(ctx, cfg, state, None, factors)
    t_dec = clock() - t0
    probe = replace(cfg, warmup=1, iters=2, stop_tol=0.0)
    hist = _optimise(ctx, problem, mixed, probe, problem.target.kind, None)
    ctx.scratch["rene_factors"] = factors
    ctx.scratch["rene_mixed"] = mixed
    sec = hist["seconds"]
    per_it = (sec.get("weight", 0.0) + sec.get("alpha", 0.0)) / 2
    per_warm = sec.get("weight", 0.0) / 2
    t0 = clock()
    with torch.no_grad():
        calib_loss(ctx.model, ctx.batches[:1], ctx.device)
    t_pass = (clock() - t0) * min(cfg.loss_batches, len(ctx.batches))
    n = len(problem.layers)
    # the first step's candidate fits (done by the probe; the error curves, closed-form for
    # the chain methods, cost a fraction of them)
    rows = [("rank selection: candidate fits", n, "layers", t_dec / n),
            ("rank selection: loss model", 2 * n + 1, "calibration passes", t_pass)]
    counts = narrowed_counts(problem, state, cfg)
    for k, c in enumerate(counts, 1):
        scale = c / counts[0]
        warm = cfg.warmup_iters
        if k > 1 and c > n:  # a later step fits its new candidates (each layer's choice is kept)
            rows.append((f"rank selection: step {k} of {len(counts)}, candidate fits", c - n,
                         "candidates", t_dec / counts[0]))
        rows.append((f"rank selection: step {k} of {len(counts)}", warm + cfg.iters,
                     "iterations", (warm * per_warm + cfg.iters * per_it) * scale
                     / (warm + cfg.iters)))
    rows.append(("decomposition", n, "layers", t_dec / sum(len(c) for c, _ in state)))
    return rows


def narrowed_counts(problem: RankProblem, state, cfg: ReneConfig) -> list[int]:
    """Candidates (summed over layers) in each narrowing step, the chosen rank assumed inside
    its grid (so the counts are the largest possible)."""
    counts = [sum(len(c) for c, _ in state)]
    steps = [max(st.values()) for _, st in state]
    sizes = [len([o for o in lo.options if o.factorization != DENSE]) for lo in problem.layers]
    for _ in range(planned_steps([{"s": s} for s in steps], cfg.refine) - 1):
        counts.append(sum(min(size, 2 * (s // 2) // max(1, s // cfg.refine) + 1) if s > 1 else 1
                          for s, size in zip(steps, sizes)))
        steps = [max(1, s // cfg.refine) if s > 1 else 1 for s in steps]
    return counts


def select(ctx) -> tuple:
    from lrcompress.rank.problem import allocate
    from lrcompress.rank.sensitivity import truncation_scores
    from lrcompress.rank.signals import error_curves, loss_model_scores, sensitivities

    cfg = ctx.config.get("rene") or ReneConfig()
    n = len(ctx.problem.layers)
    # The loss model scores weight errors and weight-fitted probes even under an output-aware
    # fit: scoring the activation fits instead (as `sensitivity` does) was measured on
    # 2026-12-03 and lost 0.2 points on resnet18 tt at 30 % MACs (89.13 → 88.91 % on all 10k
    # test images; mobilenetv2 at 50 %: 82.03 → 82.04 %) and took longer.
    ctx.stage("rank selection (rene): loss model, error curves per layer", total=n)
    errs = error_curves(ctx.model, ctx.problem, ctx.cache, progress=lambda _n: ctx.tick())
    prior = None
    if cfg.prior == "loss_model":
        ctx.stage("rank selection (rene): loss model, calibration loss per layer (prior)",
                  total=n)
        prior = truncation_scores(ctx, errs, cfg.loss_batches,
                                  progress=lambda _n: ctx.tick())[0]
    choice, trace = softmax_search(ctx, cfg, prior, ctx.scratch.pop("rene_factors", None),
                                   ctx.scratch.pop("rene_mixed", None))
    before = ctx.problem.cost_of(choice)
    # The repair's loss model is anchored at the searched ranks; a layer the search kept dense
    # has no truncation error there, so it is anchored at its smallest rank (cached already).
    ref = [0 if lo.options[j].factorization == DENSE else j
           for lo, j in zip(ctx.problem.layers, choice)]
    ctx.stage("rank selection (rene): loss model, calibration loss per layer (repair)",
              total=n)
    sens = sensitivities(ctx.model, ctx.problem, ref, ctx.batches[:cfg.loss_batches], ctx.device,
                         ctx.cache, progress=lambda _n: ctx.tick())
    scores = loss_model_scores(errs, sens, ref)
    final = allocate(ctx.problem, scores, start=choice)
    problem_cost = ctx.problem.cost_of(final)
    trace["repair"] = {
        "search_cost_ratio": before / ctx.problem.base_cost,
        "final_cost_ratio": problem_cost / ctx.problem.base_cost,
        "layers_changed": sum(a != b for a, b in zip(choice, final)),
    }
    return ctx.problem.to_plan(final, "rene"), trace

