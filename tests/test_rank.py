"""Rank selection machinery: budget allocation, feasibility, RENE's narrowing schedule."""

from __future__ import annotations

import pytest

from lrcompress.errors import TargetError
from lrcompress.model.layers import LayerSpec
from lrcompress.model.plan import Target
from lrcompress.rank.problem import DENSE, LayerOptions, Option, RankProblem, allocate, rank_grid
from lrcompress.rank.rene import initial_candidates, narrow


def _layer(name, ranks, per_rank, dense):
    spec = LayerSpec(name, "conv2d", 64, 64, (3, 3), in_hw=(8, 8), out_hw=(8, 8))
    opts = [Option("tt", r, r * per_rank, r) for r in ranks] + [Option(DENSE, 0, dense, 10**6)]
    return LayerOptions(spec, opts)


def _problem(ratio, fixed=1000, kind="flops"):
    layers = [_layer("a", range(8, 65, 8), 100, 10_000), _layer("b", range(8, 65, 8), 50, 6_000)]
    base = fixed + 16_000
    return RankProblem(Target(kind, ratio), layers, base, 10**7, "timm:x", 10, 1, (1, 8, 8))


def test_rank_grid():
    assert rank_grid(40, 8) == [8, 16, 24, 32, 40]
    assert rank_grid(5, 8) == [1, 2, 3, 4, 5]  # a grid that would be empty falls back to 1..max


@pytest.mark.parametrize("ratio", [0.13, 0.2, 0.35, 0.5, 0.8])
def test_allocate_meets_budget_and_wastes_at_most_one_step(ratio):
    p = _problem(ratio)
    # Score: higher rank is better, layer a twice as sensitive per rank as b.
    scores = [[(2.0 if i == 0 else 1.0) * o.rank if o.factorization != DENSE else 10**4
               for o in lo.options] for i, lo in enumerate(p.layers)]
    choice = allocate(p, scores)
    cost = p.cost_of(choice)
    assert cost <= p.budget
    # No single affordable upgrade with positive gain is left.
    slack = p.budget - cost
    for i, lo in enumerate(p.layers):
        for jj, o in enumerate(lo.options):
            extra = o.macs - lo.options[choice[i]].macs
            if 0 < extra <= slack:
                assert scores[i][jj] <= scores[i][choice[i]]


def test_allocate_prefers_the_more_sensitive_layer():
    p = _problem(0.3)
    scores = [[-((64 - o.rank) ** 2) * (10 if i == 0 else 1) if o.factorization != DENSE else 0
               for o in lo.options] for i, lo in enumerate(p.layers)]
    a, b = allocate(p, scores)
    assert p.layers[0].options[a].rank > p.layers[1].options[b].rank


def test_infeasible_target_states_smallest_reachable_ratio():
    p = _problem(0.05, fixed=1000)  # smallest: 1000 + 800 + 400 = 2200 of 17000 = 0.129
    with pytest.raises(TargetError, match=r"0\.129|0\.130"):
        p.check_feasible()


def test_target_range_is_checked():
    for r in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(Exception, match="strictly between 0 and 1"):
            Target("flops", r)


def test_initial_candidates_span_the_grid_and_include_the_largest_and_dense():
    lo = _layer("a", range(1, 51), 1, 10**6)
    cands, steps = initial_candidates(lo, 10)
    # Keeping the layer dense is a candidate too (the last one), final once chosen (step 1).
    assert lo.options[cands[-1]].factorization == DENSE and steps == {"tt": 5, DENSE: 1}
    ranks = [lo.options[j].rank for j in cands[:-1]]
    assert len(ranks) == 10 and ranks[-1] == 50
    assert all(b - a == 5 for a, b in zip(ranks, ranks[1:]))


