"""export (ONNX + safetensors, parity, latency), eval and the reports, on tiny real runs."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lrcompress
from lrcompress.cli import main
from lrcompress.commands.export import ExportConfig, export_run
from lrcompress.commands.search import SearchConfig, search
from lrcompress.data import DataConfig
from lrcompress.deploy.onnx import merge_linear_chains
from lrcompress.errors import UserError
from lrcompress.measure.latency import LatencyConfig
from lrcompress.model.plan import Target
from lrcompress.report.schema import final_accuracy, read_report
from lrcompress.report.write import plot_trajectory, write_reports

from .conftest import tiny_resnet

DECOMPS = ("svd", "tucker2", "cp", "tt")
RTOL, ATOL = 1e-3, 1e-4  # the parity tolerance export states (float32)
# Every operator the exported test_resnet graphs may contain: standard ONNX only, and each
# factorized layer becomes plain Conv / Gemm / MatMul nodes.
STANDARD_OPS = {"Conv", "Gemm", "MatMul", "Relu", "Add", "MaxPool", "AveragePool",
                "GlobalAveragePool", "ReduceMean", "Reshape", "Flatten", "Identity"}
FAST_LAT = LatencyConfig(repeats=3, warmup=1, batches=(1, 8), threads=(1,))


pytestmark = pytest.mark.usefixtures("fast_torch")


def _search(ckpt, out, decomp):
    cfg = SearchConfig(target=Target("flops", 0.5), decomp=decomp, method="uniform",
                       rank_multiple=1, calib_batches=2,
                       data=DataConfig(batch_size=16, test_subset=32), input_size=(1, 32, 32))
    return search(str(ckpt), "synthetic:64", out, cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One finished RUN per decomposition, from the same test_resnet checkpoint."""
    root = tmp_path_factory.mktemp("export")
    ckpt = root / "test_resnet.pt"
    torch.save(tiny_resnet().state_dict(), ckpt)
    return {"ckpt": ckpt, **{d: _search(ckpt, root / d, d).run_dir for d in DECOMPS}}


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], obj={})
    return r.exit_code, r.output, r


@pytest.mark.parametrize("decomp", DECOMPS)
def test_onnx_export_checks_and_matches_pytorch(runs, decomp, tmp_path):
    out = tmp_path / "deploy"
    res = export_run(runs[decomp], ExportConfig(latency=None, output=str(out)))
    path = out / "model.onnx"
    assert res.files == [path, out / "model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["lrcompress-export.json", "model.onnx",
                                                     "model.safetensors"]
    record = json.loads((out / "lrcompress-export.json").read_text())["files"]
    assert record == {"model.onnx": res.section["onnx"]["sha256"],
                      "model.safetensors": res.section["safetensors"]["sha256"]}
    proto = onnx.load(str(path))  # one self-contained file: no external data
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert set(ops) <= STANDARD_OPS, set(ops) - STANDARD_OPS
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    model = lrcompress.load(runs[decomp])
    # chains on 1×1 maps are shipped merged into fewer convs (merge_linear_chains)
    merged, names = merge_linear_chains(model, (1, 32, 32))
    assert res.section["onnx"]["merged_chains"] == names
    mods = list(merged.modules())
    assert ops.count("Conv") == sum(isinstance(m, nn.Conv2d) for m in mods)
    assert ops.count("Gemm") + ops.count("MatMul") == sum(isinstance(m, nn.Linear) for m in mods)
    # Our own check, apart from the library's: the file in ONNX Runtime vs PyTorch.
    sess = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"]
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    par = res.section["onnx"]["parity"]
    assert par["n"] == 32 and par["inputs"] == "test images of synthetic:64"
    assert par["max_abs_diff"] < 1e-3 and par["top1_agreement"] == 1.0
    assert (par["rtol"], par["atol"]) == (RTOL, ATOL)
    st = res.section["safetensors"]
    assert st["copied_to"].endswith("model.safetensors") and "bit-exact" in st["reload"]
    # the file is compared with what search recorded, not with itself
    assert st["sha256"] == st["recorded_sha256"] == read_report(runs[decomp])["files"][
        "model.safetensors"] and st["same_as_run"].startswith("sha256 equals")
    assert (out / "model.safetensors").read_bytes() == (runs[decomp] / "model.safetensors"
                                                        ).read_bytes()
    assert read_report(runs[decomp])["export"]["onnx"]["sha256"] == res.section["onnx"]["sha256"]


