"""Architectures: naming, building, and reading a checkpoint's class and channel counts.

An architecture is named ``timm:NAME``, ``torchvision:NAME`` or a bare ``NAME`` (timm first, then
torchvision), optionally with constructor arguments: ``timm:vit_tiny_patch16_224(img_size=28,
patch_size=4)``. When no architecture is given, the checkpoint file's stem is tried
(``resnet18.pt`` -> ``resnet18``; ``resnet18_fmnist.pt`` -> ``resnet18`` after dropping suffixes).
``num_classes`` and ``in_chans`` are read off the checkpoint's classifier and stem shapes.
Loading a checkpoint into a model (:func:`lrcompress.model.loading.load_model`) is in ``loading``.
"""

from __future__ import annotations

import ast
import difflib
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from lrcompress.errors import CheckpointError, UserError

log = logging.getLogger(__name__)

SOURCES = ("timm", "torchvision")
# Checkpoint dtypes loaded into a model's float parameters and buffers (converted losslessly, or
# from a lower precision the model was trained in); int, bool and float8 ones are refused.
FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# ModelInfo.arch prefix of a model built in Python (rebuilt with lrcompress.load(model=...)).
CUSTOM_ARCH = "custom:"


@dataclass(frozen=True)
class ArchSpec:
    source: str  # "timm" | "torchvision"
    name: str
    kwargs: dict = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        if not self.kwargs:
            return f"{self.source}:{self.name}"
        args = ",".join(f"{k}={v!r}" for k, v in sorted(self.kwargs.items()))
        return f"{self.source}:{self.name}({args})"


@dataclass(frozen=True)
class ModelInfo:
    arch: str  # canonical ArchSpec string, e.g. "timm:resnet18"
    num_classes: int
    in_chans: int
    source: str  # checkpoint path, or "random" for a bare architecture name
    input_size: tuple[int, int, int] | None = None  # recorded size (compressed models), if any
    # Input normalisation recorded in the checkpoint's metadata (train_reference.py writes it).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def recorded(self) -> dict:
        """What the checkpoint says about its inputs (for data.resolve_preprocess)."""
        return {"input_size": self.input_size, "mean": self.mean, "std": self.std}


@dataclass
class LoadedModel:
    model: nn.Module
    info: ModelInfo
    plan: dict | None = None  # the plan of a compressed model, else None


@lru_cache(maxsize=2)
def _known(source: str) -> tuple[str, ...]:
    if source == "timm":
        import timm

        return tuple(timm.list_models())
    import torchvision

    return tuple(torchvision.models.list_models())


def _exists(source: str, name: str) -> bool:
    if source == "timm":
        import timm

        return timm.is_model(name)
    return name in _known("torchvision")


def parse_arch(text: str) -> ArchSpec:
    """``[source:]name[(k=v, ...)]`` -> ArchSpec; unknown names get close matches."""
    m = re.fullmatch(r"\s*(?:(\w+):)?([\w.\-]+)\s*(?:\((.*)\))?\s*", text)
    if not m:
        raise UserError(f"Cannot parse architecture {text!r}: write timm:NAME or "
                        "torchvision:NAME, optionally with arguments, e.g. "
                        "timm:vit_tiny_patch16_224(img_size=28,patch_size=4).")
    source, name, args = m.groups()
    kwargs = {}
    if args:
        try:
            call = ast.parse(f"f({args})", mode="eval").body
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
            if call.args or None in kwargs:
                raise ValueError("only keyword arguments are allowed")
        except (SyntaxError, ValueError) as e:
            raise UserError(f"Cannot parse the arguments in {text!r} ({e}): use name=value "
                            "pairs with Python literals, e.g. (img_size=28,patch_size=4).") from e
    if source is not None and source not in SOURCES:
        raise UserError(f"Unknown model source {source!r} in {text!r}: use one of {SOURCES}.")
    for src in [source] if source else SOURCES:
        if _exists(src, name):
            return ArchSpec(src, name, kwargs)
    pool = _known(source) if source else _known("timm") + _known("torchvision")
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    where = f"in {source}" if source else "in timm or torchvision"
    raise UserError(f"Unknown architecture {name!r} {where}.{hint} "
                    "List timm's with `python -c 'import timm; print(timm.list_models())'`.")


def archs_from_stem(path: Path) -> list[ArchSpec]:
    """The architectures named by a checkpoint's file name, dropping _suffixes until a name
    exists: one per source that has it (timm first)."""
    parts = re.split(r"([_\-])", path.stem)
    for end in range(len(parts), 0, -2):
        cand = "".join(parts[:end])
        found = [ArchSpec(src, cand) for src in SOURCES if _exists(src, cand)]
        if found:
            if end < len(parts):
                log.info("architecture %s inferred from file name %s", cand, path.name)
            return found
    raise UserError(f"Cannot tell the architecture of {path.name} from its name. "
                    "Pass it with --arch, e.g. --arch timm:resnet18.")


