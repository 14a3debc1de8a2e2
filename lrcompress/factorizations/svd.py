"""Matrix (SVD) factorization, channel-wise matricization for k×k convs (methods.md §1.1).

``W_(1) ∈ R^{T × S·kh·kw} ≈ (U_r Σ_r^½)(Σ_r^½ V_rᵀ)``, the balanced split of Khodak et al. and of
RENE's linear layers; the channel-wise matricization is LoRITa's (``view(out, -1)``) and Yang et
al.'s ``decompose_type='channel'``. Chain: kh×kw conv S→r (stride, padding, dilation), then 1×1
conv r→T (+bias). Params ``r(S·kh·kw + T)``, MACs ``H'W'·r(S·kh·kw + T)``. Max rank
``min(T, S·kh·kw)``, where the chain is exact.

Linear layers and 1×1 convs take the base class's matrix path (the same split). Grouped convs are
not factorized in v1 (``unsupported_reason()`` says so), depthwise convs never.
"""

from __future__ import annotations

from lrcompress.factorizations._activation import damped_cholesky, whitened_splits
from lrcompress.factorizations._base import (
    Factorization,
    balanced_split,
    conv,
    khw,
    left_basis,
    register,
)


@register
class SVD(Factorization):
    name = "svd"

    def _conv_max_rank(self, spec):
        return min(spec.out_ch, spec.in_ch * khw(spec))

    def _conv_params(self, spec, r):
        return r * (spec.in_ch * khw(spec) + spec.out_ch)

    def _conv_macs(self, spec, r):
        return spec.out_positions * r * (spec.in_ch * khw(spec) + spec.out_ch)

    def _conv_layers(self, spec, r):
        return [
            conv(spec.in_ch, r, spec.kernel, spec.stride, spec.padding, spec.dilation),
            conv(r, spec.out_ch, bias=spec.bias),
        ]

    def _conv_decompose_many(self, w, spec, ranks, opts):
        t, s = spec.out_ch, spec.in_ch
        u, p = left_basis(w.reshape(t, -1), max(ranks))  # one eigh serves every rank
        out = []
        for r in ranks:
            a, b = balanced_split(u, p, r)
            out.append([b.reshape(r, s, *spec.kernel), a.reshape(t, r, 1, 1)])
        return out

    def _conv_fit_moments(self, spec):
        return ("patch",)  # the unfolded weight, whitened by the patch moment

    def _conv_activation_many(self, w, spec, ranks, opts, stats):
        """Whitened SVD of the unfolded weight with the patch second moment (C_in·kh·kw)²."""
        if stats.patch is None or (chol := damped_cholesky(stats.patch, stats.damping)) is None:
            return None
        t, s = spec.out_ch, spec.in_ch
        pairs = whitened_splits(w.reshape(t, -1), chol.to(w.device), ranks)
        return [[b.reshape(r, s, *spec.kernel), a.reshape(t, r, 1, 1)]
                for r, (a, b) in zip(ranks, pairs)]

    def _conv_reconstruct(self, factors, spec):
        b, a = factors
        return (a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)).reshape(spec.weight_shape)
