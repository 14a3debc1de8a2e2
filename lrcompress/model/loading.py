"""Loading any model lrcompress accepts: a checkpoint, a compressed run, or a bare architecture.

:func:`load_model` is the one entry point; it sits above both :mod:`lrcompress.model.arch`
(building architectures, plain checkpoints) and :mod:`lrcompress.model.weights` (compressed
``model.safetensors`` files, rebuilt from the plan in their header), so neither imports the other's
caller.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from torch import nn

from lrcompress.errors import CheckpointError
from lrcompress.model.arch import (
    ArchSpec,
    LoadedModel,
    ModelInfo,
    archs_from_stem,
    build,
    fits,
    infer_io,
    io_layers,
    load_state_dict_strict,
    parse_arch,
)
from lrcompress.model.checkpoint import read_checkpoint
from lrcompress.model.weights import PLAN_METADATA_KEY, load_compressed
from lrcompress.util.run_files import MODEL_FILE

log = logging.getLogger(__name__)


def load_model(
    spec: str,
    arch: str | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Build the architecture and load the checkpoint named by ``spec`` into it.

    ``spec`` is a checkpoint path, a RUN directory / compressed ``model.safetensors`` (rebuilt from
    the plan in its metadata), or a bare ``timm:NAME`` (random weights, with a warning).
    """
    path = Path(spec)
    if path.is_dir() and (path / MODEL_FILE).exists():
        path = path / MODEL_FILE
    if not path.exists():
        if re.match(r"^(timm|torchvision):", spec) or (arch is None and ":" not in spec
                                                         and not path.suffix):
            a = parse_arch(spec)
            log.warning("%s has random weights (no checkpoint given): fine for inspect, tests "
                        "and dry runs, meaningless for accuracy.", a)
            model = build(a, num_classes, in_chans)
            nc, ic = _model_io(model)
            return LoadedModel(model.eval(), ModelInfo(str(a), nc, ic, "random"))
        raise CheckpointError(f"No such file: {spec}. Give a checkpoint path, a RUN directory, or "
                              "an architecture name such as timm:resnet18.")
    sd, meta = read_checkpoint(path, trust_pickle=trust_pickle)
    if PLAN_METADATA_KEY in meta:
        return load_compressed(path, sd, meta)
    a = parse_arch(arch) if arch else arch_for_file(path, sd)
    nc_ck, ic_ck = infer_io(a, sd)
    checks = (("--num-classes", num_classes, nc_ck), ("--in-chans", in_chans, ic_ck))
    for opt, given, found in checks:
        if given is not None and found is not None and given != found:
            raise CheckpointError(f"{opt} {given} contradicts the checkpoint {path.name}, which "
                                  f"has {found}. Drop {opt} or fix it.")
    model = build(a, num_classes or nc_ck, in_chans or ic_ck)
    load_state_dict_strict(model, sd, f"{a} (from {path.name})")
    nc, ic = _model_io(model)
    return LoadedModel(model.eval(), ModelInfo(str(a), nc, ic, str(path), **_recorded(meta, path)))


def arch_for_file(path: Path, sd: dict) -> ArchSpec:
    """The architecture a checkpoint's file name names, in the first source whose model the
    weights fit (timm first); when both fit, a warning says which was built and how to get the
    other. When none fits, the first, whose strict load then says what does not fit."""
    cands = archs_from_stem(path)
    fitting = [a for a in cands if fits(a, sd)] if len(cands) > 1 else cands
    if not fitting:
        return cands[0]
    chosen = fitting[0]
    if len(fitting) > 1:
        log.warning("%s fits both %s (architecture guessed from the file name); building %s. "
                    "For the other pass %s.", path.name, " and ".join(map(str, fitting)), chosen,
                    ", ".join(f"--arch {a}" for a in fitting[1:]))
    elif chosen != cands[0]:
        log.info("%s: the weights fit %s, not %s", path.name, chosen, cands[0])
    return chosen


def _recorded(meta: dict, path: Path) -> dict:
    """input_size / mean / std from a safetensors checkpoint's metadata (JSON lists or
    comma-separated numbers); a value that is not that is ignored, with a warning."""
    out = {}
    for key, kind, n in (("input_size", int, 3), ("mean", float, None), ("std", float, None)):
        text = meta.get(key)
        if text is None:
            continue
        try:
            vals = json.loads(text) if text.strip().startswith("[") else text.split(",")
            vals = tuple(kind(v) for v in vals)
            if (n is not None and len(vals) != n) or not vals:
                raise ValueError(f"expected {n or 'some'} values")
        except (ValueError, TypeError) as e:
            log.warning("%s: ignoring its metadata %s=%r (%s)", path.name, key, text, e)
            continue
        out[key] = vals
    return out


def _model_io(model: nn.Module) -> tuple[int, int]:
    stem, head = io_layers(model)
    nc = getattr(model, "num_classes", None)
    if nc is None and head is not None:
        nc = model.get_submodule(head).out_features
    first = model.get_submodule(stem) if stem else None
    ic = first.in_channels if isinstance(first, nn.Conv2d) else 3
    return int(nc or 0), int(ic)
