"""Progress reporting: the library calls a sink; the CLI decides how (or whether) to show it.

A stage names its unit of work and how many units it has (``stage(name, total)``); ``advance``
counts units done. The time left is the measured time per unit so far times the units left
(:class:`Eta`). ``note`` attaches a running figure to the stage (e.g. the fine-tuning loss) and
``info`` is a one-off line (e.g. the whole run's estimate before the search).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Progress:
    """Silent sink, and the interface: ``stage(name, total)``, ``advance(n)``, ``note(text)``,
    ``info(line)``, ``end()``."""

    def stage(self, name: str, total: int | None = None) -> None:
        log.info("%s", name)

    def advance(self, n: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def info(self, line: str) -> None:
        log.info("%s", line)

    def end(self) -> None:
        pass


class Eta:
    """Units done and the time left of one stage, from the measured time of the units so far."""

    def __init__(self, total: int | None, clock: Callable[[], float] = time.perf_counter):
        self.total, self.clock = total, clock
        self.start = clock()
        self.done = 0

    def advance(self, n: int = 1) -> None:
        self.done += n

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float | None:
        """Seconds left at the rate so far (None before the first unit or without a total)."""
        if not self.total or self.done <= 0:
            return None
        return self.elapsed() / self.done * max(0, self.total - self.done)

    def line(self, name: str, note: str = "") -> str:
        left = self.left()
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        tail = "" if left is None else f", ~{fmt_seconds(left)} left"
        extra = f", {note}" if note else ""
        return f"  {name}: {count}{extra}, {fmt_seconds(self.elapsed())} elapsed{tail}"


def fmt_seconds(s: float) -> str:
    """12 s, 3.4 min, 1.2 h."""
    if s < 100:
        return f"{s:.0f} s"
    if s < 6000:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class TextProgress(Progress):
    """Plain lines for logs and pipes: the stage's name, then its count and time left every
    ``every`` seconds (and when it completes)."""

    def __init__(self, write: Callable[[str], None], every: float = 30.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.write, self.every, self.clock = write, every, clock
        self.name, self.eta, self._shown, self._note = "", None, 0.0, ""

    def stage(self, name, total=None):
        self.end()
        self.write(f"… {name}")
        self.name, self.eta, self._note = name, Eta(total, self.clock), ""
        self._shown = self.clock()

    def advance(self, n=1):
        if self.eta is None:
            return
        self.eta.advance(n)
        finished = self.eta.total is not None and self.eta.done >= self.eta.total
        if finished or self.clock() - self._shown >= self.every:
            self.write(self.eta.line(self.name, self._note))
            self._shown = self.clock()

    def note(self, text):
        self._note = text

    def info(self, line):
        self.write(line)

    def end(self):
        self.eta = None


class RichProgress(Progress):
    """A rich progress bar per stage; plain :class:`TextProgress` lines when stderr is not a
    terminal (logs, CI), so the time left is shown there too."""

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
        self._text = None if self._enabled else TextProgress(
            lambda s: self._console.print(s, highlight=False))
        self._bar = None
        self._task = None
        # Elapsed and, where the stage knows its size, the time left at the measured rate.
        self._cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                      TextColumn("{task.fields[note]}"))

    def stage(self, name, total=None):
        from rich.progress import Progress as _P

        self.end()
        if self._text is not None:
            self._text.stage(name, total)
            return
        self._bar = _P(*self._cols, console=self._console, transient=False)
        self._bar.start()
        self._task = self._bar.add_task(name, total=total, note="")

    def advance(self, n=1):
        if self._text is not None:
            self._text.advance(n)
        elif self._bar is not None:
            self._bar.advance(self._task, n)

    def note(self, text):
        if self._text is not None:
            self._text.note(text)
        elif self._bar is not None:
            self._bar.update(self._task, note=text)

    def info(self, line):
        self.end()
        self._console.print(line, highlight=False)

    def end(self):
        if self._text is not None:
            self._text.end()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
