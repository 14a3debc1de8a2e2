"""Plans: which layer gets which factorization at which rank. Computed apart from applied.

A :class:`Plan` is a frozen, JSON-round-trippable value. It carries the architecture and every
factorized layer's ``LayerSpec``, so a compressed model can be rebuilt from the plan alone (no
forward pass, no extra file). Costs of a plan are pure functions of it and the dense model's cost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lrcompress._version import __version__
from lrcompress.errors import UserError
from lrcompress.factorizations import get_factorization, is_int, is_matrix
from lrcompress.model.costs import dense_macs, dense_params
from lrcompress.model.layers import LayerSpec

PLAN_SCHEMA = 1
TARGET_KINDS = ("flops", "params", "latency")


@dataclass(frozen=True)
class LayerPlan:
    name: str
    factorization: str  # svd, tucker2, cp, cp4, tt (stored as "method" on disk, see to_dict)
    rank: int | tuple[int, ...]
    spec: LayerSpec

    @property
    def macs(self) -> int:
        return get_factorization(self.factorization).macs(self.spec, self.rank)

    @property
    def params(self) -> int:
        return get_factorization(self.factorization).params(self.spec, self.rank)

    def to_dict(self) -> dict:
        r = list(self.rank) if isinstance(self.rank, tuple) else self.rank
        # The on-disk key keeps its historical name "method", so plan files and model.safetensors
        # headers stay byte-identical and old files still load.
        return {"name": self.name, "method": self.factorization, "rank": r,
                "spec": self.spec.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> LayerPlan:
        raw = d["rank"]
        parts = raw if isinstance(raw, list) else [raw]
        if not parts or not all(is_int(x) for x in parts):
            raise ValueError(f"layer {d['name']!r} has rank {raw!r}, not a whole number or a "
                             "list of whole numbers")
        r = tuple(raw) if isinstance(raw, list) else int(raw)
        return cls(d["name"], d["method"], r, LayerSpec.from_dict(d["spec"]))


@dataclass(frozen=True)
class Narrowing:
    """Hidden widths narrowed before any layer is factorized (lrcompress.model.narrow): each
    block's name, hidden width and kept width, and the narrowed dense model's cost (what the
    factorized layers' savings are taken from)."""

    blocks: tuple[tuple[str, int, int], ...]
    macs: int
    params: int
    keep: float  # the fraction asked for (--narrow-hidden)

    def to_dict(self) -> dict:
        return {"keep": self.keep, "macs": self.macs, "params": self.params,
                "blocks": [{"name": n, "width": w, "kept": k} for n, w, k in self.blocks]}

    @classmethod
    def from_dict(cls, d: dict) -> Narrowing:
        blocks = tuple((str(b["name"]), int(b["width"]), int(b["kept"])) for b in d["blocks"])
        if any(not 0 < k <= w for _, w, k in blocks):
            raise ValueError("a narrowed block keeps no channel or more than it has")
        return cls(blocks, int(d["macs"]), int(d["params"]), float(d["keep"]))


@dataclass(frozen=True)
class Target:
    kind: str  # "flops" | "params" | "latency" (measured, relative to the original)
    ratio: float

    def __post_init__(self):
        if self.kind not in TARGET_KINDS:
            raise UserError(f"Unknown target kind {self.kind!r}: use 'flops', 'params' or "
                            "'latency'.")
        if not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            what = ("the compressed model's measured latency over the original's"
                    if self.kind == "latency" else "the fraction of the original model to keep")
            raise UserError(f"--target-{self.kind} {self.ratio} is out of range: it is {what}, "
                            "strictly between 0 and 1 (e.g. 0.3 keeps 30 %; a speed-up S is "
                            "--target-speedup S, the same as --target-latency 1/S).")


@dataclass(frozen=True)
class Plan:
    arch: str
    num_classes: int
    in_chans: int
    input_size: tuple[int, int, int]
    layers: tuple[LayerPlan, ...]
    # Dense model cost, so that ratios are computable from the plan alone.
    base_macs: int
    base_params: int
    target: Target | None = None
    rank_method: str = ""  # rank-selection method that produced it ("method" on disk)
    version: str = field(default=__version__)
    narrowing: Narrowing | None = None  # hidden widths narrowed first (--narrow-hidden)

    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    @property
    def macs(self) -> int:
        start = self.base_macs if self.narrowing is None else self.narrowing.macs
        return start - sum(dense_macs(lp.spec) - lp.macs for lp in self.layers)

    @property
    def params(self) -> int:
        start = self.base_params if self.narrowing is None else self.narrowing.params
        return start - sum(dense_params(lp.spec) - lp.params for lp in self.layers)

    @property
    def macs_ratio(self) -> float:
        return self.macs / self.base_macs

    @property
    def params_ratio(self) -> float:
        return self.params / self.base_params

    def to_dict(self) -> dict:
        d = {
            "schema": PLAN_SCHEMA,
            "lrcompress_version": self.version,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "input_size": list(self.input_size),
            "base_macs": self.base_macs,
            "base_params": self.base_params,
            "target": None if self.target is None else {"kind": self.target.kind,
                                                        "ratio": self.target.ratio},
            "method": self.rank_method,  # on-disk key keeps its historical name
            "macs": self.macs,
            "params": self.params,
            "layers": [lp.to_dict() for lp in self.layers],
        }
        if self.narrowing is not None:  # absent otherwise: plans without it stay byte-identical
            d["narrowing"] = self.narrowing.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if d.get("schema") != PLAN_SCHEMA:
            raise UserError(f"Plan schema {d.get('schema')!r} is not supported by lrcompress "
                            f"{__version__} (expects {PLAN_SCHEMA}). Re-run the search.")
        t = d.get("target")
        return cls(
            arch=d["arch"], num_classes=int(d["num_classes"]), in_chans=int(d["in_chans"]),
            input_size=tuple(d["input_size"]),
            layers=tuple(LayerPlan.from_dict(x) for x in d["layers"]),
            base_macs=int(d["base_macs"]), base_params=int(d["base_params"]),
            target=None if t is None else Target(t["kind"], float(t["ratio"])),
            rank_method=d.get("method", ""), version=d.get("lrcompress_version", __version__),
            narrowing=Narrowing.from_dict(d["narrowing"]) if d.get("narrowing") else None,
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"The plan is not valid JSON: {e}.") from e
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"The plan is missing or has a malformed field ({e}). "
                            "Use a plan.json written by `lrcompress search`.") from e


