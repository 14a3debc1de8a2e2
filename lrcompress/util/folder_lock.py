"""One writer per folder: a lock file that names its holder.

``FolderLock(folder).acquire()`` creates (or reuses) ``folder/.lrcompress.lock`` and takes an
exclusive ``flock`` on it without waiting; the file then says who holds it (pid, host, start time,
command). A second process is refused at once with those details (:func:`refuse_if_locked` does
the same check without writing anything, before any work).

The kernel releases an ``flock`` when its process ends, however it ends (kill -9 included), so
a lock file left by a dead process is stale by construction: the next writer locks the same file
and rewrites its holder. No pid has to be guessed alive or dead, and two processes cannot both
take over a stale lock: only one of them gets the ``flock``. :meth:`FolderLock.release` removes
the file; a process that locked a file just removed (it opened the old one before the removal)
sees that the name no longer points at its file and starts again.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from lrcompress.errors import UserError
from lrcompress.util.run_files import LOCK_FILE


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 65536, 0)
        holder = json.loads(data.decode("utf-8"))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _held(folder: Path, holder: dict) -> UserError:
    who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
           f"{holder.get('started', '?')}: {holder.get('command') or '?'}") if holder else \
        "the holder did not record itself yet"
    return UserError(f"{folder} is being written by another lrcompress process ({who}). Two "
                     "processes writing one folder would mix their files: wait for it to finish "
                     "(or stop it), then re-run; or choose another -o.")


def _try_lock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def refuse_if_locked(folder) -> None:
    """UserError naming the holder when another process holds ``folder``'s lock (writes
    nothing)."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        if not _try_lock(fd, fcntl.LOCK_SH):
            raise _held(Path(folder), _read(fd))
    finally:
        os.close(fd)  # closing drops the shared lock taken to look


class FolderLock:
    """The lock of one folder (which must exist); hold it while writing there."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Takes the lock or raises UserError naming its holder; never waits."""
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd, fcntl.LOCK_EX):
                holder = _read(fd)
                os.close(fd)
                raise _held(self.folder, holder)
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:  # released and removed while we opened it: start again
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder()).encode("utf-8"), 0)
            self._fd = fd

    def release(self) -> None:
        """Removes the lock file, then drops the lock (removing first: see the module doc)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
