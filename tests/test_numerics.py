"""Numerical health (issue #7 §6): NaN/Inf in fine-tuning is rolled back or stops the run with the
stage, step and layer named; CP-ALS divergence is retried per layer and reported."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from click.testing import CliRunner

import lrcompress.factorizations.cp as cp_module
import lrcompress.recover.finetune as ft
from lrcompress.cli import main
from lrcompress.errors import UserError
from lrcompress.factorizations import (
    DecompositionError,
    collect_notes,
    get_factorization,
    relative_error,
)
from lrcompress.model.surgery import decompose_
from lrcompress.recover.finetune import FinetuneConfig, distill
from lrcompress.util.numerics import NonFiniteGuard, ParamSnapshot, first_nonfinite_output

from .conftest import tiny_resnet
from .test_factorizations import SHAPES, weights
from .test_finetune import distill_setup, tiny_plan

CPU = torch.device("cpu")
POISONED = "layer1.0.conv1"  # a factorized layer of tiny_plan


def _poison(student, when, layer=POISONED, grad_of=None):
    """NaN in ``layer``'s output (or, with ``grad_of``, in that parameter's gradient) on the
    training forwards for which ``when(n)`` is true (n = 1, 2, ... counts forwards with autograd
    on). A no-grad re-run of the same batch (the diagnosis) is poisoned like the forward it
    re-runs. Returns the student's state_dict at the start of every training forward."""
    seen = {"n": 0, "on": False}
    snaps = {}

    def pre(_m, _a):
        if torch.is_grad_enabled():
            seen["n"] += 1
            seen["on"] = when(seen["n"])
            snaps[seen["n"]] = {k: v.clone() for k, v in student.state_dict().items()}

    student.register_forward_pre_hook(pre)
    if grad_of is None:
        student.get_submodule(layer).register_forward_hook(
            lambda _m, _i, out: out * float("nan") if seen["on"] else out)
    else:
        student.get_parameter(grad_of).register_hook(
            lambda g: g * float("nan") if seen["on"] else g)
    return snaps


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def logs(caplog, monkeypatch):
    """caplog, also after a CLI test in this process made the lrcompress logger stop
    propagating."""
    monkeypatch.setattr(logging.getLogger("lrcompress"), "propagate", True)
    with caplog.at_level(logging.WARNING, "lrcompress"):
        yield caplog


@pytest.mark.parametrize("where", ["output", "gradient"])
def test_a_nonfinite_step_is_rolled_back_and_training_goes_on(where, tmp_path, logs):
    teacher, student, plan, loaders = distill_setup()  # 3 batches per epoch
    grad_of = "fc.weight" if where == "gradient" else None
    snaps = _poison(student, lambda n: n == 2, grad_of=grad_of)
    res = distill(student, teacher, plan, loaders, FinetuneConfig(epochs=2, lr=0.05), CPU,
                  state_dir=tmp_path)
    # Batch 2 was skipped: no optimizer update, and the BatchNorm statistics its forward pass
    # poisoned were restored, so batch 3 starts from exactly the state batch 2 started from.
    assert _same(snaps[2], snaps[3])
    assert not _same(snaps[1], snaps[2]) and not _same(snaps[3], snaps[4])  # the others stepped
    assert res.skipped_steps == 1 and res.steps == 5
    assert [r["skipped_steps"] for r in res.history] == [1, 0]
    assert all(torch.isfinite(v).all() for v in student.state_dict().values()
               if v.is_floating_point())
    named = "the gradient of 'fc.weight'" if grad_of else f"the output of layer {POISONED!r}"
    assert f"epoch 1, batch 2 (first non-finite: {named})" in logs.text


def test_repeated_nonfinite_steps_stop_with_stage_step_and_layer(tmp_path):
    teacher, student, plan, loaders = distill_setup()
    _poison(student, lambda n: n >= 2)
    with pytest.raises(UserError) as e:
        distill(student, teacher, plan, loaders, FinetuneConfig(epochs=3, lr=0.05), CPU,
                state_dir=tmp_path)
    msg = str(e.value)
    for w in ("Fine-tuning stopped at epoch 2, batch 1", "NaN/Inf on 3 consecutive steps",
              f"first non-finite value appeared in the output of layer {POISONED!r}",
              "--lr", "resumes"):
        assert w in msg, msg
    # Epoch 1 (batches 2 and 3 bad, so one good step) finished and was saved; nothing of epoch 2.
    st = torch.load(tmp_path / "finetune.pt", weights_only=True)
    assert st["epoch"] == 1 and st["history"][0]["skipped_steps"] == 2


