"""The benchmark harness end to end on a tiny model and synthetic data.

It runs the real command lines in-process (the executor the harness otherwise runs in a child
process), then checks what every row records and that RESULTS.md and the plot are written from
it. One runner serves the module, so the original model is exported to ONNX once.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest
import torch

from benchmarks._harness import Paths, Row, Runner, inprocess_executor, plan_rows
from benchmarks._profiles import PROFILES, TP, ModelSpec
from benchmarks.results import render
from tests.conftest import tiny_resnet

TINY = ModelSpec("tiny", "timm:test_resnet", "test_resnet.pt", input_size=(1, 32, 32))
PROFILE = replace(PROFILES["quick"], name="test", max_steps=2, test_subset=32, batch_size=16,
                  precision="fp32", lat_threads=(1,), lat_batches=(1, 4), lat_repeats=2,
                  lat_warmup=0, decompose_bench=False, threads=0)
TOL = 0.02  # MACs ratio at most 2 points under the target (rank/channel rounding, tiny net)
HAVE_TP = importlib.util.find_spec("torch_pruning") is not None


def _runner(root, profile=PROFILE) -> Runner:
    ckpts = root / "ckpt"
    ckpts.mkdir(exist_ok=True)
    if not (ckpts / TINY.checkpoint).exists():
        torch.save(tiny_resnet().state_dict(), ckpts / TINY.checkpoint)
    paths = Paths(ckpts, root / "work", root / "results" / profile.name)
    paths.results.mkdir(parents=True, exist_ok=True)
    return Runner(profile, paths, "synthetic:64", executor=inprocess_executor,
                  say=lambda s: None)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One lrcompress row and (with torch-pruning installed) one Torch-Pruning row."""
    root = tmp_path_factory.mktemp("bench")
    runner = _runner(root)
    rows = plan_rows([TINY], (0.5,), ("tt",), ("uniform", TP) if HAVE_TP else ("uniform",))
    results = {r["method"]: r for r in runner.run(rows)}
    return {"root": root, "runner": runner, "rows": rows, "results": results}


def _check_row(res: dict, target: float) -> None:
    assert res["status"] == "ok", res.get("error")
    assert target - TOL <= res["macs"]["ratio"] <= target + 1e-9
    assert res["macs"]["counted_by"] == "torch.utils.flop_counter.FlopCounterMode"
    assert 0 < res["params"]["ratio"] < 1
    for k in ("original", "before_ft", "after_ft"):
        assert 0 <= res["top1"][k] <= 100
    assert res["test_samples"] == 32
    runs = res["latency"]["runs"]
    assert {(r["engine"], r["threads"], r["batch"]) for r in runs} == {
        ("onnxruntime", 1, 1), ("onnxruntime", 1, 4)}
    assert all(r["speedup"] > 0 and r["achieved_over_ideal"] > 0 for r in runs)
    assert res["latency"]["ideal_speedup"] == pytest.approx(1 / res["macs"]["ratio"], rel=1e-3)
    assert all(c["returncode"] == 0 and c["command"] and c["peak_rss_mib"] > 0
               for c in res["commands"])
    assert res["date"] and res["key"]["code"] and res["machine"]["cores"] >= 1
    assert res["seconds"]["finetune"] > 0


def test_lrcompress_row(bench):
    res = bench["results"]["uniform"]
    _check_row(res, 0.5)
    search, export = res["commands"]
    assert search["command"].startswith("lrcompress search ")
    assert "--method uniform" in search["command"] and "--max-steps 2" in search["command"]
    assert export["command"].startswith("lrcompress export ")
    assert res["seconds"]["rank_selection"] >= 0 and res["seconds"]["export"] > 0
    stored = json.loads((bench["runner"].paths.results / f"{res['id']}.json").read_text())
    assert stored["top1"] == res["top1"]


@pytest.mark.skipif(not HAVE_TP, reason="torch-pruning not installed (pip install -e '.[bench]')")
def test_torch_pruning_row(bench):
    res = bench["results"][TP]
    _check_row(res, 0.5)
    assert "benchmarks/tp_baseline.py" in res["commands"][0]["command"]
    assert res["pruning"]["macs_ratio"] == pytest.approx(res["macs"]["ratio"])
    assert res["pruning"]["ignored_layers"] == ["fc"]


def test_rows_are_kept_until_budget_or_code_change(bench):
    runner, row = bench["runner"], bench["rows"][-1]
    stored = json.loads(runner.result_path(row.id).read_text())
    assert runner.stored(row) == (stored, "done")
    changed = _runner(bench["root"], replace(PROFILE, max_steps=3))
    assert changed.stored(row)[1] == "stale (budget changed)"
    changed.code = "0" * 16
    assert changed.stored(row)[1] == "stale (budget, code changed)"


def test_results_markdown_and_plot(bench):
    root = bench["root"]
    text = render(root / "results", root / "RESULTS.md").read_text()
    assert "### tiny" in text and "lrcompress uniform" in text
    assert "`lrcompress search " in text  # every row's command
    assert "Where lrcompress wins and where it loses" in text
    assert (root / "results_top1_vs_macs_test.png").stat().st_size > 1000


def test_equivalent_decompositions_are_found(bench):
    import timm

    runner = bench["runner"]
    # test_resnet's 3x3 convs are factorized differently by tt, tucker2 and cp
    assert runner.equivalences(TINY, ("tt", "tucker2", "cp")) == {}
    # mobilenetv2's factorizable layers are all 1x1 convs: SVD whatever --decomp says
    mnv2 = ModelSpec("mnv2", "timm:mobilenetv2_100", "mnv2.pt")
    net = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10, in_chans=1)
    torch.save(net.state_dict(), runner.ckpt(mnv2))
    assert runner.equivalences(mnv2, ("tt", "tucker2", "cp")) == {"tucker2": "tt", "cp": "tt"}
    res = runner.run_row(Row(mnv2, "uniform", "cp", 0.5))
    assert res["status"] == "equivalent" and res["same_as"] == "mnv2__uniform__tt__0.5"
