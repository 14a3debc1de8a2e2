"""The compression job as stages, shared by ``lrcompress search`` and ``lrcompress.compress``.

A :class:`Job` holds what every stage reads (the original model, the rank problem, the loaders,
the configuration, the run folder, the progress sink). :func:`run_stages` calls the stages in
order:

    [synthesise inputs] → evaluate original → [LoRITa] → rank selection → decomposition
    → target check → evaluate → BatchNorm re-estimation → evaluate
    → [distillation → evaluate] → save + report

Each stage is a function of a few dozen lines that returns a value; each one that takes long
keeps its result under RUN/state/ (through :class:`~lrcompress.commands.run_dir.RunDir`) so an
interrupted run resumes after the last finished stage. Without a run folder nothing is written.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from lrcompress.batches import sample_count, top1_labeller
from lrcompress.calib.synthesize import (
    SynthConfig,
    Synthetic,
    has_batchnorm,
    load_synthetic,
    noise_inputs,
    save_synthetic,
    synthesize,
)
from lrcompress.commands.run_dir import RunDir
from lrcompress.data import DataConfig
from lrcompress.errors import LrcError, TargetError, UserError
from lrcompress.factorizations import ALIASES, FACTORIZATIONS, get_factorization
from lrcompress.measure.estimate import RunEstimate, forward_seconds
from lrcompress.measure.latency_target import (
    LatencyConfig,
    check_engine,
    corrected_ratio,
    make_table,
    measure_whole,
    next_budget,
    option_times,
    speedup_ratio,
)
from lrcompress.measure.metrics import Accuracy, evaluate, independent_macs, param_count
from lrcompress.model.arch import CUSTOM_ARCH, ModelInfo
from lrcompress.model.census import make_selection
from lrcompress.model.checkpoint import read_checkpoint
from lrcompress.model.costs import count_model
from lrcompress.model.input_stats import (
    collect_input_stats,
    collect_layer_stats,
    fit_report,
    kinds_for,
)
from lrcompress.model.layers import LayerSpec, find_layers, skip_reason
from lrcompress.model.plan import Plan, Target, check_fits
from lrcompress.model.surgery import decompose_
from lrcompress.model.weights import build_compressed, save_compressed
from lrcompress.rank import SelectContext, get_estimator, get_method
from lrcompress.rank.problem import LayerOptions, RankProblem, layer_options
from lrcompress.rank.rene import ReneConfig
from lrcompress.rank.selection_state import SelectionState
from lrcompress.rank.signals import Cache
from lrcompress.recover.bn import batchnorms, recalibrate_bn
from lrcompress.recover.finetune import FinetuneConfig, distill
from lrcompress.recover.lorita import LoritaConfig, lorita_train
from lrcompress.report.schema import build_report
from lrcompress.report.write import render_reports, write_rendered
from lrcompress.util.config import require
from lrcompress.util.io import write_json, write_text
from lrcompress.util.progress import Progress
from lrcompress.util.resources import rebatch, retry_halving
from lrcompress.util.run_files import (
    CACHE_DIR,
    MODEL_FILE,
    PLAN_FILE,
    REPORT_FILE,
    SIGNALS_FILE,
    STATE_DIR,
)

log = logging.getLogger(__name__)

AUTO_FACTORIZATIONS = ("svd", "tucker2", "cp", "tt")
FITS = ("auto", "weight", "activation")


# Ranks on a grid of 16: ONNX Runtime's CPU convolutions work in blocks of 16 channels on AVX-512
# (8 on AVX2) and a chain whose middle width is off the block falls back to unblocked kernels with
# layout reorders around it; multiples of 16 also suit GPU tensor cores. Measured (RESULTS.md
# "Rank grid"): at equal MACs, multiples of 16 instead of 8 took mobilenetv2 from 0.63 to 0.52 of
# the original's latency at batch 1 and from 0.72–0.89 to 0.55–0.59 at batch 64.
DEFAULT_RANK_MULTIPLE = 16


@dataclass(frozen=True)
class CompressConfig:
    """Every setting of a compression job (frozen; :meth:`to_dict` is what the report records)."""

    target: Target
    decomp: str = "tt"  # factorization: svd | tucker2 | cp | cp4 | tt | auto
    method: str = "rene"  # rank-selection method
    rank_multiple: int = DEFAULT_RANK_MULTIPLE  # ranks are multiples of this
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    calib_batches: int = 8  # calibration batches the rank selection and sensitivities use
    data: DataConfig = field(default_factory=DataConfig)
    rene: ReneConfig = field(default_factory=ReneConfig)
    # Overrides for the baseline methods, e.g. {"vbmf": {"weaken": 0.5}} (see each rank module).
    method_config: dict = field(default_factory=dict)
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    plan_path: str | None = None  # re-apply this plan instead of selecting ranks
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lorita: LoritaConfig = field(default_factory=LoritaConfig)  # over-parameterised pre-tuning
    cache_dir: str | None = None  # decomposition/sensitivity cache (default RUN/cache)
    overwrite: bool = False
    auto_batch: bool = False  # CUDA out-of-memory: halve the batch and retry (search, fine-tuning)
    # After decomposition, re-estimate the BatchNorm statistics downstream of the factorized
    # layers on this many calibration batches (0: keep the original model's statistics).
    bn_batches: int = 16
    # Where latency targets (and --latency-aware) are measured.
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    # What the factors fit: "weight" (min ‖W − Ŵ‖), "activation" (min output error on the
    # calibration batches' layer inputs; factorizations/_activation.py) or "auto" (activation
    # whenever calibration inputs exist: fit_of).
    fit: str = "auto"

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
        if self.fit not in FITS:
            raise UserError(f"fit={self.fit!r}: choose one of {', '.join(FITS)}.")
        if self.bn_batches < 0:
            raise UserError(f"--bn-batches {self.bn_batches} must be 0 (off) or more.")
        weaken = self.method_config.get("vbmf", {}).get("weaken")
        if weaken is not None:
            require("--vbmf-weaken", weaken, at_least=0, why="and at most 1")
            if weaken > 1:
                raise UserError(f"--vbmf-weaken {weaken} must be in [0, 1].")
        tolerance = self.method_config.get("bisect", {}).get("max_loss_increase")
        if tolerance is not None:
            require("--max-loss-increase", tolerance, above=0, why="in nats")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target"] = {"kind": self.target.kind, "ratio": self.target.ratio}
        return d

    def resume_dict(self) -> dict:
        """The settings a resumed run must share with the interrupted one: :meth:`to_dict`
        without those that change how, not what, is computed (device, cache, output handling,
        data workers) and without the latency settings when nothing is measured."""
        d = self.to_dict()
        for k in ("overwrite", "device", "cache_dir", "auto_batch"):
            d.pop(k, None)
        if not self.measures_latency:
            d.pop("latency", None)
        d["data"].pop("workers", None)
        return d

    @property
    def measures_latency(self) -> bool:
        """Whether the job measures latency (a latency target, or --latency-aware)."""
        return self.target.kind == "latency" or self.latency.aware


@dataclass
class Loaders:
    """The job's data: calibration (rank selection, BatchNorm), training and test batches."""

    calib: object | None
    train: object | None = None
    test: object | None = None
    description: str = ""  # for the report: a data spec, or "Python loaders"
    batch_size: int | None = None  # samples per batch, when known (progress totals)
    eval_description: str | None = None  # the test set's own spec (--eval-data), if any


