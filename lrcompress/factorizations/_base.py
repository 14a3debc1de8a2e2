"""Shared machinery of the layer factorizations: base class, registry and linear algebra.

Every method turns one ``nn.Conv2d`` / ``nn.Linear`` (described by a :class:`LayerSpec`) into an
``nn.Sequential`` of standard conv/linear layers. The *factors* of a decomposition are exactly the
weight tensors of that chain, in module order, so a built chain and a decomposition are
interchangeable (:func:`chain_factors`).

Linear layers and 1×1 convs are matrices: every method factorizes them by the balanced SVD split
``W ≈ (U Σ^½)(Σ^½ Vᵀ)`` (methods.md §1.1). That path lives here; subclasses only implement the
k×k conv case through the ``_conv_*`` hooks.

Numerics: decompositions run in float64 on the weight's device and the factors are cast back to the
weight's dtype and device. Results are deterministic (fixed sign convention, seeded completion).

On CPU the decomposition math runs with one thread (:func:`single_threaded`, scoped and restored).
Measured on the shared 2-core machines while another process held a core: MKL's 2-thread ``eigh``
of a 512×512 Gram took 7 s against 0.03 s single-threaded, ``svd`` of 512×4608 14 s against 0.65 s,
and CP-ALS of a 512×512×3×3 conv at rank 256 22 s against 4.3 s (OpenMP barriers wait on a
descheduled thread). Uncontended, two threads would at best halve the matrix products.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ClassVar

import torch
from torch import nn

from lrcompress.errors import UserError
from lrcompress.factorizations._activation import corrected_weight
from lrcompress.factorizations._linalg import balanced_split, left_basis, top_energy
from lrcompress.model.layers import LayerSpec

Rank = int | tuple[int, ...]

FACTORIZATIONS: dict[str, Factorization] = {}
ALIASES = {"tucker": "tucker2"}


class DecompositionError(UserError):
    """A decomposition that failed numerically (e.g. CP-ALS diverged even after its retries); the
    message names the layer, the rank and what to do, so the caller can record it as the layer's
    skip reason, and the CLI answers it with exit code 2."""


_NOTES: ContextVar[list | None] = ContextVar("lrcompress_decomposition_notes", default=None)


@contextmanager
def collect_notes():
    """Collects what decompositions inside the block report through :func:`note` (e.g. CP-ALS
    retries), as a list of dicts."""
    notes: list[dict] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def note(**info) -> None:
    """Report something about the running decomposition to the enclosing :func:`collect_notes`."""
    notes = _NOTES.get()
    if notes is not None:
        notes.append(info)


def register(cls):
    """Class decorator: instantiate a :class:`Factorization` subclass and register it by name."""
    if not cls.name or cls.name in FACTORIZATIONS:
        raise ValueError(f"factorization name {cls.name!r} is empty or already registered")
    FACTORIZATIONS[cls.name] = cls()
    return cls


# ---------------------------------------------------------------------------------------------
# numerics helpers
# ---------------------------------------------------------------------------------------------


@contextmanager
def single_threaded(device: torch.device):
    """Run CPU decomposition math with one torch thread (see the module docstring for why)."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextmanager
def tensorly_context():
    """tensorly's pytorch backend, scoped to this thread and block (never set globally)."""
    import tensorly as tl

    with tl.backend_context("pytorch", local_threadsafe=True):
        yield tl


