"""Cost model vs torch's FlopCounterMode on whole models (issue: agree within 1 %).

    .venv/bin/python benchmarks/bench_costs.py [--json]

Counts every model at its own input size with random weights; FlopCounterMode runs with
attention forced onto the math path (its fused CPU kernel is counted as 0 otherwise), and reports
2 FLOPs per MAC.
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lrcompress.model.costs import count_model
from lrcompress.model.layers import find_layers

MODELS = [("timm", "resnet18"), ("timm", "mobilenetv2_100"), ("timm", "vit_tiny_patch16_224"),
          ("timm", "convnext_atto"), ("timm", "efficientnet_b0"), ("torchvision", "resnet18")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for src, name in MODELS:
        if src == "timm":
            m = timm.create_model(name, pretrained=False).eval()
            size = tuple(m.pretrained_cfg["input_size"])
        else:
            m = torchvision.models.get_model(name, weights=None).eval()
            size = (3, 224, 224)
        t = time.perf_counter()
        ours = count_model(m, find_layers(m, size), size)
        secs = time.perf_counter() - t
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            m(torch.zeros(1, *size))
        ref = fc.get_total_flops() // 2
        rows.append({"model": f"{src}:{name}", "input": list(size), "lrcompress_macs": ours.macs,
                     "flopcounter_macs": ref, "ratio": ours.macs / ref,
                     "attention_macs": ours.other_macs, "params": ours.params,
                     "seconds": round(secs, 2)})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'model':34} {'lrcompress MACs':>16} {'FlopCounterMode':>16} {'ratio':>8}")
    for r in rows:
        print(f"{r['model']:34} {r['lrcompress_macs']:16,} {r['flopcounter_macs']:16,} "
              f"{r['ratio']:8.4f}")
    bad = [r["model"] for r in rows if abs(r["ratio"] - 1) > 0.01]
    print("all within 1 %" if not bad else f"OFF BY MORE THAN 1 %: {bad}")


if __name__ == "__main__":
    main()
