"""Latency targets on the CPU, measured: does ``--target-latency`` land where it is asked?

    OMP_NUM_THREADS=1 python benchmarks/latency_targets.py [--arch timm:resnet18] [--out F.json]
    OMP_NUM_THREADS=1 python benchmarks/latency_targets.py --arch torchvision:resnet18 \
        --input-size 3,224,224 --batches 1,8 --decomps tucker2 --torch-pruning

For each setting (factorization × target × batch) this compresses the architecture (random
weights: latency does not depend on them; accuracy is the benchmark harness's job) with the
``uniform`` rank method and prints the target, the measured whole-model latency ratio (ONNX
Runtime CPU, one thread, round-robin medians), its spread, the attempts the re-solve needed,
the MACs ratio, and the time spent building the candidate table (cold, then warm cache).
Plain ``--target-flops`` and ``--target-flops --latency-aware`` rows give the achieved/ideal
speed-up at equal MACs; ``--torch-pruning`` adds Torch-Pruning's model at the same MACs target
(pruned the benchmark harness's way, timed the same way) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import lrcompress
from lrcompress.errors import TargetError
from lrcompress.measure.latency_target import LatencyConfig, measure_whole
from lrcompress.model.arch import build as build_arch
from lrcompress.model.arch import parse_arch

REPEATS = 30


def build(arch: str, in_chans: int):
    """The architecture with random weights (10 classes): latency does not depend on them."""
    torch.manual_seed(0)
    return build_arch(parse_arch(arch), num_classes=10, in_chans=in_chans).eval()


def one(model, input_size, kind: str, value: float, decomp: str, batch: int, aware=False,
        narrow: float | None = None):
    lat = LatencyConfig(batch=batch, aware=aware, repeats=REPEATS)
    t0 = time.perf_counter()
    kw = {"target_latency": value} if kind == "latency" else {"target_flops": value}
    if narrow is not None:  # random calibration inputs: the widths, not the values, set the time
        gen = torch.Generator().manual_seed(0)
        kw.update(narrow_hidden=narrow,
                  calib=[torch.randn(16, *input_size, generator=gen) for _ in range(4)])
    try:
        res = lrcompress.compress(model, torch.zeros(1, *input_size), decomp=decomp,
                                  method="uniform", latency=lat, device="cpu", **kw)
    except TargetError as e:  # unreachable: a row that says so, with lrcompress's own message
        return {"decomp": _name(decomp, narrow), "target": f"{kind} {value}", "batch": batch,
                "aware": aware, "unreachable": str(e),
                "seconds": round(time.perf_counter() - t0, 1)}
    secs = time.perf_counter() - t0
    rep = res.report
    la = rep["latency"]
    if la is None:  # a plain MACs target: measure it the same way, for comparison
        w = measure_whole(model, res.model, tuple(input_size), lat)
        la = {"measured_ratio": round(w.ratio, 4), "spread": round(w.spread, 4),
              "speedup": round(1 / w.ratio, 4), "macs_ratio": res.plan.macs_ratio,
              "attempts": [w.to_dict()]}
    return {"decomp": _name(decomp, narrow), "target": f"{kind} {value}", "batch": batch,
            "aware": aware, "measured_ratio": la["measured_ratio"], "spread": la["spread"],
            "speedup": la["speedup"], "ideal_speedup": round(1 / la["macs_ratio"], 3),
            "achieved_over_ideal": round(la["speedup"] * la["macs_ratio"], 3),
            "met": la.get("met"), "attempts": len(la["attempts"]),
            "first_ratio": la["attempts"][0]["ratio"],
            "first_estimate": la["attempts"][0].get("estimated_ratio"),
            "macs_ratio": round(la["macs_ratio"], 4), "table": la.get("table", {}),
            "seconds": round(secs, 1), "latency_stage_s": rep["seconds"].get("latency")}


def _name(decomp: str, narrow: float | None) -> str:
    return decomp if narrow is None else f"{decomp} + narrow {narrow:g}"


def torch_pruning_row(model, input_size, target: float, batch: int) -> dict:
    """Torch-Pruning's model at the MACs target (the harness's pruner: group L2 magnitude,
    global, channels rounded to 8), timed against the original like the other rows."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.tp_baseline import prune_to_macs

    t0 = time.perf_counter()
    pruned, info = prune_to_macs(model, tuple(input_size), target)
    w = measure_whole(model, pruned, tuple(input_size), LatencyConfig(batch=batch,
                                                                      repeats=REPEATS))
    speedup = 1 / w.ratio
    return {"decomp": "torch-pruning", "target": f"flops {target}", "batch": batch,
            "aware": False, "measured_ratio": round(w.ratio, 4), "spread": round(w.spread, 4),
            "speedup": round(speedup, 4), "ideal_speedup": round(1 / info["macs_ratio"], 3),
            "achieved_over_ideal": round(speedup * info["macs_ratio"], 3), "attempts": 1,
            "first_ratio": w.ratio, "first_estimate": None,
            "macs_ratio": round(info["macs_ratio"], 4), "table": {},
            "seconds": round(time.perf_counter() - t0, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="timm:resnet18")
    ap.add_argument("--decomps", default="tucker2,tt")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--target-latency", type=float, default=0.4,
                    help="the latency-target rows' R (default: %(default)s)")
    ap.add_argument("--target-flops", type=float, default=0.3,
                    help="the MACs-target rows' ratio (default: %(default)s)")
    ap.add_argument("--input-size", default="1,28,28",
                    help="C,H,W of one input (default: %(default)s)")
    ap.add_argument("--narrow-hidden", type=float, default=None,
                    help="also run every setting with --narrow-hidden K (random calibration "
                    "inputs)")
    ap.add_argument("--torch-pruning", action="store_true",
                    help="add Torch-Pruning's model at the MACs target (needs the bench extra)")
    ap.add_argument("--out", default=None, help="JSON of the rows (default: none)")
    ap.add_argument("--md", default=None, help="render the rows as Markdown here")
    ap.add_argument("--from-json", default=None,
                    help="only render these JSON files (comma-separated, one section each)")
    args = ap.parse_args()
    if args.from_json:
        if args.md:
            write_md([json.loads(open(f).read()) for f in args.from_json.split(",")], args.md)
        return
    input_size = tuple(int(v) for v in args.input_size.split(","))
    model = build(args.arch, input_size[0])
    cache = tempfile.mkdtemp()
    os.environ["LRCOMPRESS_CACHE_DIR"] = cache  # a cold cache for the first row of each batch
    rows = []
    for batch in map(int, args.batches.split(",")):
        for decomp in args.decomps.split(","):
            settings = (("latency", args.target_latency, False),
                        ("flops", args.target_flops, False), ("flops", args.target_flops, True))
            for kind, value, aware in settings:
                for narrow in (None, args.narrow_hidden) if args.narrow_hidden else (None,):
                    r = one(model, input_size, kind, value, decomp, batch, aware, narrow)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
        if args.torch_pruning:
            rows.append(torch_pruning_row(model, input_size, args.target_flops, batch))
            print(json.dumps(rows[-1]), flush=True)
    data = {"arch": args.arch, "input_size": list(input_size),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "OMP_NUM_THREADS=1 python benchmarks/latency_targets.py "
                       + " ".join(sys.argv[1:]),
            "machine": machine(), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
    if args.md:
        write_md([data], args.md)


def machine() -> str:
    import onnxruntime

    from lrcompress.measure.latency_table import cpu_model
    from lrcompress.measure.layer_timing import cpu_count

    return (f"{cpu_model()}, {cpu_count()} core(s); torch {torch.__version__}, onnxruntime "
            f"{onnxruntime.__version__}")


def write_md(sections: list[dict], path: str) -> None:
    """One Markdown file: a section per architecture, a table line per setting."""
    lines = ["# Latency targets, measured (random weights)", "",
             "ONNX Runtime CPU, 1 thread; ratios are compressed/original medians measured "
             "round-robin in one process (30 runs); spread = half-IQRs propagated to the ratio. "
             "Rank method `uniform` (the benchmark harness has the accuracy rows).", ""]
    for data in sections:
        lines += section_md(data)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def section_md(data: dict) -> list[str]:
    size = "×".join(map(str, data.get("input_size", (1, 28, 28))))
    lines = [f"## {data['arch']}, {size}", "",
             f"{data['date']}; {data['machine']}. Command: `{data['command']}`.", "",
             "| decomp | target | batch | measured latency ratio ± spread | speed-up | ideal "
             "(1/MACs ratio) | achieved/ideal | MACs ratio | attempts (first ratio; estimate) "
             "| candidates timed | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        tgt = r["target"] + (" --latency-aware" if r["aware"] else "")
        if "unreachable" in r:
            lines.append(f"| {r['decomp']} | {tgt} | {r['batch']} | unreachable: "
                         f"{r['unreachable'].split(':', 1)[1].split('. ')[0].strip()} "
                         + "| - " * 7 + f"| {r['seconds']} |")
            continue
        first = (f"{r['attempts']} ({r['first_ratio']:.3f}; {r['first_estimate']:.3f})"
                 if r["first_estimate"] is not None else f"{r['attempts']}")
        lines.append(f"| {r['decomp']} | {tgt} | {r['batch']} | {r['measured_ratio']:.3f} ± "
                     f"{r['spread']:.3f} | {r['speedup']:.2f}× | {r['ideal_speedup']:.2f}× | "
                     f"{r['achieved_over_ideal']:.2f} | {r['macs_ratio']:.3f} | {first} | "
                     f"{r['table'].get('measured', '-')} | {r['seconds']} |")
    return lines + [""]

if __name__ == "__main__":
    main()
