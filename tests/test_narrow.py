"""Hidden-width narrowing by interpolative decomposition (factorizations/interp, model/narrow)."""

from __future__ import annotations

import itertools
import json

import pytest
import timm
import torch
import torchvision
from torch import nn

from lrcompress.factorizations.interp import (
    covariance,
    interp_fit,
    refit,
    select_channels,
)
from lrcompress.measure.metrics import independent_macs
from lrcompress.model.input_stats import augmented_input_moments
from lrcompress.model.narrow import MlpParts, hidden_sites, narrow_hidden, width_for

SIZE = (1, 28, 28)


def moment_of(h: torch.Tensor) -> torch.Tensor:
    """``A = E[[h; 1][h; 1]ᵀ]`` of the rows of ``h``, as the layer's input statistics give it."""
    layer = nn.Linear(h.shape[1], 1).double()
    return augmented_input_moments(layer, {"": layer}, [(h, None)])[""]


def test_moment_sum_matches_the_direct_average():
    """Streamed over batches (and over the positions of a conv), the augmented moment is the
    direct average."""
    torch.manual_seed(0)
    h = torch.randn(500, 6, dtype=torch.float64) + 2.0
    layer = nn.Linear(6, 1).double()
    a = augmented_input_moments(layer, {"": layer}, [(h[:200], None), (h[200:], None)])[""]
    aug = torch.cat([h, torch.ones(500, 1, dtype=h.dtype)], 1)
    assert torch.allclose(a, aug.T @ aug / 500, atol=1e-12)
    assert torch.allclose(covariance(a), torch.cov(h.T, correction=0), atol=1e-10)
    conv = nn.Conv2d(6, 1, 1).double()
    maps = h.reshape(5, 10, 10, 6).permute(0, 3, 1, 2)  # the same 500 vectors at 5×10×10
    assert torch.allclose(augmented_input_moments(conv, {"": conv}, [(maps, None)])[""], a,
                          atol=1e-12)


def test_low_rank_activations_are_reproduced_exactly():
    """h spans 4 dimensions plus a constant: any 4 channels the greedy picks carry the rest, so
    W h is reproduced by W' h_J + c to rounding."""
    torch.manual_seed(1)
    z = torch.randn(2000, 4, dtype=torch.float64)
    h = z @ torch.randn(4, 12, dtype=torch.float64) + torch.randn(12, dtype=torch.float64)
    w = torch.randn(5, 12, dtype=torch.float64)
    fit = interp_fit(moment_of(h), w, 4)
    assert len(fit.keep) == 4 and fit.keep == tuple(sorted(fit.keep))
    approx = h[:, list(fit.keep)] @ fit.weight.T + fit.offset
    assert torch.allclose(approx, h @ w.T, atol=1e-6 * float((h @ w.T).abs().max()))
    assert fit.rel_error < 1e-8


def test_rel_error_is_the_measured_output_error():
    torch.manual_seed(2)
    h = torch.relu(torch.randn(3000, 10, dtype=torch.float64) @ torch.randn(10, 16,
                                                                           dtype=torch.float64))
    w = torch.randn(7, 16, dtype=torch.float64)
    fit = interp_fit(moment_of(h), w, 6)
    y = h @ w.T
    err = ((h[:, list(fit.keep)] @ fit.weight.T + fit.offset - y) ** 2).sum(1).mean()
    var = ((y - y.mean(0)) ** 2).sum(1).mean()
    assert fit.rel_error == pytest.approx(float(err / var), rel=1e-4)


