"""Progress reporting: the library calls a sink; the CLI decides how (or whether) to show it."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class Progress:
    """Silent sink, and the interface: ``stage(name, total)``, ``advance(n)``, ``end()``."""

    def stage(self, name: str, total: int | None = None) -> None:
        log.info("%s", name)

    def advance(self, n: int = 1) -> None:
        pass

    def end(self) -> None:
        pass


class RichProgress(Progress):
    """A rich progress bar per stage; rich renders nothing live when stderr is not a terminal."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._console = Console(stderr=True)
        self._enabled = self._console.is_terminal
        self._bar = None
        self._task = None
        # Elapsed and, where the stage knows its size, the time left at the measured rate.
        self._cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())

    def stage(self, name, total=None):
        from rich.progress import Progress as _P

        self.end()
        if not self._enabled:
            self._console.print(f"… {name}", highlight=False)
            return
        self._bar = _P(*self._cols, console=self._console, transient=False)
        self._bar.start()
        self._task = self._bar.add_task(name, total=total)

    def advance(self, n=1):
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def end(self):
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
