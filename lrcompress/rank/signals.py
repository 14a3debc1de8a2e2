"""Per-layer signals the rank methods share: reconstruction-error curves and loss sensitivities.

* ``error_curves``: the relative weight-reconstruction error ‖W − Ŵ(r)‖/‖W‖ of every option of
  every layer (dense: 0), from one batched decomposition per (layer, factorization).
* ``sensitivities``: how much the calibration loss rises when one layer alone is factorized at a
  reference option. With the errors they give a second-order loss model used to compare
  options across layers: ΔL_i(r) ≈ s_i · (e_i(r) / e_i(ref))² (a [PROPOSAL]: a layer's loss
  increase grows with the square of a small weight perturbation).

Both are cached under ``RUN/cache/`` keyed by a hash of the layer weights, so a second run at
another target reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lrcompress.factorizations import get_factorization, whitener
from lrcompress.rank.problem import DENSE, RankProblem
from lrcompress.util.io import write_json

log = logging.getLogger(__name__)


def weight_key(weight: torch.Tensor) -> str:
    h = hashlib.sha1(weight.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def batches_key(batches) -> str:
    """A digest of the calibration batches (inputs and labels), for cache keys."""
    h = hashlib.sha1()
    for x, y in batches:
        for t in (x, y):
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Cache:
    """A JSON cache file in RUN/cache (or an in-memory dict when no directory is given)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict = {}
        if path is not None and path.exists():
            try:
                self.data = json.loads(path.read_text())
            except (json.JSONDecodeError, OSError):
                log.warning("ignoring unreadable cache %s", path)

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        if self.path is not None:
            write_json(self.path, self.data)


def _anchors(ranks: list[int], k: int) -> list[int]:
    """At most k ranks spread evenly over a sorted list, both ends included."""
    if len(ranks) <= k:
        return ranks
    return sorted({ranks[round(i * (len(ranks) - 1) / (k - 1))] for i in range(k)})


def _interp(r: int, xs: torch.Tensor, ys: torch.Tensor) -> float:
    i = int(torch.searchsorted(xs, torch.tensor(float(r), dtype=torch.float64)))
    i = min(max(i, 1), len(xs) - 1)
    x0, x1, y0, y1 = float(xs[i - 1]), float(xs[i]), float(ys[i - 1]), float(ys[i])
    return y0 + (y1 - y0) * (r - x0) / (x1 - x0)


@torch.no_grad()
def error_curves(model: nn.Module, problem: RankProblem, cache: Cache, progress=None,
                 max_anchors: int = 24, stats: dict | None = None, stats_key: str = "",
                 **opts) -> list[list[float]]:
    """Relative errors of every option; at most ``max_anchors`` decompositions per layer and
    factorization, the ranks between them linearly interpolated (errors fall smoothly with
    rank; CP at many ranks would otherwise dominate the run time).

    ``stats`` (``{layer: LayerStats}``, the activation fit's input statistics; ``stats_key`` a
    digest of the batches they came from): where a layer has them, its options are the
    activation fits and the error is the relative output error ‖(W − Ŵ)L‖/‖WL‖."""
    curves = []
    for lo in problem.layers:
        w = model.get_submodule(lo.spec.name).weight.detach()
        st = (stats or {}).get(lo.spec.name)
        white = whitener(st, lo.spec)
        wkey = weight_key(w) + ("" if white is None else f"/act/{stats_key}")
        by_method = defaultdict(list)
        for j, o in enumerate(lo.options):
            if o.factorization != DENSE:
                by_method[o.factorization].append((j, o.rank))
        errs = [0.0] * len(lo.options)
        w64 = w.double().cpu()
        for method, items in by_method.items():
            key = f"err/{lo.spec.name}/{method}/{wkey}"
            cached = cache.get(key) or {}
            ranks = sorted(r for _, r in items)
            anchors = _anchors(ranks, max_anchors)
            todo = [r for r in anchors if str(r) not in cached]
            if todo:
                fact = get_factorization(method)
                if white is None:
                    errs_todo = fact.weight_errors(w64, lo.spec, todo, **opts)
                else:
                    errs_todo = [_output_error(w64, fact.reconstruct(fs, lo.spec), white)
                                 for fs in fact.decompose_many(w64, lo.spec, todo, stats=st,
                                                               **opts)]
                cached.update((str(r), e) for r, e in zip(todo, errs_todo))
                cache.put(key, cached)
            xs = torch.tensor(anchors, dtype=torch.float64)
            ys = torch.tensor([cached[str(r)] for r in anchors], dtype=torch.float64)
            for j, r in items:
                errs[j] = cached[str(r)] if str(r) in cached else _interp(r, xs, ys)
        curves.append(errs)
        if progress is not None:
            progress(lo.spec.name)
    return curves


