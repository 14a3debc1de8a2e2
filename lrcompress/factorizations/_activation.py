"""Activation-aware fits: factors that minimise the layer's output error on its inputs.

The weight fit minimises ``‖W − Ŵ‖_F``. What matters is the output, ``E‖(W − Ŵ) x‖²
= ‖(W − Ŵ) L‖_F²`` with ``Σ = E[x xᵀ] = L Lᵀ`` the input's second moment (ASVD, SVD-LLM
whitening; arXiv 2511.04494). ``x`` is what the factor touching the input sees: the feature
vector of a linear layer, the unfolded patch (``C_in·kh·kw``) of a conv fitted as one matrix, the
channel vector for the first 1×1 conv of a Tucker-2 / TT chain.

* Matrix fits (linear, 1×1 conv, svd of a k×k conv): truncated SVD of ``W L``, balanced split of
  the singular values as in the weight fit, input factor un-whitened by ``L⁻¹`` — optimal for the
  (damped) Σ-norm at every rank.
* Tucker-2 / TT chains (1×1 S→r_in, k×k core, 1×1 r_out→T): the input factor ``A`` is the optimal
  rank-r_in input projection of the mode-2 map under the channel second moment Σ_c (whitened SVD of
  ``Lᵀ W_(2)``, ``A = Vᵀ L⁻¹``). With ``A`` fixed, the core and output factor solve the
  reduced-rank regression ``min E‖W p − U G (A ⊗ I) p‖²`` (p the patch): ``M* = W Σ_p Pᵀ Σ_q⁻¹``,
  ``U`` the top left singular vectors of ``M* Σ_q^½``, ``G = Uᵀ M*``. ``Σ_p`` is the measured
  patch second moment when the statistics have it, else ``Σ_c ⊗ I`` (taps uncorrelated).

Damping: ``Σ + λ·mean(diag Σ)·I`` (λ = :data:`DAMPING` unless the statistics say otherwise), so
rank-deficient inputs (dead ReLU channels, zero padding) still have a Cholesky factor.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from lrcompress.factorizations._linalg import (
    balanced_split,
    basis_from_gram,
    left_basis,
    prefix_grams,
)

DAMPING = 1e-2


@dataclass
class LayerStats:
    """One layer's input second moments, float64, already divided by the number of rows seen.

    ``patch``: ``E[p pᵀ]`` of the layer's own unfolded input (features of a linear layer;
    ``C_in·kh·kw`` patches of a conv, with its stride/padding/dilation; ``C_in`` for a 1×1 conv).
    ``channel``: ``E[x xᵀ]`` over the channels at every input position (k×k convs only).
    Either may be None (not requested, or over the memory budget)."""

    patch: torch.Tensor | None = None
    channel: torch.Tensor | None = None
    rows: int = 0
    damping: float = DAMPING
    # Sequential fit: ``E[p p̃ᵀ]`` of the *original* model's patch p and this model's p̃ (then
    # ``patch`` is p̃'s moment): the fit targets the original's output, W p, from p̃.
    cross: torch.Tensor | None = None


def damped_cholesky(sigma: torch.Tensor, damping: float) -> torch.Tensor | None:
    """Lower ``L`` with ``L Lᵀ = Σ + λ·mean(diag Σ)·I``; None for an all-zero Σ (nothing to
    weight by: the caller keeps the weight fit)."""
    sigma = sigma.to(torch.float64)
    scale = sigma.diagonal().mean()
    if not torch.isfinite(scale) or scale <= 0:
        return None
    eye = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    lam = damping * scale
    for _ in range(6):  # only a numerically indefinite Σ with damping ~0 needs more than one try
        chol, info = torch.linalg.cholesky_ex(sigma + lam * eye)
        if int(info) == 0:
            return chol
        lam = max(lam * 10, 1e-10 * scale)
    return None


def unwhiten(b: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``b L⁻¹``."""
    return torch.linalg.solve_triangular(chol, b, upper=False, left=False)


