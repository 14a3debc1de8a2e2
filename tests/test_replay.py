"""PrefixReplay: a model with one layer changed gives the full forward's output, bit for bit,
while the modules that layer cannot affect are not run again."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

from lrcompress.model.replay import PrefixReplay
from lrcompress.model.surgery import swap_modules


def _models():
    torch.manual_seed(0)
    return {
        "timm test_resnet": (timm.create_model("test_resnet", pretrained=False,
                                               num_classes=5), (3, 32, 32)),
        # torchvision's BasicBlock calls one in-place ReLU twice (in place, result reused)
        "torchvision resnet18": (torchvision.models.resnet18(num_classes=5), (3, 32, 32)),
        "timm test_efficientnet": (timm.create_model("test_efficientnet", pretrained=False,
                                                     num_classes=5), (3, 32, 32)),
        "timm test_vit": (timm.create_model("test_vit", pretrained=False, num_classes=5),
                          (3, 32, 32)),
    }


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _convs_run(model: nn.Module, fn) -> tuple[object, int]:
    calls = []
    hs = [m.register_forward_hook(lambda *a: calls.append(1)) for m in model.modules()
          if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        return fn(), len(calls)
    finally:
        for h in hs:
            h.remove()


@pytest.mark.parametrize("name", list(_models()))
@torch.no_grad()
def test_replay_equals_the_full_forward_with_any_one_layer_changed(name):
    """For every conv/linear layer changed (a perturbed copy swapped in), the logits with the
    replay equal the full forward's exactly, and fewer conv/linear calls run (summed over the
    layers, at most 80 % of the full passes)."""
    model, size = _models()[name]
    model.eval()
    batches = [torch.randn(3, *size), torch.randn(2, *size)]
    layers = _layers(model)
    replay = PrefixReplay(model, layers)
    replay.record(lambda: [model(x) for x in batches])
    assert replay.records
    full_calls = replay_calls = 0
    for layer in layers:
        new = copy.deepcopy(model.get_submodule(layer))
        new.weight.mul_(0.9)
        with swap_modules(model, {layer: new}):
            want, n_full = _convs_run(model, lambda: [model(x) for x in batches])
            with replay.changed(layer):
                got, n_replay = _convs_run(model, lambda: [model(x) for x in batches])
        assert all(torch.equal(a, b) for a, b in zip(got, want)), layer
        full_calls += n_full
        replay_calls += n_replay
    assert replay_calls <= 0.8 * full_calls
    # nothing is left patched: the unmodified model still runs every module
    _, n_after = _convs_run(model, lambda: model(batches[0]))
    assert n_after == len(layers)


@torch.no_grad()
def test_replay_keeps_within_its_memory_budget_shallow_modules_first():
    """Under a budget that holds only part of the records, the deeper modules' are dropped first
    and the result stays exact."""
    model, size = _models()["timm test_resnet"]
    model.eval()
    x = torch.randn(4, *size)
    layers = _layers(model)
    full = PrefixReplay(model, layers)
    full.record(lambda: model(x))
    small = PrefixReplay(model, layers, max_bytes=full.bytes // 3)
    small.record(lambda: model(x))
    assert 0 < small.bytes <= full.bytes // 3
    kept = [small.depth[m] for m in small.records]
    dropped = [small.depth[m] for m in small.dropped]
    assert dropped and max(kept) <= min(dropped)
    layer = layers[-2]
    new = copy.deepcopy(model.get_submodule(layer))
    new.weight.mul_(0.5)
    with swap_modules(model, {layer: new}):
        want = model(x)
        with small.changed(layer):
            assert torch.equal(model(x), want)


@torch.no_grad()
def test_a_module_that_changes_its_input_without_returning_it_is_never_replayed():
    """A module that writes into its input and returns something else cannot be replayed from
    its output alone: it is dropped, and the result stays exact."""

    class Sneaky(nn.Module):
        def forward(self, x):
            x.mul_(2)
            return x + 1

    model = nn.Sequential(nn.Conv2d(2, 3, 1), Sneaky(), nn.Conv2d(3, 3, 1), nn.Conv2d(3, 2, 1))
    model.eval()
    x = torch.randn(2, 2, 4, 4)
    replay = PrefixReplay(model, ["2", "3"])
    replay.record(lambda: model(x.clone()))
    assert model[1] in replay.dropped and model[0] in replay.records
    new = copy.deepcopy(model[3])
    new.weight.mul_(0.5)
    with swap_modules(model, {"3": new}):
        want = model(x.clone())
        with replay.changed("3"):
            assert torch.equal(model(x.clone()), want)
