"""Rank grid of 8 vs 16 at equal MACs: measured latency ratios (ONNX Runtime CPU, 1 thread).

    OMP_NUM_THREADS=1 python benchmarks/rank_grid.py --arch timm:mobilenetv2_100 --flops 0.4

Compresses the architecture (random weights: latency does not depend on them) with ``uniform``
ranks on a grid of 8 and on a grid of 16 to the same MACs target, then measures both against the
original, round-robin in one process, batch 1 and 64, several rounds (each round the median of
30 runs), and prints one line per batch with the per-round ratios.
"""

from __future__ import annotations

import argparse

import timm
import torch

import lrcompress
from lrcompress.measure.latency_target import LatencyConfig, measure_whole


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="timm:mobilenetv2_100")
    ap.add_argument("--decomp", default="tucker2")
    ap.add_argument("--flops", type=float, default=0.4)
    ap.add_argument("--grids", default="8,16")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.arch.split(":", 1)[1], pretrained=False, num_classes=10,
                              in_chans=1).eval()
    grids = [int(g) for g in args.grids.split(",")]
    compressed = {}
    for g in grids:
        res = lrcompress.compress(model, torch.zeros(1, 1, 28, 28), decomp=args.decomp,
                                  method="uniform", target_flops=args.flops, device="cpu",
                                  calib=None, eval=None, rank_multiple=g)
        compressed[g] = res.model
        print(f"grid {g}: MACs ratio {res.plan.macs_ratio:.3f}", flush=True)
    for b in map(int, args.batches.split(",")):
        rounds = []
        for _ in range(args.rounds):
            rounds.append(tuple(round(measure_whole(model, compressed[g], (1, 28, 28),
                                                    LatencyConfig(batch=b, repeats=30)).ratio, 3)
                                for g in grids))
        print(f"{args.arch} {args.decomp} MACs {args.flops} batch {b}: latency ratio per round "
              f"(grid {' / '.join(map(str, grids))}): {rounds}", flush=True)


if __name__ == "__main__":
    main()
