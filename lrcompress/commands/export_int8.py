"""The INT8 stage of ``export``: quantize a RUN's compressed model (and, as the quantization-only
baseline, its original model) with ONNX Runtime, calibrated on the run's own calibration split,
and check the INT8 graph's top-1 against the FP32 graph's on the run's test split.

Inputs: the calibration split of the run's data, rebuilt with the run's split settings (seed,
calibration fraction and subset), ``--int8-batches`` batches of ``batch_size`` samples. A data-free
run has none: its synthetic batch (``RUN/state/synthetic.safetensors``) is used instead, half for
calibration and half to compare INT8 with FP32 predictions (said so in the report). ``--data
SPEC`` replaces the run's data for both. The accuracy check reads the test split (the run's
``--eval-data`` one when it had one); without labels only the agreement of INT8 with FP32
predictions is measured, and the top-1 drop is reported as not measured.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lrcompress.calib.synthesize import load_synthetic
from lrcompress.commands.compress import SYNTHETIC_FILE
from lrcompress.data import DataConfig, build_loaders, parse_data_spec, resolve_preprocess
from lrcompress.deploy.int8 import (
    Int8Config,
    agreement,
    balance_chains,
    chain_spread,
    check_drop,
    check_graph,
    drop_advice,
    nodes_for,
    noisiest_layers,
    predict,
    quantize,
    top1,
    unquantized,
)
from lrcompress.deploy.onnx import export_onnx, op_counts
from lrcompress.errors import UserError
from lrcompress.util.run_files import STATE_DIR

log = logging.getLogger(__name__)
INT8_FILE = "model.int8.onnx"
# The original model quantized alike, written only when export advises quantizing it alone.
ORIGINAL_INT8_FILE = "original.int8.onnx"
TEST_BATCH = 64


@dataclass
class Int8Inputs:
    calib: list[np.ndarray]  # calibration batches (N×C×H×W float32)
    calib_source: str
    check: list[np.ndarray]  # accuracy-check batches
    labels: np.ndarray | None  # their labels (None: unlabelled, agreement only)
    check_source: str


@dataclass
class Int8Graphs:
    section: dict  # what report.json gets under export.int8
    compressed: bytes  # model.int8.onnx
    timing: dict[str, bytes]  # the four dynamic-batch graphs for latency


def _loaders(spec: str, report: dict, model: nn.Module, batch_size: int):
    m, conf = report["model"], report.get("config") or {}
    dconf = conf.get("data") or {}
    dspec = parse_data_spec(spec)
    pre = resolve_preprocess(model, dspec, input_size=m["input_size"], mean=conf.get("mean"),
                             std=conf.get("std"), in_chans=m["in_chans"])
    dcfg = DataConfig(batch_size=batch_size, calib_fraction=dconf.get("calib_fraction", 0.1),
                      seed=int(dconf.get("seed", report.get("seed") or 0)),
                      calib_subset=dconf.get("calib_subset"),
                      test_subset=dconf.get("test_subset"), augment=False)
    return build_loaders(dspec, pre, dcfg, num_classes=m["num_classes"])


def _batches(loader, limit: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    xs, ys = [], []
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        x, y = batch if isinstance(batch, (list, tuple)) else (batch, None)
        xs.append(x.float().numpy())
        if y is not None:
            ys.append(y.numpy())
    return xs, ys


def _split(x: torch.Tensor, n: int) -> list[np.ndarray]:
    return [x[i:i + n].float().numpy() for i in range(0, len(x), n)]


def _synthetic(run, report: dict, cfg: Int8Config) -> tuple[list, str, list, str]:
    path = run / STATE_DIR / SYNTHETIC_FILE
    if not path.is_file():
        raise UserError(f"{run} is a data-free run without a synthetic batch ({path} is missing: "
                        "no stage of the search read inputs), so there is nothing to calibrate "
                        "INT8 activations on. Pass --data SPEC (a few hundred real images, e.g. "
                        "--data imagefolder:DIR) to calibrate on.")
    x = load_synthetic(path).inputs
    half = max(1, len(x) // 2)
    cal, chk = x[:half][: cfg.batches * cfg.batch_size], x[half:] if len(x) > 1 else x
    log.warning("%s is a data-free run: INT8 is calibrated on %d of its %d synthetic inputs "
                "(%s) and compared with FP32 on the other %d (agreement only: no labels).",
                run, len(cal), len(x), path.name, len(chk))
    return (_split(cal, cfg.batch_size), f"synthetic batch ({len(cal)} inputs, data-free run)",
            _split(chk, TEST_BATCH), f"{len(chk)} held-out synthetic inputs (data-free run)")


def int8_inputs(run, report: dict, model: nn.Module, cfg: Int8Config,
                data: str | None = None) -> Int8Inputs:
    """Calibration and accuracy-check inputs of a run (see the module docstring)."""
    d = report["data"]
    if data is None and report.get("data_free"):
        cal, cal_src, chk, chk_src = _synthetic(run, report, cfg)
        if not d.get("eval_spec"):
            return Int8Inputs(cal, cal_src, chk, None, chk_src)
        test = _loaders(d["eval_spec"], report, model, TEST_BATCH).test
        xs, ys = _batches(test)
        return Int8Inputs(cal, cal_src, xs, np.concatenate(ys), f"test split of {d['eval_spec']}")
    spec = data or d["spec"]
    try:
        loaders = _loaders(spec, report, model, cfg.batch_size)
        cal, _ = _batches(loaders.calib, cfg.batches)
        test_spec = data or d.get("eval_spec") or spec
        test = loaders.test if test_spec == spec else _loaders(test_spec, report, model,
                                                               TEST_BATCH).test
        xs, ys = _batches(test) if test is not None else ([], [])
    except UserError as e:
        raise UserError(f"INT8 calibration needs the run's data {spec}, which cannot be read "
                        f"here ({e}). Pass --data SPEC to calibrate and check on other data.") \
            from e
    n_cal = sum(len(b) for b in cal)
    if not xs:  # unlabelled images: the calibration split is all there is
        return Int8Inputs(cal, f"calibration split of {spec} ({n_cal} samples)", cal, None,
                          f"the {n_cal} calibration samples (unlabelled data: agreement only)")
    return Int8Inputs(cal, f"calibration split of {spec} ({n_cal} samples)", xs,
                      np.concatenate(ys) if ys else None, f"test split of {test_spec}")


def _graph(model: nn.Module, input_size, opset: int) -> bytes:
    return export_onnx(model, input_size, opset=opset, dynamic_batch=True).SerializeToString()


def _accuracy(graphs: dict[str, bytes | None], inp: Int8Inputs) -> dict:
    logits = {n: predict(g, inp.check) for n, g in graphs.items() if g is not None}
    out = {"inputs": inp.check_source, "n": int(sum(len(b) for b in inp.check)),
           "labelled": inp.labels is not None,
           "top1": {n: top1(v, inp.labels) for n, v in logits.items()},
           "agreement_with_fp32": {
               n: agreement(logits[n.removesuffix("_int8")], v)
               for n, v in logits.items() if n.endswith("_int8") and n[:-5] in logits}}
    t = out["top1"]
    out["drop"] = (round(t["compressed"] - t["compressed_int8"], 4)
                   if inp.labels is not None else None)
    return out


def int8_stage(run, report: dict, compressed: nn.Module, original: nn.Module | None,
               layers: list[str], input_size, cfg: Int8Config, *, opset: int,
               data: str | None = None, original_random: bool = False,
               progress=None) -> Int8Graphs:
    """Quantize, check and measure (accuracy); raises Int8AccuracyError past ``max_drop``.
    ``original``: the dense model, quantized alike as the baseline (``original_random``: its
    checkpoint is gone, so it is timed but its accuracy is not measured)."""
    stage = progress.stage if progress else (lambda *_a, **_k: None)
    inp = int8_inputs(run, report, compressed, cfg, data)
    stage("exporting float graphs for INT8")
    fp32 = _graph(compressed, input_size, opset)
    to_quantize, balanced = compressed, []
    if cfg.balance:
        to_quantize, balanced = balance_chains(compressed, layers)
    excluded = nodes_for(check_graph(fp32), cfg.exclude)  # bad names: exit 2 before any work
    stage(f"quantizing to INT8 ({cfg.calibration} calibration)")
    q = quantize(_graph(to_quantize, input_size, opset) if balanced else fp32, inp.calib, cfg,
                 excluded)
    proto = check_graph(q)
    missing = [n for n in unquantized(proto, layers) if n not in excluded]
    orig_fp32 = orig_q = None
    if original is not None:
        orig_fp32 = _graph(original, input_size, opset)
        orig_q = quantize(orig_fp32, inp.calib, cfg,
                          nodes_for(check_graph(orig_fp32), cfg.exclude, strict=False))
    stage("checking INT8 accuracy in ONNX Runtime")
    acc = _accuracy({"compressed": fp32, "compressed_int8": q,
                     "original": None if original_random else orig_fp32,
                     "original_int8": None if original_random else orig_q}, inp)
    if acc["drop"] is not None and acc["drop"] > cfg.max_drop:
        advice = drop_advice(cfg, noisiest_layers(q, inp.check[0]))
        check_drop(acc["drop"], cfg, advice, f"{acc['top1']['compressed']:.2f} -> "
                   f"{acc['top1']['compressed_int8']:.2f} % on {acc['n']} {acc['inputs']}")
    section = {
        "path": INT8_FILE, "bytes": len(q), "sha256": hashlib.sha256(q).hexdigest(),
        "quantizer": "onnxruntime.quantization.quantize_static (QDQ, per-channel int8 weights, "
                     "uint8 activations), after quant_pre_process",
        "config": cfg.to_dict(), "calibration_inputs": inp.calib_source,
        "data_free": bool(report.get("data_free")) and data is None,
        "input": {"shape": ["batch", *input_size]}, "ops": op_counts(proto),
        "checker": "onnx.checker.check_model(full_check=True) passed",
        "balanced_chains": balanced, "excluded_nodes": excluded,
        "chain_weight_spread": {"before": round(chain_spread(compressed, layers), 3),
                                "after": round(chain_spread(to_quantize, layers), 3)},
        "factor_convs_without_qdq": missing, "accuracy": acc,
        "original_int8": "quantized with the same settings" if original is not None else None,
    }
    timing = {"original": orig_fp32, "compressed": fp32, "original_int8": orig_q,
              "compressed_int8": q}
    return Int8Graphs(section, q, {k: v for k, v in timing.items() if v is not None})


__all__ = ["INT8_FILE", "ORIGINAL_INT8_FILE", "Int8Graphs", "Int8Inputs", "int8_inputs",
           "int8_stage"]
