"""The compression job's data: its configuration, loaders, the :class:`Job` every stage reads, and
the small helpers the stages share."""

from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lrcompress.calib.synthesize import (
    SynthConfig,
)
from lrcompress.commands.run_dir import RunDir
from lrcompress.data import DataConfig
from lrcompress.errors import UserError
from lrcompress.factorizations import ALIASES, FACTORIZATIONS
from lrcompress.measure.latency_target import (
    LatencyConfig,
    speedup_ratio,
)
from lrcompress.model.arch import CUSTOM_ARCH, ModelInfo
from lrcompress.model.plan import Plan, Target
from lrcompress.model.surgery import decompose_
from lrcompress.model.weights import save_compressed
from lrcompress.rank.problem import RankProblem
from lrcompress.rank.rene import ReneConfig
from lrcompress.recover.bn import batchnorms
from lrcompress.recover.finetune import FinetuneConfig
from lrcompress.recover.lorita import LoritaConfig
from lrcompress.util.config import require
from lrcompress.util.progress import Progress

log = logging.getLogger(__name__)

AUTO_FACTORIZATIONS = ("svd", "tucker2", "cp", "tt")
FITS = ("auto", "weight", "activation", "sequential")


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
    # original model's layer inputs from the calibration batches; factorizations/_activation.py),
    # "sequential" (each layer fitted on the inputs the already-compressed layers produce,
    # toward the original's output) or "auto" (sequential whenever calibration inputs exist:
    # fit_of).
    fit: str = "auto"
    # Narrow every inverted-residual block's and MLP's hidden width to this fraction before
    # factorizing (lrcompress.model.narrow; fitted on the calibration batches). None: off.
    narrow_hidden: float | None = None

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
        self._check_narrowing()
        tolerance = self.method_config.get("bisect", {}).get("max_loss_increase")
        if tolerance is not None:
            require("--max-loss-increase", tolerance, above=0, why="in nats")

    def _check_narrowing(self) -> None:
        k = self.narrow_hidden
        if k is None:
            return
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k < 1:
            raise UserError(f"--narrow-hidden {k} is out of range: it is the fraction of each "
                            "block's hidden width to keep, strictly between 0 and 1 (e.g. 0.3).")
        if self.lorita.enabled:
            raise UserError("--narrow-hidden and --lorita cannot be combined yet: LoRITa tunes "
                            "the original's layers, narrowing changes their shapes. Use one.")
        if self.plan_path:
            raise UserError("--narrow-hidden cannot be combined with --plan: a plan fixes the "
                            "layers' shapes, and narrowing is fitted to calibration data. Drop "
                            "--plan to search again with narrowing.")

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
        if self.narrow_hidden is None:  # runs made before the option resume as they were
            d.pop("narrow_hidden", None)
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
    narrowed: dict | None = None  # what narrow_stage did (the report's "narrowing")
    # calibration_batches' result, read once: three stages use the same batches.
    calib_memo: list | None = None


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


def fit_of(cfg: CompressConfig, has_calib: bool) -> str:
    """The fit the decomposition uses: ``auto`` is the sequential activation fit whenever
    calibration inputs exist (real ones, or those synthesised for a data-free run), else the
    weight fit. Measured before fine-tuning (benchmarks/RESULTS_fits.md): sequential beat the
    plain activation fit in every cell, e.g. mobilenetv2 at 50 % MACs 73.2 → 81.7 % top-1."""
    if cfg.fit == "auto":
        return "sequential" if has_calib else "weight"
    return cfg.fit


# Rank methods that read calibration data (the others work on the weights alone).
DATA_METHODS = ("rene", "sensitivity", "bisect")


def needs_data(cfg: CompressConfig, plan_given: bool = False,
               batchnorm: bool = False) -> list[str]:
    """The stages of a data-free job that read the synthesised inputs (``batchnorm``: the model
    has BatchNorm layers to re-estimate; see :func:`re_estimates_bn` for when it does)."""
    uses = []
    fit = fit_of(cfg, has_calib=True)  # synthesised inputs are calibration inputs
    if cfg.method in DATA_METHODS and not plan_given:
        uses.append(f"the {cfg.method} rank search")
    if fit != "weight":
        uses.append(f"the {fit} fit")
    if cfg.lorita.enabled:
        uses.append("LoRITa pre-tuning")
    if cfg.narrow_hidden is not None:
        uses.append("hidden-width narrowing")
    if cfg.bn_batches and batchnorm and fit == "weight":
        uses.append("BatchNorm re-estimation")
    if cfg.finetune.enabled:
        uses.append("fine-tuning")
    return uses


def calibration_batches(job: Job) -> list:
    """The first ``calib_batches`` calibration batches, in their fixed order (read once)."""
    if job.calib_memo is None:
        job.calib_memo = _take(job.loaders.calib, 0, job.cfg.calib_batches)
    return job.calib_memo


def held_out_batches(job: Job) -> list:
    """``calib_batches`` calibration batches after the first ``bn_batches`` (those BatchNorm
    re-estimation reads), to judge it on inputs it did not see; [] when the split has none."""
    return _take(job.loaders.calib, job.cfg.bn_batches, job.cfg.calib_batches)


def _take(loader, skip: int, n: int) -> list:
    """Batches ``skip`` … ``skip + n − 1`` of ``loader`` (no batch after them is read)."""
    return [(x, y) for x, y in itertools.islice(loader or (), skip, skip + max(n, 0))]


def re_estimates_bn(job: Job, model: nn.Module) -> bool:
    """Whether the job re-estimates BatchNorm statistics: asked for, calibration inputs to do
    it with, and BatchNorm layers in the model (a ViT has none: no stage, no timing). Not on
    synthesised inputs after an output-aware fit: measured there it cost 0.3–0.65 points
    (benchmarks/RESULTS_datafree.md); it still follows the weight fit (+6 points there)."""
    if job.synth is not None and fit_of(job.cfg, has_calib=True) != "weight":
        return False
    return bool(job.cfg.bn_batches) and job.loaders.calib is not None and bool(batchnorms(model))


def timed(times: dict, name: str, fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    times[name] = time.perf_counter() - t
    return out


def samples_of(job: Job, batches: int) -> int | None:
    return None if job.loaders.batch_size is None else batches * job.loaders.batch_size


def need_loader(loader, stage: str, name: str) -> None:
    if loader is None:
        raise UserError(f"{stage} needs training data: pass {name}=... (a loader of (x, y), x "
                        "or dict batches).")


def is_custom(job: Job) -> bool:
    """A model the user built (Python API): rebuilt from itself, not from an architecture name."""
    return job.info.arch.startswith(CUSTOM_ARCH)


def skeleton_of(model: nn.Module, plan: Plan) -> nn.Module:
    """A copy of ``model`` with the plan's empty factorized chains in place."""
    m = copy.deepcopy(model).cpu()
    decompose_(m, plan, weights=False)
    return m.eval()
