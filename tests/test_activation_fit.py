"""Activation-aware fits (fit="activation"): whitened SVD optimality, output error against the
weight fit on a tiny real model, and chains that stay plain conv/linear chains."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lrcompress.factorizations import get_factorization
from lrcompress.factorizations._activation import LayerStats
from lrcompress.model.input_stats import collect_input_stats, output_errors
from lrcompress.model.layers import find_layers
from lrcompress.model.plan import LayerPlan, Plan
from lrcompress.model.surgery import decompose_
from tests.conftest import tiny_resnet
from tests.test_factorizations import conv_spec, linear_spec


def sigma_err(w, approx, sigma):
    e = w - approx
    return float(torch.trace(e @ sigma @ e.T)) ** 0.5


def test_whitened_svd_is_optimal_in_the_sigma_norm():
    g = torch.Generator().manual_seed(0)
    t, s, r = 12, 16, 4
    w = torch.randn(t, s, generator=g, dtype=torch.float64)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, s, generator=g, dtype=torch.float64) + 0.05 * torch.randn(200, s, generator=g,
                                                                      dtype=torch.float64)
    sigma = x.T @ x / x.shape[0]
    spec = linear_spec(t, s, bias=False)
    fact = get_factorization("svd")
    b, a = fact.decompose(w, spec, r, stats=LayerStats(patch=sigma, damping=0.0))
    fit = a @ b
    assert tuple(a.shape) == (t, r) and tuple(b.shape) == (r, s)
    # The optimum: tail singular values of W L, L the Cholesky factor of Σ.
    sv = torch.linalg.svdvals(w @ torch.linalg.cholesky(sigma))
    optimum = float(sv[r:].square().sum()) ** 0.5
    got = sigma_err(w, fit, sigma)
    assert got == pytest.approx(optimum, rel=1e-8)
    # Any other rank-r fit is no better: the weight fit, perturbations, random factors.
    bw, aw = fact.decompose(w, spec, r)
    assert got <= sigma_err(w, aw @ bw, sigma) + 1e-12
    for _ in range(20):
        da = 1e-3 * torch.randn(a.shape, generator=g, dtype=torch.float64)
        db = 1e-3 * torch.randn(b.shape, generator=g, dtype=torch.float64)
        assert got <= sigma_err(w, (a + da) @ (b + db), sigma) + 1e-12
        ra = torch.randn(t, r, generator=g, dtype=torch.float64)
        rb = torch.linalg.lstsq(ra, w).solution  # best B for a random A, Frobenius
        assert got <= sigma_err(w, ra @ rb, sigma) + 1e-12


def test_conv_svd_uses_the_patch_covariance():
    """k×k svd: the whitened fit of the unfolded weight reaches the Σ_p optimum."""
    spec = conv_spec(10, 4, 3, pad=1, bias=False)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(spec.weight_shape, generator=g, dtype=torch.float64)
    x = torch.randn(300, 36, generator=g, dtype=torch.float64) * torch.linspace(0.01, 2, 36)
    sigma = x.T @ x / 300
    b, a = get_factorization("svd").decompose(w, spec, 3,
                                              stats=LayerStats(patch=sigma, damping=0.0))
    fit = a.reshape(10, 3) @ b.reshape(3, -1)
    sv = torch.linalg.svdvals(w.reshape(10, -1) @ torch.linalg.cholesky(sigma))
    assert sigma_err(w.reshape(10, -1), fit, sigma) == pytest.approx(
        float(sv[3:].square().sum()) ** 0.5, rel=1e-8)


def _plan(model, method, frac=3):
    specs = find_layers(model, (1, 32, 32))
    fact = get_factorization(method)
    lps = []
    for s in specs:
        if fact.unsupported_reason(s):
            continue
        r = max(1, fact.scalar_rank(fact.max_rank(s)) // frac)
        lps.append(LayerPlan(s.name, method, fact.rank_from(s, r), s))
    return Plan("test_resnet", 10, 1, (1, 32, 32), tuple(lps), 1, 1)


@pytest.mark.parametrize("method", ["svd", "tucker2", "tt", "cp", "cp4"])
def test_activation_fit_beats_weight_fit_on_the_calibration_inputs(method):
    model = tiny_resnet()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 1, 32, 32, generator=g), None) for _ in range(3)]
    plan = _plan(model, method)
    stats, skipped = collect_input_stats(model, batches, plan)
    assert not skipped and set(stats) == {lp.name for lp in plan.layers}
    act, wfit = copy.deepcopy(model), copy.deepcopy(model)
    res = decompose_(act, plan, stats=stats)
    decompose_(wfit, plan)
    assert all(r.fit == "activation" for r in res)
    errs = output_errors(model, batches, {
        "activation": {lp.name: act.get_submodule(lp.name) for lp in plan.layers},
        "weight": {lp.name: wfit.get_submodule(lp.name) for lp in plan.layers}})
    for name, e in errs.items():
        # The damping (1e-2) makes the fit optimal for a slightly different Σ: a small slack.
        assert e["activation"] <= e["weight"] * 1.01 + 1e-6, (name, e)
    mean = lambda k: sum(e[k] for e in errs.values()) / len(errs)  # noqa: E731
    # cp/cp4 refit only their output factor: a smaller gain than a full activation fit.
    assert mean("activation") < (0.95 if method.startswith("cp") else 0.8) * mean("weight")


def test_memory_budget_falls_back_to_the_weight_fit():
    model = tiny_resnet()
    batches = [(torch.randn(2, 1, 32, 32), None)]
    plan = _plan(model, "svd")
    stats, skipped = collect_input_stats(model, batches, plan, max_bytes=2000)
    big = [lp.name for lp in plan.layers if lp.name in skipped]
    assert big and all("budget" in skipped[n] for n in big)
    res = decompose_(copy.deepcopy(model), plan, stats=stats)
    assert {r.name for r in res if r.fit == "weight"} == set(big)
    # cp on k×k convs refits its output factor under the patch moment; without it (over the
    # budget) it keeps the weight fit, and says why.
    cp_plan = _plan(model, "cp")
    kxk = [lp.name for lp in cp_plan.layers if lp.spec.kernel != (1, 1)
           and lp.spec.kind == "conv2d"]
    stats, skipped = collect_input_stats(model, batches, cp_plan)
    res = {r.name: r.fit for r in decompose_(copy.deepcopy(model), cp_plan, stats=stats)}
    assert kxk and all(res[n] == "activation" and n not in skipped for n in kxk)
    stats, skipped = collect_input_stats(model, batches, cp_plan, max_bytes=2000)
    res = {r.name: r.fit for r in decompose_(copy.deepcopy(model), cp_plan, stats=stats)}
    over = [n for n in kxk if n in skipped]
    assert over and all(res[n] == "weight" and "budget" in skipped[n] for n in over)


@pytest.mark.parametrize("method", ["svd", "tucker2"])
def test_activation_chains_are_plain_chains_and_export(method):
    from lrcompress.deploy.onnx import export_onnx

    model = tiny_resnet()
    batches = [(torch.randn(4, 1, 32, 32), None)]
    plan = _plan(model, method)
    stats, _ = collect_input_stats(model, batches, plan)
    act = copy.deepcopy(model)
    decompose_(act, plan, stats=stats)
    for lp in plan.layers:
        chain = act.get_submodule(lp.name)
        skel = get_factorization(method).skeleton(lp.spec, lp.rank)
        assert [type(m) for m in chain] == [type(m) for m in skel]
        assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for m in chain)
        assert [m.weight.shape for m in chain] == [m.weight.shape for m in skel]
        assert all(torch.isfinite(m.weight).all() for m in chain)
    act.load_state_dict(act.state_dict())  # same keys and shapes as a skeleton built model
    proto = export_onnx(act, (1, 32, 32))
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)


def test_explicit_fits_are_kept_with_or_without_calibration_inputs():
    from lrcompress.commands.compress import CompressConfig, fit_of
    from lrcompress.model.plan import Target

    for explicit in ("weight", "activation", "sequential"):
        cfg = CompressConfig(target=Target("flops", 0.5), fit=explicit)
        assert fit_of(cfg, has_calib=True) == fit_of(cfg, has_calib=False) == explicit


@pytest.mark.parametrize("method", ["cp", "cp4"])
def test_cp_output_factor_is_the_sigma_norm_least_squares_optimum(method):
    """The refitted output factor A minimises ‖(W − A M) L‖ for the chain's other factors M
    (kept from the weight fit): neither the weight fit's A nor any perturbation of A does
    better (tolerance 1e-12)."""
    spec = conv_spec(10, 6, 3, pad=1, bias=False)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(spec.weight_shape, generator=g, dtype=torch.float64)
    x = torch.randn(400, 54, generator=g, dtype=torch.float64) * torch.linspace(0.05, 2, 54)
    sigma = x.T @ x / 400
    fact = get_factorization(method)
    chain = fact.decompose(w, spec, 5, stats=LayerStats(patch=sigma, damping=0.0))
    weight_chain = fact.decompose(w, spec, 5)
    assert all(torch.equal(a, b) for a, b in zip(chain[:-1], weight_chain[:-1]))
    rec = fact.reconstruct(chain, spec).reshape(10, -1)
    err = sigma_err(w.reshape(10, -1), rec, sigma)
    assert err <= sigma_err(w.reshape(10, -1), fact.reconstruct(weight_chain, spec).reshape(
        10, -1), sigma) + 1e-12
    last = chain[-1]
    for _ in range(10):
        moved = [*chain[:-1], last + 1e-3 * torch.randn(last.shape, generator=g,
                                                        dtype=torch.float64)]
        assert err <= sigma_err(w.reshape(10, -1), fact.reconstruct(moved, spec).reshape(
            10, -1), sigma) + 1e-12


def _kron_reference(w, r4, r3, sigma_p, chol_c):
    """The chain fit's reduced-rank regression written out with the Kronecker product (the
    textbook form, k² times the work of the structured solve)."""
    from lrcompress.factorizations._activation import unwhiten
    from lrcompress.factorizations._base import left_basis

    t, s, kh, kw = w.shape
    k = kh * kw
    v, _ = left_basis(chol_c.T @ w.transpose(0, 1).reshape(s, t * k), r3, with_p=False)
    a = unwhiten(v[:, :r3].T, chol_c)
    proj = torch.kron(a.contiguous(), torch.eye(k, dtype=w.dtype))
    sp = sigma_p @ proj.T
    cq = torch.linalg.cholesky(proj @ sp)
    m_star = torch.cholesky_solve((w.reshape(t, -1) @ sp).T, cq).T
    u, _ = left_basis(m_star @ cq, r4, with_p=False)
    return [a.reshape(r3, s, 1, 1), (u.T @ m_star).reshape(r4, r3, kh, kw), u.reshape(t, r4, 1, 1)]


@pytest.mark.parametrize("patch", [True, False])
def test_chain_fit_of_many_pairs_equals_each_pair_alone(patch):
    """Candidates share one solve (leading blocks of the largest r_in): every pair's factors equal
    the pair fitted alone, and with a measured patch moment the Kronecker-product form, to 1e-8."""
    from lrcompress.factorizations._activation import chain_fit, damped_cholesky

    g = torch.Generator().manual_seed(3)
    t, s, kh, kw = 10, 7, 3, 3
    w = torch.randn(t, s, kh, kw, generator=g, dtype=torch.float64)
    x = torch.randn(40, 3, 9, 9, generator=g, dtype=torch.float64)
    x = torch.cat([x, x[:, :2] + 0.1 * torch.randn(40, 2, 9, 9, generator=g, dtype=x.dtype),
                   torch.randn(40, 2, 9, 9, generator=g, dtype=x.dtype)], dim=1)
    cols = torch.nn.functional.unfold(x, (kh, kw), padding=1).transpose(1, 2).reshape(-1, s * 9)
    chan = x.permute(0, 2, 3, 1).reshape(-1, s)
    damped = cols.T @ cols / cols.shape[0]
    stats = LayerStats(patch=damped if patch else None, channel=chan.T @ chan / chan.shape[0])
    pairs = [(2, 1), (5, 3), (3, 3), (10, 7), (4, 6)]
    many = chain_fit(w, pairs, stats)
    for pair, fs in zip(pairs, many):
        alone = chain_fit(w, [pair], stats)[0]
        for f, f1 in zip(fs, alone):
            assert torch.allclose(f, f1, rtol=1e-8, atol=1e-10)
        if patch:
            sigma_p = damped + stats.damping * damped.diagonal().mean() * torch.eye(s * 9,
                                                                                   dtype=w.dtype)
            chol_c = damped_cholesky(stats.channel, stats.damping)
            ref = _kron_reference(w, *pair, sigma_p, chol_c)
            # the chain's product is unique even where a basis sign or rotation is not
            rec = torch.einsum("ta,abhw,bs->tshw", fs[2][:, :, 0, 0], fs[1], fs[0][:, :, 0, 0])
            rec_ref = torch.einsum("ta,abhw,bs->tshw", ref[2][:, :, 0, 0], ref[1],
                                   ref[0][:, :, 0, 0])
            assert torch.allclose(rec, rec_ref, rtol=1e-8, atol=1e-10)


def test_each_factorization_declares_the_moments_its_fit_uses():
    """kinds_for is the union of what each method declares; given exactly those moments the
    method's fit is the activation fit, given none the weight fit."""
    from lrcompress.factorizations import collect_notes
    from lrcompress.model.input_stats import kinds_for

    conv, one, lin = conv_spec(12, 8, 3, pad=1, bias=False), conv_spec(12, 8, 1), linear_spec(10, 6)
    want = {"svd": ("patch",), "tt": ("channel", "patch"), "tucker2": ("channel", "patch"),
            "cp": ("patch",), "cp4": ("patch",)}
    for m, kinds in want.items():
        assert kinds_for(conv, [m]) == kinds, m
        assert kinds_for(one, [m]) == ("patch",) and kinds_for(lin, [m]) == ("patch",)
    assert kinds_for(conv, ["dense"]) == ()
    assert kinds_for(conv, ["dense", "cp", "tt"]) == ("channel", "patch")
    g = torch.Generator().manual_seed(4)
    w = torch.randn(conv.weight_shape, generator=g, dtype=torch.float64)
    x = torch.randn(200, 8 * 9, generator=g, dtype=torch.float64)
    moments = {"patch": x.T @ x / 200, "channel": x[:, ::9].T @ x[:, ::9] / 200}
    for m, kinds in want.items():
        for given, fit in ((kinds, "activation"), ((), "weight")):
            stats = LayerStats(**{k: moments[k] for k in given})
            with collect_notes() as notes:
                get_factorization(m).decompose(w, conv, 3, stats=stats)
            assert [n["fit"] for n in notes if "fit" in n] == [fit], (m, given)


