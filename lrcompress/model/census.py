"""``inspect``: a per-layer census of a model with costs and what each factorization could do."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from lrcompress.factorizations import FACTORIZATIONS, break_even_rank
from lrcompress.model.costs import count_model, dense_macs, dense_params
from lrcompress.model.layers import (
    LayerSpec,
    Selection,
    check_patterns,
    find_layers,
    protected_names,
    skip_reason,
)


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    shape: tuple[int, ...]  # weight shape
    stride: tuple[int, int]
    groups: int
    out_size: tuple[int, int]  # output H×W (tokens×1 for linear)
    macs: int
    params: int
    macs_share: float  # fraction of the whole model's MACs
    candidate: bool  # eligible for factorization under the selection
    skip_reason: str
    # factorization -> break-even rank (largest rank that still saves MACs); absent if unsupported
    break_even: dict[str, int]


@dataclass(frozen=True)
class Census:
    arch: str
    input_size: tuple[int, int, int]
    total_macs: int
    total_params: int
    layer_macs: int
    other_macs: int  # attention matmuls etc., never factorized
    candidate_macs: int  # MACs in layers eligible for factorization
    rows: list[LayerRow]

    @property
    def untouchable_macs_ratio(self) -> float:
        """MACs that no factorization can touch, over the total: a lower bound on any target,
        not the smallest reachable ratio (that depends on the rank grid: ``inspect``'s reach)."""
        return 1.0 - self.candidate_macs / self.total_macs if self.total_macs else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["untouchable_macs_ratio"] = self.untouchable_macs_ratio
        return d


def make_selection(model: nn.Module, specs: list[LayerSpec], include=(), exclude=()) -> Selection:
    names = [s.name for s in specs]
    check_patterns(include, names, "--include")
    check_patterns(exclude, names, "--exclude")
    return Selection(tuple(include), tuple(exclude), protected_names(model, specs))


def census(model: nn.Module, arch: str, input_size, include=(), exclude=()) -> Census:
    specs = find_layers(model, input_size)
    sel = make_selection(model, specs, include, exclude)
    cost = count_model(model, specs, input_size)
    rows = []
    cand = 0
    for s in specs:
        reason = skip_reason(s, sel)
        be = {}
        for name, fact in FACTORIZATIONS.items():
            if not fact.unsupported_reason(s):
                be[name] = break_even_rank(fact, s)
        if not reason and not any(be.values()):
            reason = "too small: no factorization saves MACs at any rank"
        m = dense_macs(s)
        if not reason:
            cand += m
        rows.append(LayerRow(
            name=s.name, kind=s.kind, shape=s.weight_shape, stride=s.stride, groups=s.groups,
            out_size=s.out_hw, macs=m, params=dense_params(s),
            macs_share=m / cost.macs if cost.macs else 0.0,
            candidate=not reason, skip_reason=reason, break_even=be,
        ))
    return Census(arch, tuple(input_size), cost.macs, cost.params, cost.layer_macs,
                  cost.other_macs, cand, rows)
