"""Reading checkpoint files safely.

Two formats are read:

* ``.safetensors``: the header is validated (size, JSON, dtypes, offsets inside the file and not
  overlapping) *before* any tensor is allocated, so a hostile header cannot make us allocate
  terabytes or read outside the file.
* ``.pt``/``.pth``/``.bin`` (``torch.save`` output): the pickle's globals are listed statically
  (nothing is executed) and checked against a small allowlist; then the file is read with
  ``torch.load(weights_only=True)``. A failure is never retried with ``weights_only=False`` (torch's
  own message suggests it: we do not follow it). Only ``trust_pickle=True`` — the user's explicit
  ``--trust-pickle`` — loads an arbitrary pickle.

The result is a flat ``{name: tensor}`` state_dict.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickletools
import struct
import zipfile
from pathlib import Path

import torch

from lrcompress.errors import CheckpointError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema", "ema")
# torch.load(weights_only=True) had known bypasses before these versions (CVE-2025-32434 fixed
# in 2.6, CVE-2026-24747 fixed in 2.10).
MIN_SAFE_TORCH = (2, 10)
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_ENTRIES = 200_000  # tensors in one file (image models have hundreds to a few thousand)
VALUES_PER_ENTRY = 16  # JSON values an entry may take (dtype, shape, offsets), on average

_ST_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip

# Globals a plain state_dict saved by torch.save may contain.
_SAFE_GLOBAL_PREFIXES = ("torch._utils._rebuild_", "torch._tensor._rebuild_")
_SAFE_GLOBALS = {
    "collections.OrderedDict", "torch.Size", "torch.device", "torch._utils._rebuild_parameter",
    "builtins.set", "builtins.frozenset", "torch.serialization._get_layout",
}  # fmt: skip
_MODEL_PREFIXES = ("torch.nn.modules.", "timm.", "torchvision.models.", "__main__.")


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _fail(path: Path, what: str, fix: str) -> CheckpointError:
    return CheckpointError(f"Cannot read checkpoint {path}: {what}. {fix}")


# ---------------------------------------------------------------- safetensors


def read_safetensors_header(path: Path) -> tuple[dict, dict]:
    """Validated header: ``(tensor entries, __metadata__)``. Raises CheckpointError."""
    size = path.stat().st_size
    if size < 8:
        raise _fail(path, f"the file is {size} bytes, too short for a safetensors header",
                    "The file is empty or truncated; re-save or re-download it.")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise _fail(path, f"the header claims {n} bytes but the file has {size - 8} after "
                        "the length field", "The file is truncated or not a safetensors file.")
        raw = f.read(n)
    # Every JSON value past the first of its container needs a comma, so this bounds how many
    # Python objects parsing would create: a crafted header cannot make json.loads build
    # tens of millions of them (gigabytes) before the entry count is checked.
    values = raw.count(b",") + raw.count(b"{") + raw.count(b"[")
    if values > VALUES_PER_ENTRY * MAX_ENTRIES:
        raise _fail(path, f"its header holds about {values} JSON values, more than "
                    f"{MAX_ENTRIES} tensors would need", "The file is corrupt or crafted.")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"the header is not valid JSON ({e})",
                    "The file is corrupt or not a safetensors file.") from e
    if not isinstance(header, dict):
        raise _fail(path, "the header is not a JSON object", "The file is corrupt.")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, "its __metadata__ is not a map of strings", "The file is corrupt.")
    if len(header) > MAX_ENTRIES:
        raise _fail(path, f"the header lists {len(header)} tensors", "The file is corrupt.")
    data_len = size - 8 - n
    spans = []
    for name, e in header.items():
        ok = (isinstance(e, dict) and e.get("dtype") in _ST_DTYPE_BYTES
              and isinstance(e.get("shape"), list) and isinstance(e.get("data_offsets"), list)
              and len(e["data_offsets"]) == 2
              and all(isinstance(d, int) and d >= 0 for d in e["shape"] + e["data_offsets"]))
        if not ok:
            raise _fail(path, f"the header entry for {name!r} is malformed", "The file is corrupt.")
        start, end = e["data_offsets"]
        want = math.prod(e["shape"]) * _ST_DTYPE_BYTES[e["dtype"]]
        if not (start <= end <= data_len) or end - start != want:
            raise _fail(path, f"tensor {name!r} has offsets {start}..{end} for {want} bytes in a "
                        f"data section of {data_len} bytes", "The file is truncated or corrupt.")
        spans.append((start, end, name))
    spans.sort()
    for (_s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise _fail(path, f"tensors {n0!r} and {n1!r} overlap in the file",
                        "The file is corrupt or crafted.")
    return header, meta


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _header, meta = read_safetensors_header(path)
    try:
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise _fail(path, f"safetensors could not read it ({e})", "The file is corrupt.") from e


# ---------------------------------------------------------------- pickle (.pt)


def _pickle_globals(data: bytes) -> set[str]:
    """Names of every global a pickle stream imports, found statically (nothing executed).

    A STACK_GLOBAL takes its module and name from the two strings pushed before it; when they
    cannot be resolved statically the global is reported as '<dynamic>' and so never allowed.
    """
    found: set[str] = set()
    strings: list[str] = []
    memo: dict = {}
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                found.add(str(arg).replace(" ", "."))
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif op.name in ("MEMOIZE",) and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                strings.append(memo.get(arg, "<dynamic>"))
            elif op.name == "STACK_GLOBAL":
                if len(strings) >= 2:
                    found.add(f"{strings[-2]}.{strings[-1]}")
                else:
                    found.add("<dynamic>")
    except (ValueError, EOFError) as e:
        raise ValueError(f"malformed pickle stream ({e})") from e
    return found


def _checkpoint_globals(path: Path) -> set[str]:
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                pkls = [n for n in z.namelist() if n.endswith("data.pkl")]
                if not pkls:
                    raise ValueError("a zip archive without data.pkl (not a torch.save file)")
                return _pickle_globals(z.read(pkls[0]))
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f"a damaged zip archive ({e})") from e
    # Legacy (pre-1.6) torch.save: five pickles (magic, protocol, sys info, the object, storage
    # keys) followed by raw storage bytes, which are not scanned.
    data = path.read_bytes()
    found: set[str] = set()
    pos = 0
    for _ in range(5):
        if pos >= len(data):
            break
        end = pos
        for _op, _arg, p in pickletools.genops(data[pos:]):
            end = pos + p
        found |= _pickle_globals(data[pos:end + 1])
        pos = end + 1
    return found


def _is_safe_global(name: str) -> bool:
    if name in _SAFE_GLOBALS or name.startswith(_SAFE_GLOBAL_PREFIXES):
        return True
    # Storage classes and dtypes: torch.FloatStorage, torch.float32, ...
    mod, _, attr = name.rpartition(".")
    return mod == "torch" and (attr.endswith("Storage") or hasattr(torch, attr)
                               and isinstance(getattr(torch, attr), torch.dtype))


def load_pickle(path: Path, trust_pickle: bool = False):
    """The object stored by torch.save, refusing anything beyond tensors and containers."""
    if torch_version() < MIN_SAFE_TORCH:
        raise CheckpointError(
            f"torch {torch.__version__} has known ways around weights_only loading "
            "(CVE-2025-32434, CVE-2026-24747); refusing to read .pt files with it. "
            "Upgrade to torch>=2.10 or convert the checkpoint to .safetensors."
        )
    if path.stat().st_size == 0:
        raise _fail(path, "the file is empty", "Re-save or re-download it.")
    if trust_pickle:
        log.warning("--trust-pickle: loading %s with full pickle (can run code in the file)", path)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file here
            raise _fail(path, f"torch.load failed ({type(e).__name__}: {e})",
                        "The file is corrupt or not a torch checkpoint.") from e
    try:
        names = _checkpoint_globals(path)
    except (ValueError, EOFError, OSError) as e:
        raise _fail(path, f"it is not a readable torch.save file: {e}",
                    "The file is truncated or corrupt; re-save it.") from e
    unsafe = sorted(n for n in names if not _is_safe_global(n))
    if unsafe:
        shown = ", ".join(unsafe[:4]) + (f" (+{len(unsafe) - 4} more)" if len(unsafe) > 4 else "")
        if any(n.startswith(_MODEL_PREFIXES) for n in unsafe):
            what = f"it holds a whole pickled model object ({shown}), not just weights"
        else:
            what = f"its pickle imports {shown}, which is not needed for plain weights"
        raise _fail(
            path, what,
            "Loading it would run code from the file. Save only the weights "
            "(torch.save(model.state_dict(), ...) or safetensors), or pass --trust-pickle "
            "if you trust where the file came from.",
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        msg = str(e).split("\n")[0][:300]
        raise _fail(path, f"torch.load(weights_only=True) failed: {type(e).__name__}: {msg}",
                    "The file is truncated or corrupt; re-save it.") from e


# ---------------------------------------------------------------- state_dict extraction


def extract_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = dict(obj)
    elif isinstance(obj, dict):
        for k in NESTED_KEYS:
            v = obj.get(k)
            if isinstance(v, torch.nn.Module):
                v = v.state_dict()
            if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()):
                sd = dict(v)
                break
        else:
            keys = ", ".join(map(str, list(obj)[:8]))
            raise _fail(path, f"no state_dict found (top-level keys: {keys})",
                        f"Save a state_dict, or a dict holding one under one of {NESTED_KEYS}.")
    else:
        raise _fail(path, f"it holds a {type(obj).__name__}, not a state_dict",
                    "Save model.state_dict() instead.")
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def check_tensors(sd: dict[str, torch.Tensor], path) -> None:
    """Only dense tensors with data, of real dtypes: a meta tensor (shapes only), a sparse,
    nested or quantised one, or a complex one is not a set of weights lrcompress can use."""
    for k, v in sd.items():
        what = ("a meta tensor (a shape without data)" if v.is_meta else
                f"a {str(v.layout).removeprefix('torch.')} tensor" if v.layout != torch.strided
                else "a nested tensor" if v.is_nested
                else f"a {str(v.dtype).removeprefix('torch.')} tensor" if v.is_complex()
                or v.is_quantized else None)
        if what is not None:
            raise CheckpointError(
                f"Checkpoint {path}: {k!r} is {what}, not dense real-valued weights. Save the "
                "model's ordinary float state_dict (materialised, dense, not quantised) and "
                "use that file.")


def check_finite(sd: dict[str, torch.Tensor], path) -> None:
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise CheckpointError(
            f"Checkpoint {path} has NaN or Inf values in {len(bad)} tensor(s): {shown}. "
            "The weights are unusable; use a checkpoint from before training diverged."
        )


def read_checkpoint(path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, safetensors metadata or {})`` from a checkpoint file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"No such file: {path}. Check the path.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give a checkpoint file (or a RUN directory "
                              "with model.safetensors in it).")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"Cannot read {path}: permission denied.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        sd, meta = load_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        sd, meta = extract_state_dict(load_pickle(path, trust_pickle), path), {}
    else:
        raise CheckpointError(
            f"Unknown checkpoint type {suffix!r} for {path}: use .safetensors, or "
            f"{'/'.join(PICKLE_SUFFIXES)} written by torch.save."
        )
    if not sd:
        raise _fail(path, "it holds no tensors", "Save a non-empty state_dict.")
    check_tensors(sd, path)
    check_finite(sd, path)
    return sd, meta
