"""Tucker-2 factorization of k×k convs (Kim et al., ICLR 2016; ELRT's format; methods.md §1.3).

``W ≈ G ×₁ U_out ×₂ U_in`` with ``U_out ∈ R^{T×R4}``, ``U_in ∈ R^{S×R3}``, ``G ∈ R^{R4×R3×kh×kw}``.
Chain: 1×1 conv S→R3 (``U_inᵀ``), kh×kw conv R3→R4 (``G``; stride, padding, dilation), 1×1 conv
R4→T (``U_out`` + bias). Params ``S·R3 + kh·kw·R3·R4 + R4·T``; MACs
``H·W·S·R3 + H'W'·kh·kw·R3·R4 + H'W'·R4·T``.

Fitting: HOSVD (leading left singular vectors of the mode-1 and mode-2 unfoldings), then
optionally ``hooi_iters`` HOOI sweeps by tensorly's ``partial_tucker`` (Kim et al. initialise with
HOSVD/ALS and fine-tune end to end). The HOSVD bases are computed once per layer and shared by
every rank in :meth:`decompose_many` (``impl="tensorly"`` runs ``partial_tucker`` from scratch for
each rank instead: the reference the tests compare against).

Ranks: an int r means ``(R4, R3) = (min(r, T), min(r, S))``; a tuple ``(R4, R3)`` is taken as is.
Both are then clipped to what a Tucker-2 of this shape can use, ``R4 ≤ min(T, R3·kh·kw)`` and
``R3 ≤ min(S, R4·kh·kw)`` (beyond that the core's unfolding is rank-deficient). Max rank
``(min(T, S·kh·kw), min(S, T·kh·kw))`` — ``(T, S)`` for any usual layer — where the chain is exact.
"""

from __future__ import annotations

import torch

from lrcompress.factorizations._activation import chain_fit
from lrcompress.factorizations._base import (
    Factorization,
    as_int_tuple,
    conv,
    in_positions,
    is_int,
    khw,
    left_basis,
    norm_int_rank,
    register,
    tensorly_context,
)


def _hosvd_bases(w: torch.Tensor, ranks) -> tuple[torch.Tensor, torch.Tensor]:
    """The HOSVD bases shared by every ``(r4, r3)``: the mode-1 (T × S·k) and mode-2 (S × T·k)
    unfoldings' left singular vectors, up to the largest ranks."""
    u_out, _ = left_basis(w.reshape(w.shape[0], -1), max(r[0] for r in ranks), with_p=False)
    u_in, _ = left_basis(w.transpose(0, 1).reshape(w.shape[1], -1), max(r[1] for r in ranks),
                         with_p=False)
    return u_out, u_in


def _clip_pair(spec, r4: int, r3: int) -> tuple[int, int]:
    k = khw(spec)
    r4 = max(1, min(r4, spec.out_ch))
    r3 = max(1, min(r3, spec.in_ch))
    r4 = min(r4, r3 * k)
    r3 = min(r3, r4 * k)
    return r4, r3


