"""The cost model agrees with torch's FlopCounterMode (2 FLOPs per MAC) on whole models."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lrcompress.errors import LrcError, UserError
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


# A Swin small enough for tests: a 8×8 patch grid in 2×2 windows (16 windows, then 4).
TINY_SWIN = dict(img_size=32, window_size=2, embed_dim=32, depths=(1, 1), num_heads=(1, 2),
                 num_classes=10)


def _flop_counter_by_layer(model, size) -> dict[str, int]:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, *size))
    root = type(model).__name__ + "."
    return {k[len(root):]: sum(v.values()) // 2 for k, v in fc.get_flop_counts().items()
            if k.startswith(root)}


def test_swin_windowed_linears_count_every_window():
    m = timm.create_model("swin_tiny_patch4_window7_224", **TINY_SWIN).eval()
    size = (3, 32, 32)
    specs = find_layers(m, size)
    ref = _flop_counter_by_layer(m, size)
    for s in specs:
        assert dense_macs(s) == ref[s.name], s.name  # exact: the same shapes, the same formula
    qkv = next(s for s in specs if s.name == "layers.0.blocks.0.attn.qkv")
    assert qkv.tokens == 64  # 16 windows × 4 tokens, not the 4 tokens of one window
    assert count_model(m, specs, size).macs == reference_macs(m, size)


class _Folded(nn.Module):
    """A conv run on two half-channel maps folded into the batch, and a linear used twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.conv(x.reshape(b * 2, c // 2, h, w))  # (2b, 8, h, w)
        y = y.reshape(b, 16, h * w).mean(-1)
        return self.fc(self.fc(y))


def test_conv_on_folded_batch_and_shared_linear_are_counted_whole():
    from lrcompress.factorizations import get_factorization

    m = _Folded().eval()
    size = (8, 6, 6)
    specs = {s.name: s for s in find_layers(m, size)}
    conv, fc = specs["conv"], specs["fc"]
    assert conv.copies == 2 and conv.out_positions == 72
    assert fc.tokens == 2 and fc.unsupported == "called more than once per forward"
    ref = _flop_counter_by_layer(m, size)
    assert (dense_macs(conv), dense_macs(fc)) == (ref["conv"], ref["fc"])
    assert count_model(m, list(specs.values()), size).macs == reference_macs(m, size)
    # A factorized chain's MACs on the folded input, by formula and by FlopCounterMode.
    tucker = get_factorization("tucker2")
    chain = tucker.skeleton(conv, (2, 3)).to_empty(device="cpu")
    with FlopCounterMode(display=False) as fc_chain:
        chain(torch.zeros(conv.input_shape(1)))
    assert tucker.macs(conv, (2, 3)) == fc_chain.get_total_flops() // 2


class _SharedConv(nn.Module):
    """One conv called on maps of two sizes: no single spec describes it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean() + self.conv(x[..., ::2, ::2]).mean()


def test_census_disagreeing_with_flop_counter_names_the_layer():
    m = _SharedConv().eval()
    size = (3, 8, 8)
    with pytest.raises(LrcError, match=r"conv: 1296 vs 6480") as e:
        count_model(m, find_layers(m, size), size)
    assert not isinstance(e.value, UserError)  # a census bug, never the user's input
    assert "before any work" in str(e.value)