@dataclass
class Job:
    model: nn.Module  # the original model (eval mode, on ``device``); never modified
    info: ModelInfo
    input_size: tuple[int, int, int]
    problem: RankProblem
    loaders: Loaders
    cfg: CompressConfig
    device: torch.device
    run: RunDir = field(default_factory=lambda: RunDir(None))
    progress: Progress = field(default_factory=Progress)
    given_plan: Plan | None = None
    command: list[str] | None = None
    times: dict[str, float] = field(default_factory=dict)
    latency: dict | None = None  # latency costs and checks (prepare_latency, latency_stage)
    # Data-free mode: how to make calibration inputs when there is no calibration data; the
    # input normalisation (mean, std) keeps them in the valid pixel range when known.
    synth: SynthConfig | None = None
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    data_free: dict | None = None  # what synthesize_stage made (the report's "data_free")
    estimate: dict | None = None  # the run-time estimate made before the search


@dataclass
class Decomposed:
    student: nn.Module
    rel_errors: dict[str, float]
    retries: dict[str, int]
    fit: dict | None = None  # fit="activation": fit_report()


@dataclass
class CompressResult:
    """What a compression job returns: the compressed model, its plan and the full report."""

    model: nn.Module
    plan: Plan
    report: dict
    run_dir: object = None  # pathlib.Path of RUN/, or None

    def save(self, path) -> object:
        """Write the compressed model with its plan to a ``.safetensors`` file."""
        return save_compressed(self.model, self.plan, path)


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device that exists here (others refused:
    ``meta`` holds no data, and a backend torch was not built with cannot run)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(f"Unknown --device {name!r}: use auto, cpu, cuda or cuda:N.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but no CUDA GPU is available here. "
                        "Use --device cpu (or auto).")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                        f"GPU(s), numbered from 0. Use --device cuda:0 (or auto).")
    if dev.type not in ("cpu", "cuda"):
        why = (" (it holds tensor shapes, no data, so nothing can be computed)"
               if dev.type == "meta" else "")
        raise UserError(f"--device {name} is not supported{why}: use auto, cpu, cuda or "
                        "cuda:N.")
    return dev


def make_target(flops=None, params=None, latency=None, speedup=None) -> Target:
    """The one target given: a MACs, params or latency ratio, or a speed-up S (ratio 1/S)."""
    given = {k: v for k, v in (("flops", flops), ("params", params), ("latency", latency),
                               ("speedup", speedup)) if v is not None}
    if len(given) != 1:
        raise UserError("Give exactly one target: --target-flops R, --target-params R, "
                        "--target-latency R (fractions of the original to keep, e.g. 0.3) or "
                        f"--target-speedup S (e.g. 2.5); got {', '.join(given) or 'none'}. "
                        "(Python: target_flops=, target_params=, target_latency=, "
                        "target_speedup=.)")
    (kind, value), = given.items()
    if kind == "speedup":
        return Target("latency", speedup_ratio(value))
    return Target(kind, value)


