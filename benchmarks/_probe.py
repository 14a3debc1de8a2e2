"""Run one benchmark command in this process and record its peak memory.

    python -m benchmarks._probe STATS.json -- lrcompress search MODEL ...
    python -m benchmarks._probe STATS.json -- python benchmarks/tp_baseline.py MODEL ...

The command runs exactly as it would from a shell (``lrcompress`` is the console script's entry
point; a ``python SCRIPT.py`` runs the script as ``__main__``). When it ends, however it ends,
STATS.json gets its exit code, wall seconds, the process's peak resident memory (``ru_maxrss``)
and, when it used CUDA, torch's peak allocated and reserved GPU memory.
"""

from __future__ import annotations

import json
import resource
import runpy
import sys
import time
from pathlib import Path


def _gpu_peak() -> dict | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return {"max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "max_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1),
            "device": torch.cuda.get_device_name()}


def _run(cmd: list[str]) -> int:
    if cmd[0] == "lrcompress":
        from lrcompress.cli import main

        sys.argv = cmd
        main(args=cmd[1:], prog_name="lrcompress", obj={})  # click exits through SystemExit
        return 0
    if Path(cmd[0]).name.startswith("python") and len(cmd) > 1 and cmd[1].endswith(".py"):
        sys.argv = cmd[1:]
        runpy.run_path(cmd[1], run_name="__main__")
        return 0
    raise SystemExit(f"_probe: cannot run {cmd[0]!r} in-process: give `lrcompress ...` or "
                     "`python SCRIPT.py ...`.")


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    stats_path, cmd = Path(argv[0]), argv[2:]
    t0 = time.perf_counter()
    code: int | str | None = 1  # stays 1 if the command dies of an exception
    try:
        code = _run(cmd)
    except SystemExit as e:
        code = e.code
    finally:
        rc = code if isinstance(code, int) else (0 if code is None else 1)
        stats = {"returncode": rc, "wall_s": round(time.perf_counter() - t0, 3),
                 "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                       1),
                 "gpu": _gpu_peak()}
        stats_path.write_text(json.dumps(stats, indent=1) + "\n")
    if isinstance(code, str):
        print(code, file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
