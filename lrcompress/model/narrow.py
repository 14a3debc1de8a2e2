"""Narrowing the hidden width of inverted-residual blocks and MLPs by interpolative decomposition.

An inverted-residual block (mobilenetv2 and its kin: 1×1 expansion → BatchNorm + activation →
depthwise k×k → BatchNorm + activation → 1×1 projection → BatchNorm) spends its time on its wide
hidden activations: the expansion writes them, the depthwise conv reads and writes them, the
projection reads them. Factorizing a 1×1 conv narrows none of that (on mobilenetv2 the fastest
all-low-rank plan runs at 0.53 of the original's latency where channel pruning reaches 0.45;
benchmarks/RESULTS_latency.md).

Here the projection is re-expressed on ``k`` of its ``C`` input channels
(:func:`lrcompress.factorizations.interp.interp_fit`, fitted to the block's own activations on
calibration data), and every channel it no longer reads is dropped from the expansion, both
BatchNorms and the depthwise conv. The block's input and output widths (the residual stream) are
unchanged, so blocks are narrowed independently; the constant part of the fit goes into the last
BatchNorm's running mean. The result is an ordinary, smaller model of the same architecture.

An MLP (timm ``Mlp``: ViT, ConvNeXt, ...: ``fc1`` → activation → ``fc2``, as linear layers or
1×1 convs) is the same pattern without the depthwise conv: ``fc2`` is refitted on the kept hidden
channels (its bias takes the constant) and ``fc1`` keeps only their rows.

Supported: timm ``InvertedResidual`` without squeeze-excitation or anti-aliasing, torchvision's
``InvertedResidual`` with an expansion, and timm ``Mlp`` without a norm across its hidden width.
Other blocks of those kinds are listed with the reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lrcompress.factorizations.interp import InterpFit, interp_fit
from lrcompress.model.input_stats import augmented_input_moments


@dataclass(frozen=True)
class Parts:
    """The modules of one inverted-residual block that its hidden width runs through."""

    expand: nn.Conv2d
    bn1: nn.BatchNorm2d
    dw: nn.Conv2d
    bn2: nn.BatchNorm2d
    project: nn.Conv2d
    bn3: nn.BatchNorm2d

    @property
    def width(self) -> int:
        return self.project.in_channels


@dataclass(frozen=True)
class MlpParts:
    """An MLP's two layers around its hidden width (timm ``Mlp``: ViT, ConvNeXt, ...):
    ``fc1`` → activation → ``fc2``, as linear layers or 1×1 convs. ``project`` is ``fc2``."""

    fc1: nn.Module
    project: nn.Module

    @property
    def width(self) -> int:
        return _in_width(self.project)


@dataclass(frozen=True)
class HiddenSite:
    name: str  # the block's module name
    parts: Parts | MlpParts


def _in_width(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _out_width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _is_matrix_layer(m: nn.Module) -> bool:
    """A linear layer or an ungrouped 1×1 conv (a matrix over channels)."""
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1
                                        and m.kernel_size == (1, 1))


def _mlp_parts(m: nn.Module) -> MlpParts | str:
    fc1, fc2 = m.fc1, m.fc2
    if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
        return f"has {type(m.norm).__name__} across its hidden width"
    if not (_is_matrix_layer(fc1) and _is_matrix_layer(fc2)
            and _out_width(fc1) == _in_width(fc2)):
        return "is not two linear layers (or 1×1 convs) around its hidden width"
    if fc2.bias is None:
        return "has no bias on its second layer (the fit's constant goes there)"
    return MlpParts(fc1, fc2)


def _timm_parts(m: nn.Module) -> Parts | str:
    for extra in ("se", "aa"):
        if not isinstance(getattr(m, extra, nn.Identity()), nn.Identity):
            return f"has {type(getattr(m, extra)).__name__} ({extra}) in its hidden width"
    return Parts(m.conv_pw, m.bn1, m.conv_dw, m.bn2, m.conv_pwl, m.bn3)


def _torchvision_parts(m: nn.Module) -> Parts | str:
    seq = m.conv
    if len(seq) != 4 or not isinstance(seq[0], nn.Sequential) or len(seq[0]) < 2:
        return "has no expansion (expand ratio 1)"
    return Parts(seq[0][0], seq[0][1], seq[1][0], seq[1][1], seq[2], seq[3])


def _parts(m: nn.Module) -> Parts | MlpParts | str | None:
    """The block's parts, a reason it cannot be narrowed, or None if it is no such block."""
    if type(m).__name__ == "Mlp" and hasattr(m, "fc1") and hasattr(m, "fc2"):
        return _mlp_parts(m)
    if type(m).__name__ != "InvertedResidual":
        return None
    if all(hasattr(m, a) for a in ("conv_pw", "bn1", "conv_dw", "bn2", "conv_pwl", "bn3")):
        found = _timm_parts(m)
    elif isinstance(getattr(m, "conv", None), nn.Sequential):
        found = _torchvision_parts(m)
    else:
        return "has an unknown layout"
    return found if isinstance(found, str) else _check(found)


