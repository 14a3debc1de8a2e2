"""The candidate latency table: measured per-layer latencies of every (factorization, rank), cached.

``LatencyTable(engine)`` answers "how long does this layer take as candidate c?" for the options of
:func:`lrcompress.rank.problem.layer_options` (dense included), measuring lazily — only what is
asked for and not already known — with :class:`lrcompress.measure.layer_timing.MeasuringTimer`
(or any injected timer), and remembering every answer on disk.

Cache: JSON files under ``cache_dir``, else ``$LRCOMPRESS_CACHE_DIR/latency``, else
``$XDG_CACHE_HOME/lrcompress/latency`` (``~/.cache/lrcompress/latency``). One file per *machine
fingerprint* — engine, threads, batch, the runtime's version (onnxruntime or torch), the CPU model
(``/proc/cpuinfo``) or GPU name and the graph-builder schema — named ``ENGINE-HASH.json``. Inside,
entries are keyed by the layer's shape (kind, in/out channels, kernel, stride, padding, dilation,
groups, bias, input size) and the candidate (factorization and normalised rank; ``svd`` for every
method on a linear or 1×1 layer, whose chains are identical). An entry measured with fewer
``repeats`` than asked for is measured again. Writes re-read the file, merge and replace it
atomically (temporary file + ``os.replace``), so concurrent runs lose nothing worse than a
duplicate measurement.

Also here: the additive whole-model estimate and its correction factor (:func:`check_additive`)
and rank snapping to latency steps (:func:`snap_ranks`, :func:`snap_options`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lrcompress.errors import UserError
from lrcompress.factorizations import get_factorization
from lrcompress.measure.layer_timing import (
    DENSE,
    Candidate,
    Engine,
    MeasuringTimer,
    Timing,
    as_candidate,
    summarize,
)
from lrcompress.model.layers import LayerSpec

__all__ = [
    "AdditiveCheck", "Candidate", "Engine", "LatencyTable", "MeasuringTimer", "Timing",
    "additive_estimate", "check_additive", "default_cache_dir", "measure_model_runs",
    "measure_model_timings", "measure_models", "rest_of_graph_ms", "snap_options", "snap_ranks",
]

log = logging.getLogger(__name__)

CACHE_SCHEMA = 1  # bump when what is timed for a key changes (graph builder, session settings)


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$LRCOMPRESS_CACHE_DIR/latency``, else ``$XDG_CACHE_HOME/lrcompress/latency``, else
    ``~/.cache/lrcompress/latency``."""
    root = os.environ.get("LRCOMPRESS_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "latency"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "lrcompress" / "latency"


def cpu_model() -> str:
    """The CPU's "model name" from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def hardware_name(engine: Engine) -> str:
    if engine.device == "cpu":
        return cpu_model()
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown-cuda-gpu"


def fingerprint(engine: Engine) -> dict:
    """Everything that decides a measurement besides the layer and the candidate."""
    if engine.runtime == "ort":
        import onnxruntime

        runtime = f"onnxruntime {onnxruntime.__version__}"
    else:
        runtime = f"torch {torch.__version__}"
    return {"schema": CACHE_SCHEMA, "engine": engine.name, "threads": engine.threads,
            "batch": engine.batch, "runtime": runtime, "hardware": hardware_name(engine)}


def layer_key(spec: LayerSpec) -> str:
    """The layer's shape, as a readable string (the name is left out: same shape, same time)."""
    p = lambda t: "x".join(map(str, t))
    return (f"{spec.kind}|{spec.in_ch}>{spec.out_ch}|k{p(spec.kernel)}|s{p(spec.stride)}"
            f"|p{p(spec.padding)}|d{p(spec.dilation)}|g{spec.groups}|b{int(spec.bias)}"
            f"|in{p(spec.in_hw)}" + (f"|c{spec.copies}" if spec.copies != 1 else ""))


def candidate_key(spec: LayerSpec, cand: Candidate) -> str:
    """``dense``, or ``METHOD:RANK`` with the rank as the chain gets it (``rank_from``)."""
    if cand.factorization == DENSE:
        return DENSE
    fact = get_factorization(cand.factorization)
    rank = fact.rank_from(spec, cand.rank)
    method = "svd" if spec.kind == "linear" or tuple(spec.kernel) == (1, 1) else fact.name
    return f"{method}:{'x'.join(map(str, rank)) if isinstance(rank, tuple) else rank}"


# ---------------------------------------------------------------------------------------------
# the disk cache
# ---------------------------------------------------------------------------------------------


class _Cache:
    """One JSON file: ``{"fingerprint": ..., "layers": {layer_key: {cand_key: entry}}}``."""

    def __init__(self, folder: Path, print_: dict):
        digest = hashlib.sha256(json.dumps(print_, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(folder) / f"{print_['engine']}-{digest}.json"
        self.fingerprint = print_
        self.layers: dict[str, dict[str, dict]] = self._read()
        self.writable = True

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("Ignoring unreadable latency cache %s (%s); it will be rewritten.",
                        self.path, e)
            return {}
        if not isinstance(data, dict) or data.get("fingerprint") != self.fingerprint:
            return {}
        layers = data.get("layers")
        return layers if isinstance(layers, dict) else {}

    def get(self, lkey: str, ckey: str) -> dict | None:
        return self.layers.get(lkey, {}).get(ckey)

    def put(self, lkey: str, entries: dict[str, dict]) -> None:
        """Store entries: re-read the file, merge (ours win), replace it atomically."""
        merged = self._read()
        for k, v in self.layers.items():
            merged.setdefault(k, {}).update(v)
        merged.setdefault(lkey, {}).update(entries)
        self.layers = merged
        if self.writable:
            self._write({"fingerprint": self.fingerprint, "layers": merged})

    def _write(self, data: dict) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                       dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as e:
            self.writable = False
            log.warning("Cannot write the latency cache %s (%s): measurements are kept for this "
                        "run only. Pass another cache_dir or set LRCOMPRESS_CACHE_DIR.",
                        self.path, e)


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------


class LatencyTable:
    """Measured latency (ms) of each layer candidate on one engine, measured lazily and cached.

    ``timer(spec, candidates) -> [Timing or ms]`` does the measuring (default: a
    :class:`MeasuringTimer` with ``repeats``/``warmup``); the engine's availability is checked
    only when the real timer is used. ``measured`` and ``cached`` count candidates timed by this
    table and candidates answered without timing (from disk or from earlier calls).
    """

    def __init__(self, engine: Engine | str = "ort-cpu", cache_dir=None, timer=None,
                 repeats: int = 20, warmup: int = 5):
        self.engine = Engine(engine) if isinstance(engine, str) else engine
        if repeats < 1 or warmup < 0:
            raise UserError(f"repeats {repeats} must be >= 1 and warmup {warmup} >= 0.")
        if timer is None:
            self.engine.check_available()
            timer = MeasuringTimer(self.engine, repeats, warmup)
        self.timer, self.repeats, self.warmup = timer, repeats, warmup
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self._cache = _Cache(folder, fingerprint(self.engine))
        self.measured = 0
        self.cached = 0

    @property
    def cache_path(self) -> Path:
        return self._cache.path

    def counts(self) -> dict[str, int]:
        """``{"measured": n, "cached": m}`` for reports."""
        return {"measured": self.measured, "cached": self.cached}

    def layer_timings(self, spec: LayerSpec, options: Iterable) -> dict:
        """``{option: Timing}`` for each option (an ``Option``, ``Candidate``, ``(method,
        rank)`` or ``"dense"``); only options not known yet are timed, together, round-robin."""
        options = list(options)
        keys = {o: candidate_key(spec, as_candidate(o)) for o in options}
        lkey = layer_key(spec)
        known: dict[str, Timing] = {}
        missing: dict[str, Candidate] = {}
        for o, k in keys.items():
            e = self._cache.get(lkey, k)
            if e is not None and e.get("repeats", 0) >= self.repeats:
                known[k] = Timing(e["median_ms"], e.get("iqr_ms", 0.0))
            elif k not in missing:
                missing[k] = as_candidate(o)
        self.cached += len(keys) - len(missing)
        if missing:
            known.update(self._measure(spec, lkey, missing))
        return {o: known[k] for o, k in keys.items()}

    def layer_times(self, spec: LayerSpec, options: Iterable) -> dict:
        """``{option: median ms}``; see :meth:`layer_timings`."""
        return {o: t.median_ms for o, t in self.layer_timings(spec, options).items()}

    def dense_time(self, spec: LayerSpec) -> float:
        """Median ms of the layer as it is."""
        return self.layer_times(spec, [DENSE])[DENSE]

    def time_of(self, spec: LayerSpec, candidate) -> float:
        """Median ms of one candidate (anything :meth:`layer_timings` accepts)."""
        return self.layer_times(spec, [candidate])[candidate]

    def _measure(self, spec: LayerSpec, lkey: str, missing: dict[str, Candidate]) -> dict:
        raw = self.timer(spec, list(missing.values()))
        out = {k: t if isinstance(t, Timing) else Timing(float(t)) for k, t in zip(missing, raw)}
        if len(out) != len(missing):
            raise ValueError(f"the timer returned {len(raw)} timings for {len(missing)} "
                             "candidates")
        self.measured += len(out)
        self._cache.put(lkey, {k: {**asdict(t), "repeats": self.repeats, "warmup": self.warmup}
                               for k, t in out.items()})
        return out


# ---------------------------------------------------------------------------------------------
# the additive whole-model estimate
# ---------------------------------------------------------------------------------------------


def _choice_map(choices) -> dict[str, Candidate]:
    """Layer name -> candidate, from a ``Plan`` (its ``layers``) or a mapping of name to
    anything :func:`as_candidate` takes."""
    if hasattr(choices, "layers"):
        return {lp.name: Candidate(lp.factorization, lp.rank) for lp in choices.layers}
    return {name: as_candidate(c) for name, c in dict(choices).items()}


def additive_estimate(specs: Sequence[LayerSpec], choices, table: LatencyTable,
                      rest_ms: float = 0.0) -> float:
    """Σ over ``specs`` of the chosen candidate's time (dense for a layer ``choices`` does not
    name) + ``rest_ms``, the time of everything that is not one of these layers."""
    chosen = _choice_map(choices)
    unknown = sorted(set(chosen) - {s.name for s in specs})
    if unknown:
        raise ValueError(f"choices name layers that are not in specs: {unknown[:5]}")
    return rest_ms + sum(table.time_of(s, chosen.get(s.name, Candidate(DENSE))) for s in specs)


def rest_of_graph_ms(original_ms: float, specs: Sequence[LayerSpec], table: LatencyTable) -> float:
    """Measured whole original model − Σ dense layer times over ``specs``: what the additive model
    adds for everything else (activations, norms, pooling, other layers, per-run overhead). It
    can be negative when the standalone graphs' per-run overhead outweighs the rest."""
    return original_ms - sum(table.dense_time(s) for s in specs)


@dataclass(frozen=True)
class AdditiveCheck:
    """The additive model against measured whole-model times (all in ms).

    ``estimate_ms`` = Σ chosen layer times + ``rest_ms``; ``factor`` = ``compressed_ms /
    estimate_ms`` (multiply an estimate by it to match the measurement); ``rel_error`` =
    ``(estimate_ms − compressed_ms) / compressed_ms`` (positive: the model overestimates). By
    construction the estimate of the original model is exact."""

    original_ms: float
    compressed_ms: float
    dense_layers_ms: float
    rest_ms: float
    estimate_ms: float
    factor: float
    rel_error: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_additive(specs: Sequence[LayerSpec], choices, table: LatencyTable, original_ms: float,
                   compressed_ms: float) -> AdditiveCheck:
    """Fit the rest-of-graph time on the original model and test the additive model on the
    compressed one (see :class:`AdditiveCheck`). Times can come from :func:`measure_models`."""
    if original_ms <= 0 or compressed_ms <= 0:
        raise ValueError(f"measured times must be > 0, got {original_ms} and {compressed_ms}")
    rest = rest_of_graph_ms(original_ms, specs, table)
    est = additive_estimate(specs, choices, table, rest)
    return AdditiveCheck(original_ms, compressed_ms, original_ms - rest, rest, est,
                         compressed_ms / est if est > 0 else float("inf"),
                         (est - compressed_ms) / compressed_ms)


def measure_model_timings(models: Mapping[str, torch.nn.Module], input_size, engine: Engine,
                          repeats: int = 20, warmup: int = 5) -> dict[str, Timing]:
    """Whole-model median and IQR (ms) of each model on ``engine`` (:func:`measure_model_runs`)."""
    return {n: summarize(ts)
            for n, ts in measure_model_runs(models, input_size, engine, repeats, warmup).items()}


def measure_model_runs(models: Mapping[str, torch.nn.Module], input_size, engine: Engine,
                       repeats: int = 20, warmup: int = 5) -> dict[str, list[float]]:
    """Every timed run (ms) of each model on ``engine``, all timed together, round-robin (run i
    of every model in the same round), with :func:`lrcompress.measure.latency.measure` (ONNX
    Runtime engines export a CPU copy of each model first; the models are not moved)."""
    from lrcompress.measure.latency import LatencyConfig, measure

    engine.check_available()
    ort = engine.runtime == "ort"
    cfg = LatencyConfig(repeats=repeats, warmup=warmup, batches=(engine.batch,),
                        threads=(engine.threads,), onnxruntime=ort, torch=not ort,
                        per_layer=False, keep_times=True)
    onnx_models = None
    if ort:
        from lrcompress.deploy.onnx import export_onnx

        onnx_models = {n: export_onnx(_cpu_copy(m), input_size,
                                      dynamic_batch=engine.batch > 1).SerializeToString()
                       for n, m in models.items()}
    res = measure(dict(models), input_size, cfg, onnx_models)
    want = ("onnxruntime" if ort else "torch", engine.device)
    row = next((r for r in res["runs"] if (r["engine"], r["device"]) == want), None)
    if row is None:
        raise UserError(f"Latency engine {engine.name} produced no measurement here: "
                        f"{'; '.join(res['notes']) or 'the engine is not available'}.")
    return {n: list(row["times_ms"][n]) for n in models}


def measure_models(models: Mapping[str, torch.nn.Module], input_size, engine: Engine,
                   repeats: int = 20, warmup: int = 5) -> dict[str, float]:
    """Whole-model median ms of each model (see :func:`measure_model_timings`)."""
    timings = measure_model_timings(models, input_size, engine, repeats, warmup)
    return {n: t.median_ms for n, t in timings.items()}


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    p = next(model.parameters(), None)
    on_cpu = p is None or p.device.type == "cpu"
    return (model if on_cpu else copy.deepcopy(model).cpu()).eval()


# ---------------------------------------------------------------------------------------------
# rank snapping
# ---------------------------------------------------------------------------------------------


def _timing(t) -> Timing:
    return t if isinstance(t, Timing) else Timing(float(t))


def snap_ranks(times_by_rank: Mapping, dense_ms: float | None = None, rtol: float = 0.03
               ) -> list:
    """The ranks worth offering, given one layer's times over its rank grid (``{rank: ms or
    Timing}``, ranks orderable, e.g. the scalar ranks of one factorization). The rule:

    1. Drop every rank whose median is ``>= dense_ms`` (a chain never ships slower than the
       dense layer it replaces). ``dense_ms=None`` drops nothing.
    2. Walk the rest by ascending rank, cutting them into *plateaus*: a plateau starts at the
       smallest rank not yet placed; its *anchor* ``a`` is its fastest member so far (ties: the
       earlier). Each following rank ``r`` joins it while
       ``t(r) − t(a) <= max(rtol · t(a), iqr(a), iqr(r))``; the first rank that does not starts
       the next plateau. (Anchoring at the fastest member — not at the previous rank — keeps a
       slow steady rise from merging into one plateau, and a slow outlier at a plateau's start
       from widening it.) Keep the largest rank of each plateau: the most accuracy for the same
       time.
    3. Drop a kept rank when a larger kept rank has a median no larger than its own (it buys
       nothing).

    Returns the kept ranks, ascending.
    """
    items = sorted((r, _timing(t)) for r, t in times_by_rank.items())
    if dense_ms is not None:
        items = [(r, t) for r, t in items if t.median_ms < dense_ms]
    tops: list[tuple[object, Timing]] = []
    a = None  # the current plateau's anchor
    for r, t in items:
        if a is not None and t.median_ms - a.median_ms <= max(rtol * a.median_ms, a.iqr_ms,
                                                              t.iqr_ms):
            tops[-1] = (r, t)
            a = t if t.median_ms < a.median_ms else a
        else:
            a = t
            tops.append((r, t))
    return [r for i, (r, t) in enumerate(tops)
            if all(t2.median_ms > t.median_ms for _, t2 in tops[i + 1:])]


def snap_options(spec: LayerSpec, options: Sequence, table: LatencyTable, rtol: float = 0.03,
                 keep_smallest: bool = False) -> list:
    """``options`` (as from ``layer_options``: ``.factorization``/``.rank``, dense included) reduced
    to each factorization's :func:`snap_ranks` against the measured dense time; dense and the
    order of ``options`` are kept. ``keep_smallest`` also keeps each factorization's smallest
    rank when it is faster than dense (a MACs or params target must stay as reachable as
    without snapping, even where the smallest ranks share one latency step)."""
    timings = table.layer_timings(spec, list(options) + [DENSE])
    dense = timings[DENSE].median_ms
    keep = set()
    for method in {o.factorization for o in options if o.factorization != DENSE}:
        mine = {o.rank: timings[o] for o in options if o.factorization == method}
        keep |= {(method, r) for r in snap_ranks(mine, dense, rtol)}
        if keep_smallest and mine[min(mine)].median_ms < dense:
            keep.add((method, min(mine)))
    return [o for o in options if o.factorization == DENSE or (o.factorization, o.rank) in keep]
