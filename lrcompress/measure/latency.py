"""Measured speed: latency of models in ONNX Runtime and PyTorch eager, in the same process.

Every configuration (engine, device, threads, batch) times all the models it compares in
round-robin — one run of each per repeat, the order rotating — so that drift on a shared machine
hits them alike; the figure is the median of ``repeats`` timed runs after ``warmup`` untimed ones.
Absolute times on shared CPUs are noisy: the ratios measured in one run are the figures to quote
(benchmarks.md). The ideal speed-up is the MACs ratio; ``achieved_over_ideal`` says how much of it
is real.

ONNX Runtime and PyTorch are timed at each thread count of ``threads`` (0: all cores).
The per-layer table times, in PyTorch eager on one CPU thread, each planned layer's dense module
against its factorized chain on a random input of the layer's input shape
``(batch, in_ch, *in_hw)`` (``(batch, tokens, in_features)`` for a linear layer), and flags the
layers where the chain is slower than the layer it replaced. One thread, because multi-threaded
timings of small layers on a shared machine are dominated by thread wake-ups (seen: 0.6 ms at 1
thread, 600 ms at 2 on a loaded 2-core box).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from lrcompress.errors import UserError
from lrcompress.factorizations import is_matrix
from lrcompress.model.costs import dense_macs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyConfig:
    repeats: int = 20  # timed runs per configuration; the median is reported
    warmup: int = 5  # untimed runs first (allocation, caches, thread pools)
    batches: tuple[int, ...] = (1, 64)  # batch sizes to time
    threads: tuple[int, ...] = (1, 0)  # intra-op threads (ORT and torch); 0: all cores
    onnxruntime: bool = True  # time ONNX Runtime (CPU, and CUDA when a GPU build is present)
    torch: bool = True  # time PyTorch eager (CPU, and CUDA when available)
    per_layer: bool = True  # the per-layer dense-vs-factorized table (compressed models)
    slower_margin: float = 0.05  # a layer is "slower" when its speed-up < 1 − margin (noise)
    keep_times: bool = False  # each row also holds every timed run (``times_ms``, run order)

    def __post_init__(self):
        if self.repeats < 1:
            raise UserError(f"--repeats {self.repeats} must be >= 1 (20 or more for figures "
                            "worth quoting).")
        if self.warmup < 0:
            raise UserError(f"--warmup {self.warmup} must be >= 0.")
        if not self.batches or min(self.batches) < 1:
            raise UserError(f"batch sizes {self.batches} must be positive, e.g. 1,64.")
        if not self.threads or min(self.threads) < 0:
            raise UserError(f"thread counts {self.threads} must be >= 0 (0: all cores).")
        if not 0 <= self.slower_margin < 1:
            raise UserError(f"slower_margin {self.slower_margin} must be in [0, 1).")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Timing:
    """Median and inter-quartile range of the timed runs, in milliseconds."""

    median_ms: float
    iqr_ms: float = 0.0


def summarize(times_ms: Sequence[float]) -> Timing:
    """Median and IQR (0 for a single run) of timed runs."""
    q = statistics.quantiles(times_ms, n=4) if len(times_ms) > 1 else [times_ms[0]] * 3
    return Timing(statistics.median(times_ms), q[2] - q[0])


def round_robin_times(fns: Sequence[Callable[[], object]], repeats: int, warmup: int,
                      sync: Callable[[], None] | None = None,
                      clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Each function run ``warmup`` times untimed, then ``repeats`` times timed, interleaved (one
    run of each per repeat, starting one further along each time): every run's milliseconds,
    per function. ``clock`` is in seconds."""
    n = len(fns)
    for _ in range(warmup):
        for f in fns:
            f()
    if sync:
        sync()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for j in range(n):
            k = (r + j) % n
            t0 = clock()
            fns[k]()
            if sync:
                sync()
            times[k].append((clock() - t0) * 1e3)
    return times


def _time_round_robin(fns: dict[str, Callable[[], object]], cfg: LatencyConfig,
                      sync: Callable[[], None] | None = None) -> dict[str, dict]:
    """{name: {median_ms, iqr_ms, times_ms}}: every function timed ``repeats`` times,
    interleaved (:func:`round_robin_times`)."""
    names = list(fns)
    out = {}
    for n, ts in zip(names, round_robin_times([fns[n] for n in names], cfg.repeats, cfg.warmup,
                                              sync)):
        t = summarize(ts)
        out[n] = {"median_ms": round(t.median_ms, 4), "iqr_ms": round(t.iqr_ms, 4),
                  "times_ms": ts}
    return out


