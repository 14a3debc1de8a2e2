"""``--lorita N``: LoRITa-style over-parameterised fine-tuning before rank selection.

LoRITa (arXiv 2405.03089, methods.md §4) trains every compressible weight as a product of N
factors with plain weight decay. At the minimum-norm (balanced) factorization, weight decay on the
factors equals N·Σ_k σ_k(W)^{2/N}, a Schatten-(2/N) quasi-norm of the product (Prop. 4.2): for
N ≥ 2 it pushes the spectrum of W towards low rank, so that truncating it later costs less.

The paper trains from scratch; lrcompress compresses *pretrained* models, so ([PROPOSAL],
methods.md §4.2) each selected layer starts from its pretrained weight split into balanced
factors by its SVD, W = U Σ Vᵀ:

* conv (k×k, S→T): a k×k conv S→T with weight Σ^{1/N} Vᵀ, N−2 diagonal 1×1 convs Σ^{1/N},
  a last 1×1 conv T→T with weight U Σ^{1/N} and the bias (the paper's layout: a k×k conv
  followed by N−1 bias-free 1×1 convs);
* linear (in→out): N−1 square in×in factors, then in→out (the paper's layout), split the same way.

So the over-parameterised model computes exactly what the pretrained one did, and each factor's
squared norm is Σ σ^{2/N}: weight decay starts at the Schatten quasi-norm. The model is then
distilled from the original (CE + logit KD, SGD-Nesterov, the given weight decay on every
parameter) for a step budget, collapsed back to dense weights of the original shapes, and the
chosen rank method (LoRITa's own truncations are ``lsvt``/``gsvt``/``isvt``) works on the result.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lrcompress.errors import UserError
from lrcompress.model.surgery import set_module
from lrcompress.recover.finetune import FinetuneConfig, distill
from lrcompress.recover.losses import schatten_penalty
from lrcompress.util.config import require


@dataclass(frozen=True)
class LoritaConfig:
    factors: int = 0  # N: factors per selected weight (0 = off; N >= 2)
    steps: int = 300  # distillation steps of the over-parameterised model
    lr: float = 0.01  # SGD-Nesterov (momentum 0.9), cosine schedule
    weight_decay: float = 1e-3  # plain weight decay on all factors (the paper's CIFAR λ)

    def __post_init__(self):
        if self.factors == 1 or self.factors < 0:
            raise UserError(f"--lorita {self.factors}: give the number of factors per weight, "
                            "2 or more (the paper finds 3 usually enough), or 0 for off.")
        if self.steps < 1:
            raise UserError(f"--lorita-steps {self.steps} must be 1 or more.")
        require("--lorita-lr", self.lr, above=0)
        require("--lorita-wd", self.weight_decay, at_least=0)

    @property
    def enabled(self) -> bool:
        return self.factors >= 2


def _balanced_factors(w2: torch.Tensor, inner: int, n: int) -> list[torch.Tensor]:
    """Matrices F_1 (inner×cols), F_2..F_{n-1} (inner×inner), F_n (rows×inner) with
    F_n ⋯ F_1 = w2 and every ‖F_j‖²_F = Σ σ^{2/n} (the balanced, minimum-norm split)."""
    rows, cols = w2.shape
    u, s, vh = torch.linalg.svd(w2.double(), full_matrices=False)
    r = s.numel()
    root = s.pow(1.0 / n)
    first = torch.zeros(inner, cols, dtype=torch.float64)
    first[:r] = root[:, None] * vh
    mid = torch.zeros(inner, inner, dtype=torch.float64)
    mid[range(r), range(r)] = root
    last = torch.zeros(rows, inner, dtype=torch.float64)
    last[:, :r] = u * root[None, :]
    return [first, *([mid] * (n - 2)), last]


def overparameterize(layer: nn.Module, n: int) -> nn.Sequential:
    """The layer as a chain of n standard layers whose product is its weight (exactly)."""
    w = layer.weight.detach()
    dt, dev = w.dtype, w.device
    bias = layer.bias is not None
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise UserError(f"LoRITa cannot over-parameterise a grouped conv ({layer}).")
        t, s, kh, kw = w.shape
        fs = _balanced_factors(w.reshape(t, -1), t, n)
        first = nn.Conv2d(s, t, (kh, kw), stride=layer.stride, padding=layer.padding,
                          dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode)
        first.weight.data = fs[0].reshape(t, s, kh, kw).to(dt)
        rest = []
        for j, f in enumerate(fs[1:]):
            c = nn.Conv2d(t, t, 1, bias=bias and j == n - 2)
            c.weight.data = f.reshape(t, t, 1, 1).to(dt)
            rest.append(c)
    elif isinstance(layer, nn.Linear):
        out, inp = w.shape
        fs = _balanced_factors(w, inp, n)
        first = nn.Linear(inp, inp, bias=False)
        first.weight.data = fs[0].to(dt)
        rest = []
        for j, f in enumerate(fs[1:]):
            lin = nn.Linear(inp, f.shape[0], bias=bias and j == n - 2)
            lin.weight.data = f.to(dt)
            rest.append(lin)
    else:
        raise UserError(f"LoRITa handles Conv2d and Linear layers, not {type(layer).__name__}.")
    if bias:
        rest[-1].bias.data = layer.bias.detach().clone()
    return nn.Sequential(first, *rest).to(dev)


def collapse(chain: nn.Sequential, like: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dense (weight, bias) of the original shapes that an over-parameterised chain computes."""
    mats = [m.weight.detach().double().reshape(m.weight.shape[0], -1) for m in chain]
    w = mats[0]
    for m in mats[1:]:
        w = m @ w
    weight = w.reshape(like.weight.shape).to(like.weight.dtype)
    last = chain[-1]
    bias = None if last.bias is None else last.bias.detach().clone()
    return weight, bias


def lorita_train(model: nn.Module, names: list[str], cfg: LoritaConfig, loaders, device,
                 plan_stub, state_dir=None, progress=None, fingerprint: str = "",
                 seed: int = 0) -> tuple[nn.Module, dict]:
    """Over-parameterise ``names`` in a copy of ``model``, distill it from ``model`` with weight
    decay, collapse it; returns (dense model of the original architecture, summary)."""
    student = copy.deepcopy(model).cpu()
    before = {n: schatten_penalty(student.get_submodule(n).weight, cfg.factors) for n in names}
    chains = {n: overparameterize(student.get_submodule(n), cfg.factors) for n in names}
    for n, c in chains.items():
        set_module(student, n, c)
    ft_cfg = FinetuneConfig(max_steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            lam=0.0, kd=1.0)
    res = distill(student, model, plan_stub, loaders, ft_cfg, device, state_dir=state_dir,
                  progress=progress, fingerprint=fingerprint, seed=seed)
    dense = copy.deepcopy(model).cpu()
    after = {}
    with torch.no_grad():
        for n in names:
            layer = dense.get_submodule(n)
            w, b = collapse(student.get_submodule(n).cpu(), layer)
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)
            after[n] = schatten_penalty(w, cfg.factors)
        # Everything else (BN statistics and affine, dense layers) comes from the trained copy.
        trained = student.cpu().state_dict()
        for k, v in dense.state_dict().items():
            if k in trained and trained[k].shape == v.shape and not any(
                    k.startswith(n + ".") for n in names):
                v.copy_(trained[k])
    summary = {"factors": cfg.factors, "steps": res.steps, "lr": cfg.lr,
               "weight_decay": cfg.weight_decay, "history": res.history,
               "schatten_before": sum(before.values()), "schatten_after": sum(after.values())}
    return dense.to(device).eval(), summary
