"""Reports for people: RUN/report.json -> report.md and a self-contained report.html.

The report is first built as a list of blocks (headings, paragraphs, tables, plots, lists); the
Markdown and HTML renderers only format those blocks, so both always say the same thing. Plots are
drawn with matplotlib's Agg canvas (no pyplot, no display, no global state): the HTML embeds them
as base64 PNG, the Markdown links copies in RUN/plots/. Plots: ranks per layer, MACs per layer
before/after, the search's expected-cost trajectory (rene), accuracy vs MACs (every run given),
and the measured speed-up next to the ideal one (after ``export``).
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import re
from pathlib import Path

from lrcompress.measure.latency import slower_summary
from lrcompress.report.schema import data_notes, final_accuracy, has_accuracy
from lrcompress.util.io import atomic_path

PLOT_DIR = "plots"


# ------------------------------------------------------------------------------------- plots
def _figure(w=10.0, h=3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # bbox "tight": long rotated layer names are never clipped at the bottom edge
    fig.savefig(buf, format="png", metadata={"Software": None}, bbox_inches="tight",
                pad_inches=0.08)
    return buf.getvalue()


# Past this many layers a vertical layer axis is unreadable: bars turn horizontal, names on the
# y axis, and the figure grows with the layer count.
VERTICAL_LAYERS_MAX = 40


def _layer_bars(names: list[str], series: list[tuple[str, list[float], str]], ylabel: str,
                title: str, marks: tuple[str, list[float | None]] | None = None):
    """Grouped bars per layer (one per series), optionally a marker per layer (``marks``);
    vertical up to VERTICAL_LAYERS_MAX layers, horizontal (layers top to bottom) past it.
    Returns (figure, value axis)."""
    n, k = len(names), len(series)
    horizontal = n > VERTICAL_LAYERS_MAX
    fig = _figure(h=max(3.6, 0.17 * n + 1.4)) if horizontal else _figure()
    ax = fig.add_subplot()
    bw = 0.8 / k
    for j, (label, vals, color) in enumerate(series):
        pos = [i + (j - (k - 1) / 2) * bw for i in range(n)]
        if horizontal:
            ax.barh(pos, vals, bw, label=label, color=color)
        else:
            ax.bar(pos, vals, bw, label=label, color=color)
    if marks is not None:
        pts = [(i, v) for i, v in enumerate(marks[1]) if v is not None]
        where, vals = [i for i, _ in pts], [v for _, v in pts]
        if horizontal:
            ax.plot(vals, where, "|", ms=9, mew=2, color="#c0392b", label=marks[0])
        else:
            ax.plot(where, vals, "_", ms=9, mew=2, color="#c0392b", label=marks[0])
    if horizontal:
        ax.set_yticks(range(n))
        ax.set_yticklabels(names, fontsize=7)
        ax.set_ylim(n - 0.4, -0.6)  # first layer on top
        ax.set_xlabel(ylabel)
    else:
        ax.set_xticks(range(n))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    if k > 1 or marks is not None:
        ax.legend(fontsize=8, ncol=k + (marks is not None),
                  loc="lower right" if horizontal else "upper left")
    return fig, ax


def chain_label(row: dict) -> str:
    """The chain a report row's layer was built as: linear layers and 1×1 convs are an SVD pair
    whatever the factorization asked for (rows of older reports carry no ``chain``)."""
    if row.get("chain"):
        return row["chain"]
    f = row.get("factorization", "dense")
    shape = row.get("shape") or []
    if f != "dense" and (row.get("kind") == "linear" or list(shape[2:]) == [1, 1]):
        return "svd"
    return f


def _scalar(rank) -> int:
    return max(rank) if isinstance(rank, list) else rank


def plot_ranks(report: dict) -> bytes | None:
    """Each factorized layer's rank as a share of its full rank, with its break-even rank (the
    largest rank that still saves MACs) marked; absolute ranks for reports without them."""
    rows = [r for r in report.get("layers", []) if r["factorization"] != "dense"]
    if not rows:
        return None
    names = [f"{r['name']} ({chain_label(r)})" for r in rows]
    if all(r.get("full_rank") for r in rows):
        share = [100 * _scalar(r["rank"]) / r["full_rank"] for r in rows]
        even = [100 * r["break_even_rank"] / r["full_rank"] if r.get("break_even_rank")
                else None for r in rows]
        fig, ax = _layer_bars(names, [("rank", share, "#2f6fb3")], "rank (% of full rank)",
                              "Ranks per factorized layer, as a share of full rank",
                              ("break-even rank", even))
        (ax.set_xlim if len(rows) > VERTICAL_LAYERS_MAX else ax.set_ylim)(0, 118)
    else:
        fig, _ = _layer_bars(names, [("rank", [_scalar(r["rank"]) for r in rows], "#2f6fb3")],
                             "rank", "Ranks per factorized layer")
    return _png(fig)


def plot_macs(report: dict) -> bytes | None:
    rows = report.get("layers", [])
    if not rows:
        return None
    fig, _ = _layer_bars([r["name"] for r in rows],
                         [("before", [r["macs_before"] / 1e6 for r in rows], "#9aa5b1"),
                          ("after", [r["macs_after"] / 1e6 for r in rows], "#2f6fb3")],
                         "MACs (millions)", "MACs per layer, before and after")
    return _png(fig)


def plot_trajectory(report: dict) -> bytes | None:
    raw = (report.get("search") or {}).get("steps")  # rene: a list of steps (isvt: a count)
    steps = [s for s in (raw if isinstance(raw, list) else [])
             if isinstance(s, dict) and s.get("expected_cost_ratio")]
    if not steps:
        return None
    fig = _figure(h=3.2)
    ax = fig.add_subplot()
    start = 0
    for k, s in enumerate(steps):
        ys = s["expected_cost_ratio"]
        ax.plot(range(start, start + len(ys)), ys, color="#2f6fb3", zorder=3,
                label="expected cost ratio" if k == 0 else None)
        if "chosen_cost_ratio" in s:
            ax.plot([start + len(ys) - 1], [s["chosen_cost_ratio"]], "o", color="#c0392b",
                    label="plan chosen after the step" if k == 0 else None)
        start += len(ys)
        if k < len(steps) - 1:
            ax.axvline(start - 0.5, color="#999", ls=":", lw=1)
    tgt = report.get("target", {})
    ax.axhline(tgt.get("ratio", 0), color="#27ae60", ls="--", zorder=1,
               label=f"target ({tgt.get('kind')} {tgt.get('ratio')})")
    repair = (report.get("search") or {}).get("repair") or {}
    if "final_cost_ratio" in repair:
        ax.plot([start - 1], [repair["final_cost_ratio"]], "*", ms=12, color="#8e44ad",
                label="final plan (after budget repair)")
    ax.set_xlabel("search iteration (dotted lines: step boundaries)")
    ax.set_ylabel("cost / original cost")
    ax.set_title("Search: expected cost of the rank mixture")
    ax.legend(fontsize=8)
    return _png(fig)


def _acc_points(report: dict, label: str) -> list[tuple[str, float, float]]:
    tot, acc = report["totals"], report["accuracy"]
    pts = [(f"{label} decomposed", tot["macs_after"], acc["decomposed"]["top1"])]
    if acc.get("bn_recalibrated"):
        pts.append((f"{label} BN re-estimated", tot["macs_after"],
                    acc["bn_recalibrated"]["top1"]))
    if acc.get("finetuned"):
        pts.append((f"{label} fine-tuned", tot["macs_after"], acc["finetuned"]["top1"]))
    return pts


def _run_label(report: dict) -> str:
    c = report.get("config", {})
    t = report.get("target", {})
    return f"{c.get('decomp')}/{c.get('method')} {t.get('kind')}≤{t.get('ratio')}"


# An accuracy axis spans at least this many points, so that a 0.2-point difference does not
# fill the plot and look like a cliff.
MIN_ACCURACY_SPAN = 10.0


def accuracy_limits(values: list[float], min_span: float = MIN_ACCURACY_SPAN
                    ) -> tuple[float, float]:
    """y limits (top-1 %) that hold every value with a margin, span at least ``min_span``
    points and stay within [0, 100]."""
    lo, hi = min(values), max(values)
    span = max(hi - lo, min_span)
    mid = (lo + hi) / 2
    lo, hi = mid - 0.6 * span, mid + 0.6 * span
    if lo < 0:
        lo, hi = 0.0, min(100.0, hi - lo)
    if hi > 100:
        lo, hi = max(0.0, lo - (hi - 100)), 100.0
    return lo, hi


def plot_accuracy(report: dict, others=()) -> bytes | None:
    if not has_accuracy(report):
        return None
    fig = _figure(w=7, h=4)
    ax = fig.add_subplot()
    tot = report["totals"]
    orig = report["accuracy"]["original"]["top1"]
    ax.axhline(orig, color="black", ls="--", lw=1, zorder=1)
    ax.plot([tot["macs_before"] / 1e6], [orig], "s", color="black",
            label=f"original ({orig:.2f} %)")
    values = [orig]
    for rep in [report, *others]:
        for name, macs, top1 in _acc_points(rep, _run_label(rep)):
            ax.plot([macs / 1e6], [top1], "^" if "fine" in name else "o", label=name)
            values.append(top1)
    ax.set_ylim(*accuracy_limits(values))
    ax.set_xlim(0, 1.08 * max([tot["macs_before"]] + [o["totals"]["macs_before"]
                                                       for o in others]) / 1e6)
    ax.set_xlabel("MACs per sample (millions)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Accuracy vs MACs (dashed: the original)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)


def _config_label(r: dict) -> str:
    where = r["device"] if r["engine"] == "torch" else f"ORT {r['device']}"
    thr = "" if r["threads"] is None else f" {r['threads']}t"
    return f"{'torch ' if r['engine'] == 'torch' else ''}{where}{thr} b{r['batch']}"


def plot_speedup(report: dict) -> bytes | None:
    lat = (report.get("export") or {}).get("latency")
    if not lat or not lat.get("runs"):
        return None
    runs = lat["runs"]
    fig = _figure(h=3.4)
    ax = fig.add_subplot()
    ax.bar(range(len(runs)), [r["speedup"] for r in runs], 0.6, color="#2f6fb3",
           label="measured")
    ax.axhline(lat["ideal_speedup"], color="#27ae60", ls="--",
               label=f"ideal (MACs ratio) {lat['ideal_speedup']:.2f}x")
    ax.axhline(1.0, color="#999", lw=1)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([_config_label(r) for r in runs], fontsize=8, rotation=30, ha="right")
    ax.set_ylabel("speed-up (original / compressed)")
    ax.set_title("Measured speed-up (median latency)")
    ax.legend(fontsize=8)
    return _png(fig)


# ------------------------------------------------------------------------------------ blocks
def _num(n) -> str:
    if n is None:
        return "-"
    if isinstance(n, float):
        return f"{n:.4g}"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _rank(r) -> str:
    if r is None:
        return "-"
    return "×".join(map(str, r)) if isinstance(r, list) else str(r)


def build_blocks(report: dict, others=()) -> list[tuple]:
    """The report as ("h1"|"h2"|"p"|"ul"|"table"|"img"|"details", ...) blocks (a details block
    is (summary, [blocks]), shown collapsed)."""
    b: list[tuple] = []
    m, tot = report["model"], report["totals"]
    acc = report["accuracy"]
    b.append(("h1", f"lrcompress report: {m['arch']} → {_run_label(report)}"))
    b.append(("p", _target_sentence(report) + f" Model {m['source']}, input "
                   f"{'×'.join(map(str, m['input_size']))}, {m['num_classes']} classes. Data "
                   f"{report['data']['spec']} ({report['data']['test_samples'] or 'no'} test "
                   "samples)."))
    b.append(("h2", "Summary"))
    rows = [["MACs", _num(tot["macs_before"]), _num(tot["macs_after"]),
             f"×{tot['macs_ratio']:.3f}"],
            ["params", _num(tot["params_before"]), _num(tot["params_after"]),
             f"×{tot['params_ratio']:.3f}"]]
    if has_accuracy(report):
        stage, fin = final_accuracy(report)
        for k in ("top1", "top5"):
            change = fin[k] - acc["original"][k] + 0.0  # + 0.0: no "-0.00"
            rows.append([f"{k[:3]}-{k[3:]} % ({stage})", f"{acc['original'][k]:.2f}",
                         f"{fin[k]:.2f}", f"{change:+.2f} pts"])
    b.append(("table", ["", "original", "compressed", "change"], rows))
    b += _latency_blocks(report)
    b.append(("h2", "Accuracy (test split)"))
    if has_accuracy(report):
        b.append(("table", ["model", "top-1 %", "top-5 %", "loss", "samples"],
                  [[k, f"{a['top1']:.2f}", f"{a['top5']:.2f}", f"{a['loss']:.4f}",
                    str(a["n"])] for k, a in acc.items() if a]))
    else:
        b.append(("p", "Not measured: the run had no test data (a data-free run or an "
                       "unlabelled image folder without --eval-data, or the Python API without "
                       "eval=)."))
    b += [("p", line) for line in data_notes(report) if line.startswith("Data-free")]
    bn = report.get("bn_recalibration")
    if bn:
        b.append(("p", f"bn_recalibrated: after decomposition the running statistics of the "
                       f"{bn['layers']} BatchNorm layers after the first factorized layer were "
                       f"re-measured on {bn['samples']} calibration samples ({bn['batches']} "
                       f"batches; no gradient step); {bn['kept']} layers before it kept theirs."
                       + ("" if bn.get("applied", True) else
                          f" It raised the calibration loss ({bn['calib_loss_before']:.4f} → "
                          f"{bn['calib_loss_after']:.4f}), so the decomposed model's statistics "
                          "were kept instead.")
                       + (f" Judged on {bn['judged_batches']} {bn['judged_on']}."
                          if "judged_on" in bn else "")))
    b.append(("h2", "Plots"))
    for name, png in _plots(report, others).items():
        b.append(("img", name, png))
    b += _export_blocks(report)
    b.append(("h2", "Layers"))
    b.append(("table", ["layer", "kind", "weight", "factorization", "rank", "MACs before",
                        "MACs after", "params before", "params after", "rel. error"],
              [[r["name"], r["kind"], "×".join(map(str, r["shape"])), chain_label(r),
                _rank(r["rank"]), _num(r["macs_before"]), _num(r["macs_after"]),
                _num(r["params_before"]), _num(r["params_after"]),
                "-" if r.get("rel_error") is None else f"{r['rel_error']:.4f}"]
               for r in report.get("layers", [])]))
    if report.get("skipped"):
        b.append(("h2", "Layers kept dense"))
        b.append(("table", ["layer", "reason"], [[k, v] for k, v in report["skipped"].items()]))
    b += _search_blocks(report)
    b.append(("h2", "Run"))
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in (report.get("seconds") or {}).items())
    vers = ", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items())
    b.append(("ul", [f"Time per stage: {secs or '-'}", f"Versions: {vers}",
                     f"Seed: {report.get('seed')}",
                     f"Command: {' '.join(map(str, report.get('command') or []))}"]))
    return b


def _target_sentence(report: dict) -> str:
    tot, tgt = report["totals"], report["target"]
    if tgt["kind"] == "latency":
        lat = report.get("latency") or {}
        got = lat.get("measured_ratio")
        return (f"Target: measured latency at most {tgt['ratio']:.4g} of the original's; "
                + (f"measured {got:.4f} ± {lat.get('spread', 0):.4f}." if got is not None
                   else "not measured."))
    achieved = tot["macs_ratio"] if tgt["kind"] == "flops" else tot["params_ratio"]
    return (f"Target: at most {tgt['ratio']} of the original {tgt['kind']}; achieved "
            f"{achieved:.4f} (MACs counted by {tot.get('macs_counted_by', '?')}).")


def _latency_blocks(report: dict) -> list[tuple]:
    lat = report.get("latency") or {}
    if not lat.get("attempts"):
        return []
    c = lat["config"]
    rows = [[str(i + 1), f"{a['solved_at']:.4f}", "-" if a.get("estimated_ratio") is None
             else f"{a['estimated_ratio']:.4f}", f"{a['ratio']:.4f} ± {a['spread']:.4f}",
             f"{a['macs_ratio']:.4f}"] for i, a in enumerate(lat["attempts"])]
    table = lat.get("table") or {}
    return [("h2", "Latency"),
            ("p", f"{c['engine']}, {c['threads']} thread(s), batch {c['batch']}, median of "
                  f"{c['repeats']} round-robin runs: {lat.get('summary', '')}. Candidate "
                  f"table: {table.get('options_kept', '?')} of {table.get('options_offered', '?')}"
                  f" options kept after snapping; {table.get('measured', '?')} timed, "
                  f"{table.get('cached', '?')} from the cache." + _floor_note(lat)),
            ("table", ["attempt", "solved at", "estimated ratio", "measured ratio", "MACs ratio"],
             rows)]


def _floor_note(lat: dict) -> str:
    f = lat.get("floor")
    if not f:
        return ""
    return (f" The layer times put the fastest plan at {f['estimated']:.3f} of the original, "
            f"above the target; measured whole it ran at {f['measured']:.3f} ± {f['spread']:.3f},"
            f" so the first solve used the corrected budget {f['first_budget']:.4f}.")


def _search_blocks(report: dict) -> list[tuple]:
    s = report.get("search") or {}
    items = []
    if isinstance(s.get("steps"), list) and s["steps"]:
        last = s["steps"][-1]
        items.append(f"{len(s['steps'])} search step(s); plan chosen after the last at "
                     f"{last.get('chosen_cost_ratio', float('nan')):.4f} of the original cost")
    if s.get("repair"):
        r = s["repair"]
        items.append(f"budget repair: {r.get('layers_changed')} layer(s) changed, final cost "
                     f"ratio {r.get('final_cost_ratio', float('nan')):.4f}")
    if s.get("reapplied"):
        items.append(f"plan re-applied from {s['reapplied']}")
    nar = report.get("narrowing")
    if nar:
        errs = [b["rel_error"] for b in nar["blocks"]]
        top1 = (nar.get("accuracy") or {}).get("top1")
        items.append(f"hidden widths narrowed to {nar['keep']:g} in {len(errs)} block(s) "
                     f"(interpolative decomposition; output error of the fits "
                     f"{min(errs):.3g}–{max(errs):.3g})"
                     + (f"; top-1 after narrowing {top1:.2f} %" if top1 is not None else ""))
    lo = report.get("lorita")
    if lo:
        dense = (lo.get("dense_accuracy") or {}).get("top1")
        items.append(f"LoRITa pre-tuning: N={lo['factors']} factors per weight, {lo['steps']} "
                     f"steps, weight decay {lo['weight_decay']}; Schatten-2/N penalty "
                     f"{lo['schatten_before']:.4g} → {lo['schatten_after']:.4g}"
                     + (f"; dense top-1 after it {dense:.2f} %" if dense is not None else ""))
    return [("h2", "Search"), ("ul", items)] if items else []


def _export_blocks(report: dict) -> list[tuple]:
    ex = report.get("export")
    if not ex:
        return [("p", "No export yet: `lrcompress export RUN` writes model.onnx, checks it "
                      "against PyTorch and measures latency.")]
    b: list[tuple] = []
    lat = ex.get("latency")
    if lat:
        b.append(("h2", "Measured speed"))
        b.append(("p", f"Median of {lat['config']['repeats']} runs after "
                       f"{lat['config']['warmup']} warm-up runs, original and compressed "
                       f"timed in round-robin in one process; {lat['cpu_count']} CPU core(s). "
                       f"Ideal speed-up (MACs ratio): {lat['ideal_speedup']:.2f}×. Original "
                       f"model: {lat.get('original_weights')}."))
        b.append(("table", ["engine", "device", "threads", "batch", "original ms",
                            "compressed ms", "speed-up", "of ideal"],
                  [[r["engine"], r["device"], "-" if r["threads"] is None else str(r["threads"]),
                    str(r["batch"]), f"{r['median_ms']['original']:.3f}",
                    f"{r['median_ms']['compressed']:.3f}", f"{r['speedup']:.2f}×",
                    f"{100 * r['achieved_over_ideal']:.0f} %"] for r in lat["runs"]]))
        if lat.get("layers"):
            b.append(("details", "Per-layer latency (PyTorch eager, 1 CPU thread)",
                      [_layer_latency_table(report, lat["layers"])]))
        slower = slower_summary(lat.get("layers") or [])
        if slower or lat.get("notes"):
            b.append(("ul", ([f"Warning: {slower}"] if slower else [])
                      + list(lat.get("notes", []))))
    items = []
    if ex.get("onnx"):
        items += onnx_summary(ex["onnx"])
    if ex.get("safetensors"):
        s = ex["safetensors"]
        items.append(f"safetensors: {s['path']} ({_num(s['bytes'])}B, sha256 {s['sha256'][:16]}"
                     f"…): {s['reload']}.")
    if items:
        b += [("h2", "Export"), ("ul", items)]
    if ex.get("int8"):
        b += _int8_blocks(ex["int8"])
    return b


def _layer_latency_table(report: dict, layers: list[dict]) -> tuple:
    labels = {r["name"]: chain_label(r) for r in report.get("layers", [])}
    return ("table", ["layer", "factorization", "rank", "batch", "dense ms", "factorized ms",
                      "speed-up", "ideal", ""],
            [[r["name"], r.get("chain") or labels.get(r["name"], r["factorization"]),
              _rank(r["rank"]), str(r["batch"]), f"{r['dense_ms']:.4f}",
              f"{r['factorized_ms']:.4f}", f"{r['speedup']:.2f}×", f"{r['ideal_speedup']:.2f}×",
              "SLOWER" if r["slower"] else ""] for r in layers])


INT8_MODELS = (("original", "original FP32"), ("compressed", "compressed FP32"),
               ("original_int8", "original INT8"), ("compressed_int8", "compressed INT8"))


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def int8_summary(q: dict) -> list[str]:
    """Sentences on model.int8.onnx: how it was made and its accuracy (terminal and reports)."""
    c, a = q["config"], q["accuracy"]
    excl = ", ".join(c["exclude"]) or "none"
    lines = [f"INT8: {q['path']} ({_num(q['bytes'])}B, dynamic batch), {q['quantizer']}; "
             f"{c['calibration']} calibration on the {q['calibration_inputs']}; "
             f"{len(q['balanced_chains'])} factorized chains scale-balanced (largest per-channel "
             f"weight-range ratio {q['chain_weight_spread']['before']:g} -> "
             f"{q['chain_weight_spread']['after']:g}); layers kept in float: {excl}; "
             f"{q['checker']}."]
    t = a["top1"]
    if a["drop"] is not None:
        lines.append(f"INT8 top-1 {_pct(t['compressed_int8'])} % vs FP32 "
                     f"{_pct(t['compressed'])} % (drop {a['drop']:+.2f} pts, allowed "
                     f"{c['max_drop']:g}) on {a['n']} samples, {a['inputs']} (ONNX Runtime).")
    else:
        lines.append(f"INT8 top-1 not measured (no labels): INT8 agrees with FP32 on "
                     f"{a['agreement_with_fp32']['compressed_int8']:.2f} % of {a['n']} samples, "
                     f"{a['inputs']}.")
    if q.get("factor_convs_without_qdq"):
        lines.append("Factor convolutions left in float: "
                     + ", ".join(q["factor_convs_without_qdq"]) + ".")
    return lines


def _int8_blocks(q: dict) -> list[tuple]:
    b: list[tuple] = [("h2", "INT8"), ("ul", int8_summary(q))]
    a = q["accuracy"]
    b.append(("table", ["model", "top-1 %", "agreement with FP32 %"],
              [[label, _pct(a["top1"].get(k)), _pct(a["agreement_with_fp32"].get(k))]
               for k, label in INT8_MODELS if k in a["top1"]]))
    lat = q.get("latency")
    if lat and lat["runs"]:
        b.append(("p", "ONNX Runtime, median ms (speed-up over the original FP32 model); all "
                       "four models timed in round-robin in one process. INT8/FP32: compressed "
                       "FP32 over compressed INT8; low-rank on INT8: original INT8 over "
                       "compressed INT8."))
        b.append(("table", ["device", "threads", "batch", *(lab for _, lab in INT8_MODELS),
                            "INT8/FP32", "low-rank on INT8"],
                  [[r["device"], "-" if r["threads"] is None else str(r["threads"]),
                    str(r["batch"]),
                    *(f"{r['median_ms'][k]:.3f} ({r['speedup'][k]:.2f}×)"
                      for k, _ in INT8_MODELS),
                    f"{r['int8_over_fp32']:.2f}×", f"{r['lowrank_over_int8']:.2f}×"]
                   for r in lat["runs"]]))
        if lat.get("tradeoff"):
            b.append(("p", lat["tradeoff"]))
        if lat.get("warnings"):
            b.append(("ul", [f"Warning: {w}" for w in lat["warnings"]]))
    return b


PLOT_NAMES = ("ranks.png", "macs.png", "search.png", "accuracy_vs_macs.png", "speedup.png")


def _plots(report: dict, others=()) -> dict[str, bytes]:
    plots = dict(zip(PLOT_NAMES, (plot_ranks(report), plot_macs(report),
                                  plot_trajectory(report), plot_accuracy(report, others),
                                  plot_speedup(report))))
    return {k: v for k, v in plots.items() if v is not None}


# --------------------------------------------------------------------------------- renderers
def _md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h1":
            out.append(f"# {blk[1]}\n")
        elif kind == "h2":
            out.append(f"## {blk[1]}\n")
        elif kind == "p":
            out.append(f"{blk[1]}\n")
        elif kind == "ul":
            out.append("\n".join(f"- {i}" for i in blk[1]) + "\n")
        elif kind == "table":
            head, rows = blk[1], blk[2]
            lines = ["| " + " | ".join(map(_md_cell, head)) + " |",
                     "|" + "|".join("---" for _ in head) + "|"]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
            out.append("\n".join(lines) + "\n")
        elif kind == "img":
            out.append(f"![{blk[1][:-4]}]({PLOT_DIR}/{blk[1]})\n")
        elif kind == "details":  # collapsed: GitHub and most viewers render it folded
            out.append(f"<details><summary>{html.escape(blk[1])}</summary>\n\n"
                       + to_markdown(blk[2]) + "\n</details>\n")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#1f2933;line-height:1.45}
h1{font-size:1.5em;border-bottom:2px solid #2f6fb3;padding-bottom:.3em}
h2{font-size:1.2em;margin-top:1.8em;color:#2f6fb3}
table{border-collapse:collapse;margin:.6em 0;font-size:.86em}
th,td{border:1px solid #d5dbe1;padding:.25em .6em;text-align:left}
th{background:#f0f4f8}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}
img{max-width:100%;display:block;margin:.8em 0;border:1px solid #e4e7eb}
li{margin:.2em 0}td.bad{color:#c0392b;font-weight:600}
details{margin:.6em 0}summary{cursor:pointer;color:#2f6fb3}
"""


