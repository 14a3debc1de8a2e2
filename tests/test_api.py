"""The Python API on models the user built: compress, save, load, the stages, bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lrcompress
from lrcompress.measure.metrics import independent_macs
from lrcompress.util.config import config_from_dict, config_to_dict

ROOT = Path(__file__).resolve().parents[1]
QUICK = lrcompress.ReneConfig(iters=3, warmup=1, n_candidates=3)


class Net(nn.Module):
    """A small user-defined CNN (not a timm/torchvision architecture)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width), nn.ReLU())
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean(dim=(2, 3)))


def data(n=64, batch=16, seed=0, labelled=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) if labelled else x[i:i + batch]
            for i in range(0, n, batch)]


def net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


EX = torch.zeros(1, 1, 16, 16)


def run(model=None, **kw):
    args = dict(target_flops=0.5, decomp="tucker2", method="rene", calib=data(), eval=data(seed=1),
                rene=QUICK, device="cpu")
    args.update(kw)
    return lrcompress.compress(model if model is not None else net(), EX, **args)


def test_custom_model_example_end_to_end(tmp_path):
    """examples/custom_model.py: MACs by FlopCounterMode meet the target, reload is exact."""
    spec = importlib.util.spec_from_file_location("custom_model", ROOT / "examples" /
                                                  "custom_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    s = mod.main(["--steps", "2", "--train-steps", "3", "--out", str(tmp_path)])
    assert s["macs_compressed"] <= 0.5 * s["macs_original"]
    assert s["layers_factorized"] >= 1 and s["reload_identical"] is True
    assert (tmp_path / "m.safetensors").is_file()


def test_compress_meets_the_target_and_reloads_identically(tmp_path):
    result = run(finetune=lrcompress.FinetuneConfig(max_steps=2), train=data(seed=2))
    assert independent_macs(result.model, (1, 16, 16)) <= 0.5 * independent_macs(net(), (1, 16, 16))
    applied = result.report["bn_recalibration"]["applied"]  # when it lowered the calib loss
    assert set(result.report["accuracy"]) == {"original", "decomposed", "finetuned"} | (
        {"bn_recalibrated"} if applied else set())
    path = lrcompress.save(result, tmp_path / "m.safetensors")
    x = torch.randn(4, 1, 16, 16)
    for how in (Net, lambda: Net(), Net()):
        again = lrcompress.load(path, model=how)
        with torch.no_grad():
            assert torch.equal(again(x), result.model.eval()(x))


def test_the_users_model_is_left_as_it_was():
    model = net()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run(model)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.Sequential, Net))
               for m in model.modules())


def test_unlabelled_loaders_are_labelled_by_the_original():
    result = run(calib=data(labelled=False), train=data(seed=3, labelled=False),
                 finetune=lrcompress.FinetuneConfig(max_steps=2))
    assert result.report["finetune"]["steps"] == 2
    assert result.report["accuracy"]["finetuned"]["n"] == 64


def test_dict_batches_with_input_and_label_keys():
    calib = [{"image": x, "target": y, "id": 0} for x, y in data()]
    result = run(calib=calib, eval=[{"image": x, "target": y} for x, y in data(seed=1)],
                 input_key="image", label_key="target", method="uniform")
    assert result.report["accuracy"]["original"]["n"] == 64


def test_without_data_only_data_free_methods_run():
    result = run(calib=None, eval=None, method="uniform")
    assert result.report["accuracy"] == {} and result.report["bn_recalibration"] is None
    with pytest.raises(lrcompress.UserError, match="needs calibration data"):
        run(calib=None, eval=None, method="rene")


def test_synth_makes_the_api_data_free():
    """synth=SynthConfig() without calib/train: inputs synthesised for the rene search, the
    activation fit and distillation; accuracy still measured on eval=."""
    synth = lrcompress.SynthConfig(samples=16, batch_size=16, iters=3)
    result = run(calib=None, method="rene", fit="activation", synth=synth,
                 finetune=lrcompress.FinetuneConfig(max_steps=1))
    free = result.report["data_free"]
    assert free["method"] == "batchnorm statistics" and free["batchnorm_layers"] == 2
    assert free["used_for"] == ["the rene rank search", "the activation fit", "fine-tuning"]
    assert result.report["bn_recalibration"] is None  # not on synthetic inputs after this fit
    weight = run(calib=None, method="uniform", fit="weight", synth=synth)
    assert weight.report["data_free"]["used_for"] == ["BatchNorm re-estimation"]
    assert weight.report["bn_recalibration"]["samples"] == 16  # on the synthesised inputs
    assert result.report["accuracy"]["finetuned"]["n"] == 64
    with pytest.raises(lrcompress.UserError, match="leave it out"):
        run(synth=synth)  # calib given as well


def test_the_same_seed_gives_the_same_file_and_run_dir_matches_save(tmp_path):
    a = run(run_dir=tmp_path / "run", method="uniform")
    b = run(method="uniform")
    lrcompress.save(b, tmp_path / "b.safetensors")
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == \
        (tmp_path / "b.safetensors").read_bytes()
    assert a.plan == b.plan
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["command"] == ["lrcompress.compress"] and report["model"]["source"] == "python"
    with pytest.raises(lrcompress.UserError, match="already holds the finished result"):
        run(run_dir=tmp_path / "run", method="uniform")
    run(run_dir=tmp_path / "run", method="uniform", overwrite=True)


