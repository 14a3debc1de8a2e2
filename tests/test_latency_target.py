"""Latency targets with deterministic fake timers (no timing in tests).

The fake per-candidate timer makes a layer's time proportional to its MACs; the fake whole-model
timer counts the model's MACs (FlopCounterMode) and, where a test says so, a fixed cost per
conv/linear module — a graph-level effect the additive model does not see, so the first plan
misses and the re-solve must correct it.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import lrcompress
import lrcompress.commands.latency_stage as stages
from lrcompress.factorizations import get_factorization
from lrcompress.measure.latency_table import LatencyTable
from lrcompress.measure.latency_target import (
    LatencyConfig,
    WholeTiming,
    corrected_ratio,
    next_budget,
)
from lrcompress.measure.metrics import independent_macs
from lrcompress.model.costs import dense_macs

from .conftest import tiny_resnet
from .test_cli import assert_user_error, run

MS_PER_MAC = 1e-5
EX = torch.zeros(1, 1, 28, 28)


def fake_ms(spec, cand, slow_from=None, floor=0.0) -> float:
    """MACs-proportional; with ``slow_from``, chains of that rank or more take 3× dense; no chain
    takes less than ``floor`` × dense (small ranks then share one latency step)."""
    if cand.factorization == "dense":
        return dense_macs(spec) * MS_PER_MAC
    if slow_from is not None and cand.rank >= slow_from:
        return 3 * dense_macs(spec) * MS_PER_MAC
    chain = get_factorization(cand.factorization).macs(spec, cand.rank)
    return max(chain, floor * dense_macs(spec)) * MS_PER_MAC


def whole_ms(model: nn.Module, per_module: float) -> float:
    n = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    return independent_macs(model, (1, 28, 28)) * MS_PER_MAC + 0.05 + per_module * n


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Install the fake timers; returns a dict to tune them (``per_module``, ``slow_from``,
    ``no_speedup``) and count whole-model measurements (``whole_calls``)."""
    knobs = {"per_module": 0.0, "slow_from": None, "no_speedup": False, "whole_calls": 0,
             "slow_names": (), "floor": 0.0, "gain": 1.0}

    def table(cfg, cache_dir=None):
        return LatencyTable(cfg.engine_spec(), cache_dir=tmp_path / "lat",
                            timer=lambda spec, cands: [
                                fake_ms(spec, c, 0 if spec.name in knobs["slow_names"]
                                        else knobs["slow_from"], knobs["floor"])
                                for c in cands],
                            repeats=cfg.repeats)

    def whole(original, compressed, input_size, cfg):
        knobs["whole_calls"] += 1
        o = whole_ms(original, knobs["per_module"])
        c = o if compressed is None else whole_ms(compressed, knobs["per_module"])
        c = o - knobs["gain"] * (o - c)  # gain > 1: the graph saves more than its parts
        if knobs["no_speedup"] and compressed is not None:
            c = 0.99 * o
        return WholeTiming(o, c, 0.0, 0.0)

    monkeypatch.setattr(stages, "make_table", table)
    monkeypatch.setattr(stages, "measure_whole", whole)
    return knobs


def compress(**kw):
    # A grid of 8: test_resnet's layers are narrow (the default 16 leaves few ranks to choose).
    args = dict(target_latency=0.5, decomp="tucker2", method="uniform", device="cpu",
                calib=None, eval=None, rank_multiple=8)
    args.update(kw)
    return lrcompress.compress(tiny_resnet(), EX, **args)


def test_a_latency_target_is_met_exactly_when_the_additive_model_is_right(fake):
    res = compress()
    lat = res.report["latency"]
    assert lat["met"] is True and len(lat["attempts"]) == 1
    first = lat["attempts"][0]
    # MACs-proportional times: the estimate is the measurement, to rounding.
    assert first["estimated_ratio"] == pytest.approx(first["ratio"], abs=1e-4)  # 4 decimals
    assert first["ratio"] <= 0.5
    assert res.plan.target == lrcompress.Target("latency", 0.5)
    assert res.report["target"] == {"kind": "latency", "ratio": 0.5}


def test_a_missed_target_is_re_solved_with_corrected_costs(fake):
    fake["per_module"] = 0.4  # every conv/linear costs extra in the graph: chains cost more
    res = compress(target_latency=0.6)
    lat = res.report["latency"]
    ratios = [a["ratio"] for a in lat["attempts"]]
    assert len(ratios) >= 2 and ratios[0] > 0.6
    assert lat["met"] is True and ratios[-1] <= 0.6
    assert [a["solved_at"] for a in lat["attempts"]][1] < 0.6  # the budget was tightened
    assert independent_macs(res.model, (1, 28, 28)) == res.report["totals"]["macs_after"]


