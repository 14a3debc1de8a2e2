"""``gate``: a CI check that a run stays within its budgets.

Budgets: the top-1 drop in points (original − final top-1, the final model being the fine-tuned
one when the run fine-tuned, else the decomposed one; with a baseline run, that run's final top-1
replaces the original's), the MACs reduction (1 − MACs ratio, counted by FlopCounterMode), and
the measured speed-up (from ``lrcompress export``'s latency section). :func:`gate` returns every
check with its value and verdict; the CLI exits 1 when one fails. The run's files (and the
baseline's) must match the checksums their report.json records, and a baseline must have been
evaluated on the same test images (``data.test_digest``). :func:`junit_xml` renders the
checks as JUnit XML for CI systems (one testcase per budget, a failure element for each failed
one).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

from lrcompress.commands.run_dir import verify_files
from lrcompress.errors import UserError
from lrcompress.report.schema import (
    ACCURACY_STAGES,
    final_accuracy,
    has_accuracy,
    read_report,
)
from lrcompress.util.io import cannot_write_in, write_text
from lrcompress.util.run_files import REPORT_FILE


@dataclass(frozen=True)
class GateConfig:
    max_top1_drop: float | None = None  # points of top-1 the model may lose (e.g. 1.0)
    min_flops_reduction: float | None = None  # at least this share of MACs removed, in [0, 1)
    min_speedup: float | None = None  # measured speed-up at least this (needs `export`)
    speedup_engine: str = "onnxruntime"  # which latency row --min-speedup reads: onnxruntime|torch
    speedup_batch: int = 1  # ... at this batch size, all threads, on the CPU
    baseline: str | None = None  # another RUN: compare with its final top-1, not the original's
    int8: bool = False  # read the INT8 rows of `export --int8` (model.int8.onnx) instead
    allow_modified: bool = False  # judge runs whose files differ from their recorded sha256

    def __post_init__(self):
        if all(v is None for v in (self.max_top1_drop, self.min_flops_reduction,
                                   self.min_speedup)):
            raise UserError("Give at least one budget: --max-top1-drop PTS, "
                            "--min-flops-reduction R or --min-speedup S.")
        for flag, v in (("--max-top1-drop", self.max_top1_drop),
                        ("--min-flops-reduction", self.min_flops_reduction),
                        ("--min-speedup", self.min_speedup)):
            if v is not None and not math.isfinite(v):
                raise UserError(f"{flag} {v} is not a finite number: a budget no value can be "
                                "compared with. Give a number, e.g. --max-top1-drop 1.0.")
        if self.min_flops_reduction is not None and not 0 <= self.min_flops_reduction < 1:
            raise UserError(f"--min-flops-reduction {self.min_flops_reduction} is the share of "
                            "MACs removed, in [0, 1): 0.5 means at least half of them.")
        if self.min_speedup is not None and self.min_speedup <= 0:
            raise UserError(f"--min-speedup {self.min_speedup} must be > 0 (e.g. 1.5).")
        if self.speedup_engine not in ("onnxruntime", "torch"):
            raise UserError(f"--speedup-engine {self.speedup_engine!r}: use onnxruntime or "
                            "torch.")
        if self.int8 and self.speedup_engine != "onnxruntime":
            raise UserError("--int8 reads model.int8.onnx's ONNX Runtime timings: use "
                            "--speedup-engine onnxruntime (the default).")


@dataclass(frozen=True)
class Check:
    budget: str  # e.g. "top-1 drop <= 1.0 pts"
    value: float
    passed: bool
    detail: str  # where the value comes from

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GateResult:
    run: str
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"run": self.run, "passed": self.passed,
                "checks": [c.to_dict() for c in self.checks]}


def _int8_section(report: dict, run: Path, what: str) -> dict:
    q = (report.get("export") or {}).get("int8")
    if not q or not q.get(what):
        raise UserError(f"--int8 needs the INT8 {what} of `lrcompress export {run} --int8`, and "
                        f"{run}/report.json has none. Run that export first"
                        + (" (without --no-latency)." if what == "latency" else "."))
    return q


def _int8_speedup(report: dict, run: Path, cfg: GateConfig) -> tuple[float, str]:
    """The compressed INT8 model's speed-up over the original FP32 model (ONNX Runtime CPU)."""
    runs = _int8_section(report, run, "latency")["latency"]["runs"]
    rows = [r for r in runs if r["device"] == "cpu" and r["batch"] == cfg.speedup_batch]
    rows = [r for r in rows if r.get("all_threads")] or rows
    if not rows:
        raise UserError(f"{run}/report.json has no INT8 CPU latency at batch {cfg.speedup_batch} "
                        f"(measured: {sorted({r['batch'] for r in runs})}). Pass --speedup-batch "
                        "with a measured one.")
    r, ms = rows[0], rows[0]["median_ms"]
    return r["speedup"]["compressed_int8"], (
        f"onnxruntime cpu, {r['threads']} thread(s), batch {r['batch']}: original FP32 "
        f"{ms['original']:.3f} ms -> compressed INT8 {ms['compressed_int8']:.3f} ms (original "
        f"INT8 {ms['original_int8']:.3f} ms)")