@pytest.mark.parametrize("patch", [True, False])
def test_chain_fits_from_a_kept_solve_equal_fresh_ones(patch):
    """Under a SolveMemo, a second call on the same statistics and weight with smaller input
    ranks reuses the first call's solve (no new one formed) and gives the factors a fresh fit
    gives (1e-8); another weight gets its own solve."""
    from lrcompress.factorizations import SolveMemo
    from lrcompress.factorizations._activation import chain_fit

    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 6, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(30, 6, 7, 7, generator=g, dtype=torch.float64)
    cols = torch.nn.functional.unfold(x, (3, 3), padding=1).transpose(1, 2).reshape(-1, 54)
    chan = x.permute(0, 2, 3, 1).reshape(-1, 6)
    stats = LayerStats(patch=cols.T @ cols / len(cols) if patch else None,
                       channel=chan.T @ chan / len(chan))
    memo = SolveMemo()
    with memo.active():
        chain_fit(w, [(6, 6), (3, 4)], stats)
        kept = memo.solves[id(stats)][-1]
        again = chain_fit(w, [(2, 3), (5, 5)], stats)
        assert memo.solves[id(stats)][-1] is kept
        chain_fit(w * 2, [(2, 3)], stats)
        assert memo.solves[id(stats)][-1] is not kept
    fresh = chain_fit(w, [(2, 3), (5, 5)], stats)
    for fs, fs0 in zip(again, fresh):
        for f, f0 in zip(fs, fs0):
            assert torch.allclose(f, f0, rtol=1e-8, atol=1e-10)
