"""Layer factorizations: each turns one conv/linear layer into a chain of standard layers.

One file per method (``svd``, ``tucker2``, ``cp`` with CP-3 and CP-4, ``tt``), each a
:class:`Factorization` subclass registered by name in :data:`FACTORIZATIONS`; shared machinery is
in ``_base``. This package is the only place that uses tensorly, always inside a scoped backend
context.

Decided for v1: linear layers and 1×1 convs are factorized by SVD whatever the method; grouped convs
(``1 < groups``) are not factorized, depthwise convs never (``unsupported_reason()`` says why).
"""

from __future__ import annotations

from lrcompress.errors import UserError
from lrcompress.factorizations._activation import (
    DAMPING,
    LayerStats,
    SolveMemo,
    Whitener,
    whitener,
)
from lrcompress.factorizations._base import (
    ALIASES,
    FACTORIZATIONS,
    DecompositionError,
    Factorization,
    Rank,
    chain_factors,
    collect_notes,
    is_int,
    is_matrix,
    relative_error,
    single_threaded,
)
from lrcompress.factorizations.cp import CP3, CP4
from lrcompress.factorizations.svd import SVD
from lrcompress.factorizations.tt import TT
from lrcompress.factorizations.tucker2 import Tucker2
from lrcompress.model.costs import dense_macs
from lrcompress.model.layers import LayerSpec

__all__ = [
    "ALIASES",
    "DAMPING",
    "LayerStats",
    "SolveMemo",
    "CP3",
    "CP4",
    "FACTORIZATIONS",
    "SVD",
    "TT",
    "DecompositionError",
    "Factorization",
    "Rank",
    "Tucker2",
    "Whitener",
    "break_even_rank",
    "chain_factors",
    "collect_notes",
    "get_factorization",
    "is_int",
    "is_matrix",
    "relative_error",
    "single_threaded",
    "whitener",
]


def get_factorization(name: str) -> Factorization:
    """The registered method called ``name`` (or an alias such as ``tucker``), case-insensitive."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in FACTORIZATIONS:
        valid = ", ".join(sorted(FACTORIZATIONS))
        aliases = ", ".join(f"{a} (= {t})" for a, t in sorted(ALIASES.items()))
        raise UserError(
            f"Unknown decomposition {name!r}. Valid names: {valid}; aliases: {aliases}."
        )
    return FACTORIZATIONS[key]


def break_even_rank(fact: Factorization, spec: LayerSpec) -> int:
    """Largest scalar rank r >= 1 with ``fact.macs(spec, r) < dense_macs(spec)``; 0 if none (or
    if the method cannot factorize the layer). MACs grow with the rank, so a bisection suffices."""
    if fact.unsupported_reason(spec):
        return 0
    dense = dense_macs(spec)
    lo, hi = 0, fact.scalar_rank(fact.max_rank(spec))
    while lo < hi:  # invariant: ranks <= lo are cheaper than dense
        mid = (lo + hi + 1) // 2
        if fact.macs(spec, mid) < dense:
            lo = mid
        else:
            hi = mid - 1
    return lo
