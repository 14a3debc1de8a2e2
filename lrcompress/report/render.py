"""Human-readable rendering of library results (tables on stdout, via rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lrcompress.report.schema import data_notes, has_accuracy


def console() -> Console:
    con = Console(highlight=False, soft_wrap=False)
    if not con.is_terminal:
        # Pipes and CI logs: plain text wide enough that layer names never wrap.
        con = Console(highlight=False, soft_wrap=False, width=220, no_color=True)
    return con


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def render_census(c, compressed: bool = False) -> None:
    title = (f"{c.arch} (compressed): layers left dense" if compressed else c.arch)
    t = Table(title=f"{title} at input {'x'.join(map(str, c.input_size))}", show_lines=False)
    for col, just in (("layer", "left"), ("kind", "left"), ("weight shape", "left"),
                      ("out", "left"), ("MACs", "right"), ("params", "right"),
                      ("% MACs", "right"), ("break-even rank (svd/tucker2/cp/tt)", "left"),
                      ("factorize?", "left")):
        t.add_column(col, justify=just)
    for r in c.rows:
        be = "/".join(str(r.break_even.get(k, "-")) for k in ("svd", "tucker2", "cp", "tt"))
        t.add_row(r.name, r.kind, "x".join(map(str, r.shape)), "x".join(map(str, r.out_size)),
                  human(r.macs), human(r.params), f"{100 * r.macs_share:.1f}",
                  be, "yes" if r.candidate else f"no: {r.skip_reason}")
    con = console()
    con.print(t)
    con.print(
        f"Total: {human(c.total_macs)} MACs ({c.total_macs:,}), {human(c.total_params)} params "
        f"({c.total_params:,}); conv/linear {human(c.layer_macs)}, other matmuls "
        f"{human(c.other_macs)}.\n"
        f"Factorizable{' further' if compressed else ''} by some factorization: "
        f"{sum(r.candidate for r in c.rows)} of {len(c.rows)} layers, "
        f"{100 * c.candidate_macs / max(c.total_macs, 1):.1f}% of MACs."
    )


def render_reach(r) -> None:
    """What search reaches (commands.inspect.Reach), in search's own terms."""
    finer = ("" if r.finer_macs_ratio is None else
             f" With --rank-multiple 8: {r.finer_macs_ratio:.3f}.")
    console().print(
        f"search --decomp {r.decomp} --rank-multiple {r.rank_multiple} factorizes "
        f"{r.factorizable} layers; smallest reachable MACs ratio {r.macs_ratio:.3f} "
        f"(parameters {r.params_ratio:.3f}): every factorizable layer at its smallest rank on "
        f"the grid, the rest dense; a lower --target-flops is refused.{finer} The MACs outside "
        f"the factorizable layers alone are {r.untouchable_macs_ratio:.3f} of the total.",
        highlight=False)


def _rank_text(r) -> str:
    return "x".join(map(str, r)) if isinstance(r, (list, tuple)) else str(r)


def _chain_table(title: str, rows: list[dict]) -> Table:
    t = Table(title=title)
    for col, just in (("layer", "left"), ("factorization", "left"), ("rank", "right"),
                      ("of full", "right"), ("break-even", "right"), ("MACs before", "right"),
                      ("MACs after", "right"), ("params before", "right"),
                      ("params after", "right")):
        t.add_column(col, justify=just)
    for r in rows:
        if r["factorization"] == "dense":
            continue
        share = max(r["rank"]) if isinstance(r["rank"], list) else r["rank"]
        t.add_row(r["name"], r.get("chain", r["factorization"]), _rank_text(r["rank"]),
                  f"{100 * share / max(r['full_rank'], 1):.0f}%", str(r["break_even_rank"]),
                  human(r["macs_before"]), human(r["macs_after"]), human(r["params_before"]),
                  human(r["params_after"]))
    return t


