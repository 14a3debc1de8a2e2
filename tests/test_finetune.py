"""Fine-tuning: regularizer gradients against their formulas, resume equals uninterrupted."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from lrcompress.data import DataConfig, build_loaders, parse_data_spec, resolve_preprocess
from lrcompress.factorizations import get_factorization
from lrcompress.model.layers import find_layers
from lrcompress.model.plan import LayerPlan, Plan
from lrcompress.model.surgery import decompose_
from lrcompress.recover.finetune import FinetuneConfig, distill
from lrcompress.recover.losses import frobenius_decay, hoyer, hoyer_value, orthogonality

from .conftest import tiny_resnet


def tiny_plan(model, factorization="tucker2", rank=4, size=(1, 16, 16)):
    specs = [s for s in find_layers(model, size) if s.kind == "conv2d" and s.kernel == (3, 3)
             and s.in_ch > 1][:3]
    layers = tuple(LayerPlan(s.name, factorization, rank, s) for s in specs)
    return Plan("timm:test_resnet", 10, 1, size, layers, 1, 1)


def test_frobenius_decay_equals_decay_on_the_product():
    torch.manual_seed(0)
    m = tiny_resnet()
    plan = tiny_plan(m)
    decompose_(m, plan)
    val = frobenius_decay(m, plan)
    expect = 0.0
    for lp in plan.layers:
        chain = m.get_submodule(lp.name)
        w = get_factorization(lp.factorization).reconstruct([c.weight for c in chain], lp.spec)
        expect = expect + 0.5 * w.pow(2).sum()
    torch.testing.assert_close(val, expect)
    # Its gradient on a 2-factor product U V is μ U VᵀV (Khodak, frobgrad), not μ U.
    u = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    (0.5 * (u @ v).pow(2).sum()).backward()
    torch.testing.assert_close(u.grad, (u @ v) @ v.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["so", "dso"])
def test_orthogonality_matches_closed_form_gradient(kind):
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(8, 3, bias=False), nn.Linear(3, 8)).double()
    spec = find_layers(nn.Sequential(nn.Linear(8, 8)), (1, 8))[0]
    # Route through the plan machinery: one factorized linear layer.
    model = nn.Sequential()
    model.add_module("0", lin)
    plan = Plan("x", 8, 1, (1, 8), (LayerPlan("0", "svd", 3, spec),), 1, 1)
    loss = orthogonality(model, plan, kind)
    loss.backward()
    for layer in lin:
        u = layer.weight.detach()
        tall = u.shape[0] > u.shape[1]
        # SO on the smaller Gram: ∇ = 4 U (UᵀU − I) for tall U, 4 (UUᵀ − I) U for wide U.
        g = 4 * u @ (u.T @ u - torch.eye(u.shape[1], dtype=u.dtype)) if tall else \
            4 * (u @ u.T - torch.eye(u.shape[0], dtype=u.dtype)) @ u
        if kind == "dso":
            g = g + (4 * (u @ u.T - torch.eye(u.shape[0], dtype=u.dtype)) @ u if tall else
                     4 * u @ (u.T @ u - torch.eye(u.shape[1], dtype=u.dtype)))
        torch.testing.assert_close(layer.weight.grad, g, rtol=1e-9, atol=1e-9)


def distill_setup():
    torch.manual_seed(0)
    teacher = tiny_resnet()
    plan = tiny_plan(teacher)
    student = copy.deepcopy(teacher)
    decompose_(student, plan)
    spec = parse_data_spec("synthetic:48")
    pre = resolve_preprocess(teacher, spec, input_size=(1, 16, 16), in_chans=1)
    loaders = build_loaders(spec, pre, DataConfig(batch_size=16, seed=0), num_classes=10)
    return teacher, student, plan, loaders


def test_distillation_lowers_the_training_loss():
    teacher, student, plan, loaders = distill_setup()
    cfg = FinetuneConfig(epochs=4, lr=0.05)
    res = distill(student, teacher, plan, loaders, cfg, torch.device("cpu"))
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert 1 <= res.best_epoch <= 4


def test_kill_and_resume_gives_the_same_weights(tmp_path, monkeypatch):
    cfg = FinetuneConfig(epochs=3, lr=0.05, frobenius_decay=1e-4, orth="so")
    teacher, student, plan, loaders = distill_setup()
    distill(student, teacher, plan, loaders, cfg, torch.device("cpu"), seed=3)
    uninterrupted = student.state_dict()

    import lrcompress.recover.finetune as ft

    teacher, student, plan, loaders = distill_setup()
    calls = {"n": 0}
    real = ft.evaluate

    def dying_evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the end of epoch 2: killed before its state is saved
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ft, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        distill(student, teacher, plan, loaders, cfg, torch.device("cpu"), state_dir=tmp_path,
                seed=3)
    monkeypatch.setattr(ft, "evaluate", real)
    teacher, student, plan, loaders = distill_setup()  # a fresh process: nothing kept in memory
    res = distill(student, teacher, plan, loaders, cfg, torch.device("cpu"), state_dir=tmp_path,
                  seed=3)
    assert res.resumed_from_epoch == 1
    resumed = student.state_dict()
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=0, atol=0)


def test_a_list_of_batches_trains_like_a_loader():
    """A train "loader" that is not a DataLoader (a list of batches: no generator, sampler or
    dataset to seed) still fine-tunes."""
    teacher, student, plan, loaders = distill_setup()
    batches = [(x.clone(), y.clone()) for x, y in loaders.train]
    res = distill(student, teacher, plan, replace(loaders, train=batches),
                  FinetuneConfig(max_steps=2, lr=0.05), torch.device("cpu"))
    assert res.steps == 2 and len(res.history) == 1
    assert res.history[0]["steps"] == 2 and res.history[0]["loss"] > 0


def test_changed_command_refuses_to_resume(tmp_path):
    teacher, student, plan, loaders = distill_setup()
    cfg = FinetuneConfig(epochs=1, lr=0.05)
    distill(student, teacher, plan, loaders, cfg, torch.device("cpu"), state_dir=tmp_path,
            fingerprint="a")
    from lrcompress.errors import UserError

    with pytest.raises(UserError, match="different command"):
        distill(student, teacher, plan, loaders, cfg, torch.device("cpu"), state_dir=tmp_path,
                fingerprint="b")


def test_hoyer_on_singular_values_and_its_gradient():
    # A known matrix: singular values 3, 2, 1 (orthogonal factors), so ‖s‖₁/‖s‖₂ − 1 = 6/√14 − 1.
    torch.manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    w = q1[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ q2[:3]
    torch.testing.assert_close(hoyer_value(w), torch.tensor(6 / 14**0.5 - 1, dtype=torch.float64))
    # Matricized T × rest: a 4-D conv weight is read as (T, S·k·k).
    torch.testing.assert_close(hoyer_value(w.reshape(4, 6, 1, 1)), hoyer_value(w))
    # Differentiable: finite differences agree (distinct, non-zero singular values).
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(hoyer_value, (x,))
    # Over the plan: the sum of each factorized layer's value on its reconstructed weight.
    m = tiny_resnet()
    plan = tiny_plan(m)
    decompose_(m, plan)
    expect = sum(hoyer_value(get_factorization(lp.factorization).reconstruct(
        [c.weight for c in m.get_submodule(lp.name)], lp.spec)) for lp in plan.layers)
    val = hoyer(m, plan)
    torch.testing.assert_close(val, expect)
    val.backward()
    assert all(c.weight.grad is not None for lp in plan.layers for c in m.get_submodule(lp.name))


def test_hoyer_weight_enters_the_loss():
    teacher, student, plan, loaders = distill_setup()
    base = distill(copy.deepcopy(student), teacher, plan, loaders,
                   FinetuneConfig(max_steps=1, lr=0.05), torch.device("cpu"))
    reg = distill(student, teacher, plan, loaders, FinetuneConfig(max_steps=1, lr=0.05, hoyer=1.0),
                  torch.device("cpu"))
    assert reg.history[0]["loss"] > base.history[0]["loss"]


def test_after_a_rene_search_every_weight_of_the_student_trains(fast_torch):
    """rene trains its α with the model's weights frozen; that must neither leave the model
    frozen nor the student built from it: fine-tuning changes the layers that were not
    factorized too (the stem, BatchNorms, classifier), not only the new chains."""
    import lrcompress

    torch.manual_seed(0)
    m = tiny_resnet()
    xs = [torch.randn(16, 1, 32, 32) for _ in range(4)]
    train = [(x, torch.randint(0, 10, (16,))) for x in xs]
    res = lrcompress.compress(m, torch.zeros(1, 1, 32, 32), target_flops=0.5, method="rene",
                              calib=xs, train=train, device="cpu",
                              finetune=FinetuneConfig(max_steps=4, lr=0.1))
    assert all(p.requires_grad for p in m.parameters())
    factorized = tuple(lp.name + "." for lp in res.plan.layers)
    before, after = m.state_dict(), res.model.state_dict()
    kept = [k for k in after if k.endswith("weight") and k in before
            and not k.startswith(factorized) and before[k].shape == after[k].shape]
    assert len(kept) > 10
    unchanged = [k for k in kept if torch.equal(before[k], after[k])]
    assert unchanged == []