def rank_problem(model: nn.Module, info: ModelInfo, input_size, cfg: CompressConfig,
                 specs: list[LayerSpec] | None = None) -> RankProblem:
    """The rank problem as ``search`` builds it, unchecked: it may have no layer, and its target
    may be out of reach (``inspect`` reports the smallest reachable ratio from it)."""
    specs = find_layers(model, input_size) if specs is None else specs
    sel = make_selection(model, specs, cfg.include, cfg.exclude)
    cost = count_model(model, specs, input_size)
    methods = list(AUTO_FACTORIZATIONS) if cfg.decomp == "auto" else [cfg.decomp]
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
    return RankProblem(cfg.target, layers, cost.macs, cost.params, info.arch,
                       info.num_classes, info.in_chans, tuple(input_size), skipped, specs)


def build_problem(model: nn.Module, info: ModelInfo, input_size, cfg: CompressConfig,
                  specs: list[LayerSpec] | None = None) -> RankProblem:
    """The rank problem: every eligible layer's options and the budget (checked reachable)."""
    problem = rank_problem(model, info, input_size, cfg, specs)
    if not problem.layers:
        raise UserError(f"No layer of {info.arch} can be factorized with --decomp {cfg.decomp} "
                        f"(reasons: {'; '.join(sorted(set(problem.skipped.values())))}). Try "
                        "another --decomp or --include more layers (see `lrcompress inspect`).")
    _check_rank_grid(problem.layers, cfg.rank_multiple)
    if cfg.target.kind != "latency":  # a latency target is checked once measured
        try:
            problem.check_feasible()
        except TargetError as e:
            if cfg.rank_multiple <= 8:
                raise
            raise TargetError(f"{e} A finer rank grid reaches lower: --rank-multiple 8 (ranks "
                              f"off {cfg.rank_multiple}-channel blocks run slower on CPUs with "
                              "AVX-512).") from None
    return problem


def _check_rank_grid(layers: list[LayerOptions], multiple: int) -> None:
    """Refuse a --rank-multiple above the default that no layer has a rank on (every layer
    would fall back to all its ranks, so the flag would be silently ignored). The default, on
    a model too narrow for it, keeps its documented per-layer fallback (rank_grid)."""
    ranks = [o.rank for lo in layers for o in lo.options if o.rank > 0]
    if multiple > DEFAULT_RANK_MULTIPLE and not any(r % multiple == 0 for r in ranks):
        top = max(ranks)
        raise UserError(f"--rank-multiple {multiple} is larger than every factorizable layer's "
                        f"useful rank (the largest that saves MACs is {top}), so no rank is on "
                        f"that grid. Use --rank-multiple {min(DEFAULT_RANK_MULTIPLE, top)} or "
                        "less (1 allows any rank).")


def check_given_plan(plan: Plan, problem: RankProblem, cfg: CompressConfig,
                     where: str = "the plan") -> CompressConfig:
    """Before any work: refuse a given plan that does not fit the model (:func:`check_fits`),
    contradicts ``cfg.decomp`` (``auto`` accepts any) or misses a MACs/params target. Returns
    ``cfg`` with the plan's factorization as its ``decomp`` (``auto`` when it mixes several)."""
    check_fits(plan, problem.specs, arch=problem.arch, num_classes=problem.num_classes,
               in_chans=problem.in_chans, input_size=problem.input_size,
               base_macs=problem.base_macs, base_params=problem.base_params, where=where)
    used = sorted({get_factorization(lp.factorization).name for lp in plan.layers})
    own = used[0] if len(used) == 1 else "auto"
    if used and cfg.decomp not in ("auto", own):
        raise UserError(f"--decomp {cfg.decomp} contradicts {where}, which factorizes "
                        f"with {', '.join(used)}: a plan fixes every layer's factorization. "
                        f"Drop --decomp, or pass --decomp {own}.")
    t = cfg.target
    if t.kind != "latency":
        kept = plan.macs_ratio if t.kind == "flops" else plan.params_ratio
        if kept > t.ratio + 1e-12:
            made = (f" (--target-{plan.target.kind} {plan.target.ratio:g})"
                    if plan.target is not None and plan.target != t else "")
            raise TargetError(f"{where[:1].upper()}{where[1:]} keeps {kept:.4f} of the model's "
                              f"{'MACs' if t.kind == 'flops' else 'parameters'}, more than "
                              f"--target-{t.kind} {t.ratio:g}. Give the target the plan was made "
                              f"for{made}, or a plan that meets it.")
    return replace(cfg, decomp=own if used else cfg.decomp)


def check_batchnorm_batches(model: nn.Module, cfg: CompressConfig, split_sizes: dict) -> None:
    """Before any work: the stages that run ``model``'s BatchNorm layers in training mode
    (re-estimation, LoRITa, fine-tuning) need batches of 2 or more samples. ``split_sizes``:
    samples in the ``calib`` and ``train`` splits (a missing or None entry: not known)."""
    if not has_batchnorm(model):
        return
    uses = [(use, split, off) for use, split, off, on in (
        ("BatchNorm re-estimation", "calib", "--bn-batches 0", cfg.bn_batches > 0),
        ("LoRITa pre-tuning", "train", "no --lorita", cfg.lorita.enabled),
        ("fine-tuning", "train", "no fine-tuning", cfg.finetune.enabled)) if on]
    bs = cfg.data.batch_size
    for use, split, off in uses:
        n = split_sizes.get(split)
        if min(bs, bs if n is None else n) >= 2:
            continue
        what = (f"--batch-size {bs}" if bs < 2 else f"The {split} split holds only {n} sample")
        fix = ("--batch-size 2 or more (32 or more gives steady statistics)" if bs < 2 else
               "more images" + (" or a larger --calib-fraction" if split == "calib" else ""))
        raise UserError(f"{what}: {use} runs the model's BatchNorm layers in training mode, "
                        f"which needs batches of 2 or more samples. Use {fix}, or {off}.")


