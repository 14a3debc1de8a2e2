"""Tensor-train factorization of k×k convs, RENE's 3-core form (methods.md §1.4).

RENE (arXiv 2409.03555, Eq. (1) and (3); code ``rene/decomposition/tt.py``) views the kernel as
``T̃ ∈ R^{T×(kh·kw)×S}``, ``T̃[t, i·kw+j, s] = W[t, s, i, j]``, and fits three TT cores by TT-SVD
(two sequential truncated SVDs):

    T̃[t, k, s] = Σ_{r1, r2} G_t[t, r1] G_y[r1, k, r2] G_s[r2, s]

Chain: 1×1 conv S→r2 (``G_s``), kh×kw conv r2→r1 (``G_y``; stride, padding, dilation), 1×1 conv
r1→T (``G_t`` + bias). Params ``T·r1 + kh·kw·r1·r2 + r2·S``; MACs
``H·W·S·r2 + H'W'·kh·kw·r1·r2 + H'W'·r1·T``. Structurally a Tucker-2 chain; only the fit differs.

Ranks: RENE ties ``r1 = r2 = r`` ("we assume that the two TT ranks are equal"): an int is the tied
rank, max ``min(T, S)``. A tuple ``(r1, r2)`` is untied, clipped to the TT feasibility bounds
``r1 ≤ min(T, S·kh·kw)``, ``r2 ≤ min(S, r1·kh·kw)``.

The first SVD (of the T × kh·kw·S unfolding) is shared by every rank in :meth:`decompose_many`;
``impl="tensorly"`` runs tensorly's ``tensor_train`` per rank instead (the reference in the tests).
"""

from __future__ import annotations

import torch

from lrcompress.factorizations._activation import chain_fit
from lrcompress.factorizations._base import (
    Factorization,
    as_int_tuple,
    conv,
    in_positions,
    khw,
    left_basis,
    norm_int_rank,
    register,
    tensorly_context,
)
from lrcompress.factorizations._linalg import basis_from_gram, gram_top_energy, prefix_grams


def _ranks(rank) -> tuple[int, int]:
    return (rank, rank) if isinstance(rank, int) else tuple(rank)


def _unfold(w: torch.Tensor, spec) -> torch.Tensor:
    """``T̃[t, i·kw+j, s] = W[t, s, i, j]``: the (T, k, S) tensor TT-SVD splits."""
    return w.permute(0, 2, 3, 1).reshape(spec.out_ch, -1, spec.in_ch)


