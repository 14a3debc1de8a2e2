"""Cost model: multiply-accumulates (MACs) and parameters of layers and of whole models.

Convention (methods.md §0, the RENE code's): a conv costs ``out_positions × C_out × (C_in/groups)
× k_h × k_w`` MACs, a linear layer ``tokens × in × out``; biases, norms and activations are not
counted. ``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per MAC on the same ops, which
is what the tests compare against.

Whole-model MACs are the sum over conv/linear layers *plus* the matrix products that belong to no
such layer (attention's Q·Kᵀ and A·V in ViTs). :func:`count_model` measures those with a small
dispatch-level counter of its own, so fused attention kernels (which FlopCounterMode does not count
on CPU) are counted too, by their formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lrcompress.measure.metrics import param_count
from lrcompress.model.layers import LayerSpec

aten = torch.ops.aten


def dense_macs(spec: LayerSpec) -> int:
    """MACs of the layer as it is (unfactorized), per sample."""
    if spec.kind == "linear":
        return spec.tokens * spec.in_ch * spec.out_ch
    kh, kw = spec.kernel
    return spec.out_positions * spec.out_ch * (spec.in_ch // spec.groups) * kh * kw


def dense_params(spec: LayerSpec) -> int:
    """Parameters of the layer as it is (weight and bias)."""
    n = 1
    for d in spec.weight_shape:
        n *= d
    return n + (spec.out_ch if spec.bias else 0)


def _shape_prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class _MatmulCounter(TorchDispatchMode):
    """Counts MACs of matrix products and attention kernels seen at the ATen level.

    Convolutions are *not* counted here (they are always layers); ``mm``/``addmm`` issued by
    ``nn.Linear`` are counted and later attributed to that layer by :func:`count_model`.
    """

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        pkt = func.overloadpacket
        if pkt in (aten.mm, aten.bmm):
            a, b = args[0], args[1]
            self.macs += _shape_prod(a.shape) * int(b.shape[-1])
        elif pkt in (aten.addmm, aten.baddbmm):
            a, b = args[1], args[2]
            self.macs += _shape_prod(a.shape) * int(b.shape[-1])
        elif pkt in (
            aten._scaled_dot_product_flash_attention_for_cpu,
            aten._scaled_dot_product_flash_attention,
            aten._scaled_dot_product_efficient_attention,
            aten._scaled_dot_product_cudnn_attention,
        ):
            q, k, v = args[0], args[1], args[2]
            b_h = _shape_prod(q.shape[:-2])
            lq, e = int(q.shape[-2]), int(q.shape[-1])
            lk, ev = int(k.shape[-2]), int(v.shape[-1])
            self.macs += b_h * lq * lk * (e + ev)
        return out


@dataclass(frozen=True)
class ModelCost:
    macs: int  # per sample, whole model
    params: int  # all parameters of the model
    layer_macs: int  # MACs inside conv/linear layers
    other_macs: int  # matrix products outside them (attention), fixed under factorization


@torch.no_grad()
def count_model(model: nn.Module, specs: list[LayerSpec], input_size) -> ModelCost:
    """Whole-model MACs (per sample) and parameters.

    Layer MACs come from the formulas; ``other_macs`` is what a batch-1 forward issues in matrix
    products minus what the linear layers themselves issue.
    """
    layer = sum(dense_macs(s) for s in specs)
    linear_mm = sum(dense_macs(s) for s in specs if s.kind == "linear")
    counter = _MatmulCounter()
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    was = model.training
    model.eval()
    try:
        with counter:
            model(torch.zeros(1, *input_size, device=dev))
    finally:
        model.train(was)
    other = max(0, counter.macs - linear_mm)
    return ModelCost(
        macs=layer + other, params=param_count(model), layer_macs=layer, other_macs=other
    )
