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
import timm
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


# ------------------------------------------------------------------ accuracy at equal latency
# Bookkeeping only: planning, the latency figure taken from a Torch-Pruning row, reuse, the
# verdict and the rendered table, all from fake rows (no training, no timing).


def _tp_result(batch_ratio: dict) -> dict:
    runs = [{"engine": "onnxruntime", "device": "cpu", "threads": t, "batch": b,
             "median_ms": {"original": 10.0, "compressed": 10.0 * r}}
            for (t, b), r in batch_ratio.items()]
    return {"id": "r18__torch-pruning__0.5", "date": "2026-12-02T00:00:00+00:00",
            "latency": {"runs": runs}}


def _eq_result(target: float, batch: int, tp_top1: float, lr_top1: float, tp_lat: float,
               lr_lat: float, status: str = "ok") -> dict:
    from benchmarks._equal_latency import KIND

    row = {"kind": KIND, "id": f"r18__eqlat__rene__tucker2__{target:g}__b{batch}",
           "profile": "quick",
           "model": "r18", "method": "rene", "decomp": "tucker2", "target": target,
           "batch": batch, "date": "2026-12-02T10:00:00+00:00", "status": status,
           "target_latency": tp_lat, "row_wall_s": 100.0, "commit": "abc1234",
           "loadavg_start": [2.0, 2.0, 2.0], "loadavg_end": [2.5, 2.0, 2.0],
           "key": {"torch_pruning_row": {"id": f"r18__torch-pruning__{target:g}"}, "rounds": 3},
           "commands": [{"command": f"lrcompress search r18.pt --target-latency {tp_lat:.4f} "
                                    f"--latency-batch {batch}"}]}
    if status != "ok":
        return {**row, "error": "search failed"}

    def ratio(m):
        return {"median": m, "min": m - 0.01, "max": m + 0.01, "n": 3}

    return {**row,
            "torch_pruning": {"top1": {"after_ft": tp_top1}, "macs_ratio": target - 0.002,
                              "target_rounds": [tp_lat] * 3, "row_latency_ratio": tp_lat},
            "lrcompress": {"top1": {"original": 88.85, "after_ft": lr_top1},
                           "macs_ratio": target + 0.1,
                           "test_samples": 2000,
                           "search_latency": {"met": True, "measured_ratio": lr_lat,
                                              "attempts": [{}, {}]}},
            "latency": {"ratio": {TP: ratio(tp_lat), "lrcompress": ratio(lr_lat)},
                        "original_ms": ratio(0.7),
                        "rounds": [{"median_ms": {"original": 1.0, TP: tp_lat + d,
                                                  "lrcompress": lr_lat}}
                                   for d in (-0.02, 0.0, 0.02)]}}


def test_equal_latency_rows_are_planned_batch_major():
    from benchmarks._equal_latency import plan_eq_rows, tp_rows

    rows = plan_eq_rows([TINY], (0.5, 0.3), (1, 64))
    assert [r.id for r in rows] == [
        "tiny__eqlat__rene__tucker2__0.5__b1", "tiny__eqlat__rene__tucker2__0.3__b1",
        "tiny__eqlat__rene__tucker2__0.5__b64", "tiny__eqlat__rene__tucker2__0.3__b64"]
    assert [r.id for r in tp_rows(rows)] == ["tiny__torch-pruning__0.5",
                                             "tiny__torch-pruning__0.3"]
    assert rows[0].tp_row == Row(TINY, TP, None, 0.5)


def test_narrowed_equal_latency_rows_follow_their_plain_row_and_share_its_tp_row():
    from benchmarks._equal_latency import plan_eq_rows, rerun_commands, tp_rows

    other = replace(TINY, name="other")
    rows = plan_eq_rows([TINY, other], (0.5,), (64,), narrow=0.3, narrow_models=("tiny",))
    assert [r.id for r in rows] == ["tiny__eqlat__rene__tucker2__0.5__b64",
                                    "tiny__eqlat__rene__tucker2__nh0.3__0.5__b64",
                                    "other__eqlat__rene__tucker2__0.5__b64"]
    assert rows[1].label == "rene/tucker2 + narrow 0.3" and rows[1].tp_row == rows[0].tp_row
    assert len(tp_rows(rows)) == 2
    res = [{"profile": "quick", "method": "rene", "decomp": "tucker2", "model": "tiny",
            "target": 0.5, "batch": 64, "key": {"rounds": 7, "narrow_hidden": 0.3}}]
    assert rerun_commands(res)[0].endswith("--eq-rounds 7 --eq-narrow-hidden 0.3 "
                                           "--eq-narrow-models tiny")


