"""RESULTS.md and the top-1-vs-MACs plot, rendered from the harness's JSON results only.

    python -m benchmarks.results [--results benchmarks/results] [-o benchmarks/RESULTS.md]

Every figure comes from ``RESULTS_DIR/<profile>/<row>.json`` (written by ``compare.py``); nothing
here measures anything. ``compare.py`` calls :func:`render` after each run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from ._equal_latency import equal_latency_section, load_eq_results
from ._profiles import DECOMPS, METHODS, MODELS, TARGETS, TP

HERE = Path(__file__).resolve().parent
PROFILE_TITLES = {"quick": "Quick profile (CPU)", "full": "Full profile (GPU)"}
METHOD_TITLES = {"rene": "lrcompress rene", "uniform": "lrcompress uniform",
                 "vbmf": "lrcompress vbmf", TP: "Torch-Pruning"}


def load_results(results_root: Path) -> dict[str, dict]:
    """{profile: {"rows": {id: row}, "refs": {model: reference}}} for every profile folder."""
    out = {}
    for d in sorted(p for p in Path(results_root).iterdir() if p.is_dir()):
        rows, refs = {}, {}
        for f in sorted(d.glob("*.json")):
            r = json.loads(f.read_text())
            if "id" in r:
                rows[r["id"]] = r
            elif "checkpoint" in r:
                refs[r["model"]] = r
        eq = load_eq_results(d)
        if rows or eq:
            out[d.name] = {"rows": rows, "refs": refs, "eq": eq}
    return out


def _resolve(rows: dict, r: dict) -> dict:
    """An 'equivalent' row stands for the row it is the same as."""
    seen = 0
    while r.get("status") == "equivalent" and r.get("same_as") in rows and seen < 5:
        r, seen = rows[r["same_as"]], seen + 1
    return r


def _ort(r: dict, threads: int, batch: int) -> dict | None:
    for x in r.get("latency", {}).get("runs", []):
        if x["engine"] == "onnxruntime" and x["device"] == "cpu" and x["threads"] == threads \
                and x["batch"] == batch:
            return x
    return None


def _f(v, fmt=".2f", none="–"):
    return none if v is None else format(v, fmt)


def _cell_top1(r: dict | None) -> str:
    if r is None:
        return "not run"
    if r["status"] != "ok":
        return _cell_not_ok(r)
    t = r["top1"]
    bn = "" if t.get("bn_recalibrated") is None else f" → {_f(t['bn_recalibrated'])}"
    return f"{_f(t['before_ft'])}{bn} → **{_f(t['after_ft'])}**"


def _cell_not_ok(r: dict) -> str:
    """A row without figures: failed, out of reach (with the smallest MACs ratio the search
    reported), or the same model as a decomposition that was not run."""
    if r["status"] == "equivalent":
        return f"same as {r['same_as'].split('__')[2]}, not run"
    if r["status"] == "infeasible":
        m = re.search(r"keeps (\d+\.\d+) of its MACs", r.get("error") or "")
        return "not reachable" + (f" (smallest ranks keep {m[1]})" if m else "")
    return r["status"]


def _cell_cost(r: dict | None, threads: int, batches) -> str:
    if r is None or r.get("status") != "ok":
        return "–"
    ideal = 1 / r["macs"]["ratio"]
    sp = []
    for b in batches:
        x = _ort(r, threads, b)
        sp.append("–" if x is None else f"{x['speedup']:.2f}×")
    return f"{r['macs']['ratio']:.3f} · {' / '.join(sp)} ({ideal:.2f}×)"


def _grid(rows: dict, model: str):
    """{(method, decomp, target): row} with equivalents resolved; TP under every decomp."""
    g = {}
    for r in rows.values():
        if r["model"] != model:
            continue
        for d in ([r["decomp"]] if r["decomp"] else DECOMPS):
            g[(r["method"], d, r["target"])] = _resolve(rows, r)
    return g


def _columns(rows: dict, model: str):
    targets = sorted({r["target"] for r in rows.values() if r["model"] == model}, reverse=True)
    decomps = [d for d in DECOMPS if any(r["decomp"] == d for r in rows.values()
                                         if r["model"] == model)] or list(DECOMPS)
    return [(d, t) for t in targets for d in decomps]


def model_section(prof: str, rows: dict, ref: dict | None, model: str) -> list[str]:
    g, cols = _grid(rows, model), _columns(rows, model)
    methods = [m for m in METHODS if any(k[0] == m for k in g)]
    any_row = next(r for r in rows.values() if r["model"] == model and r.get("status") == "ok")
    n = any_row["test_samples"]
    out = [f"### {model} (`{any_row['arch']}`)", ""]
    orig = any_row["top1"]["original"]
    meta = (ref or {}).get("meta") or {}
    out.append(f"Original: **{orig:.2f} %** top-1 on the {n} test images used here"
               + (f" ({100 * meta['test_top1']:.2f} % on all 10k; trained by "
                  f"`train_reference.py`, {meta.get('recipe')} recipe"
                  + (f", {meta['epochs']} epoch(s)" if meta.get("epochs") else "")
                  + f", {meta.get('wall_time_s')} s)" if meta.get("test_top1") else "")
               + f"; {any_row['macs']['original'] / 1e6:.2f} M MACs, "
               f"{any_row['params']['original'] / 1e6:.2f} M params.")
    eq = sorted({f"`{r['decomp']}` = `{r['same_as'].split('__')[2]}`" for r in rows.values()
                 if r["model"] == model and r["status"] == "equivalent"})
    if eq:
        out.append(f"Equivalent decompositions (same layer options, so the same model): "
                   f"{', '.join(eq)} — {next(r['reason'] for r in rows.values() if r['model'] == model and r['status'] == 'equivalent')}.")  # noqa: E501
    out += ["", f"Top-1 % ({n} test images): after decomposition/pruning → after BatchNorm "
            "re-estimation (lrcompress rows, where run) → **after fine-tuning**",
            "", "| method | " + " | ".join(f"{d} @ {t:g}" for d, t in cols) + " |",
            "|---|" + "---|" * len(cols)]
    for m in methods:
        out.append(f"| {METHOD_TITLES[m]} | "
                   + " | ".join(_cell_top1(g.get((m, d, t))) for d, t in cols) + " |")
    batches = sorted({x["batch"] for r in rows.values() if r.get("status") == "ok"
                      for x in r["latency"]["runs"]})
    out += ["", "MACs ratio (FlopCounterMode) · measured ONNX Runtime CPU speed-up, 1 thread, "
            f"batch {' / '.join(map(str, batches))} (ideal = 1 / MACs ratio)", "",
            "| method | " + " | ".join(f"{d} @ {t:g}" for d, t in cols) + " |",
            "|---|" + "---|" * len(cols)]
    for m in methods:
        out.append(f"| {METHOD_TITLES[m]} | "
                   + " | ".join(_cell_cost(g.get((m, d, t)), 1, batches) for d, t in cols)
                   + " |")
    if any(k[0] == TP for k in g):
        out += ["", "Torch-Pruning does not factorize: its one model per target is repeated "
                "under each decomposition for comparison."]
    return out + [""]


def latency_section(rows: dict) -> list[str]:
    out = ["### Latency, every configuration", "",
           "ONNX Runtime (and PyTorch eager where measured), original vs compressed in the same "
           "process, round-robin, median ms.", "",
           "| row | engine | device | threads | batch | original ms | compressed ms | speed-up "
           "| ideal | achieved / ideal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        if r.get("status") != "ok":
            continue
        lat = r["latency"]
        for x in lat["runs"]:
            m = x["median_ms"]
            out.append(f"| {r['id']} | {x['engine']} | {x['device']} | {x['threads'] or '–'} | "
                       f"{x['batch']} | {m['original']:.3f} | {m['compressed']:.3f} | "
                       f"{x['speedup']:.2f}× | {lat['ideal_speedup']:.2f}× | "
                       f"{x['achieved_over_ideal']:.2f} |")
    return out + [""]


STAGES = (("load", ("load",)), ("rank search / pruning", ("rank_selection", "prune")),
          ("decompose", ("decompose",)), ("fine-tune", ("finetune",)),
          ("evaluations", ("eval_original", "eval_decomposed", "eval_pruned", "eval_finetuned")),
          ("save + export", ("save", "export", "save_export")))


def _times(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}×"


def search_speed_lines(search: dict | None) -> list[str]:
    """The rank-selection time before/after table (``tool/search_speed.json``): rank selection
    as a multiple of one evaluation of the original on the test set, with the plan's top-1."""
    if not search:
        return []
    out = ["", search["title"], "", *search.get("notes", []), "",
           "| date | model, setting | code | rank selection s, wall (CPU) | evaluation of the "
           "original s, wall (CPU) | ratio wall (CPU) | top-1 after BN | α iterations per step |",
           "|---|" + "---|" * 7]
    for r in search["rows"]:
        sel, ev = r["select_s"], r.get("eval_s") or [None, None]
        ratio = [None if e is None or v is None else v / e for v, e in zip(sel, ev)]
        wall = _f(ratio[0], ".0f" if ratio[0] is None or ratio[0] >= 10 else ".1f")
        out.append(f"| {r['date']} | {r['setting']} | {r['code']} | {_f(sel[0], '.1f')} "
                   f"({_f(sel[1], '.0f')}) | {_f(ev[0], '.1f')} ({_f(ev[1], '.1f')}) | "
                   f"{wall}× ({_times(ratio[1])}) | "
                   f"{_f(r.get('bn_top1'), '.2f')} | {r.get('alpha_iters', '–')} |")
    out += ["", "Commands:", ""] + [f"- {k}: `{c}`" for k, c in search["commands"].items()]
    return out


