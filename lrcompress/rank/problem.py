"""The rank-selection problem every method shares, and the budget allocator.

A :class:`RankProblem` lists, for each candidate layer, its *options*: (factorization, rank)
pairs that are cheaper than the dense layer (methods.md §10.3: ranks at or above break-even are
never offered), rounded to ``rank_multiple``, plus keeping the layer dense. Costs are MACs or
parameters depending on the target. The budget is ``ratio × cost of the whole original model``;
layers that are not candidates and matmuls outside layers count in full.

:func:`allocate` is a multiple-choice knapsack solved greedily on score per unit of cost: it first
sheds cost where the least score is lost per MAC until the plan fits, then spends the slack where
the most score is gained per MAC. The result always meets the budget, and the slack left is
smaller than the cheapest single upgrade still available (one rank step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from lrcompress.errors import TargetError
from lrcompress.factorizations import break_even_rank, get_factorization, is_matrix
from lrcompress.model.costs import dense_macs, dense_params
from lrcompress.model.layers import LayerSpec
from lrcompress.model.plan import LayerPlan, Narrowing, Plan, Target

DENSE = "dense"


@dataclass(frozen=True)
class Option:
    factorization: str  # factorization name, or "dense"
    rank: int  # scalar rank (tied); 0 for dense
    macs: int
    params: int
    latency: float | None = None  # measured ms on the latency engine (latency targets only)

    def cost(self, kind: str) -> float:
        if kind == "flops":
            return self.macs
        if kind == "params":
            return self.params
        if self.latency is None:
            raise ValueError(f"option {self} has no measured latency")
        return self.latency

    def with_latency(self, ms: float) -> Option:
        return replace(self, latency=float(ms))


@dataclass
class LayerOptions:
    spec: LayerSpec
    options: list[Option]  # sorted by cost ascending; the last one is dense

    @property
    def dense(self) -> Option:
        return self.options[-1]


@dataclass
class RankProblem:
    target: Target
    layers: list[LayerOptions]
    base_macs: int
    base_params: int
    arch: str
    num_classes: int
    in_chans: int
    input_size: tuple[int, int, int]
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> reason it stays dense
    specs: list[LayerSpec] = field(default_factory=list)  # every conv/linear layer (census)
    # The original model measured whole on the latency engine (ms); latency targets only.
    base_latency: float | None = None
    # Hidden widths narrowed before factorizing: the layers are the narrowed model's, and the
    # cost outside them is the narrowed model's (start_cost); targets stay relative to the
    # original (base_cost).
    narrowing: Narrowing | None = None
    start_latency: float | None = None  # the narrowed model measured whole (ms)

    @property
    def base_cost(self) -> float:
        kind = self.target.kind
        if kind == "latency":
            if self.base_latency is None:
                raise ValueError("a latency target needs the measured base latency")
            return self.base_latency
        return self.base_macs if kind == "flops" else self.base_params

    @property
    def budget(self) -> float:
        if self.target.kind == "latency":
            return self.target.ratio * self.base_cost
        return math.floor(self.target.ratio * self.base_cost)

    @property
    def start_cost(self) -> float:
        """The dense cost the layers are chosen in: the original's, or the narrowed model's."""
        kind, n = self.target.kind, self.narrowing
        if n is None:
            return self.base_cost
        if kind == "latency":
            if self.start_latency is None:
                raise ValueError("a latency target needs the narrowed model's measured latency")
            return self.start_latency
        return n.macs if kind == "flops" else n.params

    @property
    def fixed_cost(self) -> int:
        """Cost of everything that is not a candidate layer (kept whatever the plan)."""
        return self.start_cost - sum(lo.dense.cost(self.target.kind) for lo in self.layers)

    def min_cost(self) -> float:
        return self.cost_of(self.cheapest_choice())

    def cheapest_choice(self, kind: str | None = None) -> list[int]:
        """The option index per layer with the least cost of ``kind`` (default: the target's;
        the first of equals)."""
        k = kind or self.target.kind
        return [min(range(len(lo.options)), key=lambda j, lo=lo: lo.options[j].cost(k))
                for lo in self.layers]

    def check_feasible(self) -> None:
        lo = self.min_cost()
        if lo > self.budget:
            if self.target.kind == "latency":
                raise TargetError(
                    f"--target-latency {self.target.ratio:.4g} cannot be reached: even with "
                    f"every factorizable layer at its fastest measured candidate the model "
                    f"keeps {lo / self.base_cost:.3f} of its measured latency "
                    f"({self.base_cost:.3f} ms; {len(self.layers)} factorizable layers, the "
                    f"rest stays as it is). Ask for "
                    f"{math.ceil(lo / self.base_cost * 100) / 100:.2f} or more, --include more "
                    "layers, or use another --decomp.")
            kind = "MACs" if self.target.kind == "flops" else "parameters"
            raise TargetError(
                f"--target-{self.target.kind} {self.target.ratio} cannot be reached: even at the "
                f"smallest ranks the model keeps {lo / self.base_cost:.3f} of its {kind} "
                f"({len(self.layers)} factorizable layers; the rest, "
                f"{self.fixed_cost / self.base_cost:.3f} of the total, stays dense). Ask for "
                f"{math.ceil(lo / self.base_cost * 1000) / 1000:.3f} or more, or --include more "
                f"layers.{self._skipped_note()}"
            )

    def _skipped_note(self) -> str:
        if not self.skipped:
            return ""
        names = sorted(self.skipped)
        why = self.skipped[names[0]]
        return (f" {len(names)} layer(s) stay dense for reasons of their own, e.g. {names[0]}: "
                f"{why}.")

    def cost_of(self, choice: list[int]) -> float:
        k = self.target.kind
        return self.fixed_cost + sum(lo.options[j].cost(k) for lo, j in zip(self.layers, choice))

    def choice_of(self, plan: Plan) -> list[int]:
        """The option index per layer that ``plan`` chose (dense where it names no layer)."""
        chosen = {lp.name: (lp.factorization, lp.rank) for lp in plan.layers}
        out = []
        for lo in self.layers:
            want = chosen.get(lo.spec.name, (DENSE, 0))
            idx = [j for j, o in enumerate(lo.options) if (o.factorization, o.rank) == want]
            if not idx:
                raise ValueError(f"{lo.spec.name}: {want} is not one of its options")
            out.append(idx[0])
        return out

    def to_plan(self, choice: list[int], rank_method: str) -> Plan:
        layers = []
        for lo, j in zip(self.layers, choice):
            o = lo.options[j]
            if o.factorization != DENSE:
                layers.append(LayerPlan(lo.spec.name, o.factorization, o.rank, lo.spec))
        return Plan(self.arch, self.num_classes, self.in_chans, tuple(self.input_size),
                    tuple(layers), self.base_macs, self.base_params, self.target, rank_method,
                    narrowing=self.narrowing)


def rank_grid(max_useful: int, multiple: int) -> list[int]:
    """Ranks 1..max_useful on a ``multiple`` grid (all of 1..max_useful if the grid is empty:
    a layer whose break-even rank is below the multiple, e.g. an SE block's 1×1 conv, is
    narrower than one block at any rank, so the grid would only keep it dense)."""
    grid = list(range(multiple, max_useful + 1, multiple))
    return grid or list(range(1, max_useful + 1))


def layer_options(spec: LayerSpec, methods: list[str], multiple: int) -> list[Option]:
    """Options cheaper than dense (by MACs and params), ascending cost, dense last."""
    opts = []
    dm, dp = dense_macs(spec), dense_params(spec)
    if is_matrix(spec):  # a linear layer or 1x1 conv: every method is the SVD split, say so
        methods = ["svd"]
    for name in methods:
        fact = get_factorization(name)
        if fact.unsupported_reason(spec):
            continue
        be = break_even_rank(fact, spec)
        if name in ("cp", "cp4"):
            # [PROPOSAL] CP-ALS cost grows with the rank and its break-even can be 4x the channel
            # count (2283 for a 512x512x3x3 conv, 13 s per decomposition at rank 1024); ranks past
            # max(C_in, C_out) are capped to keep the search tractable.
            be = min(be, max(spec.in_ch, spec.out_ch))
        for r in rank_grid(be, multiple):
            m, p = fact.macs(spec, r), fact.params(spec, r)
            if m < dm and p < dp:
                opts.append(Option(name, r, m, p))
    # Linear layers and 1x1 convs reduce to SVD for every method: keep one copy of each cost.
    seen, uniq = set(), []
    for o in sorted(opts, key=lambda o: (o.macs, o.params, o.factorization)):
        if (o.macs, o.params) not in seen:
            seen.add((o.macs, o.params))
            uniq.append(o)
    return uniq + [Option(DENSE, 0, dm, dp)]


def allocate(problem: RankProblem, scores: list[list[float]], start: list[int] | None = None
             ) -> list[int]:
    """Greedy multiple-choice knapsack: the option per layer maximising total score in budget.

    ``scores[i][j]`` is the utility of option j of layer i (e.g. −predicted loss increase).
    ``start`` is the initial choice (default: each layer's best-scoring option).
    """
    k = problem.target.kind
    L = problem.layers
    cost = [[o.cost(k) for o in lo.options] for lo in L]
    choice = list(start) if start is not None else [
        max(range(len(s)), key=lambda j, s=s: (s[j], -j)) for s in scores]
    total = problem.cost_of(choice)
    budget = problem.budget
    # Shed: the move (to any cheaper option) losing least score per unit of cost saved.
    while total > budget:
        best = None
        for i, (c, s) in enumerate(zip(cost, scores)):
            j = choice[i]
            for jj in range(len(c)):
                saved = c[j] - c[jj]
                if saved > 0:
                    rate = (s[j] - s[jj]) / saved
                    if best is None or rate < best[0]:
                        best = (rate, i, jj)
        if best is None:
            problem.check_feasible()
            raise AssertionError("allocation stuck above a feasible budget")
        _, i, jj = best
        total += cost[i][jj] - cost[i][choice[i]]
        choice[i] = jj
    # Spend: the affordable move gaining most score per unit of cost.
    while True:
        best = None
        for i, (c, s) in enumerate(zip(cost, scores)):
            j = choice[i]
            for jj in range(len(c)):
                extra = c[jj] - c[j]
                gain = s[jj] - s[j]
                if 0 < extra <= budget - total and gain > 0:
                    rate = gain / extra
                    if best is None or rate > best[0]:
                        best = (rate, i, jj)
        if best is None:
            break
        _, i, jj = best
        total += cost[i][jj] - cost[i][choice[i]]
        choice[i] = jj
    return choice
