"""Layer census: which conv/linear layers a model has, their shapes and where they run.

:func:`find_layers` runs one forward pass with hooks and returns a :class:`LayerSpec` per
``nn.Conv2d`` / ``nn.Linear``. A ``LayerSpec`` holds everything a factorization and the cost model
need and no module reference: layers are only ever referred to by their dotted name.
:func:`select_layers` applies the default eligibility rules and the user's include/exclude globs.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from lrcompress.errors import UserError

Pair = tuple[int, int]


@dataclass(frozen=True)
class LayerSpec:
    """Everything known about one conv/linear layer, measured once with a forward hook.

    For a linear layer ``in_ch``/``out_ch`` are in/out features, the kernel is (1, 1), and
    ``in_hw == out_hw == (tokens, 1)`` where ``tokens`` is the number of vectors the layer is
    applied to per sample (1 for a classifier, N for a ViT block; every leading dimension of its
    input counts, so windows folded into the batch dimension count too). A conv applied to
    several images per sample (windows or groups folded into the batch dimension) has
    ``copies`` > 1: its positions and costs are ``copies`` times those of one ``in_hw`` map.
    """

    name: str
    kind: str  # "conv2d" | "linear"
    in_ch: int
    out_ch: int
    kernel: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1
    bias: bool = False
    in_hw: Pair = (1, 1)
    out_hw: Pair = (1, 1)
    copies: int = 1  # conv only: maps per sample (leading dimensions folded into the batch)
    # Why the layer can never be factorized (non-standard forward, string padding, ...), or "".
    unsupported: str = ""

    @property
    def tokens(self) -> int:
        return self.in_hw[0] * self.in_hw[1]

    @property
    def in_positions(self) -> int:
        """Input positions per sample (all copies)."""
        return self.copies * self.in_hw[0] * self.in_hw[1]

    @property
    def out_positions(self) -> int:
        """Output positions per sample (all copies)."""
        return self.copies * self.out_hw[0] * self.out_hw[1]

    def input_shape(self, batch: int) -> tuple[int, ...]:
        """The layer's input shape for ``batch`` samples (linear: 2-D for one token, else 3-D)."""
        if self.kind == "linear":
            return (batch, self.in_ch) if self.tokens == 1 else (batch, self.tokens, self.in_ch)
        return (batch * self.copies, self.in_ch, *self.in_hw)

    @property
    def is_depthwise(self) -> bool:
        return self.kind == "conv2d" and self.groups > 1 and self.groups == self.in_ch

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_ch, self.in_ch)
        return (self.out_ch, self.in_ch // self.groups, *self.kernel)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LayerSpec:
        d = dict(d)
        for k in ("kernel", "stride", "padding", "dilation", "in_hw", "out_hw"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _pair(v) -> Pair:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def _unsupported_reason(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        if type(module).forward is not nn.Conv2d.forward:
            return f"{type(module).__name__} has a custom forward (e.g. dynamic 'same' padding)"
        if isinstance(module.padding, str):
            return f"string padding {module.padding!r}"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        return ""
    if type(module).forward is not nn.Linear.forward and _qualname(module) not in PLAIN_LINEARS:
        return f"{type(module).__name__} has a custom forward"
    return ""


# nn.Linear subclasses whose forward is F.linear(x, weight, bias) outside TorchScript, so a chain
# of nn.Linear replaces them exactly (timm's, used by MobileNetV3's classifier).
PLAIN_LINEARS = frozenset({"timm.layers.linear.Linear"})


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _leading(x: torch.Tensor, trailing: int) -> int:
    """The product of ``x``'s dimensions before its last ``trailing`` ones (1 if none)."""
    n = 1
    for d in x.shape[:max(0, x.dim() - trailing)]:
        n *= int(d)
    return n


def _spec_for(name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LayerSpec:
    """The spec of a layer from one call on a batch-1 input: every leading dimension counts."""
    if isinstance(module, nn.Conv2d):
        pad = module.padding if isinstance(module.padding, str) else _pair(module.padding)
        return LayerSpec(
            name=name,
            kind="conv2d",
            in_ch=module.in_channels,
            out_ch=module.out_channels,
            kernel=_pair(module.kernel_size),
            stride=_pair(module.stride),
            padding=pad if isinstance(pad, tuple) else (0, 0),
            dilation=_pair(module.dilation),
            groups=module.groups,
            bias=module.bias is not None,
            in_hw=(int(x.shape[-2]), int(x.shape[-1])),
            out_hw=(int(y.shape[-2]), int(y.shape[-1])),
            copies=_leading(x, 3),
            unsupported=_unsupported_reason(module),
        )
    # Linear: the input is batch-1, so every leading dim (windows folded into the batch
    # included) is a "token" dim.
    tokens = _leading(x, 1)
    return LayerSpec(
        name=name,
        kind="linear",
        in_ch=module.in_features,
        out_ch=module.out_features,
        bias=module.bias is not None,
        in_hw=(tokens, 1),
        out_hw=(tokens, 1),
        unsupported=_unsupported_reason(module),
    )


def _merge_calls(first: LayerSpec | None, again: LayerSpec) -> LayerSpec:
    """One spec for a layer called more than once: its positions add up (when the calls see
    maps of one size; else the later call's spec stands, and the MACs check names the layer)."""
    if first is None:
        return again
    if first.kind == "linear":
        return replace(again, in_hw=(first.tokens + again.tokens, 1),
                       out_hw=(first.tokens + again.tokens, 1))
    if (first.in_hw, first.out_hw) == (again.in_hw, again.out_hw):
        return replace(again, copies=first.copies + again.copies)
    return again


@torch.no_grad()
def find_layers(model: nn.Module, input_size: tuple[int, int, int]) -> list[LayerSpec]:
    """One forward pass of a seeded random ``1×C×H×W`` input; a LayerSpec per conv/linear layer.

    Layers that the forward pass never reaches are left out (they cost nothing). A layer called
    more than once (weight sharing) is rejected, since factorizing it would change every use.
    """
    specs: dict[str, LayerSpec] = {}
    calls: dict[str, int] = {}
    hooks = []

    def make_hook(name):
        def hook(mod, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            specs[name] = _merge_calls(specs.get(name), _spec_for(name, mod, inputs[0], output))

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
        model(x)
    except Exception as e:  # noqa: BLE001 - the model's own forward failed on this input
        raise UserError(
            f"The model failed on an input of size {tuple(input_size)}: {e} ({type(e).__name__})."
            " Pass the size it expects with --input-size C,H,W, or check the architecture's "
            "arguments."
        ) from e
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    shared = [n for n, c in calls.items() if c > 1]
    out = []
    for name, _ in model.named_modules():
        if name in specs:
            s = specs[name]
            if name in shared:
                s = replace(s, unsupported="called more than once per forward")
            out.append(s)
    return out


@dataclass(frozen=True)
class Selection:
    """Which layers may be factorized: globs or ``re:`` regexes over dotted names."""

    include: tuple[str, ...] = ()  # empty: every layer the default rules allow
    exclude: tuple[str, ...] = ()
    # Names that are excluded by default (stem, classifier) unless listed in ``include``.
    protected: tuple[str, ...] = field(default=())


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def check_patterns(patterns, names: list[str], option: str) -> None:
    """A pattern that matches no layer is almost always a typo: say so, and show real names."""
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise UserError(f"{option} {p!r} is not a valid regular expression: {e}.") from e
        if not any(_matches(n, p) for n in names):
            sample = ", ".join(names[:6])
            raise UserError(
                f"{option} {p!r} matches no conv/linear layer. Layer names look like: "
                f"{sample}, ... (see `lrcompress inspect MODEL`). Use a glob such as "
                "'layer3.*' or a regex 're:...'."
            )


def skip_reason(spec: LayerSpec, selection: Selection) -> str:
    """Why a layer is not a candidate for factorization ("" when it is one)."""
    if spec.unsupported:
        return spec.unsupported
    if any(_matches(spec.name, p) for p in selection.exclude):
        return "excluded by --exclude"
    explicitly = any(_matches(spec.name, p) for p in selection.include)
    if selection.include and not explicitly:
        return "not matched by --include"
    if spec.is_depthwise:
        return "depthwise conv (nothing to factorize)"
    if not explicitly and any(_matches(spec.name, p) for p in selection.protected):
        return "stem/classifier (kept dense by default; --include it to factorize)"
    return ""


def protected_names(model: nn.Module, specs: list[LayerSpec]) -> tuple[str, ...]:
    """Stem and classifier: named by timm's ``pretrained_cfg``, else the first and last layer."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names: list[str] = []
    for key in ("first_conv", "classifier"):
        v = cfg.get(key)
        if isinstance(v, str):
            names.append(v)
        elif isinstance(v, (list, tuple)):
            names.extend(str(n) for n in v)
    known = {s.name for s in specs}
    # Config entries name a module or its parent (e.g. 'patch_embed.proj', 'head.fc').
    resolved = [n for n in names if n in known]
    if not resolved and specs:
        resolved = [specs[0].name, specs[-1].name]
    return tuple(dict.fromkeys(resolved))
