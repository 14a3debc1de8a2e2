"""Data-free mode and the headline command as typed: synthesised inputs, default run folders,
unlabelled image folders, and what a run without test data may and may not be asked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from lrcompress.calib.synthesize import SynthConfig, bn_match, noise_inputs, synthesize
from lrcompress.cli import main
from lrcompress.commands.run_dir import default_run_dir
from lrcompress.data import (
    DataConfig,
    Preprocess,
    build_loaders,
    parse_data_spec,
    resolve_preprocess,
)

from .conftest import tiny_resnet

FAST = ("--synth-samples", "16", "--synth-iters", "3", "--search-iters", "2",
        "--search-warmup", "1", "--batch-size", "16", "--rank-multiple", "1")


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], obj={})
    return r.exit_code, r.output


def trained_like(seed=0, in_chans=1):
    """test_resnet whose BatchNorm running statistics come from shifted, scaled inputs, so that
    they are far from what plain noise produces (a stand-in for a trained model)."""
    m = tiny_resnet(in_chans=in_chans, seed=seed).train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(30):  # enough batches for the running statistics to settle
            m(0.5 + 2 * torch.randn(32, in_chans, 32, 32, generator=g))
    return m.eval()


def save_with_metadata(model, path: Path, input_size=(1, 32, 32)) -> Path:
    """A safetensors checkpoint carrying its input size, as train_reference.py writes it."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"input_size": json.dumps(list(input_size))})
    return path


@pytest.fixture(scope="module")
def headline(tmp_path_factory):
    """`lrcompress search CKPT --target-flops 0.5` with neither --data nor -o, in a fresh cwd."""
    cwd = tmp_path_factory.mktemp("cwd")
    ckpt = save_with_metadata(trained_like(), cwd / "test_resnet.safetensors")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        code, out = run("search", ckpt.name, "--target-flops", "0.5", *FAST)
    finally:
        os.chdir(old)
    return {"cwd": cwd, "ckpt": ckpt, "code": code, "out": out,
            "run": cwd / "runs" / "test_resnet-tt-flops0.5"}


def test_synthetic_inputs_match_batchnorm_statistics():
    m = trained_like()
    cfg = SynthConfig(samples=32, batch_size=32, iters=80, lr=0.2)
    syn = synthesize(m, (1, 32, 32), 10, cfg, seed=0)
    noise = bn_match(m, noise_inputs((1, 32, 32), 32).inputs, 32)
    got = syn.summary["match"]
    assert syn.inputs.shape == (32, 1, 32, 32) and torch.isfinite(syn.inputs).all()
    # Every BatchNorm input's batch mean within 0.15 running std of the running mean and its
    # batch std within 15 % of the running one (mean over channels and layers; seen: 0.05 and
    # 0.07), and both under a quarter of plain noise's mismatch (seen: 0.82 and 0.48).
    assert got["mean_err"] < 0.15 and got["std_err"] < 0.15, got
    assert got["mean_err"] < 0.25 * noise["mean_err"], (got, noise)
    assert got["std_err"] < 0.25 * noise["std_err"], (got, noise)
    short = SynthConfig(samples=8, batch_size=8, iters=2)
    a, b = (synthesize(m, (1, 32, 32), 10, short, seed=1).inputs for _ in range(2))
    assert torch.equal(a, b)  # seeded: the same inputs every time


def test_headline_command_runs_without_data_and_output(headline):
    assert headline["code"] == 0, headline["out"]
    run_dir = headline["run"]
    assert f"Run folder: {Path('runs') / run_dir.name}" in headline["out"]
    names = {p.name for p in run_dir.iterdir()}
    assert {"model.safetensors", "plan.json", "report.json", "report.md", "state"} <= names
    assert (run_dir / "state" / "synthetic.safetensors").is_file()
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["model"]["input_size"] == [1, 32, 32]  # from the checkpoint's metadata
    assert rep["data_free"]["method"] == "batchnorm statistics"
    assert rep["data_free"]["used_for"] == ["the rene rank search", "the sequential fit"]
    assert rep["bn_recalibration"] is None  # not on synthesised inputs after an output fit
    assert rep["accuracy"] == {} and rep["data"]["test_samples"] is None
    assert rep["totals"]["macs_ratio"] <= 0.5 + 1e-9
    assert "not measured" in headline["out"]
    assert "Not measured" in (run_dir / "report.md").read_text()


def test_default_run_folders_are_never_reused(headline, tmp_path):
    os.chdir(headline["cwd"])
    try:
        for n in (2, 3):
            code, out = run("search", headline["ckpt"].name, "--target-flops", "0.5",
                            "--method", "uniform", *FAST)
            assert code == 0, out
            assert f"test_resnet-tt-flops0.5-{n}" in out
    finally:
        os.chdir(headline["cwd"].parent)
    first = json.loads((headline["run"] / "report.json").read_text())
    assert first["config"]["method"] == "rene"  # the first run is untouched
    (tmp_path / "runs" / "m-svd-params0.25").mkdir(parents=True)  # empty: used as it is
    assert default_run_dir("m.pt", "svd", "params", 0.25, tmp_path / "runs").name == \
        "m-svd-params0.25"
    assert default_run_dir("timm:test_vit", "tt", "flops", 0.3, tmp_path).name == \
        "test_vit-tt-flops0.3"


