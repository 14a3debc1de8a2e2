"""CP factorizations of k×k convs: RENE's CP-3 ("cp") and Lebedev's CP-4 ("cp4") (methods.md §1.2).

**cp** (RENE, code ``rene/decomposition/cp.py``): view the kernel as
``T̃ ∈ R^{T×(kh·kw)×S}``, ``T̃[t, i·kw+j, s] = W[t, s, i, j]``, and fit
``T̃ ≈ Σ_r A[:,r]∘B[:,r]∘C[:,r]``.
Chain: 1×1 conv S→R (C), depthwise kh×kw conv on R channels (B; stride, padding, dilation), 1×1
conv R→T (A + bias). Params ``R(S + kh·kw + T)``; MACs ``H·W·S·R + H'W'·R·kh·kw + H'W'·R·T``.

**cp4** (Lebedev et al., ICLR 2015): ``W[t,s,i,j] ≈ Σ_r K^t[t,r] K^y[i,r] K^x[j,r] K^s[s,r]``.
Chain: 1×1 conv S→R, kh×1 depthwise (vertical stride/padding/dilation), 1×kw depthwise (horizontal
ones), 1×1 conv R→T (+bias). Params ``R(S + kh + kw + T)``; MACs
``H·W·S·R + H'·W·R·kh + H'W'·R·kw + H'W'·R·T``.

Max useful rank: ``⌊T·S·kh·kw / (S + kh·kw + T)⌋`` for cp (RENE's ``cp_conv_max_rank``: beyond
it the factors hold more numbers than the kernel) and ``⌊T·S·kh·kw / (S + kh + kw + T)⌋`` for cp4.

Fitting: CP-ALS from an SVD initialisation (tensorly's ``init='svd'``: leading left singular
vectors of each unfolding, the first scaled by the singular values, columns beyond a mode's size
completed with seeded random ones), at most ``n_iter_max`` sweeps, stopping early when the relative
error changes by less than ``tol``. The weights are folded into the factors, balanced (each factor
gets ``λ^(1/N)``) so no layer of the chain starts at an outlying scale.

Why not tensorly's ``parafac`` by default: its MTTKRP forms the Khatri–Rao product explicitly, a
``(T·S) × R`` matrix for the small kernel mode (262144×256 doubles = 0.5 GB for a 512×512×3×3 conv
at R = 256), and it ran at 0.58 s per sweep there on 2 cores. The ALS below contracts the big
mode first (two ``(T·k·S)×R`` GEMMs per sweep, all modes' updates share them), ~10× faster and
lean. It is the same algorithm from the same initialisation: ``impl="tensorly"`` runs ``parafac``
instead, and the tests check both agree.

CP-ALS can degenerate (NaN/Inf factors, or an error worse than the zero tensor). Each layer and
rank is then fitted again from seeded random factors, and if that degenerates too, from random
factors with damped ALS (a 1e-3 relative ridge on the Gram solves, which keeps collinear
components bounded); each retry is logged and reported through ``_base.note`` (surgery records
the count per layer). Only when every attempt fails is :class:`DecompositionError` raised (a
UserError), naming layer, rank and what happened, and suggesting ``--exclude LAYER`` or another
``--decomp``; callers that try many ranks (the rank baselines) record it as that rank's reason.
"""

from __future__ import annotations

import logging
import math

import torch

from lrcompress.factorizations._activation import refit_output_factor
from lrcompress.factorizations._base import (
    DecompositionError,
    Factorization,
    conv,
    in_positions,
    is_int,
    khw,
    note,
    register,
    relative_error,
    tensorly_context,
)

log = logging.getLogger(__name__)
_LETTERS = "abcdefgh"
# After a degenerate fit: (initialisation, relative ridge of the Gram solves) of each retry.
RETRIES = (("random", 1e-12), ("random, damped", 1e-3))


def _solve_gram(v: torch.Tensor, m: torch.Tensor, ridge: float = 1e-12) -> torch.Tensor:
    """``M V⁻¹`` for the symmetric PSD Gram product V (R×R), by Cholesky with a relative ridge
    (1e-12 keeps collinear components finite, far below any error the tests resolve; a larger
    one damps the ALS steps)."""
    ridge = ridge * v.diagonal().mean().clamp_min(torch.finfo(v.dtype).tiny)
    eye = torch.eye(v.shape[0], dtype=v.dtype, device=v.device)
    chol, info = torch.linalg.cholesky_ex(v + ridge * eye)
    if int(info) == 0:
        return torch.cholesky_solve(m.T, chol).T
    return m @ torch.linalg.pinv(v, hermitian=True)