def test_greedy_choice_is_no_worse_than_any_other_subset_of_two():
    """On a small problem, the greedy pair is within 25 % of the best of all pairs (its first
    pick is optimal; the second is the best given the first), and better than the median."""
    torch.manual_seed(3)
    h = torch.randn(4000, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    w = torch.randn(3, 6, dtype=torch.float64)
    a = moment_of(h)
    errs = sorted(refit(a, w, pair).rel_error for pair in itertools.combinations(range(6), 2))
    greedy = refit(a, w, select_channels(covariance(a), w, 2)).rel_error
    assert greedy <= 1.25 * errs[0] + 1e-12
    assert greedy <= errs[len(errs) // 2]


def test_select_channels_fills_with_dependent_channels_and_checks_k():
    h = torch.randn(100, 2, dtype=torch.float64).repeat(1, 3)  # 6 channels, 2 distinct
    w = torch.ones(1, 6, dtype=torch.float64)
    assert len(set(select_channels(covariance(moment_of(h)), w, 5))) == 5
    with pytest.raises(ValueError):
        select_channels(covariance(moment_of(h)), w, 7)


def _duplicate_half(model: nn.Module) -> None:
    """Make the second half of every supported block's hidden channels copies of the first half
    (expansion rows, BatchNorms, depthwise filters; an MLP's first layer), so the hidden
    activations repeat."""
    for site in hidden_sites(model)[0]:
        p, c = site.parts, site.parts.width
        half = c // 2
        mods = (p.fc1,) if isinstance(p, MlpParts) else (p.expand, p.bn1, p.dw, p.bn2)
        with torch.no_grad():
            for m in mods:
                for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
                    if t.dim() > 0 and t.shape[0] == c:
                        t[half:2 * half] = t[:half]


def _mbv2(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "vit":  # MLP blocks (fc1 → GELU → fc2 on tokens)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                                 in_chans=1, img_size=28, patch_size=4, depth=2).eval()
    if kind.startswith("convnext"):  # MLPs as 1×1 convs, or as linear layers on NHWC maps
        return timm.create_model("convnext_atto", pretrained=False, num_classes=10, in_chans=1,
                                 output_stride=16, depths=(1, 1, 1, 1), dims=(16, 32, 32, 32),
                                 ls_init_value=1.0, conv_mlp=kind == "convnext").eval()
    if kind == "timm":
        return timm.create_model("mobilenetv2_035", pretrained=False, num_classes=10,
                                 in_chans=1).eval()
    m = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35)
    m.features[0][0] = nn.Conv2d(1, m.features[0][0].out_channels, 3, 2, 1, bias=False)
    return m.eval()


def _calibrate_bn(model: nn.Module) -> None:
    """BatchNorm statistics of random inputs, so that activations are neither saturated nor
    dead (random weights with the default statistics drive ReLU6 to its clip), then random
    affine parameters so that hidden channels differ in scale and offset."""
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, *SIZE, generator=g))
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.5)


@pytest.mark.parametrize("kind", ["timm", "torchvision", "vit", "convnext", "convnext-nhwc"])
def test_repeated_hidden_channels_are_dropped_without_changing_the_model(kind, fast_torch):
    """Every block's hidden channels repeat (second half = first half): keeping half of them
    must give the same model outputs (to float32 rounding), half the hidden width everywhere,
    fewer MACs, and leave the input model untouched."""
    model = _mbv2(kind)
    _calibrate_bn(model)
    _duplicate_half(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(6)
    # the last blocks run on 1×1 maps: one row per image, and the fit needs more rows than
    # distinct channels (up to 168 here) to see every relation the test inputs will
    batches = [torch.randn(64, *SIZE) for _ in range(4)]
    x = torch.randn(8, *SIZE)
    narrowed, done = narrow_hidden(model, batches, keep=0.5, multiple=1)
    sites = hidden_sites(model)[0]
    assert len(done) == len(sites) >= 2
    assert all(d.kept == d.width // 2 and d.rel_error < 1e-6 for d in done)
    assert [s.parts.width for s in hidden_sites(narrowed)[0]] == [s.parts.width // 2
                                                                    for s in sites]
    with torch.no_grad():
        ref, out = model(x), narrowed(x)
    assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max()))
    assert independent_macs(narrowed, SIZE) < 0.85 * independent_macs(model, SIZE)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_narrowing_real_channels_keeps_the_output_close(fast_torch):
    """Without repeats, keeping 3/4 of the hidden width changes the logits by far less than
    dropping the same channels without the refit (plain slicing, the pruning baseline)."""
    model = _mbv2("timm")
    _calibrate_bn(model)
    torch.manual_seed(7)
    batches = [torch.randn(32, *SIZE) for _ in range(4)]
    narrowed, done = narrow_hidden(model, batches, keep=0.75, multiple=8)
    assert done and all(0 <= d.rel_error < 1 for d in done)
    x = torch.cat(batches[:2])
    with torch.no_grad():
        ref = model(x)
        err = (narrowed(x) - ref).norm() / ref.norm()
    assert err < 0.5


def test_unsupported_blocks_are_listed_with_a_reason():
    m = timm.create_model("test_efficientnet", pretrained=False, num_classes=10)
    sites, skipped = hidden_sites(m)
    assert not sites and skipped
    assert all("SqueezeExcite" in why for why in skipped.values())
    narrowed, done = narrow_hidden(m, [torch.randn(2, 3, 32, 32)], keep=0.5)
    assert done == []


