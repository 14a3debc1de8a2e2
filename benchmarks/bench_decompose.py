"""Decomposition time per method: one 512×512×3×3 conv, and every eligible k×k conv of resnet18.

    python benchmarks/bench_decompose.py [--json out.json] [--methods svd,tt] [--device cpu]

Part 1 times ``decompose`` of a 512→512 3×3 conv (seeded Kaiming-normal weights) at ranks
32/64/128/256, one call per rank, and ``decompose_many`` of all four at once (the shared-work path).
Part 2 takes timm ``resnet18`` (pretrained=False, in_chans=1, num_classes=10, input 1×28×28),
every k×k conv the method supports, and decomposes each at 5 candidate ranks
(1/16, 1/8, 1/4, 3/8, 1/2 of min(C_in, C_out)) with one ``decompose_many`` call per layer,
as a rank search initialising its branches would. CP runs at its default ALS budget.

Times are wall seconds (median of ``--repeats``); on the shared 2-core machines they are noisy, so
the load average before and after is recorded. Runs on CPU, and on CUDA too when available.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrcompress.factorizations import FACTORIZATIONS, get_factorization, relative_error  # noqa: E402
from lrcompress.model.layers import LayerSpec, find_layers  # noqa: E402

BIG_RANKS = (32, 64, 128, 256)
FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, repeats: int, fn, *args):
    """Median wall seconds of ``fn(*args)`` over ``repeats`` runs, and its last result."""
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn(*args)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def big_layer(methods, device, repeats):
    spec = LayerSpec("big", "conv2d", 512, 512, (3, 3), (1, 1), (1, 1), (1, 1), 1, False,
                     (14, 14), (14, 14))
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(spec.weight_shape, generator=g) * (2 / (512 * 9)) ** 0.5).to(device)
    rows = []
    for name in methods:
        fact = get_factorization(name)
        per_rank = {}
        for r in BIG_RANKS:
            sec, factors = _timed(device, repeats, fact.decompose, w, spec, r)
            err = relative_error(w, fact.reconstruct(factors, spec))
            per_rank[r] = {"seconds": round(sec, 3), "rel_error": round(err, 4)}
        sec_many, _ = _timed(device, repeats, fact.decompose_many, w, spec, list(BIG_RANKS))
        rows.append({"method": name, "per_rank": per_rank,
                     "decompose_many_seconds": round(sec_many, 3)})
    return rows


def resnet18_layers(methods, device, repeats):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10).eval()
    specs = [s for s in find_layers(model, (1, 28, 28))
             if s.kind == "conv2d" and s.kernel != (1, 1)]
    mods = dict(model.named_modules())
    weights = {s.name: mods[s.name].weight.detach().to(device) for s in specs}
    rows = []
    for name in methods:
        fact = get_factorization(name)
        total, n_layers, n_decomps, worst = 0.0, 0, 0, ("", 0.0)
        for spec in specs:
            if fact.unsupported_reason(spec):
                continue
            base = min(spec.in_ch, spec.out_ch)
            ranks = sorted({max(1, round(f * base)) for f in FRACTIONS})
            sec, _ = _timed(device, repeats, fact.decompose_many, weights[spec.name], spec, ranks)
            total += sec
            n_layers += 1
            n_decomps += len(ranks)
            if sec > worst[1]:
                worst = (spec.name, sec)
        rows.append({"method": name, "layers": n_layers, "decompositions": n_decomps,
                     "seconds": round(total, 2), "slowest_layer": worst[0],
                     "slowest_layer_seconds": round(worst[1], 2)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--methods", default=",".join(FACTORIZATIONS),
                    help="comma-separated methods (default: all)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: CPU, and CUDA too when available")
    ap.add_argument("--repeats", type=int, default=1, help="median of this many runs")
    ap.add_argument("--skip-resnet", action="store_true", help="only the 512×512×3×3 layer")
    args = ap.parse_args(argv)
    methods = [get_factorization(m).name for m in args.methods.split(",")]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "auto":
        devices = [args.device]
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "devices": {},
    }
    for dev in devices:
        label = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
        print(f"== {dev} ({label})")
        big = big_layer(methods, dev, args.repeats)
        print("512x512x3x3 conv: seconds per decompose (relative error) at ranks "
              + "/".join(map(str, BIG_RANKS)) + ", and one decompose_many of all four")
        for row in big:
            cells = "  ".join(f"{v['seconds']:7.3f}s ({v['rel_error']:.3f})"
                              for v in row["per_rank"].values())
            print(f"  {row['method']:8s} {cells}   many: {row['decompose_many_seconds']:.3f}s")
        entry = {"device_name": label, "big_layer": big}
        if not args.skip_resnet:
            rn = resnet18_layers(methods, dev, args.repeats)
            print("resnet18 (1x28x28), every eligible kxk conv at 5 candidate ranks "
                  "(decompose_many per layer):")
            for row in rn:
                print(f"  {row['method']:8s} {row['seconds']:7.2f}s  {row['layers']} layers, "
                      f"{row['decompositions']} decompositions; slowest {row['slowest_layer']} "
                      f"{row['slowest_layer_seconds']:.2f}s")
            entry["resnet18"] = rn
        result["devices"][dev] = entry
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average before {result['loadavg_before']}, after {result['loadavg_after']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
