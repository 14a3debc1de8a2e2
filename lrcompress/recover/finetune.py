"""Recovering accuracy: distillation fine-tuning of the compressed student against the original.

Loss (RENE §4.4, Eqs. 10–11, methods.md §2.7), with optional logit KD:

    L = CE(student) + λ · L_diss + κ · T² · KL(teacher_T ‖ student_T) + regularizers
    L_diss = Σ_i ‖W_i − Ŵ_i‖² + Σ_i ‖O_i(x) − D_i(x)‖²   (mean-reduced by default; 'sum' = paper)

where i runs over the factorized layers, Ŵ_i is the dense weight the student's chain computes,
and O_i / D_i are the outputs of layer i in teacher and student (hooks on the same module name).

Regularizers (each recorded in the report):
* Frobenius decay (Khodak et al. 2021, methods.md §7.2): (μ/2)·‖Ŵ_i‖²_F on the *product*, and the
  factors leave plain weight decay;
* ``orth``: ELRT's double soft orthogonality (DSO, Bansal et al. 2018) ‖UᵀU − I‖² + ‖UUᵀ − I‖²,
  or soft orthogonality (SO) on the smaller Gram, on every 1×1/linear factor matrix of the chains;
* ``hoyer`` (SVD training, Yang et al. 2020, methods.md §5.2): Σ_i (‖s_i‖₁/‖s_i‖₂ − 1) on the
  singular values s_i of each reconstructed weight (matricized T × rest), pushing ranks down.

Under ``torchrun`` (torch.distributed initialized) the student is wrapped in DDP, the train loader
is sharded by a seeded DistributedSampler, the epoch statistics and calibration result are the same
on every rank, and only rank 0 writes the state file.

The best epoch is chosen on the *calibration* split (held out from training), never on test.
Each epoch's state is saved atomically under RUN/state/ so an interrupted run resumes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lrcompress.errors import UserError
from lrcompress.factorizations import chain_factors, get_factorization
from lrcompress.measure.metrics import evaluate
from lrcompress.model.plan import Plan
from lrcompress.util import distributed as dist_
from lrcompress.util.io import atomic_path
from lrcompress.util.numerics import (
    BufferSnapshot,
    NonFiniteGuard,
    all_finite,
    first_nonfinite,
    first_nonfinite_output,
    nonfinite_grad,
)
from lrcompress.util.resources import retry_halving

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 0  # 0 and no max_steps: no fine-tuning
    max_steps: int | None = None  # a step budget (CPU-sized runs); stops mid-epoch if reached
    lr: float = 0.01  # [PROPOSAL] RENE's 1e-5 recovers little in short budgets (methods §10.5)
    optimizer: str = "sgd"  # sgd (Nesterov, momentum 0.9) | adamw
    weight_decay: float = 0.0  # plain weight decay (not on factors when frobenius_decay > 0)
    warmup_steps: int = 0  # linear warm-up, then cosine decay to 0
    lam: float = 0.5  # λ of L_diss (RENE §2.7)
    diss_reduction: str = "mean"  # mean | sum (paper-literal)
    kd: float = 1.0  # κ: weight of logit distillation (0 = off)
    kd_temperature: float = 4.0
    frobenius_decay: float = 0.0  # μ of Frobenius decay on reconstructed weights (0 = off)
    orth: str | None = None  # None | "dso" | "so"
    orth_weight: float = 1e-3
    hoyer: float = 0.0  # λ_R of Hoyer sparsity on singular values (SVD training; 0 = off)
    grad_clip: float | None = 5.0
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16

    def __post_init__(self):
        if self.epochs < 0 or (self.max_steps is not None and self.max_steps < 1):
            raise UserError("--finetune-epochs must be >= 0 and --max-steps >= 1.")
        if self.optimizer not in ("sgd", "adamw"):
            raise UserError(f"--optimizer {self.optimizer!r}: use sgd or adamw.")
        if self.diss_reduction not in ("mean", "sum"):
            raise UserError(f"--diss-reduction {self.diss_reduction!r}: use mean or sum.")
        if self.orth not in (None, "dso", "so"):
            raise UserError(f"--orth {self.orth!r}: use dso or so.")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"--precision {self.precision!r}: use auto, fp32, bf16 or fp16.")
        if self.hoyer < 0:
            raise UserError(f"--hoyer {self.hoyer} must be >= 0.")
        if not self.lr > 0:
            raise UserError(f"--lr {self.lr} must be positive.")

    @property
    def enabled(self) -> bool:
        return self.epochs > 0 or self.max_steps is not None


# ------------------------------------------------------------------ regularizers


def frobenius_decay(student: nn.Module, plan: Plan) -> torch.Tensor:
    """Σ_i ½‖Ŵ_i‖²_F over factorized layers (the product, not the factors)."""
    total = 0.0
    for lp in plan.layers:
        chain = student.get_submodule(lp.name)
        w = get_factorization(lp.factorization).reconstruct(chain_factors(chain), lp.spec)
        total = total + 0.5 * w.pow(2).sum()
    return total


def _factor_matrices(student: nn.Module, plan: Plan):
    """The 2-D factor matrices of the chains: weights of their 1×1 convs and linear layers."""
    for lp in plan.layers:
        for m in student.get_submodule(lp.name).modules():
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                                            and m.groups == 1):
                yield m.weight.reshape(m.weight.shape[0], -1)


def orthogonality(student: nn.Module, plan: Plan, kind: str) -> torch.Tensor:
    """DSO: ‖UᵀU − I‖² + ‖UUᵀ − I‖²; SO: the Gram of the smaller side only."""
    total = 0.0
    for u in _factor_matrices(student, plan):
        g_small = u @ u.T if u.shape[0] <= u.shape[1] else u.T @ u
        eye = torch.eye(g_small.shape[0], device=u.device, dtype=u.dtype)
        total = total + (g_small - eye).pow(2).sum()
        if kind == "dso":
            g_big = u.T @ u if u.shape[0] <= u.shape[1] else u @ u.T
            eye = torch.eye(g_big.shape[0], device=u.device, dtype=u.dtype)
            total = total + (g_big - eye).pow(2).sum()
    return total


def hoyer_value(w: torch.Tensor) -> torch.Tensor:
    """‖s‖₁/‖s‖₂ − 1 for the singular values s of ``w`` matricized as (rows, rest)."""
    s = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
    return s.sum() / s.norm() - 1


def hoyer(student: nn.Module, plan: Plan) -> torch.Tensor:
    """Σ_i (‖s_i‖₁/‖s_i‖₂ − 1) over factorized layers: Hoyer sparsity of singular values (§5.2)."""
    total = 0.0
    for lp in plan.layers:
        w = get_factorization(lp.factorization).reconstruct(
            chain_factors(student.get_submodule(lp.name)), lp.spec)
        total = total + hoyer_value(w.float())
    return total


# ------------------------------------------------------------------ distillation loss


class _Taps:
    """Forward hooks that keep the latest output of named modules."""

    def __init__(self, model: nn.Module, names):
        self.out = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def fn(_m, _i, o):
            self.out[name] = o

        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


def kd_loss(logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0
            ) -> torch.Tensor:
    """T² · KL(teacher_T ‖ student_T), averaged over the batch (Hinton et al.'s logit KD)."""
    tt = temperature
    return F.kl_div(F.log_softmax(logits / tt, 1), F.log_softmax(t_logits / tt, 1),
                    reduction="batchmean", log_target=True) * tt * tt


def diss_loss(student, plan, teacher_w, s_taps, t_taps, reduction) -> torch.Tensor:
    red = F.mse_loss if reduction == "mean" else (lambda a, b: (a - b).pow(2).sum())
    total = 0.0
    for lp in plan.layers:
        w = get_factorization(lp.factorization).reconstruct(
            chain_factors(student.get_submodule(lp.name)), lp.spec)
        total = total + red(w, teacher_w[lp.name])
        total = total + red(s_taps.out[lp.name].float(), t_taps.out[lp.name].float())
    return total


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False), precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), precision


