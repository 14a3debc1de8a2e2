"""The sequential fit (fit="sequential", the default with calibration inputs): each layer fitted on
the inputs the already-compressed layers produce, toward the original model's output."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from lrcompress.factorizations import get_factorization
from lrcompress.factorizations._activation import LayerStats, corrected_weight
from lrcompress.model.input_stats import collect_input_stats, collect_paired_stats
from lrcompress.model.plan import LayerPlan, Plan
from lrcompress.model.surgery import decompose_
from tests.test_factorizations import linear_spec


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (2 * d)


def test_corrected_weight_is_w_when_the_inputs_did_not_change():
    """p̃ = p (C = Σ): W* = W to 1e-10, so the first layer's fit is the plain activation fit."""
    sig = _spd(12, 0)
    w = torch.randn(5, 12, dtype=torch.float64)
    st = LayerStats(patch=sig, cross=sig.clone())
    assert torch.allclose(corrected_weight(w, st), w, atol=1e-10, rtol=0)
    assert corrected_weight(w, LayerStats(patch=sig)) is w  # no cross moment: unchanged


def test_corrected_weight_solves_the_regularised_sequential_problem():
    """W* minimises E‖W p − Ŵ p̃‖² + λ‖W − Ŵ‖² over every Ŵ: its gradient is 0 (1e-9
    relative) and random perturbations only raise the objective."""
    g = torch.Generator().manual_seed(1)
    n, d, t = 400, 10, 6
    p = torch.randn(n, d, generator=g, dtype=torch.float64)
    pt = p + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)  # upstream error
    w = torch.randn(t, d, generator=g, dtype=torch.float64)
    st = LayerStats(patch=pt.T @ pt / n, cross=p.T @ pt / n, damping=1e-2)
    lam = st.damping * st.patch.diagonal().mean()
    ws = corrected_weight(w, st)

    def objective(m):
        return float(((p @ w.T - pt @ m.T) ** 2).sum() / n + lam * ((w - m) ** 2).sum())

    grad = 2 * (ws @ st.patch - w @ st.cross) + 2 * lam * (ws - w)
    assert grad.norm() <= 1e-9 * w.norm() * st.patch.norm()
    best = objective(ws)
    for _ in range(10):
        assert best <= objective(ws + 1e-3 * torch.randn(ws.shape, generator=g,
                                                          dtype=torch.float64))


def _mlp_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12)).double().eval()
    g = torch.Generator().manual_seed(2)
    basis = torch.randn(6, 16, generator=g, dtype=torch.float64)
    batches = [(torch.randn(64, 6, generator=g, dtype=torch.float64) @ basis
                + 0.05 * torch.randn(64, 16, generator=g, dtype=torch.float64), None)
               for _ in range(4)]
    plan = Plan("custom", 12, 1, (16, 1, 1),
                (LayerPlan("0", "svd", 4, linear_spec(24, 16, name="0")),
                 LayerPlan("2", "svd", 4, linear_spec(12, 24, name="2"))),
                base_macs=16 * 24 + 24 * 12, base_params=0)
    return model, batches, plan


def test_second_layer_fit_is_optimal_for_the_original_output():
    """After the first layer is compressed, the sequential fit of the second is the best rank-4
    fit of the original's second-layer output from the compressed first layer's output: its
    regularised objective is no larger (1e-9) than that of the plain activation fit, which
    targets the original input, and strictly smaller here."""
    model, batches, plan = _mlp_and_batches()
    orig_stats, _ = collect_input_stats(model, batches, plan)
    student = copy.deepcopy(model)
    decompose_(student, replace(plan, layers=plan.layers[:1]), stats={"0": orig_stats["0"]})
    lp = plan.layers[1]
    st, note = collect_paired_stats(model, student, batches, lp.name, lp.spec, ("patch",))
    assert note is None and st.cross is not None
    svd, w = get_factorization("svd"), model[2].weight.detach()
    seq = svd.reconstruct(svd.decompose(w, lp.spec, 4, stats=st), lp.spec)
    act = svd.reconstruct(svd.decompose(w, lp.spec, 4, stats=orig_stats["2"]), lp.spec)
    p = torch.cat([torch.relu(model[0](x)) for x, _ in batches]).detach()
    pt = torch.cat([torch.relu(student[0](x)) for x, _ in batches]).detach()
    lam = st.damping * st.patch.diagonal().mean()

    def objective(m):
        return float(((p @ w.T - pt @ m.T) ** 2).sum() / p.shape[0] + lam * ((w - m) ** 2).sum())

    assert objective(seq) <= objective(act) + 1e-9
    assert objective(seq) < 0.99 * objective(act)


def test_paired_statistics_match_a_direct_computation():
    """Σ̃ and C = E[p p̃ᵀ] from the hooks equal the moments computed from the layers' inputs
    directly (float64, 1e-12), and the forward stops at the layer (the layers after it never
    run)."""
    model, batches, plan = _mlp_and_batches()
    student = copy.deepcopy(model)
    with torch.no_grad():
        student[0].weight.mul_(0.9)
    calls = []
    student[2].register_forward_hook(lambda *a: calls.append(1))
    st, _ = collect_paired_stats(model, student, batches, "2", plan.layers[1].spec, ("patch",))
    p = torch.cat([torch.relu(model[0](x)) for x, _ in batches]).detach()
    pt = torch.cat([torch.relu(student[0](x)) for x, _ in batches]).detach()
    assert torch.allclose(st.patch, pt.T @ pt / len(p), atol=1e-12, rtol=0)
    assert torch.allclose(st.cross, p.T @ pt / len(p), atol=1e-12, rtol=0)
    assert calls == []


