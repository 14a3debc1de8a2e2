"""gate: exit codes 0/1/2 through the CLI, the budget table, JUnit XML, --baseline."""

from __future__ import annotations

import copy
import json
import shutil
from xml.etree import ElementTree as ET

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lrcompress.cli import main
from lrcompress.commands.gate import GateConfig, gate
from lrcompress.commands.search import SearchConfig, search
from lrcompress.data import DataConfig
from lrcompress.model.plan import Target
from lrcompress.report.schema import read_report

from .conftest import tiny_resnet


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Multi-threaded PyTorch crawls on a loaded 2-core machine (thread wake-ups)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    ckpt = root / "test_resnet.pt"
    torch.save(tiny_resnet().state_dict(), ckpt)
    cfg = SearchConfig(target=Target("flops", 0.5), decomp="tt", method="uniform",
                       rank_multiple=1, calib_batches=2, bn_batches=0,  # the edits below set
                       data=DataConfig(batch_size=16, test_subset=32), input_size=(1, 32, 32))
    return search(str(ckpt), "synthetic:64", root / "run", cfg).run_dir


def variant(run, tmp_path, name, edit):
    """A copy of RUN with its report.json edited (the files it records stay as they were)."""
    rep = copy.deepcopy(read_report(run))
    edit(rep)
    d = tmp_path / name
    shutil.copytree(run, d)
    (d / "report.json").write_text(json.dumps(rep))
    return d


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], obj={})
    return r.exit_code, r.output, r


def _with_accuracy(top1_orig, top1_final, finetuned=None):
    def edit(rep):
        rep["accuracy"]["original"]["top1"] = top1_orig
        rep["accuracy"]["decomposed"]["top1"] = top1_final
        if finetuned is not None:
            rep["accuracy"]["finetuned"] = {**rep["accuracy"]["decomposed"], "top1": finetuned}
    return edit


def _with_latency(speedup):
    def edit(rep):
        rows = [{"engine": e, "device": "cpu", "threads": t, "all_threads": t == 2, "batch": b,
                 "median_ms": {"original": 2.0, "compressed": 2.0 / speedup},
                 "iqr_ms": {"original": 0.1, "compressed": 0.1}, "speedup": speedup,
                 "achieved_over_ideal": speedup / 2}
                for e in ("onnxruntime", "torch") for t in (1, 2) for b in (1, 64)]
        rep["export"] = {"latency": {"runs": rows, "ideal_speedup": 2.0}}
    return edit


def test_judges_the_model_after_batchnorm_re_estimation(run, tmp_path):
    def edit(rep):
        _with_accuracy(80.0, 70.0)(rep)
        rep["accuracy"]["bn_recalibrated"] = {**rep["accuracy"]["decomposed"], "top1": 79.5}
    d = variant(run, tmp_path, "bn", edit)
    code, out, _ = invoke("gate", d, "--max-top1-drop", "1.0")
    assert code == 0, out
    assert "bn_recalibrated 79.50" in out
    d = variant(run, tmp_path, "bn_ft", lambda rep: (edit(rep), _with_accuracy(
        80.0, 70.0, finetuned=78.0)(rep)))
    code, out, _ = invoke("gate", d, "--max-top1-drop", "1.0")
    assert code == 1 and "finetuned 78.00" in out, out


def test_pass_and_fail_exit_codes(run, tmp_path):
    code, out, _ = invoke("gate", run, "--max-top1-drop", "1.0", "--min-flops-reduction", "0.4")
    assert code == 0, out
    assert "top-1 drop <= 1 pts" in out and "MACs reduction >= 0.4" in out and "pass" in out
    code, out, _ = invoke("gate", run, "--max-top1-drop", "1.0", "--min-flops-reduction", "0.6")
    assert code == 1, out
    assert "FAIL" in out and "gate failed: MACs reduction >= 0.6" in out
    assert "Traceback" not in out
    # The final model is the fine-tuned one when there is one: 80 -> 79.5 fine-tuned passes 1.0.
    d = variant(run, tmp_path, "ft", _with_accuracy(80.0, 70.0, finetuned=79.5))
    assert invoke("gate", d, "--max-top1-drop", "1.0")[0] == 0
    assert invoke("gate", d, "--max-top1-drop", "0.4")[0] == 1
    res = gate(d, GateConfig(max_top1_drop=0.4))
    assert res.checks[0].value == pytest.approx(0.5) and "finetuned 79.50" in res.checks[0].detail


