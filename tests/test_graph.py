"""The graph ONNX Runtime runs for a compressed model (issue 14, graph-level costs): the exported
graph's nodes around factor convs, BatchNorm folding, the chain merge on 1×1 maps, and the one set
of session options shared by parity and timing sessions. No timing assertions."""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lrcompress
from lrcompress.deploy import onnx as deploy
from lrcompress.deploy.onnx import (
    check_parity,
    export_onnx,
    merge_linear_chains,
    merged_chains,
    session_options,
)
from lrcompress.measure import layer_timing

from .conftest import tiny_resnet

STRAY = {"Identity", "Transpose", "Reshape", "Cast", "CastLike", "BatchNormalization"}


@pytest.fixture(scope="module")
def compressed():
    """A tt-compressed test_resnet (1×28×28, 10 classes) whose BatchNorms are far from identity,
    so that folding them into the convs is visible in the numbers."""
    torch.set_num_threads(1)
    model = tiny_resnet()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    res = lrcompress.compress(model, torch.zeros(1, 1, 28, 28), target_flops=0.5, decomp="tt",
                              method="uniform", rank_multiple=1, device="cpu")
    return res.model.eval(), res.plan


def test_exported_graph_has_only_convs_around_factor_convs(compressed):
    model, plan = compressed
    proto = export_onnx(model, (1, 28, 28), dynamic_batch=True)
    nodes = list(proto.graph.node)
    assert not any(n.op_type == "BatchNormalization" for n in nodes)  # folded by the exporter
    layers = {lp.name for lp in plan.layers}
    assert layers
    pat = re.compile(r"^(.*)\.\d+\.weight$")

    def chain_of(node):
        m = pat.match(node.input[1]) if node.op_type == "Conv" else None
        return m.group(1) if m and m.group(1) in layers else None

    factor = [n for n in nodes if chain_of(n)]
    assert {chain_of(n) for n in factor} == layers
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in factor:
        around = [producer[i] for i in n.input if i in producer]
        around += [c for o in n.output for c in consumers.get(o, [])]
        assert not {a.op_type for a in around} & STRAY, (n.name, [a.op_type for a in around])
        # inside a chain, a factor conv feeds the next factor conv directly
        nxt = [c for o in n.output for c in consumers.get(o, [])]
        if any(chain_of(c) == chain_of(n) for c in nxt):
            assert len(nxt) == 1
    # every folded BatchNorm left its bias on the conv before it
    assert all(len(n.input) == 3 for n in nodes if n.op_type == "Conv"
               and n.output[0] in {i for c in nodes if c.op_type in ("Relu", "Add")
                                   for i in c.input})


def test_export_parity_still_holds(compressed):
    model, _ = compressed
    proto = export_onnx(model, (1, 28, 28), dynamic_batch=True)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    par = check_parity(model, proto.SerializeToString(), x, dynamic_batch=True, source="random")
    assert par.top1_agreement == 1.0 and par.max_abs_diff < 1e-4


def test_session_options_are_enable_all_everywhere(monkeypatch):
    so = session_options(3)
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # parity, whole-model and per-layer timing sessions all take their options from it
    calls = []

    def spy(threads=0):
        calls.append(threads)
        return session_options(threads)

    monkeypatch.setattr(deploy, "session_options", spy)
    proto = export_onnx(nn.Sequential(nn.Conv2d(1, 2, 3)), (1, 5, 5))
    deploy.ort_session(proto.SerializeToString(), threads=2)
    graph = layer_timing.layer_graph(_spec(), nn.Conv2d(1, 2, 1))
    layer_timing.ort_session(graph.SerializeToString(), layer_timing.Engine("ort-cpu", 1, 1))
    assert calls == [2, 1]


def _spec():
    from lrcompress.model.layers import LayerSpec

    return LayerSpec(name="c", kind="conv2d", in_ch=1, out_ch=2, bias=True, in_hw=(4, 4),
                     out_hw=(4, 4))


class _OnePixel(nn.Module):
    """A stem down to a ``hw`` map, then a tt-like chain 1×1 → 3×3 → 1×1 (ranks 30 of 64, as
    resnet18's layer4 at 232 of 512)."""

    def __init__(self, hw: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(hw)
        self.chain = nn.Sequential(nn.Conv2d(64, 30, 1, bias=False),
                                   nn.Conv2d(30, 30, 3, padding=1, bias=False),
                                   nn.Conv2d(30, 64, 1, bias=True))
        self.bn = nn.BatchNorm2d(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.chain(self.pool(self.stem(x)))))
        return self.head(x.mean((2, 3)))


def _randomized(model):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        model.bn.running_mean.copy_(torch.randn(64, generator=gen) * 0.1)
        model.bn.running_var.copy_(torch.rand(64, generator=gen) + 0.5)
    return model.eval()


def test_chain_on_a_one_pixel_map_is_merged():
    model = _randomized(_OnePixel(1))
    merged, names = merge_linear_chains(model, (3, 8, 8))
    assert names == ["chain"]
    convs = list(merged.chain)
    # 64·30 + 30·30 + 30·64 MACs become 64·30 + 30·64 (one 64·64 conv would cost more)
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (64, 30, (1, 1)), (30, 64, (1, 1))]
    assert len(model.chain) == 3  # the caller's model is untouched
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        np.testing.assert_allclose(merged(x).numpy(), model(x).numpy(), atol=1e-5, rtol=1e-4)
    proto = export_onnx(model, (3, 8, 8), dynamic_batch=True)
    assert merged_chains(proto) == ["chain"]
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == 3  # stem + 2
    check_parity(model, proto.SerializeToString(), x, dynamic_batch=True, source="random")


def test_chains_on_larger_maps_and_break_even_chains_stay():
    model = _randomized(_OnePixel(4))
    same, names = merge_linear_chains(model, (3, 8, 8))
    assert same is model and names == []
    proto = export_onnx(model, (3, 8, 8))
    assert merged_chains(proto) == []
    # an SVD chain of a 1×1 conv at its break-even rank costs what the dense conv does: kept
    svd = nn.Sequential(nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.Conv2d(4, 8, 1)))
    same, names = merge_linear_chains(svd.eval(), (8, 3, 3))
    assert same is svd and names == []
