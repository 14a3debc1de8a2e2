"""rene under the activation fit: candidates fitted to the layers' outputs, the weight step in the
same Σ-norm (the search compares the factors that will ship)."""

from __future__ import annotations

import pytest
import torch

import lrcompress.rank.rene as rene
from lrcompress.commands.compress import search_stats
from lrcompress.commands.search import SearchConfig, build_problem
from lrcompress.factorizations import LayerStats, get_factorization, whitener
from lrcompress.model.loading import load_model
from lrcompress.model.plan import Target
from lrcompress.rank import SelectContext
from lrcompress.rank.rene import CandidateFactors, ReneConfig
from lrcompress.rank.signals import Cache
from tests.test_factorizations import conv_spec


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    scale = torch.logspace(0, -2, d, dtype=torch.float64)  # an anisotropic input
    return (scale[:, None] * a) @ (scale[:, None] * a).T / (3 * d)


def test_whitener_applies_the_kronecker_factor_and_samples_its_covariance():
    """Channel moment only: ``m L`` equals ``m (L_c ⊗ I_k)`` (float64, 1e-12), and the samples'
    covariance is ``L Lᵀ`` within 5 % relative Frobenius error (40 000 samples)."""
    c, k = 5, 9
    w = whitener(LayerStats(channel=_spd(c, 0), damping=1e-3), conv_spec(7, c, 3))
    kron = torch.kron(w.chol.contiguous(), torch.eye(k, dtype=torch.float64))
    m = torch.randn(7, c * k, dtype=torch.float64)
    assert torch.allclose(w.right(m), m @ kron, atol=1e-12, rtol=0)
    z = w.sample(40_000, torch.Generator().manual_seed(1))
    cov, want = z.T @ z / z.shape[0], kron @ kron.T
    assert (cov - want).norm() / want.norm() < 0.05
    full = whitener(LayerStats(patch=_spd(c * k, 2), damping=1e-3), conv_spec(7, c, 3))
    assert full.taps == 1 and torch.allclose(full.chol @ full.chol.T,
                                             _spd(c * k, 2) + 1e-3 * _spd(c * k, 2).diagonal()
                                             .mean() * torch.eye(c * k, dtype=torch.float64))


def _ctx(resnet_ckpt):
    lm = load_model(str(resnet_ckpt["pt"]))
    cfg = SearchConfig(target=Target("flops", 0.4), decomp="tt", method="rene", rank_multiple=1,
                       input_size=(1, 32, 32), fit="activation")
    problem = build_problem(lm.model, lm.info, (1, 32, 32), cfg)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
               for _ in range(2)]
    stats = search_stats(lm.model, problem, batches, cfg)
    ctx = SelectContext(lm.model, problem, batches, torch.device("cpu"), Cache(None), 0,
                        {"rene": ReneConfig(iters=6, warmup=2)}, stats=stats)
    return ctx, cfg


