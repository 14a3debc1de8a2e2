"""The whole run's time, estimated before the search from a quick probe.

Each stage is a row: a number of units (iterations, layers, batches, test passes) times the
measured seconds of one unit. The rank method measures its own units (``rank.get_estimator``);
the other stages use the original model's measured forward (and forward + backward) time on one
calibration batch and the measured evaluation of the original.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lrcompress.util.progress import fmt_seconds


@dataclass(frozen=True)
class Row:
    stage: str
    units: int
    unit: str
    per_unit: float  # seconds

    @property
    def seconds(self) -> float:
        return self.units * self.per_unit


@dataclass
class RunEstimate:
    rows: list[Row] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # stages with no estimate, said as such

    def add(self, stage: str, units: int, unit: str, per_unit: float) -> None:
        if units > 0:
            self.rows.append(Row(stage, int(units), unit, float(per_unit)))

    @property
    def total(self) -> float:
        return sum(r.seconds for r in self.rows)

    def by_stage(self) -> dict[str, float]:
        """Seconds per stage, rows whose name starts alike ("rank selection: …") summed."""
        out: dict[str, float] = {}
        for r in self.rows:
            key = r.stage.split(":")[0]
            out[key] = out.get(key, 0.0) + r.seconds
        return out

    def line(self) -> str:
        parts = [f"{name} ≈ {fmt_seconds(s)}" for name, s in self.by_stage().items()]
        parts += [f"{name}: not estimated" for name in self.unknown]
        return f"estimated run time ≈ {fmt_seconds(self.total)}: " + "; ".join(parts)

    def details(self) -> list[str]:
        return [f"  {r.stage}: {r.units} {r.unit} × {r.per_unit:.3g} s ≈ {fmt_seconds(r.seconds)}"
                for r in self.rows]

    def to_dict(self) -> dict:
        return {"total_s": round(self.total, 3),
                "rows": [{"stage": r.stage, "units": r.units, "unit": r.unit,
                          "per_unit_s": round(r.per_unit, 6), "s": round(r.seconds, 3)}
                         for r in self.rows],
                "not_estimated": list(self.unknown)}


def forward_seconds(model: nn.Module, x: torch.Tensor, backward: bool = False,
                    clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one forward pass (eval mode; with ``backward``, plus the backward pass to the
    input) of ``model`` on batch ``x``; the model is left as it was."""
    was = model.training
    model.eval()
    try:
        t0 = clock()
        if backward:
            with torch.enable_grad():
                xi = x.detach().clone().requires_grad_(True)
                model(xi).float().sum().backward()
        else:
            with torch.no_grad():
                model(x)
        return clock() - t0
    finally:
        model.train(was)