def whitened_splits(m: torch.Tensor, chol: torch.Tensor, ranks):
    """``[(A, B)]`` per rank: the balanced split of the truncated SVD of ``m L``, with ``B``
    un-whitened, so ``A B`` minimises ``‖(m − A B) L‖_F`` over rank-r matrices."""
    u, p = left_basis(m @ chol, max(ranks))
    out = []
    for r in ranks:
        a, b = balanced_split(u, p, r)
        out.append((a, unwhiten(b, chol)))
    return out


def _pad_cols(u: torch.Tensor, r: int) -> torch.Tensor:
    if u.shape[1] >= r:
        return u[:, :r]
    return torch.cat([u, u.new_zeros(u.shape[0], r - u.shape[1])], dim=1)


def chain_fit(w: torch.Tensor, pairs, stats: LayerStats):
    """Activation-aware (1×1 S→r_in, k×k core r_in→r_out, 1×1 r_out→T) chain factors per
    ``(r_out, r_in)`` pair: ``[[A (r_in,S,1,1), G (r_out,r_in,kh,kw), U (T,r_out,1,1)], ...]``,
    or None when the statistics cannot weight the fit (the caller keeps the weight fit)."""
    if stats.channel is None:
        return None
    t, s, kh, kw = w.shape
    k = kh * kw
    # Input factor: top right singular vectors of W_(2)ᵀ L (the mode-2 map, whitened). The
    # rows of A are nested in r_in, so every pair's solve is a leading block of the largest one
    # (also of a larger one kept from an earlier call on the same layer: SolveMemo).
    found = _solve_for(w, stats, max(r3 for _, r3 in pairs))
    if found is None:
        return None
    a_top, solve = found
    # The whitened map of every r_in is the leading r_in·k columns of the largest one, so
    # their Gram matrices (for the output basis) share one product.
    grams = prefix_grams(solve.whitened.T, [r3 * k for _, r3 in pairs])
    out = []
    for r4, r3 in pairs:
        n = r3 * k
        gram, outer_t = grams[n]  # a Gram matrix of whitenedᵀ: outer for it is inner for us
        u, _ = basis_from_gram(solve.whitened[:, :n], gram, not outer_t, r4, with_p=False)
        u = _pad_cols(u, r4)
        core = solve.core(u, n).reshape(r4, r3, kh, kw)
        out.append([a_top[:r3].reshape(r3, s, 1, 1), core, u.reshape(t, r4, 1, 1)])
    return out


def _solve_for(w, stats: LayerStats, top: int):
    """``(A, solve)`` up to input rank ``top``: formed, or a larger one taken from the active
    :class:`SolveMemo` for the same statistics and weight; None when Σ_c has no Cholesky factor
    (nothing to weight by)."""
    memo = _MEMO.get()
    kept = memo.solves.get(id(stats)) if memo is not None else None
    if kept is not None:
        _, w0, a0, solve0 = kept
        if a0.shape[0] >= top and w0.shape == w.shape and torch.equal(w0, w):
            return a0, solve0
    chol_c = damped_cholesky(stats.channel.to(w.device), stats.damping)
    if chol_c is None:
        return None
    t, s, kh, kw = w.shape
    w2 = w.transpose(0, 1).reshape(s, t * kh * kw)
    v, _ = left_basis(chol_c.T @ w2, top, with_p=False)
    a_top = unwhiten(_pad_cols(v, top).T, chol_c)  # top × S, A Σ_c Aᵀ = I
    if stats.patch is None:
        solve = _IndependentTaps(w, chol_c, a_top)
    else:  # Σ_p damped like Σ_c (on a copy: the statistics stay as measured)
        sigma_p = stats.patch.to(dtype=w.dtype, device=w.device, copy=True)
        sigma_p.diagonal().add_(stats.damping * sigma_p.diagonal().mean())
        solve = _PatchSolve(w, sigma_p, a_top, kh * kw)
    if memo is not None:  # the statistics are held too, so their id is not reused meanwhile
        memo.solves[id(stats)] = (stats, w, a_top, solve)
    return a_top, solve