def prepare_latency(problem: RankProblem, model: nn.Module, input_size,
                    cfg: CompressConfig, progress: Progress | None = None) -> dict | None:
    """Before any work: every candidate's measured time on the latency engine (the options
    snapped to latency steps, nothing slower than dense) and the original measured whole.
    None unless the job has a latency target or ``--latency-aware``."""
    if not cfg.measures_latency:
        return None
    lat = cfg.latency
    check_engine(lat)
    if progress is not None:
        progress.stage(f"measuring candidate latencies ({lat.engine}, {lat.threads} thread(s), "
                       f"batch {lat.batch})")
    table = make_table(lat, cfg.cache_dir)
    # A MACs/params target keeps each layer's smallest rank: --latency-aware must not make a
    # target unreachable that the plain search reaches.
    options, summary = option_times(problem.layers, table, snap=True,
                                    keep_smallest=cfg.target.kind != "latency")
    kept = []
    for lo, opts in zip(problem.layers, options):
        lo.options = opts
        if len(opts) > 1:
            kept.append(lo)
        else:  # every chain is as slow as the dense layer, or slower: it stays dense
            problem.skipped[lo.spec.name] = (f"no factorized candidate is faster than the dense "
                                             f"layer on {lat.engine}")
    if not kept:
        raise UserError(f"On {lat.engine} (batch {lat.batch}, {lat.threads} thread(s)) no "
                        "factorized candidate of any layer is faster than the dense layer, so no "
                        "plan can make this model faster there. Try another --decomp, a larger "
                        "--latency-batch, or another --latency-engine.")
    problem.layers = kept
    summary["layers_without_faster_candidate"] = len(options) - len(kept)
    whole = measure_whole(model, None, input_size, lat)
    problem.base_latency = whole.original_ms
    out = {"config": lat.to_dict(), "table": summary,
           "original_ms": whole.original_ms, "original_iqr_ms": whole.original_iqr_ms}
    floor = check_reachable(problem, model, input_size, lat)
    if floor is not None:
        out["floor"] = floor
    return out


def _fastest_measured(problem: RankProblem, model: nn.Module, input_size, lat: LatencyConfig):
    """The faster, measured whole, of two extreme plans: every layer at its fastest candidate by
    the layer times, and every layer at its fewest MACs (the layer times miss graph effects such
    as layout changes between blocked and unblocked kernels, so the first is not always the
    fastest). Returns its timing and the layer times' estimate of its ratio. A plan both rules
    pick is measured once."""
    best = None
    choices = [problem.cheapest_choice(kind) for kind in ("latency", "flops")]
    for choice in (choices if choices[0] != choices[1] else choices[:1]):
        plan = problem.to_plan(choice, "fastest")
        w = measure_whole(model, timing_model(model, plan), input_size, lat)
        if best is None or w.ratio < best[0].ratio:
            best = (w, problem.cost_of(choice) / problem.base_cost)
    return best


def check_reachable(problem: RankProblem, model: nn.Module, input_size,
                    lat: LatencyConfig) -> dict | None:
    """Refuse a target no plan reaches. Under a latency target the additive model's floor (every
    layer at its fastest candidate) only decides when it meets the target; when it does not,
    the extreme plans of :func:`_fastest_measured` are built (seeded weights: latency does not
    depend on their values) and measured whole. If the faster meets the target, the additive
    model was pessimistic: the first solve's budget is corrected by the measured share of the
    predicted saving, and the measured floor is returned; otherwise the refusal quotes the
    measured ratio."""
    if problem.target.kind != "latency":
        problem.check_feasible()
        return None
    estimated = problem.min_cost() / problem.base_cost
    target = problem.target.ratio
    if estimated <= target:
        return None
    w, plan_estimate = _fastest_measured(problem, model, input_size, lat)
    if w.ratio > target + w.spread:
        ask = (f"Ask for {math.ceil(w.ratio * 100) / 100:.2f} or more, --include more layers, "
               "or use another --decomp." if w.ratio < 1 else
               "Factorizing this model does not make it faster on this engine and batch: try "
               "another --latency-batch or --latency-engine, or --decomp.")
        raise TargetError(
            f"--target-latency {target:.4g} cannot be reached: the fastest of the plans tried "
            f"(every one of the {len(problem.layers)} factorizable layers at its fastest "
            f"measured candidate, or at its fewest MACs; the rest as it is), measured whole, "
            f"runs at {w.ratio:.3f} ± {w.spread:.3f} of the original ({w.original_ms:.3f} ms on "
            f"{lat.engine}, batch {lat.batch}, {lat.threads} thread(s)). {ask}")
    start = max(corrected_ratio(target, plan_estimate, w.ratio, target), estimated * (1 + 1e-9))
    problem.target = Target("latency", start)
    return {"estimated": round(estimated, 4), "measured": round(w.ratio, 4),
            "spread": round(w.spread, 4), "first_budget": round(start, 4)}