def render_preview(p) -> None:
    """A plan preview (commands.inspect.Preview): ranks per layer and the totals."""
    plan, con = p.plan, console()
    con.print(_chain_table(f"Plan preview: {plan.rank_method}, {plan.target.kind} ≤ "
                           f"{plan.target.ratio} (not decomposed)", p.rows))
    con.print(f"Plan: {len(plan.layers)} layers factorized; MACs {human(plan.macs)} = "
              f"{plan.macs_ratio:.3f} of {human(plan.base_macs)}, params {human(plan.params)} = "
              f"{plan.params_ratio:.3f} of {human(plan.base_params)} (census arithmetic; "
              "search re-counts the built model with FlopCounterMode).", highlight=False)


def render_chains(plan, rows: list[dict], c) -> None:
    """A compressed model's factorized chains, one row per planned layer."""
    con = console()
    con.print(_chain_table(f"{plan.arch}: {len(plan.layers)} factorized layers "
                           f"({plan.rank_method or 'plan'})", rows))
    con.print(f"Compressed: MACs {human(c.total_macs)} counted = "
              f"{c.total_macs / max(plan.base_macs, 1):.3f} of the original "
              f"{human(plan.base_macs)}; params {human(plan.params)} = "
              f"{plan.params_ratio:.3f} of {human(plan.base_params)}.", highlight=False)


def render_search(report: dict) -> None:
    tot, acc = report["totals"], report["accuracy"]
    t = Table(title=f"{report['model']['arch']} → {report['config']['decomp']} / "
              f"{report['config']['method']}, target {report['target']['kind']} "
              f"{report['target']['ratio']}")
    t.add_column("")
    t.add_column("original", justify="right")
    t.add_column("compressed", justify="right")
    t.add_column("ratio", justify="right")
    t.add_row("MACs", human(tot["macs_before"]), human(tot["macs_after"]),
              f"{tot['macs_ratio']:.3f}")
    t.add_row("params", human(tot["params_before"]), human(tot["params_after"]),
              f"{tot['params_ratio']:.3f}")
    if has_accuracy(report):
        t.add_row("top-1 (test), after decomposition", f"{acc['original']['top1']:.2f}",
                  f"{acc['decomposed']['top1']:.2f}", "")
    if acc.get("bn_recalibrated"):
        bn = report.get("bn_recalibration") or {}
        t.add_row(f"top-1 (test), BatchNorm re-estimated ({bn.get('layers', '?')} layers)", "",
                  f"{acc['bn_recalibrated']['top1']:.2f}", "")
    if "finetuned" in acc:
        t.add_row("top-1 (test), after fine-tuning", "", f"{acc['finetuned']['top1']:.2f}", "")
    con = console()
    con.print(t)
    for line in data_notes(report):
        con.print(line, highlight=False)
    lat = report.get("latency") or {}
    if lat.get("summary"):
        c = lat["config"]
        con.print(f"Latency ({c['engine']}, {c['threads']} thread(s), batch {c['batch']}): "
                  f"{lat['summary']}; MACs ratio {lat['macs_ratio']:.3f}.", highlight=False)
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in report["seconds"].items())
    con.print(f"Time: {secs}.")


def _latency_table(lat: dict, names: tuple[str, ...]) -> Table:
    t = Table(title=f"Latency, median of {lat['config']['repeats']} runs "
              f"(after {lat['config']['warmup']} warm-up)")
    for col in ("engine", "device", "threads", "batch"):
        t.add_column(col)
    for n in names:
        t.add_column(f"{n} ms", justify="right")
    compare = "speedup" in (lat["runs"][0] if lat["runs"] else {})
    if compare:
        t.add_column("speed-up", justify="right")
        t.add_column("of ideal", justify="right")
    for r in lat["runs"]:
        cells = [r["engine"], r["device"], "-" if r["threads"] is None else str(r["threads"]),
                 str(r["batch"]), *(f"{r['median_ms'][n]:.3f}" for n in names)]
        if compare:
            cells += [f"{r['speedup']:.2f}x", f"{100 * r['achieved_over_ideal']:.0f}%"]
        t.add_row(*cells)
    return t


