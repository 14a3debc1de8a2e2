"""The cost model agrees with torch's FlopCounterMode (2 FLOPs per MAC) on whole models."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lrcompress.model.costs import count_model, dense_macs, dense_params
from lrcompress.model.layers import find_layers


def reference_macs(model, size) -> int:
    # The math SDPA path decomposes attention into matmuls that FlopCounterMode does count.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, *size))
    return fc.get_total_flops() // 2


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_convnext", "test_efficientnet"])
def test_whole_model_macs_match_flopcounter(name):
    m = timm.create_model(name, pretrained=False).eval()
    size = (3, 64, 64) if name != "test_vit" else m.pretrained_cfg["input_size"]
    c = count_model(m, find_layers(m, size), size)
    ref = reference_macs(m, size)
    assert abs(c.macs - ref) <= 0.01 * ref, (c.macs, ref)
    assert c.params == sum(p.numel() for p in m.parameters())


def test_vit_attention_matmuls_are_counted():
    # Our counter must see the fused SDPA kernel (FlopCounterMode alone would count 0 for it).
    m = timm.create_model("test_vit", pretrained=False).eval()
    size = m.pretrained_cfg["input_size"]
    specs = find_layers(m, size)
    c = count_model(m, specs, size)
    qkv = next(s for s in specs if s.name.endswith("attn.qkv"))
    n_tokens, dim = qkv.tokens, qkv.in_ch
    depth = sum(1 for s in specs if s.name.endswith("attn.qkv"))
    assert c.other_macs == depth * 2 * n_tokens * n_tokens * dim


def test_torchvision_resnet18_published_macs():
    m = torchvision.models.resnet18(weights=None).eval()
    size = (3, 224, 224)
    c = count_model(m, find_layers(m, size), size)
    assert abs(c.macs / 1e9 - 1.814) < 0.0015  # torchvision's published _ops: 1.814 GMACs
    assert c.params == 11_689_512


def test_layer_formulas_match_counter_per_layer():
    m = timm.create_model("test_efficientnet", pretrained=False).eval()  # depthwise + 1x1 + linear
    size = (3, 32, 32)
    for s in find_layers(m, size):
        mod = m.get_submodule(s.name)
        x = torch.zeros(1, s.in_ch, *s.in_hw) if s.kind == "conv2d" else torch.zeros(1, s.in_ch)
        with FlopCounterMode(display=False) as fc:
            mod(x)
        assert dense_macs(s) == fc.get_total_flops() // 2, s.name
        assert dense_params(s) == sum(p.numel() for p in mod.parameters()), s.name