# ------------------------------------------------------------------------- data-free mode

SYNTHETIC_FILE = "synthetic.safetensors"  # under RUN/state/: a resumed run reuses the inputs
NO_BATCHNORM = ("{arch} has no BatchNorm layer, so there are no statistics to synthesise "
                "calibration inputs from: using inputs drawn at the model's input mean/std "
                "instead. A few hundred unlabelled real images (--data imagefolder:DIR, a flat "
                "folder is fine) do much better.")


def needs_data(cfg: CompressConfig, plan_given: bool = False,
               batchnorm: bool = False) -> list[str]:
    """The stages of a job that read calibration or training inputs (``batchnorm``: the model
    has BatchNorm layers to re-estimate)."""
    uses = []
    if cfg.method in DATA_METHODS and not plan_given:
        uses.append(f"the {cfg.method} rank search")
    if cfg.fit == "activation":
        uses.append("the activation fit")
    if cfg.lorita.enabled:
        uses.append("LoRITa pre-tuning")
    if cfg.bn_batches and batchnorm:
        uses.append("BatchNorm re-estimation")
    if cfg.finetune.enabled:
        uses.append("fine-tuning")
    return uses


def fit_of(cfg: CompressConfig, has_calib: bool) -> str:
    """The fit the decomposition uses: ``auto`` is the activation fit whenever calibration
    inputs exist (real ones, or those synthesised for a data-free run), else the weight fit."""
    if cfg.fit == "auto":
        return "activation" if has_calib else "weight"
    return cfg.fit


def check_data_free(model: nn.Module, cfg: CompressConfig, arch: str) -> None:
    """Before any work: refuse what data-free mode cannot do for ``model``."""
    if cfg.fit == "activation" and not has_batchnorm(model):
        raise UserError(f"--fit activation fits the factors to the layers' outputs on "
                        f"calibration inputs, but no data was given and {arch} has no BatchNorm "
                        "layer to synthesise inputs from (random inputs would only fit noise). "
                        "Give a few hundred unlabelled real images (--data imagefolder:DIR, a "
                        "flat folder is fine), or use --fit weight.")


def synthesize_stage(job: Job) -> dict:
    """Data-free mode: calibration and training inputs made from the original model (kept in
    RUN/state/, so a resumed run reuses them), labelled with its top-1 prediction."""
    uses = needs_data(job.cfg, job.given_plan is not None, has_batchnorm(job.model))
    if not uses:
        return {"method": None, "used_for": [], "note": "no stage of this run reads inputs"}
    if job.run.has_state(SYNTHETIC_FILE):
        syn = load_synthetic(job.run.state(SYNTHETIC_FILE))
    else:
        syn = _make_synthetic(job)
        if job.run.writes:
            save_synthetic(syn, job.run.state(SYNTHETIC_FILE))
    calib, train = _synthetic_loaders(job, syn.inputs)
    job.loaders = replace(job.loaders, calib=calib, train=train, batch_size=calib.batch_size)
    return {**syn.summary, "used_for": uses}


def _make_synthetic(job: Job) -> Synthetic:
    synth = job.synth
    if not has_batchnorm(job.model):
        log.warning(NO_BATCHNORM.format(arch=job.info.arch))
        return noise_inputs(job.input_size, synth.samples, job.cfg.seed)
    mean, std = job.norm if job.norm is not None else (None, None)
    return synthesize(job.model, job.input_size, job.info.num_classes, synth, mean=mean,
                      std=std, seed=job.cfg.seed, progress=job.progress)


def _synthetic_loaders(job: Job, x: torch.Tensor):
    """(calib, train) loaders over the synthetic inputs, labelled by the original's top-1."""
    from torch.utils.data import DataLoader, TensorDataset

    bs = min(job.cfg.data.batch_size, len(x))
    label = top1_labeller(job.model, job.device)
    ds = TensorDataset(x, torch.cat([label(x[i:i + bs]) for i in range(0, len(x), bs)]))
    calib = DataLoader(ds, batch_size=bs, shuffle=False)
    train = DataLoader(ds, batch_size=bs, shuffle=True, drop_last=len(ds) > bs,
                       generator=torch.Generator().manual_seed(job.cfg.seed))
    return calib, train


# ---------------------------------------------------------------------------------- stages


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


def calibration_batches(job: Job) -> list:
    """The first ``calib_batches`` calibration batches, in their fixed order."""
    batches = []
    for x, y in job.loaders.calib or ():
        batches.append((x, y))
        if len(batches) >= job.cfg.calib_batches:
            break
    return batches


def lorita_stage(job: Job) -> tuple[nn.Module, dict]:
    """LoRITa pre-tuning of the selected layers (resumable: RUN/state/lorita.*)."""
    cfg, run = job.cfg, job.run
    if run.has_state("lorita.safetensors") and run.has_state("lorita.json"):
        dense = copy.deepcopy(job.model).cpu()
        dense.load_state_dict(read_checkpoint(run.state("lorita.safetensors"))[0])
        return dense.to(job.device).eval(), run.read_state_json("lorita.json")
    _need(job.loaders.train, "LoRITa pre-tuning", "train")
    names = [lo.spec.name for lo in job.problem.layers]
    stub = Plan(job.info.arch, job.info.num_classes, job.info.in_chans, tuple(job.input_size),
                (), job.problem.base_macs, job.problem.base_params)
    job.progress.stage(f"LoRITa pre-tuning (N={cfg.lorita.factors})",
                       total=_samples(job, cfg.lorita.steps))
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