def test_candidates_are_the_activation_fit_and_the_weight_step_its_norm(resnet_ckpt):
    """Every eligible layer gets statistics; a candidate's factors are the activation fit of that
    rank exactly; the mixed layer's exact weight loss is ‖(W − Ŵ) L‖²/‖W L‖² (rtol 1e-5) and its
    probe estimate agrees with it within 15 % (mean of 20 draws of 64 probes)."""
    ctx, _ = _ctx(resnet_ckpt)
    assert set(ctx.stats) == {lo.spec.name for lo in ctx.problem.layers}
    lo = next(lo for lo in ctx.problem.layers if lo.spec.kernel == (3, 3))
    cands = [j for j, o in enumerate(lo.options) if o.factorization == "tt"][:2]
    store = CandidateFactors(ctx.model, stats=ctx.stats)
    got = store.get(lo, cands)
    weight = ctx.model.get_submodule(lo.spec.name).weight
    tt = get_factorization("tt")
    for j in cands:
        act = tt.decompose(weight, lo.spec, lo.options[j].rank, stats=ctx.stats[lo.spec.name])
        plain = tt.decompose(weight, lo.spec, lo.options[j].rank)
        assert all(torch.equal(a, b) for a, b in zip(act, got[j]))
        assert not all(torch.allclose(a, b) for a, b in zip(plain, got[j]))
    mx = rene.MixedLayer(ctx.model.get_submodule(lo.spec.name), lo.spec,
                         [(j, "tt", lo.options[j].rank) for j in cands],
                         [got[j] for j in cands], batch=8, probes=64,
                         white=store.whitener(lo))
    p = torch.tensor([0.25, 0.75])
    w = sum(pk * r for pk, r in zip(p, mx.recon()))
    white = store.whitener(lo).to(torch.float64, "cpu")
    want = (white.right((w - mx.target).double().reshape(w.shape[0], -1)).square().sum()
            / white.right(mx.target.double().reshape(w.shape[0], -1)).square().sum())
    mx.probe_weights = False
    assert torch.allclose(mx.weight_loss(p, None).double(), want, rtol=1e-5)
    mx.probe_weights = True
    gen = torch.Generator().manual_seed(0)
    est = torch.stack([mx.weight_loss(p, gen).detach() for _ in range(20)]).mean().double()
    assert abs(est / want - 1) < 0.15


def test_search_records_which_fit_its_candidates_had(resnet_ckpt):
    """The search runs with activation-fitted candidates and says so; with the weight fit, or
    with fit_candidates off, there are no statistics (the plan is still valid)."""
    ctx, cfg = _ctx(resnet_ckpt)
    choice, trace = rene.softmax_search(ctx, ctx.config["rene"])
    assert len(choice) == len(ctx.problem.layers)
    from dataclasses import replace
    off = replace(cfg, rene=replace(cfg.rene, fit_candidates=False))
    assert search_stats(ctx.model, ctx.problem, ctx.batches, off) is None
    assert search_stats(ctx.model, ctx.problem, ctx.batches, replace(cfg, fit="weight")) is None
    assert search_stats(ctx.model, ctx.problem, [], cfg) is None


def test_error_curves_under_the_activation_fit_are_output_errors(resnet_ckpt):
    """With statistics, a layer's error curve is the activation fit's relative output error
    ‖(W − Ŵ)L‖/‖WL‖ (rtol 1e-9 against a direct computation), below the weight fit's output
    error at every anchor rank; the cache keeps both kinds apart (a weight-fit call after it
    gets the weight errors)."""
    from lrcompress.rank.signals import batches_key, error_curves

    ctx, _ = _ctx(resnet_ckpt)
    cache = Cache(None)
    key = batches_key(ctx.batches)
    act = error_curves(ctx.model, ctx.problem, cache, stats=ctx.stats, stats_key=key)
    plain = error_curves(ctx.model, ctx.problem, cache)
    i, lo = next((i, lo) for i, lo in enumerate(ctx.problem.layers) if lo.spec.kernel == (3, 3))
    j = next(j for j, o in enumerate(lo.options) if o.factorization == "tt")
    tt, st = get_factorization("tt"), ctx.stats[lo.spec.name]
    w = ctx.model.get_submodule(lo.spec.name).weight.detach().double()
    white = whitener(st, lo.spec).to(torch.float64, "cpu")

    def out_err(rec):
        return float(white.right((w - rec).reshape(w.shape[0], -1)).norm()
                     / white.right(w.reshape(w.shape[0], -1)).norm())

    rank = lo.options[j].rank
    fitted = tt.reconstruct(tt.decompose(w, lo.spec, rank, stats=st), lo.spec)
    weight_fit = tt.reconstruct(tt.decompose(w, lo.spec, rank), lo.spec)
    assert act[i][j] == pytest.approx(out_err(fitted), rel=1e-9)
    assert act[i][j] <= out_err(weight_fit) + 1e-12
    assert plain[i][j] == pytest.approx(float((w - weight_fit).norm() / w.norm()), rel=1e-9)
    assert act[i][j] != pytest.approx(plain[i][j])