def _output_error(w: torch.Tensor, rec: torch.Tensor, white) -> float:
    """‖(W − Ŵ)L‖ / ‖WL‖ (the relative output error on the calibration inputs)."""
    white = white.to(torch.float64, w.device)
    num = white.right((w - rec).reshape(w.shape[0], -1)).norm()
    den = white.right(w.reshape(w.shape[0], -1)).norm()
    return float(num / den) if den > 0 else 0.0


def calib_loss(model, batches, device) -> float:
    total, n = 0.0, 0
    for x, y in batches:
        total += F.cross_entropy(model(x.to(device)).float(), y.to(device), reduction="sum").item()
        n += y.numel()
    return total / n


@torch.no_grad()
def sensitivities(model: nn.Module, problem: RankProblem, ref: list[int], batches, device,
                  cache: Cache, progress=None, stats: dict | None = None,
                  stats_key: str = "") -> list[float]:
    """Calibration-loss increase when layer i alone takes option ``ref[i]`` (floored at 1e-6);
    with ``stats`` (from the batches ``stats_key`` digests), the option is the layer's
    activation fit."""
    from lrcompress.model.replay import PrefixReplay
    from lrcompress.model.surgery import swap_modules

    model.eval()
    out = []
    data = batches_key(batches)  # the loss depends on the batches: another split, another key
    wkeys = [weight_key(model.get_submodule(lo.spec.name).weight) for lo in problem.layers]
    # the unmodified model's loss, kept in the cache (the prior and the repair both need it)
    base_key = f"base/{_digest(wkeys)}/{data}"
    replay = None  # recorded at the first measurement (a run that finds all cached needs none)
    for lo, j, wkey in zip(problem.layers, ref, wkeys):
        o = lo.options[j]
        mod = model.get_submodule(lo.spec.name)
        st = (stats or {}).get(lo.spec.name)
        fit = "" if st is None else f"/act/{stats_key}"
        key = f"sens/{lo.spec.name}/{o.factorization}/{o.rank}/{wkey}/{data}{fit}"
        val = cache.get(key)
        if val is None:
            if replay is None:  # the unmodified model's pass, recorded: it is also the base loss
                replay = PrefixReplay(model, [lo.spec.name for lo in problem.layers])
                loss = replay.record(lambda: calib_loss(model, batches, device))
                if cache.get(base_key) is None:
                    cache.put(base_key, loss)
            ref_loss = cache.get(base_key)
            chain = get_factorization(o.factorization).from_weight(mod.weight, mod.bias, lo.spec,
                                                                   o.rank, stats=st)
            with swap_modules(model, {lo.spec.name: chain}), replay.changed(lo.spec.name):
                val = calib_loss(model, batches, device) - ref_loss
            cache.put(key, val)
        out.append(max(float(val), 1e-6))
        if progress is not None:
            progress(lo.spec.name)
    return out


def _digest(keys: list[str]) -> str:
    return hashlib.sha1("/".join(keys).encode()).hexdigest()[:16]


def loss_model_scores(errs: list[list[float]], sens: list[float], ref: list[int]
                      ) -> list[list[float]]:
    """scores[i][j] = −s_i · (e_ij / e_i,ref)²: minus the predicted calibration-loss increase."""
    scores = []
    for e, s, j0 in zip(errs, sens, ref):
        e0 = max(e[j0], 1e-12)
        scores.append([-s * (x / e0) ** 2 for x in e])
    return scores
