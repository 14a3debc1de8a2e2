"""``lrcompress inspect``: a model's census, what ``search`` can reach on it, a plan preview, and
the chains of a compressed model.

Everything ``search`` would decide is computed by ``search``'s own code: the rank problem of
:func:`~lrcompress.commands.compress.rank_problem` (the same layer eligibility, factorization,
rank grid and break-even limits), so the smallest reachable ratio ``inspect`` reports is the one
``search`` refuses below, and a preview is the plan ``search`` would make with a rank method that
reads no data. Nothing is decomposed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from lrcompress.commands.compress import (
    CompressConfig,
    build_problem,
    rank_problem,
    select_ranks,
)
from lrcompress.errors import UserError
from lrcompress.model.arch import ModelInfo
from lrcompress.model.census import Census, census
from lrcompress.model.plan import Plan, Target
from lrcompress.report.schema import layer_rows

# Rank methods that read only the weights: inspect can preview their plans.
PREVIEW_METHODS = ("uniform", "energy", "vbmf", "lsvt", "gsvt")
# Finer rank grid quoted next to the chosen one (search suggests it when a target is refused).
FINER_MULTIPLE = 8


@dataclass(frozen=True)
class Reach:
    """The smallest ratios ``search`` reaches with one --decomp and --rank-multiple."""

    decomp: str
    rank_multiple: int
    factorizable: int  # layers search would factorize (at least one rank saves MACs and params)
    macs_ratio: float  # every factorizable layer at its cheapest rank, the rest dense
    params_ratio: float
    finer_macs_ratio: float | None  # the same at --rank-multiple FINER_MULTIPLE (if finer)
    untouchable_macs_ratio: float  # MACs outside the factorizable layers: no grid goes below


@dataclass(frozen=True)
class Preview:
    """A plan ``search`` would make, computed without decomposing anything."""

    plan: Plan
    trace: dict
    rows: list[dict]  # report.json-style layer rows (factorized layers only)


def _floor(problem, kind: str) -> float:
    """The problem's smallest reachable cost ratio of ``kind`` (search's own check)."""
    p = replace(problem, target=Target(kind, 0.5))
    return p.min_cost() / p.base_cost


def reach(model: nn.Module, info: ModelInfo, input_size, cfg: CompressConfig) -> Reach:
    """What ``search`` with ``cfg``'s --decomp/--rank-multiple/--include/--exclude reaches."""
    problem = rank_problem(model, info, input_size, cfg)
    finer = None
    if cfg.rank_multiple > FINER_MULTIPLE:
        fine = rank_problem(model, info, input_size, replace(cfg, rank_multiple=FINER_MULTIPLE),
                            problem.specs)
        finer = _floor(fine, "flops")
    dense = sum(lo.dense.macs for lo in problem.layers)
    return Reach(cfg.decomp, cfg.rank_multiple, len(problem.layers), _floor(problem, "flops"),
                 _floor(problem, "params"), finer, 1.0 - dense / problem.base_macs)


def check_preview_method(method: str) -> None:
    if method not in PREVIEW_METHODS:
        raise UserError(
            f"inspect previews plans without data, and --method {method} chooses ranks from "
            "calibration data. Run `lrcompress search MODEL --method "
            f"{method} --target-flops R --data SPEC` for its plan, or preview one of "
            f"{', '.join(PREVIEW_METHODS)} here (e.g. --method uniform).")


def preview(model: nn.Module, info: ModelInfo, input_size, cfg: CompressConfig) -> Preview:
    """The plan ``search`` makes with ``cfg`` (a data-free rank method), not decomposed. An
    unreachable target is refused with search's own message."""
    check_preview_method(cfg.method)
    problem = build_problem(model, info, input_size, cfg)
    plan, trace = select_ranks(model, problem, [], cfg, torch.device("cpu"))
    factorized = [lp.spec for lp in plan.layers]
    return Preview(plan, trace, layer_rows(plan, factorized, {}))


def compressed_census(model: nn.Module, plan: Plan, input_size) -> tuple[Census, list[dict]]:
    """A compressed model's census with each factorized chain as one row of the plan (layer,
    factorization, rank, costs before/after), not as new layers: (census of the layers left
    dense, chain rows)."""
    c = census(model, plan.arch, input_size)
    inside = tuple(f"{lp.name}." for lp in plan.layers)
    rows = [r for r in c.rows if not r.name.startswith(inside)]
    cand = sum(r.macs for r in rows if r.candidate)
    chains = layer_rows(plan, [lp.spec for lp in plan.layers], {})
    return replace(c, rows=rows, candidate_macs=cand), chains


def model_dict(c: Census, r: Reach, p: Preview | None) -> dict:
    """``inspect --json`` of a model: the census, with ``min_reachable_macs_ratio`` the ratio
    search refuses below (``untouchable_macs_ratio``: the MACs outside every factorizable layer),
    ``reachable`` and, with a target, ``preview``."""
    d = c.to_dict()
    d["min_reachable_macs_ratio"] = r.macs_ratio
    d["untouchable_macs_ratio"] = r.untouchable_macs_ratio
    d["reachable"] = asdict(r)
    if p is not None:
        d["preview"] = {"plan": p.plan.to_dict(), "search": p.trace, "layers": p.rows,
                        "macs_ratio": p.plan.macs_ratio, "params_ratio": p.plan.params_ratio}
    return d


def run_dict(c: Census, plan: Plan, chains: list[dict]) -> dict:
    """``inspect --json`` of a compressed model: its chains, and the census of the rest."""
    d = c.to_dict()
    return {**d, "compressed": True, "base_macs": plan.base_macs,
            "base_params": plan.base_params, "macs_ratio": plan.macs_ratio,
            "params_ratio": plan.params_ratio, "chains": chains}


__all__ = ["FINER_MULTIPLE", "PREVIEW_METHODS", "Preview", "Reach", "check_preview_method",
           "compressed_census", "model_dict", "preview", "reach", "run_dict"]