def test_equal_latency_takes_the_1_thread_figure_at_the_batch():
    from benchmarks._equal_latency import tp_figure

    tp = _tp_result({(1, 1): 0.64, (2, 1): 0.9, (1, 64): 0.52})
    assert tp_figure(tp, 1) == pytest.approx(0.64)
    assert tp_figure(tp, 64) == pytest.approx(0.52)
    assert tp_figure(tp, 8) is None  # not timed by the harness at that batch


def test_equal_latency_rows_are_reused_until_their_torch_pruning_row_changes(tmp_path):
    from benchmarks._equal_latency import EqualLatency, plan_eq_rows

    class FakeRunner:
        force = False
        paths = Paths(tmp_path, tmp_path / "work", tmp_path / "results")

        def key(self, row):
            return {"budget": {"max_steps": 100}, "code": "abc"}

    FakeRunner.paths.results.mkdir()
    eq = EqualLatency(FakeRunner(), rounds=3)
    row = plan_eq_rows([TINY], (0.5,), (1,))[0]
    tp = _tp_result({(1, 1): 0.6})
    assert eq.stored(row, tp) == (None, "no result yet")
    stored = {"status": "ok", "key": eq.key(row, tp)}
    eq.result_path(row).write_text(json.dumps(stored))
    assert eq.stored(row, tp) == (stored, "done")
    assert eq.stored(row, {**tp, "date": "2026-12-03T00:00:00+00:00"})[1] == \
        "stale (torch_pruning_row changed)"
    assert EqualLatency(FakeRunner(), rounds=5).stored(row, tp)[1] == "stale (rounds changed)"


def test_equal_latency_winner_counts_noise():
    from benchmarks._equal_latency import winner

    def r(m, half=0.01):
        return {"median": m, "min": m - half, "max": m + half}

    # 2000 images: 2 SE ~ 1.34 pt; latency noise here max(0.02, 0.02) = 0.02
    assert winner(87.0, 88.6, r(0.60), r(0.60), 2000) == "lrcompress"
    assert winner(88.0, 86.0, r(0.60), r(0.61), 2000) == "Torch-Pruning"
    assert winner(88.0, 88.5, r(0.60), r(0.61), 2000) == "tie (within noise)"
    assert winner(88.0, 88.5, r(0.60), r(0.70), 2000).startswith("Torch-Pruning (as accurate")
    assert winner(87.0, 89.0, r(0.60), r(0.70), 2000).startswith("neither: lrcompress")
    assert winner(88.0, 88.2, r(0.60), r(0.50), 2000).startswith("lrcompress (as accurate")


def test_equal_latency_table_is_rendered(tmp_path):
    root = tmp_path / "results"
    d = root / "quick" / "equal_latency"
    d.mkdir(parents=True)
    rows = [_eq_result(0.5, 1, 87.3, 88.6, 0.64, 0.63), _eq_result(0.3, 1, 87.0, 85.0, 0.43,
                                                                      0.52),
            _eq_result(0.5, 64, 0, 0, 0.52, 0, status="infeasible")]
    for r in rows:
        (d / f"{r['id']}.json").write_text(json.dumps(r))
    tp_cmd = "OMP_NUM_THREADS=1 python benchmarks/tp_baseline.py r18.pt --target-flops 0.5"
    (d / "r18__torch-pruning__0.5.json").write_text(json.dumps(  # not an equal-latency row
        {"id": "r18__torch-pruning__0.5", "model": "r18", "commands": [{"command": tp_cmd}]}))
    text = render(root, tmp_path / "RESULTS.md").read_text()
    assert "### Accuracy at equal measured latency" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("| r18 |")]
    assert len(lines) == 3
    assert lines[0].startswith("| r18 | rene/tucker2 | 0.5 | 1 | 0.640 | 0.640 [0.630–0.650] | "
                               "87.30 | 0.630 [0.620–0.640] | 88.60 | +1.30 |")
    assert lines[0].endswith("| met (0.630, 2 attempt(s)) | tie (within noise) |")
    assert "| 0.5 | 64 | 0.520 |" in lines[1] and "infeasible" in lines[1]
    assert "| 0.3 | 1 |" in lines[2] and lines[2].endswith("| Torch-Pruning |")  # worse, slower
    assert "--target-latency 0.6400 --latency-batch 1" in text  # the exact commands
    # lrcompress vs Torch-Pruning round by round: 0.63 against 0.62 / 0.64 / 0.66 ms
    assert "| r18__eqlat__rene__tucker2__0.5__b1 | 0.640, 0.640, 0.640 | 0.640 | 0.984 (2 of 3) |" \
        in text
    assert "| 2.00 → 2.50 |" in text  # load averages: the machine is shared
    assert "Originals: r18 88.85 % top-1 on 2000 test images" in text
    assert ("OMP_NUM_THREADS=1 python benchmarks/compare.py --quick --equal-latency --models r18 "
            "--targets 0.5,0.3 --latency-batch 1,64 --eq-method rene --eq-decomp tucker2 "
            "--eq-rounds 3") in text
    assert f"- `r18__torch-pruning__0.5` (the Torch-Pruning row)\n  - `{tp_cmd}`" in text