class SolveMemo:
    """Chain-fit solves kept across calls (:meth:`active` around them): a later call on the same
    layer statistics and weight asking for input ranks up to a smaller ``top`` takes leading
    blocks of the kept solve, the same factors as a fresh one (up to rounding). Holds each
    layer's solve (for the largest input rank asked) while it lives."""

    def __init__(self):
        self.solves: dict[int, tuple] = {}  # id(stats) -> (stats, weight, A, solve)

    @contextmanager
    def active(self):
        token = _MEMO.set(self)
        try:
            yield self
        finally:
            _MEMO.reset(token)


_MEMO: ContextVar[SolveMemo | None] = ContextVar("lrcompress_chain_solves", default=None)


class _IndependentTaps:
    """Σ_p ≈ Σ_c ⊗ I: Σ_q = I and ``M* = W ×₂ (Σ_c Aᵀ)ᵀ``, whitened by the identity."""

    def __init__(self, w, chol_c, a_top):
        sca = chol_c @ (chol_c.T @ a_top.T)  # (damped Σ_c) Aᵀ, S × top
        self.whitened = torch.einsum("tshw,si->tihw", w, sca).reshape(w.shape[0], -1)

    def core(self, u: torch.Tensor, n: int) -> torch.Tensor:
        """``Uᵀ M*`` for the leading ``n`` columns (``M*`` = its whitened map here)."""
        return u.T @ self.whitened[:, :n]


class _PatchSolve:
    """The measured patch moment: with ``P = A ⊗ I_k`` (rows channel-major like ``F.unfold``),
    ``M* = W Σ_p Pᵀ Σ_q⁻¹`` and ``Σ_q = P Σ_p Pᵀ = L Lᵀ``; the output basis comes from the
    whitened map ``M* L = W Σ_p Pᵀ L⁻ᵀ``. Formed once for the largest r_in, without the
    Kronecker product (k² times fewer operations). A smaller r_in takes the leading ``r_in·k``
    rows of P: ``L`` of that block is the leading block of ``L``, and since ``L⁻ᵀ`` is upper
    triangular, its whitened map is the leading columns of the largest one; its core
    ``Uᵀ M* = (Uᵀ (M* L)) L⁻¹`` is one triangular solve on r_out rows."""

    def __init__(self, w, sigma_p, a_top, k: int):
        s = a_top.shape[1]
        # Σ_p Pᵀ: [(s, τ), (i, τ')] = Σ_s' Σ_p[(s, τ), (s', τ')] A[i, s']
        sp = torch.einsum("pcq,ic->piq", sigma_p.reshape(s * k, s, k), a_top)
        sp = sp.reshape(s * k, -1)
        # P Σ_p Pᵀ: [(i, τ), (j, τ')] = Σ_s A[i, s] (Σ_p Pᵀ)[(s, τ), (j, τ')]
        sigma_q = torch.einsum("ic,cqn->iqn", a_top, sp.reshape(s, k, -1))
        self.cq = torch.linalg.cholesky(sigma_q.reshape(sp.shape[1], -1))
        wsp = w.reshape(w.shape[0], -1) @ sp
        self.whitened = torch.linalg.solve_triangular(self.cq, wsp.T, upper=False).T

    def core(self, u: torch.Tensor, n: int) -> torch.Tensor:
        """``Uᵀ M*`` for the leading ``n`` rows of P."""
        return torch.linalg.solve_triangular(self.cq[:n, :n], u.T @ self.whitened[:, :n],
                                             upper=False, left=False)


