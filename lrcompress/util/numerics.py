"""Numerical health of training loops: spot NaN/Inf, roll the step back, name where it started.

Used by fine-tuning (``finetune.distill``) and meant for every loop that updates weights or rank
coefficients (the RENE search):

* :func:`all_finite` / :func:`first_nonfinite` check tensors (one reduction per tensor);
* :class:`BufferSnapshot` keeps a module's buffers (BatchNorm running statistics, which a forward
  pass in training mode changes) so a skipped step leaves no trace;
* :class:`ParamSnapshot` keeps parameters and an optimizer's state, to undo a step after it was
  taken (cheap for small parameter sets such as RENE's logits);
* :func:`first_nonfinite_output` re-runs a forward pass with hooks and names the first module (in
  execution order) whose output is not finite;
* :class:`NonFiniteGuard` counts skipped steps and stops the run with a :class:`UserError` (exit
  code 2) naming the stage, the step and the layer once ``limit`` steps in a row were bad.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from lrcompress.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 3  # bad steps in a row before a run stops


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """True when every floating-point tensor (None entries skipped) is free of NaN and Inf."""
    flags = [torch.isfinite(t).all() for t in tensors
             if t is not None and t.is_floating_point() and t.numel()]
    return not flags or bool(torch.stack(flags).all())


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor | None]]) -> str | None:
    """The name of the first tensor holding NaN or Inf, or None."""
    for name, t in named:
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def nonfinite_grad(model: nn.Module) -> str | None:
    """The first parameter (by name) whose gradient holds NaN or Inf, or None."""
    return first_nonfinite((n, p.grad) for n, p in model.named_parameters())


class BufferSnapshot:
    """A copy of a module's buffers; :meth:`restore` puts them back in place."""

    def __init__(self, module: nn.Module):
        self._saved = [(b, b.detach().clone()) for b in module.buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        for buf, copy_ in self._saved:
            buf.copy_(copy_)


class ParamSnapshot:
    """A copy of parameters (and optionally an optimizer's state) taken before a step."""

    def __init__(self, params: Iterable[torch.Tensor], optimizer=None):
        self._params = [(p, p.detach().clone()) for p in params]
        self._opt = optimizer
        self._opt_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None

    @torch.no_grad()
    def restore(self) -> None:
        for p, copy_ in self._params:
            p.copy_(copy_)
        if self._opt is not None:
            self._opt.load_state_dict(self._opt_state)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


@torch.no_grad()
def first_nonfinite_output(model: nn.Module, run: Callable[[], object]) -> str | None:
    """Calls ``run()`` (a forward pass of ``model``) with a hook on every module and returns the
    name of the first one, in execution order, whose output holds NaN or Inf (None if none).

    Only meant for diagnosing a bad step (one extra forward pass); the caller restores any state
    the pass changes (see :class:`BufferSnapshot`).
    """
    found: list[str] = []

    def hook(name):
        def fn(_m, _i, out):
            if not found and not all_finite(_tensors(out)):
                found.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


class NonFiniteGuard:
    """Counts bad (skipped) steps of one stage; ``limit`` in a row stop it with a UserError."""

    def __init__(self, stage: str, limit: int = DEFAULT_LIMIT, advice: str = ""):
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.stage, self.limit, self.advice = stage, limit, advice
        self.consecutive = 0
        self.skipped = 0  # in all
        self.events: list[dict] = []  # one per skipped step: where, what, layer

    def ok(self) -> None:
        """A good step: the run of bad ones is over."""
        self.consecutive = 0

    def skip(self, where: str, what: str, layer: str | None) -> None:
        """Record a skipped (rolled back) step; raises UserError at ``limit`` in a row."""
        self.consecutive += 1
        self.skipped += 1
        self.events.append({"where": where, "what": what, "layer": layer})
        at = f" (first non-finite: {layer})" if layer else ""
        log.warning("%s: %s was NaN/Inf at %s%s; the step was skipped and rolled back (%d in a "
                    "row)", self.stage, what, where, at, self.consecutive)
        if self.consecutive >= self.limit:
            first = self.events[-self.consecutive]
            layer_txt = (f" The first non-finite value appeared in {first['layer']}."
                         if first["layer"] else "")
            raise UserError(
                f"{self.stage} stopped at {where}: the {what} was NaN/Inf on {self.limit} "
                f"consecutive steps (each was skipped and rolled back).{layer_txt} Nothing "
                f"half-finished was saved. {self.advice}".rstrip())
