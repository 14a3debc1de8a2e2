"""DDP fine-tuning (2 gloo CPU processes) against one process with the same global batch.

BatchNorm normalises with per-rank batch statistics, so with train-mode BN two ranks of 8 are
not one batch of 16 (SyncBatchNorm would fix that, but it needs a GPU). The test therefore
freezes the student's BN (running statistics, as in eval mode): then the DDP gradient, the mean of
the two ranks' mean-reduced losses, is exactly the 16-sample gradient, and any difference left is
float rounding in the all-reduce.
"""

from __future__ import annotations

import copy
import os
import socket

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lrcompress.data import DataConfig, build_loaders, parse_data_spec, resolve_preprocess
from lrcompress.model.surgery import decompose_
from lrcompress.recover.finetune import FinetuneConfig, distill, shard_loader

from .conftest import tiny_resnet
from .test_finetune import tiny_plan

SEED = 3
CFG_FIRST = FinetuneConfig(max_steps=1, lr=0.05)
CFG_EPOCH = FinetuneConfig(epochs=1, lr=0.05)  # 48 samples / 16 a global batch: 3 steps


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.forward = lambda x, m=m: F.batch_norm(x, m.running_mean, m.running_var, m.weight,
                                                    m.bias, False, 0.0, m.eps)


def _setup(batch_size: int):
    torch.manual_seed(0)
    teacher = tiny_resnet()
    plan = tiny_plan(teacher)
    student = copy.deepcopy(teacher)
    decompose_(student, plan)
    _freeze_bn(student)
    spec = parse_data_spec("synthetic:48")
    pre = resolve_preprocess(teacher, spec, input_size=(1, 16, 16), in_chans=1)
    loaders = build_loaders(spec, pre, DataConfig(batch_size=batch_size, seed=0, augment=False),
                            num_classes=10)
    return teacher, student, plan, loaders


def _run(cfg, batch_size, single=False):
    teacher, student, plan, loaders = _setup(batch_size)
    if single:  # the sampler DDP uses, over one replica: the same permutation, whole batches
        loaders.train = shard_loader(loaders.train, SEED, 1, 0)
    res = distill(student, teacher, plan, loaders, cfg, torch.device("cpu"), seed=SEED)
    return res, {k: v.detach().clone() for k, v in student.state_dict().items()}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        first, _ = _run(CFG_FIRST, 8)
        res, weights = _run(CFG_EPOCH, 8)
        torch.save({"first": first.history[0]["loss"], "history": res.history,
                    "steps": res.steps, "weights": weights}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    first, _ = _run(CFG_FIRST, 16, single=True)
    single, weights = _run(CFG_EPOCH, 16, single=True)

    # Every rank logs the same (all-reduced) numbers and ends with the same weights.
    timeless = [[{k: v for k, v in row.items() if k != "images_per_s"} for row in r["history"]]
                for r in (r0, r1)]
    assert timeless[0] == timeless[1]
    for k in r0["weights"]:
        torch.testing.assert_close(r0["weights"][k], r1["weights"][k], rtol=0, atol=0)
    # The first step's loss over the global batch is the single-process loss.
    torch.testing.assert_close(r0["first"], first.history[0]["loss"], rtol=1e-5, atol=0)
    # After one epoch (3 steps) the weights agree up to all-reduce rounding.
    assert r0["steps"] == single.steps == 3
    for k in weights:
        torch.testing.assert_close(r0["weights"][k], weights[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r0["history"][0]["loss"], single.history[0]["loss"], rtol=1e-5,
                               atol=0)
