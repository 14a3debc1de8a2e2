"""Every family of model a user brings, end to end on tiny configurations (issue 20 §5):
``search`` (uniform ranks, synthetic data) → ``export`` (ONNX, parity) → ``eval``.

Swin (windowed attention folded into the batch dimension), EfficientNet (squeeze-and-excitation
blocks), MobileNetV3 (timm's Linear classifier), ConvNeXt, ViT and DeiT. Each run must meet its
MACs target by torch's own count, factorize layers, export a graph that ONNX Runtime runs like
PyTorch, and give reasons for every layer it leaves dense that are true of that layer.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from click.testing import CliRunner

from lrcompress.cli import main
from lrcompress.measure.metrics import independent_macs
from lrcompress.model.census import census
from lrcompress.model.loading import load_model

# name -> (architecture, MACs target); all at 3×32×32, 10 classes, ranks on a grid of 8.
MODELS = {
    "swin": ("timm:swin_tiny_patch4_window7_224(img_size=32,window_size=2,embed_dim=32,"
             "depths=(1,1),num_heads=(1,2))", 0.5),
    "efficientnet": ("timm:test_efficientnet", 0.6),
    "mobilenetv3": ("timm:mobilenetv3_small_050", 0.6),
    "convnext": ("timm:test_convnext", 0.5),
    "vit": ("timm:test_vit(img_size=32,patch_size=8)", 0.5),
    "deit": ("timm:deit_tiny_patch16_224(img_size=32,patch_size=8,depth=2)", 0.5),
}
SIZE = (3, 32, 32)
# Every reason a layer may be left dense on these models, as the search words it.
TRUE_REASONS = ("stem/classifier", "depthwise conv", "too small")


pytestmark = pytest.mark.usefixtures("fast_torch")  # one thread, no export traces


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], obj={})
    assert r.exit_code == 0, r.output
    return r.output


def _layer_module(model, name):
    return model.get_submodule(name)


@pytest.mark.parametrize("name", list(MODELS))
def test_search_export_eval(name, tmp_path):
    arch, target = MODELS[name]
    run = tmp_path / name
    invoke("search", arch, "--num-classes", "10", "--input-size", ",".join(map(str, SIZE)),
           "--method", "uniform", "--target-flops", target, "--rank-multiple", "8",
           "--data", "synthetic:64", "--batch-size", "16", "--calib-batches", "2",
           "--bn-batches", "2", "-o", run)
    report = json.loads((run / "report.json").read_text())
    tot = report["totals"]
    assert tot["macs_ratio"] <= target + 1e-12
    model = load_model(str(run)).model
    assert independent_macs(model, SIZE) == tot["macs_after"]  # torch's count, not ours
    layers = [row for row in report["layers"] if row["factorization"] != "dense"]
    assert len(layers) >= 3, report["layers"]
    if name == "swin":  # attention over 16 windows folded into the batch, factorized
        assert "layers.0.blocks.0.attn.qkv" in {row["name"] for row in layers}
    original = load_model(arch, num_classes=10).model
    for row in layers:  # a linear layer or a 1×1 conv is factorized by SVD and says so
        dense = _layer_module(original, row["name"])
        if isinstance(dense, torch.nn.Linear) or dense.kernel_size == (1, 1):
            assert row["factorization"] == "svd", row
    for layer, reason in report["skipped"].items():
        assert reason.startswith(TRUE_REASONS), (layer, reason)
        mod = _layer_module(original, layer)
        if reason.startswith("depthwise"):
            assert mod.groups == mod.in_channels > 1
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 for m in original.modules())
    assert (report["bn_recalibration"] is not None) == has_bn  # no BatchNorm, no such stage
    assert ("bn_recalibration" in report["seconds"]) == has_bn

    invoke("export", run, "--no-latency")
    par = json.loads((run / "report.json").read_text())["export"]["onnx"]["parity"]
    assert par["max_rel_diff"] <= 1e-3 and par["top1_agreement"] == 1.0
    assert (run / "model.onnx").is_file()

    out = invoke("eval", run, "--data", "synthetic:64", "--no-latency", "--json")
    ev = json.loads(out[out.index("{"):])
    assert ev["model"]["factorized_layers"] == len(layers)
    assert ev["macs"] == tot["macs_after"]


def test_mobilenetv3_classifier_is_a_plain_linear():
    # timm's Linear only differs from nn.Linear under TorchScript: a candidate, kept dense only
    # as the classifier (and factorizable with --include).
    m = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
    rows = {r.name: r for r in census(m, "timm:mobilenetv3_small_050", SIZE).rows}
    assert rows["classifier"].skip_reason.startswith("stem/classifier")
    included = census(m, "timm:mobilenetv3_small_050", SIZE, include=("classifier",)).rows
    assert next(r for r in included if r.name == "classifier").candidate


def test_matrix_layers_offer_svd_options_only():
    # A 1×1 conv or a linear layer is the SVD split under every method: its options say "svd".
    from lrcompress.model.layers import LayerSpec
    from lrcompress.rank.problem import layer_options

    for spec in (LayerSpec("pw", "conv2d", 64, 128, in_hw=(8, 8), out_hw=(8, 8)),
                 LayerSpec("fc", "linear", 64, 128, in_hw=(16, 1), out_hw=(16, 1))):
        opts = layer_options(spec, ["tt", "tucker2", "cp"], 8)
        assert len(opts) > 2 and {o.factorization for o in opts[:-1]} == {"svd"}
        assert opts[-1].factorization == "dense"
