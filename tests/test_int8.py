"""INT8 export (issue 17): exact scale balancing, the QDQ graph, its accuracy check, the
all-or-nothing failure and bad input, on tiny real runs (timm test_resnet, synthetic data)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from lrcompress.calib.synthesize import SynthConfig
from lrcompress.cli import main
from lrcompress.commands import export_int8
from lrcompress.commands.export import ExportConfig, export_run
from lrcompress.commands.search import SearchConfig, search
from lrcompress.data import DataConfig
from lrcompress.deploy.int8 import (
    Int8Config,
    balance_chain,
    chain_spread,
    check_graph,
    nodes_for,
    unquantized,
)
from lrcompress.errors import UserError
from lrcompress.measure.latency import LatencyConfig
from lrcompress.model.plan import Plan, Target

FAST_LAT = LatencyConfig(repeats=2, warmup=1, batches=(1, 8), threads=(1,), torch=False,
                         per_layer=False)


@pytest.fixture(autouse=True, scope="module")
def _quiet_exporter():
    trace = logging.getLogger("torch.__trace")
    old = trace.level
    trace.setLevel(logging.INFO)
    yield
    trace.setLevel(old)


def _search(ckpt, out, data="synthetic:64", synth=None):
    cfg = SearchConfig(target=Target("flops", 0.5), decomp="tt", method="uniform",
                       rank_multiple=8, calib_batches=2,
                       data=DataConfig(batch_size=16, test_subset=64), input_size=(1, 32, 32))
    return search(str(ckpt), data, out, cfg, synth=synth).run_dir


@pytest.fixture(scope="module")
def ckpt(module_ckpt):
    return module_ckpt


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    """A run exported with --int8 --int8-balance (fast latency). Balancing: the random-weight
    chains' factor ranges span decades, and unbalanced INT8 agrees with FP32 on only ~77 %."""
    run = _search(ckpt, tmp_path_factory.mktemp("int8") / "run")
    res = export_run(run, ExportConfig(formats=("onnx-int8",), int8=Int8Config(balance=True),
                                       latency=FAST_LAT))
    return run, res


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], obj={})
    return r.exit_code, r.output


# ------------------------------------------------------------------------- scale balancing


def _skewed(conv: nn.Module, gen) -> None:
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
        scale = 10 ** torch.linspace(-2, 2, conv.weight.shape[0], dtype=torch.float64)
        conv.weight.mul_(scale.view(-1, *[1] * (conv.weight.dim() - 1)))


@pytest.mark.parametrize("kind", ["tt", "cp", "svd_linear"])
def test_scale_balancing_leaves_the_chain_output_unchanged(kind):
    """Float64, rtol 1e-6: balancing is exact, and it evens out the per-channel ranges."""
    gen = torch.Generator().manual_seed(0)
    if kind == "tt":  # 1×1 → 3×3 → 1×1, biases on every factor
        chain = nn.Sequential(nn.Conv2d(8, 6, 1), nn.Conv2d(6, 6, 3, padding=1),
                              nn.Conv2d(6, 12, 1))
    elif kind == "cp":  # 1×1 → depthwise 3×3 → 1×1: the scale passes through the depthwise
        chain = nn.Sequential(nn.Conv2d(8, 6, 1, bias=False),
                              nn.Conv2d(6, 6, 3, padding=1, groups=6),
                              nn.Conv2d(6, 12, 1))
    else:
        chain = nn.Sequential(nn.Linear(16, 5), nn.Linear(5, 9))
    chain = chain.double().eval()
    for m in chain:
        _skewed(m, gen)
    x = (torch.randn(4, 8, 7, 7, generator=gen, dtype=torch.float64) if kind != "svd_linear"
         else torch.randn(4, 16, generator=gen, dtype=torch.float64))
    with torch.no_grad():
        before, spread = chain(x), chain_spread(nn.Sequential(chain), ["0"])
        links = balance_chain(chain)
        after = chain(x)
    assert links == (1 if kind == "cp" else len(chain) - 1)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-9 * before.abs().max().item())
    assert chain_spread(nn.Sequential(chain), ["0"]) < spread / 10