def test_latency_section_and_dynamic_batch(runs):
    run = runs["tt"]
    res = export_run(run, ExportConfig(dynamic_batch=True, latency=FAST_LAT))
    proto = onnx.load(str(run / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch
    sess = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": np.zeros((3, 1, 32, 32), np.float32)})[0].shape == (3, 10)
    lat = read_report(run)["export"]["latency"]
    rep = read_report(run)
    assert lat == res.section["latency"]
    assert lat["ideal_speedup"] == pytest.approx(
        rep["totals"]["macs_before"] / rep["totals"]["macs_after"], rel=1e-3)
    assert lat["original_weights"].startswith("checkpoint")
    assert {(r["engine"], r["batch"]) for r in lat["runs"]} == {
        ("onnxruntime", 1), ("onnxruntime", 8), ("torch", 1), ("torch", 8)}
    for r in lat["runs"]:
        m = r["median_ms"]
        assert m["original"] > 0 and m["compressed"] > 0
        assert r["speedup"] == pytest.approx(m["original"] / m["compressed"], rel=1e-3)
        assert r["achieved_over_ideal"] == pytest.approx(r["speedup"] / lat["ideal_speedup"],
                                                         rel=1e-3)
    plan = lrcompress.Plan.from_json((run / "plan.json").read_text())
    assert [(r["name"], r["batch"]) for r in lat["layers"]] == [
        (lp.name, b) for lp in plan.layers for b in (1, 8)]
    assert all(r["dense_ms"] > 0 and r["factorized_ms"] > 0 for r in lat["layers"])
    assert len(lat["warnings"]) == len({r["name"] for r in lat["layers"] if r["slower"]})
    assert "Measured speed" in (run / "report.html").read_text()
    assert (run / "plots" / "speedup.png").exists()


def test_latency_without_original_checkpoint_uses_random_weights(runs, tmp_path):
    import shutil

    run = tmp_path / "moved"
    shutil.copytree(runs["svd"], run)
    rep = json.loads((run / "report.json").read_text())
    rep["model"]["source"] = str(tmp_path / "gone.pt")
    rep.pop("export", None)
    (run / "report.json").write_text(json.dumps(rep))
    (run / "state" / "fingerprint.json").unlink()
    first = export_run(run, ExportConfig(formats=("onnx",), latency=None))
    assert first.files == [run / "model.onnx"] and "safetensors" not in first.section
    lat = LatencyConfig(repeats=2, warmup=0, batches=(2,), threads=(1,), onnxruntime=False)
    res = export_run(run, ExportConfig(formats=("safetensors",), latency=lat))
    assert res.section["latency"]["original_weights"].startswith("random weights")
    assert [r["engine"] for r in res.section["latency"]["runs"]] == ["torch"]
    # What this export skipped keeps the earlier export's record (the model did not change).
    ex = read_report(run)["export"]
    assert ex["onnx"] == first.section["onnx"] and ex["latency"] == res.section["latency"]


def test_failed_export_leaves_run_untouched(runs, monkeypatch):
    run = runs["cp"]
    before = _snapshot(run)

    def boom(*a, **k):
        raise RuntimeError("injected failure while timing")

    # Fails after model.onnx is staged, checked and the safetensors validated.
    monkeypatch.setattr("lrcompress.commands.export.compare", boom)
    lat = LatencyConfig(repeats=1, warmup=0, batches=(1,), threads=(1,), onnxruntime=False)
    with pytest.raises(RuntimeError, match="injected"):
        export_run(run, ExportConfig(latency=lat))
    assert _snapshot(run) == before  # no model.onnx, report untouched, no temp files

    class WrongSession:  # ONNX Runtime "returns" garbage: a parity error, never a warning
        def run(self, *_a, **_k):
            return [np.zeros((1, 10), np.float32)]

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr("lrcompress.deploy.onnx.ort_session", lambda *a, **k: WrongSession())
    code, out, _ = invoke("export", run, "--no-latency")
    assert code == 3 and "does not match PyTorch" in out and "Traceback" not in out
    assert _snapshot(run) == before


def test_export_bad_input(runs, tmp_path):
    code, out, _ = invoke("export", tmp_path / "nope")
    assert code == 2 and "No such run" in out
    code, out, _ = invoke("export", runs["svd"], "--format", "tflite")
    assert code == 2 and "tflite" in out and "onnx, safetensors" in out
    code, out, _ = invoke("export", runs["svd"], "--opset", "11")
    assert code == 2 and "--opset 11" in out
    with pytest.raises(UserError, match="no report.json"):
        export_run(tmp_path)


def test_eval_run_and_checkpoint_json(runs):
    rep = read_report(runs["tt"])
    code, out, r = invoke("eval", runs["tt"], "--data", "synthetic:64", "--test-subset", "32",
                          "--batch-size", "16", "--no-latency", "--json")
    assert code == 0, out
    d = json.loads(r.stdout)
    assert d["model"]["compressed"] and d["data"]["input_size"] == [1, 32, 32]
    assert d["accuracy"]["n"] == 32
    # The same data and preprocessing as the search: the figures of the model the run ships
    # (after BatchNorm re-estimation when it was applied).
    stage, shipped = final_accuracy(rep)
    assert stage == ("bn_recalibrated" if rep["bn_recalibration"]["applied"] else "decomposed")
    for k in ("top1", "top5"):
        assert d["accuracy"][k] == pytest.approx(shipped[k])
    assert d["accuracy"]["loss"] == pytest.approx(shipped["loss"], rel=1e-4)
    assert d["macs"] == rep["totals"]["macs_after"]
    assert d["params"] == rep["totals"]["params_after"]
    assert d["latency"] is None

    code, out, r = invoke("eval", runs["ckpt"], "--input-size", "1,32,32", "--data",
                          "synthetic:64", "--test-subset", "32", "--batch-size", "16",
                          "--repeats", "2", "--warmup", "0", "--batch-sizes", "1,4",
                          "--threads", "1", "--json")
    assert code == 0, out
    d = json.loads(r.stdout)
    assert not d["model"]["compressed"]
    assert d["accuracy"]["top1"] == pytest.approx(rep["accuracy"]["original"]["top1"])
    assert d["macs"] == rep["totals"]["macs_before"]
    runs_ = d["latency"]["runs"]
    assert {(x["engine"], x["batch"]) for x in runs_} == {
        ("onnxruntime", 1), ("onnxruntime", 4), ("torch", 1), ("torch", 4)}
    assert all(x["median_ms"]["model"] > 0 for x in runs_)
    code, out, _ = invoke("eval", runs["tt"], "--data", "synthetic:64", "--test-subset", "8",
                          "--no-latency")
    assert code == 0 and "top-1" in out and "MACs" in out


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        self.tables += tag == "table"


def test_reports_are_written_with_embedded_plots(runs, tmp_path):
    run = runs["tucker2"]
    md = (run / "report.md").read_text()
    assert "## Summary" in md and "## Layers" in md
    for name in ("ranks", "macs", "accuracy_vs_macs"):
        assert f"(plots/{name}.png)" in md
        assert (run / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = _Images()
    p.feed((run / "report.html").read_text())
    assert p.tables >= 3
    alts = {i["alt"] for i in p.imgs}
    assert {"ranks", "macs", "accuracy_vs_macs"} <= alts
    for img in p.imgs:  # self-contained: every plot is an embedded PNG
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:4] == b"\x89PNG"
    # Several runs: all on the accuracy-vs-MACs plot; the rene trajectory when present.
    rep = read_report(run)
    rep["search"] = {"steps": [{"expected_cost_ratio": [0.9, 0.7, 0.55], "argmax_cost_ratio": 0.6},
                               {"expected_cost_ratio": [0.52, 0.5], "argmax_cost_ratio": 0.5}]}
    assert plot_trajectory(rep)[:4] == b"\x89PNG"
    written = write_reports(tmp_path, rep, others=[read_report(runs["svd"])])
    assert {p.name for p in written} >= {"report.md", "report.html", "search.png"}


def test_python_api_example_runs(runs, monkeypatch, capsys):
    import runpy
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "python_api.py"
    monkeypatch.setattr("sys.argv", [str(script), str(runs["svd"])])
    runpy.run_path(str(script), run_name="__main__")
    assert "-> output (8, 10)" in capsys.readouterr().out


def test_help_has_examples():
    for cmd in ("export", "eval", "gate"):
        code, out, _ = invoke(cmd, "--help")
        assert code == 0 and "Examples:" in out, out


# ------------------------------------------------------------ trust: files and checksums
def _copy(run, tmp_path, name="run"):
    import shutil

    return shutil.copytree(run, tmp_path / name)


def test_export_replaces_only_files_an_export_wrote(runs, tmp_path):
    """-o DIR: an existing model.onnx / model.safetensors is refused without --overwrite, and
    with it unless an earlier export wrote it there and nobody changed it since; never the run's
    own model, never into another run, never -o ""."""
    run = _copy(runs["svd"], tmp_path)
    ex = ("export", run, "--format", "safetensors", "--no-latency")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"my own model")
    for extra, words in (((), "Pass --overwrite"),
                         (("--overwrite",), "was not written by `lrcompress export`")):
        code, out, _ = invoke(*ex, "-o", mine, *extra)
        assert code == 2 and words in out and "Traceback" not in out, out
    assert (mine / "model.safetensors").read_bytes() == b"my own model"
    assert sorted(p.name for p in mine.iterdir()) == ["model.safetensors"]

    deploy = tmp_path / "deploy"
    assert invoke(*ex, "-o", deploy)[0] == 0
    code, out, _ = invoke(*ex, "-o", deploy)  # again: exists
    assert code == 2 and "exists" in out and "--overwrite" in out
    assert invoke(*ex, "-o", deploy, "--overwrite")[0] == 0  # its own earlier file
    (deploy / "model.safetensors").write_bytes(b"edited by hand")
    code, out, _ = invoke(*ex, "-o", deploy, "--overwrite")
    assert code == 2 and "or was changed since" in out
    assert (deploy / "model.safetensors").read_bytes() == b"edited by hand"

    link = tmp_path / "link"
    link.mkdir()
    (link / "model.safetensors").symlink_to(run / "model.safetensors")
    code, out, _ = invoke(*ex, "-o", link, "--overwrite")
    assert code == 2 and "the run's own model" in out

    other = runs["tt"]
    before = _snapshot(other)
    code, out, _ = invoke(*ex, "-o", other, "--overwrite")
    assert code == 2 and "is another lrcompress run" in out and _snapshot(other) == before
    code, out, _ = invoke(*ex, "-o", "")
    assert code == 2 and '-o "" is an empty path' in out
    with pytest.raises(UserError, match="empty path"):
        ExportConfig(output=" ")


def test_export_into_run_keeps_a_model_onnx_it_did_not_write(runs, tmp_path):
    run = _copy(runs["svd"], tmp_path)
    (run / "model.onnx").write_bytes(b"my graph")
    before = _snapshot(run)
    code, out, _ = invoke("export", run, "--format", "onnx", "--no-latency")
    assert code == 2 and "was not written by lrcompress" in out and "manifest" in out, out
    assert _snapshot(run) == before


def test_modified_run_is_refused_by_export_and_eval(runs, tmp_path):
    """A weight changed after search (one bit), or plan.json edited: export and eval name the
    file and refuse (exit 2) unless --allow-modified; export then says the model is modified
    instead of calling it bit-exact."""
    run = _copy(runs["svd"], tmp_path)
    recorded = read_report(run)["files"]["model.safetensors"]
    model = run / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    ev = ("--data", "synthetic:64", "--test-subset", "8", "--batch-size", "8", "--no-latency")
    for cmd in (("export", run, "--format", "safetensors", "--no-latency"),
                ("eval", run, *ev), ("eval", model, *ev)):
        code, out, _ = invoke(*cmd)
        assert code == 2 and "model.safetensors changed" in out and "--allow-modified" in out, out
    assert invoke("eval", run, *ev, "--allow-modified")[0] == 0
    res = export_run(run, ExportConfig(formats=("safetensors",), latency=None,
                                       allow_modified=True))
    st = res.section["safetensors"]
    assert st["same_as_run"].startswith("MODIFIED") and st["recorded_sha256"] == recorded
    assert st["modified_files"] == ["model.safetensors changed"]
    assert read_report(run)["files"]["model.safetensors"] == recorded  # what search wrote

    run2 = _copy(runs["svd"], tmp_path, "run2")
    (run2 / "plan.json").write_text((run2 / "plan.json").read_text() + " ")
    code, out, _ = invoke("export", run2, "--format", "safetensors", "--no-latency")
    assert code == 2 and "plan.json changed" in out


def test_export_records_the_checksums_of_what_it_wrote(runs, tmp_path):
    """After export, report.json's files hold model.onnx and the rewritten reports, so the run
    still verifies (gate passes the check) and the manifest lists model.onnx."""
    from lrcompress.commands.run_dir import read_manifest, verify_files
    from lrcompress.util.io import file_sha256

    run = _copy(runs["cp"], tmp_path)
    export_run(run, ExportConfig(formats=("onnx",), latency=None))
    rep = read_report(run)
    assert rep["files"]["model.onnx"] == file_sha256(run / "model.onnx")
    assert all(file_sha256(run / k) == v for k, v in rep["files"].items())
    assert "report.json" not in rep["files"] and verify_files(run, rep) == []
    assert "model.onnx" in read_manifest(run)
    assert invoke("gate", run, "--min-flops-reduction", "0.1")[0] == 0


def test_parity_is_relative_to_each_samples_scale():
    from lrcompress.deploy.onnx import compare_outputs

    rng = np.random.default_rng(0)
    ref = (rng.standard_normal((4, 320)) * 20).astype(np.float32)
    ref[:, 7] = 130.0  # EfficientNet-B0-like logits: the largest about 130
    ref[0, 3] = 1e-3  # a near-zero logit, where an elementwise rtol·|x| allows only 1e-4
    got = ref.copy()
    got[0, 3] += 5.8e-4  # float32 noise at this scale (4.5e-6 of it): not a mismatch
    par, bad = compare_outputs(got, ref, RTOL, ATOL)
    assert bad == 0 and par.top1_agreement == 1.0
    assert par.max_abs_diff == pytest.approx(5.8e-4, rel=1e-3)
    assert par.output_scale == pytest.approx(130.0, rel=1e-6)
    assert par.max_rel_diff == pytest.approx(5.8e-4 / 130.0, rel=1e-3)
    # A real mismatch: one sample's outputs off by a tenth of its scale, another one NaN.
    wrong = ref.copy()
    wrong[1, :10] += 13.0
    par, bad = compare_outputs(wrong, ref, RTOL, ATOL)
    assert bad == 1 and par.max_rel_diff == pytest.approx(0.1, rel=1e-3)
    wrong[2, 0] = np.nan  # a non-finite output is never within tolerance
    par, bad = compare_outputs(wrong, ref, RTOL, ATOL)
    assert bad == 2 and par.max_rel_diff == np.inf
