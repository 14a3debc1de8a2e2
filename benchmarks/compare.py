"""Run the benchmark protocol in one command: models × MACs targets × decompositions × rank
methods, plus the Torch-Pruning baseline, then write benchmarks/RESULTS.md and its plot.

    python benchmarks/compare.py --quick          # CPU profile: well under an hour on 2 cores
    python benchmarks/compare.py --full           # GPU profile: about 10 minutes per model
    python benchmarks/compare.py --quick --models resnet18 --targets 0.5 --decomps tt
    python benchmarks/compare.py --quick --dry-run    # what would run, and an estimate
    python benchmarks/compare.py --quick --report-only
    python benchmarks/compare.py --quick --equal-latency --models resnet18 --targets 0.5,0.3 \
        --latency-batch 1,64     # accuracy at the latency Torch-Pruning runs at

``--equal-latency`` runs, per model × MACs target × latency batch, the Torch-Pruning row, then
``lrcompress search --target-latency L`` at the latency ratio L that row measures (ONNX Runtime
CPU, 1 thread, that batch), and records both accuracies at both measured latencies
(``benchmarks/_equal_latency.py``; rows in ``RESULTS/PROFILE/equal_latency/``).

Each row runs the real commands (``lrcompress search`` + ``lrcompress export``, or
``benchmarks/tp_baseline.py``) in a child process, then reloads the model here to count its MACs
with FlopCounterMode and time it against the original in ONNX Runtime (same process,
round-robin). Results go to ``benchmarks/results/<profile>/<row>.json`` (one file per row, with
its commands, date, machine and code hash); RUN directories, caches and logs to
``benchmarks/runs/<profile>/`` (git-ignored). Re-running the same command skips rows that are
done with the same budget, data, checkpoint and code, so a killed or partial run is completed by
running it again; ``--force`` re-runs them. Reference checkpoints missing from
``--checkpoints`` are trained first with ``examples/fashion_mnist/train_reference.py`` (the
profile's recipe), unless ``--no-train``.

The Torch-Pruning rows need the benchmark-only extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._equal_latency import EqualLatency, plan_eq_rows  # noqa: E402
from benchmarks._harness import (  # noqa: E402
    REPO,
    BenchError,
    CommandFailed,
    Paths,
    Runner,
    now,
    plan_rows,
)
from benchmarks._profiles import (  # noqa: E402
    DECOMPS,
    FMNIST,
    LR_METHODS,
    METHODS,
    MODELS,
    PROFILES,
    TARGETS,
    TP,
)
from benchmarks.results import render  # noqa: E402

HERE = REPO / "benchmarks"


def _list(text: str, allowed, what: str, conv=str) -> tuple:
    vals = tuple(conv(v.strip()) for v in text.split(",") if v.strip())
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise BenchError(f"--{what} {text!r}: choose from {', '.join(map(str, allowed))} "
                         "(comma-separated).")
    return vals


def _targets(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise BenchError(f"--targets {text!r}: comma-separated ratios, e.g. 0.5,0.3.") from None
    if not all(0 < v < 1 for v in vals):
        raise BenchError(f"--targets {text!r}: every ratio must be strictly between 0 and 1.")
    return vals


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    prof = ap.add_mutually_exclusive_group(required=True)
    prof.add_argument("--quick", action="store_const", const="quick", dest="profile",
                      help="CPU profile (1 thread per run, short budgets, test subset)")
    prof.add_argument("--full", action="store_const", const="full", dest="profile",
                      help="GPU profile (needs CUDA: longer fine-tuning, the whole test set)")
    sel = ap.add_argument_group("what to run (default: everything)")
    sel.add_argument("--models", default=",".join(MODELS), help="default: %(default)s")
    sel.add_argument("--targets", default=",".join(map(str, TARGETS)),
                     help="MACs ratios (default: %(default)s)")
    sel.add_argument("--decomps", default=",".join(DECOMPS), help="default: %(default)s")
    sel.add_argument("--methods", default=",".join(METHODS),
                     help="rank methods and/or torch-pruning (default: %(default)s)")
    paths = ap.add_argument_group("where")
    paths.add_argument("--data", default=FMNIST, help="data spec (default: %(default)s)")
    paths.add_argument("--checkpoints", type=Path, default=REPO / "examples/fashion_mnist/out",
                       help="reference checkpoints: MODEL_fmnist.pt (see benchmarks/_profiles.py) "
                       "(default: %(default)s)")
    paths.add_argument("--work-dir", type=Path,
                       help="RUN dirs, caches, logs (default: benchmarks/runs/PROFILE)")
    paths.add_argument("--results", type=Path, default=HERE / "results",
                       help="results root; rows go to RESULTS/PROFILE/ (default: %(default)s)")
    paths.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md",
                       help="default: %(default)s")
    over = ap.add_argument_group("budget overrides (recorded in every result)")
    over.add_argument("--max-steps", type=int, help="fine-tuning steps")
    over.add_argument("--test-subset", type=int, help="first N test images")
    over.add_argument("--search-iters", type=int, help="rene iterations per search step")
    over.add_argument("--search-warmup", type=int, help="rene weight-only warm-up iterations")
    over.add_argument("--latency-repeats", type=int, dest="lat_repeats")
    over.add_argument("--threads", type=int, help="threads per run (0: all)")
    over.add_argument("--tp-scope", choices=["local", "global"])
    eq = ap.add_argument_group("accuracy at equal measured latency (--equal-latency)")
    eq.add_argument("--equal-latency", action="store_true",
                    help="per model x MACs target x --latency-batch: the Torch-Pruning row, then "
                    "lrcompress search --target-latency at its measured latency ratio "
                    "(--decomps/--methods are not used)")
    eq.add_argument("--latency-batch", default="1",
                    help="batch size(s) the latency is measured at, comma-separated "
                    "(default: %(default)s)")
    eq.add_argument("--eq-decomp", default="tucker2", choices=DECOMPS,
                    help="lrcompress decomposition (default: %(default)s)")
    eq.add_argument("--eq-method", default="rene", choices=LR_METHODS,
                    help="lrcompress rank method (default: %(default)s)")
    eq.add_argument("--eq-narrow-hidden", type=float, default=None, metavar="K",
                    help="also run each row of --eq-narrow-models with lrcompress search "
                    "--narrow-hidden K (hidden widths of inverted-residual blocks narrowed first)")
    eq.add_argument("--eq-narrow-models", default="mobilenetv2",
                    help="the models the --eq-narrow-hidden rows are for (default: %(default)s)")
    eq.add_argument("--eq-rounds", type=int, default=7,
                    help="latency measurements repeated for L and for the final comparison "
                    "(median and range; default: %(default)s)")
    run = ap.add_argument_group("how")
    run.add_argument("--force", action="store_true", help="re-run rows that are already done")
    run.add_argument("--no-train", action="store_true",
                     help="fail (with the command to run) instead of training missing references")
    run.add_argument("--dry-run", action="store_true",
                     help="list the rows, which are done, and an estimate of the time left")
    run.add_argument("--report-only", action="store_true",
                     help="only re-render RESULTS.md and the plot from the JSON")
    run.add_argument("--skip-decompose-bench", action="store_true",
                     help="do not time the 512×512×3×3 decomposition")
    return ap.parse_args(argv)


def decompose_bench(runner: Runner, out_dir: Path) -> None:
    """Decomposition time per factorization for one 512×512×3×3 conv (bench_decompose.py)."""
    path = out_dir / "tool" / "decompose_512.json"
    if path.exists() and json.loads(path.read_text()).get("code") == runner.code \
            and not runner.force:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = runner.paths.work / "decompose_512.raw.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if runner.profile.device == "cuda" else "cpu"
    cmd = ["python", "benchmarks/bench_decompose.py", "--skip-resnet", "--methods",
           ",".join(DECOMPS), "--device", dev, "--json", runner.rel(raw)]
    runner.say(f"timing decompositions of a 512x512x3x3 conv: {runner.shown(cmd)}")
    rec = runner.execute("decompose512", "tool", cmd)
    res = json.loads(raw.read_text())
    path.write_text(json.dumps({"date": now(), "code": runner.code, "command": rec["command"],
                                "device": dev, "rows": res["devices"][dev]["big_layer"],
                                "loadavg": [res["loadavg_before"], res["loadavg_after"]]},
                               indent=1) + "\n")


def dry_run(runner: Runner, rows) -> None:
    """Which rows are done, and the time left estimated from finished rows of the same kind
    (same model, method and decomposition, else same model and method)."""
    done = [json.loads(p.read_text()) for p in runner.paths.results.glob("*.json")]
    walls: dict = {}
    for r in done:
        if r.get("status") == "ok" and r.get("row_wall_s"):
            for k in ((r["model"], r["method"], r["decomp"]), (r["model"], r["method"])):
                walls.setdefault(k, []).append(r["row_wall_s"])
    left, unknown = 0.0, []
    for row in rows:
        old, why = runner.stored(row)
        same = None if row.is_tp else runner.equivalences(row.model, DECOMPS).get(row.decomp)
        if old is not None:
            state = "done"
        elif same:
            state = f"equivalent to {same} (not run)"
        else:
            w = walls.get((row.model.name, row.method, row.decomp)) or walls.get(
                (row.model.name, row.method))
            if w:
                left += statistics.median(w)
                state = f"to run ({why}), ~{statistics.median(w):.0f} s"
            else:
                unknown.append(row.id)
                state = f"to run ({why}), no timing yet"
        print(f"{row.id:42s} {state}")
    print(f"estimated time left: {left / 60:.1f} min"
          + (f" + {len(unknown)} row(s) with no finished row of the same model and method"
             if unknown else ""))


def _batches(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise BenchError(f"--latency-batch {text!r}: comma-separated batch sizes, e.g. 1,64."
                         ) from None
    if not vals or min(vals) < 1:
        raise BenchError(f"--latency-batch {text!r}: every batch size must be 1 or more.")
    return tuple(dict.fromkeys(vals))


def equal_latency(args, runner: Runner, models, targets) -> int:
    """The --equal-latency mode: returns the number of failed rows."""
    if args.eq_rounds < 1:
        raise BenchError(f"--eq-rounds {args.eq_rounds} must be 1 or more.")
    if args.eq_narrow_hidden is not None and not 0 < args.eq_narrow_hidden < 1:
        raise BenchError(f"--eq-narrow-hidden {args.eq_narrow_hidden} must be strictly between "
                         "0 and 1.")
    rows = plan_eq_rows(models, targets, _batches(args.latency_batch), args.eq_decomp,
                        args.eq_method, args.eq_narrow_hidden,
                        tuple(args.eq_narrow_models.split(",")))
    eq = EqualLatency(runner, rounds=args.eq_rounds)
    if args.dry_run:
        for tp in dict.fromkeys(r.tp_row for r in rows):
            print(f"{tp.id:42s} {runner.stored(tp)[1]}")
            done = json.loads(runner.result_path(tp.id).read_text()) \
                if runner.result_path(tp.id).exists() else None
            for r in rows:
                if r.tp_row == tp:
                    print(f"  {r.id:48s} "
                          f"{eq.stored(r, done)[1] if done else 'to run (after its TP row)'}")
        return 0
    print(f"equal latency: {len(rows)} rows ({args.eq_method}/{args.eq_decomp}); results in "
          f"{runner.rel(runner.paths.results)}", flush=True)
    return sum(r["status"] != "ok" for r in eq.run(rows))


def main(argv=None) -> int:
    args = parse_args(argv)
    base = PROFILES[args.profile]
    profile = base.with_overrides(max_steps=args.max_steps, test_subset=args.test_subset,
                                  search_iters=args.search_iters,
                                  search_warmup=args.search_warmup, lat_repeats=args.lat_repeats,
                                  threads=args.threads, tp_scope=args.tp_scope)
    results_dir = args.results / profile.name
    if args.report_only:
        print(f"wrote {render(args.results, args.results_md)}")
        return 0
    if profile.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BenchError("--full is the GPU profile and no CUDA device is available here. "
                             "Use --quick on a CPU machine.")
    methods = _list(",".join(TP if m.strip() == "tp" else m for m in args.methods.split(",")),
                    METHODS, "methods")
    if args.equal_latency:
        methods = (TP,)  # the lrcompress rows are --eq-method/--eq-decomp latency targets
    if TP in methods:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            raise BenchError("The Torch-Pruning rows need the torch-pruning package (a "
                             "benchmark-only extra): pip install -e '.[bench]', or leave "
                             f"{TP} out of --methods.") from None
    models = [MODELS[m] for m in _list(args.models, list(MODELS), "models")]
    rows = plan_rows(models, _targets(args.targets), _list(args.decomps, DECOMPS, "decomps"),
                     methods)
    work = args.work_dir or HERE / "runs" / profile.name
    if args.equal_latency:
        work, results_dir = work / "equal_latency", results_dir / "equal_latency"
    runner = Runner(profile, Paths(args.checkpoints.resolve(), work.resolve(),
                                   results_dir.resolve()), args.data, force=args.force,
                    train_missing=not args.no_train, say=lambda s: print(s, flush=True))
    runner.paths.results.mkdir(parents=True, exist_ok=True)
    if args.equal_latency:
        return _run_equal_latency(args, runner, models)
    if args.dry_run:
        dry_run(runner, rows)
        return 0
    import torch

    if profile.threads:
        torch.set_num_threads(profile.threads)
    print(f"{profile.name} profile: {len(rows)} rows; results in {runner.rel(results_dir)}, "
          f"runs in {runner.rel(work)}", flush=True)

    def job() -> int:
        failed = 0
        if profile.decompose_bench and not args.skip_decompose_bench:
            try:
                decompose_bench(runner, results_dir)
            except CommandFailed as e:
                failed += 1
                print(f"decomposition timing {e}", flush=True)
        return failed + sum(res["status"] == "failed" for res in runner.run(rows))

    return _run_and_render(args, runner, job)


def _run_and_render(args, runner: Runner, job) -> int:
    """Run ``job`` (it returns the number of failed rows), then render RESULTS.md whatever
    happened; the exit code is 1 when a row failed."""
    t0 = time.perf_counter()
    failed = 0
    try:
        failed = job()
    finally:
        md = render(args.results, args.results_md)
        print(f"wrote {runner.rel(md)} ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    if failed:
        print(f"{failed} row(s) failed: see their logs; re-run the same command to retry them.")
    return 1 if failed else 0


def _run_equal_latency(args, runner: Runner, models) -> int:
    targets = _targets(args.targets)
    if args.dry_run:
        return equal_latency(args, runner, models, targets)
    import torch

    if runner.profile.threads:
        torch.set_num_threads(runner.profile.threads)
    return _run_and_render(args, runner, lambda: equal_latency(args, runner, models, targets))


def cli(argv=None) -> int:
    try:
        return main(argv)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
