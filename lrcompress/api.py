"""The Python API: compress any ``nn.Module``, save it, load it back.

    result = lrcompress.compress(model, example_inputs, target_flops=0.3, calib=calib_loader)
    lrcompress.save(result, "m.safetensors")
    model = lrcompress.load("m.safetensors", model=MyNet)

``compress`` runs the same stages as ``lrcompress search`` (rank selection, decomposition,
BatchNorm re-estimation, optional distillation) on a model the user built; the model is traced
only by running ``example_inputs`` through it. Each stage is public too: :func:`select_ranks`,
:func:`decompose_`, :func:`recalibrate_bn`, :func:`distill`, :func:`export_onnx`,
:func:`evaluate`. Nothing touches the disk unless ``run_dir`` is given.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from lrcompress.batches import UserBatches, top1_labeller
from lrcompress.calib.synthesize import SynthConfig
from lrcompress.commands.compress import (
    DEFAULT_RANK_MULTIPLE,
    CompressConfig,
    CompressResult,
    Job,
    Loaders,
    build_problem,
    calibration_batches,
    check_data_free,
    check_given_plan,
    make_target,
    prepare_latency,
    resolve_device,
    run_stages,
)
from lrcompress.commands.compress import select_ranks as _select_on_problem
from lrcompress.commands.run_dir import RunDir
from lrcompress.deploy.onnx import export_onnx as _export_graph
from lrcompress.errors import UserError
from lrcompress.measure.latency_target import LatencyConfig
from lrcompress.measure.metrics import Accuracy
from lrcompress.measure.metrics import evaluate as _evaluate
from lrcompress.model.arch import CUSTOM_ARCH, ModelInfo, load_state_dict_strict
from lrcompress.model.plan import Plan
from lrcompress.model.surgery import decompose_
from lrcompress.model.weights import PLAN_METADATA_KEY, read_compressed_file, save_compressed
from lrcompress.model.weights import load as _load_named
from lrcompress.rank.rene import ReneConfig
from lrcompress.recover.bn import recalibrate_bn as _recalibrate
from lrcompress.recover.finetune import FinetuneConfig, FinetuneResult
from lrcompress.recover.finetune import distill as _distill
from lrcompress.util.io import atomic_path
from lrcompress.util.progress import Progress


def compress(model: nn.Module, example_inputs, *, target_flops: float | None = None,
             target_params: float | None = None, target_latency: float | None = None,
             target_speedup: float | None = None, latency: LatencyConfig | None = None,
             decomp: str = "tt", method: str = "rene",
             calib=None, train=None, eval=None, finetune: FinetuneConfig | None = None,
             include=(), exclude=(), seed: int = 0, device: str = "auto", run_dir=None,
             input_key: str | None = None, label_key: str | None = None,
             rank_multiple: int = DEFAULT_RANK_MULTIPLE, calib_batches: int = 8,
             bn_batches: int = 16,
             fit: str = "auto", rene: ReneConfig | None = None, plan: Plan | None = None,
             overwrite: bool = False, progress: Progress | None = None,
             synth: SynthConfig | None = None,
             narrow_hidden: float | None = None) -> CompressResult:
    """Compress ``model`` so that it meets the target; returns model, plan and report.

    ``example_inputs``: a batch (``N×…``, or a 1-tuple holding it) the model accepts; layer
    shapes and costs are measured on it. ``calib`` / ``train`` / ``eval``: re-iterable loaders of
    ``(x, y)``, ``x`` alone, or dict batches (``input_key`` / ``label_key``). Unlabelled
    calibration and training batches are labelled with the original model's top-1 prediction
    (distillation only); ``eval`` must be labelled. ``model`` itself is never modified.

    ``target_latency=R`` (or ``target_speedup=S``, R = 1/S): the compressed model's *measured*
    latency at most R × the original's on ``latency``'s engine (default ONNX Runtime CPU, one
    thread, batch 1); ``LatencyConfig(aware=True)`` with a MACs/params target drops candidates
    that are slow for their cost and reports the measured speed-up. ``fit="auto"`` (with
    ``calib``: ``"sequential"``) fits each layer, in order, to the original's outputs from the
    inputs the already-compressed layers produce; ``"activation"`` fits every layer on the
    original's inputs; ``"weight"`` fits the weights.

    ``synth=SynthConfig()`` with no ``calib`` and no ``train``: data-free, the calibration and
    training inputs are synthesised from the model's BatchNorm statistics (in the example's
    value range; the report's ``data_free`` says how well they match).

    ``narrow_hidden=K``: first narrow every inverted-residual block's and MLP's hidden width to K
    of it (an interpolative decomposition fitted on ``calib``; lrcompress.model.narrow), then
    factorize the narrowed model to meet the target.
    """
    target = make_target(target_flops, target_params, target_latency, target_speedup)
    cfg = CompressConfig(target, decomp=decomp, method=method,
                         rank_multiple=rank_multiple, include=tuple(include),
                         exclude=tuple(exclude), seed=seed, device=device,
                         calib_batches=calib_batches, rene=rene or ReneConfig(),
                         finetune=finetune or FinetuneConfig(), bn_batches=bn_batches,
                         overwrite=overwrite, latency=latency or LatencyConfig(), fit=fit,
                         narrow_hidden=narrow_hidden)
    teacher, info, input_size, problem, device_ = _prepare(model, example_inputs, cfg)
    if plan is not None:
        cfg = check_given_plan(plan, problem, cfg)
    loaders = _loaders(teacher, device_, input_size, calib, train, eval, input_key, label_key)
    data_free = synth is not None and calib is None and train is None
    if data_free:
        check_data_free(teacher, cfg, info.arch)
    elif synth is not None:
        raise UserError("synth=... synthesises inputs when there is no data: leave it out when "
                        "passing calib= or train=.")
    if cfg.fit in ("activation", "sequential") and calib is None and not data_free:
        raise UserError("fit='activation' fits the factors to the layers' outputs on "
                        "calibration inputs: pass calib=... (a few hundred inputs), or use "
                        "fit='weight'.")
    if narrow_hidden is not None and calib is None and not data_free:
        raise UserError("narrow_hidden=... fits the narrowed blocks on calibration inputs: pass "
                        "calib=... (a few hundred inputs).")
    if cfg.finetune.enabled and train is None and not data_free:
        raise UserError("finetune=... asks for fine-tuning, which needs training data: pass "
                        "train=... (labelled or not), or drop finetune.")
    run = RunDir(run_dir, {**_fingerprint(model, info, input_size, cfg, plan),
                           **({"synth": synth.to_dict()} if data_free else {})}, cfg.overwrite)
    run.check()
    progress = progress or Progress()
    latency_costs = prepare_latency(problem, teacher, input_size, cfg, progress)
    job = Job(teacher, info, input_size, problem, loaders, cfg, device_, run, progress, plan,
              ["lrcompress.compress"], latency=latency_costs,
              synth=synth if data_free else None)
    return run_stages(job)


def select_ranks(model: nn.Module, example_inputs, *, target_flops: float | None = None,
                 target_params: float | None = None, decomp: str = "tt", method: str = "rene",
                 calib=None, input_key: str | None = None, label_key: str | None = None,
                 include=(), exclude=(), rank_multiple: int = DEFAULT_RANK_MULTIPLE,
                 calib_batches: int = 8,
                 rene: ReneConfig | None = None, seed: int = 0, device: str = "auto") -> Plan:
    """Only the rank selection: the plan ``compress`` would apply (nothing is decomposed)."""
    cfg = CompressConfig(make_target(target_flops, target_params), decomp=decomp, method=method,
                         rank_multiple=rank_multiple, include=tuple(include),
                         exclude=tuple(exclude), seed=seed, device=device,
                         calib_batches=calib_batches, rene=rene or ReneConfig())
    teacher, info, input_size, problem, device_ = _prepare(model, example_inputs, cfg)
    loaders = _loaders(teacher, device_, input_size, calib, None, None, input_key, label_key)
    job = Job(teacher, info, input_size, problem, loaders, cfg, device_)
    return _select_on_problem(teacher, problem, calibration_batches(job), cfg, device_)[0]


def recalibrate_bn(model: nn.Module, plan: Plan, calib, *, batches: int = 16,
                   device: str = "auto", input_key: str | None = None) -> dict | None:
    """Re-estimate, in place, the BatchNorm statistics after the plan's factorized layers."""
    dev = resolve_device(device)
    data = UserBatches(calib, "calib", input_shape=tuple(plan.input_size), input_key=input_key,
                       labeller=lambda x: torch.zeros(len(x), dtype=torch.long))
    rec = _recalibrate(model.to(dev), [lp.name for lp in plan.layers], data, dev, batches)
    return None if rec is None else rec.to_dict()


