"""``search``: the main job, from a checkpoint to a compressed, reloadable model in RUN/.

Stages: load → census and rank problem (the target is checked before any work) → data →
evaluate the original → rank selection → decomposition → independent verification of the target
→ evaluate → re-estimate the BatchNorm statistics after the factorized layers → evaluate →
(fine-tune → evaluate) → save (model.safetensors, plan.json, report.json). Every input is
validated before RUN/ is created, so bad input leaves nothing behind.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lrcompress._version import __version__
from lrcompress.data import DataConfig, build_loaders, parse_data_spec, resolve_preprocess
from lrcompress.errors import LrcError, TargetError, UserError
from lrcompress.factorizations import ALIASES, FACTORIZATIONS
from lrcompress.measure.metrics import evaluate, independent_macs, param_count
from lrcompress.model.arch import load_model
from lrcompress.model.census import make_selection
from lrcompress.model.checkpoint import read_checkpoint
from lrcompress.model.costs import count_model, dense_macs, dense_params
from lrcompress.model.layers import find_layers, skip_reason
from lrcompress.model.plan import Plan, Target
from lrcompress.model.surgery import decompose_
from lrcompress.model.weights import build_compressed, save_compressed
from lrcompress.rank import SelectContext, get_method
from lrcompress.rank.problem import LayerOptions, RankProblem, layer_options
from lrcompress.rank.rene import ReneConfig
from lrcompress.rank.search_state import SearchState
from lrcompress.rank.signals import Cache
from lrcompress.recover.bn import recalibrate_bn
from lrcompress.recover.finetune import FinetuneConfig, distill
from lrcompress.recover.lorita import LoritaConfig, lorita_train
from lrcompress.report.write import write_reports
from lrcompress.util import distributed
from lrcompress.util.io import cannot_write_in, write_json, write_text
from lrcompress.util.progress import Progress
from lrcompress.util.resources import rebatch, retry_halving

log = logging.getLogger(__name__)
AUTO_METHODS = ("svd", "tucker2", "cp", "tt")


@dataclass(frozen=True)
class SearchConfig:
    target: Target
    decomp: str = "tt"  # svd | tucker2 | cp | cp4 | tt | auto
    method: str = "rene"  # rank-selection method
    rank_multiple: int = 8  # ranks are multiples of this (AIMET's default multiplicity)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    calib_batches: int = 8  # calibration batches the search and sensitivities use
    data: DataConfig = field(default_factory=DataConfig)
    rene: ReneConfig = field(default_factory=ReneConfig)
    # Overrides for the baseline methods, e.g. {"vbmf": {"weaken": 0.5}} (see each rank module).
    method_config: dict = field(default_factory=dict)
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    plan_path: str | None = None  # re-apply this plan instead of searching
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lorita: LoritaConfig = field(default_factory=LoritaConfig)  # over-parameterised pre-tuning
    cache_dir: str | None = None  # decomposition/sensitivity cache (default RUN/cache)
    overwrite: bool = False
    auto_batch: bool = False  # CUDA out-of-memory: halve the batch and retry (search, fine-tuning)
    # After decomposition, re-estimate the BatchNorm statistics downstream of the factorized
    # layers on this many calibration batches (0: keep the original model's statistics).
    bn_batches: int = 16

    def __post_init__(self):
        d = ALIASES.get(self.decomp, self.decomp)
        if d != "auto" and d not in FACTORIZATIONS:
            raise UserError(f"Unknown --decomp {self.decomp!r}: choose one of "
                            f"{', '.join([*FACTORIZATIONS, 'auto'])} (tucker = tucker2).")
        object.__setattr__(self, "decomp", d)
        if self.rank_multiple < 1:
            raise UserError(f"--rank-multiple {self.rank_multiple} must be 1 or more.")
        if self.calib_batches < 1:
            raise UserError(f"--calib-batches {self.calib_batches} must be 1 or more.")
        if self.bn_batches < 0:
            raise UserError(f"--bn-batches {self.bn_batches} must be 0 (off) or more.")


@dataclass
class SearchResult:
    run_dir: Path
    plan: Plan
    report: dict


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but no CUDA GPU is available here. "
                        "Use --device cpu (or auto).")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(f"Unknown --device {name!r}: use auto, cpu, cuda or cuda:N.") from e


RESULT_FILES = ("model.safetensors", "plan.json", "report.json", "report.md", "report.html",
                "model.onnx", "model.onnx.data")


def fingerprint(model_spec: str, data_spec: str, cfg: SearchConfig, extra: dict) -> dict:
    """What must be equal for a re-run to continue the previous one."""
    d = _config_dict(cfg)
    for k in ("overwrite", "device", "cache_dir", "auto_batch"):
        d.pop(k, None)
    d["data"].pop("workers", None)
    path = Path(model_spec)
    if path.is_file():
        st = path.stat()
        d["checkpoint"] = {"path": str(path.resolve()), "size": st.st_size,
                           "mtime_ns": st.st_mtime_ns}
    else:
        d["checkpoint"] = {"spec": model_spec}
    d["data_spec"] = data_spec
    d.update(extra)
    return json.loads(json.dumps(d, default=list))


def _prepare_run_dir(out: Path, overwrite: bool, fp: dict) -> bool:
    """Checks RUN/ before any work; True when an earlier run of the same command is resumed."""
    if out.exists() and not out.is_dir():
        raise UserError(f"Output {out} exists and is not a directory. Choose another -o.")
    parent = out.parent if str(out.parent) else Path(".")
    probe = out if out.is_dir() else parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"Cannot create output directory {out}: {probe} is a file, not a "
                        "directory. Choose another -o.")
    why = "permission denied" if not os.access(probe, os.W_OK) else cannot_write_in(probe)
    if why:
        raise UserError(f"Cannot write to {probe}: creating a file there failed ({why}). "
                        "Choose another -o.")
    if not (out.is_dir() and _holds_files(out)):
        return False  # absent, empty, or only the empty folders of a run killed at its start
    fp_file = out / "state" / "fingerprint.json"
    if fp_file.exists() and not overwrite:
        old = json.loads(fp_file.read_text())
        if old == fp:
            if (out / "report.json").exists():
                raise UserError(f"{out} already holds the finished result of this command. "
                                "Pass --overwrite to run it again, or choose another -o.")
            return True
        diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
        raise UserError(f"{out} holds an unfinished run of a different command (differs in: "
                        f"{', '.join(diff)}), so it cannot be resumed. Re-run that command to "
                        "resume it, pass --overwrite to start over, or choose another -o.")
    if not overwrite:
        raise UserError(f"Output directory {out} is not empty. Choose another -o, or pass "
                        "--overwrite to replace its results.")
    return False


def _holds_files(folder: Path) -> bool:
    return any(not p.is_dir() for p in folder.rglob("*"))


def _clear_results(out: Path) -> None:
    """--overwrite: drop earlier results and stage state; the signal cache is kept (reusable)."""
    import shutil

    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "state", ignore_errors=True)


def build_problem(model, info, input_size, cfg: SearchConfig) -> RankProblem:
    specs = find_layers(model, input_size)
    sel = make_selection(model, specs, cfg.include, cfg.exclude)
    cost = count_model(model, specs, input_size)
    methods = list(AUTO_METHODS) if cfg.decomp == "auto" else [cfg.decomp]
    layers, skipped = [], {}
    for s in specs:
        reason = skip_reason(s, sel)
        opts = [] if reason else layer_options(s, methods, cfg.rank_multiple)
        if not reason and len(opts) < 2:
            reason = f"too small: no {cfg.decomp} rank saves MACs and params"
        if reason:
            skipped[s.name] = reason
        else:
            layers.append(LayerOptions(s, opts))
    if not layers:
        raise UserError(f"No layer of {info.arch} can be factorized with --decomp {cfg.decomp} "
                        f"(reasons: {'; '.join(sorted(set(skipped.values())))}). Try another "
                        "--decomp or --include more layers (see `lrcompress inspect`).")
    problem = RankProblem(cfg.target, layers, cost.macs, cost.params, info.arch,
                          info.num_classes, info.in_chans, tuple(input_size), skipped, specs)
    problem.check_feasible()
    return problem


def _layer_rows(plan: Plan, specs, errs: dict, retries: dict | None = None) -> list[dict]:
    planned = {lp.name: lp for lp in plan.layers}
    rows = []
    for s in specs:
        lp = planned.get(s.name)
        rows.append({
            "name": s.name, "kind": s.kind, "shape": list(s.weight_shape),
            "factorization": lp.method if lp else "dense",
            "rank": (list(lp.rank) if isinstance(lp.rank, tuple) else lp.rank) if lp else None,
            "macs_before": dense_macs(s), "macs_after": lp.macs if lp else dense_macs(s),
            "params_before": dense_params(s), "params_after": lp.params if lp else dense_params(s),
            "rel_error": errs.get(s.name),
            "decomposition_retries": (retries or {}).get(s.name, 0),
        })
    return rows


def search(model_spec: str, data_spec: str, out_dir, cfg: SearchConfig, *, arch=None,
           num_classes=None, in_chans=None, trust_pickle=False, progress: Progress | None = None,
           command: list[str] | None = None) -> SearchResult:
    """Run the whole job into ``out_dir``; an interrupted run of the same command resumes.

    Stage state lives in RUN/state/: the chosen plan, the decomposed weights, and each
    fine-tuning epoch. Every input is checked before RUN/ is created or changed.
    """
    progress = progress or Progress()
    times: dict[str, float] = {}
    t = time.perf_counter()
    out = Path(out_dir)
    fp = fingerprint(model_spec, data_spec, cfg, {"arch": arch, "num_classes": num_classes,
                                                  "in_chans": in_chans})
    resume = _prepare_run_dir(out, cfg.overwrite, fp)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    progress.stage("loading model")
    lm = load_model(model_spec, arch=arch, num_classes=num_classes, in_chans=in_chans,
                    trust_pickle=trust_pickle)
    if lm.plan is not None:
        raise UserError(f"{model_spec} is already compressed by lrcompress. Search the original "
                        "checkpoint instead.")
    model, info = lm.model, lm.info
    dspec = parse_data_spec(data_spec)
    pre = resolve_preprocess(model, dspec, input_size=cfg.input_size, mean=cfg.mean,
                             std=cfg.std, in_chans=info.in_chans)
    problem = build_problem(model, info, pre.input_size, cfg)
    given_plan = None
    if cfg.plan_path:
        given_plan = Plan.from_json(Path(cfg.plan_path).read_text())
        if given_plan.arch != info.arch:
            raise UserError(f"--plan {cfg.plan_path} was made for {given_plan.arch}, not "
                            f"{info.arch}.")
    loaders = build_loaders(dspec, pre, cfg.data, num_classes=info.num_classes)
    times["load"] = time.perf_counter() - t

    # All inputs are valid: from here on RUN/ is written (under torchrun by rank 0 only; the
    # barriers keep every rank's view of the stage files the same).
    main_rank = distributed.is_main()
    distributed.barrier()
    state = out / "state"
    if main_rank:
        if cfg.overwrite and out.is_dir():
            _clear_results(out)
        state.mkdir(parents=True, exist_ok=True)
        write_json(state / "fingerprint.json", fp)
    distributed.barrier()
    plan_file, dec_file = state / "plan.json", state / "decomposed.safetensors"
    have_plan, have_dec = plan_file.exists(), dec_file.exists()
    distributed.barrier()
    if resume:
        log.info("resuming the unfinished run in %s", out)
    model.to(device).eval()

    t = time.perf_counter()
    progress.stage("evaluating the original model", total=len(loaders.test.dataset))
    acc_orig = _cached_eval(state / "eval_original.json", model, loaders.test, device, progress)
    times["eval_original"] = time.perf_counter() - t

    t = time.perf_counter()
    batches = []
    for x, y in loaders.calib:
        batches.append((x, y))
        if len(batches) >= cfg.calib_batches:
            break
    source, lorita_report = model, None
    if cfg.lorita.enabled:
        t = time.perf_counter()
        source, lorita_report = _lorita_stage(model, info, pre.input_size, problem, loaders,
                                              cfg, device, state, fp, progress)
        times["lorita"] = time.perf_counter() - t
        t = time.perf_counter()
    if have_plan:
        plan = Plan.from_json(plan_file.read_text())
        trace = json.loads((state / "trace.json").read_text())
    elif given_plan is not None:
        plan, trace = given_plan, {"reapplied": str(cfg.plan_path)}
    else:
        progress.stage(f"rank selection ({cfg.method})")
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
        ctx = SelectContext(source, problem, batches, device, Cache(cache_dir / "signals.json"),
                            cfg.seed, {**cfg.method_config, "rene": cfg.rene},
                            tick=progress.advance,
                            state=SearchState(state / f"search-{cfg.method}.pt",
                                              json.dumps(fp, sort_keys=True)))

        def select(size):  # --auto-batch: the same calibration samples in smaller batches
            ctx.batches = rebatch(batches, size)
            return get_method(cfg.method)(ctx)

        (plan, trace), calib_bs = retry_halving(select, batches[0][0].shape[0],
                                                enabled=cfg.auto_batch, what="the rank search")
        trace["calib_batch_size"] = calib_bs
    if main_rank:
        write_json(state / "trace.json", trace)
        write_text(plan_file, plan.to_json() + "\n")
        (state / f"search-{cfg.method}.pt").unlink(missing_ok=True)  # superseded by the plan
    times["rank_selection"] = time.perf_counter() - t

    t = time.perf_counter()
    if have_dec:
        student = build_compressed(plan)
        student.load_state_dict(read_checkpoint(dec_file)[0])
        dec = json.loads((state / "decomposed.json").read_text())
        results_rows, retries = dec["rel_error"], dec["retries"]
    else:
        progress.stage("decomposing", total=len(plan.layers))
        student = copy.deepcopy(source).cpu()
        res = decompose_(student, plan, progress=lambda _n: progress.advance())
        results_rows = {r.name: r.rel_error for r in res}
        retries = {r.name: r.retries for r in res if r.retries}
        if main_rank:  # decomposed.safetensors last: its presence means the stage is complete
            write_json(state / "decomposed.json", {"rel_error": results_rows, "retries": retries})
            save_compressed(student, plan, dec_file)
    student.to(device).eval()
    times["decompose"] = time.perf_counter() - t

    measured = independent_macs(student, pre.input_size)
    params = param_count(student)
    if measured != plan.macs or params != plan.params:
        raise LrcError(f"internal check failed: the decomposed model has {measured} MACs / "
                       f"{params} params by FlopCounterMode, the plan says {plan.macs} / "
                       f"{plan.params}.")
    achieved = (measured / problem.base_macs) if cfg.target.kind == "flops" else (
        params / problem.base_params)
    if achieved > cfg.target.ratio + 1e-12:
        raise TargetError(f"the plan misses the target: {achieved:.4f} > {cfg.target.ratio}.")

    t = time.perf_counter()
    progress.stage("evaluating the decomposed model", total=len(loaders.test.dataset))
    acc_dec = _cached_eval(state / "eval_decomposed.json", student, loaders.test, device,
                           progress)
    times["eval_decomposed"] = time.perf_counter() - t

    accuracy = {"original": acc_orig.to_dict(), "decomposed": acc_dec.to_dict()}
    bn_report = None
    if cfg.bn_batches:
        t = time.perf_counter()
        progress.stage("re-estimating BatchNorm statistics",
                       total=cfg.bn_batches * cfg.data.batch_size)
        rec = recalibrate_bn(student, [lp.name for lp in plan.layers], loaders.calib, device,
                             cfg.bn_batches, progress=progress.advance)
        if rec is not None:
            bn_report = rec.to_dict()
            progress.stage("evaluating after BatchNorm re-estimation",
                           total=len(loaders.test.dataset))
            accuracy["bn_recalibrated"] = _cached_eval(state / "eval_bn_recalibrated.json",
                                                       student, loaders.test, device,
                                                       progress).to_dict()
        times["bn_recalibration"] = time.perf_counter() - t
    ft_report = None
    if cfg.finetune.enabled:
        t = time.perf_counter()
        steps = cfg.finetune.max_steps or cfg.finetune.epochs * len(loaders.train)
        progress.stage("fine-tuning (distillation)", total=steps * cfg.data.batch_size)
        ft = distill(student, model, plan, loaders, cfg.finetune, device, state_dir=state,
                     progress=progress.advance, fingerprint=json.dumps(fp, sort_keys=True),
                     seed=cfg.seed, auto_batch=cfg.auto_batch)
        times["finetune"] = time.perf_counter() - t
        t = time.perf_counter()
        progress.stage("evaluating the fine-tuned model", total=len(loaders.test.dataset))
        accuracy["finetuned"] = evaluate(student, loaders.test, device,
                                         progress=progress.advance).to_dict()
        times["eval_finetuned"] = time.perf_counter() - t
        ft_report = {"config": ft.config, "history": ft.history, "best_epoch": ft.best_epoch,
                     "steps": ft.steps, "resumed_from_epoch": ft.resumed_from_epoch,
                     "skipped_steps": ft.skipped_steps, "micro_batch": ft.micro_batch}

    t = time.perf_counter()
    progress.stage("saving")
    if main_rank:
        save_compressed(student, plan, out / "model.safetensors")
        write_text(out / "plan.json", plan.to_json() + "\n")
    report = {
        "schema": 1,
        "lrcompress_version": __version__,
        "command": command or sys.argv,
        "seed": cfg.seed,
        "config": _config_dict(cfg),
        "model": {"source": info.source, "arch": info.arch, "num_classes": info.num_classes,
                  "in_chans": info.in_chans, "input_size": list(pre.input_size)},
        "data": {"spec": data_spec, "test_samples": acc_orig.n, "calib_batches": len(batches),
                 "train_samples": len(loaders.train.dataset)},
        "target": {"kind": cfg.target.kind, "ratio": cfg.target.ratio},
        "totals": {
            "macs_before": problem.base_macs, "macs_after": measured,
            "macs_ratio": measured / problem.base_macs,
            "params_before": problem.base_params, "params_after": params,
            "params_ratio": params / problem.base_params,
            "macs_counted_by": "torch.utils.flop_counter.FlopCounterMode",
        },
        "accuracy": accuracy,
        "bn_recalibration": bn_report,
        "finetune": ft_report,
        "lorita": lorita_report,
        "layers": _layer_rows(plan, problem.specs, results_rows, retries),
        "skipped": problem.skipped,
        "search": trace,
        "resumed": resume,
        "seconds": {},
        "versions": {"python": platform.python_version(), **_versions(),
                     "lrcompress": __version__, "device": str(device)},
        "resources": {"auto_batch": cfg.auto_batch, "batch_size": cfg.data.batch_size,
                      "calib_batch_size": trace.get("calib_batch_size"),
                      "finetune_micro_batch": ft_report and ft_report["micro_batch"]},
    }
    times["save"] = time.perf_counter() - t
    report["seconds"] = {k: round(v, 3) for k, v in times.items()}
    if main_rank:
        write_reports(out, report)
        write_json(out / "report.json", report)  # last: its presence means the run finished
    progress.end()
    return SearchResult(out, plan, report)


def _lorita_stage(model, info, input_size, problem, loaders, cfg: SearchConfig, device, state,
                  fp, progress):
    """LoRITa pre-tuning of the selected layers (resumable: RUN/state/lorita.*)."""
    weights, summary_file = state / "lorita.safetensors", state / "lorita.json"
    if weights.exists() and summary_file.exists():
        dense = copy.deepcopy(model).cpu()
        dense.load_state_dict(read_checkpoint(weights)[0])
        return dense.to(device).eval(), json.loads(summary_file.read_text())
    names = [lo.spec.name for lo in problem.layers]
    stub = Plan(info.arch, info.num_classes, info.in_chans, tuple(input_size), (),
                problem.base_macs, problem.base_params)
    progress.stage(f"LoRITa pre-tuning (N={cfg.lorita.factors})",
                   total=cfg.lorita.steps * cfg.data.batch_size)
    sub = state / "lorita"
    if distributed.is_main():
        sub.mkdir(parents=True, exist_ok=True)
    dense, summary = lorita_train(model, names, cfg.lorita, loaders, device, stub,
                                  state_dir=sub, progress=progress.advance,
                                  fingerprint=json.dumps(fp, sort_keys=True), seed=cfg.seed)
    progress.stage("evaluating the LoRITa-tuned dense model", total=len(loaders.test.dataset))
    summary["dense_accuracy"] = evaluate(dense, loaders.test, device,
                                         progress=progress.advance).to_dict()
    if distributed.is_main():
        save_compressed(dense, stub, weights)  # a plan with no layers: the dense architecture
        write_json(summary_file, summary)
    return dense, summary


def _cached_eval(path: Path, model, loader, device, progress):
    from lrcompress.measure.metrics import Accuracy

    if path.exists():
        return Accuracy(**json.loads(path.read_text()))
    acc = evaluate(model, loader, device, progress=progress.advance)
    if distributed.is_main():
        write_json(path, acc.to_dict())
    return acc


def _versions() -> dict:
    """Versions of the libraries that decide the numbers (for the report)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for pkg in ("timm", "tensorly", "torchvision", "numpy", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _config_dict(cfg: SearchConfig) -> dict:
    d = asdict(cfg)
    d["target"] = {"kind": cfg.target.kind, "ratio": cfg.target.ratio}
    return d