def build(arch: ArchSpec, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
    kwargs = dict(arch.kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        if arch.source == "timm":
            import timm

            if in_chans is not None:
                kwargs["in_chans"] = in_chans
            return timm.create_model(arch.name, pretrained=False, **kwargs)
        import torchvision

        model = torchvision.models.get_model(arch.name, weights=None, **kwargs)
        if in_chans not in (None, 3):
            _set_tv_in_chans(model, in_chans)
        return model
    except Exception as e:  # noqa: BLE001 - a constructor's error is its arguments' fault
        raise UserError(f"Cannot build {arch} with {kwargs}: {e} ({type(e).__name__}). Check the "
                        f"arguments in {arch} (see the constructor's documentation).") from e


def _set_tv_in_chans(model: nn.Module, in_chans: int) -> None:
    """torchvision models are built for 3 channels; swap the first conv for another count."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            new = nn.Conv2d(in_chans, mod.out_channels, mod.kernel_size, mod.stride,
                            mod.padding, mod.dilation, mod.groups, mod.bias is not None)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return


def io_layers(model: nn.Module) -> tuple[str | None, str | None]:
    """(stem conv, classifier) module names: timm's pretrained_cfg, else first conv/last linear."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = {n for n, _ in model.named_modules()}
    stem = cfg.get("first_conv") if isinstance(cfg.get("first_conv"), str) else None
    head = cfg.get("classifier") if isinstance(cfg.get("classifier"), str) else None
    # The config may name a container (a deep stem's 'conv1' Sequential): its first conv / last
    # linear then; without a usable name, the model's.
    mods = dict(model.named_modules())
    if stem not in names or not isinstance(mods[stem], nn.Conv2d):
        within = [n for n in names if stem in names and n.startswith(f"{stem}.")]
        stem = next((n for n, m in model.named_modules()
                     if isinstance(m, nn.Conv2d) and (not within or n in within)), None)
    if head not in names or not isinstance(mods[head], nn.Linear):
        within = [n for n in names if head in names and n.startswith(f"{head}.")]
        head = next((n for n, m in reversed(list(model.named_modules()))
                     if isinstance(m, nn.Linear) and (not within or n in within)), None)
    return stem, head


def infer_io(arch: ArchSpec, sd: dict[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """(num_classes, in_chans) read from the checkpoint's classifier and stem weight shapes."""
    with torch.device("meta"):
        probe = build(arch)
    stem, head = io_layers(probe)
    nc = sd[f"{head}.weight"].shape[0] if head and f"{head}.weight" in sd else None
    ic = sd[f"{stem}.weight"].shape[1] if stem and f"{stem}.weight" in sd else None
    return (int(nc) if nc is not None else None), (int(ic) if ic is not None else None)


def fits(arch: ArchSpec, sd: dict[str, torch.Tensor]) -> bool:
    """Whether the state dict loads strictly into ``arch`` (built on the meta device, with the
    classes and channels the state dict has)."""
    try:
        nc, ic = infer_io(arch, sd)
        with torch.device("meta"):
            model = build(arch, nc, ic)
    except (UserError, KeyError, RuntimeError):
        return False
    return not state_dict_problems(model, sd)


def state_dict_problems(model: nn.Module, sd: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``sd`` from loading strictly into ``model`` (shape mismatches, missing and
    unexpected keys), in words; empty when it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [(k, tuple(own[k].shape), tuple(sd[k].shape))
              for k in own if k in sd and own[k].shape != sd[k].shape]

    def few(keys):
        return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

    kinds = non_float_weights(own, sd)
    problems = []
    if kinds:
        rows = "; ".join(f"{k}: {str(f).removeprefix('torch.')} where the model keeps "
                         f"{str(e).removeprefix('torch.')}" for k, e, f in kinds[:5])
        problems.append(f"{len(kinds)} tensor(s) of a non-float type (quantised or converted "
                        f"weights are not loaded as floats): {rows}")
    if shapes:
        rows = "; ".join(f"{k}: expected {e}, found {f}" for k, e, f in shapes[:5])
        problems.append(f"{len(shapes)} shape mismatch(es): {rows}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {few(unexpected)}")
    return problems


def non_float_weights(own: dict, sd: dict) -> list[tuple[str, torch.dtype, torch.dtype]]:
    """``(key, model dtype, checkpoint dtype)`` where the model keeps floats and the checkpoint
    holds another type (quantised, integer, complex)."""
    return [(k, own[k].dtype, sd[k].dtype) for k in own
            if k in sd and own[k].is_floating_point() and sd[k].dtype not in FLOAT_WEIGHTS]


def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict with a message that names missing/unexpected keys and shape mismatches."""
    problems = state_dict_problems(model, sd)
    if problems:
        only_types = len(problems) == 1 and non_float_weights(model.state_dict(), sd)
        fix = ("Save the model's float weights (e.g. model.float().state_dict(), dequantised)."
               if only_types else "Check --arch (and --num-classes / --in-chans); the checkpoint "
               "may be for another architecture or variant.")
        raise CheckpointError(f"The checkpoint does not fit {what}: " + "; ".join(problems)
                              + ". " + fix)
    model.load_state_dict(sd, strict=True)


def default_input_size(model: nn.Module, in_chans: int) -> tuple[int, int, int]:
    """The architecture's own input size from timm's data config, with the model's channels."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") or (3, 224, 224)
    return (in_chans, int(size[1]), int(size[2]))
