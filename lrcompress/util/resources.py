"""Resource faults: CUDA out-of-memory recognised, and ``--auto-batch``'s halving retry.

:func:`retry_halving` runs one unit of work (a search stage, a fine-tuning step) at a batch size
and, when it runs out of GPU memory and halving is enabled, frees what it can and runs it again at
half the size, down to 1, logging every halving (like Hugging Face Accelerate's
``find_executable_batch_size``). Without halving the error propagates and the CLI answers it with
advice (a smaller ``--batch-size``, ``--auto-batch``, ``--device cpu``).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


def cpu_has_bf16() -> bool:
    """bf16 instructions (AVX512-BF16 or AMX): bf16 autocast is then faster than fp32 on CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def is_oom(e: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def retry_halving(attempt: Callable[[int], T], size: int, *, enabled: bool, what: str,
                  on_halve: Callable[[int, int], None] | None = None) -> tuple[T, int]:
    """``(attempt(size), size)``, halving ``size`` after each out-of-memory error when
    ``enabled``; ``on_halve(old, new)`` undoes the failed attempt's side effects first.

    The retry happens outside the ``except`` block, so the failed attempt's frames (and the
    tensors they hold) are released before memory is freed.
    """
    while True:
        try:
            return attempt(size), size
        except Exception as e:  # noqa: BLE001 - only OOM is retried, the rest re-raised
            if not (enabled and size > 1 and is_oom(e)):
                raise
        new = max(1, size // 2)
        log.warning("%s ran out of GPU memory at batch size %d; retrying at %d (--auto-batch)",
                    what, size, new)
        free_memory()
        if on_halve is not None:
            on_halve(size, new)
        size = new


def rebatch(batches: list, size: int) -> list:
    """The same samples, in the same order, in batches of at most ``size`` ((x, y) pairs)."""
    if all(len(x) <= size for x, _ in batches):
        return batches
    out = []
    for x, y in batches:
        out += [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]
    return out