@pytest.mark.skipif(not HAVE_TP, reason="torch-pruning (the bench extra) is not installed")
def test_torch_pruning_prunes_a_vit_head_by_head(tmp_path):
    """A two-block ViT pruned to half its MACs: every head keeps the same width, the attention
    blocks agree with their qkv layer, and the saved model reloads to the same outputs."""
    from benchmarks.tp_baseline import attention_heads, load_pruned, prune_to_macs, save_pruned
    from lrcompress.model.arch import build, parse_arch

    arch = "timm:vit_tiny_patch16_224(img_size=28,patch_size=4,depth=2)"
    torch.manual_seed(0)
    model = build(parse_arch(arch), 10, 1).eval()
    pruned, info = prune_to_macs(model, (1, 28, 28), 0.5)
    assert 0.5 - TOL <= info["macs_ratio"] <= 0.5
    blocks = list(attention_heads(pruned).values())
    assert len(blocks) == 2
    for a in blocks:
        assert a.qkv.out_features == 3 * a.num_heads * a.head_dim
        assert a.proj.in_features == a.num_heads * a.head_dim
        assert a.scale == pytest.approx(a.head_dim ** -0.5, rel=1e-9)
    assert any(a.head_dim < 64 for a in blocks)  # heads were narrowed, not left whole
    x = torch.randn(3, 1, 28, 28)
    save_pruned(pruned, arch, 10, 1, tmp_path / "vit.safetensors")
    reloaded = load_pruned(tmp_path / "vit.safetensors")
    with torch.no_grad():
        assert torch.equal(pruned(x), reloaded(x))
        for a in attention_heads(reloaded).values():
            a.fused_attn = False  # the eager path uses a.scale; it must match the fused one
        assert torch.allclose(pruned(x), reloaded(x), atol=1e-5)


@pytest.mark.skipif(not HAVE_TP, reason="torch-pruning (the bench extra) is not installed")
def test_narrow_hidden_baseline_runs_end_to_end(tmp_path, fast_torch):
    """tp_baseline.py --narrow-hidden: every inverted-residual block narrowed to a third, the
    same fine-tuning, and a model that reloads to the same outputs (run() checks it) and
    reports what it narrowed; --target-flops with it is refused."""
    from benchmarks.tp_baseline import cli, load_pruned

    torch.manual_seed(0)
    net = timm.create_model("mobilenetv2_035", pretrained=False, num_classes=10, in_chans=1)
    ckpt = tmp_path / "mnv2.pt"
    torch.save(net.state_dict(), ckpt)
    out = tmp_path / "run"
    common = [str(ckpt), "--arch", "timm:mobilenetv2_035", "--input-size", "1,28,28",
              "--data", "synthetic:64", "--batch-size", "16", "--max-steps", "2", "--device",
              "cpu", "-o", str(out)]
    assert cli(common + ["--narrow-hidden", "0.3", "--target-flops", "0.5"]) == 2
    assert not out.exists()
    assert cli(common + ["--narrow-hidden", "0.34"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "hidden-id" and report["target"] is None
    blocks = report["pruning"]["blocks"]
    assert len(blocks) == 16 and all(b["kept"] < b["width"] for b in blocks)
    assert all(b["kept"] % 8 == 0 for b in blocks)
    assert report["totals"]["macs_ratio"] < 0.6
    assert report["onnx"]["parity"]["top1_agreement"] == 1.0  # run() raises on a failed check
    assert load_pruned(out).blocks[1][0].conv_dw.groups == blocks[0]["kept"]
