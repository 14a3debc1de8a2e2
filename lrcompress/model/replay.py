"""Run a model with one layer changed without recomputing what that layer cannot affect.

The rank signals measure the calibration loss with one layer at a time swapped for a candidate
(:func:`lrcompress.rank.signals.sensitivities`): everything that runs before that layer computes
exactly what the unmodified model did. :class:`PrefixReplay` records, in one forward pass of the
unmodified model over the batches, the inputs and outputs of the modules beside each layer's path
(the children of its ancestors that do not contain it: the stem, the earlier stages and blocks,
the layers before it in its block). While one layer is changed, those modules answer a call whose
inputs equal a recorded call's (``torch.equal``) with a copy of the recorded output instead of
running; any other call runs as usual. So the result is the full forward's, bit for bit, and on
average about half of the network is skipped.

Only eval-mode, no-grad passes are replayed (deterministic modules). Calls with keyword or
non-tensor arguments, or non-tensor outputs, always run. The records are kept within
``max_bytes`` (shallow modules first: skipping a whole stage saves the most; a module whose
records do not fit is left to run, and the calls after it still replay), and a module that
contains the changed layer's module object anywhere inside it is never short-circuited.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

# Records kept by default: on the CPU (a 224×224 resnet18's stem alone holds ~330 MB per batch
# of 16) and on a GPU, where recomputing is cheap and memory is the fine-tuning's.
REPLAY_BYTES = {"cpu": 1 << 30, "cuda": 256 << 20}


class PrefixReplay:
    """Records of the unmodified ``model``'s module calls beside the paths of ``layers``
    (dotted names) for :meth:`changed`; fill them with :meth:`record`."""

    def __init__(self, model: nn.Module, layers: list[str], max_bytes: int | None = None):
        if max_bytes is None:
            device = next(model.parameters()).device.type
            max_bytes = REPLAY_BYTES.get(device, REPLAY_BYTES["cuda"])
        self.model, self.max_bytes = model, max_bytes
        modules = dict(model.named_modules())
        self.targets = {name: modules[name] for name in layers}
        self.beside = {name: _beside_path(model, name) for name in layers}
        wanted = {m for names in self.beside.values() for m in names}
        self.depth = {modules[n]: n.count(".") for n in wanted}
        self.records: dict[nn.Module, list[_Call]] = {}
        self.bytes = 0
        self.dropped: set[nn.Module] = set()  # not replayable, or over the memory budget
        self._pending: dict[nn.Module, list] = {}  # inputs of calls under way (record)
        self.depth_limit = max(self.depth.values(), default=0)  # lowered when over budget

    def record(self, run: Callable[[], object]) -> object:
        """``run()`` (a pass of the unmodified model over the batches, eval mode, no grad) with
        the modules' calls recorded; returns what ``run`` returns."""
        handles = []
        for mod in self.depth:
            handles.append(mod.register_forward_pre_hook(self._before, with_kwargs=True))
            handles.append(mod.register_forward_hook(self._after, with_kwargs=True))
        try:
            return run()
        finally:
            for h in handles:
                h.remove()
            self._pending.clear()

    def _before(self, mod, args, kwargs) -> None:
        ok = (not kwargs and mod not in self.dropped and self.depth[mod] <= self.depth_limit
              and all(isinstance(a, torch.Tensor) for a in args))
        self._pending.setdefault(mod, []).append(
            tuple(a.detach().clone() for a in args) if ok else None)

    def _after(self, mod, args, kwargs, out) -> None:
        before = self._pending[mod].pop()
        if before is None or mod in self.dropped or not isinstance(out, torch.Tensor):
            return
        # An input the call changed in place: only the in-place-and-return kind (an in-place
        # activation) can be replayed, by writing the recorded output into that input.
        inplace = next((i for i, a in enumerate(args) if a is out), None)
        size = out.nbytes + sum(a.nbytes for a in before)
        if (any(i != inplace and not torch.equal(a, b)
                for i, (a, b) in enumerate(zip(args, before)))
                or not self._room(size, self.depth[mod])):
            self._drop(mod)
            return
        self.records.setdefault(mod, []).append(_Call(before, out.detach().clone(), inplace))
        self.bytes += size

    def _room(self, size: int, depth: int) -> bool:
        """Whether ``size`` more bytes of a module at ``depth`` fit, forgetting deeper modules'
        records if needed (none that deep is kept from then on). When they cannot, no deeper
        module is kept from then on (a later, smaller one at the same depth still may be)."""
        if depth > self.depth_limit:
            return False
        while self.bytes + size > self.max_bytes:
            deeper = [m for m in self.records if self.depth[m] > depth]
            if not deeper:
                self.depth_limit = depth
                return False
            victim = max(deeper, key=lambda m: self.depth[m])
            self.depth_limit = min(self.depth_limit, self.depth[victim] - 1)
            self._drop(victim)
        return True

    def _drop(self, mod: nn.Module) -> None:
        """``mod`` is never replayed: its records are forgotten, none are taken again."""
        self.dropped.add(mod)
        for call in self.records.pop(mod, []):
            self.bytes -= call.out.nbytes + sum(a.nbytes for a in call.args)

    @contextlib.contextmanager
    def changed(self, layer: str):
        """While ``layer`` (one of ``layers``) is swapped or altered, the recorded modules beside
        its path answer equal calls from their records."""
        target = self.targets[layer]
        modules = dict(self.model.named_modules())
        patched = []
        try:
            for name in self.beside[layer]:
                mod = modules.get(name)
                if (mod is None or mod not in self.records or _contains(mod, target)
                        or isinstance(mod, torch.jit.ScriptModule)):  # its forward is fixed
                    continue
                patched.append((mod, mod.__dict__.get("forward")))
                mod.forward = _short_circuit(mod, self.records[mod])
            yield
        finally:
            for mod, own in reversed(patched):
                del mod.forward
                if own is not None:
                    mod.forward = own


def _beside_path(model: nn.Module, name: str) -> list[str]:
    """The dotted names of the children of ``name``'s ancestors that are not on its path."""
    parts = name.split(".")
    out, prefix, parent = [], "", model
    for part in parts:
        for child, _ in parent.named_children():
            if child != part:
                out.append(prefix + child)
        parent = getattr(parent, part)
        prefix += part + "."
    return out


def _contains(mod: nn.Module, target: nn.Module) -> bool:
    return any(m is target for m in mod.modules())


class _Call(NamedTuple):
    args: tuple[torch.Tensor, ...]  # the inputs as they were before the call
    out: torch.Tensor
    inplace: int | None  # the input the call wrote its output into and returned, if any


def _short_circuit(mod: nn.Module, records: list[_Call]):
    run = mod.__dict__.get("forward") or type(mod).forward.__get__(mod)

    def forward(*args, **kwargs):
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            for call in records:
                if len(call.args) == len(args) and all(
                        a.shape == r.shape and a.dtype == r.dtype and torch.equal(a, r)
                        for a, r in zip(args, call.args)):
                    if call.inplace is not None:
                        return args[call.inplace].copy_(call.out)
                    return call.out.clone()  # a copy: later in-place ops must not touch it
        return run(*args, **kwargs)

    return forward
