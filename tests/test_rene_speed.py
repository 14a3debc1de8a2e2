"""rene's speed-ups: the exact ones change no result, the early stop respects its minimum, cached
candidate factors equal fresh ones, and the run-time estimate matches the run (fake clock)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import lrcompress.rank.rene as rene
from lrcompress.commands.search import SearchConfig, build_problem
from lrcompress.factorizations import get_factorization
from lrcompress.measure.estimate import RunEstimate
from lrcompress.model.loading import load_model
from lrcompress.model.plan import Target
from lrcompress.rank import SelectContext
from lrcompress.rank.problem import DENSE
from lrcompress.rank.rene import CandidateFactors, ReneConfig, narrow
from lrcompress.rank.signals import Cache
from lrcompress.util.progress import Eta, TextProgress

CFG = ReneConfig(iters=8, warmup=2, weight_steps=True)  # the weight-step paths


def _ctx(resnet_ckpt, cfg: ReneConfig = CFG, decomp: str = "tt", n_batches: int = 2):
    lm = load_model(str(resnet_ckpt["pt"]))
    problem = build_problem(lm.model, lm.info, (1, 32, 32), SearchConfig(
        target=Target("flops", 0.4), decomp=decomp, method="rene", rank_multiple=1,
        input_size=(1, 32, 32)))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
               for _ in range(n_batches)]
    return SelectContext(lm.model, problem, batches, torch.device("cpu"), Cache(None), 0,
                         {"rene": cfg})


def _results(trace: dict) -> str:
    """The trace without measured seconds."""
    return json.dumps({**trace, "config": None,
                       "steps": [{k: v for k, v in s.items() if k != "seconds"}
                                 for s in trace["steps"]]}, sort_keys=True)


@pytest.mark.parametrize("decomp", ["tt"])
def test_exact_speedups_change_no_plan_and_no_trace(resnet_ckpt, decomp):
    """The shared reconstruction and the kept candidate factors are exact: the same choice and
    the same per-iteration losses, bit for bit, with them switched off and on."""
    on_choice, on_trace = rene.softmax_search(_ctx(resnet_ckpt, decomp=decomp), CFG)
    off = replace(CFG, exact_speedups=False)
    off_choice, off_trace = rene.softmax_search(_ctx(resnet_ckpt, off, decomp=decomp), off)
    assert len(on_trace["steps"]) >= 2
    assert on_choice == off_choice
    assert _results(on_trace) == _results(off_trace)


def test_cached_candidate_factors_equal_fresh_ones(resnet_ckpt):
    """A rank asked for again in a later narrowing step comes from the store, and equals a fresh
    decomposition of that rank alone exactly (tolerance 0: the same deterministic float64 SVD
    arithmetic, truncated; a rank's factors do not depend on the other ranks decomposed with it)."""
    ctx = _ctx(resnet_ckpt)
    lo = max(ctx.problem.layers, key=lambda lo: len(lo.options))
    tt = [j for j, o in enumerate(lo.options) if o.factorization == "tt"]
    first = tt[::3]
    store = CandidateFactors(ctx.model)
    store.get(lo, first)
    second, _ = narrow(lo, first[len(first) // 2], 3, 10)
    got = store.get(lo, second)
    assert store.computed == len(first) + len(set(second) - set(first))
    weight = ctx.model.get_submodule(lo.spec.name).weight
    for j in second:
        fresh = get_factorization("tt").decompose(weight, lo.spec, lo.options[j].rank)
        assert len(fresh) == len(got[j])
        for a, b in zip(fresh, got[j]):
            assert torch.equal(a, b), (lo.spec.name, lo.options[j].rank)
    dense = len(lo.options) - 1
    assert lo.options[dense].factorization == DENSE and store.get(lo, [dense]) == {dense: []}


def test_early_stop_never_before_the_minimum(resnet_ckpt):
    """With a tolerance every check passes (stop_tol=1: any two distributions are within total
    variation 1), the step still runs min_iters α iterations, then stops at the next check."""
    cfg = replace(CFG, iters=40, stop_tol=1.0, min_iters=12, stop_every=5)
    _, trace = rene.softmax_search(_ctx(resnet_ckpt, cfg), cfg)
    for step in trace["steps"]:
        assert step["alpha_iters"] == 15  # the first check at or after 12 α iterations
        assert len(step["ce"]) == 15
    off = replace(cfg, stop_tol=0.0)
    _, trace = rene.softmax_search(_ctx(resnet_ckpt, off), off)
    assert all(s["alpha_iters"] == 40 for s in trace["steps"])
    assert all(len(s["p_shift"]) == 40 // 5 - 1 for s in trace["steps"])


def test_convergence_checks_only_after_min_iters():
    class Fixed:
        def __init__(self):
            self.alpha = torch.zeros(3)

        def probs(self):
            return torch.softmax(self.alpha, 0)

    cfg = ReneConfig(stop_tol=0.5, min_iters=20, stop_every=5)
    watch = rene.Convergence([Fixed(), Fixed()], cfg)
    stops = [n for n in range(1, 40) if watch.settled(n)]
    assert stops and min(stops) == 20
    assert watch.shifts and all(s == 0 for s in watch.shifts)


def test_planned_steps_is_the_number_of_steps_run(resnet_ckpt):
    ctx = _ctx(resnet_ckpt)
    stages = []
    ctx.stage = lambda name, total=None: stages.append(name)
    _, trace = rene.softmax_search(ctx, CFG)
    n = len(trace["steps"])
    assert any(f"step {n} of {n}," in s for s in stages)


class FakeClock:
    """Time = the number of module forward calls so far (a unit of work, not seconds), so the
    estimate can be checked without timing anything."""

    def __init__(self):
        self.t = 0.0
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.t += 1.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("weight_steps", [True, False])
def test_estimate_is_within_a_factor_of_two_of_the_run(resnet_ckpt, monkeypatch, weight_steps):
    clock = FakeClock()
    monkeypatch.setattr(rene, "clock", clock)
    try:
        cfg = replace(CFG, iters=20, warmup=4, weight_steps=weight_steps)
        ctx = _ctx(resnet_ckpt, cfg, n_batches=4)
        rows = rene.estimate(ctx)
        est = RunEstimate()
        for row in rows:
            est.add(*row)
        predicted = est.by_stage()["rank selection"]
        t0 = clock()
        rene.select(ctx)
        actual = clock() - t0
    finally:
        clock.handle.remove()
    assert actual > 0
    assert 0.5 <= predicted / actual <= 2.0, (predicted, actual, est.details())


def test_estimate_line_and_eta_lines():
    est = RunEstimate()
    est.add("rank selection: step 1 of 2", 120, "iterations", 0.5)
    est.add("rank selection: step 2 of 2", 120, "iterations", 0.25)
    est.add("evaluation", 2, "test passes", 4.0)
    est.add("fine-tuning", 0, "steps", 1.0)  # no units: no row
    assert est.by_stage() == {"rank selection": 90.0, "evaluation": 8.0}
    assert est.line() == "estimated run time ≈ 98 s: rank selection ≈ 90 s; evaluation ≈ 8 s"
    assert est.to_dict()["total_s"] == 98.0

    now = [0.0]
    eta = Eta(10, clock=lambda: now[0])
    assert eta.left() is None
    now[0] = 4.0
    eta.advance(2)
    assert eta.left() == pytest.approx(16.0)  # 2 s per unit, 8 units left

    lines = []
    tp = TextProgress(lines.append, every=5.0, clock=lambda: now[0])
    tp.stage("evaluating", total=4)
    for _ in range(4):
        now[0] += 3.0
        tp.advance()
    assert lines[0] == "… evaluating"
    assert lines[1] == "  evaluating: 2/4, 6 s elapsed, ~6 s left"
    assert lines[-1] == "  evaluating: 4/4, 12 s elapsed, ~0 s left"


def test_weight_floor_leaves_improbable_candidates_out(resnet_ckpt):
    """weight_floor: a candidate below the floor gets no gradient (its chain is not run); the
    most probable one always stays; floor 0 is the full mixture."""
    ctx = _ctx(resnet_ckpt)
    lo = max(ctx.problem.layers, key=lambda lo: len(lo.options))
    cands = [j for j, o in enumerate(lo.options) if o.factorization == "tt"][:3]
    by_j = CandidateFactors(ctx.model).get(lo, cands)
    mx = rene.MixedLayer(ctx.model.get_submodule(lo.spec.name), lo.spec,
                         [(j, "tt", lo.options[j].rank) for j in cands],
                         [by_j[j] for j in cands], batch=8, probes=4)
    p = torch.tensor([1e-5, 0.3, 0.7 - 1e-5])
    for floor, has_grad in ((0.0, [True, True, True]), (1e-3, [False, True, True]),
                            (0.9, [False, False, True])):
        mx.zero_grad(set_to_none=True)
        mx.weight_loss(p, torch.Generator().manual_seed(0), floor).backward()
        assert [all(f.grad is not None for f in b) for b in mx.branches] == has_grad


def test_without_weight_steps_the_candidates_keep_their_fitted_factors(resnet_ckpt):
    """weight_steps=False: no weight step and no warm-up; every candidate's factors stay those
    of its decomposition (bit for bit), the mixed layer's output is still the p-weighted mixture
    of the candidates' outputs (tolerance 1e-5 relative), and the step runs only α iterations."""
    cfg = replace(CFG, weight_steps=False)
    ctx = _ctx(resnet_ckpt, cfg)
    lo = max(ctx.problem.layers, key=lambda lo: len(lo.options))
    cands = [j for j, o in enumerate(lo.options) if o.factorization == "tt"][:3]
    fresh = CandidateFactors(ctx.model).get(lo, cands)
    seen = {}
    real_optimise = rene._optimise

    def spy(ctx_, problem, mixed, cfg_, kind, teacher=None):
        hist = real_optimise(ctx_, problem, mixed, cfg_, kind, teacher)
        mx = mixed[lo.spec.name]
        seen.setdefault("factors", {j: [t.detach().clone() for t in b]
                                    for (j, _, _), b in zip(mx.cands, mx.branches)})
        seen.setdefault("hist", hist)
        return hist

    rene._optimise = spy
    try:
        choice, trace = rene.softmax_search(ctx, cfg)
    finally:
        rene._optimise = real_optimise
    assert seen["hist"]["alpha_iters"] == cfg.iters and seen["hist"]["recon"] == []
    assert "warmup" not in seen["hist"]["seconds"]
    for j, fs in seen["factors"].items():
        if j in fresh and fresh[j]:
            assert all(torch.equal(a, b) for a, b in zip(fs, fresh[j]))
    assert len(choice) == len(ctx.problem.layers)

    base = ctx.model.get_submodule(lo.spec.name)
    mx = rene.MixedLayer(base, lo.spec, [(j, "tt", lo.options[j].rank) for j in cands],
                         [fresh[j] for j in cands], batch=8, probes=4)
    mx.frozen = True
    with torch.no_grad():
        mx.alpha.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(2, lo.spec.in_ch, *lo.spec.in_hw)
    got = mx(x)
    p = mx.probs().detach()
    want = sum(pk * torch.nn.functional.conv2d(x, w, None, **mx.conv_args)
               for pk, w in zip(p, mx.recon()))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.detach().abs().max()))


def test_sequential_fit_estimate_costs_every_fitted_layer_from_one_probe(resnet_ckpt,
                                                                         monkeypatch):
    """The sequential fit's row: one unit per layer with an activation fit; with a clock that
    advances 1 per reading (the statistics probe, on PROBE_BATCHES batches of the layer with
    the most moment work, and the fit probe of the widest layer each take 1) and 0.1 s per
    forward, each layer costs the student's half forward per batch + its share of the probe's
    statistics (by moment work, scaled to all batches) + its share of the probe's solve (by
    width³), and the original's inputs one forward per batch — exactly (tolerance 1e-9)."""
    import lrcompress.commands.decompose as dec
    from lrcompress.model.input_stats import kinds_for, moment_cost

    ticks = iter(range(1000))
    monkeypatch.setattr(dec, "clock", lambda: float(next(ticks)))
    ctx = _ctx(resnet_ckpt, n_batches=5)
    row = dec.sequential_fit_estimate(ctx.model, ctx.problem, ctx.batches, 0.1)
    costs = [moment_cost(lo.spec, kinds_for(lo.spec, {o.factorization for o in lo.options}))
             for lo in ctx.problem.layers]
    costs = [c for c in costs if c[1]]
    work0 = max(w for w, _ in costs)
    width0 = max(d for _, d in costs)
    n = len(ctx.batches)
    assert n > dec.PROBE_BATCHES  # the scaling is exercised
    want = n * 0.1 + sum(n * 0.1 / 2 + n / dec.PROBE_BATCHES * w / work0 + (d / width0) ** 3
                         for w, d in costs)
    assert row[:3] == ("decomposition: sequential fit", len(costs), "layers")
    assert row[3] * row[1] == pytest.approx(want, rel=1e-9)
    assert dec.sequential_fit_estimate(ctx.model, ctx.problem, [], 0.1) is None


def test_the_first_step_reuses_the_probes_mixed_layers_exactly(resnet_ckpt, monkeypatch):
    """Frozen factors: the first narrowing step takes the run-time probe's mixed layers (their
    candidate weights already formed) with the logits reset, and gives the same choice and the
    same per-iteration losses, bit for bit, as a search without the probe."""
    cfg = replace(CFG, weight_steps=False)
    fresh_choice, fresh_trace = rene.softmax_search(_ctx(resnet_ckpt, cfg), cfg)
    ctx = _ctx(resnet_ckpt, cfg)
    assert rene.estimate(ctx)
    factors, probed = ctx.scratch.pop("rene_factors"), ctx.scratch.pop("rene_mixed")
    built = []
    real = rene._mixed_layer
    monkeypatch.setattr(rene, "_mixed_layer", lambda *a: built.append(1) or real(*a))
    choice, trace = rene.softmax_search(ctx, cfg, None, factors, probed)
    assert choice == fresh_choice
    assert _results(trace) == _results(fresh_trace)
    n = len(ctx.problem.layers)
    assert len(trace["steps"]) >= 2 and len(built) == n * (len(trace["steps"]) - 1)


@pytest.mark.parametrize("k,stride,pad,hw,cut", [
    (3, 1, 1, (1, 1), (1, 1)),  # a 3×3 conv on a 1×1 map: only the centre tap is live
    (5, 1, 2, (2, 2), (3, 3)),
    (3, 2, 1, (2, 2), None),  # taps 1-2 live: not a symmetric border, kept whole
    (3, 1, 1, (4, 4), None),
    (3, 1, (1, 0), (1, 3), (1, 3)),
])
def test_a_frozen_mixed_layer_without_its_dead_taps_gives_the_same_outputs_and_gradients(
        k, stride, pad, hw, cut):
    """Kernel taps that only meet zero padding are cut off the mixed weight: the output and the
    α gradient equal those of the whole kernel (float64, 1e-10)."""
    from tests.test_factorizations import conv_spec

    spec = conv_spec(6, 5, k, stride=stride, pad=pad, hw=hw, bias=True)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 6, k, stride=stride, padding=pad).double()
    cands = [(0, "tt", 2), (1, "tt", 4), (2, DENSE, 0)]
    fact = get_factorization("tt")
    factors = fact.decompose_many(conv.weight.detach(), spec, [2, 4]) + [[]]
    mx = rene.MixedLayer(conv, spec, cands, factors, batch=4, probes=4, frozen=True)
    whole = rene.MixedLayer(conv, spec, cands, factors, batch=4, probes=4, frozen=True)
    whole.live = None
    assert (None if mx.live is None else mx.live.shape[2:]) == cut
    x = torch.randn(4, 5, *hw, dtype=torch.float64)
    for m in (mx, whole):
        m.mix_outputs = False
        with torch.no_grad():
            m.alpha.copy_(torch.tensor([0.3, -0.2, 0.1]))
    y, y0 = mx(x), whole(x)
    assert torch.allclose(y, y0, atol=1e-10)
    y.square().sum().backward()
    y0.square().sum().backward()
    assert torch.allclose(mx.alpha.grad, whole.alpha.grad, atol=1e-10)


def test_a_cut_mixed_layer_run_at_another_size_falls_back_to_the_whole_kernel():
    """A layer the cut was measured for at 1×1 but also called on a larger map computes with the
    whole kernel there (and after), the same as an uncut layer (float64, 1e-10)."""
    from tests.test_factorizations import conv_spec

    spec = conv_spec(4, 3, 3, pad=1, hw=(1, 1))
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    cands = [(0, "tt", 2), (1, DENSE, 0)]
    factors = get_factorization("tt").decompose_many(conv.weight.detach(), spec, [2]) + [[]]
    mx = rene.MixedLayer(conv, spec, cands, factors, batch=2, probes=2, frozen=True)
    whole = rene.MixedLayer(conv, spec, cands, factors, batch=2, probes=2, frozen=True)
    whole.live = None
    mx.mix_outputs = whole.mix_outputs = False
    assert mx.live is not None
    for hw in ((1, 1), (5, 5), (1, 1)):
        x = torch.randn(2, 3, *hw, dtype=torch.float64)
        assert torch.allclose(mx(x), whole(x), atol=1e-10)
    assert mx.live is None
