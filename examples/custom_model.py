"""Compress a network you wrote yourself, save it, and load it back — with the Python API.

    python examples/custom_model.py [--steps 20] [--out DIR]

The network below is not a timm or torchvision architecture: lrcompress traces it by running one
example batch through it, factorizes its conv and linear layers to 50 % of the MACs, re-estimates
its BatchNorm statistics, distills it from the original for a few steps, and saves it. Reloading
needs the class (``model=SmallNet``): the file holds the weights and the plan, never code.
Data: Fashion-MNIST when Debian's package is installed, else random images (the mechanics are
the same; the accuracies are then meaningless).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import lrcompress

FMNIST = Path("/usr/share/datasets/fashion-mnist")


class SmallNet(nn.Module):
    """A plain CNN for 1×28×28 images: three conv blocks and a classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(1, 32, 1), block(32, 64, 2), block(64, 128, 2),
                                      block(128, 128, 1))
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def images(n: int, train: bool, seed: int = 0) -> TensorDataset:
    """n Fashion-MNIST images (normalised) with labels, or random ones if it is not installed."""
    stem = "train" if train else "t10k"
    f = FMNIST / f"{stem}-images-idx3-ubyte.gz"
    if f.exists():
        import gzip

        import numpy as np

        with gzip.open(f) as fh:
            x = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
        with gzip.open(FMNIST / f"{stem}-labels-idx1-ubyte.gz") as fh:
            y = np.frombuffer(fh.read(), np.uint8, offset=8)[:n]
        x = (torch.from_numpy(x.copy()).float() / 255 - 0.286) / 0.353
        return TensorDataset(x, torch.from_numpy(y.copy()).long())
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,),
                                                                              generator=g))


def macs(model: nn.Module) -> int:
    with FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 1, 28, 28))
    return fc.get_total_flops() // 2


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="distillation steps (0: none)")
    ap.add_argument("--train-steps", type=int, default=200, help="steps to train SmallNet first")
    ap.add_argument("--out", type=Path, default=None, help="where to write m.safetensors")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    model = SmallNet().eval()
    train = DataLoader(images(2048, train=True), batch_size=64, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _, (x, y) in zip(range(args.train_steps), train):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()

    calib = [x for x, _ in DataLoader(images(512, train=True, seed=1), batch_size=64)]  # unlabelled
    test = DataLoader(images(1000, train=False, seed=2), batch_size=250)
    result = lrcompress.compress(
        model, torch.zeros(1, 1, 28, 28), target_flops=0.5, decomp="tucker2", method="rene",
        calib=calib, train=train, eval=test,
        finetune=lrcompress.FinetuneConfig(max_steps=args.steps) if args.steps else None,
        rene=lrcompress.ReneConfig(iters=8, warmup=2), device="cpu")

    out = args.out or Path(tempfile.mkdtemp())
    path = lrcompress.save(result, out / "m.safetensors")
    reloaded = lrcompress.load(path, model=SmallNet)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        same = torch.equal(reloaded(x), result.model.eval()(x))
    acc = result.report["accuracy"]
    final = acc.get("finetuned") or acc.get("bn_recalibrated") or acc["decomposed"]
    summary = {"macs_original": macs(model), "macs_compressed": macs(reloaded),
               "top1_original": acc["original"]["top1"], "top1_compressed": final["top1"],
               "layers_factorized": len(result.plan.layers), "reload_identical": same,
               "path": str(path)}
    summary["macs_ratio"] = summary["macs_compressed"] / summary["macs_original"]
    for k, v in summary.items():
        print(f"{k:>18}: {v:.4f}" if isinstance(v, float) else f"{k:>18}: {v}")
    return summary


if __name__ == "__main__":
    main()