# ------------------------------------------------------------------ a given plan against a model


def check_fits(plan: Plan, specs: list[LayerSpec], *, arch: str, num_classes: int,
               in_chans: int, input_size, base_macs: int, base_params: int,
               where: str = "the plan") -> None:
    """Refuse a plan that does not describe a compression of this model (UserError naming
    the first problem and the fix): another architecture or variant (classes, input channels,
    input size), other dense costs, a duplicated layer, a layer the model does not have or
    that cannot be factorized, another layer shape, or a rank out of range."""
    size, where = tuple(int(v) for v in input_size), _cap(where)
    if plan.narrowing is not None:
        raise UserError(f"{where} narrows hidden widths (--narrow-hidden "
                        f"{plan.narrowing.keep:g}), which are fitted to calibration data and "
                        "cannot be re-applied from a plan. Run the search with --narrow-hidden "
                        "instead of --plan.")
    if plan.arch != arch:
        raise UserError(f"{where} was made for {plan.arch}, not {arch}. Use a plan made for this "
                        "architecture, or run the search without --plan.")
    variant = [f"{what} {mine} (the model has {theirs})" for what, mine, theirs in (
        ("num_classes", plan.num_classes, num_classes),
        ("in_chans", plan.in_chans, in_chans)) if mine != theirs]
    if variant:
        raise UserError(f"{where} was made for another variant of {arch}: "
                        f"{', '.join(variant)}. Use a plan made for this checkpoint, or run the "
                        "search without --plan.")
    if tuple(plan.input_size) != size:
        c, h, w = plan.input_size
        raise UserError(f"{where} was made for input size {c},{h},{w}, but this run uses "
                        f"{','.join(map(str, size))}: layer shapes and costs depend on it. Drop "
                        f"--input-size (a plan brings its own) or pass --input-size {c},{h},{w}, "
                        "or run the search for the new size without --plan.")
    if (plan.base_macs, plan.base_params) != (base_macs, base_params):
        raise UserError(f"{where} records the dense model at {plan.base_macs} MACs and "
                        f"{plan.base_params} params, but this model has {base_macs} and "
                        f"{base_params}: it was made for another model or edited. Use the "
                        "plan.json a search of this model wrote.")
    seen: set[str] = set()
    by_name = {s.name: s for s in specs}
    for lp in plan.layers:
        if lp.name in seen:
            raise UserError(f"{where} lists layer {lp.name!r} twice; each layer may be "
                            "factorized once. Remove the duplicate entry.")
        seen.add(lp.name)
        _check_layer(lp, by_name.get(lp.name), where)


def _check_layer(lp: LayerPlan, spec: LayerSpec | None, where: str) -> None:
    if spec is None:
        raise UserError(f"{where} names layer {lp.name!r}, which the model has no conv or linear "
                        "layer of (see `lrcompress inspect` for the layer names).")
    try:
        fact = get_factorization(lp.factorization)
    except UserError as e:
        raise UserError(f"{where}, layer {lp.name!r}: {e}") from None
    reason = fact.unsupported_reason(spec)
    if reason:
        raise UserError(f"{where} factorizes {lp.name!r} with {fact.name}, which cannot "
                        f"factorize it ({reason}). Remove that layer from the plan.")
    if lp.spec != spec:
        raise UserError(f"{where} describes layer {lp.name!r} as {_shape(lp.spec)}, but the "
                        f"model's is {_shape(spec)}: the plan was made for another model or "
                        "edited. Use the plan.json a search of this model wrote.")
    problem = _rank_problem(fact, spec, lp.rank)
    if problem:
        raise UserError(f"{where} gives layer {lp.name!r} rank {_show(lp.rank)}: {problem}. "
                        "Fix the rank in the plan, or run the search without --plan.")


def _rank_problem(fact, spec: LayerSpec, rank) -> str:
    """Why ``rank`` is not a rank ``fact`` can build for ``spec`` ("" when it is one)."""
    parts = rank if isinstance(rank, tuple) else (rank,)
    full = fact.max_rank(spec)
    if not parts or not all(is_int(r) and r >= 1 for r in parts):
        return "ranks are whole numbers, 1 or more"
    try:
        built = fact.rank_from(spec, rank)
    except ValueError as e:
        return str(e)
    if isinstance(rank, tuple) and not is_matrix(spec):
        ok = built == rank
    else:
        ok = max(parts) <= fact.scalar_rank(full)
    return "" if ok else f"it is above the layer's full rank ({_show(full)} with {fact.name})"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _show(rank) -> str:
    return ",".join(map(str, rank)) if isinstance(rank, (tuple, list)) else str(rank)


def _shape(spec: LayerSpec) -> str:
    k = "x".join(map(str, spec.kernel))
    return (f"{spec.kind} {spec.in_ch}->{spec.out_ch} (kernel {k}, stride "
            f"{_show(spec.stride)}, groups {spec.groups}, output {_show(spec.out_hw)})")