def distill(student: nn.Module, teacher: nn.Module, plan: Plan, train, calib, *,
            finetune: FinetuneConfig | None = None, seed: int = 0, device: str = "auto",
            input_key: str | None = None, label_key: str | None = None) -> FinetuneResult:
    """Fine-tune ``student`` in place by distillation from ``teacher`` (best epoch on calib)."""
    cfg = finetune or FinetuneConfig(max_steps=100)
    if not cfg.enabled:
        raise UserError("distill() needs a budget: FinetuneConfig(max_steps=N) or epochs=N.")
    dev = resolve_device(device)
    teacher = teacher.to(dev).eval()
    loaders = _loaders(teacher, dev, tuple(plan.input_size), calib, train, None, input_key,
                       label_key)
    return _distill(student, teacher, plan, loaders, cfg, dev, seed=seed)


def evaluate(model: nn.Module, loader, *, device: str = "auto", input_key: str | None = None,
             label_key: str | None = None) -> Accuracy:
    """Top-1/top-5 accuracy and loss on a labelled loader."""
    dev = resolve_device(device)
    data = UserBatches(loader, "eval", input_shape=None, input_key=input_key,
                       label_key=label_key)
    return _evaluate(model.to(dev), data, dev)


def export_onnx(model: nn.Module, example_inputs, path, *, opset: int = 18,
                dynamic_batch: bool = False) -> Path:
    """Write ``model`` as a self-contained ONNX graph (checked by onnx.checker)."""
    example = _example(example_inputs)
    proto = _export_graph(model.eval(), tuple(example.shape[1:]), opset=opset,
                          dynamic_batch=dynamic_batch)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return path