def work_tensor(weight: torch.Tensor) -> torch.Tensor:
    """A float64 copy of the weight on its own device, detached (the math never needs autograd)."""
    return weight.detach().to(dtype=torch.float64, copy=True)


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``‖W − Ŵ‖_F / ‖W‖_F`` in float64 (0 for an exactly reproduced zero weight, inf for any
    other approximation of a zero weight). The one definition of the error the reports, the
    rank signals and the CP checks use."""
    w = weight.detach().to(torch.float64)
    a = approx.detach().to(device=w.device, dtype=torch.float64)
    num = (w - a).norm().item()
    den = w.norm().item()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


# ---------------------------------------------------------------------------------------------
# rank helpers
# ---------------------------------------------------------------------------------------------


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def norm_int_rank(rank, max_rank: int, what: str) -> int:
    """int -> clipped to [1, max]; float in (0, 1] -> that fraction of max (rounded, >= 1)."""
    if is_int(rank):
        return max(1, min(int(rank), max_rank))
    if isinstance(rank, numbers.Real) and not isinstance(rank, bool):
        f = float(rank)
        if not 0.0 < f <= 1.0:
            raise ValueError(
                f"{what}: a float rank is a fraction of the maximum rank and must be in (0, 1], "
                f"got {rank!r}; pass an int for an absolute rank."
            )
        return max(1, min(max_rank, math.floor(f * max_rank + 0.5)))
    raise ValueError(
        f"{what}: rank must be an int or a float fraction in (0, 1], got {rank!r} "
        f"({type(rank).__name__})."
    )


def as_int_tuple(rank, length: int, what: str) -> tuple[int, ...] | None:
    """A tuple/list rank as a tuple of ints of the given length; None when ``rank`` is a scalar."""
    if not isinstance(rank, (tuple, list)):
        return None
    if len(rank) != length or not all(is_int(x) for x in rank):
        raise ValueError(f"{what}: a tuple rank must be {length} ints, got {rank!r}.")
    return tuple(int(x) for x in rank)


def is_matrix(spec: LayerSpec) -> bool:
    """Linear layers and 1×1 convs: every method reduces to the SVD split."""
    return spec.kind == "linear" or tuple(spec.kernel) == (1, 1)


# ---------------------------------------------------------------------------------------------
# module construction
# ---------------------------------------------------------------------------------------------


def conv(in_ch, out_ch, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1),
         groups=1, bias=False) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, tuple(kernel), stride=tuple(stride), padding=tuple(padding),
                     dilation=tuple(dilation), groups=groups, bias=bias, device="meta")


def _build(layers: list[nn.Module], dtype, device) -> nn.Sequential:
    """Modules are created on the meta device, so no time is spent on a random init that would be
    overwritten; ``to_empty`` then allocates uninitialised storage."""
    seq = nn.Sequential(*layers).to(dtype=dtype)
    return seq.to_empty(device=device if device is not None else "cpu")


def chain_factors(seq: nn.Module) -> list[torch.Tensor]:
    """The chain's weight tensors in module order: the factors :meth:`Factorization.reconstruct`
    takes (the parameters themselves, so the reconstruction is differentiable)."""
    return [m.weight for m in seq.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ---------------------------------------------------------------------------------------------
# the base class
# ---------------------------------------------------------------------------------------------


class Factorization:
    """One low-rank factorization method. Subclasses set ``name``/``options`` and implement the
    k×k conv case through the ``_conv_*`` hooks; the matrix case (linear, 1×1) is handled here."""

    name: ClassVar[str] = ""
    # Options ``decompose`` accepts, with their defaults (anything else is a ValueError).
    options: ClassVar[dict[str, object]] = {}

    def __repr__(self) -> str:
        return f"<Factorization {self.name!r}>"

    # -- eligibility and ranks --------------------------------------------------------------

    def unsupported_reason(self, spec: LayerSpec) -> str:
        """"" when this method can factorize the layer, else a short reason."""
        if spec.unsupported:
            return spec.unsupported
        if spec.kind not in ("conv2d", "linear"):
            return f"layer kind {spec.kind!r} is not conv2d or linear"
        if spec.is_depthwise:
            return "depthwise conv (nothing to factorize)"
        if spec.groups > 1:
            return f"grouped conv (groups={spec.groups}): not factorized in v1"
        if is_matrix(spec):
            return ""
        return self._conv_unsupported_reason(spec)

    def max_rank(self, spec: LayerSpec) -> Rank:
        """Largest meaningful rank (full rank where the method is exact there)."""
        if is_matrix(spec):
            return min(spec.in_ch, spec.out_ch)
        return self._conv_max_rank(spec)

    def rank_from(self, spec: LayerSpec, rank) -> Rank:
        """Normalise a user rank: int, tuple, or float fraction in (0, 1] of the max rank; clipped
        to [1, max]. ValueError on anything else."""
        if is_matrix(spec):
            # A tuple (Tucker's (R4, R3), TT's (r1, r2)) of a matrix has effective rank min(...).
            if isinstance(rank, (tuple, list)):
                if not rank or not all(is_int(x) for x in rank):
                    raise ValueError(f"{self.name}: a tuple rank must be ints, got {rank!r}.")
                rank = min(int(x) for x in rank)
            return norm_int_rank(rank, self.max_rank(spec), self.name)
        return self._conv_rank_from(spec, rank)

    def scalar_rank(self, rank: Rank) -> int:
        """One number for reports and searches: the rank itself, or the largest tuple entry."""
        if isinstance(rank, (tuple, list)):
            return int(max(rank))
        return int(rank)

    # -- costs --------------------------------------------------------------------------------

    def params(self, spec: LayerSpec, rank) -> int:
        """Weights + bias of the built chain."""
        r = self.rank_from(spec, rank)
        bias = spec.out_ch if spec.bias else 0
        if is_matrix(spec):
            return r * (spec.in_ch + spec.out_ch) + bias
        return self._conv_params(spec, r) + bias

    def macs(self, spec: LayerSpec, rank) -> int:
        """MACs per sample of the built chain (costs.dense_macs convention: no biases)."""
        r = self.rank_from(spec, rank)
        if is_matrix(spec):
            pos = spec.tokens if spec.kind == "linear" else spec.out_positions
            return pos * r * (spec.in_ch + spec.out_ch)
        return self._conv_macs(spec, r)

    # -- modules ------------------------------------------------------------------------------

    def skeleton(self, spec: LayerSpec, rank, dtype=torch.float32, device=None) -> nn.Sequential:
        """The chain with the right shapes and uninitialised weights (for loading a state_dict)."""
        self._require_support(spec)
        r = self.rank_from(spec, rank)
        if spec.kind == "linear":
            layers = [nn.Linear(spec.in_ch, r, bias=False, device="meta"),
                      nn.Linear(r, spec.out_ch, bias=spec.bias, device="meta")]
        elif is_matrix(spec):
            layers = [conv(spec.in_ch, r, (1, 1), spec.stride, spec.padding, spec.dilation),
                      conv(r, spec.out_ch, bias=spec.bias)]
        else:
            layers = self._conv_layers(spec, r)
        return _build(layers, dtype, device)

    def load_(self, seq: nn.Sequential, factors, bias) -> None:
        """Copy the factors (and the original bias, into the last layer) into a chain, in place."""
        mods = [m for m in seq.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        if len(mods) != len(factors):
            raise ValueError(
                f"{self.name}: {len(factors)} factors for a chain of {len(mods)} layers."
            )
        last = mods[-1]
        if (bias is None) != (last.bias is None):
            have = "no bias" if bias is None else "a bias"
            want = "has no bias" if last.bias is None else "has a bias"
            raise ValueError(f"{self.name}: got {have} but the chain's last layer {want}.")
        with torch.no_grad():
            for i, (m, f) in enumerate(zip(mods, factors)):
                if tuple(m.weight.shape) != tuple(f.shape):
                    raise ValueError(
                        f"{self.name}: factor {i} has shape {tuple(f.shape)}, layer {i} of the "
                        f"chain expects {tuple(m.weight.shape)}."
                    )
                m.weight.copy_(f)
            if bias is not None:
                last.bias.copy_(bias)

    def from_weight(self, weight, bias, spec: LayerSpec, rank, stats=None,
                    **opts) -> nn.Sequential:
        """Skeleton + decompose + load: the factorized replacement of one layer."""
        seq = self.skeleton(spec, rank, dtype=weight.dtype, device=weight.device)
        self.load_(seq, self.decompose(weight, spec, rank, stats=stats, **opts), bias)
        return seq

    # -- decomposition ------------------------------------------------------------------------

    def decompose(self, weight: torch.Tensor, spec: LayerSpec, rank, stats=None,
                  **opts) -> list[torch.Tensor]:
        """The chain's weight tensors (module order, no bias) in ``weight``'s dtype and device.

        ``stats`` (a :class:`~lrcompress.factorizations._activation.LayerStats` of the layer's
        inputs) asks for the activation-aware fit (min output error on those inputs) where the
        method has one and the statistics allow it; otherwise the weight fit is used. Which one
        was used is reported through :func:`note` as ``fit=...``."""
        return self.decompose_many(weight, spec, [rank], stats=stats, **opts)[0]

    def decompose_many(self, weight, spec: LayerSpec, ranks, stats=None,
                       **opts) -> list[list[torch.Tensor]]:
        """:meth:`decompose` for several ranks, sharing the expensive work (one SVD, ...)."""
        self._require_support(spec)
        opts = self._check_opts(opts)
        if tuple(weight.shape) != tuple(spec.weight_shape):
            raise ValueError(
                f"{self.name}: weight of {spec.name!r} has shape {tuple(weight.shape)}, "
                f"the spec says {tuple(spec.weight_shape)}."
            )
        rs = [self.rank_from(spec, r) for r in ranks]
        w = work_tensor(weight)
        with single_threaded(w.device):
            out = None
            if stats is not None:
                w = corrected_weight(w, stats)
                out = (self._matrix_activation_many(w, spec, rs, stats) if is_matrix(spec)
                       else self._conv_activation_many(w, spec, rs, opts, stats))
                note(fit="weight" if out is None else "activation")
            if out is None and is_matrix(spec):
                out = self._matrix_decompose_many(w, spec, rs)
            elif out is None:
                out = self._conv_decompose_many(w, spec, rs, opts)
        return [[f.to(dtype=weight.dtype, device=weight.device).contiguous() for f in fs]
                for fs in out]

    def fit_moments(self, spec: LayerSpec) -> tuple[str, ...]:
        """The second moments of the layer's input that this method's activation fit of ``spec``
        uses, a subset of ``("channel", "patch")`` in that order (``LayerStats`` fields): the
        patch moment for every matrix fit (linear, 1×1 conv); for a k×k conv what the method
        declares (empty: no activation fit, the weight fit is used)."""
        return ("patch",) if is_matrix(spec) else self._conv_fit_moments(spec)

    def weight_errors(self, weight, spec: LayerSpec, ranks, **opts) -> list[float]:
        """``‖W − Ŵ(r)‖_F / ‖W‖_F`` of the weight fit at each rank (:func:`relative_error` of
        :meth:`decompose` and :meth:`reconstruct`). Where the fit is a truncated SVD (a matrix)
        or a chain of them (TT-SVD), the error follows from singular values alone and no factor
        is formed (``_conv_kept_energy``); the numbers are the same up to rounding."""
        self._require_support(spec)
        opts = self._check_opts(opts)
        rs = [self.rank_from(spec, r) for r in ranks]
        w = work_tensor(weight)
        with single_threaded(w.device):
            norm2 = float(w.square().sum())
            if is_matrix(spec):
                kept = top_energy(w.reshape(spec.out_ch, spec.in_ch), rs)
            else:
                kept = self._conv_kept_energy(w, spec, rs, opts)
        if kept is None:
            return [relative_error(w, self.reconstruct(fs, spec))
                    for fs in self.decompose_many(w, spec, rs, **opts)]
        if norm2 == 0:
            return [0.0] * len(rs)
        return [max(norm2 - k, 0.0) ** 0.5 / norm2 ** 0.5 for k in kept]

    def reconstruct(self, factors, spec: LayerSpec) -> torch.Tensor:
        """The dense weight (``spec.weight_shape``) the factors represent; differentiable."""
        if is_matrix(spec):
            b, a = factors
            w = a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)
            return w.reshape(spec.weight_shape)
        return self._conv_reconstruct(factors, spec)

    # -- shared internals -----------------------------------------------------------------------

    def _require_support(self, spec: LayerSpec) -> None:
        why = self.unsupported_reason(spec)
        if why:
            raise ValueError(f"{self.name} cannot factorize {spec.name!r}: {why}")

    def _check_opts(self, opts: dict) -> dict:
        bad = sorted(set(opts) - set(self.options))
        if bad:
            valid = ", ".join(sorted(self.options)) or "none"
            raise ValueError(f"{self.name}: unknown option(s) {bad}; valid options: {valid}.")
        return {**self.options, **opts}

    def _matrix_decompose_many(self, w, spec, ranks):
        m = w.reshape(spec.out_ch, spec.in_ch)
        u, p = left_basis(m, max(ranks))
        out = []
        for r in ranks:
            a, b = balanced_split(u, p, r)
            if spec.kind == "conv2d":
                b, a = b.reshape(r, spec.in_ch, 1, 1), a.reshape(spec.out_ch, r, 1, 1)
            out.append([b, a])
        return out

    def _matrix_activation_many(self, w, spec, ranks, stats):
        from lrcompress.factorizations._activation import damped_cholesky, whitened_splits

        if stats.patch is None or (chol := damped_cholesky(stats.patch, stats.damping)) is None:
            return None
        m = w.reshape(spec.out_ch, spec.in_ch)
        out = []
        for r, (a, b) in zip(ranks, whitened_splits(m, chol.to(m.device), ranks)):
            if spec.kind == "conv2d":
                b, a = b.reshape(r, spec.in_ch, 1, 1), a.reshape(spec.out_ch, r, 1, 1)
            out.append([b, a])
        return out

    # -- hooks for the k×k conv case ----------------------------------------------------------

    def _conv_activation_many(self, w, spec, ranks, opts, stats):
        """Activation-aware k×k fit, or None: this method has none (the weight fit is used)."""
        return None

    def _conv_fit_moments(self, spec: LayerSpec) -> tuple[str, ...]:
        """The input moments :meth:`_conv_activation_many` uses (none: it has no fit)."""
        return ()

    def _conv_kept_energy(self, w, spec, ranks, opts) -> list[float] | None:
        """``‖Ŵ(r)‖²_F`` per rank where the weight fit is an orthogonal projection of W (then
        ``‖W − Ŵ‖² = ‖W‖² − ‖Ŵ‖²``) computable without the factors; None: reconstruct."""
        return None

    def _conv_unsupported_reason(self, spec: LayerSpec) -> str:
        return ""

    def _conv_max_rank(self, spec: LayerSpec) -> Rank:
        raise NotImplementedError

    def _conv_rank_from(self, spec: LayerSpec, rank) -> Rank:
        if isinstance(rank, (tuple, list)):
            raise ValueError(f"{self.name}: rank must be an int or a fraction, got {rank!r}.")
        return norm_int_rank(rank, self._conv_max_rank(spec), self.name)

    def _conv_params(self, spec: LayerSpec, rank) -> int:
        raise NotImplementedError

    def _conv_macs(self, spec: LayerSpec, rank) -> int:
        raise NotImplementedError

    def _conv_layers(self, spec: LayerSpec, rank) -> list[nn.Module]:
        raise NotImplementedError

    def _conv_decompose(self, w, spec: LayerSpec, rank, opts) -> list[torch.Tensor]:
        raise NotImplementedError

    def _conv_decompose_many(self, w, spec, ranks, opts) -> list[list[torch.Tensor]]:
        """Default: no shared work, one decomposition per rank."""
        return [self._conv_decompose(w, spec, r, opts) for r in ranks]

    def _conv_reconstruct(self, factors, spec: LayerSpec) -> torch.Tensor:
        raise NotImplementedError


def khw(spec: LayerSpec) -> int:
    """kh·kw, the number of kernel taps."""
    return spec.kernel[0] * spec.kernel[1]


def in_positions(spec: LayerSpec) -> int:
    return spec.in_positions