def test_width_for_rounds_to_the_multiple_within_bounds():
    assert width_for(0.3, 96, 8) == 32
    assert width_for(0.01, 96, 8) == 8
    assert width_for(1.0, 100, 8) == 100
    with pytest.raises(ValueError):
        narrow_hidden(nn.Sequential(nn.Linear(2, 2)), [], keep=0.0)


# ------------------------------------------------------------------ in the search (--narrow-hidden)


@pytest.fixture(scope="module")
def mbv2_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("mbv2") / "mnv2.pt"
    torch.save(_mbv2("timm").state_dict(), path)
    return path


def _search(*args):
    from click.testing import CliRunner

    from lrcompress.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args], obj={})
    return r.exit_code, r.output


def test_search_narrows_then_factorizes_to_the_target_and_reloads(mbv2_ckpt, tmp_path,
                                                                 fast_torch):
    """--narrow-hidden 0.5 with a 0.3 MACs target: the plan records the narrowing, its MACs
    count matches FlopCounterMode on the shipped model (the search checks it) and meets the
    target, the model reloads from the run to the same outputs and exports to ONNX."""
    import lrcompress
    from lrcompress.deploy.onnx import check_parity, export_onnx
    from lrcompress.model.plan import Plan

    out = tmp_path / "run"
    code, text = _search("search", mbv2_ckpt, "--arch", "timm:mobilenetv2_035", "--input-size",
                         "1,28,28", "--method", "uniform", "--target-flops", "0.3",
                         "--narrow-hidden", "0.5", "--data", "synthetic:128", "--batch-size",
                         "32", "--calib-batches", "4", "--max-steps", "2", "-o", out)
    assert code == 0, text
    plan = Plan.from_json((out / "plan.json").read_text())
    assert plan.narrowing is not None and plan.narrowing.keep == 0.5
    assert all(k == width_for(0.5, w, 16) for _, w, k in plan.narrowing.blocks)
    assert plan.macs_ratio <= 0.3
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["macs_ratio"] == pytest.approx(plan.macs_ratio, abs=1e-12)
    assert len(report["narrowing"]["blocks"]) == len(plan.narrowing.blocks)
    assert report["narrowing"]["accuracy"]["n"] == report["accuracy"]["original"]["n"]
    model = lrcompress.load(out)
    x = torch.randn(4, *SIZE)
    assert independent_macs(model, SIZE) == plan.macs
    onnx_bytes = export_onnx(model, SIZE).SerializeToString()
    check_parity(model, onnx_bytes, x[:1], dynamic_batch=False)  # raises on a mismatch


def test_search_refuses_bad_narrowing(mbv2_ckpt, resnet_ckpt, tmp_path):
    common = ("--input-size", "1,28,28", "--data", "synthetic:64", "--target-flops", "0.5",
              "-o", tmp_path / "r")
    for bad in ("0", "1", "1.5"):
        code, out = _search("search", mbv2_ckpt, "--arch", "timm:mobilenetv2_035",
                            "--narrow-hidden", bad, *common)
        assert code == 2 and "strictly between 0 and 1" in out and "Traceback" not in out
    code, out = _search("search", resnet_ckpt["pt"], "--narrow-hidden", "0.5", *common)
    assert code == 2 and "narrows nothing" in out and "Traceback" not in out
    assert not (tmp_path / "r").exists()


def test_a_plan_with_narrowing_round_trips_and_is_not_reapplied(tmp_path):
    from lrcompress.errors import UserError
    from lrcompress.model.plan import Narrowing, Plan, check_fits

    n = Narrowing((("blocks.1.0", 48, 16),), 1000, 200, 0.3)
    plan = Plan("timm:mobilenetv2_035", 10, 1, SIZE, (), 3000, 400, narrowing=n)
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.macs == 1000 and again.params == 200
    assert "narrowing" not in Plan.from_json(plan.to_json()).__class__(
        "a", 1, 1, SIZE, (), 1, 1).to_dict()
    with pytest.raises(UserError, match="--narrow-hidden instead of --plan"):
        check_fits(again, [], arch=plan.arch, num_classes=10, in_chans=1, input_size=SIZE,
                   base_macs=3000, base_params=400)
