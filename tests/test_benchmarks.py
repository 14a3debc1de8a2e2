"""The benchmark harness end to end on a tiny model and synthetic data (a few seconds).

It runs the real command lines in-process (the executor the harness uses in a child process),
then checks what every row records and that RESULTS.md and the plot are written from it.
"""

from __future__ import annotations

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
                  lat_threads=(1,), lat_batches=(1, 4), lat_repeats=2, lat_warmup=0,
                  decompose_bench=False, threads=0)
TOL = 0.02  # MACs ratio within 2 points below the target (channel/rank rounding on a tiny net)


def _runner(tmp_path, **kw) -> Runner:
    ckpts = tmp_path / "ckpt"
    ckpts.mkdir(exist_ok=True)
    if not (ckpts / TINY.checkpoint).exists():
        torch.save(tiny_resnet().state_dict(), ckpts / TINY.checkpoint)
    paths = Paths(ckpts, tmp_path / "work", tmp_path / "results" / PROFILE.name)
    paths.results.mkdir(parents=True, exist_ok=True)
    return Runner(PROFILE, paths, "synthetic:64", executor=inprocess_executor,
                  say=lambda s: None, **kw)


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


def test_lrcompress_row_and_report(tmp_path):
    runner = _runner(tmp_path)
    rows = plan_rows([TINY], (0.5,), ("tt",), ("uniform",))
    (res,) = runner.run(rows)
    _check_row(res, 0.5)
    search, export = res["commands"]
    assert search["command"].startswith("lrcompress search ")
    assert "--method uniform" in search["command"] and "--max-steps 2" in search["command"]
    assert export["command"].startswith("lrcompress export ")
    assert res["seconds"]["rank_selection"] >= 0 and res["seconds"]["export"] > 0
    stored = json.loads((runner.paths.results / f"{rows[0].id}.json").read_text())
    assert stored["top1"] == res["top1"]

    # a second run keeps the result; a changed budget makes it stale
    assert runner.stored(rows[0]) == (stored, "done")
    changed = _runner(tmp_path)
    changed.profile = replace(PROFILE, max_steps=3)
    assert changed.stored(rows[0])[1] == "stale (budget changed)"

    md = render(tmp_path / "results", tmp_path / "RESULTS.md")
    text = md.read_text()
    assert "### tiny" in text and "lrcompress uniform" in text and "lrcompress search" in text
    assert (tmp_path / "results_top1_vs_macs_test.png").stat().st_size > 1000


def test_torch_pruning_row(tmp_path):
    pytest.importorskip("torch_pruning")
    runner = _runner(tmp_path)
    (res,) = runner.run([Row(TINY, TP, None, 0.5)])
    _check_row(res, 0.5)
    assert "benchmarks/tp_baseline.py" in res["commands"][0]["command"]
    assert res["pruning"]["macs_ratio"] == pytest.approx(res["macs"]["ratio"])
    assert res["pruning"]["ignored_layers"] == ["fc"]


def test_equivalent_decompositions_are_found(tmp_path):
    import timm

    runner = _runner(tmp_path)
    # test_resnet's 3x3 convs are factorized differently by tt, tucker2 and cp
    assert runner.equivalences(TINY, ("tt", "tucker2", "cp")) == {}
    # mobilenetv2's factorizable layers are all 1x1 convs: SVD whatever --decomp says
    mnv2 = ModelSpec("mnv2", "timm:mobilenetv2_100", "mnv2.pt")
    net = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10, in_chans=1)
    torch.save(net.state_dict(), runner.ckpt(mnv2))
    assert runner.equivalences(mnv2, ("tt", "tucker2", "cp")) == {"tucker2": "tt", "cp": "tt"}
    res = runner.run_row(Row(mnv2, "uniform", "cp", 0.5))
    assert res["status"] == "equivalent" and res["same_as"] == "mnv2__uniform__tt__0.5"