def _first_split(w: torch.Tensor, spec, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """TT-SVD's first step, shared by every rank pair: ``(U₁, P₁)`` of the T × (k·S)
    unfolding, up to the largest r1."""
    return left_basis(_unfold(w, spec).reshape(spec.out_ch, -1), max(r1 for r1, _ in pairs))


def _second_grams(p1: torch.Tensor, s: int, k: int, pairs):
    """The second split's matrix for every r1 is the leading ``r1·k`` rows of ``P₁`` as
    ``(r1max·k) × S``: that matrix and the Gram matrices of every r1's rows (shared work)."""
    m2 = p1.reshape(-1, s)
    return m2, prefix_grams(m2, [r1 * k for r1, _ in pairs])


@register
class TT(Factorization):
    name = "tt"
    options = {"impl": "torch"}

    def _conv_max_rank(self, spec):
        return min(spec.out_ch, spec.in_ch)

    def _conv_rank_from(self, spec, rank):
        tup = as_int_tuple(rank, 2, self.name)
        if tup is None:
            return norm_int_rank(rank, self._conv_max_rank(spec), self.name)
        r1 = max(1, min(tup[0], spec.out_ch, spec.in_ch * khw(spec)))
        r2 = max(1, min(tup[1], spec.in_ch, r1 * khw(spec)))
        return (r1, r2)

    def _conv_params(self, spec, rank):
        r1, r2 = _ranks(rank)
        return spec.out_ch * r1 + khw(spec) * r1 * r2 + r2 * spec.in_ch

    def _conv_macs(self, spec, rank):
        r1, r2 = _ranks(rank)
        return (in_positions(spec) * spec.in_ch * r2
                + spec.out_positions * (khw(spec) * r1 * r2 + r1 * spec.out_ch))

    def _conv_layers(self, spec, rank):
        r1, r2 = _ranks(rank)
        return [
            conv(spec.in_ch, r2),
            conv(r2, r1, spec.kernel, spec.stride, spec.padding, spec.dilation),
            conv(r1, spec.out_ch, bias=spec.bias),
        ]

    def _conv_decompose_many(self, w, spec, ranks, opts):
        t, s = spec.out_ch, spec.in_ch
        kh, kw = spec.kernel
        k = kh * kw
        impl = opts["impl"]
        if impl == "tensorly":
            return [self._tensorly(_unfold(w, spec), spec, *_ranks(r)) for r in ranks]
        if impl != "torch":
            raise ValueError(f"tt: impl must be 'torch' or 'tensorly', got {impl!r}.")
        pairs = [_ranks(r) for r in ranks]
        u1, p1 = _first_split(w, spec, pairs)
        m2, grams = _second_grams(p1, s, k, pairs)
        second: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        out = []
        for r1, r2 in pairs:
            if r1 not in second:
                top = max(b for a, b in pairs if a == r1)
                second[r1] = basis_from_gram(m2[:r1 * k], *grams[r1 * k], top)
            u2, p2 = second[r1]
            g_y = u2[:, :r2].reshape(r1, kh, kw, r2).permute(0, 3, 1, 2)
            out.append([p2[:r2].reshape(r2, s, 1, 1), g_y, u1[:, :r1].reshape(t, r1, 1, 1)])
        return out

    def _conv_fit_moments(self, spec):
        # the first factor from the channel moment, the core refit from the patch moment
        return ("channel", "patch")

    def _conv_kept_energy(self, w, spec, ranks, opts):
        """TT-SVD projects twice: ``W → U₁U₁ᵀW`` (rank r1), then the core ``P₁[:r1]`` onto its
        top r2 right-hand components, so ``‖Ŵ‖² = Σ_{j<r2} σ_j²(P₁[:r1] as (r1·k) × S)``."""
        if opts["impl"] != "torch":
            return None
        s = spec.in_ch
        k = spec.kernel[0] * spec.kernel[1]
        pairs = [_ranks(r) for r in ranks]
        _, p1 = _first_split(w, spec, pairs)
        _, grams = _second_grams(p1, s, k, pairs)
        by_r1: dict[int, list[int]] = {}
        for r1, r2 in pairs:
            by_r1.setdefault(r1, []).append(r2)
        kept = {(r1, r2): e for r1, r2s in by_r1.items()
                for r2, e in zip(r2s, gram_top_energy(grams[r1 * k][0], r2s))}
        return [kept[pair] for pair in pairs]

    def _conv_activation_many(self, w, spec, ranks, opts, stats):
        """The chain is a Tucker-2 chain with (R4, R3) = (r1, r2): the same activation-aware fit
        (:func:`~lrcompress.factorizations._activation.chain_fit`), not TT-SVD."""
        return chain_fit(w, [_ranks(r) for r in ranks], stats)

    @staticmethod
    def _tensorly(tensor, spec, r1, r2):
        from tensorly.decomposition import tensor_train

        t, k, s = tensor.shape
        with tensorly_context():
            g_t, g_y, g_s = tensor_train(tensor, rank=[1, r1, r2, 1]).factors
        g_y = g_y.reshape(r1, *spec.kernel, r2).permute(0, 3, 1, 2)
        return [g_s.reshape(r2, s, 1, 1), g_y, g_t.reshape(t, r1, 1, 1)]

    def _conv_reconstruct(self, factors, spec):
        first, core, last = factors
        return torch.einsum("ta,abhw,bs->tshw", last[:, :, 0, 0], core, first[:, :, 0, 0])
