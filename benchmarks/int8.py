"""Low-rank + INT8 on the CPU, measured (issue 17): for each finished RUN, ``lrcompress export
RUN --int8`` (it writes RUN/model.int8.onnx and the INT8 rows of RUN/report.json), then one row
per run with top-1 FP32 vs INT8 and the latency of the four models — original FP32, compressed
FP32, original INT8 (quantization alone), compressed INT8 — in ONNX Runtime on the CPU at 1 and
all threads, batch 1 and 64, all four timed in round-robin in one process (medians, with the
interquartile range as the spread).

    OMP_NUM_THREADS=1 python benchmarks/int8.py RUN [RUN ...] [--repeats 30] \\
        [--calibration minmax] [--balance-ablation] [--out F.json] [--md F.md]

``--balance-ablation`` also quantizes each run without scale balancing (nothing written) and
records both INT8 top-1s and agreements with FP32. The markdown rows go to stdout (and --md).
Goals (issue 17): <= 0.5 pt lost to INT8; INT8 faster than FP32 at batch 64; low-rank + INT8
faster than INT8 alone at equal or better accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from lrcompress.commands.export import ExportConfig, export_run, original_model
from lrcompress.commands.export_int8 import int8_stage
from lrcompress.deploy.int8 import Int8Config
from lrcompress.measure.latency import LatencyConfig
from lrcompress.model.loading import load_model
from lrcompress.model.plan import Plan
from lrcompress.report.schema import read_report
from lrcompress.util.run_files import MODEL_FILE

MODELS = ("original", "compressed", "original_int8", "compressed_int8")


def ablation(run: Path, cfg: Int8Config) -> dict:
    """INT8 accuracy with and without scale balancing (graphs only, nothing written)."""
    report = read_report(run)
    lm = load_model(str(run / MODEL_FILE))
    plan = Plan.from_dict(lm.plan)
    original, weights = original_model(run, report, plan)
    out = {}
    for on in (True, False):
        g = int8_stage(run, report, lm.model.eval(), original, [lp.name for lp in plan.layers],
                       tuple(report["model"]["input_size"]), replace(cfg, balance=on,
                                                                     max_drop=100.0),
                       opset=18, original_random=weights.startswith("random"))
        a = g.section["accuracy"]
        out["balanced" if on else "plain"] = {
            "top1_int8": a["top1"]["compressed_int8"], "drop": a["drop"],
            "agreement": a["agreement_with_fp32"]["compressed_int8"],
            "spread": g.section["chain_weight_spread"]["after"]}
    return out


def measure(run: Path, cfg: Int8Config, lat: LatencyConfig, balance_ablation: bool) -> dict:
    res = export_run(run, ExportConfig(formats=("onnx-int8",), int8=cfg, latency=lat))
    q, report = res.section["int8"], res.report
    row = {"run": str(run), "arch": report["model"]["arch"],
           "decomp": (report.get("config") or {}).get("decomp"),
           "macs_ratio": round(report["totals"]["macs_ratio"], 4), "int8": cfg.to_dict(),
           "accuracy": q["accuracy"], "latency": q["latency"]["runs"],
           "warnings": q["latency"]["warnings"], "cpu": q["latency"]["cpu"]}
    if balance_ablation:
        row["balance_ablation"] = ablation(run, cfg)
    return row


def _ms(r: dict, n: str) -> str:
    return f"{r['median_ms'][n]:.3f} ±{r['iqr_ms'][n]:.3f}"


def markdown(rows: list[dict]) -> str:
    """Two tables: accuracy per run, and latency per run × threads × batch."""
    acc = ["| run | MACs | top-1 orig FP32 | compr FP32 | orig INT8 | compr INT8 | INT8 drop |",
           "|---|---|---|---|---|---|---|"]
    lat = ["| run | threads | batch | orig FP32 ms | compr FP32 | orig INT8 | compr INT8 | "
           "compr FP32 × | orig INT8 × | compr INT8 × | low-rank on INT8 × |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        t, name = row["accuracy"]["top1"], Path(row["run"]).name
        drop = row["accuracy"]["drop"]
        acc.append(f"| {name} | {row['macs_ratio']:.2f} | "
                   + " | ".join("-" if t.get(n) is None else f"{t[n]:.2f}" for n in MODELS)
                   + f" | {'-' if drop is None else f'{drop:+.2f}'} |")
        for r in row["latency"]:
            sp = r["speedup"]
            lat.append(f"| {name} | {r['threads']} | {r['batch']} | "
                       + " | ".join(_ms(r, n) for n in MODELS)
                       + f" | {sp['compressed']:.2f} | {sp['original_int8']:.2f} | "
                         f"{sp['compressed_int8']:.2f} | {r['lowrank_over_int8']:.2f} |")
    out = "\n".join(acc) + "\n\n" + "\n".join(lat) + "\n"
    abl = [r for r in rows if r.get("balance_ablation")]
    if abl:
        out += ("\n| run | INT8 top-1 balanced | plain | agreement balanced % | plain % |\n"
                "|---|---|---|---|---|\n")
        for r in abl:
            b, p = r["balance_ablation"]["balanced"], r["balance_ablation"]["plain"]
            fmt = (lambda v: "-" if v is None else f"{v:.2f}")
            out += (f"| {Path(r['run']).name} | {fmt(b['top1_int8'])} | {fmt(p['top1_int8'])} "
                    f"| {b['agreement']:.2f} | {p['agreement']:.2f} |\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--threads", default="1,0")
    ap.add_argument("--calibration", default="minmax")
    ap.add_argument("--int8-batches", type=int, default=8)
    ap.add_argument("--max-drop", type=float, default=100.0,
                    help="export's --int8-max-drop (default: never refuse, record the drop)")
    ap.add_argument("--balance-ablation", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--md", type=Path)
    a = ap.parse_args(argv)
    cfg = Int8Config(calibration=a.calibration, batches=a.int8_batches, max_drop=a.max_drop)
    lat = LatencyConfig(repeats=a.repeats, warmup=a.warmup, torch=False, per_layer=False,
                        batches=tuple(int(b) for b in a.batches.split(",")),
                        threads=tuple(int(t) for t in a.threads.split(",")))
    rows = []
    for run in a.runs:
        print(f"# {run}", file=sys.stderr, flush=True)
        rows.append(measure(run, cfg, lat, a.balance_ablation))
    text = markdown(rows)
    print(text)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1) + "\n")
    if a.md:
        a.md.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