def select_stage(job: Job, source: nn.Module, batches: list) -> tuple[Plan, dict]:
    """The plan: re-read after a resume, the given ``--plan``, or chosen by the rank method."""
    run, cfg = job.run, job.cfg
    if run.has_state(PLAN_FILE):
        plan = Plan.from_json(run.state(PLAN_FILE).read_text())
        trace = run.read_state_json("trace.json")
    elif job.given_plan is not None:
        plan, trace = job.given_plan, {"reapplied": str(cfg.plan_path)}
    else:
        plan, trace = select_ranks(source, job.problem, batches, cfg, job.device, run,
                                   tick=job.progress.advance, progress=job.progress,
                                   estimate=lambda rows: announce_estimate(job, source, batches,
                                                                           rows))
        plan = replace(plan, target=cfg.target)  # solved at a corrected latency budget, maybe
    _keep_plan(job, plan, trace)
    return plan, trace


def announce_estimate(job: Job, source: nn.Module, batches: list, rows) -> RunEstimate:
    """One line before the search: every stage's units × the measured cost of one (the rank
    method's own ``rows``; a forward, and a forward + backward, of the original on a calibration
    batch; the original's measured evaluation). Kept as ``job.estimate`` for the report."""
    cfg, est = job.cfg, RunEstimate()
    for row in rows:
        est.add(*row)
    if not rows:
        est.unknown.append(f"rank selection ({cfg.method})")
    x = (batches[0][0] if batches else  # no data: a batch of zeros of the input's shape
         torch.zeros(job.loaders.batch_size or 1, *job.input_size)).to(job.device)
    fwd = forward_seconds(source, x)
    t_eval = job.times.get("eval_original")
    if t_eval is not None:
        est.add("evaluation", 2 + cfg.finetune.enabled, "test passes", t_eval)
    if re_estimates_bn(job, source):
        est.add("BatchNorm re-estimation", cfg.bn_batches, "batches", fwd)
    if cfg.finetune.enabled and job.loaders.train is not None:
        steps = cfg.finetune.max_steps or cfg.finetune.epochs * len(job.loaders.train)
        est.add("fine-tuning", steps, "steps", forward_seconds(source, x, backward=True) + fwd)
    job.progress.info(est.line())
    job.estimate = est.to_dict()
    return est


def _keep_plan(job: Job, plan: Plan, trace: dict) -> None:
    """The chosen plan and its trace in RUN/state/ (a resumed run starts from them)."""
    job.run.write_state_json("trace.json", trace)
    job.run.write_state_text(PLAN_FILE, plan.to_json() + "\n")
    job.run.remove_state(f"search-{job.cfg.method}.pt")  # superseded by the plan


def select_ranks(model: nn.Module, problem: RankProblem, batches: list, cfg: CompressConfig,
                 device, run: RunDir | None = None, tick=None,
                 progress: Progress | None = None, estimate=None) -> tuple[Plan, dict]:
    """Run the rank method ``cfg.method`` on ``problem``: returns ``(plan, trace)``.
    ``estimate``, when given, first receives the method's run-time rows (empty when it has no
    probe) before the search starts."""
    run = run or RunDir(None)
    if progress is not None:
        progress.stage(f"rank selection ({cfg.method})")
    if cfg.method in DATA_METHODS and not batches:
        raise UserError(f"The rank method {cfg.method!r} needs calibration data (calib=...). "
                        "Give a few hundred inputs, synth=SynthConfig() to synthesise them from "
                        "the model's BatchNorm statistics, or use method='uniform'.")
    cache_dir = cfg.cache_dir or (run.path / CACHE_DIR if run.enabled else None)
    if run.enabled and cfg.cache_dir is None:
        run.record(f"{CACHE_DIR}/{SIGNALS_FILE}")
    cache = Cache(None if cache_dir is None else Path(cache_dir) / SIGNALS_FILE)
    stats = search_stats(model, problem, batches, cfg, progress)
    state = (SelectionState(run.state(f"search-{cfg.method}.pt"), run.fingerprint_text)
             if run.enabled else None)
    ctx = SelectContext(model, problem, batches, device, cache, cfg.seed,
                        {**cfg.method_config, "rene": cfg.rene},
                        tick=tick or (lambda: None), state=state,
                        stage=progress.stage if progress is not None else
                        (lambda name, total=None: None), stats=stats)

    if estimate is not None:
        probe = get_estimator(cfg.method)
        estimate(probe(ctx) if probe is not None and batches else [])

    def select(size):  # --auto-batch: the same calibration samples in smaller batches
        ctx.batches = rebatch(batches, size)
        return get_method(cfg.method)(ctx)

    first = batches[0][0].shape[0] if batches else 1
    (plan, trace), calib_bs = retry_halving(select, first, enabled=cfg.auto_batch,
                                            what="the rank search")
    trace["calib_batch_size"] = calib_bs
    trace["candidate_fit"] = "activation" if stats else "weight"
    return plan, trace


