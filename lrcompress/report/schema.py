"""The report schema: one place that writes ``report.json`` and reads it back.

``build_report`` assembles the report of a compression job; ``read_report`` reads one and checks
its schema version; ``final_accuracy`` names the accuracy of the model a run ships. ``gate``,
``export``, ``eval`` and the renderers read reports only through these functions and the keys
documented in :data:`SECTIONS`.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

from lrcompress._version import __version__
from lrcompress.batches import sample_count
from lrcompress.data import test_set_digest
from lrcompress.errors import UserError
from lrcompress.factorizations import break_even_rank, get_factorization, is_matrix
from lrcompress.model.costs import dense_macs, dense_params
from lrcompress.util.run_files import REPORT_FILE

SCHEMA = 1
# Top-level sections of report.json and what each holds.
SECTIONS = {
    "schema": "this schema's version (SCHEMA)",
    "lrcompress_version": "the version that wrote it",
    "command": "the command line (or ['lrcompress.compress'] for the Python API)",
    "seed": "the run's seed",
    "config": "CompressConfig.to_dict()",
    "model": "source, arch, num_classes, in_chans, input_size",
    "data": "spec (calibration/training), eval_spec (--eval-data: the test set, if another), "
            "test_samples (None: accuracy not measured), test_digest (sha256 naming the test "
            "samples: spec, rows, labels; None without test data or for Python batches), "
            "calib_batches, train_samples",
    "data_free": "no calibration data: how the inputs were synthesised (method, config, "
                 "BatchNorm-statistics match before/after, seconds) and what used them; or None",
    "target": "kind, ratio",
    "totals": "MACs and params before/after (FlopCounterMode), their ratios",
    "accuracy": "original, decomposed, bn_recalibrated, finetuned: Accuracy dicts (as present)",
    "bn_recalibration": "BatchNorm re-estimation summary, or None",
    "finetune": "fine-tuning history and settings, or None",
    "lorita": "LoRITa pre-tuning summary, or None",
    "narrowing": "--narrow-hidden: keep, the narrowed dense model's MACs/params, per block the "
                 "hidden width, kept width and relative output error of the fit, and the "
                 "accuracy after narrowing; or None",
    "latency": "latency target / --latency-aware: engine, candidate table, attempts (measured "
               "ratio, spread, MACs ratio), met; or None",
    "layers": "a row per conv/linear layer: factorization, rank, costs, reconstruction error; "
              "factorized layers also chain (the chain built: svd for linear and 1×1 layers), "
              "full_rank and break_even_rank",
    "fit": "fit='activation': per layer the fit used and the relative output error on the "
           "calibration inputs of it and of the weight fit; None for the weight fit",
    "skipped": "layer -> why it was not factorized",
    "search": "the rank method's trace",
    "resumed": "whether the run continued an interrupted one",
    "seconds": "time per stage",
    "versions": "library versions and device",
    "resources": "batch sizes used (--auto-batch)",
    "export": "added by `lrcompress export`: onnx, safetensors, latency",
    "files": "sha256 of every file the run (and export) wrote in RUN/, by path relative to RUN/ "
             "(report.json itself excepted); export, eval and gate refuse a run whose files "
             "differ",
}
ACCURACY_STAGES = ("finetuned", "bn_recalibrated", "decomposed")


def build_report(job, plan, trace, dec, counted, accuracy, bn_report, ft_report, lorita_report,
                 calib_batches: int) -> dict:
    """report.json of a finished job (``seconds`` is filled in by the caller)."""
    problem, cfg, info = job.problem, job.cfg, job.info
    macs, params = counted
    acc = {k: v.to_dict() for k, v in accuracy.items() if v is not None}
    loaders = job.loaders
    return {
        "schema": SCHEMA,
        "lrcompress_version": __version__,
        "command": job.command or sys.argv,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "model": {"source": info.source, "arch": info.arch, "num_classes": info.num_classes,
                  "in_chans": info.in_chans, "input_size": list(job.input_size)},
        "data": {"spec": loaders.description, "eval_spec": loaders.eval_description,
                 "test_samples": acc["original"]["n"] if "original" in acc else None,
                 "test_digest": test_set_digest(loaders.test, loaders.eval_description
                                                or loaders.description)
                 if "original" in acc else None,
                 "calib_batches": calib_batches,
                 "train_samples": sample_count(loaders.train)},
        "data_free": job.data_free,
        "target": {"kind": cfg.target.kind, "ratio": cfg.target.ratio},
        "totals": {
            "macs_before": problem.base_macs, "macs_after": macs,
            "macs_ratio": macs / problem.base_macs,
            "params_before": problem.base_params, "params_after": params,
            "params_ratio": params / problem.base_params,
            "macs_counted_by": "torch.utils.flop_counter.FlopCounterMode",
        },
        "accuracy": acc,
        "bn_recalibration": bn_report,
        "finetune": ft_report,
        "lorita": lorita_report,
        "narrowing": job.narrowed,
        "latency": job.latency,
        "layers": layer_rows(plan, problem.specs, dec.rel_errors, dec.retries),
        "fit": dec.fit,
        "skipped": problem.skipped,
        "search": trace,
        "resumed": job.run.resumed,
        "seconds": {},
        "versions": {"python": platform.python_version(), **library_versions(),
                     "lrcompress": __version__, "device": str(job.device)},
        "resources": {"auto_batch": cfg.auto_batch, "batch_size": loaders.batch_size,
                      "calib_batch_size": trace.get("calib_batch_size"),
                      "finetune_micro_batch": ft_report and ft_report["micro_batch"]},
    }


def layer_rows(plan, specs, errs: dict, retries: dict | None = None) -> list[dict]:
    """A row per conv/linear layer: what it became and what that costs. ``chain`` is the chain
    actually built (linear layers and 1×1 convs are an SVD pair whatever the factorization);
    ``full_rank`` and ``break_even_rank`` (the largest rank that still saves MACs) put the rank
    in scale."""
    planned = {lp.name: lp for lp in plan.layers}
    rows = []
    for s in specs:
        lp = planned.get(s.name)
        rows.append({
            "name": s.name, "kind": s.kind, "shape": list(s.weight_shape),
            "factorization": lp.factorization if lp else "dense",
            "rank": (list(lp.rank) if isinstance(lp.rank, tuple) else lp.rank) if lp else None,
            "macs_before": dense_macs(s), "macs_after": lp.macs if lp else dense_macs(s),
            "params_before": dense_params(s), "params_after": lp.params if lp else dense_params(s),
            "rel_error": errs.get(s.name),
            "decomposition_retries": (retries or {}).get(s.name, 0),
            **(rank_scale(lp) if lp else {"chain": "dense"}),
        })
    return rows


def rank_scale(lp) -> dict:
    """The chain a planned layer is built as, its full rank and its break-even rank."""
    fact = get_factorization(lp.factorization)
    return {"chain": "svd" if is_matrix(lp.spec) else fact.name,
            "full_rank": fact.scalar_rank(fact.max_rank(lp.spec)),
            "break_even_rank": break_even_rank(fact, lp.spec)}


def library_versions() -> dict:
    """Versions of the libraries that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for pkg in ("timm", "tensorly", "torchvision", "numpy", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def read_report(run) -> dict:
    """RUN/report.json (or the file itself), checked for the schema this version reads."""
    run = Path(run)
    if not run.exists():
        raise UserError(f"No such run: {run}. Give the folder written by "
                        "`lrcompress search ... -o RUN`.")
    if run.is_file() and run.name != REPORT_FILE:
        raise UserError(f"{run} is a file: give the RUN folder written by `lrcompress search` "
                        "(or its report.json).")
    path = run if run.is_file() else run / REPORT_FILE
    if not path.is_file():
        raise UserError(f"{run} has no report.json: it is not a finished run. "
                        "`lrcompress search ... -o RUN` writes it.")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-run the search to rewrite it.") from e
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        got = report.get("schema") if isinstance(report, dict) else None
        raise UserError(f"{path} has report schema {got!r}; this lrcompress reads schema "
                        f"{SCHEMA}. Re-run the search with this version.")
    return report


def final_accuracy(report: dict) -> tuple[str, dict]:
    """(stage, accuracy) of the model the run ships: the last stage it went through."""
    acc = report["accuracy"]
    stage = next(s for s in ACCURACY_STAGES if acc.get(s))
    return stage, acc[stage]


def has_accuracy(report: dict) -> bool:
    """Whether the run measured test accuracy (a Python-API run without eval data did not)."""
    return bool((report.get("accuracy") or {}).get("original"))


def data_notes(report: dict) -> list[str]:
    """What the run's inputs were, when that is not plain labelled data, and what follows."""
    lines, free = [], report.get("data_free") or {}
    if free.get("method") == "batchnorm statistics":
        m0, m1 = free["match_noise"], free["match"]
        lines.append(f"Data-free: {free['config']['samples']} inputs synthesised from "
                     f"{free['batchnorm_layers']} BatchNorm layers' statistics in "
                     f"{free['seconds']:.0f}s (mean/std error {m0['mean_err']:.2f}/"
                     f"{m0['std_err']:.2f} → {m1['mean_err']:.2f}/{m1['std_err']:.2f} of each "
                     f"channel's std), used for {', '.join(free['used_for'])}.")
    elif free.get("method"):
        lines.append(f"Data-free: inputs drawn at the model's input mean/std (no BatchNorm to "
                     f"synthesise from), used for {', '.join(free['used_for'])}.")
    if not has_accuracy(report):
        lines.append("Accuracy: not measured (no labelled test data). Pass --eval-data SPEC "
                     "to measure it; `lrcompress gate` accepts only non-accuracy budgets here.")
    return lines
