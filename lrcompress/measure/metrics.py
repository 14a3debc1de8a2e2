"""Measuring models: accuracy, an independent FLOPs count, parameters.

The independent count uses torch's own ``FlopCounterMode`` (2 FLOPs per MAC) with attention forced
onto the math path, so that it never shares code with lrcompress's cost model (costs.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Accuracy:
    top1: float  # percent
    top5: float  # percent
    loss: float  # mean cross-entropy
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device="cpu", progress=None) -> Accuracy:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over a loader."""
    was = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    n = 0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(y[:, None])
            correct1 += hit[:, 0].sum().item()
            correct5 += hit.any(dim=1).sum().item()
            n += y.numel()
            if progress is not None:
                progress(y.numel())
    finally:
        model.train(was)
    if n == 0:
        raise ValueError("evaluate() got an empty loader")
    return Accuracy(100.0 * correct1 / n, 100.0 * correct5 / n, loss_sum / n, n)


@torch.no_grad()
def independent_macs(model: nn.Module, input_size) -> int:
    """MACs per sample counted by torch's FlopCounterMode (not by lrcompress's cost model)."""
    return independent_macs_by_module(model, input_size)[0]


@torch.no_grad()
def independent_macs_by_module(model: nn.Module, input_size) -> tuple[int, dict[str, int]]:
    """FlopCounterMode's MACs per sample: the whole model's, and each module's by dotted name
    (a module's count includes its submodules'; modules that do no counted work are absent)."""
    p = next(model.parameters())
    was = model.training
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            model(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was)
    root = type(model).__name__ + "."
    by_module = {k[len(root):]: sum(v.values()) // 2 for k, v in fc.get_flop_counts().items()
                 if k.startswith(root)}
    return fc.get_total_flops() // 2, by_module


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