def _check(p: Parts) -> Parts | str:
    c = p.width
    convs_ok = (isinstance(p.expand, nn.Conv2d) and p.expand.groups == 1
                and p.expand.out_channels == c and isinstance(p.project, nn.Conv2d)
                and p.project.groups == 1 and p.project.kernel_size == (1, 1)
                and isinstance(p.dw, nn.Conv2d) and p.dw.groups == c == p.dw.in_channels
                and p.dw.out_channels == c)
    if not convs_ok:
        return "is not expansion → depthwise → 1×1 projection"
    bns = (p.bn1, p.bn2, p.bn3)
    if not all(isinstance(b, nn.BatchNorm2d) and b.running_mean is not None for b in bns):
        return "lacks BatchNorms with running statistics"
    if p.bn1.num_features != c or p.bn2.num_features != c:
        return "has BatchNorms of another width"
    return p


def hidden_sites(model: nn.Module) -> tuple[list[HiddenSite], dict[str, str]]:
    """The blocks whose hidden width can be narrowed, and the others with the reason."""
    sites, skipped = [], {}
    for name, m in model.named_modules():
        found = _parts(m)
        if isinstance(found, (Parts, MlpParts)):
            sites.append(HiddenSite(name, found))
        elif isinstance(found, str):
            skipped[name] = found
    return sites, skipped


def hidden_moments(model: nn.Module, sites: list[HiddenSite], batches) -> dict[str, torch.Tensor]:
    """Per site, the augmented second moment of the projection's input over ``batches`` (input
    tensors; one forward of ``model`` per batch, in eval mode)."""
    return augmented_input_moments(model, {s.name: s.parts.project for s in sites},
                                   [(x, None) for x in batches])


def width_for(keep: float, width: int, multiple: int) -> int:
    """``keep`` of ``width`` rounded to a multiple (at least one multiple, at most ``width``;
    all of it for ``keep`` 1)."""
    if keep >= 1.0:
        return width
    return min(width, max(multiple, multiple * round(keep * width / multiple)))


@torch.no_grad()
def narrow_(p: Parts | MlpParts, fit: InterpFit) -> None:
    """Apply ``fit`` to the block in place: keep ``fit.keep`` of the hidden channels."""
    if isinstance(p, MlpParts):
        _narrow_mlp(p, fit)
        return
    idx = torch.tensor(fit.keep, device=p.project.weight.device)
    k = len(fit.keep)
    _keep_params(p.expand, idx)
    p.expand.out_channels = k
    for bn in (p.bn1, p.bn2):
        _keep_params(bn, idx)
        bn.num_features = k
    _keep_params(p.dw, idx)
    p.dw.in_channels = p.dw.out_channels = p.dw.groups = k
    offset = _refit_projection(p.project, fit)
    if p.project.bias is not None:
        p.project.bias += offset
    else:
        p.bn3.running_mean -= offset


def _narrow_mlp(p: MlpParts, fit: InterpFit) -> None:
    idx = torch.tensor(fit.keep, device=p.project.weight.device)
    _keep_params(p.fc1, idx)
    _set_width(p.fc1, "out", len(fit.keep))
    p.project.bias += _refit_projection(p.project, fit)


