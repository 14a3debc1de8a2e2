"""Rank-selection baselines (energy, vbmf, lsvt, gsvt, isvt, bisect) on a tiny real model."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import timm
import torch

from lrcompress.commands.search import SearchConfig, build_problem, search
from lrcompress.data import DataConfig
from lrcompress.errors import UserError
from lrcompress.factorizations import get_factorization
from lrcompress.model.arch import ModelInfo
from lrcompress.model.plan import Target
from lrcompress.model.surgery import swap_modules
from lrcompress.rank import SelectContext, get_method
from lrcompress.rank.signals import Cache, calib_loss
from lrcompress.rank.vbmf import evbmf

METHODS = ["energy", "vbmf", "lsvt", "gsvt", "isvt", "bisect"]
TARGETS = [("flops", 0.5), ("flops", 0.3), ("params", 0.5), ("params", 0.3)]
INFO = ModelInfo("timm:test_resnet", 10, 1, "random")
INPUT = (1, 32, 32)
FC_GAIN = 8.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards and SVDs: on shared cores a second thread only adds contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.cache
def _model():
    torch.manual_seed(0)
    m = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1).eval()
    # timm zero-initialises each block's last BN, which would make the residual convs invisible
    # to the loss; give every BN a non-trivial scale, as a trained model has.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
            if isinstance(mod, torch.nn.Conv2d):  # trained layers have decaying spectra
                w = mod.weight.double()
                for _ in range(2):  # output- then input-channel unfolding
                    u, sv, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
                    sv = sv * 0.9 ** torch.arange(len(sv), dtype=torch.float64)
                    w = ((u * sv) @ vh).reshape(w.shape).transpose(0, 1)
                mod.weight.copy_(w.float())
        # Re-estimate the BN statistics for the new weights, so activations keep their scale.
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.reset_running_stats()
                mod.momentum = None
        m.train()
        m(torch.randn(64, *INPUT, generator=g))
        m.eval()
        m.fc.weight.mul_(FC_GAIN)
    return m


@functools.cache
def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, *INPUT, generator=g) for _ in range(2)]


def _batches():
    """Calibration batches labelled by the model itself: a confident, "trained" fit that any
    truncation makes worse (random labels leave the loss at chance whatever the ranks)."""
    with torch.no_grad():
        return [(x, _model()(x).argmax(1)) for x in _images()]


def _problem(kind="flops", ratio=0.5, decomp="tt", model=None):
    cfg = SearchConfig(target=Target(kind, ratio), decomp=decomp, rank_multiple=1)
    return build_problem(model or _model(), INFO, INPUT, cfg)


def _run(method, problem, model=None, config=None):
    ctx = SelectContext(model or _model(), problem, _batches(), torch.device("cpu"), Cache(None),
                        0, config or {})
    return get_method(method)(ctx)


def _largest_step(problem):
    k = problem.target.kind
    return max(b.cost(k) - a.cost(k) for lo in problem.layers
               for a, b in zip(lo.options, lo.options[1:]))


def _check_budget(problem, plan):
    cost = plan.macs if problem.target.kind == "flops" else plan.params
    assert problem.budget - _largest_step(problem) <= cost <= problem.budget


@pytest.mark.parametrize("kind,ratio", TARGETS)
@pytest.mark.parametrize("method", METHODS)
def test_meets_budget_within_one_step_and_is_deterministic(method, kind, ratio):
    p = _problem(kind, ratio)
    cfg = {"isvt": {"steps": 4}}  # halves the greedy's rounds; the default is tested below
    plan, trace = _run(method, p, config=cfg)
    _check_budget(p, plan)
    again, _ = _run(method, p, config=cfg)
    assert plan.to_dict()["layers"] == again.to_dict()["layers"]
    assert plan.rank_method == method and trace


@pytest.mark.parametrize("decomp", ["svd", "tucker2", "cp", "cp4"])
@pytest.mark.parametrize("method", METHODS)
def test_every_factorization(method, decomp):
    p = _problem("flops", 0.3, decomp)
    cfg = {"isvt": {"steps": 3}}  # CP's long option lists: keep the greedy short
    plan, _ = _run(method, p, config=cfg)
    _check_budget(p, plan)
    from lrcompress.factorizations import is_matrix

    matrix = {lo.spec.name for lo in p.layers if is_matrix(lo.spec)}
    assert {lp.factorization for lp in plan.layers if lp.name not in matrix} == {decomp}
    assert {lp.factorization for lp in plan.layers if lp.name in matrix} <= {"svd"}


@pytest.mark.parametrize("method", METHODS)
def test_multi_method_problem_is_refused(method):
    with pytest.raises(UserError, match="single factorization"):
        _run(method, _problem(decomp="auto"))


def test_unknown_config_key_is_refused():
    with pytest.raises(UserError, match="valid keys: min_rank, top_up, weaken"):
        _run("vbmf", _problem(), config={"vbmf": {"weakn": 0.5}})


@pytest.mark.parametrize("rank,sigma2", [(10, 0.25), (30, 1.0), (30, 0.25)])
def test_evbmf_recovers_rank_and_noise_of_synthetic_matrices(rank, sigma2):
    rng = np.random.default_rng(0)
    low = rng.standard_normal((200, rank)) @ rng.standard_normal((rank, 300))
    y = low + rng.normal(0.0, np.sqrt(sigma2), (200, 300))
    for m, var in ((y, sigma2), (y.T, sigma2), (1e-3 * y, 1e-6 * sigma2)):  # any orientation/scale
        r, s2 = evbmf(m)
        assert r == rank
        assert s2 == pytest.approx(var, rel=0.05)
    assert evbmf(np.zeros((5, 7))) == (0, 0.0)


def test_vbmf_weakening_moves_toward_full_rank():
    p = _problem("flops", 0.3)
    _, pure = _run("vbmf", p)
    _, weak = _run("vbmf", p, config={"vbmf": {"weaken": 0.5}})
    assert weak["weaken"] == 0.5 and pure["vbmf_ranks"] == weak["vbmf_ranks"]
    with pytest.raises(UserError, match="weaken"):
        _run("vbmf", p, config={"vbmf": {"weaken": 1.5}})


def _delta_plan_loss_increase(problem, delta_plan):
    m, batches = _model(), _batches()
    swap = {}
    for lo in problem.layers:
        r = delta_plan[lo.spec.name]
        if r != "dense":
            mod = m.get_submodule(lo.spec.name)
            swap[lo.spec.name] = get_factorization("tt").from_weight(mod.weight, mod.bias,
                                                                     lo.spec, r)
    with torch.no_grad():
        base = calib_loss(m, batches, "cpu")
        with swap_modules(m, swap):
            return calib_loss(m, batches, "cpu") - base


def test_bisect_honours_the_tolerance_when_the_budget_is_loose():
    p = _problem("flops", 0.9)
    tol = 0.05
    plan, tr = _run("bisect", p, config={"bisect": {"max_loss_increase": tol}})
    assert tr["binding"] == "tolerance" and tr["delta_plan_cost_ratio"] <= 0.9
    assert 0 < tr["delta"] < 1 and tr["loss_increase"] < tol
    # An independent rebuild of the δ-plan: its loss increase is within the tolerance.
    assert _delta_plan_loss_increase(p, tr["delta_plan"]) == pytest.approx(tr["loss_increase"],
                                                                           abs=1e-5)
    # Rejected δs were over the tolerance; the budget then only adds rank.
    assert all(h["loss_increase"] is None or (h["loss_increase"] >= tol) != h["accepted"]
               for h in tr["search"])
    assert tr["cost_ratio"] >= tr["delta_plan_cost_ratio"]
    _check_budget(p, plan)


@pytest.mark.parametrize("shed", ["spectrum", "loss_model"])
def test_bisect_sheds_when_the_budget_binds(shed):
    p = _problem("flops", 0.3)
    cfg = {"bisect": {"max_loss_increase": 1e-6, "shed_scores": shed}}
    plan, tr = _run("bisect", p, config=cfg)
    assert tr["binding"] == "budget" and tr["delta_plan_cost_ratio"] > 0.3
    _check_budget(p, plan)


def _set_spectrum(weight, sv, seed):
    """Give a conv weight the singular values ``sv`` on its output-channel unfolding."""
    t, n = weight.shape[0], weight[0].numel()
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(t, t, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, t, generator=g, dtype=torch.float64))
    w = (u * torch.as_tensor(sv, dtype=torch.float64)) @ v.T
    with torch.no_grad():
        weight.copy_((0.1 * w).reshape(weight.shape).to(weight.dtype))


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_gsvt_keeps_more_rank_where_the_spectrum_decays_slowly(ratio):
    m = copy.deepcopy(_model())
    k = np.arange(32)
    _set_spectrum(m.layer1[0].conv1.weight, 1.0 / (1.0 + 0.02 * k), seed=1)  # slow
    _set_spectrum(m.layer1[0].conv2.weight, 0.7**k, seed=2)  # fast
    p = _problem("flops", ratio, model=m)
    plan, tr = _run("gsvt", p, model=m)
    _check_budget(p, plan)
    ranks = {lp.name: lp.rank for lp in plan.layers}
    slow, fast = "layer1.0.conv1", "layer1.0.conv2"
    assert tr["spectrum_ranks"][slow] > tr["spectrum_ranks"][fast]
    assert ranks.get(slow, 32) > ranks[fast]  # absent = kept dense


def test_isvt_bounds_its_work_and_lazy_refresh_is_cheaper():
    p = _problem("flops", 0.3)
    plan, full = _run("isvt", p)
    n_layers = len(p.layers)
    pairs = sum(len(lo.options) - 1 for lo in p.layers)
    assert full["rounds"] > 0 and full["decompositions"] <= pairs
    assert full["loss_evaluations"] <= 1 + full["rounds"] * n_layers
    lazy_plan, lazy = _run("isvt", p, config={"isvt": {"refresh": "lazy"}})
    _check_budget(p, lazy_plan)
    assert lazy["loss_evaluations"] < full["loss_evaluations"]


def test_search_end_to_end_with_vbmf(resnet_ckpt, tmp_path):
    cfg = SearchConfig(target=Target("flops", 0.5), decomp="tt", method="vbmf", rank_multiple=1,
                       calib_batches=2, data=DataConfig(batch_size=16, test_subset=32),
                       input_size=INPUT)
    res = search(str(resnet_ckpt["pt"]), "synthetic:64", tmp_path / "run", cfg)
    assert 0.40 <= res.report["totals"]["macs_ratio"] <= 0.5
    assert res.plan.rank_method == "vbmf" and res.report["search"]["vbmf_ranks"]
