"""Rank selectors: each takes a :class:`SelectContext` and returns ``(Plan, trace)``.

The registry maps ``--method`` names to selector functions; every selector works on the same
:class:`RankProblem` (options per layer, budget) and returns the same ``Plan`` type, so every later
stage is shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lrcompress.errors import UserError
from lrcompress.rank.problem import (
    DENSE,
    LayerOptions,
    Option,
    RankProblem,
    allocate,
    layer_options,
)
from lrcompress.rank.selection_state import SelectionState
from lrcompress.rank.signals import Cache

RANK_METHODS: dict[str, Callable] = {}
# Per method: ctx -> rows (stage, units, unit, seconds per unit) from a quick probe.
ESTIMATORS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        RANK_METHODS[name] = fn
        return fn

    return deco


def get_method(name: str) -> Callable:
    _load_builtin()
    try:
        return RANK_METHODS[name]
    except KeyError:
        raise UserError(f"Unknown rank method {name!r}: choose one of "
                        f"{', '.join(sorted(RANK_METHODS))}.") from None


@dataclass
class SelectContext:
    model: nn.Module  # the original model (eval mode, on ``device``); never modified
    problem: RankProblem
    batches: list  # calibration batches [(x, y)], fixed order
    device: torch.device
    cache: Cache
    seed: int = 0
    config: dict = field(default_factory=dict)  # per-method configs, e.g. {"rene": ReneConfig}
    tick: Callable[[], None] = lambda: None  # progress callback: one unit of work done
    # Names a unit of work and how many units it has (e.g. "step 2: optimising", 100), so the
    # progress bar shows a count and a time estimate; a no-op by default.
    stage: Callable[..., None] = lambda name, total=None: None
    # Mid-search progress under RUN/state/ (selection_state.SelectionState): load() at the start,
    # save() every so often, so a killed search resumes inside its loop. None: not kept.
    state: SelectionState | None = None
    # What a method's run-time probe (``get_estimator``) leaves for its search, e.g. rene's
    # first-step candidate factors, so the probe's work is not done twice.
    scratch: dict = field(default_factory=dict)
    # The activation fit's input statistics per layer (factorizations.LayerStats), when the run
    # fits activations: rene fits its candidates with them, so the search compares what ships.
    stats: dict | None = None
    # The original model's outputs (float32) on ``batches``, when a pass over them already
    # computed them (the statistics'): rene's distillation targets. None: not known.
    logits: list | None = None


def get_estimator(name: str) -> Callable | None:
    """The method's run-time probe, or None when it has none."""
    _load_builtin()
    return ESTIMATORS.get(name)


def _load_builtin() -> None:
    if RANK_METHODS:
        return
    from lrcompress.rank import bisect, energy, rene, sensitivity, svt, uniform, vbmf

    register("uniform")(uniform.select)
    register("rene")(rene.select)
    register("energy")(energy.select)
    register("vbmf")(vbmf.select)
    register("lsvt")(svt.select_lsvt)
    register("gsvt")(svt.select_gsvt)
    register("isvt")(svt.select_isvt)
    register("bisect")(bisect.select)
    register("sensitivity")(sensitivity.select)
    ESTIMATORS["rene"] = rene.estimate


__all__ = ["DENSE", "LayerOptions", "Option", "RankProblem", "SelectContext", "allocate",
           "get_estimator", "get_method", "layer_options", "register", "RANK_METHODS"]
