"""Cost model: multiply-accumulates (MACs) and parameters of layers and of whole models.

Convention (methods.md §0, the RENE code's): a conv costs ``out_positions × C_out × (C_in/groups)
× k_h × k_w`` MACs, a linear layer ``tokens × in × out``; biases, norms and activations are not
counted. ``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per MAC on the same ops, which
is what the tests compare against.

Whole-model MACs are the sum over conv/linear layers *plus* the matrix products and convolutions
that belong to no such layer (attention's Q·Kᵀ and A·V in ViTs, a Conv1d). :func:`count_model`
measures those with a small dispatch-level counter of its own, so fused attention kernels (which
FlopCounterMode does not count on CPU) are counted too, by their formula. Before any work it checks
its count, layer by layer and whole, against FlopCounterMode (:func:`check_counts`): a layer whose
formula misses part of what it runs (windows folded into the batch, a layer called twice) would
make every plan's MACs wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lrcompress.errors import LrcError
from lrcompress.measure.metrics import independent_macs_by_module, param_count
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


def _conv_macs(args, out) -> int:
    """MACs of ``aten.convolution(input, weight, bias, stride, padding, dilation, transposed,
    ...)``: every output element (every input element, if transposed) takes one weight slice
    ``weight.shape[1:]``."""
    x, w, transposed = args[0], args[1], bool(args[6])
    return _shape_prod(w.shape[1:]) * (x.numel() if transposed else out.numel())


class _MatmulCounter(TorchDispatchMode):
    """Counts MACs of matrix products, convolutions and attention kernels seen at the ATen level.

    Everything is counted, layers included; :func:`count_model` subtracts the layers' own MACs.
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
        elif pkt in (aten.convolution, aten._convolution):
            self.macs += _conv_macs(args, out)
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
    """Whole-model MACs (per sample) and parameters, checked against FlopCounterMode.

    Layer MACs come from the formulas; ``other_macs`` is what a batch-1 forward issues in matrix
    products and convolutions minus what the layers themselves issue.
    """
    layer = sum(dense_macs(s) for s in specs)
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
    other = max(0, counter.macs - layer)
    cost = ModelCost(
        macs=layer + other, params=param_count(model), layer_macs=layer, other_macs=other
    )
    check_counts(model, specs, cost, input_size)
    return cost


def check_counts(model: nn.Module, specs: list[LayerSpec], cost: ModelCost, input_size) -> None:
    """Every layer's MACs and the whole model's must be what FlopCounterMode counts on the
    forward pass; otherwise every target and plan would be off. Raises naming the layers that
    disagree (a bug in the census: it is never the user's input)."""
    total, by_module = independent_macs_by_module(model, input_size)
    bad = [(s.name, dense_macs(s), by_module.get(s.name, 0)) for s in specs
           if dense_macs(s) != by_module.get(s.name, 0)]
    if not bad and total == cost.macs:
        return
    size = "×".join(map(str, input_size))
    msg = (f"internal check failed before any work: lrcompress counts {cost.macs} MACs per "
           f"sample on a {size} input, torch's FlopCounterMode {total}. ")
    if bad:
        listed = "; ".join(f"{n}: {a} vs {b}" for n, a, b in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        msg += f"Layers that disagree (lrcompress vs FlopCounterMode): {listed}{more}. "
    else:
        msg += ("Every conv/linear layer agrees; the difference is in operations outside them "
                f"(lrcompress counts {cost.other_macs} there). ")
    raise LrcError(msg + "This is a bug in lrcompress: please report it with the architecture "
                   "and --input-size.")