def _unit_columns(f: torch.Tensor) -> torch.Tensor:
    n = f.norm(dim=0)
    return f / torch.where(n > 0, n, torch.ones_like(n))


def cp_als(x: torch.Tensor, init: list[torch.Tensor], n_iter_max: int, tol: float,
           ridge: float = 1e-12):
    """CP-ALS of an N-way tensor from ``init`` factors; returns the factors (scale in the last).
    ``ridge``: relative Tikhonov damping of every least-squares solve (see :func:`_solve_gram`).

    The MTTKRP of modes 0..N-2 contracts the last mode first (``x_(N) @ F_N``, one GEMM, shared by
    those N-1 updates since F_N does not change until the last update); the last mode contracts the
    first mode with the freshly updated F_0 (a second GEMM). The rest are small contractions.
    """
    dims = tuple(x.shape)
    n_modes = len(dims)
    rank = init[0].shape[1]
    f = [t.clone() for t in init]
    for n in range(n_modes - 1):
        f[n] = _unit_columns(f[n])
    grams = [t.T @ t for t in f]
    x_last = x.reshape(-1, dims[-1])
    x_first = x.reshape(dims[0], -1)
    norm2 = float((x * x).sum())
    lead = _LETTERS[: n_modes - 1]
    prev = None
    for _ in range(n_iter_max):
        y = (x_last @ f[-1]).reshape(*dims[:-1], rank)
        for n in range(n_modes - 1):
            others = [m for m in range(n_modes - 1) if m != n]
            expr = ",".join([lead + "r"] + [lead[m] + "r" for m in others]) + f"->{lead[n]}r"
            mttkrp = torch.einsum(expr, y, *[f[m] for m in others])
            v = _hadamard([grams[m] for m in range(n_modes) if m != n])
            f[n] = _unit_columns(_solve_gram(v, mttkrp, ridge))
            grams[n] = f[n].T @ f[n]
        z = (f[0].T @ x_first).reshape(rank, *dims[1:])
        tail = _LETTERS[1:n_modes]
        mids = list(range(1, n_modes - 1))
        expr = ",".join(["r" + tail] + [tail[m - 1] + "r" for m in mids]) + f"->{tail[-1]}r"
        mttkrp = torch.einsum(expr, z, *[f[m] for m in mids])
        v = _hadamard(grams[:-1])
        f[-1] = _solve_gram(v, mttkrp, ridge)
        grams[-1] = f[-1].T @ f[-1]
        # ‖X − X̂‖² = ‖X‖² − 2⟨X, X̂⟩ + ‖X̂‖², all from quantities at hand.
        fit2 = norm2 - 2 * float((mttkrp * f[-1]).sum()) + float((v * grams[-1]).sum())
        err = math.sqrt(max(fit2, 0.0) / norm2) if norm2 > 0 else 0.0
        if not math.isfinite(err) or (tol > 0 and prev is not None and abs(prev - err) < tol):
            break
        prev = err
    return f


def _hadamard(grams):
    v = grams[0].clone()
    for g in grams[1:]:
        v *= g
    return v