def save(result, path, *, plan: Plan | None = None) -> Path:
    """Write a compressed model and its plan to ``path`` (``.safetensors``).

    ``result``: what :func:`compress` returned, or a compressed ``nn.Module`` with ``plan=``.
    """
    if isinstance(result, CompressResult):
        return save_compressed(result.model, result.plan, path)
    if isinstance(result, nn.Module) and isinstance(plan, Plan):
        return save_compressed(result, plan, path)
    raise UserError("save() takes the result of compress(), or a model with plan=Plan.")


def load(path, model=None) -> nn.Module:
    """Rebuild a compressed model from ``RUN/`` or its ``model.safetensors``.

    A timm/torchvision model is rebuilt from the architecture named in the plan. A model the user
    built needs ``model=``: its class or a no-argument constructor, or an instance (changed in
    place), which must be the architecture the plan was made for.
    """
    path, sd, meta = read_compressed_file(path)
    plan = Plan.from_json(meta[PLAN_METADATA_KEY])
    if model is None:
        if plan.arch.startswith(CUSTOM_ARCH):
            raise UserError(f"{path} holds a compressed {plan.arch[len(CUSTOM_ARCH):]}, a model "
                            "built in Python: pass model= (its class, a constructor, or an "
                            "instance) to rebuild it.")
        return _load_named(path)
    net = _instantiate(model)
    decompose_(net, plan, weights=False)
    load_state_dict_strict(net, sd, f"the compressed {plan.arch} described by its plan")
    return net.eval()


