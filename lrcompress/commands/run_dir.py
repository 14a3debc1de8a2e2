"""RUN/: the one place that knows a run folder's file names, its fingerprint and its resume rules.

A :class:`RunDir` is created from the output path and the run's fingerprint (what must be equal for
a re-run to continue the previous one). :meth:`RunDir.check` validates the folder *before any
work*; :meth:`RunDir.open` creates it once every input is known to be valid. Stage results are kept
under ``state/`` so an interrupted run resumes from the last finished stage; under ``torchrun``
only rank 0 writes (:meth:`RunDir.writes`), and the barriers keep every rank's view the same.

``RunDir(None)`` is a run without a folder (the Python API without ``run_dir``): it reads nothing,
writes nothing and never resumes, so the stages need no special case.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from lrcompress.errors import UserError
from lrcompress.util import distributed
from lrcompress.util.io import cannot_write_in, write_json, write_text
from lrcompress.util.run_files import (
    FINGERPRINT_FILE,
    REPORT_FILE,
    RESULT_FILES,
    STATE_DIR,
)


class RunDir:
    """A run folder (or none). Paths: :attr:`path`, :meth:`state`; writes go through it."""

    def __init__(self, path, fingerprint: dict | None = None, overwrite: bool = False):
        self.path = None if path is None else Path(path)
        self.fingerprint = fingerprint or {}
        self.overwrite = overwrite
        self.resumed = False

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def file(self, name: str) -> Path | None:
        return None if self.path is None else self.path / name

    def state(self, name: str) -> Path | None:
        return None if self.path is None else self.path / STATE_DIR / name

    @property
    def fingerprint_text(self) -> str:
        return json.dumps(self.fingerprint, sort_keys=True)

    # ------------------------------------------------------------------ before any work

    def check(self) -> bool:
        """Validates the folder before any work; True when an unfinished run is resumed."""
        if self.path is None:
            return False
        out = self.path
        if out.exists() and not out.is_dir():
            raise UserError(f"Output {out} exists and is not a directory. Choose another -o.")
        _check_writable(out)
        if not (out.is_dir() and _holds_files(out)):
            return False  # absent, empty, or only the empty folders of a run killed at its start
        fp_file = out / STATE_DIR / FINGERPRINT_FILE
        if fp_file.exists() and not self.overwrite:
            old = _read_fingerprint(fp_file, out)
            if old == self.fingerprint:
                if (out / REPORT_FILE).exists():
                    raise UserError(f"{out} already holds the finished result of this command. "
                                    "Pass --overwrite to run it again, or choose another -o.")
                self.resumed = True
                return True
            diff = sorted(k for k in set(old) | set(self.fingerprint)
                          if old.get(k) != self.fingerprint.get(k))
            raise UserError(f"{out} holds an unfinished run of a different command (differs in: "
                            f"{', '.join(diff)}), so it cannot be resumed. Re-run that command "
                            "to resume it, pass --overwrite to start over, or choose another -o.")
        if not self.overwrite:
            raise UserError(f"Output directory {out} is not empty. Choose another -o, or pass "
                            "--overwrite to replace its results.")
        return False

    def open(self) -> None:
        """Creates state/ and records the fingerprint (all inputs are valid by now)."""
        if self.path is None:
            return
        distributed.barrier()
        if self.writes:
            if self.overwrite and self.path.is_dir():
                self._clear_results()
            (self.path / STATE_DIR).mkdir(parents=True, exist_ok=True)
            write_json(self.path / STATE_DIR / FINGERPRINT_FILE, self.fingerprint)
        distributed.barrier()

    def _clear_results(self) -> None:
        """--overwrite: drop earlier results and stage state; the signal cache is kept."""
        for name in RESULT_FILES:
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / STATE_DIR, ignore_errors=True)

    # ------------------------------------------------------------------ stage files

    @property
    def writes(self) -> bool:
        """Whether this process writes files (a folder is set and it is rank 0)."""
        return self.path is not None and distributed.is_main()

    def has_state(self, name: str) -> bool:
        p = self.state(name)
        return p is not None and p.exists()

    def read_state_json(self, name: str):
        """A stage's saved JSON, or None when the stage has not finished (or no folder)."""
        return json.loads(self.state(name).read_text()) if self.has_state(name) else None

    def write_state_json(self, name: str, obj) -> None:
        if self.writes:
            write_json(self.state(name), obj)

    def write_state_text(self, name: str, text: str) -> None:
        if self.writes:
            write_text(self.state(name), text)

    def remove_state(self, name: str) -> None:
        if self.writes:
            self.state(name).unlink(missing_ok=True)


def default_run_dir(model_spec: str, decomp: str, target_kind: str, ratio: float,
                    root="runs") -> Path:
    """``runs/<checkpoint stem>-<decomp>-<target>`` (e.g. ``runs/resnet18-tt-flops0.3``), never a
    folder that holds files: ``-2``, ``-3``, ... are added until one is absent or empty. A
    default name therefore never resumes a run; give ``-o`` for that."""
    stem = Path(model_spec.rstrip("/")).stem
    if ":" in stem:  # timm:NAME(args) -> NAME
        stem = stem.split(":", 1)[1].split("(", 1)[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "model"
    base = Path(root) / f"{stem}-{decomp}-{target_kind}{ratio:g}"
    path, n = base, 1
    while path.exists() and (not path.is_dir() or any(path.iterdir())):
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _check_writable(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    probe = out if out.is_dir() else parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"Cannot create output directory {out}: {probe} is a file, not a "
                        "directory. Choose another -o.")
    why = "permission denied" if not os.access(probe, os.W_OK) else cannot_write_in(probe)
    if why:
        raise UserError(f"Cannot write to {probe}: creating a file there failed ({why}). "
                        "Choose another -o.")


def _read_fingerprint(fp_file: Path, out: Path) -> dict:
    """The recorded fingerprint of the run in ``out``; a damaged one is refused with the fix."""
    try:
        old = json.loads(fp_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"{e} ({type(e).__name__})"
    else:
        if isinstance(old, dict):
            return old
        why = f"a JSON {type(old).__name__}, not an object"
    raise UserError(f"{out} is a damaged run folder: {fp_file} cannot be read ({why}), so it is "
                    "not known which command the run belongs to and it cannot be resumed. Pass "
                    "--overwrite to start the run over there, or choose another -o.")


def _holds_files(folder: Path) -> bool:
    return any(not p.is_dir() for p in folder.rglob("*"))
