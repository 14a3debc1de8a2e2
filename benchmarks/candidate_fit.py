"""Does fitting rene's candidates to the activations help the plan it picks?

For each model × target × decomposition, two rene searches under the activation fit that differ
only in ``ReneConfig.fit_candidates`` (True: candidates fitted to the layers' outputs, weight step
in the Σ-norm; False: weight-fitted candidates, as before 2026-12-03). Both plans are then
decomposed with the activation fit; the row is top-1 on the test subset as decomposed and after
BatchNorm re-estimation (no fine-tuning), and the search's seconds.

    OMP_NUM_THREADS=1 python benchmarks/candidate_fit.py --models resnet18,mobilenetv2 \\
        --targets 0.5,0.3 --decomps tt --test-subset 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks._profiles import MODELS  # noqa: E402
from lrcompress.commands.search import SearchConfig, search  # noqa: E402
from lrcompress.data import DataConfig  # noqa: E402
from lrcompress.model.plan import Target  # noqa: E402
from lrcompress.rank.rene import ReneConfig  # noqa: E402
from lrcompress.util.progress import Progress  # noqa: E402

FMNIST = "fashionmnist:/usr/share/datasets/fashion-mnist"


def run_one(ckpt: Path, arch: str, target: float, decomp: str, fit_candidates: bool,
            out: Path, test_subset: int, seed: int, rene: ReneConfig) -> dict:
    cfg = SearchConfig(target=Target("flops", target), decomp=decomp, method="rene",
                       seed=seed, device="cpu", input_size=(1, 28, 28), fit="activation",
                       data=DataConfig(batch_size=128, seed=seed, test_subset=test_subset),
                       rene=replace(rene, fit_candidates=fit_candidates))
    t = time.perf_counter()
    res = search(str(ckpt), FMNIST, out, cfg, arch=arch, progress=Progress())
    rep = res.report
    acc = rep["accuracy"]
    return {"target": target, "decomp": decomp, "fit_candidates": fit_candidates,
            "iters": rene.iters, "warmup": rene.warmup,
            "decomposed": acc.get("decomposed", {}).get("top1"),
            "after_bn": (acc.get("bn_recalibrated") or {}).get("top1"),
            "original": acc.get("original", {}).get("top1"),
            "macs_ratio": rep["totals"]["macs_ratio"],
            "seconds": rep["seconds"], "wall_s": round(time.perf_counter() - t, 1),
            "candidate_fit": rep.get("search", {}).get("candidate_fit")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenetv2")
    ap.add_argument("--targets", default="0.5,0.3")
    ap.add_argument("--decomps", default="tt")
    ap.add_argument("--test-subset", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=ReneConfig().iters,
                    help="rene iterations per narrowing step (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=ReneConfig().warmup,
                    help="rene weight-only iterations first (default: %(default)s)")
    ap.add_argument("--arms", default="on,off",
                    help="fit_candidates values to run: on, off or on,off (default: %(default)s)")
    ap.add_argument("--checkpoints", type=Path, default=HERE.parent / "examples/fashion_mnist/out")
    ap.add_argument("--work-dir", type=Path, default=HERE / "runs/candidate_fit")
    ap.add_argument("--out", type=Path, default=HERE / "results/candidate_fit.json")
    a = ap.parse_args(argv)
    rows = json.loads(a.out.read_text()) if a.out.exists() else []
    rene = ReneConfig(iters=a.iters, warmup=a.warmup)
    key = ("model", "target", "decomp", "fit_candidates", "iters", "warmup")
    default = {"iters": ReneConfig().iters, "warmup": ReneConfig().warmup}
    done = {tuple({**default, **r}[k] for k in key) for r in rows}
    arms = [{"on": True, "off": False}[x] for x in a.arms.split(",")]
    for name in a.models.split(","):
        spec = MODELS[name]
        for target in map(float, a.targets.split(",")):
            for decomp in a.decomps.split(","):
                for fc in arms:
                    if (name, target, decomp, fc, a.iters, a.warmup) in done:
                        continue
                    out = a.work_dir / (f"{name}-{decomp}-{target}-{'act' if fc else 'w'}"
                                        f"-{a.warmup}+{a.iters}")
                    row = {"model": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                 time.gmtime()),
                           **run_one(a.checkpoints / spec.checkpoint, spec.arch, target,
                                     decomp, fc, out, a.test_subset, a.seed, rene)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    a.out.parent.mkdir(parents=True, exist_ok=True)
                    a.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