def test_json_and_junit(run, tmp_path):
    xml = tmp_path / "ci" / "gate.xml"
    code, out, r = invoke("gate", run, "--max-top1-drop", "1", "--min-flops-reduction", "0.9",
                          "--junit", xml, "--json")
    assert code == 1
    d = json.loads(r.stdout)
    assert d["passed"] is False
    assert [c["passed"] for c in d["checks"]] == [True, False]
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None and suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["top-1 drop <= 1 pts", "MACs reduction >= 0.9"]
    assert cases[0].find("failure") is None
    fail = cases[1].find("failure")
    assert fail is not None and "MACs reduction" in fail.get("message") and fail.text


def test_speedup_budget(run, tmp_path):
    code, out, _ = invoke("gate", run, "--max-top1-drop", "1", "--min-speedup", "1.2")
    assert code == 2 and "lrcompress export" in out and "Traceback" not in out
    d = variant(run, tmp_path, "fast", _with_latency(1.5))
    assert invoke("gate", d, "--max-top1-drop", "100", "--min-speedup", "1.2")[0] == 0
    assert invoke("gate", d, "--max-top1-drop", "100", "--min-speedup", "1.6")[0] == 1
    res = gate(d, GateConfig(max_top1_drop=100, min_speedup=1.2, speedup_batch=64))
    assert "onnxruntime cpu, 2 thread(s), batch 64" in res.checks[1].detail
    code, out, _ = invoke("gate", d, "--max-top1-drop", "1", "--min-speedup", "1.2",
                          "--speedup-batch", "8")
    assert code == 2 and "batch 8" in out


def test_baseline(run, tmp_path):
    base = variant(run, tmp_path, "base", _with_accuracy(90.0, 85.0))
    new = variant(run, tmp_path, "new", _with_accuracy(90.0, 84.5))
    res = gate(new, GateConfig(max_top1_drop=1.0, baseline=str(base)))
    assert res.passed and res.checks[0].value == pytest.approx(0.5)  # 85.0 - 84.5, not 90 - 84.5
    assert "baseline" in res.checks[0].detail
    assert invoke("gate", new, "--max-top1-drop", "0.2", "--baseline", base)[0] == 1
    other = variant(run, tmp_path, "other", lambda r: r["data"].update(spec="synthetic:999"))
    code, out, _ = invoke("gate", new, "--max-top1-drop", "1", "--baseline", other)
    assert code == 2 and "same test set" in out


def test_bad_input_exits_2(run, tmp_path):
    code, out, _ = invoke("gate", tmp_path / "missing", "--max-top1-drop", "1")
    assert code == 2 and "No such run" in out
    (tmp_path / "empty").mkdir()
    code, out, _ = invoke("gate", tmp_path / "empty", "--max-top1-drop", "1")
    assert code == 2 and "no report.json" in out and "lrcompress search" in out
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "report.json").write_text("{not json")
    assert invoke("gate", bad, "--max-top1-drop", "1")[0] == 2
    future = variant(run, tmp_path, "future", lambda r: r.update(schema=99))
    code, out, _ = invoke("gate", future, "--max-top1-drop", "1")
    assert code == 2 and "schema" in out
    code, out, _ = invoke("gate", run, "--max-top1-drop", "1", "--min-flops-reduction", "1.5")
    assert code == 2 and "[0, 1)" in out
    code, out, _ = invoke("gate", run)  # the drop budget is required
    assert code == 2 and "--max-top1-drop" in out


def test_baseline_must_be_evaluated_on_the_same_test_images(run, tmp_path):
    """Same spec and test count but another seed: other synthetic test images, so the runs'
    test_digest differs and the comparison is refused (it passed before, comparing only the
    spec string and the count)."""
    ckpt = tmp_path / "test_resnet.pt"
    torch.save(tiny_resnet().state_dict(), ckpt)
    rep = read_report(run)
    cfg = SearchConfig(target=Target("flops", 0.5), decomp="tt", method="uniform",
                       rank_multiple=1, calib_batches=2, bn_batches=0, seed=7,
                       data=DataConfig(batch_size=16, test_subset=32, seed=7),
                       input_size=(1, 32, 32))
    other = search(str(ckpt), "synthetic:64", tmp_path / "seed7", cfg).run_dir
    theirs = read_report(other)["data"]
    assert (theirs["spec"], theirs["test_samples"]) == (rep["data"]["spec"], 32)
    assert len(theirs["test_digest"]) == 64 and theirs["test_digest"] != rep["data"]["test_digest"]
    code, out, _ = invoke("gate", run, "--max-top1-drop", "100", "--baseline", other)
    assert code == 2 and "other test images" in out and "--seed" in out, out
    # the same images (a copy of the run): compared
    same = variant(run, tmp_path, "same", lambda r: None)
    assert invoke("gate", run, "--max-top1-drop", "100", "--baseline", same)[0] == 0
    # a report that does not record its test images cannot be compared either
    old = variant(run, tmp_path, "old", lambda r: r["data"].pop("test_digest"))
    code, out, _ = invoke("gate", run, "--max-top1-drop", "100", "--baseline", old)
    assert code == 2 and "does not record which test images" in out, out


