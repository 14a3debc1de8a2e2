"""Data-free calibration inputs: a seeded batch optimised until the model's BatchNorm layers see
the statistics they were trained on (the idea of ZeroQ, Cai et al. 2020, and DeepInversion, Yin
et al. 2020; written here from their papers' descriptions).

Every BatchNorm layer ``l`` keeps the running mean ``μ_l`` and variance ``σ²_l`` of its input over
the training data. Starting from seeded Gaussian noise in the model's normalised input space, the
inputs ``x`` are optimised (Adam, cosine learning rate) to minimise

    Σ_l (‖μ_l(x) − μ_l‖₂ + ‖σ²_l(x) − σ²_l‖₂) + ce·CE(f(x), t) + tv·TV(x) + l2·mean(x²)

where ``μ_l(x)``, ``σ²_l(x)`` are the batch statistics of layer ``l``'s input, ``t`` are target
classes dealt round-robin (DeepInversion's class-conditional term: the inputs cover every class,
which logit distillation needs), TV is the mean squared difference of neighbouring pixels. Each
step sees the batch shifted by a random jitter and, half the time, mirrored (seeded), so the
inputs do not over-fit one alignment; pixels are kept in the valid [0, 1] range when the
normalisation is known.

A model without BatchNorm has no statistics to match: :func:`noise_inputs` then draws inputs at
the model's input mean/std (standard normal in normalised units), far weaker than a few hundred
real unlabelled images.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lrcompress.errors import UserError
from lrcompress.recover.bn import batchnorms
from lrcompress.util.io import atomic_path
from lrcompress.util.progress import Progress


@dataclass(frozen=True)
class SynthConfig:
    """How the data-free inputs are made (recorded in the report and the resume fingerprint)."""

    samples: int = 256  # inputs synthesised (calibration, distillation)
    iters: int = 200  # optimiser steps per batch
    batch_size: int = 64  # inputs optimised together (BatchNorm statistics are per batch)
    lr: float = 0.1  # Adam's learning rate on the inputs (cosine decay to 0)
    ce: float = 0.1  # weight of the class-conditional cross-entropy (0: statistics only)
    tv: float = 1e-2  # weight of the total-variation prior
    l2: float = 1e-4  # weight of the L2 prior
    jitter: int | None = None  # pixels of random shift per step (None: 1/8 of the image side)

    def __post_init__(self):
        for name in ("samples", "iters", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--synth-{name.replace('_', '-')} {getattr(self, name)} must be "
                                "1 or more.")
        if self.batch_size < 2:
            raise UserError("--synth-batch-size must be 2 or more: BatchNorm statistics need "
                            "a batch.")
        if self.lr <= 0 or min(self.ce, self.tv, self.l2) < 0:
            raise UserError(f"Synthesis settings out of range: lr {self.lr} must be > 0 and the "
                            f"weights ce {self.ce}, tv {self.tv}, l2 {self.l2} >= 0.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Synthetic:
    """The synthesised inputs (N×C×H×W, normalised units) and how they were made."""

    inputs: torch.Tensor
    summary: dict = field(default_factory=dict)


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorms(model))


class _BatchStats:
    """Forward pre-hooks recording each BatchNorm input's per-channel batch mean and variance."""

    def __init__(self, bns: dict[str, nn.Module]):
        self.bns, self.stats = bns, {}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in bns.items()]

    def _hook(self, name: str):
        def hook(_mod, inputs):
            x = inputs[0].float()
            dims = [0, *range(2, x.dim())]
            self.stats[name] = (x.mean(dims), x.var(dims, unbiased=False))
        return hook

    def loss(self) -> torch.Tensor:
        """Σ_l ‖μ_l(x) − μ_l‖₂ + ‖σ²_l(x) − σ²_l‖₂ over the layers the last forward pass ran."""
        return sum(torch.linalg.vector_norm(mu - self.bns[n].running_mean)
                   + torch.linalg.vector_norm(var - self.bns[n].running_var)
                   for n, (mu, var) in self.stats.items())

    def errors(self) -> tuple[float, float]:
        """Mean over layers of (mean over channels) |μ(x) − μ| / σ and |σ(x)/σ − 1|, where
        σ = √(running var + eps): the match in units of each channel's own spread."""
        e_mean, e_std = [], []
        for n, (mu, var) in self.stats.items():
            bn = self.bns[n]
            sd = (bn.running_var + bn.eps).sqrt()
            e_mean.append(((mu - bn.running_mean).abs() / sd).mean().item())
            e_std.append(((var + bn.eps).sqrt() / sd - 1).abs().mean().item())
        return sum(e_mean) / len(e_mean), sum(e_std) / len(e_std)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def bn_match(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> dict:
    """How closely ``inputs`` reproduce the model's BatchNorm statistics, batch by batch:
    ``mean_err`` and ``std_err`` (see :meth:`_BatchStats.errors`), averaged over the batches."""
    stats = _BatchStats(batchnorms(model))
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    rows = []
    try:
        for i in range(0, len(inputs), batch_size):
            stats.stats.clear()
            model(inputs[i:i + batch_size].to(dev))
            rows.append(stats.errors())
    finally:
        stats.remove()
        model.train(was)
    return {"mean_err": sum(r[0] for r in rows) / len(rows),
            "std_err": sum(r[1] for r in rows) / len(rows)}


def _tv(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of vertically and horizontally neighbouring pixels."""
    return ((x[..., 1:, :] - x[..., :-1, :]).pow(2).mean()
            + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean())


def _bounds(mean, std, chans: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The valid pixel range [0, 1] in normalised units, per channel (None: unknown)."""
    if mean is None or std is None:
        return None
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, chans, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, chans, 1, 1)
    return -m / s, (1 - m) / s


def _augment(x: torch.Tensor, jitter: int, gen: torch.Generator) -> torch.Tensor:
    """``x`` rolled by a random shift of up to ``jitter`` pixels and, half the time, mirrored."""
    dy, dx = (torch.randint(-jitter, jitter + 1, (2,), generator=gen) if jitter else (0, 0))
    out = torch.roll(x, (int(dy), int(dx)), dims=(-2, -1))
    return out.flip(-1) if torch.rand((), generator=gen) < 0.5 else out


def _optimise_batch(model: nn.Module, stats: _BatchStats, x0: torch.Tensor,
                    targets: torch.Tensor, cfg: SynthConfig, bounds, gen: torch.Generator,
                    tick) -> tuple[torch.Tensor, float, float]:
    """One batch's optimisation: the inputs, and the statistics loss at the first and last
    step."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / cfg.iters)))
    jitter = cfg.jitter if cfg.jitter is not None else max(1, x0.shape[-1] // 8)
    first = last = float("nan")
    for i in range(cfg.iters):
        xi = _augment(x, jitter, gen)
        stats.stats.clear()
        logits = model(xi).float()
        bn = stats.loss()
        loss = bn + cfg.tv * _tv(xi) + cfg.l2 * x.pow(2).mean()
        if cfg.ce:
            loss = loss + cfg.ce * F.cross_entropy(logits, targets)
        (x.grad,) = torch.autograd.grad(loss, x)
        opt.step()
        sched.step()
        if bounds is not None:
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, bounds[1]), bounds[0]))
        last = float(bn.detach())
        first = last if i == 0 else first
        tick()
    return x.detach(), first, last


def _targets(n: int, num_classes: int, seed: int) -> torch.Tensor:
    """Classes dealt round-robin over the samples, in a seeded order."""
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))
    return order[torch.arange(n) % num_classes]


def synthesize(model: nn.Module, input_size, num_classes: int, cfg: SynthConfig, *,
               mean=None, std=None, seed: int = 0,
               progress: Progress | None = None) -> Synthetic:
    """``cfg.samples`` inputs matching ``model``'s BatchNorm statistics (model in eval mode, on
    its device, left unchanged). ``mean``/``std``: the input normalisation (pixels are then kept
    in range); ``progress`` advances once per optimiser step."""
    bns = batchnorms(model)
    if not bns:
        raise UserError("synthesize() needs a model with BatchNorm layers; use noise_inputs().")
    progress = progress or Progress()
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    init = noise_inputs(input_size, cfg.samples, seed).inputs
    targets = _targets(cfg.samples, num_classes, seed)
    stats, bounds = _BatchStats(bns), _bounds(mean, std, input_size[0], dev)
    gen = torch.Generator().manual_seed(seed)
    n_batches = math.ceil(cfg.samples / cfg.batch_size)
    progress.stage(f"synthesising {cfg.samples} calibration inputs from the BatchNorm statistics "
                   f"({n_batches} batch(es) × {cfg.iters} steps)", total=n_batches * cfg.iters)
    out, losses, was = [], [], model.training
    model.eval()
    try:
        for b in range(0, cfg.samples, cfg.batch_size):
            x, first, last = _optimise_batch(
                model, stats, init[b:b + cfg.batch_size].to(dev),
                targets[b:b + cfg.batch_size].to(dev), cfg, bounds, gen, progress.advance)
            out.append(x.cpu())
            losses.append((first, last))
    finally:
        stats.remove()
        model.train(was)
    inputs = torch.cat(out)
    summary = {"method": "batchnorm statistics", "config": cfg.to_dict(),
               "batchnorm_layers": len(bns),
               "bn_loss_start": sum(f for f, _ in losses) / len(losses),
               "bn_loss_end": sum(v for _, v in losses) / len(losses),
               "match_noise": bn_match(model, init, cfg.batch_size),
               "match": bn_match(model, inputs, cfg.batch_size),
               "seconds": round(time.perf_counter() - t0, 3)}
    return Synthetic(inputs, summary)


def noise_inputs(input_size, samples: int, seed: int = 0) -> Synthetic:
    """Inputs drawn at the model's input mean/std: standard normal in normalised units."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, *input_size, generator=g)
    return Synthetic(x, {"method": "noise at the input mean/std", "samples": samples})


def save_synthetic(syn: Synthetic, path) -> None:
    """The inputs and their summary in one safetensors file (written atomically)."""
    with atomic_path(path) as tmp:
        save_file({"inputs": syn.inputs.contiguous()}, str(tmp),
                  metadata={"summary": json.dumps(syn.summary)})


def load_synthetic(path) -> Synthetic:
    with safe_open(str(path), "pt") as f:
        summary = json.loads(f.metadata()["summary"])
    return Synthetic(load_file(str(path))["inputs"], summary)


__all__ = ["SynthConfig", "Synthetic", "bn_match", "has_batchnorm", "load_synthetic",
           "noise_inputs", "save_synthetic", "synthesize"]