def _speedup(report: dict, run: Path, cfg: GateConfig) -> tuple[float, str]:
    if cfg.int8:
        return _int8_speedup(report, run, cfg)
    lat = (report.get("export") or {}).get("latency")
    if not lat or not lat.get("runs"):
        raise UserError(f"--min-speedup needs measured latency, and {run}/report.json has no "
                        f"export latency section. Run `lrcompress export {run}` first (without "
                        "--no-latency).")
    rows = [r for r in lat["runs"] if r["engine"] == cfg.speedup_engine and r["device"] == "cpu"
            and r["batch"] == cfg.speedup_batch]
    rows = [r for r in rows if r.get("all_threads")] or rows
    if not rows:
        have = sorted({(r["engine"], r["batch"]) for r in lat["runs"] if r["device"] == "cpu"})
        raise UserError(f"{run}/report.json has no {cfg.speedup_engine} CPU latency at batch "
                        f"{cfg.speedup_batch} (measured: {have}). Pass --speedup-batch with a "
                        "measured one, or re-run `lrcompress export` with that batch size.")
    r = rows[0]
    return r["speedup"], (f"{r['engine']} cpu, {r['threads']} thread(s), batch {r['batch']}: "
                          f"{r['median_ms']['original']:.3f} ms -> "
                          f"{r['median_ms']['compressed']:.3f} ms (ideal "
                          f"{lat['ideal_speedup']:.2f}x)")


def gate(run_dir, cfg: GateConfig) -> GateResult:
    """Check ``run_dir`` against the budgets in ``cfg``; bad input raises UserError."""
    run = Path(run_dir)
    report = read_report(run)
    verify_files(run, report, cfg.allow_modified)
    try:
        return GateResult(str(run), tuple(_checks(report, run, cfg)))
    except (KeyError, TypeError, StopIteration) as e:
        raise UserError(f"{run}: its report.json lacks what the budgets read ({type(e).__name__}"
                        f" {e}): it was edited, or not written by `lrcompress search`. Re-run "
                        "the search to rewrite it.") from e


def _checks(report: dict, run: Path, cfg: GateConfig) -> list[Check]:
    checks = []
    if cfg.max_top1_drop is not None:
        checks.append(_top1_check(report, run, cfg))
    if cfg.min_flops_reduction is not None:
        tot = report["totals"]
        red = 1 - tot["macs_ratio"]
        checks.append(Check(f"MACs reduction >= {cfg.min_flops_reduction:g}", round(red, 4),
                            red >= cfg.min_flops_reduction,
                            f"{tot['macs_before']:,} -> {tot['macs_after']:,} MACs "
                            f"({tot.get('macs_counted_by', '')})"))
    if cfg.min_speedup is not None:
        sp, what = _speedup(report, run, cfg)
        checks.append(Check(f"speed-up >= {cfg.min_speedup:g}x", sp, sp >= cfg.min_speedup,
                            what))
    return checks


def _no_accuracy(run, why: str) -> UserError:
    return UserError(f"--max-top1-drop needs measured accuracy, but {run} {why}: it had no "
                     "labelled test data (a data-free run, or unlabelled images, without "
                     "--eval-data). Re-run the search with --eval-data SPEC, or gate it only on "
                     "--min-flops-reduction / --min-speedup.")


def _top1_check(report: dict, run: Path, cfg: GateConfig) -> Check:
    """The top-1 drop from the original's (or the baseline run's) top-1 to the final one's."""
    if not has_accuracy(report) or not _has_final(report):
        raise _no_accuracy(run, "measured none")
    stage, fin = final_accuracy(report)
    ort_ref = None
    if cfg.int8:
        acc = _int8_section(report, run, "accuracy")["accuracy"]
        if acc["drop"] is None:
            raise UserError(f"{run}'s INT8 check had no labelled test data ({acc['inputs']}), "
                            "so --int8 --max-top1-drop has no INT8 top-1 to read. Re-run "
                            "`lrcompress export --int8 --data SPEC` with labelled data.")
        stage, fin = "INT8 (ONNX Runtime)", {"top1": acc["top1"]["compressed_int8"]}
        ort_ref = acc["top1"].get("original")  # the original FP32 graph on the same inputs
    if cfg.baseline:
        base = _baseline_report(run, report, cfg)
        if not has_accuracy(base) or not _has_final(base):
            raise _no_accuracy(cfg.baseline, "(the --baseline) measured none")
        bstage, bacc = final_accuracy(base)
        ref, ref_what = bacc["top1"], f"baseline {cfg.baseline} ({bstage}) {bacc['top1']:.2f}"
    elif ort_ref is not None:
        ref, ref_what = ort_ref, f"original FP32 (ONNX Runtime) {ort_ref:.2f}"
    else:
        ref = report["accuracy"]["original"]["top1"]
        ref_what = f"original {ref:.2f}"
    drop = ref - fin["top1"]
    return Check(f"top-1 drop <= {cfg.max_top1_drop:g} pts", round(drop, 4),
                 drop <= cfg.max_top1_drop,
                 f"{ref_what} -> {stage} {fin['top1']:.2f} (% top-1, "
                 f"{report['data']['test_samples']} test samples)")


