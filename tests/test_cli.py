"""The CLI end to end: inspect, search, and bad input answered with exit code 2 and no traceback."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lrcompress.cli import main

from .conftest import tiny_resnet
from .test_costs import reference_macs


def run(*args):
    """(exit code, stdout and stderr together)."""
    r = CliRunner().invoke(main, [str(a) for a in args], obj={})
    return r.exit_code, r.output


def run_json(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], obj={})
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def assert_user_error(code, out, *words):
    assert code == 2, out
    assert "Traceback" not in out, out
    for w in words:
        assert w in out, out


def test_inspect_json_totals_match_flopcounter():
    d = run_json("inspect", "timm:test_resnet", "--input-size", "1,32,32", "--json")
    m = tiny_resnet(num_classes=1000)
    assert abs(d["total_macs"] - reference_macs(m, (1, 32, 32))) <= 0.01 * d["total_macs"]
    assert any(r["candidate"] for r in d["rows"])
    assert not d["rows"][0]["candidate"]  # the stem stays dense by default


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_inspect_checkpoint_table(resnet_ckpt, fmt):
    code, out = run("inspect", resnet_ckpt[fmt], "--input-size", "1,32,32")
    assert code == 0, out
    assert "layer1.0.conv1" in out and "Total:" in out


def test_help_teaches_with_examples():
    for cmd in ("inspect", "search"):
        code, out = run(cmd, "--help")
        assert code == 0 and "Examples:" in out


def test_bad_inputs_exit_2_without_traceback(resnet_ckpt, tmp_path):
    empty = tmp_path / "empty_test_resnet.pt"
    empty.write_bytes(b"")
    assert_user_error(*run("inspect", empty), "empty")
    assert_user_error(*run("inspect", "timm:resnet181"), "Unknown architecture", "resnet18")
    assert_user_error(*run("inspect", tmp_path / "missing.pt"), "No such file")
    sd = tiny_resnet().state_dict()
    sd["fc.weight"][0, 0] = float("inf")
    nan = tmp_path / "nan_test_resnet.pt"
    torch.save(sd, nan)
    assert_user_error(*run("inspect", nan, "--arch", "timm:test_resnet"), "NaN or Inf")
    assert_user_error(*run("inspect", resnet_ckpt["pt"], "--arch", "timm:resnet18"),
                      "does not fit", "shape mismatch")
    assert_user_error(*run("inspect", resnet_ckpt["pt"], "--input-size", "3,32,32"),
                      "channels")
    assert_user_error(*run("inspect", resnet_ckpt["pt"], "--input-size", "1,32"), "C,H,W")
    assert_user_error(*run("inspect", resnet_ckpt["pt"], "--input-size", "1,32,32",
                           "--include", "nothing.*"), "matches no conv/linear layer")


def test_search_cli_writes_a_run(resnet_ckpt, tmp_path):
    out = tmp_path / "run"
    code, text = run("search", resnet_ckpt["pt"], "--input-size", "1,32,32", "--decomp", "tt",
                     "--method", "uniform", "--target-flops", "0.5", "--data", "synthetic:64",
                     "--rank-multiple", "1", "--batch-size", "16", "-o", out)
    assert code == 0, text
    assert {"model.safetensors", "plan.json", "report.json"} <= {p.name for p in out.iterdir()}
    assert "MACs" in text


def test_search_bad_targets(resnet_ckpt, tmp_path):
    common = ("--input-size", "1,32,32", "--data", "synthetic:64", "-o", tmp_path / "r")
    assert_user_error(*run("search", resnet_ckpt["pt"], "--target-flops", "1.5", *common),
                      "strictly between 0 and 1")
    assert_user_error(*run("search", resnet_ckpt["pt"], "--target-flops", "0", *common),
                      "strictly between 0 and 1")
    assert_user_error(*run("search", resnet_ckpt["pt"], *common), "exactly one target")
    assert_user_error(*run("search", resnet_ckpt["pt"], "--target-flops", "0.01", *common),
                      "cannot be reached")
    assert_user_error(*run("search", resnet_ckpt["pt"], "--target-flops", "0.5",
                           "--input-size", "1,32,32", "--data", "nosuch:/x", "-o",
                           tmp_path / "r"), "nosuch")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("case", ["truncated_pt", "truncated_st", "missing_keys", "whole_module",
                                  "not_a_state_dict"])
def test_bad_checkpoints_through_the_cli(resnet_ckpt, tmp_path, case):
    src = resnet_ckpt["model"]
    p = tmp_path / f"bad_{case}_test_resnet.pt"
    if case == "truncated_pt":
        data = resnet_ckpt["pt"].read_bytes()
        p.write_bytes(data[: len(data) // 3])
        words = ("truncated",)
    elif case == "truncated_st":
        p = p.with_suffix(".safetensors")
        data = resnet_ckpt["safetensors"].read_bytes()
        p.write_bytes(data[: len(data) // 3])
        words = ("truncated",)
    elif case == "missing_keys":
        sd = src.state_dict()
        for k in ("fc.weight", "fc.bias"):
            sd.pop(k)
        torch.save(sd, p)
        words = ("missing key(s): fc.weight",)
    elif case == "whole_module":
        torch.save(src, p)
        words = ("whole pickled model", "--trust-pickle")
    else:
        torch.save([1, 2, 3], p)
        words = ("not a state_dict",)
    before = p.read_bytes()
    assert_user_error(*run("inspect", p, "--arch", "timm:test_resnet"), *words)
    assert p.read_bytes() == before  # the input is never modified


def test_sigterm_stops_cleanly_with_a_resume_hint(resnet_ckpt, tmp_path):
    """A search killed by SIGTERM exits 130 with the hint, no traceback; the input is untouched."""
    import signal
    import subprocess
    import sys
    import time

    before = resnet_ckpt["pt"].read_bytes()
    cmd = [sys.executable, "-m", "lrcompress.cli", "search", str(resnet_ckpt["pt"]),
           "--input-size", "1,32,32", "--data", "synthetic:64", "--target-flops", "0.5",
           "--method", "rene", "--search-iters", "100000", "--rank-multiple", "1",
           "-o", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "run" / "state" / "eval_original.json"
    deadline = time.time() + 60
    while not state.exists() and time.time() < deadline:  # wait until the search is under way
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "re-run the same command to resume" in err and "Traceback" not in err
    assert resnet_ckpt["pt"].read_bytes() == before
    assert not list((tmp_path / "run").glob("**/.*.tmp"))  # no half-written temp files


def test_cuda_out_of_memory_gets_advice_not_a_traceback(resnet_ckpt, tmp_path, monkeypatch):
    import lrcompress.commands.search as pipeline

    def oom(*a, **k):  # injected, as CI has no GPU
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline, "search", oom)
    code, out = run("search", resnet_ckpt["pt"], "--input-size", "1,32,32", "--data",
                    "synthetic:64", "--target-flops", "0.5", "-o", tmp_path / "r")
    assert_user_error(code, out, "Out of GPU memory", "--batch-size")


def test_device_cuda_without_a_gpu_is_a_clear_error(resnet_ckpt, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, out = run("search", resnet_ckpt["pt"], "--input-size", "1,32,32", "--data",
                    "synthetic:64", "--target-flops", "0.5", "--device", "cuda",
                    "-o", tmp_path / "r")
    assert_user_error(code, out, "no CUDA GPU")


def test_no_factorizable_layer_is_refused_before_writing(resnet_ckpt, tmp_path):
    out = tmp_path / "r"
    code, text = run("search", resnet_ckpt["pt"], "--input-size", "1,32,32", "--data",
                     "synthetic:64", "--target-flops", "0.5", "--exclude", "*", "-o", out)
    assert_user_error(code, text, "No layer", "can be factorized")
    assert not out.exists()


def test_the_cli_rank_grid_default_is_the_library_default():
    # cli.py cannot import the library at start (fast --help), so it repeats the number.
    from lrcompress.cli import search
    from lrcompress.commands.compress import DEFAULT_RANK_MULTIPLE

    opt = next(p for p in search.params if p.name == "rank_multiple")
    assert opt.default == DEFAULT_RANK_MULTIPLE == 16