# ------------------------------------------------------------------------------ the graph


def test_int8_graph_passes_the_checker_with_qdq_around_every_factor_conv(exported):
    run, res = exported
    path = run / "model.int8.onnx"
    # original.int8.onnx too exactly when export advised quantizing the original alone (which
    # depends on this machine's timings of the tiny model)
    advised = "original_int8_file" in res.section["int8"]
    assert path.is_file() and res.files == [path, *([run / "original.int8.onnx"] * advised)]
    proto = check_graph(path.read_bytes())  # raises on a checker failure
    layers = [lp.name for lp in Plan.from_json((run / "plan.json").read_text()).layers]
    assert layers and all(nodes_for(proto, [la]) for la in layers)  # every chain is in it
    assert unquantized(proto, layers) == []
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    sec = res.section["int8"]
    assert sec["factor_convs_without_qdq"] == [] and sec["balanced_chains"] == layers
    assert not (run / "model.onnx").exists()  # only the format asked for


def test_int8_top1_stays_close_to_fp32(exported):
    """On 64 test images of a random-weight test_resnet (near-tie logits, the hard case), INT8
    predicts the FP32 class on >= 85 % and its top-1 is within 6.25 points (4 images)."""
    _, res = exported
    acc = res.section["int8"]["accuracy"]
    assert acc["n"] == 64 and acc["labelled"]
    assert acc["agreement_with_fp32"]["compressed_int8"] >= 85.0
    assert abs(acc["drop"]) <= 6.25
    assert acc["drop"] == pytest.approx(acc["top1"]["compressed"]
                                        - acc["top1"]["compressed_int8"], abs=1e-3)


def test_int8_latency_rows_and_reports(exported):
    run, res = exported
    lat = res.section["int8"]["latency"]
    assert [(r["threads"], r["batch"]) for r in lat["runs"]] == [(1, 1), (1, 8)]
    for r in lat["runs"]:
        ms = r["median_ms"]
        assert r["speedup"]["original"] == 1.0
        assert r["lowrank_over_int8"] == pytest.approx(
            ms["original_int8"] / ms["compressed_int8"], rel=1e-3)
    rep = json.loads((run / "report.json").read_text())
    assert rep["export"]["int8"]["sha256"] == res.section["int8"]["sha256"]
    md = (run / "report.md").read_text()
    assert "## INT8" in md and "| compressed INT8 |" in md
    assert lat["tradeoff"].startswith("Against quantizing the original alone")
    assert lat["tradeoff"] in " ".join(md.split())


def _row(gain, threads=1, batch=64):
    return {"lowrank_over_int8": gain, "threads": threads, "batch": batch}


@pytest.mark.parametrize("gains, top1, advise", [
    ([3.3, 3.7], {"original_int8": 89.0, "compressed_int8": 88.8}, False),  # resnet18-like
    ([1.02, 1.30], {"original_int8": 82.8, "compressed_int8": 78.0}, True),  # mobilenetv2-like
    ([1.05, 1.08], {"original_int8": 82.8, "compressed_int8": 82.8}, True),  # adds nothing
    ([1.30], {"original_int8": 82.8, "compressed_int8": 82.5}, False),  # cheap gain: keep
    ([1.30], {}, False),  # no accuracy to weigh: the numbers only
])
def test_int8_tradeoff_advises_quantize_only_where_low_rank_adds_little(gains, top1, advise):
    """The verdict states the measured range and the top-1 difference, and advises quantizing
    the original alone below 1.10× or below 1.5× when more than 0.5 points are lost."""
    from lrcompress.deploy.int8 import int8_tradeoff

    text = int8_tradeoff([_row(g) for g in gains], {"top1": top1})
    assert f"{min(gains):.2f}–{max(gains):.2f}×" in text
    assert ("quantizing the original alone is likely the better trade" in text) == advise
    if top1:
        diff = top1["compressed_int8"] - top1["original_int8"]
        assert f"({diff:+.2f} points)" in text
    assert int8_tradeoff([], {"top1": top1}) is None


