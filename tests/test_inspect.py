"""``inspect`` tells the truth: the reachable ratio is search's own, a plan preview is the plan
search makes, and a compressed run shows its factorized chains as planned layers."""

from __future__ import annotations

import json
import math

import pytest

from lrcompress.commands.compress import CompressConfig, build_problem
from lrcompress.model.loading import load_model
from lrcompress.model.plan import Target

from .test_cli import assert_user_error, run, run_json

SIZE = ("--input-size", "1,32,32")


@pytest.fixture(scope="module")
def ckpt(module_ckpt):
    return module_ckpt


@pytest.fixture(scope="module")
def run_dir(ckpt):
    out = ckpt.parent / "run"
    code, text = run("search", ckpt, *SIZE, "--decomp", "tt", "--method", "uniform",
                     "--target-flops", "0.5", "--data", "synthetic:32", "--rank-multiple", "1",
                     "--batch-size", "16", "--bn-batches", "0", "-o", out)
    assert code == 0, text
    return out


def test_reachable_ratio_is_the_one_search_refuses_below(ckpt, tmp_path):
    d = run_json("inspect", ckpt, *SIZE, "--json")
    r = d["min_reachable_macs_ratio"]
    # The rank grid of 16 keeps a floor far above the MACs no factorization touches (the old,
    # misleading figure): 0.395 vs 0.032 on test_resnet at 32x32.
    assert r > d["untouchable_macs_ratio"] + 0.1, d["reachable"]
    assert d["reachable"]["finer_macs_ratio"] < r  # --rank-multiple 8 reaches lower
    below = math.floor(r * 1000) / 1000 - 0.002
    code, out = run("search", ckpt, *SIZE, "--method", "uniform", "--target-flops", below,
                    "--data", "synthetic:32", "-o", tmp_path / "r")
    assert_user_error(code, out, "cannot be reached", f"keeps {r:.3f}")
    assert not (tmp_path / "r").exists()
    lm = load_model(str(ckpt))
    above = math.ceil(r * 1000) / 1000 + 0.001
    problem = build_problem(lm.model, lm.info, (1, 32, 32),
                            CompressConfig(Target("flops", above), method="uniform"))
    assert problem.min_cost() / problem.base_cost == pytest.approx(r, abs=1e-12)


def test_reachable_ratio_follows_decomp_and_grid(ckpt):
    coarse = run_json("inspect", ckpt, *SIZE, "--json")
    fine = run_json("inspect", ckpt, *SIZE, "--rank-multiple", "8", "--json")
    svd = run_json("inspect", ckpt, *SIZE, "--decomp", "svd", "--json")
    assert fine["min_reachable_macs_ratio"] == pytest.approx(
        coarse["reachable"]["finer_macs_ratio"], abs=1e-12)
    assert fine["reachable"]["finer_macs_ratio"] is None  # nothing finer is quoted below 8
    assert svd["reachable"]["decomp"] == "svd"
    assert svd["min_reachable_macs_ratio"] != pytest.approx(coarse["min_reachable_macs_ratio"])


def test_preview_is_the_plan_search_makes(ckpt, run_dir):
    d = run_json("inspect", ckpt, *SIZE, "--target-flops", "0.5", "--method", "uniform",
                 "--rank-multiple", "1", "--json")
    p = d["preview"]
    searched = json.loads((run_dir / "plan.json").read_text())
    assert [(x["name"], x["rank"]) for x in p["plan"]["layers"]] == \
        [(x["name"], x["rank"]) for x in searched["layers"]]
    assert 0.45 <= p["macs_ratio"] <= 0.5  # meets the target, within one rank step or so
    assert {r["name"] for r in p["layers"]} == {x["name"] for x in searched["layers"]}
    for r in p["layers"]:
        assert 1 <= r["rank"] <= r["break_even_rank"] <= r["full_rank"], r
        assert r["macs_after"] < r["macs_before"], r


def test_preview_labels_matrix_layers_svd(ckpt):
    p = run_json("inspect", ckpt, *SIZE, "--target-flops", "0.45", "--method", "energy",
                 "--rank-multiple", "1", "--json")["preview"]
    assert p["macs_ratio"] <= 0.45
    one_by_one = [r for r in p["layers"] if r["shape"][2:] == [1, 1]]
    assert one_by_one, "test_resnet has factorizable 1x1 convs"
    assert all(r["chain"] == "svd" for r in one_by_one)
    assert all(r["chain"] == "tt" for r in p["layers"] if r["shape"][2:] == [3, 3])


def test_preview_refuses_data_methods_and_unreachable_targets(ckpt):
    code, out = run("inspect", ckpt, *SIZE, "--target-flops", "0.5", "--method", "rene")
    assert_user_error(code, out, "calibration data", "lrcompress search", "uniform")
    code, out = run("inspect", ckpt, *SIZE, "--target-flops", "0.05")
    assert_user_error(code, out, "cannot be reached")
    code, out = run("inspect", ckpt, *SIZE, "--target-flops", "0.5", "--target-params", "0.5")
    assert_user_error(code, out, "exactly one target")


@pytest.mark.parametrize("which", ["dir", "file"])
def test_inspect_run_shows_chains(run_dir, which):
    target = run_dir if which == "dir" else run_dir / "model.safetensors"
    d = run_json("inspect", target, "--json")
    plan = json.loads((run_dir / "plan.json").read_text())
    names = [x["name"] for x in plan["layers"]]
    assert d["compressed"] is True
    assert [c["name"] for c in d["chains"]] == names
    assert not [r["name"] for r in d["rows"] if r["name"].startswith(tuple(f"{n}." for n in
                                                                           names))]
    assert not set(names) & {r["name"] for r in d["rows"]}
    # the counted total of the compressed model is what the plan's arithmetic says (±1 %)
    assert abs(d["total_macs"] - plan["macs"]) <= 0.01 * plan["macs"]
    for c in d["chains"]:
        assert c["macs_after"] < c["macs_before"]
    code, text = run("inspect", target)
    assert code == 0 and "factorized layers" in text and "layers left dense" in text
    assert_user_error(*run("inspect", target, "--target-flops", "0.3"), "compressed model",
                      "original checkpoint")