@register
class Tucker2(Factorization):
    name = "tucker2"
    options = {"hooi_iters": 0, "impl": "torch"}

    def _conv_max_rank(self, spec):
        return _clip_pair(spec, spec.out_ch, spec.in_ch)

    def _conv_rank_from(self, spec, rank):
        tup = as_int_tuple(rank, 2, self.name)
        if tup is not None:
            return _clip_pair(spec, *tup)
        if is_int(rank):
            return _clip_pair(spec, int(rank), int(rank))
        # A fraction applies to each mode's own size.
        return _clip_pair(spec, norm_int_rank(rank, spec.out_ch, self.name),
                          norm_int_rank(rank, spec.in_ch, self.name))

    def _conv_params(self, spec, rank):
        r4, r3 = rank
        return spec.in_ch * r3 + khw(spec) * r3 * r4 + r4 * spec.out_ch

    def _conv_macs(self, spec, rank):
        r4, r3 = rank
        return (in_positions(spec) * spec.in_ch * r3
                + spec.out_positions * (khw(spec) * r3 * r4 + r4 * spec.out_ch))

    def _conv_layers(self, spec, rank):
        r4, r3 = rank
        return [
            conv(spec.in_ch, r3),
            conv(r3, r4, spec.kernel, spec.stride, spec.padding, spec.dilation),
            conv(r4, spec.out_ch, bias=spec.bias),
        ]

    def _conv_decompose_many(self, w, spec, ranks, opts):
        iters = opts["hooi_iters"]
        if not is_int(iters) or iters < 0:
            raise ValueError(f"tucker2: hooi_iters must be an int >= 0, got {iters!r}.")
        impl = opts["impl"]
        if impl == "tensorly":
            return [self._tensorly(w, r, iters) for r in ranks]
        if impl != "torch":
            raise ValueError(f"tucker2: impl must be 'torch' or 'tensorly', got {impl!r}.")
        u_out, u_in = _hosvd_bases(w, ranks)
        out = []
        for r4, r3 in ranks:
            uo, ui = u_out[:, :r4], u_in[:, :r3]
            core = torch.einsum("tshw,to,si->oihw", w, uo, ui)
            if iters:
                core, (uo, ui) = self._hooi(w, core, uo, ui, iters)
            out.append(self._chain(core, uo, ui))
        return out

    def _conv_fit_moments(self, spec):
        # the first factor from the channel moment, the core refit from the patch moment
        return ("channel", "patch")

    def _conv_kept_energy(self, w, spec, ranks, opts):
        """HOSVD projects W on both bases, so ``‖Ŵ‖² = ‖core‖²``, and ``core(r4, r3)`` is the
        leading block of the core at the largest ranks: prefix sums of its squared entries give
        every pair (HOOI sweeps or tensorly: None, reconstruct)."""
        if opts["hooi_iters"] != 0 or opts["impl"] != "torch":
            return None
        u_out, u_in = _hosvd_bases(w, ranks)
        energy = torch.einsum("tshw,to,si->oihw", w, u_out, u_in).square().sum(dim=(2, 3))
        cum = torch.nn.functional.pad(energy.cumsum(0).cumsum(1), (1, 0, 1, 0))
        return [float(cum[min(r4, cum.shape[0] - 1), min(r3, cum.shape[1] - 1)])
                for r4, r3 in ranks]

    def _conv_activation_many(self, w, spec, ranks, opts, stats):
        """Input factor from the channel second moment, core and output factor by the
        reduced-rank regression of :func:`~lrcompress.factorizations._activation.chain_fit`
        (``hooi_iters`` and ``impl`` do not apply)."""
        return chain_fit(w, ranks, stats)

    @staticmethod
    def _chain(core, u_out, u_in):
        r4, r3 = core.shape[:2]
        return [u_in.T.reshape(r3, -1, 1, 1), core, u_out.reshape(-1, r4, 1, 1)]

    @staticmethod
    def _hooi(w, core, u_out, u_in, iters):
        from tensorly.decomposition import partial_tucker

        with tensorly_context():
            (core, (u_out, u_in)), _ = partial_tucker(
                w, rank=[u_out.shape[1], u_in.shape[1]], modes=[0, 1], n_iter_max=iters,
                init=(core, [u_out, u_in]), tol=0,
            )
        return core, (u_out, u_in)

    def _tensorly(self, w, rank, iters):
        from tensorly.decomposition import partial_tucker

        with tensorly_context():
            (core, (u_out, u_in)), _ = partial_tucker(
                w, rank=list(rank), modes=[0, 1], n_iter_max=iters, init="svd", tol=0
            )
        return self._chain(core, u_out, u_in)

    def _conv_reconstruct(self, factors, spec):
        first, core, last = factors
        return torch.einsum("to,oihw,is->tshw", last[:, :, 0, 0], core, first[:, :, 0, 0])
