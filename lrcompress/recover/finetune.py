"""Recovering accuracy: distillation fine-tuning of the compressed student against the original.

Loss (RENE §4.4, Eqs. 10–11, methods.md §2.7), with optional logit KD:

    L = CE(student) + λ · L_diss + κ · T² · KL(teacher_T ‖ student_T) + regularizers
    L_diss = Σ_i ‖W_i − Ŵ_i‖² + Σ_i ‖O_i(x) − D_i(x)‖²   (mean-reduced by default; 'sum' = paper)

where i runs over the factorized layers, Ŵ_i is the dense weight the student's chain computes,
and O_i / D_i are the outputs of layer i in teacher and student (hooks on the same module name).

The losses and regularizers live in ``lrcompress.recover.losses``. Regularizers (each recorded
in the report):
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
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lrcompress.errors import UserError
from lrcompress.measure.metrics import evaluate
from lrcompress.model.plan import Plan
from lrcompress.recover.losses import (
    Taps,
    diss_loss,
    frobenius_decay,
    hoyer,
    kd_loss,
    orthogonality,
)
from lrcompress.util import distributed as dist_
from lrcompress.util.config import require
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
        require("--lr", self.lr, above=0)
        require("--kd-temperature", self.kd_temperature, above=0,
                why="the logits are divided by it")
        for flag, value in (("--hoyer", self.hoyer), ("--weight-decay", self.weight_decay),
                            ("--diss-weight", self.lam), ("--kd", self.kd),
                            ("--frobenius-decay", self.frobenius_decay),
                            ("--orth-weight", self.orth_weight)):
            require(flag, value, at_least=0, why="a loss weight; 0 turns it off")
        if self.grad_clip is not None:
            require("--grad-clip", self.grad_clip, above=0, why="0 turns clipping off")

    @property
    def enabled(self) -> bool:
        return self.epochs > 0 or self.max_steps is not None


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
    batches as an uninterrupted one (like DistributedSampler.set_epoch). A loader that is not a
    torch DataLoader (a list of batches, a wrapper) is left as it is where it lacks these."""
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(seed * 1_000_003 + epoch)
    sampler_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if sampler_epoch is not None:  # a DistributedSampler: shuffles by its seed + epoch
        sampler_epoch(epoch)
    set_epoch = getattr(getattr(loader, "dataset", None), "set_epoch", None)
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


def _optimizer(student: nn.Module, plan: Plan, cfg: FinetuneConfig, total_steps: int):
    """The optimizer (SGD-Nesterov or AdamW) and its warm-up + cosine schedule. Under Frobenius
    decay the factors of the chains leave plain weight decay (it is on their product instead)."""
    names = [lp.name for lp in plan.layers]
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
    return opt, sched


@dataclass
class _Progress:
    """What RUN/state/finetune.pt keeps after each epoch (besides weights and optimizer)."""

    history: list[dict] = field(default_factory=list)  # one row per epoch
    step: int = 0
    epoch: int = 0  # epochs finished
    best: tuple = (math.inf, 0, None)  # (calib loss, epoch, state_dict)


def _load_state(state_file, fingerprint: str, student: nn.Module, opt, sched) -> _Progress:
    """Resume from ``state_file`` if there is one: weights, optimizer, schedule and RNG state
    are restored in place; returns the progress it records (a fresh one without a file)."""
    if state_file is None or not state_file.exists():
        return _Progress()
    st = torch.load(state_file, map_location="cpu", weights_only=True)
    if st.get("fingerprint") != fingerprint:
        raise UserError(f"{state_file} belongs to a different command (its settings differ). "
                        "Re-run the original command to resume, or use a new -o / "
                        "--overwrite to start over.")
    student.load_state_dict(st["student"])
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["rng"])
    prog = _Progress(st["history"], st["step"], st["epoch"],
                     (st["best_loss"], st["best_epoch"], st["best_state"]))
    log.info("resuming fine-tuning after epoch %d", prog.epoch)
    return prog


