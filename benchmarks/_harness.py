"""The benchmark runner: rows of the protocol, each run through the real commands and measured.

A *row* is one model compressed one way: an lrcompress run (model × rank method × decomposition
× MACs target) or a Torch-Pruning run (model × target). Each row

1. runs its command as a user would (``lrcompress search ... --json`` then ``lrcompress export
   RUN --format onnx,safetensors --dynamic-batch --no-latency``, or ``python
   benchmarks/tp_baseline.py ...``), in a child process under ``benchmarks._probe``, which records
   the wall time and the peak memory (RSS, and GPU memory on CUDA);
2. reloads the compressed model here (``lrcompress.load`` / ``tp_baseline.load_pruned``), counts
   its MACs and parameters with ``FlopCounterMode`` (``lrcompress.measure.metrics``), and
   times it against the original in ONNX Runtime, in this process and in round-robin
   (``lrcompress.measure.latency.compare``), next to the ideal speed-up (the MACs ratio);
3. writes ``RESULTS_DIR/<row>.json`` with the commands, date, machine, code hash and every figure.

A row whose JSON exists with the same budget, data, checkpoint and code hash is skipped, so a
killed or partial benchmark is completed by re-running the same command. Decompositions that give
a model exactly the same options as an earlier one (mobilenetv2: every factorizable layer is a
1×1 conv, factorized by SVD whatever ``--decomp`` says) are recorded as equivalent, not re-run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lrcompress.util.io import file_sha256, write_json

from ._profiles import DECOMPS, FMNIST, TP, ModelSpec, Profile

REPO = Path(__file__).resolve().parents[1]
SCHEMA = 1


@dataclass(frozen=True)
class Row:
    model: ModelSpec
    method: str  # rene | uniform | vbmf | torch-pruning
    decomp: str | None  # None for Torch-Pruning
    target: float

    @property
    def id(self) -> str:
        parts = [self.model.name, self.method] + ([self.decomp] if self.decomp else [])
        return "__".join([*parts, f"{self.target:g}"])

    @property
    def is_tp(self) -> bool:
        return self.method == TP


def plan_rows(models, targets, decomps, methods) -> list[Row]:
    """Rows in the order that reuses the most work: per model and target, Torch-Pruning first,
    then each decomposition's methods (they share its cached signals)."""
    rows = []
    for m in models:
        for t in targets:
            if TP in methods:
                rows.append(Row(m, TP, None, t))
            for d in decomps:
                rows += [Row(m, meth, d, t) for meth in methods if meth != TP]
    return rows


# ------------------------------------------------------------------ provenance