def test_an_interrupted_data_free_run_reuses_its_inputs(tmp_path):
    ckpt = save_with_metadata(trained_like(), tmp_path / "test_resnet.safetensors")
    out = tmp_path / "run"
    args = ("search", ckpt, "--target-flops", "0.5", "-o", out, *FAST)
    assert run(*args)[0] == 0
    syn = out / "state" / "synthetic.safetensors"
    before = (syn.read_bytes(), syn.stat().st_mtime_ns)
    (out / "report.json").unlink()  # as if killed before the end
    code, text = run(*args)
    assert code == 0, text
    assert (syn.read_bytes(), syn.stat().st_mtime_ns) == before
    assert json.loads((out / "report.json").read_text())["resumed"] is True


def test_eval_data_gives_accuracy(tmp_path):
    ckpt = save_with_metadata(trained_like(), tmp_path / "test_resnet.safetensors")
    code, out = run("search", ckpt, "--target-flops", "0.5", "--method", "uniform",
                    "--max-steps", "2", "--eval-data", "synthetic:32", "-o", tmp_path / "r",
                    *FAST)
    assert code == 0, out
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["accuracy"]["original"]["n"] == 32 and "finetuned" in rep["accuracy"]
    assert rep["data"]["eval_spec"] == "synthetic:32"
    assert rep["data_free"]["used_for"] == ["the sequential fit", "fine-tuning"]
    # fine-tuning on synthesised inputs after the sequential fit: the measured warning
    assert "fine-tuning on synthesised inputs after an output-aware fit" in out
    assert "leave --max-steps/--finetune-epochs off" in " ".join(out.split())


def test_gate_refuses_accuracy_budgets_on_a_run_without_accuracy(headline):
    code, out = run("gate", headline["run"], "--max-top1-drop", "1")
    assert code == 2 and "Traceback" not in out, out
    assert "needs measured accuracy" in out and "--eval-data" in out
    code, out = run("gate", headline["run"], "--min-flops-reduction", "0.4")
    assert code == 0, out
    code, out = run("gate", headline["run"])
    assert code == 2 and "at least one budget" in out


def search_vit_without_data(tmp_path, *extra):
    """A test_vit checkpoint (no BatchNorm) searched without --data: (exit code, output, RUN)."""
    torch.manual_seed(0)
    m = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32)
    ckpt = save_with_metadata(m, tmp_path / "test_vit.safetensors", (3, 32, 32))
    out = tmp_path / "r"
    code, text = run("search", ckpt, "--arch", "timm:test_vit(img_size=32)", "--decomp", "svd",
                     "--target-params", "0.7", "--method", "uniform", "-o", out, *FAST, *extra)
    return code, text, out


def test_activation_fit_without_data_on_a_model_without_batchnorm_exits_2(tmp_path):
    code, text, out = search_vit_without_data(tmp_path, "--fit", "activation")
    assert code == 2 and "Traceback" not in text, text
    assert "no BatchNorm" in text and "--fit weight" in text
    assert not out.exists()


def test_a_model_without_batchnorm_falls_back_to_noise_with_a_warning(tmp_path):
    code, text, out = search_vit_without_data(tmp_path, "--max-steps", "1")
    assert code == 0, text
    assert "no BatchNorm" in text and "real images" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["data_free"]["method"] == "noise at the input mean/std"


def image_folder(root: Path, n: int = 12) -> Path:
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        px = (torch.rand(24, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(root / f"img{i:02d}.png")
    (root / "notes.txt").write_text("not an image: ignored")
    return root


def test_a_flat_image_folder_is_unlabelled_data(tmp_path):
    root = image_folder(tmp_path / "imgs")
    pre = Preprocess((3, 32, 32), (0.5,) * 3, (0.25,) * 3)
    loaders = build_loaders(parse_data_spec(f"imagefolder:{root}"), pre, DataConfig(batch_size=4))
    assert not loaders.labelled and loaders.test is None
    assert len(loaders.calib.dataset) == 12 and next(iter(loaders.calib)).shape == (4, 3, 32, 32)
    ckpt = tmp_path / "test_resnet.pt"
    torch.save(trained_like(in_chans=3).state_dict(), ckpt)
    code, text = run("search", ckpt, "--input-size", "3,32,32", "--target-flops", "0.5",
                     "--method", "uniform", "--fit", "activation", "--max-steps", "1",
                     "--data", f"imagefolder:{root}", "-o", tmp_path / "r", *FAST)
    assert code == 0, text
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["accuracy"] == {} and rep["data_free"] is None and rep["fit"]
    assert rep["finetune"]["steps"] == 1


def test_an_unreadable_image_exits_2_naming_the_file(tmp_path):
    root = image_folder(tmp_path / "imgs")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ckpt = tmp_path / "test_resnet.pt"
    torch.save(tiny_resnet(in_chans=3).state_dict(), ckpt)
    out = tmp_path / "r"
    code, text = run("search", ckpt, "--input-size", "3,32,32", "--target-flops", "0.5",
                     "--method", "uniform", "--data", f"imagefolder:{root}", "-o", out)
    assert code == 2 and "Traceback" not in text, text
    assert "broken.jpg" in text
    assert not out.exists()


def test_without_data_the_input_comes_from_the_checkpoint_or_the_architecture():
    m = tiny_resnet()
    own = resolve_preprocess(m, None, in_chans=1)
    assert own.input_size == (1, 160, 160)  # timm's data config for test_resnet, 1 channel
    assert own.mean == pytest.approx((0.5,))  # test_resnet's data config (RGB, averaged)
    rec = resolve_preprocess(m, None, in_chans=1,
                             recorded={"input_size": (1, 28, 28), "mean": (0.3,), "std": None})
    assert rec.input_size == (1, 28, 28) and rec.mean == (0.3,)
    assert resolve_preprocess(m, None, input_size=(1, 16, 16), in_chans=1,
                              recorded={"input_size": (1, 28, 28)}).input_size == (1, 16, 16)