def speed_section(rows: dict, decompose: dict | None, search: dict | None = None
                  ) -> list[str]:
    out = ["### Speed of the tool", "",
           "Wall seconds of each stage as the commands report them, the whole command (process "
           "start to exit, search + export), and peak memory of the process (RSS; GPU memory "
           "when on CUDA).", "",
           "| row | " + " | ".join(s for s, _ in STAGES) + " | commands wall | peak RSS MiB "
           "| peak GPU MiB |", "|---|" + "---|" * (len(STAGES) + 3)]
    for r in rows.values():
        if r.get("status") != "ok":
            continue
        s = r["seconds"]
        cells = [_f(sum(s[k] for k in keys if s.get(k) is not None) if any(
            s.get(k) is not None for k in keys) else None, ".1f") for _, keys in STAGES]
        cmds = r["commands"]
        wall = sum(c["wall_s"] or 0 for c in cmds)
        rss = max((c["peak_rss_mib"] or 0) for c in cmds)
        gpu = max(((c.get("gpu") or {}).get("max_allocated_mib") or 0) for c in cmds) or None
        out.append(f"| {r['id']} | " + " | ".join(cells)
                   + f" | {wall:.1f} | {rss:.0f} | {_f(gpu, '.0f')} |")
    if decompose:
        out += ["", f"Decomposition of one 512×512×3×3 conv (seconds, relative error), "
                f"`benchmarks/bench_decompose.py --skip-resnet`, {decompose['date']}:", "",
                "| method | " + " | ".join(f"rank {k}" for k in
                                           decompose["rows"][0]["per_rank"]) + " | all four "
                "at once |", "|---|" + "---|" * (len(decompose["rows"][0]["per_rank"]) + 1)]
        for d in decompose["rows"]:
            out.append(f"| {d['method']} | " + " | ".join(
                f"{v['seconds']:.2f} s ({v['rel_error']:.3f})" for v in d["per_rank"].values())
                + f" | {d['decompose_many_seconds']:.2f} s |")
    return out + search_speed_lines(search) + [""]