# ---------------------------------------------------------------------------------- helpers


def _prepare(model, example_inputs, cfg: CompressConfig):
    """(original on the device, its ModelInfo, per-sample input size, rank problem, device):
    the model checked, copied (the user's object is never touched) and traced on the example."""
    example = _example(example_inputs)
    _check_module(model)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    teacher = copy.deepcopy(model).to(device).eval()
    info = _info(teacher, example)
    input_size = tuple(example.shape[1:])
    return teacher, info, input_size, build_problem(teacher, info, input_size, cfg), device


def _example(example_inputs) -> torch.Tensor:
    x = example_inputs
    if isinstance(x, (tuple, list)):
        if len(x) != 1:
            raise UserError(f"example_inputs has {len(x)} tensors; lrcompress traces models of "
                            "one input tensor (a batch N×C×H×W). Wrap a multi-input model so "
                            "that it takes one tensor.")
        x = x[0]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(f"example_inputs must be a floating-point batch tensor (N×C×H×W for an "
                        f"image model), got {got}.")
    return x.detach()


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, not {type(model).__name__}.")


@torch.no_grad()
def _info(model: nn.Module, example: torch.Tensor) -> ModelInfo:
    """Runs ``example`` through the model (which must accept it); the model's I/O."""
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    try:
        out = model(example[:1].to(dev))
    except Exception as e:  # noqa: BLE001 - any failure here means the input does not fit
        raise UserError(f"The model rejects example_inputs of shape {tuple(example.shape)}: "
                        f"{type(e).__name__}: {e}. Give a batch the model's forward accepts."
                        ) from e
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"The model's output on example_inputs is {got}; lrcompress compresses "
                        "classifiers whose output is one N×classes tensor of logits.")
    cls = type(model)
    return ModelInfo(f"{CUSTOM_ARCH}{cls.__module__}.{cls.__qualname__}", int(out.shape[1]),
                     int(example.shape[1]), "python")


def _loaders(teacher, device, input_size, calib, train, eval_, input_key, label_key) -> Loaders:
    label = top1_labeller(teacher, device)

    def wrap(src, what, labeller):
        if src is None:
            return None
        return UserBatches(src, what, input_shape=input_size, input_key=input_key,
                           label_key=label_key, labeller=labeller)

    parts = (wrap(calib, "calib", label), wrap(train, "train", label), wrap(eval_, "eval", None))
    size = next((getattr(s, "batch_size", None) for s in (train, calib, eval_)
                 if getattr(s, "batch_size", None)), None)
    return Loaders(*parts, description="Python loaders", batch_size=size)


def _fingerprint(model: nn.Module, info: ModelInfo, input_size, cfg: CompressConfig,
                 plan: Plan | None) -> dict:
    """What must be equal to resume into the same run_dir: architecture, weights, settings."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return json.loads(json.dumps({"arch": info.arch, "weights_sha256": h.hexdigest(),
                                  "input_size": list(input_size), "config": cfg.resume_dict(),
                                  "plan": plan.to_dict() if plan else None}, default=list))


def _instantiate(model) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if callable(model):
        try:
            net = model()
        except TypeError as e:
            raise UserError(f"load(model={getattr(model, '__name__', model)!r}) could not call "
                            f"it without arguments ({e}). Pass an instance instead: "
                            "load(path, model=MyNet(...)).") from e
        if isinstance(net, nn.Module):
            return net
    raise UserError(f"load(model=...) takes an nn.Module instance, its class, or a function "
                    f"returning one; got {type(model).__name__}.")
