"""A user's data loaders, seen by every stage as batches of ``(x, y)``.

The Python API accepts any re-iterable of batches (a ``DataLoader``, a list, ...). A batch may be
``(x, y)``, ``x`` alone (unlabelled), or a dict (``input_key`` names the input, ``label_key`` the
labels). Unlabelled batches are labelled with the *original* model's top-1 prediction, so every
cross-entropy term becomes distillation to the original's hard predictions and a calibration
"accuracy" is agreement with the original; test data must be labelled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lrcompress.errors import UserError


class UserBatches:
    """Batches of a user's iterable as ``(x, y)`` tensors, checked against the model's input
    (``input_shape``, per sample; None: any shape)."""

    def __init__(self, source: Iterable, what: str, *, input_shape: tuple[int, ...] | None,
                 input_key: str | None = None, label_key: str | None = None,
                 labeller: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if isinstance(source, (torch.Tensor, dict)) or not hasattr(source, "__iter__"):
            raise UserError(f"{what} must be an iterable of batches (a DataLoader or a list of "
                            f"(x, y) / x / dict batches), not {type(source).__name__}.")
        self.source, self.what = source, what
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.input_key, self.label_key, self.labeller = input_key, label_key, labeller
        # What DataLoader-aware code looks for (per-epoch reseeding, sample counts).
        self.dataset = getattr(source, "dataset", None)
        self.generator = getattr(source, "generator", None)
        self.sampler = getattr(source, "sampler", None)

    def __len__(self) -> int:
        try:
            return len(self.source)
        except TypeError:
            raise UserError(f"{self.what} has no length (len() fails on a "
                            f"{type(self.source).__name__}); pass a DataLoader or a list of "
                            "batches.") from None

    def __iter__(self):
        n = 0
        for i, batch in enumerate(self.source):
            x, y = self._split(batch, i)
            n += 1
            yield x, y
        if n == 0:
            raise UserError(f"{self.what} yielded no batch: give it at least one.")

    def _split(self, batch, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, dict):
            x, y = self._from_dict(batch, i)
        elif isinstance(batch, torch.Tensor):
            x, y = batch, None
        elif isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2:
            x, y = batch[0], (batch[1] if len(batch) == 2 else None)
        else:
            raise UserError(f"{self.what} batch {i} is a {type(batch).__name__}; expected "
                            "(x, y), x alone, or a dict (with input_key=...).")
        self._check_input(x, i)
        if y is None:
            if self.labeller is None:
                raise UserError(f"{self.what} batch {i} has no labels, but labels are needed "
                                "here: test accuracy is measured against real labels. Give "
                                "(x, y) batches, or leave this loader out.")
            y = self.labeller(x)
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise UserError(f"{self.what} batch {i}: labels must be a 1-D tensor of class "
                            f"indices with one per sample ({x.shape[0]}), got {got}.")
        return x, y.long()

    def _from_dict(self, batch: dict, i: int):
        if self.input_key is None:
            raise UserError(f"{self.what} batch {i} is a dict with keys {sorted(batch)}; say "
                            "which one is the input with input_key=... (and label_key=...).")
        if self.input_key not in batch:
            raise UserError(f"{self.what} batch {i} has no key {self.input_key!r} (input_key); "
                            f"its keys are {sorted(batch)}.")
        if self.label_key is not None and self.label_key not in batch:
            raise UserError(f"{self.what} batch {i} has no key {self.label_key!r} (label_key); "
                            f"its keys are {sorted(batch)}.")
        return batch[self.input_key], batch.get(self.label_key) if self.label_key else None

    def _check_input(self, x, i: int) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise UserError(f"{self.what} batch {i}: the input must be a floating-point tensor, "
                            f"got {got}.")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise UserError(f"{self.what} batch {i} has inputs of shape {tuple(x.shape)}, but the "
                            f"model was traced with example inputs of shape "
                            f"(N, {', '.join(map(str, self.input_shape))}). Give batches of the "
                            "same per-sample shape as example_inputs.")


def sample_count(loader) -> int | None:
    """Samples in a loader when it knows (for progress bars), else None."""
    ds = getattr(loader, "dataset", None)
    try:
        return len(ds) if ds is not None else None
    except TypeError:
        return None


def top1_labeller(model: torch.nn.Module, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Labels unlabelled inputs with ``model``'s top-1 prediction (computed on ``device``)."""

    @torch.no_grad()
    def label(x: torch.Tensor) -> torch.Tensor:
        was = model.training
        model.eval()
        try:
            return model(x.to(device)).argmax(dim=1).cpu()
        finally:
            model.train(was)

    return label
