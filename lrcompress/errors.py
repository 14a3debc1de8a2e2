"""Exception types and the exit codes the CLI maps them to.

Library code raises these; it never prints or exits. The CLI turns a :class:`UserError` into a
one-paragraph message and exit code 2, a :class:`GateFailure` into exit code 1, and anything else
into exit code 3 (an internal error, with a traceback only under ``--debug``).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class LrcError(Exception):
    """Base class of every error lrcompress raises on purpose.

    Raised in a DataLoader worker process (an unreadable image, say), torch re-raises it in the
    main process built from its own report, a traceback ending in ``module.Class: message``;
    the message is cut back to that last part, so the user sees the one paragraph.
    """

    exit_code = EXIT_INTERNAL

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (_from_worker(args[0], type(self)),)
        super().__init__(*args)


def _from_worker(message: str, cls: type) -> str:
    """``message`` itself, or the original message inside torch's DataLoader worker report."""
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    if " in DataLoader worker process " not in message or marker not in message:
        return message
    return message.rsplit(marker, 1)[1].strip()


class UserError(LrcError):
    """Bad input or usage: the message says what is wrong and how to fix it (exit code 2)."""

    exit_code = EXIT_BAD_INPUT


class CheckpointError(UserError):
    """A checkpoint file that cannot be read, is unsafe, or does not fit the architecture."""


class TargetError(UserError):
    """A FLOPs/params target that is out of range or cannot be reached."""


class GateFailure(LrcError):
    """A CI gate whose budgets did not all hold (exit code 1)."""

    exit_code = EXIT_GATE_FAILED
