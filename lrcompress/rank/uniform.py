"""``uniform``: one rank ratio ρ for every layer, solved by bisection for the target.

Layer i gets the largest offered rank ≤ ρ·max_rank_i of its factorization; where that reaches the
break-even rank the layer stays dense (factorizing it would not save anything). Cost grows
monotonically with ρ, so bisection finds the largest ρ that meets the budget. Rank steps are
discrete, so that leaves budget unused; it is then spent as evenly as possible (the allocator
with a concave score of each layer's rank ratio raises the layers that lag most per unit cost),
so the plan meets the target without wasting more than one rank step.
"""

from __future__ import annotations

from lrcompress.errors import UserError
from lrcompress.factorizations import get_factorization
from lrcompress.rank.problem import DENSE, RankProblem, allocate


def choice_at(problem: RankProblem, rho: float) -> list[int]:
    choice = []
    for lo in problem.layers:
        fact_opts = [(j, o) for j, o in enumerate(lo.options) if o.factorization != DENSE]
        if len({o.factorization for _, o in fact_opts}) > 1:
            raise UserError("uniform ranks need a single factorization: use --decomp svd, "
                            "tucker2, cp, cp4 or tt (--decomp auto needs --method rene).")
        fact = get_factorization(fact_opts[0][1].factorization)
        cap = rho * fact.scalar_rank(fact.max_rank(lo.spec))
        if cap > fact_opts[-1][1].rank:
            choice.append(len(lo.options) - 1)  # past break-even: dense is the better deal
            continue
        fitting = [j for j, o in fact_opts if o.rank <= cap]
        choice.append(max(fitting, key=lambda j: lo.options[j].rank) if fitting else 0)
    return choice


def solve_ratio(problem: RankProblem, iters: int = 60) -> tuple[float, list[int]]:
    """Largest ρ in (0, 1] whose uniform choice fits the budget."""
    problem.check_feasible()
    lo_r, hi_r = 0.0, 1.0
    if problem.cost_of(choice_at(problem, hi_r)) <= problem.budget:
        return hi_r, choice_at(problem, hi_r)
    for _ in range(iters):
        mid = (lo_r + hi_r) / 2
        if problem.cost_of(choice_at(problem, mid)) <= problem.budget:
            lo_r = mid
        else:
            hi_r = mid
    choice = choice_at(problem, lo_r)
    if problem.cost_of(choice) > problem.budget:  # ρ→0 still over: smallest options everywhere
        choice = [0] * len(problem.layers)
    return lo_r, choice


def evenness_scores(problem: RankProblem) -> list[list[float]]:
    """−(1 − r/max_rank)²: concave in the rank ratio, so spending favours the lagging layers."""
    scores = []
    for lo in problem.layers:
        row = []
        for o in lo.options:
            if o.factorization == DENSE:
                row.append(0.0)
            else:
                f = get_factorization(o.factorization)
                row.append(-((1 - o.rank / f.scalar_rank(f.max_rank(lo.spec))) ** 2))
        scores.append(row)
    return scores


def select(ctx) -> tuple:
    rho, choice = solve_ratio(ctx.problem)
    final = allocate(ctx.problem, evenness_scores(ctx.problem), start=choice)
    changed = sum(a != b for a, b in zip(choice, final))
    return ctx.problem.to_plan(final, "uniform"), {"rank_ratio": rho, "layers_topped_up": changed}
