"""RUN/: the one place that knows a run folder's file names, its fingerprint and its resume rules.

A :class:`RunDir` is created from the output path and the run's fingerprint (what must be equal for
a re-run to continue the previous one). :meth:`RunDir.check` validates the folder *before any
work*; :meth:`RunDir.open` creates it once every input is known to be valid. Stage results are kept
under ``state/`` so an interrupted run resumes from the last finished stage; under ``torchrun``
only rank 0 writes (:meth:`RunDir.writes`), and the barriers keep every rank's view the same.

Nothing of the user's is replaced: ``state/manifest.json`` lists every file the run wrote
outside ``state/`` (:meth:`RunDir.record`, called before each write), ``--overwrite`` removes
only those and ``state/``, and a non-empty folder without a manifest is not a run and is refused;
so is ``--overwrite`` when an input lives among what it would remove. While a process writes
RUN/ it holds RUN/'s lock (:mod:`lrcompress.util.folder_lock`): :meth:`RunDir.check` refuses a
folder another process holds, and :meth:`RunDir.open` takes the lock and checks the folder again
under it. :func:`verify_files` checks a finished run's files against the sha256 in report.json.

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
from lrcompress.util.folder_lock import FolderLock, refuse_if_locked
from lrcompress.util.io import cannot_write_in, file_sha256, write_json, write_text
from lrcompress.util.run_files import (
    CACHE_DIR,
    FINGERPRINT_FILE,
    LEGACY_RUN_FILES,
    LOCK_FILE,
    MANIFEST_FILE,
    REPORT_FILE,
    STATE_DIR,
)


class RunDir:
    """A run folder (or none). Paths: :attr:`path`, :meth:`state`; writes go through it.

    ``inputs``: the files and folders the command reads (checkpoint, data roots); ``--overwrite``
    refuses to remove anything among or around them.
    """

    def __init__(self, path, fingerprint: dict | None = None, overwrite: bool = False,
                 inputs=()):
        if path is not None and not str(path).strip():
            raise UserError('-o "" is an empty path: give the run folder to write (e.g. -o '
                            "runs/r18), or leave -o out for a new folder under runs/.")
        self.path = None if path is None else Path(path)
        self.fingerprint = fingerprint or {}
        self.overwrite = overwrite
        self.inputs = tuple(Path(p) for p in inputs)
        self.resumed = False
        self._lock: FolderLock | None = None
        self._written: set[str] | None = None  # the manifest, once read

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
        """Validates the folder before any work (writes nothing); True when an unfinished run is
        resumed. A folder another process is writing is refused at once."""
        if self.path is None:
            return False
        out = self.path
        if out.exists() and not out.is_dir():
            raise UserError(f"Output {out} exists and is not a directory. Choose another -o.")
        _check_writable(out)
        if self.writes:  # under torchrun rank 0 alone locks, so only it looks
            refuse_if_locked(out)
        self.resumed = self._decide()
        return self.resumed

    def _decide(self) -> bool:
        """Whether the folder can be used (UserError if not), and whether this resumes it."""
        out = self.path
        if not (out.is_dir() and _holds_files(out)):
            return False  # absent, empty, or only the empty folders of a run killed at its start
        written = read_manifest(out)
        if written is None:
            raise UserError(f"Output directory {out} is not empty and is not an lrcompress run "
                            f"(it has no {STATE_DIR}/{MANIFEST_FILE}), so nothing there is "
                            "replaced, with or without --overwrite (which only replaces files "
                            "an lrcompress run wrote). Choose another -o: a new or empty folder.")
        fp_file = out / STATE_DIR / FINGERPRINT_FILE
        if fp_file.exists() and not self.overwrite:
            old = _read_fingerprint(fp_file, out)
            if old == self.fingerprint:
                if (out / REPORT_FILE).exists():
                    raise UserError(f"{out} already holds the finished result of this command. "
                                    "Pass --overwrite to run it again, or choose another -o.")
                return True
            diff = ", ".join(sorted(k for k in set(old) | set(self.fingerprint)
                                    if old.get(k) != self.fingerprint.get(k)))
            if (out / REPORT_FILE).exists():
                raise UserError(f"{out} holds the finished result of a different command "
                                f"(differs in: {diff}). Choose another -o, or pass --overwrite "
                                "to replace it.")
            raise UserError(f"{out} holds an unfinished run of a different command (differs in: "
                            f"{diff}), so it cannot be resumed. Re-run that command to resume "
                            "it, pass --overwrite to start over, or choose another -o.")
        if not self.overwrite:
            raise UserError(f"Output directory {out} is not empty. Choose another -o, or pass "
                            "--overwrite to replace its results.")
        self._refuse_removing_inputs(written)
        return False

    def _refuse_removing_inputs(self, written: set[str]) -> None:
        """--overwrite removes the run's files and state/: never one this command reads."""
        doomed = [self.path / STATE_DIR, *(self.path / r for r in sorted(_removable(written)))]
        doomed = [p.resolve() for p in doomed if p.exists() or p.is_symlink()]
        run = self.path.resolve()
        for inp in (p.resolve() for p in self.inputs if p.exists()):
            in_run = inp == run or run in inp.parents  # a data folder that is part of RUN/
            hit = next((d for d in doomed
                        if d == inp or d in inp.parents or (in_run and inp in d.parents)), None)
            if hit is not None:
                raise UserError(f"--overwrite would remove {hit}, which is or holds part of "
                                f"{inp}, an input of this command (its checkpoint or data). "
                                f"Move the input out of {self.path}, or choose another -o.")

    def open(self) -> None:
        """Locks the folder, checks it again under the lock (another process may have written
        there since :meth:`check`), clears it for --overwrite, and records the fingerprint."""
        if self.path is None:
            return
        distributed.barrier()
        if self.writes:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = FolderLock(self.path)
            self._lock.acquire()
            try:
                self.resumed = self._decide()
                if self.overwrite:
                    self._clear_results()
                (self.path / STATE_DIR).mkdir(parents=True, exist_ok=True)
                self._save_manifest(self._manifest())
                write_json(self.path / STATE_DIR / FINGERPRINT_FILE, self.fingerprint)
            except BaseException:
                self.close()
                raise
        distributed.barrier()

    def close(self) -> None:
        """Releases the folder's lock (the run is finished, or failed)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _clear_results(self) -> None:
        """--overwrite: remove what the manifest lists (the signal cache is kept) and every stage
        file; the manifest itself stays, so the folder never stops being a run."""
        written = self._manifest()
        for rel in _removable(written):
            (self.path / rel).unlink(missing_ok=True)
        state = self.path / STATE_DIR
        for p in state.iterdir() if state.is_dir() else ():
            if p.name != MANIFEST_FILE:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        self._save_manifest({r for r in written if (self.path / r).exists()})

    # ------------------------------------------------------------------ the manifest

    def _manifest(self) -> set[str]:
        if self._written is None:
            self._written = (read_manifest(self.path) if self.path is not None else None) or set()
        return self._written

    def _save_manifest(self, written: set[str]) -> None:
        self._written = set(written)
        write_json(self.path / STATE_DIR / MANIFEST_FILE,
                   {"written_by": "lrcompress", "files": sorted(self._written)})

    def record(self, *names: str) -> None:
        """Adds files (paths relative to RUN/) to the manifest *before* they are written."""
        if self.writes and not set(names) <= self._manifest():
            self._save_manifest(self._manifest() | set(names))

    def checksums(self, names) -> dict[str, str]:
        """{name: sha256} of files in RUN/ (for report.json's ``files``)."""
        return {n: file_sha256(self.path / n) for n in names}

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


def read_manifest(folder) -> set[str] | None:
    """The files (relative paths) an lrcompress run wrote in ``folder``; None when it has no
    manifest (it is not a run)."""
    path = Path(folder) / STATE_DIR / MANIFEST_FILE
    if not path.is_file():
        return set(LEGACY_RUN_FILES) if _is_legacy_run(Path(folder)) else None
    data = _read_json(path)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise UserError(f"{path} is damaged (no list of files): lrcompress cannot tell its own "
                        "files from yours there. Choose another -o, or remove the folder "
                        "yourself.")
    return set(files)


def _is_legacy_run(folder: Path) -> bool:
    """A run written before manifests: its state/fingerprint.json is the one search (checkpoint)
    or the Python API (weights_sha256) records."""
    try:
        fp = json.loads((folder / STATE_DIR / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(fp, dict) and ("checkpoint" in fp or "weights_sha256" in fp)


def _removable(written: set[str]) -> set[str]:
    """What --overwrite removes of the files a run wrote: all but the signal cache."""
    return {r for r in written if Path(r).parts[:1] not in ((CACHE_DIR,), (STATE_DIR,))}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is damaged ({e}). Pass --overwrite to start over, or choose "
                        "another -o.") from e


def verify_files(run, report: dict, allow_modified: bool = False) -> list[str]:
    """Checks every file report.json's ``files`` records against its sha256. Returns what
    differs (each as "NAME changed" / "NAME is missing"); raises UserError on a difference
    unless ``allow_modified``. A report without checksums (an older lrcompress) returns []."""
    run = Path(run)
    if run.is_file():
        run = run.parent
    bad = []
    for name, sha in sorted((report.get("files") or {}).items()):
        p = run / name
        if not p.is_file():
            bad.append(f"{name} is missing")
        elif file_sha256(p) != sha:
            bad.append(f"{name} changed")
    if bad and not allow_modified:
        raise UserError(f"{run} is not as lrcompress wrote it: {'; '.join(bad)} (report.json "
                        "records the sha256 of every file the run wrote), so report.json no "
                        "longer describes the run. Re-run the search to rebuild it, or pass "
                        "--allow-modified to use it as it is.")
    return bad


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
    """Any file but the lock and the manifest (which alone are what a run killed as it opened
    the folder leaves)."""
    bare = {folder / LOCK_FILE, folder / STATE_DIR / MANIFEST_FILE}
    return any(not p.is_dir() and p not in bare for p in folder.rglob("*"))