def search_stats(model: nn.Module, problem: RankProblem, batches: list, cfg: CompressConfig,
                 progress: Progress | None = None) -> dict | None:
    """The input statistics rene fits its candidates with under the activation fit (one pass
    over the calibration batches, every eligible layer), or None (weight-fitted candidates)."""
    if (cfg.method != "rene" or not cfg.rene.fit_candidates or not batches
            or fit_of(cfg, True) != "activation"):
        return None
    want = {lo.spec.name: kinds_for(lo.spec, {o.factorization for o in lo.options})
            for lo in problem.layers}
    want = {n: k for n, k in want.items() if k}
    if not want:
        return None
    if progress is not None:
        progress.stage("input statistics for the activation-fitted candidates")
    stats, _ = collect_layer_stats(model, batches, {lo.spec.name: lo.spec
                                                    for lo in problem.layers}, want)
    return stats


# Rank methods that read calibration data (the others work on the weights alone).
DATA_METHODS = ("rene", "sensitivity", "bisect")


def decompose_stage(job: Job, source: nn.Module, plan: Plan, fresh: bool = False) -> Decomposed:
    """The factorized student (decomposed from ``source``, or re-read after a resume unless
    ``fresh``)."""
    run = job.run
    if run.has_state("decomposed.safetensors") and not fresh:
        student = build_compressed(plan) if not _custom(job) else _skeleton(job.model, plan)
        student.load_state_dict(read_checkpoint(run.state("decomposed.safetensors"))[0])
        dec = run.read_state_json("decomposed.json")
        out = Decomposed(student, dec["rel_error"], dec["retries"], dec.get("fit"))
    else:
        stats = batches = None
        if fit_of(job.cfg, job.loaders.calib is not None) == "activation":
            batches = calibration_batches(job)
            stats, fit_skipped = collect_input_stats(source, batches, plan)
        job.progress.stage("decomposing", total=len(plan.layers))
        student = copy.deepcopy(source).cpu()
        res = decompose_(student, plan, progress=lambda _n: job.progress.advance(), stats=stats)
        out = Decomposed(student, {r.name: r.rel_error for r in res},
                         {r.name: r.retries for r in res if r.retries})
        if stats is not None:
            out.fit = fit_report(source, student, plan, batches, res, fit_skipped)
        if run.writes:  # decomposed.safetensors last: its presence means the stage is complete
            write_json(run.state("decomposed.json"),
                       {"rel_error": out.rel_errors, "retries": out.retries, "fit": out.fit})
            save_compressed(student, plan, run.state("decomposed.safetensors"))
    out.student.to(job.device).eval()
    return out


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


def latency_stage(job: Job, source: nn.Module, batches: list, plan: Plan,
                  dec: Decomposed) -> tuple[Plan, Decomposed]:
    """Measure the student whole against the original; under a latency target that is missed
    by more than the measurement's spread, re-solve with the corrected budget (up to
    ``max_resolves`` times). Records every attempt in ``job.latency``."""
    lat, target, problem = job.cfg.latency, job.cfg.target, job.problem
    attempts, solved_at = [], problem.target.ratio  # check_reachable may have corrected it
    while True:
        job.progress.stage(f"measuring latency, original vs compressed ({lat.engine})")
        whole = measure_whole(job.model, dec.student, job.input_size, lat)
        row = {"solved_at": solved_at, "macs_ratio": plan.macs_ratio, **whole.to_dict()}
        if target.kind == "latency":
            row["estimated_ratio"] = problem.cost_of(problem.choice_of(plan)) / problem.base_cost
        attempts.append(row)
        if target.kind != "latency" or whole.ratio <= target.ratio + whole.spread:
            break
        if len(attempts) > lat.max_resolves:
            break
        wanted = next_budget(target.ratio, row["estimated_ratio"], whole.ratio, solved_at,
                             problem.min_cost() / problem.base_cost)
        if wanted is None:
            row["stop"] = ("the measured savings are too small for the target even at the "
                           "fastest candidates")
            break
        solved_at = wanted
        new = _resolve(job, source, batches, solved_at)
        if new is None:
            row["stop"] = "the corrected budget is below what any plan can reach"
            break
        plan, dec = new
    problem.target = target
    job.latency = {**(job.latency or {}), **_latency_verdict(target, attempts)}
    if target.kind == "latency" and not job.latency["met"] and lat.strict:
        raise UserError(job.latency["summary"] + " (--strict-target).")
    return plan, dec


def _resolve(job: Job, source: nn.Module, batches: list, ratio: float):
    """Select and decompose again at budget ``ratio`` (None: that budget is unreachable)."""
    try:
        job.problem.target = Target("latency", ratio)
        job.problem.check_feasible()
    except (TargetError, UserError):
        return None
    plan, trace = select_ranks(source, job.problem, batches, job.cfg, job.device, job.run,
                               tick=job.progress.advance, progress=job.progress)
    plan = replace(plan, target=job.cfg.target)
    _keep_plan(job, plan, trace)
    return plan, decompose_stage(job, source, plan, fresh=True)


def _latency_verdict(target: Target, attempts: list[dict]) -> dict:
    last = attempts[-1]
    out = {"attempts": attempts, "measured_ratio": last["ratio"], "spread": last["spread"],
           "macs_ratio": last["macs_ratio"], "speedup": round(1 / last["ratio"], 4)}
    if target.kind != "latency":
        out["summary"] = (f"measured latency {last['ratio']:.3f} of the original (speed-up "
                          f"{1 / last['ratio']:.2f}x, ideal {1 / last['macs_ratio']:.2f}x)")
        return out
    met = last["ratio"] <= target.ratio + last["spread"]
    verdict = "meets" if met else "MISSES"
    out.update(target=target.ratio, met=met, summary=(
        f"measured latency {last['ratio']:.3f} ± {last['spread']:.3f} of the original "
        f"{verdict} the target {target.ratio:.3f} after {len(attempts)} attempt(s)"))
    return out


