"""The data-free stage: calibration and training inputs synthesised from the model's BatchNorm
statistics when there is no data (cached in RUN/state/)."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from lrcompress.batches import top1_labeller
from lrcompress.calib.synthesize import (
    Synthetic,
    has_batchnorm,
    load_synthetic,
    noise_inputs,
    save_synthetic,
    synthesize,
)
from lrcompress.commands.job import Job, fit_of, needs_data

log = logging.getLogger(__name__)


SYNTHETIC_FILE = "synthetic.safetensors"  # under RUN/state/: a resumed run reuses the inputs


NO_BATCHNORM = ("{arch} has no BatchNorm layer, so there are no statistics to synthesise "
                "calibration inputs from: using inputs drawn at the model's input mean/std "
                "instead. A few hundred unlabelled real images (--data imagefolder:DIR, a flat "
                "folder is fine) do much better.")


SYNTHETIC_FINETUNE = (
    "Note: fine-tuning on synthesised inputs after an output-aware fit was measured to lose "
    "accuracy (resnet18 / Fashion-MNIST, sequential fit, 100 steps on 256 synthesised inputs: "
    "-0.3 points at 30 % and 50 % MACs; benchmarks/RESULTS_datafree.md). Without real data, "
    "leave --max-steps/--finetune-epochs off, or give a few hundred unlabelled real images "
    "(--data imagefolder:DIR).")


def synthesize_stage(job: Job) -> dict:
    """Data-free mode: calibration and training inputs made from the original model (kept in
    RUN/state/, so a resumed run reuses them), labelled with its top-1 prediction."""
    uses = needs_data(job.cfg, job.given_plan is not None, has_batchnorm(job.model))
    if not uses:
        return {"method": None, "used_for": [], "note": "no stage of this run reads inputs"}
    if job.run.has_state(SYNTHETIC_FILE):
        syn = load_synthetic(job.run.state(SYNTHETIC_FILE))
    else:
        syn = _make_synthetic(job)
        if job.run.writes:
            save_synthetic(syn, job.run.state(SYNTHETIC_FILE))
    calib, train = _synthetic_loaders(job, syn.inputs)
    job.loaders = replace(job.loaders, calib=calib, train=train, batch_size=calib.batch_size)
    if job.cfg.finetune.enabled and fit_of(job.cfg, has_calib=True) != "weight":
        job.progress.info(SYNTHETIC_FINETUNE)
    return {**syn.summary, "used_for": uses}


def _make_synthetic(job: Job) -> Synthetic:
    synth = job.synth
    if not has_batchnorm(job.model):
        log.warning(NO_BATCHNORM.format(arch=job.info.arch))
        return noise_inputs(job.input_size, synth.samples, job.cfg.seed)
    mean, std = job.norm if job.norm is not None else (None, None)
    return synthesize(job.model, job.input_size, job.info.num_classes, synth, mean=mean,
                      std=std, seed=job.cfg.seed, progress=job.progress)


def _synthetic_loaders(job: Job, x: torch.Tensor):
    """(calib, train) loaders over the synthetic inputs, labelled by the original's top-1."""
    from torch.utils.data import DataLoader, TensorDataset

    bs = min(job.cfg.data.batch_size, len(x))
    label = top1_labeller(job.model, job.device)
    ds = TensorDataset(x, torch.cat([label(x[i:i + bs]) for i in range(0, len(x), bs)]))
    calib = DataLoader(ds, batch_size=bs, shuffle=False)
    train = DataLoader(ds, batch_size=bs, shuffle=True, drop_last=len(ds) > bs,
                       generator=torch.Generator().manual_seed(job.cfg.seed))
    return calib, train