_NUMERIC = re.compile(r"^[-+×]?[\d.,]+(e[-+]?\d+)?[KMG]?(B|x|×| %| pts)?$")


def _css_class(cell) -> str:
    if cell == "SLOWER":
        return ' class="bad"'
    return ' class="n"' if _NUMERIC.match(str(cell)) else ""


def _html_body(blocks) -> list[str]:
    e = html.escape
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{e(blk[1])}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in blk[1]) + "</ul>")
        elif kind == "table":
            head, rows = blk[1], blk[2]
            out.append("<table><thead><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in head)
                       + "</tr></thead><tbody>")
            for r in rows:
                cells = "".join(f"<td{_css_class(c)}>{e(str(c))}</td>" for c in r)
                out.append(f"<tr>{cells}</tr>")
            out.append("</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(blk[2]).decode("ascii")
            out.append(f'<img alt="{e(blk[1][:-4])}" src="data:image/png;base64,{data}">')
        elif kind == "details":
            out.append(f"<details><summary>{e(blk[1])}</summary>")
            out += _html_body(blk[2])
            out.append("</details>")
    return out


def to_html(blocks) -> str:
    e = html.escape
    title = next((blk[1] for blk in blocks if blk[0] == "h1"), "lrcompress report")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"]
    out += _html_body(blocks)
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_reports(report: dict, others=()) -> dict[str, bytes]:
    """{relative path: bytes} of report.md, report.html and plots/*.png (writes nothing)."""
    blocks = build_blocks(report, others)
    files = {"report.md": to_markdown(blocks).encode("utf-8"),
             "report.html": to_html(blocks).encode("utf-8")}
    for blk in blocks:
        if blk[0] == "img":
            files[f"{PLOT_DIR}/{blk[1]}"] = blk[2]
    return files


def write_reports(out_dir, report: dict, others=()) -> list[Path]:
    """Write report.md, report.html and plots/ into ``out_dir``, all renamed in at the end.

    ``others``: reports of other runs of the same model, drawn on the accuracy-vs-MACs plot.
    """
    return write_rendered(out_dir, render_reports(report, others))


def write_rendered(out_dir, files: dict[str, bytes]) -> list[Path]:
    """Write what :func:`render_reports` returned into ``out_dir``, all renamed in at the end."""
    out = Path(out_dir)
    written = []
    with contextlib.ExitStack() as stage:
        for name, data in files.items():
            stage.enter_context(atomic_path(out / name)).write_bytes(data)
            written.append(out / name)
    remove_stale_plots(out, files)
    return written


def remove_stale_plots(out: Path, files) -> None:
    """Drop plots an earlier report drew that this one does not (only lrcompress's own names)."""
    for name in PLOT_NAMES:
        rel = f"{PLOT_DIR}/{name}"
        if rel not in files:
            (out / rel).unlink(missing_ok=True)


def _scale_note(p: dict) -> str:
    """`` on outputs up to S (a fraction F of the scale)``; "" for reports without the scale."""
    if "output_scale" not in p:
        return ""
    return (f" on outputs up to {p['output_scale']:.3g} ({p['max_rel_diff']:.2g} of a sample's "
            "scale)")


def onnx_summary(o: dict) -> list[str]:
    """Two sentences on an exported graph and its ONNX Runtime parity (terminal and reports)."""
    p = o["parity"]
    ops = ", ".join(f"{k} {v}" for k, v in o["ops"].items())
    return [f"ONNX: {o['path']} ({_num(o['bytes'])}B, opset {o['opset']}, input "
            f"{o['input']['shape']}), {o['exporter']}; {o['checker']}. Operators: {ops}.",
            f"ONNX Runtime vs PyTorch on {p['n']} {p['inputs']}: max |diff| "
            f"{p['max_abs_diff']:.3g}{_scale_note(p)} (tolerance per sample: atol {p['atol']} + "
            f"rtol {p['rtol']}·max|output|), "
            f"top-1 agreement {100 * p['top1_agreement']:.1f} %, providers "
            f"{', '.join(p['providers'])}."]
