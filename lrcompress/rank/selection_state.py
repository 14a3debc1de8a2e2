"""Mid-selection progress under RUN/state/, so a killed rank selection resumes inside its
loop (the file keeps its historical name, ``state/search-METHOD.pt``).

The pipeline already keeps whole stages (plan, decomposition, fine-tuning epochs). A long rank
search (RENE: minutes per narrowing step on a real model) can also save its loop state — step
number, candidate sets, logits, factors, optimizer and RNG states — through a
:class:`SelectionState` that the pipeline hands it as ``ctx.state``:

    st = ctx.state.load() if ctx.state else None      # None: start from the beginning
    ...
    if ctx.state:
        ctx.state.save({"step": step_no, "alpha": [...], "rng": torch.get_rng_state(), ...})

Files are written atomically (temp file, then rename) and read back with
``torch.load(weights_only=True)``, so a state holds tensors, numbers, strings, and lists, tuples
and dicts of them. Each carries the run's fingerprint: a state from another command (or an
unreadable one) is ignored with a warning and the search starts over, never half-resumed. The
pipeline deletes the file once the search has finished and its plan is saved.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lrcompress.util import distributed
from lrcompress.util.io import atomic_path

log = logging.getLogger(__name__)

FORMAT = 1


def save_selection_state(path, state: dict, fingerprint: str) -> None:
    """Write ``state`` atomically: the previous file stays whole until the new one is complete."""
    with atomic_path(Path(path)) as tmp:
        torch.save({"format": FORMAT, "fingerprint": fingerprint, "state": state}, tmp)


def load_selection_state(path, fingerprint: str) -> dict | None:
    """The saved state, or None when there is none, it is unreadable, or it is another run's."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file means "start over"
        log.warning("ignoring unreadable search state %s (%s); the search starts over", path, e)
        return None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        log.warning("ignoring search state %s of an unknown format; the search starts over", path)
        return None
    if blob.get("fingerprint") != fingerprint:
        log.warning("ignoring search state %s from a different command; the search starts over",
                    path)
        return None
    return blob["state"]


class SelectionState:
    """:func:`save_selection_state` / :func:`load_selection_state` bound to one file and its
    fingerprint."""

    def __init__(self, path, fingerprint: str):
        self.path, self.fingerprint = Path(path), fingerprint

    def load(self) -> dict | None:
        return load_selection_state(self.path, self.fingerprint)

    def save(self, state: dict) -> None:
        if distributed.is_main():  # under torchrun every rank searches; rank 0 writes
            save_selection_state(self.path, state, self.fingerprint)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
