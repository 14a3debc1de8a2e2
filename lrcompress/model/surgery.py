"""Model surgery: the only code that swaps modules. ``decompose_(model, plan)`` applies a plan."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from lrcompress.errors import UserError
from lrcompress.factorizations import (
    chain_factors,
    collect_notes,
    get_factorization,
    relative_error,
)
from lrcompress.model.narrow import narrow_to_widths_
from lrcompress.model.plan import Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerResult:
    name: str
    rel_error: float  # ‖W − Ŵ‖_F / ‖W‖_F of the factorized weight (nan for skeletons)
    seconds: float
    retries: int = 0  # extra attempts the decomposition needed (CP-ALS re-initialisations)
    fit: str = "weight"  # "activation" where input statistics were given and used


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` (dotted) of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@contextlib.contextmanager
def swap_modules(model: nn.Module, new: dict[str, nn.Module]):
    """Temporarily replace modules by name (for trial evaluations); restored on exit."""
    old = {name: model.get_submodule(name) for name in new}
    try:
        for name, mod in new.items():
            set_module(model, name, mod)
        yield model
    finally:
        for name, mod in old.items():
            set_module(model, name, mod)


def check_plan_fits(model: nn.Module, plan: Plan) -> None:
    """Every planned layer exists and has the shape the plan was made for."""
    modules = dict(model.named_modules())
    for lp in plan.layers:
        mod = modules.get(lp.name)
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            raise UserError(f"The plan factorizes {lp.name!r}, but this model has no conv/linear "
                            f"layer of that name. The plan was made for {plan.arch}.")
        if tuple(mod.weight.shape) != lp.spec.weight_shape:
            raise UserError(f"The plan expects {lp.name} with weight {lp.spec.weight_shape}, the "
                            f"model has {tuple(mod.weight.shape)}: it was made for another model.")


@torch.no_grad()
def decompose_(model: nn.Module, plan: Plan, *, weights: bool = True, progress=None,
               stats: dict | None = None, **opts) -> list[LayerResult]:
    """Replace each planned layer by its factorized chain, in place.

    ``weights=False`` builds empty skeletons (for reloading saved weights); otherwise each chain is
    decomposed from the layer's current weight. ``progress(name)`` is called after each layer.
    ``stats`` (``{name: LayerStats}``, from :func:`~lrcompress.model.input_stats.
    collect_input_stats`) asks for the activation-aware fit of the layers it covers.
    """
    import time

    if plan.narrowing is not None and not weights:
        # A skeleton is narrowed first (the planned layers have the narrowed shapes). A model to
        # decompose must come narrowed, with fitted values: check_plan_fits refuses one that
        # is not (its layers keep the original's shapes).
        narrow_to_widths_(model, plan.narrowing.blocks)
    check_plan_fits(model, plan)
    results = []
    for lp in plan.layers:
        t0 = time.perf_counter()
        mod = model.get_submodule(lp.name)
        fact = get_factorization(lp.factorization)
        retries, fit = 0, "weight"
        if weights:
            with collect_notes() as notes:
                chain = fact.from_weight(mod.weight, mod.bias, lp.spec, lp.rank,
                                         stats=(stats or {}).get(lp.name), **opts)
            retries = sum(n.get("retries", 0) for n in notes)
            fit = next((n["fit"] for n in notes if "fit" in n), "weight")
            rec = fact.reconstruct([f.double() for f in chain_factors(chain)], lp.spec)
            err = relative_error(mod.weight, rec)
        else:
            chain = fact.skeleton(lp.spec, lp.rank, dtype=mod.weight.dtype,
                                  device=mod.weight.device)
            err = float("nan")
        set_module(model, lp.name, chain)
        results.append(LayerResult(lp.name, err, time.perf_counter() - t0, retries, fit))
        if progress is not None:
            progress(lp.name)
    return results
