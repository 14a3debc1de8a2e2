"""Reports people can read: accuracy axes from a sensible baseline, ranks in scale, readable layer
axes, the per-layer latency table folded away, one summary of slower layers, chains labelled by
what they are, and no BatchNorm step where there is no BatchNorm."""

from __future__ import annotations

import copy
import re
import struct

import pytest
import timm
import torch

import lrcompress
from lrcompress.measure.latency import slower_summary
from lrcompress.report.write import (
    VERTICAL_LAYERS_MAX,
    accuracy_limits,
    build_blocks,
    chain_label,
    plot_accuracy,
    plot_macs,
    plot_ranks,
    to_html,
    to_markdown,
)
from lrcompress.util.progress import Progress

from .conftest import tiny_resnet


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


def layer(i: int, kernel=3, factorization="tt", rank=8, chain=True) -> dict:
    r = {"name": f"stage{i // 10}.block{i % 10}.conv", "kind": "conv2d",
         "shape": [32, 32, kernel, kernel], "factorization": factorization, "rank": rank,
         "macs_before": 100_000, "macs_after": 40_000, "params_before": 9216,
         "params_after": 3000, "rel_error": 0.1, "decomposition_retries": 0}
    if chain:
        r.update(chain="svd" if kernel == 1 else factorization, full_rank=32,
                 break_even_rank=28)
    return r


def report(n_layers: int, top1=(10.0, 10.2), slower=()) -> dict:
    layers = [layer(i) for i in range(n_layers)]
    lat_rows = [{"name": r["name"], "factorization": "tt", "rank": 8, "batch": b,
                 "dense_ms": 0.1, "factorized_ms": 0.1 / (0.5 + 0.01 * i if i in slower else 1.5),
                 "speedup": 0.5 + 0.01 * i if i in slower else 1.5, "ideal_speedup": 2.5,
                 "slower": i in slower}
                for i, r in enumerate(layers) for b in (1, 8)]
    acc = {"top1": top1[0], "top5": 50.0, "loss": 2.3, "n": 100}
    return {
        "model": {"arch": "timm:test", "source": "x.pt", "input_size": [1, 32, 32],
                  "num_classes": 10},
        "config": {"decomp": "tt", "method": "uniform"},
        "target": {"kind": "flops", "ratio": 0.5},
        "data": {"spec": "synthetic:64", "test_samples": 100},
        "totals": {"macs_before": 4_000_000, "macs_after": 2_000_000, "macs_ratio": 0.5,
                   "params_before": 300_000, "params_after": 150_000, "params_ratio": 0.5},
        "accuracy": {"original": acc, "decomposed": dict(acc, top1=top1[1])},
        "layers": layers, "skipped": {}, "search": {}, "seconds": {}, "versions": {},
        "export": {"latency": {
            "config": {"repeats": 5, "warmup": 2}, "cpu_count": 2, "ideal_speedup": 2.0,
            "original_weights": "checkpoint", "layers": lat_rows, "notes": [],
            "warnings": [f"w{i}" for i in slower],
            "runs": [{"engine": "onnxruntime", "device": "cpu", "threads": 1, "batch": 1,
                      "median_ms": {"original": 1.0, "compressed": 0.6}, "speedup": 1.67,
                      "achieved_over_ideal": 0.83}]}},
    }


@pytest.mark.parametrize("values", [[0.0, 0.2], [10.0, 10.2, 9.8], [88.85, 87.75, 88.2],
                                    [99.5, 99.9], [0.0, 100.0], [50.0]])
def test_accuracy_axis_spans_at_least_ten_points_and_holds_every_value(values):
    lo, hi = accuracy_limits(values)
    assert 0.0 <= lo and hi <= 100.0
    assert hi - lo >= 10.0 - 1e-9  # a 0.2-point gap fills at most 2 % of the axis
    assert lo < min(values) or min(values) == 0.0
    assert hi > max(values) or max(values) == 100.0


def test_accuracy_plot_draws_with_original_marked():
    png = plot_accuracy(report(8, top1=(0.0, 0.2)))
    assert png_size(png)[0] > 0