def _refit_projection(project: nn.Module, fit: InterpFit) -> torch.Tensor:
    """``project`` (linear or 1×1 conv) reads the kept channels with the fitted weight; returns
    the fit's constant output term (in the weight's dtype and device) for the caller to place."""
    w = project.weight
    new = fit.weight.to(w) if w.dim() == 2 else fit.weight.to(w)[:, :, None, None]
    project.weight = nn.Parameter(new.contiguous(), requires_grad=w.requires_grad)
    _set_width(project, "in", len(fit.keep))
    return fit.offset.to(w)


def _set_width(m: nn.Module, side: str, k: int) -> None:
    """Set a linear layer's or conv's ``in``/``out`` width attribute after slicing it."""
    linear = isinstance(m, nn.Linear)
    setattr(m, f"{side}_features" if linear else f"{side}_channels", k)


def _keep_params(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep entries ``idx`` along dim 0 of every parameter and buffer of ``m`` that has one."""
    for name, t in list(m.named_parameters(recurse=False)):
        setattr(m, name, nn.Parameter(t.detach()[idx].clone(), requires_grad=t.requires_grad))
    for name, t in list(m.named_buffers(recurse=False)):
        if t is not None and t.dim() > 0:
            setattr(m, name, t[idx].clone())


@dataclass(frozen=True)
class NarrowedBlock:
    name: str
    width: int  # hidden width before
    kept: int  # after
    rel_error: float  # the projection's output error on the calibration data (interp_fit)


def planned_widths(model: nn.Module, keep: float, multiple: int) -> list[tuple[str, int, int]]:
    """(block, width, kept) for every supported block that ``keep`` narrows (the shapes alone:
    what :func:`narrow_hidden` will produce, known before any data is seen)."""
    return [(s.name, s.parts.width, k) for s, k in _narrowed_sites(model, keep, multiple)]


def _narrowed_sites(model: nn.Module, keep: float, multiple: int):
    """(site, kept width) for every supported block that ``keep`` narrows."""
    out = []
    for site in hidden_sites(model)[0]:
        k = width_for(keep, site.parts.width, multiple)
        if k < site.parts.width:
            out.append((site, k))
    return out


def narrowed_copy(model: nn.Module, blocks) -> nn.Module:
    """A CPU copy of ``model`` in eval mode at the narrowed widths ``blocks`` (values not fitted:
    for shapes, costs and timing; see :func:`narrow_to_widths_`)."""
    m = copy.deepcopy(model).cpu().eval()
    narrow_to_widths_(m, blocks)
    return m


@torch.no_grad()
def narrow_to_widths_(model: nn.Module, blocks) -> None:
    """Resize the named blocks' hidden widths in place to their kept widths (the first channels;
    the projection zeroed: a skeleton for timing or for loading saved weights, never a model
    whose values matter). Blocks already at their kept width are left alone."""
    for name, width, kept in blocks:
        found = _parts(model.get_submodule(name))
        if not isinstance(found, (Parts, MlpParts)):
            raise ValueError(f"{name} is not a block whose hidden width can be narrowed")
        if found.width == kept:
            continue
        if found.width != width:
            raise ValueError(f"{name} has hidden width {found.width}; the plan narrows it from "
                             f"{width} to {kept}")
        out = _out_width(found.project)
        zeros = torch.zeros(out, kept, dtype=torch.float64)
        narrow_(found, InterpFit(tuple(range(kept)), zeros, torch.zeros(out, dtype=torch.float64),
                                 0.0))


def narrow_hidden(model: nn.Module, batches, keep: float, multiple: int = 8
                  ) -> tuple[nn.Module, list[NarrowedBlock]]:
    """A copy of ``model`` with every supported block's hidden width narrowed to ``keep`` of it
    (rounded to ``multiple``), each fitted to the original's activations on ``batches``.
    ``model`` itself is not changed."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], not {keep}")
    chosen = _narrowed_sites(model, keep, multiple)
    moments = hidden_moments(model, [site for site, _ in chosen], batches)
    out = copy.deepcopy(model)
    done = []
    for site, k in chosen:
        name, c = site.name, site.parts.width
        p = _parts(out.get_submodule(name))
        w = p.project.weight.detach()
        w = w if w.dim() == 2 else w[:, :, 0, 0]
        fit = interp_fit(moments[name], w.cpu(), k)
        narrow_(p, fit)
        done.append(NarrowedBlock(name, c, k, fit.rel_error))
    return out, done