def _has_final(report: dict) -> bool:
    return any((report.get("accuracy") or {}).get(s) for s in ACCURACY_STAGES)


def _report_file(path) -> Path:
    p = Path(path)
    return (p if p.is_file() else p / REPORT_FILE).resolve()


def _baseline_report(run: Path, report: dict, cfg: GateConfig) -> dict:
    """The --baseline's report, once it is known to be another run, unmodified, measured on
    exactly the same test images (the same test_digest)."""
    if _report_file(cfg.baseline) == _report_file(run):
        raise UserError(f"--baseline {cfg.baseline} is the run being gated itself: the drop "
                        "would always be 0. Give the run to compare with (e.g. the main "
                        "branch's RUN).")
    base = read_report(cfg.baseline)
    verify_files(cfg.baseline, base, cfg.allow_modified)
    mine, theirs = (r.get("data") or {} for r in (report, base))
    for key in ("spec", "eval_spec", "test_samples"):
        if theirs.get(key) != mine.get(key):
            raise UserError(f"--baseline {cfg.baseline} was evaluated on other data "
                            f"({key} {theirs.get(key)!r} vs {mine.get(key)!r}): accuracies are "
                            "only comparable on the same test set.")
    a, b = mine.get("test_digest"), theirs.get("test_digest")
    if a is None or b is None:
        which = run if a is None else cfg.baseline
        raise UserError(f"{which} does not record which test images it was evaluated on (no "
                        "data.test_digest: an older lrcompress, or test data given as Python "
                        "batches), so its accuracy cannot be compared with another run's on the "
                        "same test set. Re-run the search with this version.")
    if a != b:
        raise UserError(f"--baseline {cfg.baseline} was evaluated on other test images than "
                        f"{run} (their test_digest differs: another --seed or --test-subset "
                        "picks other images, or the data changed): accuracies are only "
                        "comparable on the same test set. Re-run one of them with the other's "
                        "--seed and --test-subset.")
    return base


def check_junit_path(path) -> None:
    """UserError when a JUnit file cannot be written at ``path`` (checked before any work)."""
    p = Path(path)
    if not str(path).strip() or p.is_dir():
        raise UserError(f"--junit {str(path)!r} is not a file path: give a file to write, e.g. "
                        "--junit gate.xml.")
    probe = p.absolute().parent
    while not probe.exists():  # missing folders are created
        probe = probe.parent
    why = (f"{probe} is a file, not a folder" if not probe.is_dir() else
           "permission denied" if not os.access(probe, os.W_OK) else cannot_write_in(probe))
    if why:
        raise UserError(f"Cannot write --junit {p} ({why}). Give a path in a folder you can "
                        "write to.")


def write_junit(path, result: GateResult) -> None:
    """The checks as JUnit XML at ``path`` (atomically); UserError when it cannot be written."""
    try:
        write_text(path, junit_xml(result))
    except OSError as e:
        raise UserError(f"Cannot write --junit {path} ({e.strerror or e}). Give a path in a "
                        "folder you can write to.") from e


def junit_xml(result: GateResult) -> str:
    """JUnit XML: one testsuite, a testcase per budget, a failure element per failed budget."""
    suite = ET.Element("testsuite", name="lrcompress gate", tests=str(len(result.checks)),
                       failures=str(len(result.failed)), errors="0", skipped="0")
    for c in result.checks:
        case = ET.SubElement(suite, "testcase", name=c.budget, time="0",
                             classname=f"lrcompress.gate.{Path(result.run).name}")
        if not c.passed:
            fail = ET.SubElement(case, "failure", message=f"{c.budget}: value {c.value:g}",
                                 type="BudgetExceeded")
            fail.text = c.detail
        else:
            ET.SubElement(case, "system-out").text = f"value {c.value:g}; {c.detail}"
    root = ET.Element("testsuites", name="lrcompress", tests=suite.get("tests"),
                      failures=suite.get("failures"))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