def code_hash(repo: Path = REPO) -> str:
    """Hash of the code a result depends on: lrcompress/ and the Torch-Pruning baseline."""
    h = hashlib.sha1()
    files = sorted((repo / "lrcompress").rglob("*.py")) + [repo / "benchmarks" / "tp_baseline.py"]
    for p in files:
        h.update(str(p.relative_to(repo)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def git_commit(repo: Path = REPO) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        # the code only: the harness's own outputs (results, RESULTS.md) do not count
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--",
                                "lrcompress", "benchmarks/*.py"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return out + ("+uncommitted" if dirty else "")


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import onnxruntime

    from lrcompress.measure.latency import cpu_count

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "cores": cpu_count(), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "ort_providers": onnxruntime.get_available_providers(),
            "platform": platform.platform()}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


# ------------------------------------------------------------------ executing commands

Executor = Callable[[list[str], Path, Path, dict], dict]


def subprocess_executor(cmd: list[str], stats: Path, log: Path, env: dict) -> dict:
    """Run ``cmd`` in a child process under the probe; its output goes to ``log``."""
    full = [sys.executable, "-m", "benchmarks._probe", str(stats), "--", *cmd]
    stats.unlink(missing_ok=True)
    with open(log, "w") as f:
        p = subprocess.run(full, cwd=REPO, env={**os.environ, **env}, stdout=f,
                           stderr=subprocess.STDOUT, check=False)
    if stats.exists():
        return json.loads(stats.read_text())
    return {"returncode": p.returncode, "wall_s": None, "peak_rss_mib": None, "gpu": None}


def inprocess_executor(cmd: list[str], stats: Path, log: Path, env: dict) -> dict:
    """The same in this process (tests): no fork, and the memory figure is this process's."""
    from . import _probe

    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        _probe.main([str(stats), "--", *cmd])
    return json.loads(stats.read_text())


def tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class BenchError(Exception):
    """Bad usage or a missing prerequisite: compare.py prints the message and exits 2."""


class CommandFailed(Exception):
    def __init__(self, stage: str, record: dict, log: Path):
        self.record, self.log = record, log
        super().__init__(f"{stage} failed (exit {record['returncode']}); the end of {log}:\n"
                         f"{tail(log)}")


# ------------------------------------------------------------------ the runner


@dataclass
class Paths:
    checkpoints: Path  # reference checkpoints (trained here when missing)
    work: Path  # RUN directories, caches and logs (git-ignored)
    results: Path  # one JSON per row (kept in git)


class Runner:
    def __init__(self, profile: Profile, paths: Paths, data: str = FMNIST, *,
                 executor: Executor = subprocess_executor, force: bool = False,
                 train_missing: bool = True, say: Callable[[str], None] = print):
        self.profile, self.paths, self.data = profile, paths, data
        self.executor, self.force, self.train_missing, self.say = (executor, force,
                                                                   train_missing, say)
        self.env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        if profile.threads:
            self.env["OMP_NUM_THREADS"] = str(profile.threads)
        self.code = code_hash()
        self.commit = git_commit()
        self.machine = machine_info()
        self._originals: dict[str, tuple] = {}
        self._onnx: dict[str, bytes] = {}
        self._ckpt_sha: dict[str, str] = {}
        self._equiv: dict[str, dict] = {}

    # -------------------------------------------------------------- helpers

    def ckpt(self, model: ModelSpec) -> Path:
        return self.paths.checkpoints / model.checkpoint

    def rel(self, p: Path) -> str:
        """A path as a command line should show it: relative to the repository when inside."""
        p = Path(p).resolve()
        try:
            return str(p.relative_to(REPO))
        except ValueError:
            return str(p)

    def shown(self, cmd: list[str]) -> str:
        env = f"OMP_NUM_THREADS={self.profile.threads} " if self.profile.threads else ""
        return env + shlex.join(cmd)

    def execute(self, stage: str, row_id: str, cmd: list[str]) -> dict:
        logs = self.paths.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log, stats = logs / f"{row_id}.{stage}.log", logs / f"{row_id}.{stage}.stats.json"
        rec = self.executor(cmd, stats, log, self.env)
        rec = {"stage": stage, "command": self.shown(cmd), **rec, "log": self.rel(log)}
        if rec["returncode"] != 0:
            raise CommandFailed(stage, rec, log)
        return rec

    def key(self, row: Row) -> dict:
        """What a stored result must match to be reused."""
        ck = self.ckpt(row.model)
        if str(ck) not in self._ckpt_sha:
            self._ckpt_sha[str(ck)] = file_sha256(ck)
        key = {"budget": self.profile.budget(), "data": self.data, "code": self.code,
               "checkpoint_sha256": self._ckpt_sha[str(ck)]}
        return json.loads(json.dumps(key))  # as stored: tuples become lists

    def result_path(self, row_id: str) -> Path:
        return self.paths.results / f"{row_id}.json"

    def stored(self, row: Row) -> tuple[dict | None, str]:
        """(the stored result if it can be reused, why not otherwise)."""
        p = self.result_path(row.id)
        if not p.exists():
            return None, "no result yet"
        old = json.loads(p.read_text())
        if self.force:
            return None, "--force"
        if old.get("status") == "failed":
            return None, "failed last time"
        diff = sorted(k for k, v in self.key(row).items() if old.get("key", {}).get(k) != v)
        if diff:
            return None, f"stale ({', '.join(diff)} changed)"
        return old, "done"

    # -------------------------------------------------------------- reference models

    def reference(self, model: ModelSpec) -> dict:
        """The reference checkpoint: trained with train_reference.py when missing (or an error
        that gives the exact command, with ``train_missing=False``)."""
        ck = self.ckpt(model)
        out = self.paths.results / f"{model.name}__reference.json"
        cmd = ["python", "examples/fashion_mnist/train_reference.py", "--arch", model.arch,
               "--recipe", self.profile.reference_recipe, "--data", self.data, "-o",
               self.rel(ck), *model.train_args]
        if self.profile.threads:
            cmd += ["--threads", str(self.profile.threads)]
        if not ck.exists():
            if not self.train_missing:
                raise BenchError(f"The reference checkpoint {ck} is missing. Train it with:\n  "
                                 f"{self.shown(cmd)}\nor run without --no-train.")
            self.say(f"training the {model.name} reference ({self.profile.reference_recipe} "
                     f"recipe): {self.shown(cmd)}")
            ck.parent.mkdir(parents=True, exist_ok=True)
            rec = self.execute("train", model.name, cmd)
            meta = json.loads(ck.with_suffix(".json").read_text())
            ref = {"model": model.name, "arch": model.arch, "checkpoint": self.rel(ck),
                   "trained_by_harness": True, "record": rec, "date": now(), "meta": meta}
            write_json(out, ref)
            return ref
        if out.exists():
            return json.loads(out.read_text())
        meta_file = ck.with_suffix(".json")
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else None
        ref = {"model": model.name, "arch": model.arch, "checkpoint": self.rel(ck),
               "trained_by_harness": False, "train_command": self.shown(cmd),
               "date": now(), "meta": meta}
        write_json(out, ref)
        return ref

    def original(self, model: ModelSpec):
        """(original model, its ModelInfo, its MACs, its params), loaded once."""
        if model.name not in self._originals:
            from lrcompress.measure.metrics import independent_macs, param_count
            from lrcompress.model.loading import load_model

            lm = load_model(str(self.ckpt(model)), arch=model.arch)
            m = lm.model.eval()
            self._originals[model.name] = (m, lm.info, independent_macs(m, model.input_size),
                                           param_count(m))
        return self._originals[model.name]

    def original_onnx(self, model: ModelSpec) -> bytes:
        """The original model as a dynamic-batch ONNX graph (for ONNX Runtime timing), once."""
        if model.name not in self._onnx:
            from lrcompress.deploy.onnx import export_onnx

            m = self.original(model)[0]
            self._onnx[model.name] = export_onnx(m, model.input_size,
                                                 dynamic_batch=True).SerializeToString()
        return self._onnx[model.name]

    def equivalences(self, model: ModelSpec, decomps) -> dict:
        """{decomp: earlier decomp with exactly the same per-layer options} and, per target,
        the reason it cannot be reached (``{"infeasible": {(decomp, target): msg}}``)."""
        if model.name in self._equiv:
            return self._equiv[model.name]
        from lrcompress.commands.search import SearchConfig, build_problem
        from lrcompress.errors import TargetError
        from lrcompress.factorizations import is_matrix
        from lrcompress.model.plan import Target

        m, info = self.original(model)[:2]
        sigs, same = {}, {}
        for d in decomps:
            cfg = SearchConfig(target=Target("flops", 0.99), decomp=d)
            try:
                prob = build_problem(m, info, model.input_size, cfg)
            except TargetError:
                continue
            # A 1x1 conv or linear layer is a matrix: every factorization factorizes it by the
            # same SVD into the same two-layer chain, whatever its name in the plan.
            sig = tuple((lo.spec.name, tuple(("svd" if is_matrix(lo.spec) else o.factorization,
                                              o.rank, o.macs, o.params) for o in lo.options))
                        for lo in prob.layers)
            first = next((k for k, v in sigs.items() if v == sig), None)
            if first is not None:
                same[d] = first
            else:
                sigs[d] = sig
        self._equiv[model.name] = same
        return same

    # -------------------------------------------------------------- rows

    def run(self, rows: list[Row]) -> list[dict]:
        results = []
        for model in dict.fromkeys(r.model for r in rows):
            self.reference(model)
        for i, row in enumerate(rows, 1):
            head = f"[{i}/{len(rows)}] {row.id}"
            old, why = self.stored(row)
            if old is not None:
                self.say(f"{head}: {why} (kept; --force re-runs it)")
                results.append(old)
                continue
            self.say(f"{head}: running ({why})")
            t0 = time.perf_counter()
            res = self.run_row(row)
            res["row_wall_s"] = round(time.perf_counter() - t0, 1)
            write_json(self.result_path(row.id), res)
            self.say(f"{head}: {summary(res)} [{res['row_wall_s']:.0f} s]")
            results.append(res)
        return results

    def base_result(self, row: Row) -> dict:
        return {"schema": SCHEMA, "id": row.id, "profile": self.profile.name,
                "model": row.model.name, "arch": row.model.arch, "method": row.method,
                "decomp": row.decomp, "target": row.target, "date": now(),
                "commit": self.commit, "machine": self.machine, "key": self.key(row),
                "loadavg_start": [round(x, 2) for x in os.getloadavg()]}

    def run_row(self, row: Row) -> dict:
        res = self.base_result(row)
        if not row.is_tp:
            same = self.equivalences(row.model, DECOMPS).get(row.decomp)
            if same is not None:
                res.update(status="equivalent", same_as=Row(row.model, row.method, same,
                                                            row.target).id,
                           reason=f"--decomp {row.decomp} gives {row.model.name} exactly the "
                           f"same layer options as --decomp {same} (its factorizable layers are "
                           "all 1×1 convs or linear layers, factorized by SVD either way)")
                return res
        try:
            records = self.run_tp(row) if row.is_tp else self.run_lrcompress(row)
        except CommandFailed as e:
            res.update(status=_failure_status(e), error=str(e), commands=[e.record])
            return res
        res["commands"] = records
        res.update(self.measure(row, self.paths.work / row.id))
        res["status"] = "ok"
        res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        return res

    def common_args(self, row: Row) -> list[str]:
        p = self.profile
        return ["--input-size", row.model.input_size_arg, "--target-flops", f"{row.target:g}",
                "--data", self.data, "--seed", str(p.seed), "--device", p.device,
                "--batch-size", str(p.batch_size), *p.finetune_args(), *p.eval_args()]

    def _overwrite(self, run_dir: Path) -> list[str]:
        if self.force and run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        return ["--overwrite"] if (run_dir / "report.json").exists() else []

    def run_lrcompress(self, row: Row) -> list[dict]:
        run_dir = self.paths.work / row.id
        cache = self.paths.work / "cache" / f"{row.model.name}__{row.decomp}"
        search = ["lrcompress", "search", self.rel(self.ckpt(row.model)), "--arch",
                  row.model.arch, "--decomp", row.decomp, "--method", row.method,
                  *self.common_args(row),
                  *(self.profile.rene_args() if row.method == "rene" else []),
                  "--cache-dir", self.rel(cache), "-o", self.rel(run_dir),
                  *self._overwrite(run_dir), "--json"]
        rec = [self.execute("search", row.id, search)]
        export = ["lrcompress", "export", self.rel(run_dir), "--format", "onnx,safetensors",
                  "--dynamic-batch", "--no-latency", "--json"]
        rec.append(self.execute("export", row.id, export))
        return rec

    def run_tp(self, row: Row) -> list[dict]:
        run_dir = self.paths.work / row.id
        cmd = ["python", "benchmarks/tp_baseline.py", self.rel(self.ckpt(row.model)), "--arch",
               row.model.arch, *self.common_args(row), "--scope", self.profile.tp_scope,
               "--round-to", str(self.profile.tp_round_to), "-o", self.rel(run_dir),
               *self._overwrite(run_dir), "--json"]
        return [self.execute("tp_baseline", row.id, cmd)]

    def measure(self, row: Row, run_dir: Path) -> dict:
        from lrcompress.measure.latency import LatencyConfig, compare
        from lrcompress.measure.metrics import independent_macs, param_count

        original, _, base_macs, base_params = self.original(row.model)
        orig_onnx = self.original_onnx(row.model)
        if row.is_tp:
            from .tp_baseline import load_pruned

            comp = load_pruned(run_dir)
        else:
            from lrcompress import load

            comp = load(run_dir)
        macs, params = independent_macs(comp, row.model.input_size), param_count(comp)
        p = self.profile
        cfg = LatencyConfig(repeats=p.lat_repeats, warmup=p.lat_warmup, batches=p.lat_batches,
                            threads=p.lat_threads, torch=p.lat_torch, per_layer=False)
        t0 = time.perf_counter()
        lat = compare(original, comp, row.model.input_size, cfg, ideal_speedup=base_macs / macs,
                      onnx_models={"original": orig_onnx,
                                   "compressed": (run_dir / "model.onnx").read_bytes()})
        lat_s = time.perf_counter() - t0
        rep = json.loads((run_dir / "report.json").read_text())
        acc = rep["accuracy"]
        seconds = dict(rep.get("seconds") or {})
        if not row.is_tp:
            seconds["export"] = (rep.get("export") or {}).get("seconds")
        seconds["latency_benchmark"] = round(lat_s, 3)
        return {
            "run_dir": self.rel(run_dir),
            "test_samples": acc["original"]["n"],
            "top1": {"original": acc["original"]["top1"],
                     "before_ft": acc["pruned" if row.is_tp else "decomposed"]["top1"],
                     "bn_recalibrated": (acc.get("bn_recalibrated") or {}).get("top1"),
                     "after_ft": (acc.get("finetuned") or {}).get("top1")},
            "macs": {"original": base_macs, "compressed": macs, "ratio": macs / base_macs,
                     "reported_ratio": rep["totals"]["macs_ratio"],
                     "counted_by": "torch.utils.flop_counter.FlopCounterMode"},
            "params": {"original": base_params, "compressed": params,
                       "ratio": params / base_params},
            "latency": lat, "seconds": seconds,
            "finetune_steps": (rep.get("finetune") or {}).get("steps"),
            "pruning": rep.get("pruning"),
        }


def _failure_status(e: CommandFailed) -> str:
    # exit 2 from a search whose target cannot be reached is a result, not a crash
    text = tail(e.log, 40)
    if e.record["returncode"] == 2 and re.search(r"cannot (be )?reach", text):
        return "infeasible"
    return "failed"


def summary(res: dict) -> str:
    st = res["status"]
    if st != "ok":
        return st + (f" (same as {res['same_as']})" if st == "equivalent" else
                     f": {res.get('error', '')[:400]}")
    t = res["top1"]
    runs = res["latency"]["runs"]
    b = next((r for r in runs if r["engine"] == "onnxruntime" and r["threads"] == 1
              and r["batch"] == max(x["batch"] for x in runs)), None)
    lat = f", ORT 1-thread speed-up {b['speedup']:.2f}x (ideal {1 / res['macs']['ratio']:.2f}x)" \
        if b else ""
    ft = "" if t["after_ft"] is None else f" -> {t['after_ft']:.2f}"
    return (f"top-1 {t['original']:.2f} -> {t['before_ft']:.2f}{ft}, "
            f"MACs {res['macs']['ratio']:.3f}{lat}")