def test_stages_one_by_one_match_compress():
    model = net()
    plan = lrcompress.select_ranks(model, EX, target_flops=0.5, decomp="tucker2",
                                   method="uniform", device="cpu")
    assert plan == run(method="uniform").plan
    student = Net()
    student.load_state_dict(model.state_dict())
    lrcompress.decompose_(student, plan)
    rec = lrcompress.recalibrate_bn(student, plan, data(labelled=False), batches=2, device="cpu")
    assert rec["batches"] == 2
    ft = lrcompress.distill(student, model, plan, data(seed=2), data(), device="cpu",
                            finetune=lrcompress.FinetuneConfig(max_steps=2))
    assert ft.steps == 2
    acc = lrcompress.evaluate(student, data(seed=1), device="cpu")
    assert 0 <= acc.top1 <= 100 and acc.n == 64


def test_export_onnx_writes_a_checked_graph(tmp_path):
    onnx = pytest.importorskip("onnx")
    result = run(method="uniform", calib=None, eval=None)
    path = lrcompress.export_onnx(result.model, EX, tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


@pytest.mark.parametrize("cfg", [
    lrcompress.FinetuneConfig(max_steps=7, orth="dso"),
    lrcompress.ReneConfig(iters=5, prior="zero"),
    lrcompress.CompressConfig(lrcompress.Target("params", 0.4), decomp="cp", include=("a.*",)),
])
def test_configs_round_trip_through_json(cfg):
    text = json.dumps(config_to_dict(cfg))
    assert config_from_dict(type(cfg), json.loads(text)) == cfg


# ------------------------------------------------------------------------------ bad input


class OnlyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("call, match", [
    (lambda: lrcompress.compress(OnlyHead(), EX, target_flops=0.5, method="uniform"),
     "can be factorized"),
    (lambda: lrcompress.compress(net(), torch.zeros(1, 3, 16, 16), target_flops=0.5),
     "rejects example_inputs"),
    (lambda: run(calib=[torch.zeros(4, 1, 8, 8)]), "shape"),
    (lambda: run(calib=[{"x": torch.zeros(4, 1, 16, 16)}]), "input_key"),
    (lambda: run(eval=data(labelled=False)), "no labels"),
    (lambda: run(target_params=0.5), "exactly one target"),
    (lambda: run(calib=torch.zeros(4, 1, 16, 16)), "iterable of batches"),
    (lambda: run(finetune=lrcompress.FinetuneConfig(max_steps=2)), "training data"),
    (lambda: lrcompress.compress("resnet18", EX, target_flops=0.5), "nn.Module"),
])
def test_bad_input_is_a_user_error(call, match):
    with pytest.raises(lrcompress.UserError, match=match):
        call()


def test_load_refuses_a_model_that_does_not_match_the_plan(tmp_path):
    path = lrcompress.save(run(method="uniform"), tmp_path / "m.safetensors")
    with pytest.raises(lrcompress.UserError, match="pass model="):
        lrcompress.load(path)
    with pytest.raises(lrcompress.UserError):
        lrcompress.load(path, model=lambda: Net(width=16))
    with pytest.raises(lrcompress.UserError):
        lrcompress.load(path, model=OnlyHead)


def test_the_file_format_keeps_its_header_key(tmp_path):
    """model.safetensors carries the plan under 'lrcompress.plan' (files written by every
    earlier version use that key; a code move once renamed it by accident)."""
    from safetensors import safe_open

    path = lrcompress.save(run(method="uniform", calib=None, eval=None), tmp_path / "m.st")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert set(meta) == {"lrcompress.plan", "lrcompress.version", "format"}
    assert json.loads(meta["lrcompress.plan"])["layers"][0]["method"] == "tucker2"


def test_progress_names_each_rene_step_with_its_size():
    """Long stages say what unit of work they count and how many there are (for the ETA)."""
    from lrcompress.util.progress import Progress

    class Recorder(Progress):
        def __init__(self):
            self.stages, self.done = [], {}

        def stage(self, name, total=None):
            self.stages.append((name, total))
            self.done[name] = 0

        def advance(self, n=1):
            self.done[self.stages[-1][0]] += n

    rec = Recorder()
    run(progress=rec)
    steps = [(n, t) for n, t in rec.stages if n.startswith("rank selection (rene): step")]
    assert steps and all(t is not None for _, t in steps)
    for name, total in steps:  # every counted stage ends at its announced size
        assert rec.done[name] == total, (name, rec.done[name], total)


def test_activation_fit_through_the_api_lowers_the_output_error():
    weight = run(method="uniform", fit="weight")
    act = run(method="uniform", fit="activation")
    assert act.plan == weight.plan
    layers = act.report["fit"]["layers"]
    assert layers and all(r["output_error"] <= 1.01 * r["output_error_weight_fit"]
                          for r in layers.values() if r.get("output_error") is not None)
    with pytest.raises(lrcompress.UserError, match="calib="):
        run(method="uniform", fit="activation", calib=None, eval=None)


def test_a_run_dir_without_test_data_still_writes_its_reports(tmp_path):
    run(method="uniform", calib=None, eval=None, run_dir=tmp_path / "run")
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Not measured: the run had no test data" in md
    assert (tmp_path / "run" / "report.html").is_file()