def _save_state(state_file, fingerprint: str, student: nn.Module, opt, sched,
                prog: _Progress) -> None:
    """Write the state atomically (rank 0 only); the other ranks wait until it is on disk."""
    if state_file is None:
        return
    if dist_.is_main():
        best = prog.best
        with atomic_path(state_file) as tmp:
            torch.save({"fingerprint": fingerprint, "student": student.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "rng": torch.get_rng_state(), "history": prog.history,
                        "step": prog.step, "epoch": prog.epoch, "best_loss": best[0],
                        "best_epoch": best[1], "best_state": best[2]}, tmp)
    dist_.barrier()  # the other ranks go on once rank 0's state is on disk


class _Trainer:
    """The per-step work: the loss of a batch, its backward pass (in micro-batches after
    --auto-batch halved them), the rollback of a NaN/Inf step and the optimizer step."""

    def __init__(self, student: nn.Module, teacher: nn.Module, plan: Plan, cfg: FinetuneConfig,
                 device: torch.device, opt, sched, auto_batch: bool):
        self.student, self.teacher, self.plan, self.cfg = student, teacher, plan, cfg
        self.device, self.opt, self.sched = device, opt, sched
        self.distributed = dist_.active()
        self.auto_batch = auto_batch and not self.distributed
        self.autocast, precision = _autocast(device, cfg.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.model = student
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # Wrapped after resuming: DDP broadcasts rank 0's weights, and all ranks read one file.
            self.model = DistributedDataParallel(
                student, device_ids=[device.index] if device.type == "cuda" else None)
        # Layer matching pairs each factorized layer with the teacher's; a layer whose shape
        # narrowing changed (--narrow-hidden) has no counterpart there and is left out of it.
        self.matched = replace(plan, layers=tuple(
            lp for lp in plan.layers
            if tuple(teacher.get_submodule(lp.name).weight.shape) == lp.spec.weight_shape))
        names = [lp.name for lp in self.matched.layers]
        self.teacher_w = {n: teacher.get_submodule(n).weight.detach() for n in names}
        self.guard = NonFiniteGuard("Fine-tuning", advice=(
            "Lower --lr, keep --grad-clip on, use --precision fp32, or check the data for "
            "NaN/Inf. Finished epochs are kept in RUN/state/: the same command resumes after "
            "the last one."))
        self.micro = None  # micro-batch size once --auto-batch halved it (None: whole batches)
        self.s_taps, self.t_taps = Taps(student, names), Taps(teacher, names)

    def close(self) -> None:
        self.s_taps.remove()
        self.t_taps.remove()

    def loss_of(self, x, y):
        """The loss of one (micro-)batch and its parts (loss, ce, diss, kd)."""
        cfg, student, plan = self.cfg, self.student, self.plan
        with self.autocast:
            logits = self.model(x).float()
            with torch.no_grad():
                t_logits = self.teacher(x).float()
            ce = F.cross_entropy(logits, y)
            loss = ce
            diss = diss_loss(student, self.matched, self.teacher_w, self.s_taps, self.t_taps,
                             cfg.diss_reduction) if cfg.lam and self.matched.layers else (
                torch.zeros((), device=self.device))
            loss = loss + cfg.lam * diss
            kd = torch.zeros((), device=self.device)
            if cfg.kd:
                kd = kd_loss(logits, t_logits, cfg.kd_temperature)
                loss = loss + cfg.kd * kd
            if cfg.frobenius_decay > 0:
                loss = loss + cfg.frobenius_decay * frobenius_decay(student, plan)
            if cfg.orth:
                loss = loss + cfg.orth_weight * orthogonality(student, plan, cfg.orth)
            if cfg.hoyer:
                loss = loss + cfg.hoyer * hoyer(student, plan)
        return loss, ce, diss, kd

    def forward_backward(self, x, y, size):
        """Gradients of the batch, accumulated over micro-batches of ``size`` (smaller than the
        batch only after --auto-batch halved it); the batch's mean (loss, ce, diss, kd), or None
        when a loss was NaN/Inf (single process: then nothing was back-propagated; under DDP
        every rank back-propagates and the gradient check skips the step on all of them)."""
        self.opt.zero_grad(set_to_none=True)
        vals = [0.0] * 4
        for i in range(0, len(x), size):
            parts = self.loss_of(x[i:i + size], y[i:i + size])
            if not self.distributed and not torch.isfinite(parts[0]):
                return None
            share = min(size, len(x) - i) / len(x)
            self.scaler.scale(parts[0] * share).backward()
            vals = [a + float(v.detach()) * share for a, v in zip(vals, parts)]
        return vals

    def rollback(self, buffers, *_):
        self.opt.zero_grad(set_to_none=True)
        buffers.restore()  # BatchNorm statistics the bad forward pass changed

    def step(self, x, y, where: str):
        """One optimizer step on the batch: its mean (loss, ce, diss, kd), or None when the loss
        or the gradients were NaN/Inf and the step was skipped and rolled back."""
        student = self.student
        buffers = BufferSnapshot(student)
        vals, size = retry_halving(
            partial(self.forward_backward, x, y), min(self.micro or len(x), len(x)),
            enabled=self.auto_batch, what="fine-tuning step",
            on_halve=partial(self.rollback, buffers))
        if size < len(x):
            self.micro = size
        if vals is None:  # NaN/Inf loss: skip the step, find the layer
            with self.autocast:
                layer = first_nonfinite_output(student, partial(student, x))
            self.rollback(buffers)
            self.guard.skip(where, "loss", layer and f"the output of layer {layer!r}")
            return None
        if not self.scaler.is_enabled() and not all_finite(
                p.grad for p in student.parameters()):  # (fp16: the scaler skips)
            bad = nonfinite_grad(student)
            self.rollback(buffers)
            self.guard.skip(where, "gradient", bad and f"the gradient of {bad!r}")
            return None
        self.update(where)
        self.guard.ok()
        return vals

    def update(self, where: str) -> None:
        """Clip, step the optimizer and the schedule; stop if the step made a weight NaN/Inf."""
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if not all_finite(self.student.parameters()):
            bad = first_nonfinite(self.student.named_parameters())
            raise UserError(
                f"Fine-tuning stopped at {where}: the optimizer step made weight {bad!r} "
                "NaN/Inf although the loss and gradients were finite. Lower --lr or use "
                "--optimizer sgd. Finished epochs are kept in RUN/state/: the same "
                "command resumes after the last one.")


def _train_epoch(tr: _Trainer, loader, epoch: int, prog: _Progress, total_steps: int,
                 progress, note=None) -> dict:
    """The steps of one epoch, up to the step budget; the batch-size weighted sums of the loss
    parts and the number of samples ``n`` of the steps taken."""
    sums = {"loss": 0.0, "ce": 0.0, "diss": 0.0, "kd": 0.0, "n": 0}
    for batch_no, (x, y) in enumerate(loader, 1):
        if prog.step >= total_steps:
            break
        x, y = x.to(tr.device, non_blocking=True), y.to(tr.device, non_blocking=True)
        vals = tr.step(x, y, f"epoch {epoch + 1}, batch {batch_no}")
        if vals is None:
            continue
        prog.step += 1
        b = y.numel()
        sums["n"] += b
        for k, v in zip(("loss", "ce", "diss", "kd"), vals, strict=True):
            sums[k] += v * b
        if note is not None:
            note(f"epoch {epoch + 1}, running loss {sums['loss'] / sums['n']:.4f}")
        if progress is not None:
            progress(b)
    return sums


def _epoch_row(tr: _Trainer, calib_loader, sums: dict, epoch: int, step: int, seconds: float,
               skipped: int) -> dict:
    """The history row of an epoch: its mean losses and the calibration loss and accuracy (the
    same on every rank)."""
    calib = evaluate(tr.student, calib_loader, tr.device)
    calib_loss, calib_top1 = calib.loss, calib.top1
    if tr.distributed:  # every rank logs the same numbers and keeps the same best epoch
        sums = _all_reduce_sums(sums, tr.device)
        calib_loss, calib_top1 = _broadcast_calib(calib, tr.device)
    return {"epoch": epoch + 1, "steps": step,
            **{k: sums[k] / max(sums["n"], 1) for k in ("loss", "ce", "diss", "kd")},
            "calib_loss": calib_loss, "calib_top1": calib_top1,
            "lr": tr.sched.get_last_lr()[0],
            "images_per_s": sums["n"] / max(seconds, 1e-9),
            "skipped_steps": skipped}


def _epoch_loop(tr: _Trainer, train_loader, calib_loader, prog: _Progress, epochs: int,
                total_steps: int, seed: int, progress, save, note=None) -> None:
    """Train the epochs left; after each, record its row and the best epoch so far (on the
    calibration loss) in ``prog`` and ``save`` it."""
    for epoch in range(prog.epoch, epochs):
        if prog.step >= total_steps:
            break
        _seed_epoch(train_loader, seed, epoch)
        tr.student.train()
        skipped_before = tr.guard.skipped
        te = time.perf_counter()
        sums = _train_epoch(tr, train_loader, epoch, prog, total_steps, progress, note)
        row = _epoch_row(tr, calib_loader, sums, epoch, prog.step, time.perf_counter() - te,
                         tr.guard.skipped - skipped_before)
        prog.history.append(row)
        log.info("epoch %d: loss %.4f, calib top-1 %.2f", epoch + 1, row["loss"],
                 row["calib_top1"])
        if row["calib_loss"] < prog.best[0]:
            prog.best = (row["calib_loss"], epoch + 1,
                         {k: v.detach().cpu().clone() for k, v in tr.student.state_dict().items()})
        prog.epoch = epoch + 1
        save(prog)


def distill(student: nn.Module, teacher: nn.Module, plan: Plan, loaders, cfg: FinetuneConfig,
            device: torch.device, state_dir=None, progress=None, fingerprint: str = "",
            seed: int = 0, auto_batch: bool = False, note=None) -> FinetuneResult:
    """Fine-tune ``student`` in place; on return it holds the best epoch's weights.

    A step whose loss or gradients are NaN/Inf is skipped and rolled back (no update, BatchNorm
    statistics restored); three in a row stop the run with a UserError naming the step and the
    first non-finite layer. ``auto_batch``: on CUDA out-of-memory the step is retried in
    micro-batches of half the size (gradients accumulated), down to 1. ``note`` (optional)
    receives the epoch's running loss after every step, for the progress display.
    """
    t0 = time.perf_counter()
    student.to(device)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    # Every weight of the student trains, whatever flags it was built with (a copy of a model
    # frozen elsewhere, e.g. the teacher itself, would otherwise train only the new chains).
    student.requires_grad_(True)
    train_loader = loaders.train
    if dist_.active():
        train_loader = shard_loader(loaders.train, seed, dist_.world_size(), dist_.rank())
    steps_per_epoch = len(train_loader)
    epochs = cfg.epochs or math.ceil(cfg.max_steps / steps_per_epoch)
    total_steps = min(epochs * steps_per_epoch, cfg.max_steps or 10**12)

    opt, sched = _optimizer(student, plan, cfg, total_steps)
    state_file = None if state_dir is None else state_dir / "finetune.pt"
    prog = _load_state(state_file, fingerprint, student, opt, sched)
    start_epoch = prog.epoch
    tr = _Trainer(student, teacher, plan, cfg, device, opt, sched, auto_batch)
    save = partial(_save_state, state_file, fingerprint, student, opt, sched)
    try:
        _epoch_loop(tr, train_loader, loaders.calib, prog, epochs, total_steps, seed, progress,
                    save, note)
    finally:
        tr.close()
    if prog.best[2] is not None:
        student.load_state_dict(prog.best[2])
    student.eval()
    return FinetuneResult(prog.history, prog.best[1], prog.step, time.perf_counter() - t0,
                          asdict(cfg), resumed_from_epoch=start_epoch,
                          skipped_steps=sum(r.get("skipped_steps", 0) for r in prog.history),
                          micro_batch=tr.micro)
