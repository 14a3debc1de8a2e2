"""Checks made before any work: the rank problem (every eligible layer's options, the target
reachable), a given ``--plan`` against the model, batch sizes against BatchNorm, data-free
prerequisites."""

from __future__ import annotations

import logging
from dataclasses import replace

from torch import nn

from lrcompress.calib.synthesize import (
    has_batchnorm,
)
from lrcompress.commands.job import AUTO_FACTORIZATIONS, DEFAULT_RANK_MULTIPLE, CompressConfig
from lrcompress.errors import TargetError, UserError
from lrcompress.factorizations import get_factorization
from lrcompress.model.arch import ModelInfo
from lrcompress.model.census import make_selection
from lrcompress.model.costs import count_model
from lrcompress.model.layers import LayerSpec, find_layers, skip_reason
from lrcompress.model.narrow import hidden_sites, narrowed_copy, planned_widths
from lrcompress.model.plan import Narrowing, Plan, check_fits
from lrcompress.rank.problem import LayerOptions, RankProblem, layer_options

log = logging.getLogger(__name__)


def narrowed_blocks(model: nn.Module, cfg: CompressConfig) -> list[tuple[str, int, int]]:
    """``--narrow-hidden``: (block, width, kept) of every block it narrows. Refuses a model with
    no block to narrow."""
    blocks = planned_widths(model, cfg.narrow_hidden, cfg.rank_multiple)
    if not blocks:
        reasons = sorted(set(hidden_sites(model)[1].values()))
        raise UserError(f"--narrow-hidden {cfg.narrow_hidden:g} narrows nothing in this model: "
                        "it needs inverted-residual blocks (1×1 expansion → depthwise → 1×1 "
                        "projection, as in mobilenetv2) or MLPs (fc1 → activation → fc2, as in "
                        "ViT and ConvNeXt) wider than one rank multiple"
                        + (f"; the blocks found {'; '.join(reasons)}" if reasons else "")
                        + ". Drop --narrow-hidden.")
    return blocks


def rank_problem(model: nn.Module, info: ModelInfo, input_size, cfg: CompressConfig,
                 specs: list[LayerSpec] | None = None) -> RankProblem:
    """The rank problem as ``search`` builds it, unchecked: it may have no layer, and its target
    may be out of reach (``inspect`` reports the smallest reachable ratio from it). With
    ``--narrow-hidden`` its layers are the narrowed model's; targets stay the original's."""
    if cfg.narrow_hidden is not None:  # the layers and dense cost of the narrowed shapes
        blocks = narrowed_blocks(model, cfg)
        problem = _layer_problem(narrowed_copy(model, blocks), info, input_size, cfg, None)
        problem.narrowing = Narrowing(tuple(blocks), problem.base_macs, problem.base_params,
                                      cfg.narrow_hidden)
        base = count_model(model, find_layers(model, input_size), input_size)
        problem.base_macs, problem.base_params = base.macs, base.params
        return problem
    return _layer_problem(model, info, input_size, cfg, specs)


def _layer_problem(model: nn.Module, info: ModelInfo, input_size, cfg: CompressConfig,
                   specs: list[LayerSpec] | None) -> RankProblem:
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


def check_data_free(model: nn.Module, cfg: CompressConfig, arch: str) -> None:
    """Before any work: refuse what data-free mode cannot do for ``model``."""
    if cfg.fit in ("activation", "sequential") and not has_batchnorm(model):
        raise UserError(f"--fit {cfg.fit} fits the factors to the layers' outputs on "
                        f"calibration inputs, but no data was given and {arch} has no BatchNorm "
                        "layer to synthesise inputs from (random inputs would only fit noise). "
                        "Give a few hundred unlabelled real images (--data imagefolder:DIR, a "
                        "flat folder is fine), or use --fit weight.")