def test_auto_fit_is_sequential_with_calibration_inputs():
    from lrcompress.commands.compress import CompressConfig, fit_of
    from lrcompress.model.plan import Target

    auto = CompressConfig(target=Target("flops", 0.5))
    assert fit_of(auto, has_calib=True) == "sequential"
    assert fit_of(auto, has_calib=False) == "weight"
    with pytest.raises(Exception, match="choose one of"):
        CompressConfig(target=Target("flops", 0.5), fit="greedy")


@pytest.mark.parametrize("max_bytes", [1, 40_000, 1 << 30])
def test_reference_inputs_equal_stopped_forwards_with_fewer_forwards(max_bytes):
    """The original's layer inputs from windows of captured layers equal the input of a forward
    stopped at each layer (bit for bit), and the windows take at most one forward per batch and
    layer (budget of 1 byte: one layer per window), one per batch when everything fits."""
    from lrcompress.model.input_stats import ReferenceInputs
    from tests.conftest import tiny_resnet

    model = tiny_resnet()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 1, 32, 32, generator=g), None) for _ in range(3)]

    def layer_input(name, x):  # a whole forward with a hook: the reference
        got = []
        h = model.get_submodule(name).register_forward_pre_hook(
            lambda _m, a: got.append(a[0].detach()))
        model(x)
        h.remove()
        return got[0]

    ref = ReferenceInputs(model, batches, names, max_bytes=max_bytes)
    with torch.no_grad():
        for name in names:
            for b, (x, _) in enumerate(batches):
                assert torch.equal(ref.get(name, b), layer_input(name, x))
    assert ref.forwards <= len(names) * len(batches)
    if max_bytes == 1:
        assert ref.forwards == len(names) * len(batches)
    if max_bytes == 1 << 30:
        assert ref.forwards == len(batches)
    if max_bytes == 40_000:
        assert len(batches) < ref.forwards < len(names) * len(batches)


def test_paired_statistics_are_the_same_with_captured_reference_inputs():
    """collect_paired_stats with ReferenceInputs gives the moments of the stopped-forward path
    exactly (the same tensors go in)."""
    from lrcompress.model.input_stats import ReferenceInputs
    from lrcompress.model.layers import find_layers
    from tests.conftest import tiny_resnet

    model = tiny_resnet()
    student = tiny_resnet(seed=1)  # "already compressed" upstream: other weights
    specs = {s.name: s for s in find_layers(model, (1, 32, 32)) if s.kind == "conv2d"}
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 1, 32, 32, generator=g), None) for _ in range(2)]
    ref = ReferenceInputs(model, batches, list(specs))
    for name in list(specs)[-3:]:
        kinds = ("channel", "patch") if specs[name].kernel != (1, 1) else ("patch",)
        a, _ = collect_paired_stats(model, student, batches, name, specs[name], kinds)
        b, _ = collect_paired_stats(model, student, batches, name, specs[name], kinds,
                                    reference=ref)
        assert torch.equal(a.cross, b.cross) and torch.equal(a.patch, b.patch)
        assert not torch.equal(a.cross, a.patch)  # the two models' inputs differ


@pytest.mark.parametrize("width", [300, 700, 1031])
def test_wide_second_moments_summed_as_an_upper_block_triangle_equal_the_full_product(width):
    """A second moment wide enough to be summed by blocks (upper block triangle, mirrored)
    equals ``Σ xᵀx / n`` over the same rows (float64, 1e-12) and is exactly symmetric."""
    from lrcompress.model import input_stats

    g = torch.Generator().manual_seed(4)
    blocks = [torch.randn(n, width, generator=g, dtype=torch.float64) for n in (50, 17)]
    moment = input_stats._Moment()
    for x in blocks:
        moment.add(x, x)
    x = torch.cat(blocks)
    got = moment.mean()
    assert moment.upper == (width >= 2 * input_stats.SYM_BLOCK)
    assert torch.allclose(got, x.T @ x / len(x), atol=1e-12, rtol=0)
    assert torch.equal(got, got.T)


def test_the_statistics_pass_hands_back_the_models_outputs():
    """The input statistics' pass returns the model's outputs on each batch, bit for bit those
    of a plain forward (rene distils towards them instead of running the model again)."""
    from lrcompress.model.input_stats import collect_layer_stats

    model, batches, plan = _mlp_and_batches()
    lp = plan.layers[0]
    outputs: list = []
    collect_layer_stats(model, batches, {lp.name: lp.spec}, {lp.name: ("patch",)},
                        outputs=outputs)
    with torch.no_grad():
        want = [model(x).float() for x, _ in batches]
    assert len(outputs) == len(batches)
    assert all(torch.equal(a, b) for a, b in zip(outputs, want))