def test_gate_int8_reads_the_int8_rows(exported):
    run, res = exported
    sec = res.section["int8"]
    code, out = invoke("gate", run, "--int8", "--min-speedup", "0.01", "--max-top1-drop", "100",
                       "--speedup-batch", "8", "--json")
    assert code == 0, out
    checks = {c["budget"]: c for c in json.loads(out)["checks"]}
    sp = checks["speed-up >= 0.01x"]["value"]
    assert sp == sec["latency"]["runs"][1]["speedup"]["compressed_int8"]
    drop = checks["top-1 drop <= 100 pts"]["value"]
    t = sec["accuracy"]["top1"]
    assert drop == pytest.approx(t["original"] - t["compressed_int8"], abs=1e-3)
    code, _ = invoke("gate", run, "--int8", "--min-speedup", "1000", "--speedup-batch", "8")
    assert code == 1


# ---------------------------------------------------------------- failure and bad input


def test_a_forced_accuracy_failure_exits_3_and_leaves_run_as_it_was(exported, monkeypatch):
    run, _ = exported
    real = export_int8.predict

    def worse(graph: bytes, batches):  # the INT8 graph predicts a shifted class
        logits = real(graph, batches)
        return np.roll(logits, 1, axis=1) if b"QuantizeLinear" in graph else logits

    monkeypatch.setattr(export_int8, "predict", worse)
    before = _snapshot(run)
    code, out = invoke("export", run, "--int8", "--no-latency", "--format", "onnx")
    assert code == 3, out
    assert "--int8-max-drop 0.5" in out and "--int8-calibration" in out
    assert "--int8-exclude" in out
    assert _snapshot(run) == before


@pytest.mark.parametrize("args, says", [
    (["--int8-calibration", "kl"], "Unknown --int8-calibration"),
    (["--int8-exclude", "layer9.nothing"], "names no layer"),
    (["--int8-batches", "0"], "--int8-batches"),
    (["--format", "onnx-int9"], "Unknown --format"),
])
def test_bad_int8_input_exits_2_and_writes_nothing(exported, args, says):
    run, _ = exported
    before = _snapshot(run)
    code, out = invoke("export", run, "--int8", "--no-latency", *args)
    assert code == 2 and says in out, out
    assert "Traceback" not in out
    assert _snapshot(run) == before


def test_a_data_free_run_calibrates_on_its_synthetic_batch(ckpt, tmp_path):
    run = _search(ckpt, tmp_path / "free", data=None,
                  synth=SynthConfig(samples=32, iters=3, batch_size=16))
    res = export_run(run, ExportConfig(formats=("onnx-int8",), latency=None))
    sec = res.section["int8"]
    assert sec["data_free"] and "synthetic batch" in sec["calibration_inputs"]
    acc = sec["accuracy"]
    assert acc["drop"] is None and not acc["labelled"] and acc["n"] == 16
    assert sec["balanced_chains"] == [] and not sec["config"]["balance"]  # off by default
    assert 0 <= acc["agreement_with_fp32"]["compressed_int8"] <= 100
    (run / "state" / "synthetic.safetensors").unlink()
    before = _snapshot(run)
    with pytest.raises(UserError, match="--data SPEC"):
        export_run(run, ExportConfig(formats=("onnx-int8",), latency=None))
    assert _snapshot(run) == before


# ------------------------------------------------------------- what export --int8 records