def test_narrowing_follows_figure_3():
    # Figure 3 of RENE in grid units: step 10 around r̄=20 -> 15..25 at step 1.
    lo = _layer("a", range(1, 101), 1, 10**6)
    best = next(j for j, o in enumerate(lo.options) if o.rank == 20)
    cands, new_step = narrow(lo, best, 10, 10)
    assert [lo.options[j].rank for j in cands] == list(range(15, 26))
    assert new_step == 1
    # Coarser: step 100 around 200 with f=10 -> 150..250 at step 10.
    lo = _layer("a", range(1, 1001), 1, 10**6)
    best = next(j for j, o in enumerate(lo.options) if o.rank == 200)
    cands, new_step = narrow(lo, best, 100, 10)
    assert [lo.options[j].rank for j in cands] == list(range(150, 251, 10))
    assert new_step == 10


def test_narrowing_clips_at_the_grid_edges():
    lo = _layer("a", range(1, 31), 1, 10**6)
    best = len(lo.options) - 2  # the largest rank (30)
    cands, _ = narrow(lo, best, 10, 10)
    ranks = [lo.options[j].rank for j in cands]
    assert min(ranks) == 25 and max(ranks) == 30


@pytest.mark.parametrize("method", ["tt", "tucker2", "cp4", "svd"])
def test_mixed_layer_modes_agree_and_probes_estimate_the_weight_loss(method):
    import torch
    from torch import nn

    from lrcompress.factorizations import get_factorization
    from lrcompress.model.layers import find_layers
    from lrcompress.rank.rene import MixedLayer

    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3, stride=2, padding=2, dilation=2, bias=True)
    spec = find_layers(nn.Sequential(conv), (12, 9, 9))[0]
    fact = get_factorization(method)
    ranks = [3, 6]
    factors = fact.decompose_many(conv.weight.detach(), spec, ranks)
    cands = [(i, method, r) for i, r in enumerate(ranks)]
    a = MixedLayer(conv, spec, cands, factors, batch=4, probes=20000)
    with torch.no_grad():
        a.alpha.copy_(torch.tensor([0.3, -0.2]))
    x = torch.randn(4, 12, 9, 9)
    grads = []
    for mode in (False, True):
        a.mix_outputs = a.probe_weights = mode
        xi = x.clone().requires_grad_(True)
        a.alpha.grad = None
        y = a(xi)
        y.square().sum().backward()  # the gradient must reach the input and α in both modes
        grads.append((y.detach(), xi.grad, a.alpha.grad.clone()))
        if mode:
            est = a.weight_loss(a.probs(), torch.Generator().manual_seed(0))
        else:
            exact = a.weight_loss(a.probs(), torch.Generator().manual_seed(0))
    for w_mode, o_mode in zip(grads[0], grads[1]):
        torch.testing.assert_close(o_mode, w_mode, rtol=1e-4, atol=1e-5)
    assert abs(est.item() / exact.item() - 1) < 0.05  # 20k probes: a few % of Monte-Carlo noise


def test_mixed_layer_dense_candidate_is_the_original_layer():
    """With all mass on the dense candidate the mixed layer is the original layer (both
    compute modes) and its weight loss is zero; the gradient still reaches α."""
    import torch
    from torch import nn

    from lrcompress.factorizations import get_factorization
    from lrcompress.model.layers import find_layers
    from lrcompress.rank.rene import MixedLayer

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 10, 3, padding=1, bias=True)
    spec = find_layers(nn.Sequential(conv), (8, 6, 6))[0]
    factors = get_factorization("tucker2").decompose_many(conv.weight.detach(), spec, [2])
    cands = [(0, "tucker2", 2), (1, DENSE, 0)]
    mx = MixedLayer(conv, spec, cands, [factors[0], []], batch=2, probes=64)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        mx.alpha.copy_(torch.tensor([-60.0, 60.0]))  # p ≈ (0, 1)
        want = conv(x)
    gen = torch.Generator().manual_seed(0)
    for mode in (False, True):
        mx.mix_outputs = mx.probe_weights = mode
        torch.testing.assert_close(mx(x).detach(), want, rtol=1e-5, atol=1e-5)
        assert mx.weight_loss(mx.probs(), gen).item() < 1e-12
    with torch.no_grad():
        mx.alpha.zero_()
    mx.alpha.grad = None
    mx(x).square().sum().backward()
    assert mx.alpha.grad is not None and mx.alpha.grad.abs().sum() > 0