@contextlib.contextmanager
def torch_threads(n: int):
    """PyTorch's intra-op thread count set to ``n`` for the block, then restored."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return None


def _torch_fn(model: nn.Module, x: torch.Tensor):
    def f():
        with torch.inference_mode():
            return model(x)
    return f


def _ort_fn(sess, x: np.ndarray):
    from lrcompress.deploy.onnx import INPUT_NAME

    return lambda: sess.run(None, {INPUT_NAME: x})


def measure(models: dict[str, nn.Module], input_size, cfg: LatencyConfig,
            onnx_models: dict[str, bytes] | None = None, progress=None) -> dict:
    """Latency rows for each configuration, all ``models`` timed together in each.

    ``onnx_models`` are dynamic-batch graphs of the same models (needed for ONNX Runtime).
    Returns ``{"runs": [...], "notes": [...]}``; a run row holds engine, device, threads, batch,
    and per-model ``median_ms`` / ``iqr_ms``.
    """
    tick = progress or (lambda *_: None)
    runs, notes = [], []
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, *input_size, generator=gen) for b in cfg.batches}
    ncpu = cpu_count()

    def row(engine, device, threads, batch, stats):
        runs.append({"engine": engine, "device": device, "threads": threads,
                     "all_threads": threads == ncpu if device == "cpu" else None, "batch": batch,
                     "median_ms": {n: s["median_ms"] for n, s in stats.items()},
                     "iqr_ms": {n: s["iqr_ms"] for n, s in stats.items()}})
        if cfg.keep_times:
            runs[-1]["times_ms"] = {n: s["times_ms"] for n, s in stats.items()}
        tick()

    if cfg.onnxruntime and onnx_models:
        import onnxruntime as ort

        from lrcompress.deploy.onnx import GPU_HINT, ort_session

        for t in cfg.threads:
            threads = t or ncpu
            sess = {n: ort_session(b, threads=threads) for n, b in onnx_models.items()}
            for b in cfg.batches:
                x = inputs[b].numpy()
                row("onnxruntime", "cpu", threads, b,
                    _time_round_robin({n: _ort_fn(s, x) for n, s in sess.items()}, cfg))
        if torch.cuda.is_available():
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                notes.append("ONNX Runtime on CUDA not measured: the installed onnxruntime has "
                             "no CUDAExecutionProvider. " + GPU_HINT)
            else:
                try:
                    sess = {n: ort_session(b, device="cuda") for n, b in onnx_models.items()}
                except UserError as e:  # the CUDA provider failed to start: say so, keep going
                    notes.append(str(e))
                else:
                    for b in cfg.batches:
                        x = inputs[b].numpy()
                        row("onnxruntime", "cuda", None, b,
                            _time_round_robin({n: _ort_fn(s, x) for n, s in sess.items()}, cfg))
    if cfg.torch:
        for t in cfg.threads:
            threads = t or ncpu
            with torch_threads(threads):
                for b in cfg.batches:
                    fns = {n: _torch_fn(m.eval(), inputs[b]) for n, m in models.items()}
                    row("torch", "cpu", threads, b, _time_round_robin(fns, cfg))
        if torch.cuda.is_available():
            gpu = {n: copy.deepcopy(m).cuda().eval() for n, m in models.items()}
            for b in cfg.batches:
                x = inputs[b].cuda()
                fns = {n: _torch_fn(m, x) for n, m in gpu.items()}
                row("torch", "cuda", None, b,
                    _time_round_robin(fns, cfg, sync=torch.cuda.synchronize))
    load = _load_average()
    multi = any((t or ncpu) > 1 for t in cfg.threads)
    if multi and load is not None and load > ncpu:
        notes.append(f"The machine was busy (load average {load:.1f} on {ncpu} core(s)): "
                     "multi-threaded figures are unreliable; compare the 1-thread rows.")
    return {"runs": runs, "notes": notes}


def compare(original: nn.Module, compressed: nn.Module, input_size, cfg: LatencyConfig, *,
            ideal_speedup: float, onnx_models: dict[str, bytes] | None = None, plan=None,
            progress=None) -> dict:
    """Original vs compressed: measured speed-up next to the ideal (MACs ratio), per config,
    and (with ``plan``) the per-layer table. Slower factorized layers become warnings."""
    res = measure({"original": original, "compressed": compressed}, input_size, cfg,
                  onnx_models, progress)
    for r in res["runs"]:
        m = r["median_ms"]
        r["speedup"] = round(m["original"] / m["compressed"], 4)
        r["achieved_over_ideal"] = round(r["speedup"] / ideal_speedup, 4)
    layers = []
    if cfg.per_layer and plan is not None:
        with torch_threads(1):
            layers = layer_table(original, compressed, plan, cfg, progress)
    warnings = slower_layer_warnings(layers)
    summary = slower_summary(layers)
    if summary:
        log.warning("%s", summary)  # once, not a line per layer: the report has each one
    return {"config": cfg.to_dict(), "ideal_speedup": round(ideal_speedup, 4),
            "cpu_count": cpu_count(), "torch_threads": torch.get_num_threads(),
            "runs": res["runs"], "layers": layers, "warnings": warnings, "notes": res["notes"]}


def slower_layer_warnings(layers: list[dict]) -> list[str]:
    """One warning per factorized layer that is slower than its dense layer at some batch."""
    by_name: dict[str, list[dict]] = {}
    for r in layers:
        if r["slower"]:
            by_name.setdefault(r["name"], []).append(r)
    out = []
    for name, rows in by_name.items():
        r0 = rows[0]
        at = "; ".join(f"batch {r['batch']}: {r['factorized_ms']:.3f} vs {r['dense_ms']:.3f} ms"
                       for r in rows)
        rank = "x".join(map(str, r0["rank"])) if isinstance(r0["rank"], list) else r0["rank"]
        out.append(f"{name} ({r0['factorization']} rank {rank}) is slower than the dense layer "
                   f"it replaced ({at}; ideal speed-up {r0['ideal_speedup']:.2f}x). Consider "
                   f"--exclude {name} or a larger --rank-multiple.")
    return out


def slower_summary(layers: list[dict], worst: int = 3) -> str | None:
    """One sentence on the factorized layers slower than their dense layer: how many, and the
    ``worst`` few by speed-up (None when none is)."""
    slowest: dict[str, dict] = {}
    for r in layers:
        if r["slower"] and (r["name"] not in slowest
                            or r["speedup"] < slowest[r["name"]]["speedup"]):
            slowest[r["name"]] = r
    if not slowest:
        return None
    top = sorted(slowest.values(), key=lambda r: r["speedup"])[:worst]
    what = ", ".join(
        f"{r['name']} ({r.get('chain', r['factorization'])} rank "
        f"{'x'.join(map(str, r['rank'])) if isinstance(r['rank'], list) else r['rank']}: "
        f"{r['speedup']:.2f}x at batch {r['batch']})" for r in top)
    total = len({r["name"] for r in layers})
    return (f"{len(slowest)} of {total} factorized layers run slower than the dense layer they "
            f"replaced (PyTorch eager, 1 CPU thread); the slowest: {what}. Consider --exclude "
            "for them or a larger --rank-multiple; the per-layer table has every one.")


def layer_input(spec, batch: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*spec.input_shape(batch), generator=gen)


def layer_table(original: nn.Module, compressed: nn.Module, plan, cfg: LatencyConfig,
                progress=None) -> list[dict]:
    """Per planned layer and batch size: dense module vs factorized chain, PyTorch eager (CPU,
    at the caller's thread count; :func:`compare` uses one thread, the stable figure)."""
    tick = progress or (lambda *_: None)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for lp in plan.layers:
        dense = original.get_submodule(lp.name).eval()
        chain = compressed.get_submodule(lp.name).eval()
        ideal = dense_macs(lp.spec) / max(lp.macs, 1)
        for b in cfg.batches:
            x = layer_input(lp.spec, b, gen)
            st = _time_round_robin({"dense": _torch_fn(dense, x),
                                    "factorized": _torch_fn(chain, x)}, cfg)
            d, f = st["dense"]["median_ms"], st["factorized"]["median_ms"]
            speedup = d / f if f > 0 else float("inf")
            rows.append({"name": lp.name, "factorization": lp.factorization,
                         "chain": "svd" if is_matrix(lp.spec) else lp.factorization,
                         "rank": list(lp.rank) if isinstance(lp.rank, tuple) else lp.rank,
                         "batch": b, "dense_ms": d, "factorized_ms": f,
                         "speedup": round(speedup, 4), "ideal_speedup": round(ideal, 4),
                         "slower": speedup < 1 - cfg.slower_margin})
        tick()
    return rows
