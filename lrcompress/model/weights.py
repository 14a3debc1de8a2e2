"""Saving and reloading compressed models (safetensors with the plan in the header).

``model.safetensors`` holds the compressed weights; its ``__metadata__`` holds the plan as JSON
under ``lrcompress.plan``. :func:`load` rebuilds the architecture, swaps in empty factorized
skeletons as the plan says, and loads the weights: no pickle and no other file is involved.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from lrcompress._version import __version__
from lrcompress.errors import CheckpointError
from lrcompress.model.arch import (
    LoadedModel,
    ModelInfo,
    build,
    load_state_dict_strict,
    parse_arch,
)
from lrcompress.model.checkpoint import read_checkpoint
from lrcompress.model.plan import Plan
from lrcompress.model.surgery import decompose_
from lrcompress.util.io import atomic_path
from lrcompress.util.run_files import MODEL_FILE

# The safetensors ``__metadata__`` key that holds the plan (its presence marks a compressed model).
PLAN_METADATA_KEY = "lrcompress.plan"


def save_compressed(model: nn.Module, plan: Plan, path) -> Path:
    """Write ``model``'s weights and ``plan`` to a safetensors file, atomically."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {PLAN_METADATA_KEY: plan.to_json(), "lrcompress.version": __version__,
            "format": "pt"}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=meta)
        sort_metadata(tmp)
    return path


def sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted, in place.

    safetensors writes the metadata map in hash order, which changes from process to process, so
    the same model gave different bytes (a CI cache or a checksum would see a new file). The
    header keeps its length (only keys move), and is left alone if it would not.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not meta:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > n or len(new) != len(raw.rstrip(b" ")):
            return
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


def build_compressed(plan: Plan) -> nn.Module:
    """The architecture with the plan's factorized skeletons in place (weights uninitialised)."""
    model = build(parse_arch(plan.arch), plan.num_classes, plan.in_chans)
    decompose_(model, plan, weights=False)
    return model.eval()


def load_compressed(path: Path, sd: dict, meta: dict) -> LoadedModel:
    try:
        plan = Plan.from_json(meta[PLAN_METADATA_KEY])
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed plan is a bad file
        raise CheckpointError(f"{path}: the lrcompress plan in its header is unreadable ({e}). "
                              "The file is corrupt; re-export it.") from e
    model = build_compressed(plan)
    load_state_dict_strict(model, sd, f"the compressed {plan.arch} described by its plan")
    info = ModelInfo(plan.arch, plan.num_classes, plan.in_chans, str(path),
                     input_size=tuple(plan.input_size))
    return LoadedModel(model, info, plan=plan.to_dict())


def read_compressed_file(path) -> tuple[Path, dict, dict]:
    """(file, weights, header metadata) of ``RUN/`` or a compressed ``model.safetensors``."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    sd, meta = read_checkpoint(path)
    if PLAN_METADATA_KEY not in meta:
        raise CheckpointError(f"{path} has no lrcompress plan in its header: it is not a model "
                              "written by lrcompress. Use lrcompress.load_model for plain "
                              "checkpoints.")
    return path, sd, meta


def load(path) -> nn.Module:
    """Rebuild a compressed model from ``RUN/`` or its ``model.safetensors`` (one call)."""
    return load_compressed(*read_compressed_file(path)).model