@dataclass
class FinetuneResult:
    history: list[dict]  # one row per epoch
    best_epoch: int
    steps: int
    seconds: float
    config: dict
    resumed_from_epoch: int = 0
    skipped_steps: int = 0  # steps skipped and rolled back for NaN/Inf (all epochs)
    micro_batch: int | None = None  # micro-batch size after --auto-batch halvings, if any


def _schedule(cfg: FinetuneConfig, total_steps: int):
    def f(step):
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))

    return f


def _seed_epoch(loader, seed: int, epoch: int) -> None:
    """Shuffling and augmentation depend on (seed, epoch) only, so a resumed run sees the same
    batches as an uninterrupted one (like DistributedSampler.set_epoch)."""
    if loader.generator is not None:
        loader.generator.manual_seed(seed * 1_000_003 + epoch)
    sampler_epoch = getattr(loader.sampler, "set_epoch", None)
    if sampler_epoch is not None:  # a DistributedSampler: shuffles by its seed + epoch
        sampler_epoch(epoch)
    set_epoch = getattr(loader.dataset, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)


def shard_loader(loader, seed: int, num_replicas: int, rank: int):
    """``loader`` with a seeded DistributedSampler: rank r gets every num_replicas-th sample of
    one permutation (seed·1000003 + epoch), each rank batches its share at the loader's batch size,
    so the global batch is num_replicas × batch size. With num_replicas=1 it is the single-process
    equivalent (the same permutation, whole batches), used to check DDP against one process."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(loader.dataset, num_replicas=num_replicas, rank=rank,
                                 shuffle=True, seed=seed * 1_000_003, drop_last=True)
    # a last batch of 1 breaks BatchNorm in training mode (as in data.build_loaders)
    drop_last = len(sampler) > loader.batch_size
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, drop_last=drop_last,
                      persistent_workers=loader.num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def _all_reduce_sums(sums: dict, device: torch.device) -> dict:
    keys = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return {k: (int(v) if k == "n" else float(v)) for k, v in zip(keys, t.tolist(), strict=True)}


def _broadcast_calib(calib, device: torch.device):
    t = torch.tensor([calib.loss, calib.top1], dtype=torch.float64, device=device)
    torch.distributed.broadcast(t, src=0)
    return float(t[0]), float(t[1])


def distill(student: nn.Module, teacher: nn.Module, plan: Plan, loaders, cfg: FinetuneConfig,
            device: torch.device, state_dir=None, progress=None, fingerprint: str = "",
            seed: int = 0, auto_batch: bool = False) -> FinetuneResult:
    """Fine-tune ``student`` in place; on return it holds the best epoch's weights.

    A step whose loss or gradients are NaN/Inf is skipped and rolled back (no update, BatchNorm
    statistics restored); three in a row stop the run with a UserError naming the step and the
    first non-finite layer. ``auto_batch``: on CUDA out-of-memory the step is retried in
    micro-batches of half the size (gradients accumulated), down to 1.
    """
    t0 = time.perf_counter()
    student.to(device)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    names = [lp.name for lp in plan.layers]
    teacher_w = {n: teacher.get_submodule(n).weight.detach() for n in names}
    distributed = dist_.active()
    train_loader = loaders.train
    if distributed:
        train_loader = shard_loader(loaders.train, seed, dist_.world_size(), dist_.rank())
    steps_per_epoch = len(train_loader)
    epochs = cfg.epochs or math.ceil(cfg.max_steps / steps_per_epoch)
    total_steps = min(epochs * steps_per_epoch, cfg.max_steps or 10**12)

    factor_ids = {id(p) for n in names for p in student.get_submodule(n).parameters()}
    fd = cfg.frobenius_decay > 0
    groups = [
        {"params": [p for p in student.parameters() if not (fd and id(p) in factor_ids)],
         "weight_decay": cfg.weight_decay},
        {"params": [p for p in student.parameters() if fd and id(p) in factor_ids],
         "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total_steps))
    autocast, precision = _autocast(device, cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    history: list[dict] = []
    best = (math.inf, 0, None)  # (calib loss, epoch, state_dict)
    start_epoch, step = 0, 0
    state_file = None if state_dir is None else state_dir / "finetune.pt"
    if state_file is not None and state_file.exists():
        st = torch.load(state_file, map_location="cpu", weights_only=True)
        if st.get("fingerprint") != fingerprint:
            raise UserError(f"{state_file} belongs to a different command (its settings differ). "
                            "Re-run the original command to resume, or use a new -o / "
                            "--overwrite to start over.")
        student.load_state_dict(st["student"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"])
        history, step, start_epoch = st["history"], st["step"], st["epoch"]
        best = (st["best_loss"], st["best_epoch"], st["best_state"])
        log.info("resuming fine-tuning after epoch %d", start_epoch)

    model = student
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        # Wrapped after resuming: DDP broadcasts rank 0's weights, and all ranks read one file.
        model = DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    s_taps, t_taps = _Taps(student, names), _Taps(teacher, names)

    def loss_of(x, y):
        """The loss of one (micro-)batch and its parts (loss, ce, diss, kd)."""
        with autocast:
            logits = model(x).float()
            with torch.no_grad():
                t_logits = teacher(x).float()
            ce = F.cross_entropy(logits, y)
            loss = ce
            diss = diss_loss(student, plan, teacher_w, s_taps, t_taps,
                             cfg.diss_reduction) if cfg.lam else torch.zeros(())
            loss = loss + cfg.lam * diss
            kd = torch.zeros((), device=device)
            if cfg.kd:
                kd = kd_loss(logits, t_logits, cfg.kd_temperature)
                loss = loss + cfg.kd * kd
            if fd:
                loss = loss + cfg.frobenius_decay * frobenius_decay(student, plan)
            if cfg.orth:
                loss = loss + cfg.orth_weight * orthogonality(student, plan, cfg.orth)
            if cfg.hoyer:
                loss = loss + cfg.hoyer * hoyer(student, plan)
        return loss, ce, diss, kd

    def forward_backward(x, y, size):
        """Gradients of the batch, accumulated over micro-batches of ``size`` (smaller than the
        batch only after --auto-batch halved it); the batch's mean (loss, ce, diss, kd), or None
        when a loss was NaN/Inf (single process: then nothing was back-propagated; under DDP
        every rank back-propagates and the gradient check skips the step on all of them)."""
        opt.zero_grad(set_to_none=True)
        vals = [0.0] * 4
        for i in range(0, len(x), size):
            parts = loss_of(x[i:i + size], y[i:i + size])
            if not distributed and not torch.isfinite(parts[0]):
                return None
            share = min(size, len(x) - i) / len(x)
            scaler.scale(parts[0] * share).backward()
            vals = [a + float(v.detach()) * share for a, v in zip(vals, parts)]
        return vals

    def rollback(buffers, *_):
        opt.zero_grad(set_to_none=True)
        buffers.restore()  # BatchNorm statistics the bad forward pass changed

    guard = NonFiniteGuard("Fine-tuning", advice=(
        "Lower --lr, keep --grad-clip on, use --precision fp32, or check the data for NaN/Inf. "
        "Finished epochs are kept in RUN/state/: the same command resumes after the last one."))
    micro = None  # micro-batch size once --auto-batch halved it (None: whole batches)
    try:
        for epoch in range(start_epoch, epochs):
            if step >= total_steps:
                break
            _seed_epoch(train_loader, seed, epoch)
            student.train()
            sums = {"loss": 0.0, "ce": 0.0, "diss": 0.0, "kd": 0.0, "n": 0}
            skipped_before = guard.skipped
            te = time.perf_counter()
            for batch_no, (x, y) in enumerate(train_loader, 1):
                if step >= total_steps:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                where = f"epoch {epoch + 1}, batch {batch_no}"
                buffers = BufferSnapshot(student)
                vals, size = retry_halving(
                    partial(forward_backward, x, y), min(micro or len(x), len(x)),
                    enabled=auto_batch and not distributed, what="fine-tuning step",
                    on_halve=partial(rollback, buffers))
                if size < len(x):
                    micro = size
                if vals is None:  # NaN/Inf loss: skip the step, find the layer
                    with autocast:
                        layer = first_nonfinite_output(student, partial(student, x))
                    rollback(buffers)
                    guard.skip(where, "loss", layer and f"the output of layer {layer!r}")
                    continue
                if not scaler.is_enabled() and not all_finite(
                        p.grad for p in student.parameters()):  # (fp16: the scaler skips)
                    bad = nonfinite_grad(student)
                    rollback(buffers)
                    guard.skip(where, "gradient", bad and f"the gradient of {bad!r}")
                    continue
                if cfg.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                if not all_finite(student.parameters()):
                    bad = first_nonfinite(student.named_parameters())
                    raise UserError(
                        f"Fine-tuning stopped at {where}: the optimizer step made weight {bad!r} "
                        "NaN/Inf although the loss and gradients were finite. Lower --lr or use "
                        "--optimizer sgd. Finished epochs are kept in RUN/state/: the same "
                        "command resumes after the last one.")
                guard.ok()
                step += 1
                b = y.numel()
                sums["n"] += b
                for k, v in zip(("loss", "ce", "diss", "kd"), vals, strict=True):
                    sums[k] += v * b
                if progress is not None:
                    progress(b)
            calib = evaluate(student, loaders.calib, device)
            calib_loss, calib_top1 = calib.loss, calib.top1
            if distributed:  # every rank logs the same numbers and keeps the same best epoch
                sums = _all_reduce_sums(sums, device)
                calib_loss, calib_top1 = _broadcast_calib(calib, device)
            row = {"epoch": epoch + 1, "steps": step,
                   **{k: sums[k] / max(sums["n"], 1) for k in ("loss", "ce", "diss", "kd")},
                   "calib_loss": calib_loss, "calib_top1": calib_top1,
                   "lr": sched.get_last_lr()[0],
                   "images_per_s": sums["n"] / max(time.perf_counter() - te, 1e-9),
                   "skipped_steps": guard.skipped - skipped_before}
            history.append(row)
            log.info("epoch %d: loss %.4f, calib top-1 %.2f", epoch + 1, row["loss"], calib_top1)
            if calib_loss < best[0]:
                best = (calib_loss, epoch + 1,
                        {k: v.detach().cpu().clone() for k, v in student.state_dict().items()})
            if state_file is not None and dist_.is_main():
                with atomic_path(state_file) as tmp:
                    torch.save({"fingerprint": fingerprint, "student": student.state_dict(),
                                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                "rng": torch.get_rng_state(), "history": history, "step": step,
                                "epoch": epoch + 1, "best_loss": best[0], "best_epoch": best[1],
                                "best_state": best[2]}, tmp)
            if state_file is not None:
                dist_.barrier()  # the other ranks go on once rank 0's state is on disk
    finally:
        s_taps.remove()
        t_taps.remove()
    if best[2] is not None:
        student.load_state_dict(best[2])
    student.eval()
    return FinetuneResult(history, best[1], step, time.perf_counter() - t0, asdict(cfg),
                          resumed_from_epoch=start_epoch,
                          skipped_steps=sum(r.get("skipped_steps", 0) for r in history),
                          micro_batch=micro)