def test_a_target_still_missed_is_said_plainly_or_refused_under_strict(fake):
    fake["no_speedup"] = True
    res = compress(latency=LatencyConfig(max_resolves=1))
    lat = res.report["latency"]
    assert lat["met"] is False and "MISSES" in lat["summary"] and len(lat["attempts"]) == 2
    with pytest.raises(lrcompress.UserError, match="MISSES.*strict"):
        compress(latency=LatencyConfig(max_resolves=0, strict=True))


def test_an_unreachable_latency_is_refused_before_anything_is_written(fake, tmp_path):
    with pytest.raises(lrcompress.TargetError, match="cannot be reached.*Ask for"):
        compress(target_latency=0.02, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def floor_in(message: str) -> float:
    return float(re.search(r"runs at ([0-9.]+) ±", message).group(1))


def test_a_target_below_the_additive_floor_is_measured_before_it_is_refused(fake, tmp_path):
    with pytest.raises(lrcompress.TargetError, match="measured whole") as exact:
        compress(target_latency=0.02)
    estimated = floor_in(str(exact.value))  # the fake additive model is exact here
    fake["gain"] = 1.1  # the whole graph saves 1.1× what the layer times predict
    with pytest.raises(lrcompress.TargetError, match="Ask for") as real:
        compress(target_latency=0.02)
    measured = floor_in(str(real.value))
    assert measured == pytest.approx(1 - 1.1 * (1 - estimated), abs=2e-3)  # 3-decimal rounding
    target = (estimated + measured) / 2  # out of the additive model's reach, not of the graph's
    res = compress(target_latency=target, run_dir=tmp_path / "run")
    lat = res.report["latency"]
    assert lat["met"] is True and lat["measured_ratio"] <= target
    assert lat["floor"]["estimated"] > target > lat["floor"]["measured"]
    assert "measured whole it ran at" in (tmp_path / "run" / "report.md").read_text()


def test_a_plan_both_extreme_rules_pick_is_measured_once(fake):
    # MACs-proportional layer times: the fastest plan is the fewest-MACs plan.
    with pytest.raises(lrcompress.TargetError, match="measured whole"):
        compress(target_latency=0.02)
    assert fake["whole_calls"] == 2  # the original alone, then the one extreme plan


def test_a_model_that_factorizing_makes_slower_is_refused_without_asking_for_a_ratio_over_1(
        fake):
    fake["gain"] = -1.0  # whole, every factorized plan is slower than the original
    with pytest.raises(lrcompress.TargetError, match="does not make it faster") as e:
        compress(target_latency=0.02)  # below the layer times' floor: measured before refused
    assert floor_in(str(e.value)) > 1 and "Ask for" not in str(e.value)


def test_latency_aware_macs_target_never_ships_a_chain_slower_than_dense(fake):
    fake["slow_from"] = 24
    res = compress(target_latency=None, target_flops=0.6, latency=LatencyConfig(aware=True))
    assert res.plan.layers
    for lp in res.plan.layers:
        assert lp.rank < 24
        assert fake_ms(lp.spec, lp) < fake_ms(lp.spec, type(lp)("x", "dense", 0, lp.spec))
    assert res.report["latency"]["speedup"] > 1
    assert res.report["totals"]["macs_ratio"] <= 0.6


def test_latency_aware_keeps_every_macs_target_the_plain_search_reaches(fake):
    # Ranks below half the dense MACs all take half the dense time: one latency step, whose
    # top rank alone would be kept by snapping, so low MACs targets would become unreachable.
    fake["floor"] = 0.5
    plain = compress(target_latency=None, target_flops=0.2)
    aware = compress(target_latency=None, target_flops=0.2, latency=LatencyConfig(aware=True))
    assert plain.report["totals"]["macs_ratio"] <= 0.2
    assert aware.report["totals"]["macs_ratio"] <= 0.2


def test_the_latency_cache_is_reused_by_a_second_run(fake):
    first = compress()
    second = compress()
    assert first.report["latency"]["table"]["measured"] > 0
    assert second.report["latency"]["table"]["measured"] == 0
    assert second.plan == first.plan


def test_corrected_ratio_assumes_the_same_share_of_the_predicted_saving():
    # predicted 0.5 (saving 0.5), measured 0.6 (saving 0.4): 80 % of it was real; a target of
    # 0.5 then needs a predicted saving of 0.5 / 0.8.
    assert corrected_ratio(0.5, 0.5, 0.6, 0.5) == pytest.approx(1 - 0.5 / 0.8)
    assert corrected_ratio(0.394, 0.14, 0.48, 0.39) < 0  # 3× optimistic model: unreachable
    assert corrected_ratio(0.5, 0.5, 1.2, 0.5) == pytest.approx(0.5 * 0.5 / 1.2)  # no saving


def test_next_budget_stays_a_ratio_when_the_additive_scale_is_off():
    # Seen at batch 1 (resnet18, 0.3): estimate 0.392, measured 0.686 for target 0.396; the
    # secant is negative and the layer times' floor below 0: scale the budget by target/measured.
    assert corrected_ratio(0.396, 0.392, 0.686, 0.396) < 0
    assert next_budget(0.396, 0.392, 0.686, 0.396, floor=-0.05) == pytest.approx(
        0.396 * 0.396 / 0.686, rel=1e-12)
    # A secant below a real floor: one last try at the floor, then no more.
    assert next_budget(0.3, 0.35, 0.6, 0.35, floor=0.2) == pytest.approx(0.2, rel=1e-6)
    assert next_budget(0.3, 0.2, 0.6, 0.2 * (1 + 1e-9), floor=0.2) is None
    # The usual case: the secant itself.
    assert next_budget(0.5, 0.45, 0.55, 0.5, floor=0.2) == corrected_ratio(0.5, 0.45, 0.55, 0.5)


def test_no_chain_faster_than_dense_anywhere_is_a_clear_error(fake):
    fake["slow_from"] = 0  # every chain of every layer takes 3x the dense layer
    with pytest.raises(lrcompress.UserError, match="no factorized candidate of any layer"):
        compress()


def test_a_layer_with_no_chain_faster_than_dense_stays_dense(fake):
    slow = "layer4.0.conv2"
    fake["slow_names"] = (slow,)  # every chain of this layer takes 3x its dense time
    calib = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    for method in ("uniform", "rene", "sensitivity"):
        res = compress(method=method, calib=calib, target_latency=0.7,
                       rene=lrcompress.ReneConfig(iters=2, warmup=1, n_candidates=3))
        assert slow not in {lp.name for lp in res.plan.layers}, method
        assert "no factorized candidate is faster" in res.report["skipped"][slow], method
        assert res.report["latency"]["met"] is True, method


def test_speedup_is_the_inverse_latency_ratio(fake):
    res = compress(target_latency=None, target_speedup=2.0)
    assert res.report["target"]["ratio"] == pytest.approx(0.5)


# ------------------------------------------------------------------------- command line


def test_cli_latency_target_writes_the_verdict(fake, resnet_ckpt, tmp_path):
    code, out = run("search", resnet_ckpt["pt"], "--input-size", "1,28,28", "--data",
                    "synthetic:64", "--method", "uniform", "--decomp", "tucker2",
                    "--target-speedup", "2", "-o", tmp_path / "r", "--bn-batches", "0")
    assert code == 0, out
    assert "Latency (ort-cpu, 1 thread(s), batch 1)" in out and "meets the target" in out
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["latency"]["met"] is True and rep["config"]["latency"]["engine"] == "ort-cpu"


@pytest.mark.parametrize("args, words", [
    (["--target-latency", "0"], ["--target-latency 0.0 is out of range"]),
    (["--target-latency", "1.5"], ["out of range"]),
    (["--target-speedup", "1"], ["--target-speedup 1.0 must be a number above 1"]),
    (["--target-speedup", "nan"], ["above 1"]),
    (["--target-flops", "0.3", "--target-latency", "0.5"], ["exactly one target"]),
    (["--target-latency", "0.5", "--latency-aware"], ["--latency-aware goes with"]),
])
def test_cli_bad_latency_targets(args, words, resnet_ckpt, tmp_path):
    code, out = run("search", resnet_ckpt["pt"], "--input-size", "1,28,28", "--data",
                    "synthetic:64", *args, "-o", tmp_path / "r")
    assert_user_error(code, out, *words)
    assert not (tmp_path / "r").exists()


def test_cli_an_engine_that_is_not_here(resnet_ckpt, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, out = run("search", resnet_ckpt["pt"], "--input-size", "1,28,28", "--data",
                    "synthetic:64", "--target-latency", "0.5", "--latency-engine", "torch-cuda",
                    "-o", tmp_path / "r")
    assert_user_error(code, out, "torch-cuda needs a CUDA GPU")
    assert not (tmp_path / "r").exists()


def test_rene_and_sensitivity_take_latency_targets(fake):
    """The default rank method (and the loss-model one) solve a latency target too."""
    calib = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(2)]
    for method in ("rene", "sensitivity"):
        res = compress(method=method, calib=calib, target_latency=0.6,
                       rene=lrcompress.ReneConfig(iters=3, warmup=1, n_candidates=3))
        lat = res.report["latency"]
        assert lat["met"] is True and lat["measured_ratio"] <= 0.6, method


def test_the_report_files_show_the_latency_verdict(fake, tmp_path):
    compress(run_dir=tmp_path / "run")
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Latency" in md and "meets the target" in md
    assert "Target: measured latency at most 0.5 of the original's; measured" in md


def test_plans_built_only_to_be_timed_hold_small_finite_weights():
    # Empty chains hold leftover memory: denormals or NaNs would make the CPU, and so the
    # timing of an extreme plan before a refusal, many times slower than the real model.
    from lrcompress.commands.compress import timing_model

    model = tiny_resnet()
    plan = lrcompress.select_ranks(model, EX, target_flops=0.5, decomp="tucker2",
                                   method="uniform", device="cpu")
    m = timing_model(model, plan)
    for lp in plan.layers:
        for p in m.get_submodule(lp.name).parameters():
            assert torch.isfinite(p).all() and p.abs().max() < 0.2  # 0.02 std: < 10 sigma
    assert m(EX).isfinite().all()


def test_the_spread_of_paired_rounds_is_the_standard_error_of_their_median():
    """2 · 1.2533 · (IQR/1.349) / √n of the per-round ratios (1e-12); fewer than MIN_PAIRED
    rounds fall back to the single runs' IQRs propagated to the ratio."""
    import math
    import statistics

    from lrcompress.measure.latency_target import MIN_PAIRED

    paired = (0.60, 0.61, 0.62, 0.60, 0.63, 0.61, 0.62, 0.60, 0.61, 0.62)
    w = WholeTiming(1.0, 0.61, 0.2, 0.1, paired)
    q = statistics.quantiles(paired, n=4)
    assert w.spread == pytest.approx(2 * 1.2533 * (q[2] - q[0]) / 1.349 / math.sqrt(10),
                                     rel=1e-12)
    short = WholeTiming(1.0, 0.61, 0.2, 0.1, paired[:MIN_PAIRED - 1])
    assert short.spread == pytest.approx(0.61 * math.hypot(0.1, 0.1 / (2 * 0.61)), rel=1e-12)
    assert w.to_dict()["paired_rounds"] == 10 and "paired" not in w.to_dict()


def test_paired_rounds_cancel_a_slow_down_both_models_share():
    """Rounds slowed by up to 2× (the same factor for both models of a round, as on a busy
    machine): single-run IQRs call the ratio uncertain by > 0.05, the paired rounds by < 0.005
    — so a 0.02 miss is re-solved instead of passing as noise."""
    g = torch.Generator().manual_seed(0)
    slow = (1 + torch.rand(20, generator=g)).tolist()
    o = [1.0 * f for f in slow]
    c = [0.6 * f * (1 + 0.002 * (i % 3 - 1)) for i, f in enumerate(slow)]
    qo, qc = (torch.tensor(o).quantile(torch.tensor([0.25, 0.75])),
              torch.tensor(c).quantile(torch.tensor([0.25, 0.75])))
    unpaired = WholeTiming(sorted(o)[10], sorted(c)[10], float(qo[1] - qo[0]),
                           float(qc[1] - qc[0]))
    paired = WholeTiming(unpaired.original_ms, unpaired.compressed_ms, unpaired.original_iqr_ms,
                         unpaired.compressed_iqr_ms, tuple(b / a for a, b in zip(o, c)))
    assert unpaired.spread > 0.05
    assert paired.spread < 0.005


def test_measure_whole_keeps_every_rounds_ratio():
    """Real timing of a tiny model against itself on ORT (no figure asserted): one ratio per
    round, positive, and their median near the ratio of the medians (within 2×)."""
    from lrcompress.measure.latency_target import measure_whole

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).eval()
    model(EX)
    cfg = LatencyConfig(engine="ort-cpu", threads=1, batch=1, repeats=6, warmup=1)
    w = measure_whole(model, model, (1, 28, 28), cfg)
    assert len(w.paired) == 6 and all(r > 0 for r in w.paired)
    med = sorted(w.paired)[3]
    assert 0.5 * w.ratio <= med <= 2 * w.ratio