def test_int8_file_is_recorded_where_it_is_written(exported, tmp_path):
    """In RUN/: model.int8.onnx is in the manifest and report.json's checksums (so --overwrite
    may remove it and a changed copy is caught); with -o DIR: lrcompress-export.json records the
    sha256 of both graphs as written (it crashed with KeyError before, exit 3)."""
    import hashlib

    from lrcompress.commands.run_dir import read_manifest

    run, _ = exported
    sha = hashlib.sha256((run / "model.int8.onnx").read_bytes()).hexdigest()
    assert "model.int8.onnx" in read_manifest(run)
    assert json.loads((run / "report.json").read_text())["files"]["model.int8.onnx"] == sha

    out = tmp_path / "deploy"
    code, text = invoke("export", run, "--int8", "--no-latency", "--format", "onnx", "-o", out)
    assert code == 0, text
    rec = json.loads((out / "lrcompress-export.json").read_text())["files"]
    assert set(rec) == {"model.onnx", "model.int8.onnx"}
    assert all(rec[n] == hashlib.sha256((out / n).read_bytes()).hexdigest() for n in rec)
    # a second export there replaces them only with --overwrite (they are recorded as ours)
    code, text = invoke("export", run, "--int8", "--no-latency", "--format", "onnx", "-o", out)
    assert code == 2 and "--overwrite" in text
    code, text = invoke("export", run, "--int8", "--no-latency", "--format", "onnx", "-o", out,
                        "--overwrite")
    assert code == 0, text


def test_a_foreign_int8_file_is_never_replaced(exported, tmp_path):
    """A model.int8.onnx that lrcompress did not write (not in -o's record) is refused with
    exit 2, and nothing is written."""
    run, _ = exported
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "model.int8.onnx").write_bytes(b"the user's own file")
    code, text = invoke("export", run, "--int8", "--no-latency", "--format", "onnx", "-o", out,
                        "--overwrite")
    assert code == 2 and "model.int8.onnx" in text and "not written by" in text
    assert sorted(p.name for p in out.iterdir()) == ["model.int8.onnx"]
    assert (out / "model.int8.onnx").read_bytes() == b"the user's own file"


def test_quantize_only_advice_ships_the_original_int8_graph(ckpt, tmp_path, monkeypatch):
    """When export advises quantizing the original alone, the original's INT8 graph (the one it
    timed and checked) is written as original.int8.onnx, named in the advice, recorded like the
    other files; without the advice (or without latency rows) it is not written."""
    import hashlib

    import lrcompress.commands.export as export_mod
    from lrcompress.commands.run_dir import read_manifest

    run = _search(ckpt, tmp_path / "run")
    monkeypatch.setattr(export_mod, "quantize_only", lambda rows, acc: False)
    export_run(run, ExportConfig(formats=("onnx-int8",), latency=FAST_LAT))
    assert not (run / "original.int8.onnx").exists()
    monkeypatch.setattr(export_mod, "quantize_only", lambda rows, acc: True)
    monkeypatch.setattr("lrcompress.deploy.int8.quantize_only", lambda rows, acc: True)
    res = export_run(run, ExportConfig(formats=("onnx-int8",), latency=FAST_LAT))
    graph = (run / "original.int8.onnx").read_bytes()
    sha = hashlib.sha256(graph).hexdigest()
    sec = res.section["int8"]
    assert sec["original_int8_file"]["sha256"] == sha
    assert "written as original.int8.onnx" in sec["latency"]["tradeoff"]
    assert "original.int8.onnx" in read_manifest(run)
    assert json.loads((run / "report.json").read_text())["files"]["original.int8.onnx"] == sha
    proto = check_graph(graph)  # a valid graph, quantized: QDQ pairs around its convs
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    out = tmp_path / "deploy"  # -o DIR: written and recorded there too
    res = export_run(run, ExportConfig(formats=("onnx-int8",), latency=FAST_LAT, output=out))
    rec = json.loads((out / "lrcompress-export.json").read_text())["files"]
    assert rec["original.int8.onnx"] == hashlib.sha256(
        (out / "original.int8.onnx").read_bytes()).hexdigest()
