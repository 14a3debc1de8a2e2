"""Latency targets: measured candidate costs for the rank problem, and the whole-model check.

A latency target ``--target-latency R`` asks for a compressed model whose *measured* latency on
one engine (ONNX Runtime or PyTorch, CPU or CUDA, at a thread count and batch size) is at most
``R ×`` the original's. The rank methods solve it like a MACs target, with each candidate's cost
its measured standalone time (:class:`~lrcompress.measure.latency_table.LatencyTable`) and the
budget ``R ×`` the original model measured whole. The sum of layer times is only a model of the
whole graph, so the result is measured whole against the original (round-robin), and when it
misses the target by more than the measurement's spread the problem is re-solved with the
budget corrected by the measured/estimated factor (:func:`corrected_ratio`), up to
``max_resolves`` times.

Measuring goes through two functions tests replace with deterministic fakes:
:func:`make_table` (the per-candidate timer) and :func:`measure_whole` (whole models).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from lrcompress.errors import UserError
from lrcompress.measure.latency_table import (
    LatencyTable,
    measure_model_runs,
    snap_options,
)
from lrcompress.measure.layer_timing import ENGINES, Engine, summarize

REL_TOL = 0.03  # snapping: times within 3 % (or the IQR) are one latency step


@dataclass(frozen=True)
class LatencyConfig:
    """Where and how latency targets are measured."""

    engine: str = "ort-cpu"  # ort-cpu | torch-cpu | ort-cuda | torch-cuda
    threads: int = 1  # intra-op threads (0: all cores)
    batch: int = 1
    repeats: int = 20  # timed runs per measurement (median)
    warmup: int = 5
    max_resolves: int = 3  # re-solves with corrected costs when the whole model misses
    strict: bool = False  # a target still missed after the re-solves is an error (exit 2)
    aware: bool = False  # MACs/params targets: drop candidates slow for their cost, report speed

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise UserError(f"Unknown --latency-engine {self.engine!r}: use one of "
                            f"{', '.join(ENGINES)}.")
        if self.threads < 0 or self.batch < 1:
            raise UserError(f"--latency-threads {self.threads} must be >= 0 (0: all cores) and "
                            f"--latency-batch {self.batch} >= 1.")
        if self.repeats < 5 or self.warmup < 0:
            raise UserError(f"latency repeats {self.repeats} must be >= 5 (20 or more for a "
                            "target worth trusting) and warmup >= 0.")
        if self.max_resolves < 0:
            raise UserError(f"max_resolves {self.max_resolves} must be >= 0.")

    def engine_spec(self) -> Engine:
        return Engine(self.engine, self.threads, self.batch)

    def to_dict(self) -> dict:
        return asdict(self)


MIN_PAIRED = 5  # paired rounds needed for the paired spread (else the single runs' IQRs)


@dataclass(frozen=True)
class WholeTiming:
    """Original and compressed model measured whole, round-robin, on one engine (ms);
    ``paired``: compressed / original of each round (the two runs of a round are adjacent in
    time, so machine-wide slow-downs cancel), when the runs were kept."""

    original_ms: float
    compressed_ms: float
    original_iqr_ms: float
    compressed_iqr_ms: float
    paired: tuple[float, ...] = ()

    @property
    def ratio(self) -> float:
        return self.compressed_ms / self.original_ms

    @property
    def spread(self) -> float:
        """How far the measured ratio may sit from the truth by noise alone. From the paired
        per-round ratios (at least :data:`MIN_PAIRED` of them): twice the standard error of
        their median, ``2 · 1.2533 · σ/√n`` with σ from their inter-quartile range (IQR/1.349).
        Otherwise half the single runs' inter-quartile ranges propagated to the ratio (relative
        errors added in quadrature) — the spread of one run, several times wider than the
        uncertainty of a median of 20 (at batch 1, 0.068 where the paired figure was 0.02)."""
        if len(self.paired) >= MIN_PAIRED:
            q = statistics.quantiles(self.paired, n=4)
            sigma = (q[2] - q[0]) / 1.349
            return 2 * 1.2533 * sigma / math.sqrt(len(self.paired))
        a = self.original_iqr_ms / (2 * self.original_ms)
        b = self.compressed_iqr_ms / (2 * self.compressed_ms)
        return self.ratio * math.hypot(a, b)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "paired"}
        return {**d, "ratio": round(self.ratio, 4), "spread": round(self.spread, 4),
                "paired_rounds": len(self.paired)}


def speedup_ratio(speedup) -> float:
    """--target-speedup S as the latency ratio 1/S (S must be a number above 1)."""
    if not isinstance(speedup, (int, float)) or not math.isfinite(speedup) or speedup <= 1:
        raise UserError(f"--target-speedup {speedup} must be a number above 1 (the measured "
                        "original latency over the compressed one, e.g. 2.5).")
    return 1.0 / speedup


def check_engine(cfg: LatencyConfig) -> Engine:
    """The engine, refused (UserError) when it cannot run here (CUDA without a GPU, ...)."""
    engine = cfg.engine_spec()
    engine.check_available()
    return engine


def make_table(cfg: LatencyConfig, cache_dir=None) -> LatencyTable:
    """The candidate latency table of ``cfg``'s engine (cached under ``cache_dir/latency``, or
    the user cache ``~/.cache/lrcompress/latency``)."""
    folder = None if cache_dir is None else Path(cache_dir) / "latency"
    return LatencyTable(cfg.engine_spec(), cache_dir=folder, repeats=cfg.repeats,
                        warmup=cfg.warmup)


def measure_whole(original: nn.Module, compressed: nn.Module | None, input_size,
                  cfg: LatencyConfig) -> WholeTiming:
    """Both models timed together (round-robin) on the engine; ``compressed=None`` times the
    original alone (``compressed_ms`` then repeats it)."""
    models = {"original": original}
    if compressed is not None:
        models["compressed"] = compressed
    runs = measure_model_runs(models, input_size, cfg.engine_spec(), cfg.repeats, cfg.warmup)
    o = runs["original"]
    c = runs["compressed" if compressed is not None else "original"]
    paired = tuple(b / a for a, b in zip(o, c) if a > 0) if compressed is not None else ()
    to, tc = summarize(o), summarize(c)
    return WholeTiming(to.median_ms, tc.median_ms, to.iqr_ms, tc.iqr_ms, paired)


def option_times(layers, table: LatencyTable, snap: bool, keep_smallest: bool = False
                 ) -> tuple[list[list], dict]:
    """Per layer, its options with their measured time (``Option.latency`` set, dense last);
    with ``snap``, only the top rank of each latency step and nothing slower than dense (plus
    each factorization's smallest rank with ``keep_smallest``: see :func:`snap_options`).
    Returns (options per layer, summary counts)."""
    out, offered, kept = [], 0, 0
    for lo in layers:
        opts = (snap_options(lo.spec, lo.options, table, REL_TOL, keep_smallest) if snap
                else list(lo.options))
        times = table.layer_times(lo.spec, opts)
        dense = times[opts[-1]]
        timed = [o.with_latency(times[o]) for o in opts]
        if snap:  # never offer a chain that is not faster than the dense layer
            timed = [o for o in timed[:-1] if o.latency < dense] + [timed[-1]]
        offered += len(lo.options)
        kept += len(timed)
        out.append(timed)
    return out, {"options_offered": offered, "options_kept": kept, **table.counts(),
                 "cache": str(table.cache_path)}


def corrected_ratio(target: float, estimated: float, measured: float, current: float) -> float:
    """The budget ratio for the next solve. The additive model predicted a latency ratio
    ``estimated`` for a plan that measured ``measured``: only a share
    s = (1 − measured)/(1 − estimated) of the predicted saving was real. Assuming the same share
    on the next plan, reaching ``target`` needs a predicted ratio of 1 − (1 − target)/s. When s
    is not usable (no predicted saving, or none realised) the ratio solved at (``current``) is
    scaled by target/measured instead. The result may be ≤ 0: no plan reaches the target."""
    if 0 < estimated < 1 and measured < 1:
        share = (1 - measured) / (1 - estimated)
        return 1 - (1 - target) / share
    if measured <= 0 or estimated <= 0:
        return current
    return current * target / measured


def next_budget(target: float, estimated: float, measured: float, current: float,
                floor: float) -> float | None:
    """The budget ratio for the next solve after a miss, or None when none can help.

    The secant of :func:`corrected_ratio`; when that is ≤ 0 (the additive model's scale is off:
    at batch 1 the standalone graphs' per-run overhead can outweigh the rest of the graph, so
    its estimates and even its ``floor`` run low) the ratio solved at is scaled by
    target/measured instead. A budget at or below ``floor`` (the fastest plan's estimate)
    becomes one last try at the floor, unless that was the budget just solved or the floor is
    not a ratio."""
    wanted = corrected_ratio(target, estimated, measured, current)
    if wanted <= 0 and measured > 0:
        wanted = current * target / measured
    if wanted > floor:
        return wanted
    if floor <= 0 or current <= floor * (1 + 1e-9):
        return None
    return floor * (1 + 1e-9)