@pytest.mark.parametrize("plot", [plot_ranks, plot_macs])
def test_layer_axes_turn_horizontal_past_forty_layers(plot):
    w, h = png_size(plot(report(8)))
    assert w > h  # few layers: names along the x axis
    many = VERTICAL_LAYERS_MAX + 20
    w2, h2 = png_size(plot(report(many)))
    assert h2 > w2 and h2 >= 0.17 * 100 * many * 0.8  # ~17 px per layer name at 100 dpi


def test_rank_plot_falls_back_to_absolute_ranks_for_old_reports():
    rep = report(8)
    for r in rep["layers"]:
        for k in ("chain", "full_rank", "break_even_rank"):
            r.pop(k)
    assert png_size(plot_ranks(rep))[0] > 0


def test_matrix_layers_are_labelled_svd_whatever_the_plan_says():
    assert chain_label(layer(0, kernel=1, chain=False)) == "svd"  # an old report's 1x1 "tt"
    assert chain_label(dict(layer(0, chain=False), kind="linear", shape=[10, 96])) == "svd"
    assert chain_label(layer(0, kernel=3, chain=False)) == "tt"
    assert chain_label({"factorization": "dense", "kind": "linear", "shape": [4, 4]}) == "dense"
    rep = report(4)
    rep["layers"][1] = layer(1, kernel=1, factorization="tucker2", chain=False)
    md = to_markdown(build_blocks(rep))
    layers_table = md.split("## Layers", 1)[1]
    row = next(line for line in layers_table.splitlines() if "stage0.block1.conv" in line)
    assert "| svd |" in row and "tucker2" not in row
    latency_row = next(line for line in md.split("<details>", 1)[1].splitlines()
                       if line.startswith("| stage0.block1.conv"))
    assert "| svd |" in latency_row


def test_per_layer_latency_is_folded_and_slower_layers_summarised_once():
    slower = (3, 5, 7, 11, 13)
    rep = report(50, slower=slower)
    md = to_markdown(build_blocks(rep))
    main_table = md.index("| engine | device |")
    folded = md.index("<details><summary>Per-layer latency")
    assert main_table < folded < md.index("</details>") < md.index("## Layers")
    assert "## Per-layer latency" not in md
    inside = md[folded:md.index("</details>")]
    assert inside.count("SLOWER") == 2 * len(slower)  # two batch sizes per layer
    warnings = [line for line in md.splitlines() if line.startswith("- Warning:")]
    assert len(warnings) == 1
    assert f"{len(slower)} of 50 factorized layers" in warnings[0]
    named = re.findall(r"stage\d\.block\d\.conv", warnings[0])
    assert named == ["stage0.block3.conv", "stage0.block5.conv", "stage0.block7.conv"]
    html = to_html(build_blocks(rep))
    assert html.count("<details>") == 1 and html.index("<details>") < html.index("</details>")
    assert html.count("Warning:") == 1


def test_slower_summary_is_none_when_nothing_is_slower():
    rows = report(6)["export"]["latency"]["layers"]
    assert slower_summary(rows) is None
    rows[0] = dict(rows[0], slower=True, speedup=0.8)
    assert slower_summary(rows).startswith("1 of 6 factorized layers")


class Stages(Progress):
    def __init__(self):
        self.names = []

    def stage(self, name, total=None):
        self.names.append(name)


@pytest.mark.parametrize("arch,has_bn", [("test_vit", False), ("test_resnet", True)])
def test_no_batchnorm_step_on_a_model_without_batchnorm(arch, has_bn, tmp_path):
    torch.manual_seed(0)
    model = (tiny_resnet(in_chans=3) if arch == "test_resnet" else
             timm.create_model(arch, num_classes=10, img_size=32).eval())
    x = torch.randn(8, 3, 32, 32)
    calib = [(x, torch.zeros(8, dtype=torch.long))] * 2
    seen = Stages()
    res = lrcompress.compress(copy.deepcopy(model), x[:2], target_flops=0.7, method="uniform",
                              rank_multiple=1, calib=calib, eval=calib, device="cpu",
                              fit="weight", progress=seen, run_dir=tmp_path / "run")
    announced = any("BatchNorm" in n for n in seen.names)
    assert announced == has_bn, seen.names
    assert (res.report["bn_recalibration"] is not None) == has_bn
    assert ("bn_recalibration" in res.report["seconds"]) == has_bn
    md = (tmp_path / "run" / "report.md").read_text()
    assert ("bn_recalibrated" in md) == has_bn
