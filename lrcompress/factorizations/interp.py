"""Interpolative decomposition of a layer's input channels, fitted to its activations.

A layer ``y = W h`` (a linear layer, or a 1×1 conv at every position) reads ``C`` channels. The
interpolative decomposition keeps ``k`` of them, ``J``, and expresses the layer through those
alone: ``y ≈ W' h_J + c``. What the dropped channels carried is not lost as in channel pruning:
as far as the calibration data correlates them with the kept ones, ``W'`` carries it (Chee et
al., "Model Preserving Compression for Neural Networks", NeurIPS 2022, fit ``h ≈ T h_J`` by an
ID of the activation matrix and fold ``T`` into the next layer). Everything that only feeds the
dropped channels can then be removed upstream (:mod:`lrcompress.model.narrow`).

Both parts minimise the expected output error ``E‖W h − W' h_J − c‖²``, from the augmented
second moment ``A = E[[h; 1][h; 1]ᵀ]`` alone (collected by
:func:`lrcompress.model.input_stats.augmented_input_moments`):

* **which channels** (:func:`select_channels`): greedily, the channel whose addition lowers the
  output error most. With ``R`` the covariance of ``h`` left unexplained by the channels chosen so
  far, channel ``j`` lowers it by ``‖W R[:, j]‖² / R[j, j]``; a rank-one update of ``R`` and of
  ``W R`` after each choice keeps a step at O(C² + C·C_out). (Chee et al. pivot a QR of the
  activations themselves, which weighs every channel alike whatever ``W`` does with it.)
* **the new weight and constant** (:func:`refit`): least squares for fixed ``J``,
  ``W' = W Σ[:, J] Σ[J, J]⁻¹`` and ``c = W μ − W' μ_J`` (``Σ``, ``μ``: covariance and mean
  of ``h``).

Exact (zero error) when the activations span at most ``k`` dimensions besides the constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InterpFit:
    """``y ≈ weight @ h[keep] + offset``; ``rel_error`` is the expected squared output error
    over the output's variance (0: exact; 1: no better than the output's mean)."""

    keep: tuple[int, ...]  # sorted kept input channels
    weight: torch.Tensor  # (out, k)
    offset: torch.Tensor  # (out,)
    rel_error: float


def covariance(a: torch.Tensor) -> torch.Tensor:
    """The covariance of ``h`` from its augmented second moment."""
    mean = a[:-1, -1]
    return a[:-1, :-1] - torch.outer(mean, mean)


def select_channels(cov: torch.Tensor, w: torch.Tensor, k: int) -> list[int]:
    """``k`` input channels of ``w`` (out × C), chosen greedily to explain ``w @ h`` best given
    the covariance ``cov`` of ``h`` (see the module docstring). Channels the chosen ones already
    determine (no variance left) are taken last, lowest index first."""
    c = cov.shape[0]
    if not 0 < k <= c:
        raise ValueError(f"cannot keep {k} of {c} channels")
    r = cov.to(torch.float64).clone()
    m = w.to(torch.float64) @ r
    floor = 1e-12 * float(r.diagonal().abs().max().clamp_min(1e-300))
    chosen: list[int] = []
    free = torch.ones(c, dtype=torch.bool)
    while len(chosen) < k:
        d = r.diagonal()
        live = free & (d > floor)
        if not live.any():  # the rest carries nothing new: fill in index order
            chosen += free.nonzero().flatten().tolist()[: k - len(chosen)]
            break
        gain = torch.where(live, (m * m).sum(0) / d.clamp_min(floor), -1.0)
        j = int(gain.argmax())
        col, mj, dj = r[:, j].clone(), m[:, j].clone(), float(d[j])
        r -= torch.outer(col, col) / dj
        m -= torch.outer(mj, col) / dj
        free[j] = False
        chosen.append(j)
    return sorted(chosen)


def refit(a: torch.Tensor, w: torch.Tensor, keep) -> InterpFit:
    """The least-squares ``W'`` and constant for the kept channels ``keep``, and the relative
    output error they leave (from ``A`` alone). Solved on the covariance (the constant absorbs
    the means), which stays well conditioned when the activations have a large mean."""
    cov, mean = covariance(a), a[:-1, -1]
    w64 = w.to(torch.float64)
    idx = torch.tensor(list(keep))
    # Least squares by SVD (gelsd): Σ[J, J] is singular when kept channels are dead or repeat
    # (the minimum-norm solution then), and a ridge would bias the fit of a greedy choice that
    # can be ill-conditioned (a channel with little variance of its own left but much use to W).
    sol = torch.linalg.lstsq(cov[idx][:, idx], (w64 @ cov[:, idx]).T, driver="gelsd")
    weight = sol.solution.T  # (out, k)
    offset = w64 @ mean - weight @ mean[idx]
    u = w64.clone()  # the error W h − W' h_J − c is u (h − mean): the constant cancels the mean
    u[:, idx] -= weight
    err = float(torch.einsum("oi,ij,oj->", u, cov, u))
    var = float(torch.einsum("oi,ij,oj->", w64, cov, w64))
    return InterpFit(tuple(int(i) for i in keep), weight, offset,
                     max(err, 0.0) / var if var > 0 else 0.0)


def interp_fit(a: torch.Tensor, w: torch.Tensor, k: int) -> InterpFit:
    """Choose ``k`` of ``w``'s input channels and refit ``w`` on them (the module docstring)."""
    return refit(a, w, select_channels(covariance(a), w, k))
