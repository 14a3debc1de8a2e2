"""Accuracy at equal measured latency: lrcompress against Torch-Pruning at the latency the
Torch-Pruning model actually runs at (issue 14, "what accuracy at the latency I need?").

For each model × MACs target × latency batch B, an *equal-latency row*

1. takes the Torch-Pruning row of the protocol (pruned to the MACs target, fine-tuned with the
   profile's budget; run by the ordinary harness, reused when done);
2. measures its latency ratio L against the original exactly as ``lrcompress search`` measures a
   latency target (:func:`lrcompress.measure.latency_target.measure_whole`: ONNX Runtime CPU,
   1 intra-op thread, batch B, the same ONNX export and session options), ``rounds`` times, L
   being the median (the Torch-Pruning row's own harness figure at 1 thread and batch B is kept
   next to it as a cross-check);
3. runs ``lrcompress search ... --target-latency L --latency-engine ort-cpu --latency-threads 1
   --latency-batch B`` with the same fine-tuning budget, data, seed and test subset, then
   ``lrcompress export``;
4. measures original, Torch-Pruning and lrcompress models together (one process, round-robin,
   the same original), ``rounds`` times, and records the median and the range of both ratios,
   both top-1 accuracies after fine-tuning and both MACs ratios.

Rows are written to ``RESULTS/<profile>/equal_latency/<row>.json`` (so the MACs-target tables of
the profile are untouched) and reused like the harness's rows: same budget, data, checkpoint, code
hash, batch, decomposition, rank method, rounds and the same Torch-Pruning result.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from lrcompress.util.io import write_json

from ._harness import CommandFailed, Row, Runner, _failure_status, now
from ._profiles import PROFILES, TP, ModelSpec

KIND = "equal_latency"
SUBDIR = "equal_latency"  # under the profile's results and work folders


@dataclass(frozen=True)
class EqRow:
    model: ModelSpec
    target: float  # MACs ratio the Torch-Pruning model is pruned to
    batch: int  # latency batch (ONNX Runtime CPU, 1 thread)
    decomp: str = "tucker2"
    method: str = "rene"
    narrow: float | None = None  # --narrow-hidden K for the lrcompress search

    @property
    def id(self) -> str:
        nh = "" if self.narrow is None else f"__nh{self.narrow:g}"
        return (f"{self.model.name}__eqlat__{self.method}__{self.decomp}{nh}__{self.target:g}"
                f"__b{self.batch}")

    @property
    def label(self) -> str:
        """The lrcompress column of the table."""
        return f"{self.method}/{self.decomp}" + (
            "" if self.narrow is None else f" + narrow {self.narrow:g}")

    @property
    def tp_row(self) -> Row:
        return Row(self.model, TP, None, self.target)


def plan_eq_rows(models, targets, batches, decomp: str = "tucker2",
                 method: str = "rene", narrow: float | None = None,
                 narrow_models: tuple[str, ...] = ()) -> list[EqRow]:
    """Per model and latency batch, one row per MACs target (batch-major, so that the first
    batch's rows finish first; the Torch-Pruning row of a target is shared: :func:`tp_rows`).
    ``narrow``: the models in ``narrow_models`` also get each row with --narrow-hidden."""
    rows = []
    for m in models:
        for b in batches:
            for t in targets:
                rows.append(EqRow(m, t, b, decomp, method))
                if narrow is not None and m.name in narrow_models:
                    rows.append(EqRow(m, t, b, decomp, method, narrow))
    return rows


def tp_rows(rows: list[EqRow]) -> list[Row]:
    """The Torch-Pruning rows the equal-latency rows need, each once, in order."""
    return list(dict.fromkeys(r.tp_row for r in rows))


def tp_figure(tp: dict, batch: int) -> float | None:
    """The Torch-Pruning row's own measured ONNX Runtime CPU 1-thread latency ratio at
    ``batch`` (compressed / original median), or None when the harness did not time it."""
    for x in (tp.get("latency") or {}).get("runs", []):
        if (x["engine"], x["device"], x["threads"], x["batch"]) == ("onnxruntime", "cpu", 1,
                                                                     batch):
            return x["median_ms"]["compressed"] / x["median_ms"]["original"]
    return None


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements (rounded for the JSON)."""
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def latency_noise(a: dict, b: dict, floor: float = 0.02) -> float:
    """How far two measured ratios may sit apart by noise alone: half of each one's range
    over the rounds, added, and at least ``floor``."""
    return max(floor, (a["max"] - a["min"]) / 2 + (b["max"] - b["min"]) / 2)


def winner(tp_top1: float, lr_top1: float, tp_ratio: dict, lr_ratio: dict, n_test: int) -> str:
    """Who wins at (about) equal measured latency, saying so when the gap is noise.

    Accuracy noise: two standard errors of a top-1 near 90 % on ``n_test`` images; latency noise:
    :func:`latency_noise`. A model slower beyond noise does not win on accuracy alone."""
    acc_noise = 2 * 100 * (0.9 * 0.1 / n_test) ** 0.5
    lat_noise = latency_noise(tp_ratio, lr_ratio)
    d_acc = lr_top1 - tp_top1
    d_lat = lr_ratio["median"] - tp_ratio["median"]  # > 0: lrcompress slower
    lr_slower, lr_faster = d_lat > lat_noise, d_lat < -lat_noise
    if abs(d_acc) <= acc_noise:
        if lr_slower:
            return "Torch-Pruning (as accurate within noise, faster)"
        if lr_faster:
            return "lrcompress (as accurate within noise, faster)"
        return "tie (within noise)"
    if d_acc > 0:
        return ("neither: lrcompress more accurate but slower" if lr_slower
                else "lrcompress")
    return ("neither: Torch-Pruning more accurate but slower" if lr_faster
            else "Torch-Pruning")


class EqualLatency:
    """Runs the equal-latency rows with a :class:`Runner` whose results and work folders are
    the profile's ``equal_latency/`` subfolders."""

    def __init__(self, runner: Runner, rounds: int = 7):
        if rounds < 1:
            raise ValueError("rounds must be >= 1")
        self.runner, self.rounds = runner, rounds

    @property
    def paths(self):
        return self.runner.paths

    def result_path(self, row: EqRow) -> Path:
        return self.paths.results / f"{row.id}.json"

    def key(self, row: EqRow, tp: dict) -> dict:
        return {**self.runner.key(row.tp_row), "batch": row.batch, "decomp": row.decomp,
                "method": row.method, "rounds": self.rounds,
                **({} if row.narrow is None else {"narrow_hidden": row.narrow}),
                "latency_engine": "ort-cpu", "latency_threads": 1,
                "torch_pruning_row": {"id": tp["id"], "date": tp["date"]}}

    def stored(self, row: EqRow, tp: dict) -> tuple[dict | None, str]:
        p = self.result_path(row)
        if not p.exists():
            return None, "no result yet"
        old = json.loads(p.read_text())
        if self.runner.force:
            return None, "--force"
        if old.get("status") == "failed":
            return None, "failed last time"
        key = json.loads(json.dumps(self.key(row, tp)))
        diff = sorted(k for k, v in key.items() if old.get("key", {}).get(k) != v)
        if diff:
            return None, f"stale ({', '.join(diff)} changed)"
        return old, "done"

    # ---------------------------------------------------------------- running

    def run(self, rows: list[EqRow]) -> list[dict]:
        say = self.runner.say
        tps = {r["id"]: r for r in self.runner.run(tp_rows(rows))}
        out = []
        for i, row in enumerate(rows, 1):
            head = f"[equal latency {i}/{len(rows)}] {row.id}"
            tp = tps[row.tp_row.id]
            if tp.get("status") != "ok":
                res = {**self.base(row, tp), "status": "failed",
                       "error": f"the Torch-Pruning row {tp['id']} is {tp.get('status')}"}
                write_json(self.result_path(row), res)
                say(f"{head}: {res['error']}")
                out.append(res)
                continue
            old, why = self.stored(row, tp)
            if old is not None:
                say(f"{head}: {why} (kept; --force re-runs it)")
                out.append(old)
                continue
            say(f"{head}: running ({why})")
            t0 = time.perf_counter()
            res = self.run_row(row, tp)
            res["row_wall_s"] = round(time.perf_counter() - t0, 1)
            write_json(self.result_path(row), res)
            say(f"{head}: {eq_summary(res)} [{res['row_wall_s']:.0f} s]")
            out.append(res)
        return out

    def base(self, row: EqRow, tp: dict) -> dict:
        r = self.runner
        return {"schema": 1, "kind": KIND, "id": row.id, "profile": r.profile.name,
                "model": row.model.name, "arch": row.model.arch, "target": row.target,
                "batch": row.batch, "decomp": row.decomp, "method": row.method,
                "label": row.label, "date": now(), "commit": r.commit, "machine": r.machine,
                "key": json.loads(json.dumps(self.key(row, tp))),
                "loadavg_start": [round(x, 2) for x in os.getloadavg()]}

    def run_row(self, row: EqRow, tp: dict) -> dict:
        res = self.base(row, tp)
        seconds = {}
        t0 = time.perf_counter()
        tp_model = self.load_tp(row)
        L_rounds = self.target_rounds(row, tp_model)
        L = round(statistics.median(L_rounds), 4)
        seconds["measure_L"] = round(time.perf_counter() - t0, 1)
        res["torch_pruning"] = {
            "row": tp["id"], "top1": tp["top1"], "macs_ratio": tp["macs"]["ratio"],
            "test_samples": tp["test_samples"], "run_dir": tp["run_dir"],
            "row_latency_ratio": _round(tp_figure(tp, row.batch)),
            "target_rounds": [round(x, 4) for x in L_rounds]}
        res["target_latency"] = L
        try:
            t0 = time.perf_counter()
            res["commands"] = self.run_lrcompress(row, L)
            seconds["lrcompress_commands"] = round(time.perf_counter() - t0, 1)
        except CommandFailed as e:
            res.update(status=_failure_status(e), error=str(e), commands=[e.record],
                       seconds=seconds)
            return res
        t0 = time.perf_counter()
        res.update(self.measure(row, tp_model))
        seconds["final_latency"] = round(time.perf_counter() - t0, 1)
        res["seconds"] = seconds
        res["status"] = "ok"
        res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        return res

    def load_tp(self, row: EqRow):
        from .tp_baseline import load_pruned

        return load_pruned(self.paths.work / row.tp_row.id).eval()

    def latency_config(self, batch: int):
        from lrcompress.measure.latency_target import LatencyConfig

        p = self.runner.profile
        return LatencyConfig(engine="ort-cpu", threads=1, batch=batch, repeats=p.lat_repeats,
                             warmup=p.lat_warmup)

    def target_rounds(self, row: EqRow, tp_model) -> list[float]:
        """L: Torch-Pruning / original measured ``rounds`` times with the search's own
        whole-model measurement (same engine, threads, batch, export)."""
        from lrcompress.measure.latency_target import measure_whole

        original = self.runner.original(row.model)[0]
        cfg = self.latency_config(row.batch)
        return [measure_whole(original, tp_model, row.model.input_size, cfg).ratio
                for _ in range(self.rounds)]

    def run_lrcompress(self, row: EqRow, L: float) -> list[dict]:
        r, p = self.runner, self.runner.profile
        run_dir = self.paths.work / row.id
        cache = self.paths.work / "cache" / f"{row.model.name}__{row.decomp}"
        common = r.common_args(row.tp_row)
        i = common.index("--target-flops")
        common[i:i + 2] = ["--target-latency", f"{L:.4f}"]
        search = ["lrcompress", "search", r.rel(r.ckpt(row.model)), "--arch", row.model.arch,
                  "--decomp", row.decomp, "--method", row.method, *common,
                  "--latency-engine", "ort-cpu", "--latency-threads", "1",
                  "--latency-batch", str(row.batch),
                  *(p.rene_args() if row.method == "rene" else []),
                  *([] if row.narrow is None else ["--narrow-hidden", f"{row.narrow:g}"]),
                  "--cache-dir", r.rel(cache), "-o", r.rel(run_dir), *r._overwrite(run_dir),
                  "--json"]
        rec = [r.execute("search", row.id, search)]
        export = ["lrcompress", "export", r.rel(run_dir), "--format", "onnx,safetensors",
                  "--dynamic-batch", "--no-latency", "--json"]
        rec.append(r.execute("export", row.id, export))
        return rec

    def measure(self, row: EqRow, tp_model) -> dict:
        """Original, Torch-Pruning and lrcompress timed together, ``rounds`` times."""
        from lrcompress import load
        from lrcompress.deploy.onnx import export_onnx
        from lrcompress.measure.latency import LatencyConfig as TimingConfig
        from lrcompress.measure.latency import measure
        from lrcompress.measure.metrics import independent_macs, param_count

        original, _, base_macs, base_params = self.runner.original(row.model)
        run_dir = self.paths.work / row.id
        lr_model = load(run_dir).eval()
        models = {"original": original, TP: tp_model, "lrcompress": lr_model}
        size = row.model.input_size
        onnx = {n: export_onnx(m.cpu().eval(), size,
                               dynamic_batch=row.batch > 1).SerializeToString()
                for n, m in models.items()}
        p = self.runner.profile
        tcfg = TimingConfig(repeats=p.lat_repeats, warmup=p.lat_warmup, batches=(row.batch,),
                            threads=(1,), onnxruntime=True, torch=False, per_layer=False)
        rounds = []
        for _ in range(self.rounds):
            run = measure(models, size, tcfg, onnx)["runs"][0]
            rounds.append({"median_ms": run["median_ms"], "iqr_ms": run["iqr_ms"]})
        ratios = {n: spread([x["median_ms"][n] / x["median_ms"]["original"] for x in rounds])
                  for n in (TP, "lrcompress")}
        rep = json.loads((run_dir / "report.json").read_text())
        acc = rep["accuracy"]
        macs = independent_macs(lr_model, size)
        return {
            "run_dir": self.runner.rel(run_dir),
            "lrcompress": {
                "top1": {"original": acc["original"]["top1"],
                         "before_ft": acc["decomposed"]["top1"],
                         "after_ft": (acc.get("finetuned") or {}).get("top1")},
                "test_samples": acc["original"]["n"],
                "macs_ratio": macs / base_macs,
                "params_ratio": param_count(lr_model) / base_params,
                "search_latency": rep.get("latency"),
                "seconds": rep.get("seconds")},
            "latency": {"engine": "onnxruntime", "device": "cpu", "threads": 1,
                        "batch": row.batch, "repeats": p.lat_repeats, "warmup": p.lat_warmup,
                        "rounds": rounds, "ratio": ratios,
                        "original_ms": spread([x["median_ms"]["original"] for x in rounds])},
        }


def _round(v):
    return None if v is None else round(v, 4)


def eq_summary(res: dict) -> str:
    if res["status"] != "ok":
        return f"{res['status']}: {res.get('error', '')[:400]}"
    tp, lr, lat = res["torch_pruning"], res["lrcompress"], res["latency"]["ratio"]
    return (f"target latency {res['target_latency']:.3f}; Torch-Pruning top-1 "
            f"{tp['top1']['after_ft']:.2f} at {lat[TP]['median']:.3f}, lrcompress "
            f"{lr['top1']['after_ft']:.2f} at {lat['lrcompress']['median']:.3f} "
            f"(MACs {tp['macs_ratio']:.3f} vs {lr['macs_ratio']:.3f})")


# ------------------------------------------------------------------ RESULTS.md


def load_eq_results(profile_dir: Path) -> list[dict]:
    d = Path(profile_dir) / SUBDIR
    if not d.is_dir():
        return []
    files = {f.stem: json.loads(f.read_text()) for f in sorted(d.glob("*.json"))}
    rows = [r for r in files.values() if r.get("kind") == KIND]
    for r in rows:  # what the table's commands list also needs: the TP row, the reference
        tp = files.get(r["key"]["torch_pruning_row"]["id"]) or {}
        r["_tp_commands"] = [c["command"] for c in tp.get("commands", [])]
        r["_reference"] = files.get(f"{r['model']}__reference")
    return sorted(rows, key=lambda r: (r["model"], r["method"], r["decomp"], -r["target"],
                                       r["batch"]))


def paired(rounds: list[dict]) -> tuple[float, int] | None:
    """(median over rounds of lrcompress ms / Torch-Pruning ms, rounds where lrcompress was
    the faster): the two models compared directly, round by round."""
    r = [x["median_ms"]["lrcompress"] / x["median_ms"][TP] for x in rounds]
    return (statistics.median(r), sum(v < 1 for v in r)) if r else None


def _r(x: dict) -> str:
    return f"{x['median']:.3f} [{x['min']:.3f}–{x['max']:.3f}]"


def equal_latency_section(rows: list[dict]) -> list[str]:
    """The "Accuracy at equal measured latency" table, its commands and dates."""
    if not rows:
        return []
    ok = [r for r in rows if r.get("status") == "ok"]
    dates = sorted(r["date"] for r in rows)
    m = rows[0].get("machine") or {}
    where = (f" on {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}, lrcompress "
             f"commit(s) {', '.join(sorted({r['commit'] for r in rows}))}" if m else "")
    out = ["### Accuracy at equal measured latency", "",
           f"{dates[0]} … {dates[-1]}{where}. For each MACs target the Torch-Pruning model "
           "(pruned to that MACs ratio, fine-tuned with the budget above) sets the latency: its "
           "measured ratio L to the original (ONNX Runtime CPU, 1 thread, the batch shown; the "
           "median of the search's own whole-model measurement, repeated) is given to "
           "`lrcompress search --target-latency L` with the same fine-tuning budget and data. "
           "Then original, Torch-Pruning and lrcompress models are timed together (one process, "
           "round-robin, the same original); latency ratios are the median [min–max] over the "
           "rounds, each round the median of the profile's repeats. Top-1 after fine-tuning on "
           "the test subset; MACs by FlopCounterMode.", ""]
    refs = {(r["model"], r["key"].get("checkpoint_sha256", "")[:12],
             r["lrcompress"]["top1"]["original"], r["lrcompress"]["test_samples"]) for r in ok}
    if refs:
        out += ["Originals: " + "; ".join(
            f"{m} {t:.2f} % top-1 on {n} test images (checkpoint sha256 {h}…)"
            for m, h, t, n in sorted(refs)) + ". These rows are runs of their own: the MACs-"
            "target tables above may come from another checkpoint or commit (compare their "
            "originals before comparing across).", ""]
    if ok:
        out += ["| model | lrcompress | MACs target | batch | L (TP, target) | Torch-Pruning "
                "latency ratio | TP top-1 | lrcompress latency ratio | lrcompress top-1 | "
                "Δ top-1 (pt) | MACs ratio TP / lrcompress | search verdict | winner |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"| {r['model']} | {_label(r)} | {r['target']:g} | "
                       f"{r['batch']} | {_f4(r.get('target_latency'))} | – | – | – | "
                       f"{r['status']} | – | – | – | – |")
            continue
        tp, lr, lat = r["torch_pruning"], r["lrcompress"], r["latency"]["ratio"]
        a, b = tp["top1"]["after_ft"], lr["top1"]["after_ft"]
        sl = lr.get("search_latency") or {}
        verdict = (f"{'met' if sl.get('met') else 'MISSED'} ({sl.get('measured_ratio', 0):.3f}, "
                   f"{len(sl.get('attempts', []))} attempt(s))" if sl else "–")
        out.append(
            f"| {r['model']} | {_label(r)} | {r['target']:g} | {r['batch']} | "
            f"{r['target_latency']:.3f} | "
            f"{_r(lat[TP])} | {a:.2f} | {_r(lat['lrcompress'])} | {b:.2f} | {b - a:+.2f} | "
            f"{tp['macs_ratio']:.3f} / {lr['macs_ratio']:.3f} | {verdict} | "
            f"{winner(a, b, lat[TP], lat['lrcompress'], lr['test_samples'])} |")
    if ok:
        n = ok[0]["lrcompress"]["test_samples"]
        se = 100 * (0.9 * 0.1 / n) ** 0.5
        out += ["", f"Winner: accuracy gaps under {2 * se:.1f} pt (two standard errors on {n} "
                "images) and latency gaps under half of both ratios' ranges added (at least "
                "0.02) count as noise; a model slower beyond noise does not win on accuracy "
                "alone. \"search verdict\" is lrcompress's own whole-model check against L "
                "inside `search` (met within its measured spread, or missed after its "
                "re-solves).", "",
                "| row | L rounds (TP / original, search's measurement) | TP row's own ratio "
                "(harness, dynamic-batch graphs) | lrcompress / TP ms, paired (median; rounds "
                "lrcompress faster) | original ms | load avg (1 min) start → end | row wall s |",
                "|---|---|---|---|---|---|---|"]
        for r in ok:
            tp = r["torch_pruning"]
            pr = paired(r["latency"].get("rounds") or [])
            n = r["latency"]["ratio"][TP]["n"]
            pr_cell = "–" if pr is None else f"{pr[0]:.3f} ({pr[1]} of {n})"
            out.append(f"| {r['id']} | {', '.join(f'{x:.3f}' for x in tp['target_rounds'])} | "
                       f"{_f4(tp.get('row_latency_ratio'))} | {pr_cell} | "
                       f"{_r(r['latency']['original_ms'])} | {_load(r)} | "
                       f"{r.get('row_wall_s', 0):.0f} |")
    out += ["", "Reproduce (rows done with the same budget, data, checkpoint and code are kept):",
            "", "```bash", *rerun_commands(rows), "```",
            "", "<details><summary>Equal-latency commands</summary>", ""]
    seen = set()
    for r in rows:
        ref = r.get("_reference") or {}
        meta = ref.get("meta") or {}
        if ref and ref["model"] not in seen:
            seen.add(ref["model"])
            out.append(f"- reference `{ref['model']}` ({ref['checkpoint']}: "
                       f"{_f2(100 * meta['test_top1'] if meta.get('test_top1') else None)} % "
                       f"top-1 on all 10k test images, {meta.get('wall_time_s', '–')} s to "
                       f"train): `{ref.get('train_command') or meta.get('command')}`")
    for tp_id in dict.fromkeys(r["key"]["torch_pruning_row"]["id"] for r in rows):
        cmds = next((r["_tp_commands"] for r in rows if r["key"]["torch_pruning_row"]["id"]
                     == tp_id and r.get("_tp_commands")), [])
        out.append(f"- `{tp_id}` (the Torch-Pruning row)")
        out += [f"  - `{c}`" for c in cmds]
    for r in rows:
        out.append(f"- `{r['id']}` ({r['date']}, {r['status']}; Torch-Pruning row "
                   f"`{r['key']['torch_pruning_row']['id']}`)")
        for c in r.get("commands", []):
            out.append(f"  - `{c['command']}`")
    return out + ["", "</details>", ""]


def rerun_commands(rows: list[dict]) -> list[str]:
    """The compare.py command lines that (re)make ``rows``: one per profile, rank method,
    decomposition and number of rounds."""
    groups: dict = {}
    for r in rows:
        k = (r["profile"], r["method"], r["decomp"], r["key"].get("rounds"),
             r["key"].get("narrow_hidden"), _budget_flags(r))
        g = groups.setdefault(k, ({}, {}, {}))
        for d, v in zip(g, (r["model"], r["target"], r["batch"])):
            d[v] = None
    out = []
    for (prof, method, decomp, rounds, nh, flags), (models, targets, batches) in groups.items():
        out.append(f"OMP_NUM_THREADS=1 python benchmarks/compare.py --{prof} --equal-latency "
                   f"--models {','.join(models)} --targets {','.join(f'{t:g}' for t in targets)} "
                   f"--latency-batch {','.join(map(str, sorted(batches)))} --eq-method {method} "
                   f"--eq-decomp {decomp}" + (f" --eq-rounds {rounds}" if rounds else "")
                   + flags
                   + ("" if nh is None else f" --eq-narrow-hidden {nh:g} --eq-narrow-models "
                      f"{','.join(models)}"))
    return out


def _budget_flags(r: dict) -> str:
    """The rank-search overrides the rows ran with (e.g. ``--search-iters 12``), where they
    differ from the profile's defaults: without them the command would make other rows."""
    prof, budget = PROFILES.get(r["profile"]), r["key"].get("budget") or {}
    out = ""
    for flag, name in (("--search-iters", "search_iters"), ("--search-warmup", "search_warmup")):
        v = budget.get(name)
        if prof is not None and v is not None and v != getattr(prof, name):
            out += f" {flag} {v}"
    return out


def _label(r: dict) -> str:
    return r.get("label") or f"{r['method']}/{r['decomp']}"


def _load(r: dict) -> str:
    a, b = r.get("loadavg_start"), r.get("loadavg_end")
    return "–" if not (a and b) else f"{a[0]:.2f} → {b[0]:.2f}"


def _f2(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def _f4(v) -> str:
    return "–" if v is None else f"{v:.3f}"