def _fold(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Unit-norm columns times ``λ^(1/N)`` each: the CP weights spread evenly over the factors."""
    norms = torch.stack([t.norm(dim=0) for t in factors])  # N × R
    lam = norms.prod(dim=0)
    scale = lam.pow(1.0 / len(factors))
    return [_unit_columns(t) * scale for t in factors]


class _CP(Factorization):
    options = {"n_iter_max": 25, "tol": 1e-6, "impl": "torch", "seed": 0}

    # Subclasses: the tensor the CP is fitted to, its chain mapping and its max rank.
    def _tensor(self, w, spec) -> torch.Tensor:
        raise NotImplementedError

    def _chain(self, factors, spec) -> list[torch.Tensor]:
        raise NotImplementedError

    def _conv_decompose_many(self, w, spec, ranks, opts):
        n_iter, tol, impl, seed = opts["n_iter_max"], opts["tol"], opts["impl"], opts["seed"]
        if not is_int(n_iter) or n_iter < 0:
            raise ValueError(f"{self.name}: n_iter_max must be an int >= 0, got {n_iter!r}.")
        if not isinstance(tol, (int, float)) or tol < 0:
            raise ValueError(f"{self.name}: tol must be a number >= 0, got {tol!r}.")
        if impl not in ("torch", "tensorly"):
            raise ValueError(f"{self.name}: impl must be 'torch' or 'tensorly', got {impl!r}.")
        x = self._tensor(w, spec).contiguous()
        bases = _svd_init_bases(x)  # shared by every rank
        out = []
        for r in ranks:
            init = _svd_init(bases, r, seed)
            if impl == "torch":
                factors = cp_als(x, init, n_iter, float(tol))
            else:
                factors = _parafac(x, init, n_iter, float(tol))
            chain = self._chain(_fold(factors), spec)
            what = self._problem(w, chain, spec)
            for k, (how, ridge) in enumerate(RETRIES, 1):
                if not what:
                    break
                log.warning("%s of layer %r at rank %d: CP-ALS %s; retrying from %s factors",
                            self.name, spec.name, r, what, how)
                init = _random_init(x.shape, r, seed * 1000 + 7 * k, x.dtype, x.device)
                chain = self._chain(_fold(cp_als(x, init, n_iter, float(tol), ridge)), spec)
                what = self._problem(w, chain, spec)
                note(layer=spec.name, rank=r, retries=1, init=how, ok=not what)
            if what:
                raise DecompositionError(
                    f"{self.name} decomposition of layer {spec.name!r} at rank {r}: CP-ALS {what}, "
                    f"also from {len(RETRIES)} other initialisations. Keep the layer dense with "
                    f"--exclude '{spec.name}', or use another --decomp (tt, tucker2).")
            out.append(chain)
        return out

    def _conv_fit_moments(self, spec):
        return ("patch",)  # the output factor refitted under the patch moment

    def _conv_activation_many(self, w, spec, ranks, opts, stats):
        """The weight fit's chain with its output factor (the last 1×1 conv) refitted by least
        squares under the input's patch second moment (``refit_output_factor``): the other
        factors stay the CP-ALS ones, so this is the Σ-weighted refit of one factor, not ALS
        in the Σ-norm. None (the weight fit) without the patch moment."""
        if stats.patch is None:
            return None
        out = []
        for chain in self._conv_decompose_many(w, spec, ranks, opts):
            last = chain[-1]
            r = last.shape[1]
            eye = torch.eye(r, dtype=last.dtype, device=last.device).reshape(r, r, 1, 1)
            m = self._conv_reconstruct([*chain[:-1], eye], spec).reshape(r, -1)
            a = refit_output_factor(w, m, stats)
            if a is None:
                return None
            out.append([*chain[:-1], a.reshape(*last.shape)])
        return out

    def _problem(self, w, chain, spec) -> str:
        """What is wrong with a fitted chain ("" when nothing)."""
        if not all(bool(torch.isfinite(t).all()) for t in chain):
            return "produced non-finite factors"
        err = relative_error(w, self._conv_reconstruct(chain, spec))
        if not err < 1.0:
            return f"ended worse than the zero tensor (relative error {err:.3g})"
        return ""


def _svd_init_bases(x: torch.Tensor):
    """Per mode: the left singular vectors and singular values of its unfolding (from the Gram
    matrix's eigendecomposition, which is all an initialisation needs)."""
    out = []
    for n in range(x.ndim):
        m = x.movedim(n, 0).reshape(x.shape[n], -1)
        lam, u = torch.linalg.eigh(m @ m.T)
        u, lam = u.flip(1), lam.flip(0)
        idx = u.abs().argmax(dim=0)
        sign = torch.sign(u.gather(0, idx[None, :]))[0]
        u = u * torch.where(sign == 0, torch.ones_like(sign), sign)
        out.append((u, lam.clamp_min(0).sqrt()))
    return out


def _svd_init(bases, rank: int, seed: int) -> list[torch.Tensor]:
    """tensorly's ``init='svd'``: U[:, :R] per mode, the first mode scaled by σ, and seeded random
    columns where a mode is smaller than R."""
    init = []
    for n, (u, s) in enumerate(bases):
        d = u.shape[0]
        k = min(rank, d)
        f = u[:, :k] * s[:k] if n == 0 else u[:, :k]
        if rank > d:
            g = torch.Generator().manual_seed(seed * 1000 + n)
            extra = torch.randn(d, rank - d, generator=g, dtype=u.dtype) / math.sqrt(d)
            f = torch.cat([f, extra.to(u.device)], dim=1)
        init.append(f)
    return init


def _random_init(shape, rank: int, seed: int, dtype, device) -> list[torch.Tensor]:
    """Seeded Gaussian factors with unit-norm expected columns (a restart after a bad fit)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(d, rank, generator=g, dtype=dtype) / math.sqrt(d)).to(device)
            for d in shape]


def _parafac(x, init, n_iter_max, tol):
    from tensorly.cp_tensor import CPTensor
    from tensorly.decomposition import parafac

    with tensorly_context():
        cp = parafac(x, init[0].shape[1], n_iter_max=n_iter_max, tol=tol,
                     init=CPTensor((None, [t.clone() for t in init])))
    weights, factors = cp
    return [*factors[:-1], factors[-1] * weights[None, :]]


@register
class CP3(_CP):
    name = "cp"

    def _conv_max_rank(self, spec):
        t, s, k = spec.out_ch, spec.in_ch, khw(spec)
        return max(1, (t * s * k) // (s + k + t))

    def _conv_params(self, spec, r):
        return r * (spec.in_ch + khw(spec) + spec.out_ch)

    def _conv_macs(self, spec, r):
        return (in_positions(spec) * spec.in_ch * r
                + spec.out_positions * r * (khw(spec) + spec.out_ch))

    def _conv_layers(self, spec, r):
        return [
            conv(spec.in_ch, r),
            conv(r, r, spec.kernel, spec.stride, spec.padding, spec.dilation, groups=r),
            conv(r, spec.out_ch, bias=spec.bias),
        ]

    def _tensor(self, w, spec):
        t, s = spec.out_ch, spec.in_ch
        return w.permute(0, 2, 3, 1).reshape(t, khw(spec), s)  # T̃[t, i·kw+j, s]

    def _chain(self, factors, spec):
        a, b, c = factors
        r = a.shape[1]
        return [c.T.reshape(r, -1, 1, 1), b.T.reshape(r, 1, *spec.kernel), a.reshape(-1, r, 1, 1)]

    def _conv_reconstruct(self, factors, spec):
        first, dw, last = factors
        return torch.einsum("tr,rhw,rs->tshw", last[:, :, 0, 0], dw[:, 0], first[:, :, 0, 0])


@register
class CP4(_CP):
    name = "cp4"

    def _conv_max_rank(self, spec):
        t, s = spec.out_ch, spec.in_ch
        kh, kw = spec.kernel
        return max(1, (t * s * kh * kw) // (s + kh + kw + t))

    def _conv_params(self, spec, r):
        return r * (spec.in_ch + spec.kernel[0] + spec.kernel[1] + spec.out_ch)

    def _conv_macs(self, spec, r):
        kh, kw = spec.kernel
        mid = spec.copies * spec.out_hw[0] * spec.in_hw[1]  # after the vertical conv: H' × W
        return (in_positions(spec) * spec.in_ch * r + mid * r * kh
                + spec.out_positions * r * (kw + spec.out_ch))

    def _conv_layers(self, spec, r):
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (spec.kernel, spec.stride, spec.padding,
                                                  spec.dilation)
        return [
            conv(spec.in_ch, r),
            conv(r, r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=r),
            conv(r, r, (1, kw), (1, sw), (0, pw), (1, dw), groups=r),
            conv(r, spec.out_ch, bias=spec.bias),
        ]

    def _tensor(self, w, spec):
        return w.permute(0, 2, 3, 1)  # (T, kh, kw, S): the two big modes first and last

    def _chain(self, factors, spec):
        a, ky, kx, c = factors
        r = a.shape[1]
        kh, kw = spec.kernel
        return [c.T.reshape(r, -1, 1, 1), ky.T.reshape(r, 1, kh, 1), kx.T.reshape(r, 1, 1, kw),
                a.reshape(-1, r, 1, 1)]

    def _conv_reconstruct(self, factors, spec):
        first, dy, dx, last = factors
        return torch.einsum("tr,rh,rw,rs->tshw", last[:, :, 0, 0], dy[:, 0, :, 0],
                            dx[:, 0, 0, :], first[:, :, 0, 0])