def test_weights_made_nonfinite_by_the_step_stop_the_run(tmp_path, monkeypatch):
    teacher, student, plan, loaders = distill_setup()
    real = torch.optim.SGD.step

    def overflowing_step(self, *a, **k):  # finite loss and gradients, a NaN weight after
        out = real(self, *a, **k)
        student.get_parameter("fc.bias").data[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", overflowing_step)
    with pytest.raises(UserError, match=r"at epoch 1, batch 1: the optimizer step made weight "
                                        r"'fc.bias' NaN/Inf.*Lower --lr"):
        distill(student, teacher, plan, loaders, FinetuneConfig(epochs=1), CPU,
                state_dir=tmp_path)
    assert not (tmp_path / "finetune.pt").exists()


def test_nan_in_fine_tuning_exits_2_through_the_cli(resnet_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(ft, "diss_loss", lambda *a, **k: torch.tensor(float("nan")))
    out = tmp_path / "run"
    r = CliRunner().invoke(main, [
        "search", str(resnet_ckpt["pt"]), "--input-size", "1,32,32", "--data", "synthetic:32",
        "--method", "uniform", "--target-flops", "0.5", "--rank-multiple", "1",
        "--batch-size", "8", "--max-steps", "6", "-o", str(out)], obj={})
    assert r.exit_code == 2, r.output
    assert "Fine-tuning stopped at epoch 1, batch 3" in r.output and "Traceback" not in r.output
    assert not (out / "model.safetensors").exists() and not (out / "report.json").exists()
    assert not (out / "state" / "finetune.pt").exists()
    assert (out / "state" / "decomposed.safetensors").exists()  # finished stages are kept


# ------------------------------------------------------------------ the generic helpers
def test_guard_counts_consecutive_bad_steps_only():
    g = NonFiniteGuard("Search", limit=3, advice="Try X.")
    g.skip("it 1", "loss", None)
    g.skip("it 2", "loss", None)
    g.ok()
    g.skip("it 4", "loss", "layer 'a'")
    g.skip("it 5", "loss", "layer 'b'")
    with pytest.raises(UserError) as e:
        g.skip("it 6", "gradient", None)
    assert g.skipped == 5
    assert str(e.value).startswith("Search stopped at it 6: the gradient was NaN/Inf on 3 "
                                   "consecutive steps")
    assert "appeared in layer 'a'" in str(e.value) and str(e.value).endswith("Try X.")


def test_param_snapshot_rolls_back_a_step_of_a_search_style_loop():
    """The pattern rene's α step can use: snapshot, step, check, restore on NaN. A run with a
    poisoned iteration ends exactly where a run without that iteration does (weights and Adam
    moments both rolled back)."""

    def loop(iters, poisoned=()):
        alpha = torch.nn.Parameter(torch.linspace(-1, 1, 5))
        opt = torch.optim.Adam([alpha], lr=0.1)
        guard = NonFiniteGuard("Rank search")
        for it in iters:
            snap = ParamSnapshot([alpha], opt)
            opt.zero_grad()
            target = torch.full((5,), float("nan") if it in poisoned else float(it))
            loss = (torch.softmax(alpha, 0) * target).sum() + alpha.pow(2).sum()
            loss.backward()
            opt.step()
            if not torch.isfinite(alpha).all():
                snap.restore()
                guard.skip(f"iteration {it}", "loss", None)
                continue
            guard.ok()
        return alpha.detach(), guard.skipped

    a, skipped = loop(range(6), poisoned={3})
    b, _ = loop([0, 1, 2, 4, 5])
    c, _ = loop(range(6))
    assert skipped == 1 and torch.equal(a, b) and not torch.equal(a, c)


def test_first_nonfinite_output_names_the_first_module_in_execution_order():
    m = tiny_resnet()
    m.get_submodule("layer2.0.conv1").register_forward_hook(lambda _m, _i, o: o * float("inf"))
    x = torch.randn(2, 1, 16, 16)
    assert first_nonfinite_output(m, lambda: m(x)) == "layer2.0.conv1"
    assert first_nonfinite_output(tiny_resnet(), lambda: tiny_resnet()(x)) is None


# ------------------------------------------------------------------ CP-ALS divergence
def _flaky_cp_als(monkeypatch, fail_always=False):
    """CP-ALS whose first attempt (SVD initialisation, default ridge) always diverges."""
    real = cp_module.cp_als
    calls = []

    def flaky(x, init, n_iter_max, tol, *retry):
        calls.append(bool(retry))
        if fail_always or not retry:
            return [torch.full_like(t, float("nan")) for t in init]
        return real(x, init, n_iter_max, tol, *retry)

    monkeypatch.setattr(cp_module, "cp_als", flaky)
    return calls


def test_cp_divergence_is_retried_from_another_initialisation(monkeypatch, logs):
    fact, spec = get_factorization("cp"), SHAPES["3x3"]
    w, _ = weights(spec)
    good = fact.decompose(w, spec, 5)
    calls = _flaky_cp_als(monkeypatch)
    with collect_notes() as notes:
        factors = fact.decompose(w, spec, 5)
    assert calls == [False, True]
    assert notes == [{"layer": "conv", "rank": 5, "retries": 1, "init": "random", "ok": True}]
    assert "retrying from random factors" in logs.text
    err = relative_error(w, fact.reconstruct(factors, spec))
    assert err < 1 and err < 1.5 * relative_error(w, fact.reconstruct(good, spec))


def test_cp_divergence_after_every_retry_is_a_user_error(monkeypatch):
    fact, spec = get_factorization("cp"), SHAPES["3x3"]
    w, _ = weights(spec)
    calls = _flaky_cp_als(monkeypatch, fail_always=True)
    with pytest.raises(DecompositionError) as e:
        fact.decompose(w, spec, 5)
    assert isinstance(e.value, UserError) and len(calls) == 3
    assert "'conv' at rank 5" in str(e.value) and "--exclude 'conv'" in str(e.value)


def test_cp_retries_are_recorded_per_layer_in_the_report(resnet_ckpt, tmp_path, monkeypatch):
    from lrcompress.commands.search import SearchConfig, search
    from lrcompress.data import DataConfig
    from lrcompress.model.plan import Target

    _flaky_cp_als(monkeypatch)
    res = search(str(resnet_ckpt["pt"]), "synthetic:16", tmp_path / "run", SearchConfig(
        Target("flops", 0.5), decomp="cp", method="uniform", rank_multiple=1,
        data=DataConfig(batch_size=8), input_size=(1, 32, 32)))
    rows = {r["name"]: r for r in json.loads((tmp_path / "run" / "report.json").read_text())[
        "layers"]}
    cp_rows = [r for r in rows.values() if r["factorization"] == "cp" and len(r["shape"]) == 4
               and r["shape"][2] > 1]
    assert cp_rows and all(r["decomposition_retries"] == 1 for r in cp_rows)
    assert all(r["decomposition_retries"] == 0 for r in rows.values() if r["shape"][2:] == [1, 1])
    assert res.report["layers"] == list(rows.values())


def test_cp_divergence_exits_2_naming_the_layer(resnet_ckpt, tmp_path, monkeypatch):
    _flaky_cp_als(monkeypatch, fail_always=True)
    r = CliRunner().invoke(main, [
        "search", str(resnet_ckpt["pt"]), "--input-size", "1,32,32", "--data", "synthetic:16",
        "--decomp", "cp", "--method", "uniform", "--target-flops", "0.5", "--rank-multiple", "1",
        "-o", str(tmp_path / "run")], obj={})
    assert r.exit_code == 2, r.output
    assert "CP-ALS produced non-finite factors" in r.output and "--exclude '" in r.output
    assert "--decomp" in r.output and "Traceback" not in r.output


def test_surgery_counts_retries_per_layer(monkeypatch):
    _flaky_cp_als(monkeypatch)
    m = tiny_resnet()
    plan = tiny_plan(m, factorization="cp")
    res = decompose_(m, plan)
    assert [r.retries for r in res] == [1, 1, 1]