def closing_note(rows: dict) -> list[str]:
    """Where lrcompress wins and loses against Torch-Pruning, from the numbers alone."""
    out = ["### Where lrcompress wins and where it loses", ""]
    by = defaultdict(list)
    for r in rows.values():
        r = _resolve(rows, r)
        if r.get("status") == "ok" and r["top1"]["after_ft"] is not None:
            by[(r["model"], r["target"])].append(r)
    n = None
    for (model, target), rs in sorted(by.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        tp = next((r for r in rs if r["method"] == TP), None)
        lr = [r for r in rs if r["method"] != TP]
        if not lr:
            continue
        n = rs[0]["test_samples"]
        best = max(lr, key=lambda r: r["top1"]["after_ft"])
        worst = min(lr, key=lambda r: r["top1"]["after_ft"])
        line = (f"- **{model} @ {target:g} MACs**: best lrcompress {best['method']}/"
                f"{best['decomp']} {best['top1']['after_ft']:.2f} %, worst "
                f"{worst['method']}/{worst['decomp']} {worst['top1']['after_ft']:.2f} %")
        if tp:
            d = best["top1"]["after_ft"] - tp["top1"]["after_ft"]
            beat = sum(r["top1"]["after_ft"] > tp["top1"]["after_ft"] for r in lr)
            line += (f"; Torch-Pruning {tp['top1']['after_ft']:.2f} % → lrcompress "
                     f"{'wins' if d > 0 else 'loses'} by {abs(d):.2f} pt at best ({beat} of "
                     f"{len(lr)} lrcompress rows beat it)")
            sb, st = (_ort(k, 1, max(x["batch"] for x in k["latency"]["runs"]))
                      for k in (best, tp))
            if sb and st:
                line += (f". Measured speed-up (ORT, 1 thread, batch {sb['batch']}): "
                         f"lrcompress {sb['speedup']:.2f}× ({sb['achieved_over_ideal']:.0%} of "
                         f"ideal) vs Torch-Pruning {st['speedup']:.2f}× "
                         f"({st['achieved_over_ideal']:.0%})")
        before = {m: statistics.mean(r["top1"]["after_ft"] for r in lr if r["method"] == m)
                  for m in ("rene", "uniform", "vbmf") if any(r["method"] == m for r in lr)}
        if len(before) > 1:
            line += "; mean over decompositions: " + ", ".join(
                f"{m} {v:.2f}" for m, v in before.items())
        out.append(line + ".")
    if n:
        se = 100 * (0.9 * 0.1 / n) ** 0.5
        out += ["", f"Accuracy is measured on {n} test images: one model's top-1 has a standard "
                f"error of about {se:.1f} pt at 90 %, so gaps under ~{2 * se:.1f} pt are within "
                "noise. Speed-ups are ratios measured in one process on a shared machine."]
    return out + [""]


def plot(rows: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows.values()})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    colors = {"rene": "tab:red", "uniform": "tab:blue", "vbmf": "tab:green", TP: "black"}
    marks = {"tt": "o", "tucker2": "s", "cp": "^", None: "D"}
    for ax, model in zip(axes[0], models):
        g = _grid(rows, model)
        ok = [r for r in rows.values() if r["model"] == model and r.get("status") == "ok"]
        orig = ok[0]["top1"]["original"] if ok else None
        for m in METHODS:
            for d in ([None] if m == TP else DECOMPS):
                pts = sorted((r["macs"]["ratio"], r["top1"]["after_ft"]) for (mm, dd, _), r in
                             g.items() if mm == m and (d is None or dd == d)
                             and r.get("status") == "ok" and r["top1"]["after_ft"] is not None)
                pts = sorted(set(pts))
                if not pts:
                    continue
                if orig is not None:
                    pts.append((1.0, orig))
                label = METHOD_TITLES[m] + ("" if d is None else f" ({d})")
                ax.plot(*zip(*pts), marker=marks[d], color=colors[m], label=label,
                        linestyle="-" if m == TP else {"tt": "-", "tucker2": "--", "cp": ":"}[d],
                        alpha=0.85)
        ax.set_title(f"{model}: top-1 after fine-tuning vs MACs")
        ax.set_xlabel("MACs ratio (FlopCounterMode)")
        ax.set_ylabel("top-1 % (test subset)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def budget_lines(rows: dict) -> list[str]:
    r = next(iter(rows.values()))
    b = r["key"]["budget"]
    ft = (f"{b['max_steps']} steps" if b["max_steps"] else f"{b['finetune_epochs']} epochs")
    lat = (f"ONNX Runtime CPU at {', '.join(str(t or 'all') for t in b['lat_threads'])} "
           f"thread(s), batch {', '.join(map(str, b['lat_batches']))}, median of "
           f"{b['lat_repeats']} after {b['lat_warmup']} warm-up"
           + (", PyTorch eager too" if b["lat_torch"] else ""))
    rene = (f"{b['search_iters']} iterations + {b['search_warmup']} warm-up per search step"
            if b["search_iters"] else "lrcompress's defaults")
    return [
        f"- Fine-tuning (every row the same): {ft}, batch {b['batch_size']}, precision "
        f"{b.get('precision', 'auto')}, lrcompress's "
        "defaults (SGD-Nesterov lr 0.01 cosine, logit KD κ=1 at T=4, grad clip 5); lrcompress "
        "rows also RENE's layer matching (λ=0.5), which Torch-Pruning cannot use (its layers "
        "change shape).",
        f"- Test top-1 on the first {b['test_subset'] or 10000} test images; rank search on "
        "lrcompress's seeded 10 % calibration split of the training set.",
        f"- rene search: {rene}.",
        f"- Torch-Pruning: `BasePruner`, group-magnitude (L2) importance, {b['tp_scope']} "
        f"ranking, channels rounded to {b['tp_round_to']}, classifier kept, pruning ratio "
        "bisected to the MACs target.",
        f"- Latency: {lat}.",
        f"- Work threads: {b['threads'] or 'all'}; device {b['device']}; seed {b['seed']}.",
    ]


def missing_rows(rows: dict) -> tuple[list[str], int]:
    """(rows of the protocol's whole grid — every model, target, decomposition and method —
    that this profile has no result for, the size of the grid)."""
    want = []
    for m in MODELS:
        for t in TARGETS:
            want.append(f"{m}__{TP}__{t:g}")
            want += [f"{m}__{meth}__{d}__{t:g}" for d in DECOMPS for meth in METHODS if meth != TP]
    return [w for w in want if w not in rows], len(want)


def _machines(rows: dict) -> str:
    """The machines the rows ran on, with how many rows each (rows of one table may come from
    runs on different machines)."""
    count: dict[str, int] = defaultdict(int)
    for r in rows.values():
        m = r["machine"]
        count[f"{m['cpu']}, {m['cores']} cores, " + (m.get("gpu") or "no GPU")] += 1
    if len(count) == 1:
        return next(iter(count))
    return "; ".join(f"{k} ({n} rows)" for k, n in sorted(count.items()))


def render(results_root: Path, out_md: Path, plot_dir: Path | None = None) -> Path:
    data = load_results(results_root)
    plot_dir = plot_dir or out_md.parent
    lines = ["# lrcompress benchmark results", "",
             "Generated by `benchmarks/compare.py` (protocol: the project's benchmarks.md) from "
             f"the JSON in `{_relto(results_root, out_md.parent)}/`; do not edit by hand. Each "
             "row's commands and date are listed under its profile.", ""]
    if not data:
        lines.append("No results yet: run `python benchmarks/compare.py --quick`.")
    for prof, d in data.items():
        rows, refs = d["rows"], d["refs"]
        if not rows:  # equal-latency rows only
            lines += [f"## {PROFILE_TITLES.get(prof, prof)}", "",
                      *equal_latency_section(d["eq"])]
            continue
        first = next(iter(rows.values()))
        dates = sorted(r["date"] for r in rows.values())
        mach = first["machine"]
        png = plot_dir / ("results_top1_vs_macs.png" if prof == "quick"
                          else f"results_top1_vs_macs_{prof}.png")
        plot(rows, png, f"{PROFILE_TITLES.get(prof, prof)}, {dates[-1][:10]}")
        commits = sorted({r["commit"] for r in rows.values()})
        walls = sum(r.get("row_wall_s") or 0 for r in rows.values())
        lines += [f"## {PROFILE_TITLES.get(prof, prof)}", "",
                  f"Machine: {_machines(rows)}"
                  + f"; torch {mach['torch']}, onnxruntime {mach['onnxruntime']}. "
                  f"Dates {dates[0]} … {dates[-1]}; lrcompress commit(s) {', '.join(commits)}; "
                  f"{len(rows)} rows, {walls / 60:.1f} min of row wall time.", "",
                  "Budget:", *budget_lines(rows), ""]
        missing, grid = missing_rows(rows)
        if missing:
            lines += [f"**Partial run**: {len(missing)} of the {grid} rows of "
                      "the protocol's grid have no result yet (complete them with `python "
                      f"benchmarks/compare.py --{prof}`; done rows are kept).", ""]
        lines += [f"![top-1 vs MACs]({_relto(png, out_md.parent)})", ""]
        for model in sorted({r["model"] for r in rows.values()}):
            if any(r["model"] == model and r.get("status") == "ok" for r in rows.values()):
                lines += model_section(prof, rows, refs.get(model), model)
        dec = _load_decompose(results_root / prof)
        lines += closing_note(rows) + equal_latency_section(d["eq"])
        lines += latency_section(rows) + speed_section(rows, dec, _load_tool(
            results_root / prof, "search_speed.json"))
        lines += ["### Commands", "", "<details><summary>Every row's commands and date"
                  "</summary>", ""]
        for r in rows.values():
            lines.append(f"- `{r['id']}` ({r['date']}, {r['status']}"
                         + (f", same as `{r['same_as']}`" if r.get("same_as") else "") + ")")
            for c in r.get("commands", []):
                lines.append(f"  - `{c['command']}`")
        for ref in refs.values():
            meta = ref.get("meta") or {}
            if ref.get("trained_by_harness"):
                lines.append(f"- reference `{ref['model']}` (trained here, {ref['date']}): "
                             f"`{ref['record']['command']}`")
            elif meta.get("command"):
                lines.append(f"- reference `{ref['model']}` (trained before this run; its "
                             f"{ref['checkpoint'].rsplit('/', 1)[-1].replace('.pt', '.json')} "
                             f"says): `{meta['command']}`")
            else:
                lines.append(f"- reference `{ref['model']}`: provided; to retrain it: "
                             f"`{ref['train_command']}`")
        lines += ["", "</details>", ""]
    out_md.write_text("\n".join(lines).rstrip() + "\n")
    return out_md


def _load_decompose(d: Path) -> dict | None:
    return _load_tool(d, "decompose_512.json")


def _load_tool(d: Path, name: str) -> dict | None:
    p = d / "tool" / name
    return json.loads(p.read_text()) if p.exists() else None


def _relto(p: Path, base: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=HERE / "results",
                    help="folder of per-profile result folders (default: %(default)s)")
    ap.add_argument("-o", "--output", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args(argv)
    print(render(args.results, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
