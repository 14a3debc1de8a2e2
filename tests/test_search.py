"""`search` end to end on a tiny real architecture with synthetic data (fast, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

import lrcompress
from lrcompress.commands.search import SearchConfig, search
from lrcompress.data import DataConfig
from lrcompress.errors import TargetError, UserError
from lrcompress.measure.metrics import independent_macs
from lrcompress.model.plan import Plan, Target
from lrcompress.model.weights import load
from lrcompress.rank.rene import ReneConfig

FAST_RENE = ReneConfig(iters=6, warmup=2)
DATA = DataConfig(batch_size=16, test_subset=32)


def _cfg(**kw):
    base = dict(target=Target("flops", 0.5), decomp="tt", method="uniform", rank_multiple=1,
                calib_batches=2, data=DATA, rene=FAST_RENE, input_size=(1, 32, 32))
    base.update(kw)
    return SearchConfig(**base)


@pytest.mark.parametrize("decomp", ["svd", "tucker2", "cp", "cp4", "tt"])
@pytest.mark.parametrize("kind", ["flops", "params"])
def test_uniform_meets_target_for_every_decomp(resnet_ckpt, tmp_path, decomp, kind):
    res = search(str(resnet_ckpt["pt"]), "synthetic:64", tmp_path / "run",
                 _cfg(decomp=decomp, target=Target(kind, 0.5)))
    tot = res.report["totals"]
    ratio = tot["macs_ratio"] if kind == "flops" else tot["params_ratio"]
    assert 0.40 <= ratio <= 0.5  # tiny model: coarse rank steps, so a looser floor than resnet18
    model = load(tmp_path / "run")
    assert independent_macs(model, (1, 32, 32)) == tot["macs_after"]


@pytest.mark.parametrize("decomp", ["tt", "tucker2", "auto"])
def test_rene_meets_target_and_is_deterministic(resnet_ckpt, tmp_path, decomp):
    cfg = _cfg(method="rene", decomp=decomp, target=Target("flops", 0.4))
    a = search(str(resnet_ckpt["pt"]), "synthetic:64", tmp_path / "a", cfg)
    b = search(str(resnet_ckpt["pt"]), "synthetic:64", tmp_path / "b", cfg)
    assert a.plan.to_dict()["layers"] == b.plan.to_dict()["layers"]
    r = a.report["totals"]["macs_ratio"]
    assert 0.34 <= r <= 0.4
    assert a.report["search"]["steps"], "the search trace is recorded"


@pytest.mark.parametrize("kind", ["flops", "params"])
def test_sensitivity_meets_target(resnet_ckpt, tmp_path, kind):
    res = search(str(resnet_ckpt["pt"]), "synthetic:64", tmp_path / "run",
                 _cfg(method="sensitivity", target=Target(kind, 0.4)))
    tot = res.report["totals"]
    ratio = tot["macs_ratio"] if kind == "flops" else tot["params_ratio"]
    assert 0.34 <= ratio <= 0.4
    assert all(v > 0 for v in res.report["search"]["sensitivity"].values())


def test_plan_files_keep_the_historical_method_key():
    """LayerPlan.factorization and Plan.rank_method are stored under "method" (as before the
    rename), so existing plan.json files and model.safetensors headers load unchanged."""
    old = {"schema": 1, "lrcompress_version": "0.1.0", "arch": "timm:test_resnet",
           "num_classes": 10, "in_chans": 1, "input_size": [1, 32, 32], "base_macs": 100,
           "base_params": 10, "target": {"kind": "flops", "ratio": 0.5}, "method": "uniform",
           "macs": 100, "params": 10, "layers": [{
               "name": "fc", "method": "svd", "rank": 3, "spec": {
                   "name": "fc", "kind": "linear", "in_ch": 8, "out_ch": 10, "kernel": [1, 1],
                   "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1,
                   "bias": True, "in_hw": [1, 1], "out_hw": [1, 1], "unsupported": ""}}]}
    plan = Plan.from_dict(old)
    assert plan.rank_method == "uniform" and plan.layers[0].factorization == "svd"
    d = plan.to_dict()
    assert d["method"] == "uniform" and d["layers"][0]["method"] == "svd"
    assert "rank_method" not in d and "factorization" not in d["layers"][0]
    assert Plan.from_json(plan.to_json()) == plan


def test_reload_is_bit_exact_and_plan_round_trips(resnet_ckpt, tmp_path):
    res = search(str(resnet_ckpt["safetensors"]), "synthetic:64", tmp_path / "run", _cfg())
    plan = Plan.from_json((tmp_path / "run" / "plan.json").read_text())
    assert plan.to_dict() == res.plan.to_dict()
    m1 = lrcompress.load(tmp_path / "run" / "model.safetensors")
    m2 = lrcompress.load(tmp_path / "run")
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(m1(x), m2(x))
    # Re-applying the plan to the original weights reproduces the same compressed model.
    again = search(str(resnet_ckpt["pt"]), "synthetic:64", tmp_path / "again",
                   _cfg(plan_path=str(tmp_path / "run" / "plan.json")))
    assert again.plan.to_dict()["layers"] == res.plan.to_dict()["layers"]
    m3 = lrcompress.load(tmp_path / "again")
    assert torch.allclose(m3(x), m1(x), atol=1e-5)


def test_infeasible_target_fails_before_writing(resnet_ckpt, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TargetError, match="cannot be reached"):
        search(str(resnet_ckpt["pt"]), "synthetic:64", out, _cfg(target=Target("flops", 0.01)))
    assert not out.exists()


def test_non_empty_output_is_refused(resnet_ckpt, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        search(str(resnet_ckpt["pt"]), "synthetic:64", out, _cfg())
    assert (out / "keep.txt").read_text() == "mine"


def test_input_checkpoint_is_untouched(resnet_ckpt, tmp_path):
    before = resnet_ckpt["pt"].read_bytes()
    search(str(resnet_ckpt["pt"]), "synthetic:64", tmp_path / "run", _cfg())
    assert resnet_ckpt["pt"].read_bytes() == before


def test_report_has_the_main_fields(resnet_ckpt, tmp_path):
    search(str(resnet_ckpt["pt"]), "synthetic:64", tmp_path / "run", _cfg())
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    for key in ("command", "seed", "versions", "target", "totals", "accuracy", "layers",
                "search", "seconds"):
        assert key in rep
    row = next(r for r in rep["layers"] if r["factorization"] != "dense")
    assert row["macs_after"] < row["macs_before"] and 0 <= row["rel_error"] < 1


def test_run_files_have_normal_permissions(resnet_ckpt, tmp_path):
    import os
    import stat

    search(str(resnet_ckpt["pt"]), "synthetic:64", tmp_path / "run", _cfg())
    mask = os.umask(0)
    os.umask(mask)
    mode = stat.S_IMODE((tmp_path / "run" / "plan.json").stat().st_mode)
    assert mode == 0o666 & ~mask


def test_unfinished_run_resumes_from_its_state(resnet_ckpt, tmp_path):
    from lrcompress.recover.finetune import FinetuneConfig

    cfg = _cfg(method="rene", finetune=FinetuneConfig(epochs=2, lr=0.01))
    out = tmp_path / "run"
    first = search(str(resnet_ckpt["pt"]), "synthetic:64", out, cfg)
    first_weights = lrcompress.load(out).state_dict()
    # A kill after the last epoch but before the results were written:
    for name in ("report.json", "model.safetensors", "plan.json"):
        (out / name).unlink()
    again = search(str(resnet_ckpt["pt"]), "synthetic:64", out, cfg)
    assert again.report["resumed"] is True
    assert again.report["search"] == first.report["search"]  # the search was not re-run
    assert again.report["finetune"]["resumed_from_epoch"] == 2
    assert again.plan.to_dict() == first.plan.to_dict()
    resumed_weights = lrcompress.load(out).state_dict()
    assert all(torch.equal(resumed_weights[k], first_weights[k]) for k in first_weights)
    # A finished run is not silently redone, and a different command does not resume it.
    with pytest.raises(UserError, match="already holds the finished result"):
        search(str(resnet_ckpt["pt"]), "synthetic:64", out, cfg)
    (out / "report.json").unlink()
    with pytest.raises(UserError, match="different command"):
        search(str(resnet_ckpt["pt"]), "synthetic:64", out, _cfg(method="uniform"))


def _rene_ctx(resnet_ckpt, poison):
    """A rene SelectContext on test_resnet with two calibration batches; ``poison`` picks which
    of them get a NaN input image."""
    from lrcompress.commands.search import build_problem
    from lrcompress.model.loading import load_model
    from lrcompress.rank import SelectContext
    from lrcompress.rank.signals import Cache

    lm = load_model(str(resnet_ckpt["pt"]))
    problem = build_problem(lm.model, lm.info, (1, 32, 32), _cfg(method="rene"))
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(2):
        x = torch.randn(8, 1, 32, 32, generator=g)
        if i in poison:
            x[0, 0, 0, 0] = float("nan")
        batches.append((x, torch.randint(0, 10, (8,), generator=g)))
    return SelectContext(lm.model, problem, batches, torch.device("cpu"), Cache(None), 0,
                         {"rene": FAST_RENE})


def test_rene_rolls_back_non_finite_steps(resnet_ckpt):
    """Every second α step sees a NaN batch: those steps are skipped (recorded), the logits stay
    finite and the search still ends with a plan."""
    from lrcompress.rank.rene import softmax_search as rene_search

    ctx = _rene_ctx(resnet_ckpt, poison={1})
    choice, trace = rene_search(ctx, FAST_RENE)
    assert len(choice) == len(ctx.problem.layers)
    skipped = [s for st in trace["steps"] for s in st.get("skipped_steps", [])]
    assert skipped and set(skipped) == {"α"}
    assert all(torch.isfinite(torch.tensor(st["ce"])).all() for st in trace["steps"])


def test_rene_stops_with_the_stage_named_when_nan_persists(resnet_ckpt):
    from lrcompress.rank.rene import softmax_search as rene_search

    ctx = _rene_ctx(resnet_ckpt, poison={0, 1})
    with pytest.raises(UserError, match=r"rene, α step.*NaN/Inf on 3 consecutive steps"):
        rene_search(ctx, FAST_RENE)


def test_rene_resumes_after_the_last_finished_search_step(resnet_ckpt, tmp_path, monkeypatch):
    """Killed in its second narrowing step, the search resumes there (step 1 is not redone) and
    ends with the same plan and trace as an uninterrupted search."""
    import lrcompress.rank.rene as rene

    ctx = _rene_ctx(resnet_ckpt, poison=set())
    full_choice, full_trace = rene.softmax_search(ctx, FAST_RENE)
    assert len(full_trace["steps"]) >= 2, "the tiny problem must need several steps"

    from lrcompress.rank.selection_state import SelectionState

    ctx.state = SelectionState(tmp_path / "search-rene.pt", "fingerprint")
    real, calls = rene._optimise, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rene, "_optimise", dying)
    with pytest.raises(KeyboardInterrupt):
        rene.softmax_search(ctx, FAST_RENE)
    assert (tmp_path / "search-rene.pt").exists()
    monkeypatch.setattr(rene, "_optimise", real)
    calls_after = {"n": 0}

    def counting(*a, **k):
        calls_after["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(rene, "_optimise", counting)
    choice, trace = rene.softmax_search(ctx, FAST_RENE)
    assert calls_after["n"] == len(full_trace["steps"]) - 1
    assert choice == full_choice

    def results(t):  # the trace without the measured seconds of each step
        return json.dumps({**t, "steps": [{k: v for k, v in s.items() if k != "seconds"}
                                          for s in t["steps"]]}, sort_keys=True)

    assert results(trace) == results(full_trace)


def test_narrow_deep_stem_model_does_not_crash_the_search(tmp_path):
    """oneDNN's CPU conv backward segfaulted in rene's α step on this model (8-channel layers at
    224×224); the search must finish (in a subprocess, so a crash fails the test, not pytest)."""
    import os
    import subprocess
    import sys

    arch = "timm:resnet18(channels=(8,8,8,8),stem_type='deep',stem_width=8)"
    cmd = [sys.executable, "-m", "lrcompress.cli", "search", arch, "--data", "synthetic:16",
           "--target-flops", "0.5", "--batch-size", "8", "--search-iters", "10",
           "--search-warmup", "2", "--search-weight-steps", "-o", str(tmp_path / "run")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    # --search-weight-steps reaches the search: its weight steps ran (one loss per iteration)
    search_trace = json.loads((tmp_path / "run" / "report.json").read_text())["search"]
    assert search_trace["config"]["weight_steps"] is True
    assert len(search_trace["steps"][0]["recon"]) == len(search_trace["steps"][0]["ce"]) > 0


@pytest.mark.parametrize("method", ["energy", "vbmf", "lsvt", "gsvt", "isvt", "bisect"])
def test_every_baseline_writes_its_reports(resnet_ckpt, tmp_path, method):
    """Each method's trace has its own shape (isvt's "steps" is a count, rene's a list): the
    Markdown/HTML reports must render for all of them (isvt crashed the report once)."""
    cfg = _cfg(method=method, target=Target("params", 0.5),
               method_config={"isvt": {"steps": 3}})
    search(str(resnet_ckpt["pt"]), "synthetic:64", tmp_path / "run", cfg)
    assert {"report.md", "report.html"} <= {p.name for p in (tmp_path / "run").iterdir()}


def test_sensitivity_cache_is_keyed_by_the_calibration_data(resnet_ckpt):
    """A shared --cache-dir must not hand one calibration split's loss measurements to another
    (seeds 1 and 2 once got seed 0's sensitivities): other batches, other entries."""
    from lrcompress.rank.signals import Cache, sensitivities

    ctx = _rene_ctx(resnet_ckpt, poison=set())
    cache = Cache(None)
    ref = [0] * len(ctx.problem.layers)
    a = sensitivities(ctx.model, ctx.problem, ref, ctx.batches[:1], ctx.device, cache)
    n = len(cache.data)
    again = sensitivities(ctx.model, ctx.problem, ref, ctx.batches[:1], ctx.device, cache)
    assert again == a and len(cache.data) == n  # same batches: served from the cache
    b = sensitivities(ctx.model, ctx.problem, ref, ctx.batches[1:2], ctx.device, cache)
    assert len(cache.data) == 2 * n  # other batches (same count): measured anew
    assert b != a


def test_rene_can_keep_a_layer_dense(resnet_ckpt, monkeypatch):
    """Keeping a layer dense is a search candidate: with a prior that makes any factorization of
    the cheapest layer costly, the search keeps it dense (and stops narrowing it), and the
    repair still lands the plan within the budget."""
    import lrcompress.rank.rene as rene
    import lrcompress.rank.sensitivity as sensitivity
    from lrcompress.rank.problem import DENSE

    ctx = _rene_ctx(resnet_ckpt, poison=set())
    layers = ctx.problem.layers
    k = min(range(len(layers)), key=lambda i: layers[i].dense.cost("flops"))

    def prior(ctx_, errs, *a, **kw):
        scores = [[0.0] * len(lo.options) for lo in layers]
        scores[k] = [0.0 if o.factorization == DENSE else -1.0 for o in layers[k].options]
        return scores, [1.0] * len(layers)

    monkeypatch.setattr(sensitivity, "truncation_scores", prior)
    plan, trace = rene.select(ctx)
    name = layers[k].spec.name
    assert [st["chosen_ranks"][name][0] for st in trace["steps"]] == [DENSE] * len(trace["steps"])
    planned = {lp.name: lp.macs for lp in plan.layers}
    cost = ctx.problem.fixed_cost + sum(planned.get(lo.spec.name, lo.dense.macs) for lo in layers)
    assert cost <= ctx.problem.budget