class Whitener:
    """The input side of the Σ-norm for a layer's *whole* weight, ``‖(W − Ŵ) L‖_F`` with
    ``L Lᵀ`` the damped second moment of the layer's unfolded input (``C_in·kh·kw``, channel-major
    like ``W.reshape(T, -1)``). When only the channel moment is known, ``L = L_c ⊗ I_k`` (taps
    uncorrelated), applied without forming the Kronecker product.

    ``right(m)``: ``m L`` for ``m`` of shape ``(T, C_in·k)``; ``sample(n, gen)``: ``n`` vectors
    ``L g`` with ``g ~ N(0, I)``, rows of shape ``(C_in·k)``, so ``E‖A L g‖² = ‖A L‖²_F``."""

    def __init__(self, chol: torch.Tensor, taps: int):
        self.chol, self.taps = chol, taps  # taps = 1: chol is the full patch factor

    def to(self, dtype: torch.dtype, device) -> Whitener:
        return Whitener(self.chol.to(dtype=dtype, device=device), self.taps)

    def right(self, m: torch.Tensor) -> torch.Tensor:
        chol = self.chol.to(dtype=m.dtype, device=m.device)
        if self.taps == 1:
            return m @ chol
        t = m.shape[0]
        return torch.einsum("tck,cd->tdk", m.reshape(t, -1, self.taps), chol).reshape(t, -1)

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        chol = self.chol  # g drawn on the CPU (where ``gen`` lives), then moved
        g = torch.randn(n, chol.shape[0] * self.taps, generator=gen).to(chol)
        if self.taps == 1:
            return g @ chol.T
        return torch.einsum("cd,ndk->nck", chol, g.reshape(n, -1, self.taps)).reshape(n, -1)


def whitener(stats: LayerStats | None, spec) -> Whitener | None:
    """The :class:`Whitener` of the layer ``spec`` (a LayerSpec) from its statistics: the patch
    moment when measured, else the channel moment of a k×k conv; None when they cannot weight
    anything."""
    if stats is None:
        return None
    taps = spec.kernel[0] * spec.kernel[1]  # (1, 1) for linear layers
    chol = None if stats.patch is None else damped_cholesky(stats.patch, stats.damping)
    if chol is not None:
        return Whitener(chol, 1)
    if taps > 1 and stats.channel is not None:
        chol = damped_cholesky(stats.channel, stats.damping)
        return None if chol is None else Whitener(chol, taps)
    return None


def corrected_weight(w: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """The weight to fit when the layer's input is p̃ (the already-compressed layers' output)
    but its output should stay the original's W p: ``W* = W (C + λI)(Σ̃ + λI)⁻¹`` with
    ``C = E[p p̃ᵀ]``, ``Σ̃ = E[p̃ p̃ᵀ]``. Then ``‖(W* − Ŵ)(Σ̃ + λI)^½‖²`` equals
    ``E‖W p − Ŵ p̃‖² + λ‖W − Ŵ‖²`` up to a constant: the usual activation fit of ``W*`` solves
    the sequential problem, regularised toward W (so ``p̃ = p`` gives ``W* = W`` exactly)."""
    if stats.cross is None or stats.patch is None:
        return w
    sig = stats.patch.to(dtype=torch.float64, device=w.device)
    lam = stats.damping * sig.diagonal().mean()
    if not torch.isfinite(lam) or lam <= 0:
        return w
    eye = torch.eye(sig.shape[0], dtype=sig.dtype, device=sig.device)
    m = w.reshape(w.shape[0], -1).to(torch.float64)
    rhs = m @ (stats.cross.to(sig) + lam * eye)
    chol, info = torch.linalg.cholesky_ex(sig + lam * eye)
    if int(info) != 0:
        return w
    return torch.cholesky_solve(rhs.T, chol).T.reshape(w.shape).to(w.dtype)


def refit_output_factor(w: torch.Tensor, m: torch.Tensor, stats: LayerStats,
                        ridge: float = 1e-10) -> torch.Tensor | None:
    """``A`` minimising ``‖(W − A M) L‖_F`` (Σ = L Lᵀ the damped patch second moment): the
    output factor of a chain whose other factors map a patch to ``M p`` (``r × C_in·kh·kw``),
    refitted by least squares on the inputs, ``A = W Σ Mᵀ (M Σ Mᵀ)⁻¹``. Any ``A`` is feasible,
    the weight fit's too, so the output error never grows. None without the patch moment."""
    chol = None if stats.patch is None else damped_cholesky(stats.patch.to(w.device),
                                                            stats.damping)
    if chol is None:
        return None
    wl, ml = w.reshape(w.shape[0], -1) @ chol, m @ chol
    gram = ml @ ml.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    gram = gram + ridge * gram.diagonal().mean().clamp_min(1e-300) * eye
    return torch.linalg.solve(gram, ml @ wl.T).T