def render_latency(lat: dict, con: Console | None = None) -> None:
    con = con or console()
    # the models every row timed (an INT8 export times four in ONNX Runtime, two in PyTorch)
    names = tuple(n for n in lat["runs"][0]["median_ms"]
                  if all(n in r["median_ms"] for r in lat["runs"])) if lat["runs"] else ()
    con.print(_latency_table(lat, names))
    if "ideal_speedup" in lat:
        con.print(f"Ideal speed-up (MACs ratio): {lat['ideal_speedup']:.2f}x; original model: "
                  f"{lat.get('original_weights', '?')}.")
    if lat.get("layers"):
        t = Table(title="Per-layer latency, PyTorch eager (1 CPU thread)")
        for col, just in (("layer", "left"), ("factorization", "left"), ("rank", "left"),
                          ("batch", "right"), ("dense ms", "right"), ("factorized ms", "right"),
                          ("speed-up", "right"), ("ideal", "right"), ("", "left")):
            t.add_column(col, justify=just)
        for r in lat["layers"]:
            rank = "x".join(map(str, r["rank"])) if isinstance(r["rank"], list) else str(r["rank"])
            t.add_row(r["name"], r.get("chain", r["factorization"]), rank, str(r["batch"]),
                      f"{r['dense_ms']:.4f}", f"{r['factorized_ms']:.4f}", f"{r['speedup']:.2f}x",
                      f"{r['ideal_speedup']:.2f}x", "SLOWER" if r["slower"] else "")
        con.print(t)
    if lat.get("warnings"):  # the library logged the summary already
        con.print(f"{len(lat['warnings'])} factorized layer(s) slower than the dense layer they "
                  "replaced (marked SLOWER; the warning above names the slowest).")
    for n in lat.get("notes", []):
        con.print(f"Note: {n}")


def render_export(res) -> None:
    con = console()
    sec = res.section
    if "onnx" in sec:
        from lrcompress.report.write import onnx_summary

        for line in onnx_summary(sec["onnx"]):
            con.print(line)
    if "safetensors" in sec:
        s = sec["safetensors"]
        where = s.get("copied_to", s["path"])
        con.print(f"safetensors: {where} ({human(s['bytes'])}B): {s['reload']}.")
    if sec.get("latency"):
        render_latency(sec["latency"], con)
    if "int8" in sec:
        from lrcompress.report.write import int8_summary

        for line in int8_summary(sec["int8"]):
            con.print(line, highlight=False)
        for r in (sec["int8"].get("latency") or {}).get("runs", []):
            con.print(f"INT8 latency {r['device']} {r['threads']} thread(s) batch {r['batch']}: "
                      + ", ".join(f"{k} {v:.3f} ms ({r['speedup'][k]:.2f}x)"
                                  for k, v in r["median_ms"].items()), highlight=False)
        tradeoff = (sec["int8"].get("latency") or {}).get("tradeoff")
        if tradeoff:
            con.print(tradeoff, highlight=False)
    con.print(f"Updated {res.run_dir}/report.json, report.md, report.html.")


def render_eval(d: dict) -> None:
    con = console()
    a, m = d["accuracy"], d["model"]
    kind = f"compressed, {m['factorized_layers']} factorized layers" if m["compressed"] else "dense"
    t = Table(title=f"{m['arch']} ({kind}) on {d['data']['spec']}, input "
              f"{'x'.join(map(str, d['data']['input_size']))}")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("top-1 %", f"{a['top1']:.2f}")
    t.add_row("top-5 %", f"{a['top5']:.2f}")
    t.add_row("loss", f"{a['loss']:.4f}")
    t.add_row("test samples", str(a["n"]))
    t.add_row("MACs", f"{human(d['macs'])} ({d['macs']:,})")
    t.add_row("params", f"{human(d['params'])} ({d['params']:,})")
    con.print(t)
    if d.get("latency"):
        render_latency(d["latency"], con)


def render_gate(res) -> None:
    t = Table(title=f"gate {res.run}")
    for col, just in (("budget", "left"), ("value", "right"), ("verdict", "left"),
                      ("from", "left")):
        t.add_column(col, justify=just)
    for c in res.checks:
        t.add_row(c.budget, f"{c.value:g}", "pass" if c.passed else "FAIL", c.detail)
    con = console()
    con.print(t)
    con.print("All budgets hold." if res.passed else
              f"{len(res.failed)} of {len(res.checks)} budget(s) failed.")