def re_estimates_bn(job: Job, model: nn.Module) -> bool:
    """Whether the job re-estimates BatchNorm statistics: asked for, calibration inputs to do
    it with, and BatchNorm layers in the model (a ViT has none: no stage, no timing)."""
    return bool(job.cfg.bn_batches) and job.loaders.calib is not None and bool(batchnorms(model))


def bn_stage(job: Job, student: nn.Module, plan: Plan) -> dict | None:
    """Re-estimate BatchNorm statistics after the factorized layers (None: not done, and not
    announced, e.g. on a model without BatchNorm such as a ViT)."""
    if not re_estimates_bn(job, student):
        return None
    job.progress.stage("re-estimating BatchNorm statistics",
                       total=_samples(job, job.cfg.bn_batches))
    rec = recalibrate_bn(student, [lp.name for lp in plan.layers], job.loaders.calib,
                         job.device, job.cfg.bn_batches, progress=job.progress.advance)
    return None if rec is None else rec.to_dict()


def finetune_stage(job: Job, student: nn.Module, plan: Plan) -> dict:
    """Distillation from the original (in place; resumable per epoch)."""
    cfg = job.cfg
    _need(job.loaders.train, "fine-tuning", "train")
    steps = cfg.finetune.max_steps or cfg.finetune.epochs * len(job.loaders.train)
    job.progress.stage("fine-tuning (distillation)", total=_samples(job, steps))
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


# ---------------------------------------------------------------------------- the sequence


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
        job.data_free = _timed(times, "synthesize", synthesize_stage, job)
    acc = {}
    original = _timed(times, "eval_original", evaluate_stage, job, job.model, "original",
                      "evaluating the original model")
    t = time.perf_counter()
    batches = calibration_batches(job)
    source, lorita_report = job.model, None
    if job.cfg.lorita.enabled:
        source, lorita_report = _timed(times, "lorita", lorita_stage, job)
        t = time.perf_counter()
    plan, trace = select_stage(job, source, batches)
    times["rank_selection"] = time.perf_counter() - t
    dec = _timed(times, "decompose", decompose_stage, job, source, plan)
    macs, params = verify_stage(job, dec.student, plan)
    if job.cfg.measures_latency:
        first = plan
        plan, dec = _timed(times, "latency", latency_stage, job, source, batches, plan, dec)
        if plan is not first:  # re-solved: check the new plan as the first was checked
            macs, params = verify_stage(job, dec.student, plan)
    student = dec.student
    acc["original"] = original
    acc["decomposed"] = _timed(times, "eval_decomposed", evaluate_stage, job, student,
                               "decomposed", "evaluating the decomposed model")
    t = time.perf_counter()
    bn_report = bn_stage(job, student, plan)
    if bn_report is not None:
        acc["bn_recalibrated"] = evaluate_stage(job, student, "bn_recalibrated",
                                                "evaluating after BatchNorm re-estimation")
    if bn_report is not None:
        times["bn_recalibration"] = time.perf_counter() - t
    ft_report = None
    if job.cfg.finetune.enabled:
        ft_report = _timed(times, "finetune", finetune_stage, job, student, plan)
        acc["finetuned"] = _timed(times, "eval_finetuned", evaluate_stage, job, student,
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


def _timed(times: dict, name: str, fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    times[name] = time.perf_counter() - t
    return out


def _samples(job: Job, batches: int) -> int | None:
    return None if job.loaders.batch_size is None else batches * job.loaders.batch_size


def _need(loader, stage: str, name: str) -> None:
    if loader is None:
        raise UserError(f"{stage} needs training data: pass {name}=... (a loader of (x, y), x "
                        "or dict batches).")


def _custom(job: Job) -> bool:
    """A model the user built (Python API): rebuilt from itself, not from an architecture name."""
    return job.info.arch.startswith(CUSTOM_ARCH)


def _skeleton(model: nn.Module, plan: Plan) -> nn.Module:
    """A copy of ``model`` with the plan's empty factorized chains in place."""
    m = copy.deepcopy(model).cpu()
    decompose_(m, plan, weights=False)
    return m.eval()


def timing_model(model: nn.Module, plan: Plan, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with the plan's chains, for timing only: their weights small seeded
    normals. (Empty chains hold whatever memory held; denormal or non-finite values make the
    CPU's arithmetic, and so the timing, many times slower.)"""
    m = _skeleton(model, plan)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lp in plan.layers:
            for p in m.get_submodule(lp.name).parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)
    return m


__all__ = ["CompressConfig", "DEFAULT_RANK_MULTIPLE", "CompressResult", "Job", "Loaders",
           "build_problem", "rank_problem",
           "calibration_batches", "decompose_stage", "evaluate_stage", "run_stages",
           "select_ranks", "resolve_device", "DATA_METHODS", "MODEL_FILE", "SynthConfig",
           "check_data_free", "needs_data", "synthesize_stage"]