def test_gate_refusals_exit_2_without_traceback(run, tmp_path):
    cases = [
        (("--max-top1-drop", "1", "--baseline", run), "the run being gated itself"),
        (("--max-top1-drop", "1", "--baseline", run / "report.json"), "itself"),
        (("--max-top1-drop", "nan"), "not a finite number"),
        (("--max-top1-drop", "inf"), "not a finite number"),
        (("--min-speedup", "nan"), "not a finite number"),
        (("--max-top1-drop", "1", "--junit", "/proc/lrcompress-gate/gate.xml"),
         "Cannot write --junit"),
        (("--max-top1-drop", "1", "--junit", run / "report.json" / "gate.xml"), "is a file"),
        (("--max-top1-drop", "1", "--junit", tmp_path), "is a directory"),
    ]
    for args, words in cases:
        code, out, _ = invoke("gate", run, *args)
        assert code == 2 and words in out and "Traceback" not in out, (args, out)
    assert not (run / "report.json" / "gate.xml").exists()


@pytest.mark.parametrize("edit", [
    lambda r: r.update(accuracy={}),
    lambda r: r.update(accuracy={"original": r["accuracy"]["original"]}),  # no final stage
    lambda r: r.pop("accuracy"),
], ids=["empty", "original_only", "absent"])
def test_report_without_accuracy_exits_2(run, tmp_path, edit):
    d = variant(run, tmp_path, "noacc", edit)
    code, out, _ = invoke("gate", d, "--max-top1-drop", "1")
    assert code == 2 and "needs measured accuracy" in out and "Traceback" not in out, out
    # as a baseline too
    code, out, _ = invoke("gate", run, "--max-top1-drop", "1", "--baseline", d)
    assert code == 2 and "measured none" in out, out
    # the other budgets still work on it
    assert invoke("gate", d, "--min-flops-reduction", "0.1")[0] == 0


def test_report_missing_what_a_budget_reads_exits_2(run, tmp_path):
    d = variant(run, tmp_path, "nototals", lambda r: r.pop("totals"))
    code, out, _ = invoke("gate", d, "--min-flops-reduction", "0.1")
    assert code == 2 and "lacks what the budgets read" in out and "totals" in out, out


def test_modified_run_is_refused_unless_allowed(run, tmp_path):
    d = variant(run, tmp_path, "tampered", lambda r: None)
    model = d / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    model.write_bytes(bytes(data))
    (d / "report.md").unlink()
    code, out, _ = invoke("gate", d, "--max-top1-drop", "100")
    assert code == 2 and "model.safetensors changed" in out and "report.md is missing" in out
    assert "--allow-modified" in out
    assert invoke("gate", d, "--max-top1-drop", "100", "--allow-modified")[0] == 0
    # a modified baseline is refused the same way
    code, out, _ = invoke("gate", run, "--max-top1-drop", "100", "--baseline", d)
    assert code == 2 and "model.safetensors changed" in out


def test_test_digest_names_exactly_the_test_images(tmp_path):
    """Equal when the test images are the same (another seed changes nothing when the whole
    test split is used), different when --seed picks another --test-subset, another folder
    holds other files, or synthetic images come from another seed."""
    from PIL import Image

    from lrcompress.data import build_loaders, parse_data_spec, resolve_preprocess, test_set_digest

    from .test_data import fake_mnist

    def digest(spec, **cfg):
        spec = parse_data_spec(spec)
        lo = build_loaders(spec, resolve_preprocess(None, spec, input_size=16),
                           DataConfig(batch_size=4, **cfg))
        return test_set_digest(lo.test, str(spec))

    mnist = f"mnist:{fake_mnist(tmp_path / 'mnist')}"
    assert digest(mnist, seed=0) == digest(mnist, seed=1)  # all 50 test images either way
    assert digest(mnist, seed=0, test_subset=20) == digest(mnist, seed=0, test_subset=20)
    assert digest(mnist, seed=0, test_subset=20) != digest(mnist, seed=1, test_subset=20)
    assert digest("synthetic:16", seed=0) != digest("synthetic:16", seed=1)
    rng = np.random.default_rng(0)
    for part in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "img" / part / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / "img" / part / cls / f"{i}.png")
    folder = f"imagefolder:{tmp_path / 'img'}"
    first = digest(folder)
    (tmp_path / "img" / "val" / "a" / "0.png").rename(tmp_path / "img" / "val" / "b" / "9.png")
    assert len(first) == 64 and digest(folder) != first  # a file moved to another class
    assert test_set_digest([(torch.zeros(1), torch.zeros(1))], "python") is None
