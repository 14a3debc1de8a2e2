"""Human-readable rendering of library results (tables on stdout, via rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


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


def render_census(c) -> None:
    t = Table(title=f"{c.arch} at input {'x'.join(map(str, c.input_size))}", show_lines=False)
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
        f"Factorizable: {sum(r.candidate for r in c.rows)} of {len(c.rows)} layers, "
        f"{100 * c.candidate_macs / max(c.total_macs, 1):.1f}% of MACs; smallest reachable MACs "
        f"ratio ≈ {c.min_reachable_macs_ratio:.3f}."
    )


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
    t.add_row("top-1 (test), after decomposition", f"{acc['original']['top1']:.2f}",
              f"{acc['decomposed']['top1']:.2f}", "")
    if "finetuned" in acc:
        t.add_row("top-1 (test), after fine-tuning", "", f"{acc['finetuned']['top1']:.2f}", "")
    con = console()
    con.print(t)
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in report["seconds"].items())
    con.print(f"Time: {secs}.")
