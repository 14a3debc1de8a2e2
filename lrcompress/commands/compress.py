"""The compression job as stages, shared by ``lrcompress search`` and ``lrcompress.compress``.

A :class:`Job` holds what every stage reads (the original model, the rank problem, the loaders,
the configuration, the run folder, the progress sink). :func:`run_stages` calls the stages in
order:

    [synthesise inputs] → evaluate original → [LoRITa | hidden-width narrowing] → rank selection
    → decomposition
    → target check → evaluate → BatchNorm re-estimation → evaluate
    → [distillation → evaluate] → save + report

Each stage is a function of a few dozen lines that returns a value; each one that takes long
keeps its result under RUN/state/ (through :class:`~lrcompress.commands.run_dir.RunDir`) so an
interrupted run resumes after the last finished stage. Without a run folder nothing is written.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn

from lrcompress.batches import sample_count
from lrcompress.calib.synthesize import SynthConfig
from lrcompress.commands.checks import (
    build_problem,
    check_batchnorm_batches,
    check_data_free,
    check_given_plan,
    rank_problem,
)
from lrcompress.commands.datafree import SYNTHETIC_FILE, synthesize_stage
from lrcompress.commands.decompose import decompose_stage
from lrcompress.commands.job import (
    DATA_METHODS,
    DEFAULT_RANK_MULTIPLE,
    CompressConfig,
    CompressResult,
    Decomposed,
    Job,
    Loaders,
    calibration_batches,
    fit_of,
    held_out_batches,
    make_target,
    need_loader,
    needs_data,
    re_estimates_bn,
    resolve_device,
    samples_of,
    timed,
)
from lrcompress.commands.latency_stage import (
    check_reachable,
    latency_stage,
    prepare_latency,
    timing_model,
)
from lrcompress.commands.selection import search_stats, select_ranks, select_stage
from lrcompress.errors import LrcError, TargetError
from lrcompress.measure.metrics import Accuracy, evaluate, independent_macs, param_count
from lrcompress.model.checkpoint import read_checkpoint
from lrcompress.model.narrow import narrow_hidden
from lrcompress.model.plan import Plan
from lrcompress.model.weights import save_compressed
from lrcompress.rank.signals import calib_loss
from lrcompress.recover.bn import batchnorms, recalibrate_bn
from lrcompress.recover.finetune import distill
from lrcompress.recover.lorita import lorita_train
from lrcompress.report.schema import build_report
from lrcompress.report.write import render_reports, write_rendered
from lrcompress.util.io import write_json, write_text
from lrcompress.util.run_files import (
    MODEL_FILE,
    PLAN_FILE,
    REPORT_FILE,
    STATE_DIR,
)

log = logging.getLogger(__name__)


def evaluate_stage(job: Job, model: nn.Module, name: str, title: str,
                   cached: bool = True) -> Accuracy | None:
    """Test accuracy of ``model`` (None without test data); kept as state/eval_<name>.json."""
    if job.loaders.test is None:
        return None
    saved = job.run.read_state_json(f"eval_{name}.json") if cached else None
    if saved is not None:
        return Accuracy(**saved)
    job.progress.stage(title, total=sample_count(job.loaders.test))
    acc = evaluate(model, job.loaders.test, job.device, progress=job.progress.advance)
    if cached:
        job.run.write_state_json(f"eval_{name}.json", acc.to_dict())
    return acc


def lorita_stage(job: Job) -> tuple[nn.Module, dict]:
    """LoRITa pre-tuning of the selected layers (resumable: RUN/state/lorita.*)."""
    cfg, run = job.cfg, job.run
    if run.has_state("lorita.safetensors") and run.has_state("lorita.json"):
        dense = copy.deepcopy(job.model).cpu()
        dense.load_state_dict(read_checkpoint(run.state("lorita.safetensors"))[0])
        return dense.to(job.device).eval(), run.read_state_json("lorita.json")
    need_loader(job.loaders.train, "LoRITa pre-tuning", "train")
    names = [lo.spec.name for lo in job.problem.layers]
    stub = Plan(job.info.arch, job.info.num_classes, job.info.in_chans, tuple(job.input_size),
                (), job.problem.base_macs, job.problem.base_params)
    job.progress.stage(f"LoRITa pre-tuning (N={cfg.lorita.factors})",
                       total=samples_of(job, cfg.lorita.steps))
    sub = run.state("lorita")
    if run.writes:
        sub.mkdir(parents=True, exist_ok=True)
    dense, summary = lorita_train(job.model, names, cfg.lorita, job.loaders, job.device, stub,
                                  state_dir=sub, progress=job.progress.advance,
                                  fingerprint=run.fingerprint_text, seed=cfg.seed)
    acc = evaluate_stage(job, dense, "lorita", "evaluating the LoRITa-tuned dense model",
                         cached=False)
    summary["dense_accuracy"] = acc.to_dict() if acc else None
    if run.writes:
        save_compressed(dense, stub, run.state("lorita.safetensors"))  # the dense architecture
        write_json(run.state("lorita.json"), summary)
    return dense, summary


def narrow_stage(job: Job, batches: list) -> nn.Module:
    """``--narrow-hidden``: the original with its blocks' hidden widths narrowed, fitted on the
    calibration batches (the widths the rank problem was built for). Deterministic, so a
    resumed run recomputes it (seconds). Records the blocks and the accuracy in
    ``job.narrowed``."""
    want = job.problem.narrowing
    job.progress.stage(f"narrowing hidden widths to {want.keep:g} (interpolative "
                       "decomposition on the calibration batches)")
    narrowed, blocks = narrow_hidden(job.model, [x for x, _ in batches], want.keep,
                                     job.cfg.rank_multiple)
    got = tuple((b.name, b.width, b.kept) for b in blocks)
    if got != want.blocks:
        raise LrcError(f"internal check failed: narrowing gave widths {got}, the rank problem "
                       f"was built for {want.blocks}.")
    acc = evaluate_stage(job, narrowed, "narrowed", "evaluating the narrowed model")
    job.narrowed = {**want.to_dict(), "blocks": [
        {"name": b.name, "width": b.width, "kept": b.kept, "rel_error": round(b.rel_error, 6)}
        for b in blocks], "accuracy": acc.to_dict() if acc else None}
    return narrowed.to(job.device).eval()


def verify_stage(job: Job, student: nn.Module, plan: Plan) -> tuple[int, int]:
    """MACs and params of the student counted independently; the target must hold."""
    measured = independent_macs(student, job.input_size)
    params = param_count(student)
    if measured != plan.macs or params != plan.params:
        raise LrcError(f"internal check failed: the decomposed model has {measured} MACs / "
                       f"{params} params by FlopCounterMode, the plan says {plan.macs} / "
                       f"{plan.params}.")
    t = job.cfg.target
    if t.kind == "latency":
        return measured, params  # measured whole by latency_stage
    achieved = measured / job.problem.base_macs if t.kind == "flops" else (
        params / job.problem.base_params)
    if achieved > t.ratio + 1e-12:
        raise TargetError(f"the plan misses the target: {achieved:.4f} > {t.ratio}.")
    return measured, params


def bn_stage(job: Job, student: nn.Module, plan: Plan) -> dict | None:
    """Re-estimate BatchNorm statistics after the factorized layers (None: not done, and not
    announced, e.g. on a model without BatchNorm such as a ViT)."""
    if not re_estimates_bn(job, student):
        return None
    # Judged on calibration batches re-estimation does not read, when the split has them (on
    # the batches it re-estimated from, the new statistics fit by construction).
    batches = held_out_batches(job)
    judged_on = "held-out calibration batches" if batches else "the re-estimation's batches"
    batches = batches or calibration_batches(job)
    with torch.no_grad():
        before = calib_loss(student, batches, job.device)
    saved = {n: copy.deepcopy(bn.state_dict()) for n, bn in batchnorms(student).items()}
    job.progress.stage("re-estimating BatchNorm statistics",
                       total=samples_of(job, job.cfg.bn_batches))
    rec = recalibrate_bn(student, [lp.name for lp in plan.layers], job.loaders.calib,
                         job.device, job.cfg.bn_batches, progress=job.progress.advance)
    if rec is None:
        return None
    with torch.no_grad():
        after = calib_loss(student, batches, job.device)
    applied = after <= before
    if not applied:  # the fit already matches the original's statistics better
        for n, bn in batchnorms(student).items():
            bn.load_state_dict(saved[n])
        job.progress.info(f"BatchNorm re-estimation raised the calibration loss ({before:.4f} "
                          f"→ {after:.4f}): the decomposed model's statistics are kept.")
    return {**rec.to_dict(), "applied": applied, "calib_loss_before": before,
            "calib_loss_after": after, "judged_on": judged_on, "judged_batches": len(batches)}


def finetune_stage(job: Job, student: nn.Module, plan: Plan) -> dict:
    """Distillation from the original (in place; resumable per epoch)."""
    cfg = job.cfg
    need_loader(job.loaders.train, "fine-tuning", "train")
    steps = cfg.finetune.max_steps or cfg.finetune.epochs * len(job.loaders.train)
    job.progress.stage("fine-tuning (distillation)", total=samples_of(job, steps))
    state_dir = job.run.path / STATE_DIR if job.run.enabled else None
    ft = distill(student, job.model, plan, job.loaders, cfg.finetune, job.device,
                 state_dir=state_dir, progress=job.progress.advance,
                 fingerprint=job.run.fingerprint_text, seed=cfg.seed,
                 auto_batch=cfg.auto_batch, note=job.progress.note)
    return {"config": ft.config, "history": ft.history, "best_epoch": ft.best_epoch,
            "steps": ft.steps, "resumed_from_epoch": ft.resumed_from_epoch,
            "skipped_steps": ft.skipped_steps, "micro_batch": ft.micro_batch}


def save_stage(job: Job, student: nn.Module, plan: Plan, report: dict) -> None:
    """model.safetensors, plan.json, report.md/html and, last, report.json (rank 0 only)."""
    run = job.run
    if not run.writes:
        return
    rendered = render_reports(report)
    run.record(MODEL_FILE, PLAN_FILE, REPORT_FILE, *rendered)  # in the manifest before written
    save_compressed(student, plan, run.file(MODEL_FILE))
    write_text(run.file(PLAN_FILE), plan.to_json() + "\n")
    write_rendered(run.path, rendered)
    report["files"] = run.checksums([MODEL_FILE, PLAN_FILE, *rendered])
    write_json(run.file(REPORT_FILE), report)  # last: its presence means the run finished


def run_stages(job: Job) -> CompressResult:
    """Every stage in order, RUN/ locked meanwhile; returns the model, its plan and the report."""
    job.run.open()
    try:
        return _all_stages(job)
    finally:
        job.run.close()


def _all_stages(job: Job) -> CompressResult:
    times = job.times
    job.model.to(job.device).eval()
    if job.synth is not None and job.loaders.calib is None:
        job.data_free = timed(times, "synthesize", synthesize_stage, job)
    acc = {}
    original = timed(times, "eval_original", evaluate_stage, job, job.model, "original",
                      "evaluating the original model")
    t = time.perf_counter()
    batches = calibration_batches(job)
    source, lorita_report = job.model, None
    if job.cfg.lorita.enabled:
        source, lorita_report = timed(times, "lorita", lorita_stage, job)
        t = time.perf_counter()
    if job.problem.narrowing is not None:
        source = timed(times, "narrow", narrow_stage, job, batches)
        t = time.perf_counter()
    plan, trace = select_stage(job, source, batches)
    times["rank_selection"] = time.perf_counter() - t
    dec = timed(times, "decompose", decompose_stage, job, source, plan)
    macs, params = verify_stage(job, dec.student, plan)
    if job.cfg.measures_latency:
        first = plan
        plan, dec = timed(times, "latency", latency_stage, job, source, batches, plan, dec)
        if plan is not first:  # re-solved: check the new plan as the first was checked
            macs, params = verify_stage(job, dec.student, plan)
    student = dec.student
    acc["original"] = original
    acc["decomposed"] = timed(times, "eval_decomposed", evaluate_stage, job, student,
                               "decomposed", "evaluating the decomposed model")
    t = time.perf_counter()
    bn_report = bn_stage(job, student, plan)
    if bn_report is not None and bn_report["applied"]:
        acc["bn_recalibrated"] = evaluate_stage(job, student, "bn_recalibrated",
                                                "evaluating after BatchNorm re-estimation")
    if bn_report is not None:
        times["bn_recalibration"] = time.perf_counter() - t
    ft_report = None
    if job.cfg.finetune.enabled:
        ft_report = timed(times, "finetune", finetune_stage, job, student, plan)
        acc["finetuned"] = timed(times, "eval_finetuned", evaluate_stage, job, student,
                                  "finetuned", "evaluating the fine-tuned model", cached=False)
    t = time.perf_counter()
    job.progress.stage("saving")
    report = build_report(job, plan, trace, dec, (macs, params), acc, bn_report, ft_report,
                          lorita_report, len(batches))
    times["save"] = time.perf_counter() - t
    report["seconds"] = {k: round(v, 3) for k, v in times.items()}
    if job.estimate is not None:
        report["estimate"] = job.estimate
    save_stage(job, student, plan, report)
    job.progress.end()
    return CompressResult(student, plan, report, job.run.path)


# The job's public names, wherever they live (callers import them from here).
__all__ = [
    "DATA_METHODS", "DEFAULT_RANK_MULTIPLE", "MODEL_FILE", "SYNTHETIC_FILE", "CompressConfig",
    "CompressResult", "Decomposed", "Job", "Loaders", "SynthConfig", "build_problem",
    "calibration_batches", "check_batchnorm_batches", "check_data_free", "check_given_plan",
    "check_reachable", "decompose_stage", "evaluate_stage", "fit_of", "make_target",
    "needs_data", "prepare_latency", "rank_problem", "resolve_device", "run_stages",
    "search_stats", "select_ranks", "synthesize_stage", "timing_model",
]
