"""Input statistics of the planned layers, for activation-aware fits (``fit="activation"``).

:func:`collect_input_stats` runs the calibration batches through the model once, with forward
pre-hooks that accumulate, streaming (float32 sums of float32 activations, float64 means), each
planned layer's input second moments in the form its factorization needs (:func:`needs`):

* linear: ``E[x xᵀ]`` over every token (``in × in``);
* conv fitted as one matrix (1×1 convs, svd of a k×k conv): the unfolded patch second moment
  (``C_in·kh·kw`` squared, with the layer's stride, padding and dilation);
* tucker2 / tt of a k×k conv: the channel second moment over all input positions (``C_in²``, for
  the first 1×1 factor) and, within the memory budget, the patch one (for the exact core refit);
* cp / cp4 of a k×k conv: the patch second moment (the output factor is refitted on it).

A matrix over ``max_bytes`` (float64) is not collected; the layer falls back to what it can do
without it (the weight fit when nothing is left), and :func:`collect_input_stats` says so.

:func:`output_errors` measures what a fit achieves: per layer, ``‖y − ŷ‖_F / ‖y‖_F`` with ``y``
the dense layer's output and ``ŷ`` the chain's, on the dense model's own layer inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrcompress.factorizations import DAMPING, FACTORIZATIONS, LayerStats
from lrcompress.model.plan import Plan

MAX_BYTES = 64 << 20
WINDOW_BYTES = 512 << 20  # the original's captured layer inputs, per window (ReferenceInputs)
SYM_BLOCK = 256  # columns per block of a second moment summed as its upper block triangle


def kinds_for(spec, methods) -> tuple[str, ...]:
    """The statistics the activation fits of ``methods`` (factorization names; others, such as
    the dense option, are ignored) on the layer ``spec`` use, each as its factorization declares
    (``Factorization.fit_moments``): a subset of ``("channel", "patch")`` (empty: none of them
    has an activation fit)."""
    got = {k for m in methods if m in FACTORIZATIONS
           for k in FACTORIZATIONS[m].fit_moments(spec)}
    return tuple(k for k in ("channel", "patch") if k in got)


def needs(plan: Plan) -> dict[str, tuple[str, ...]]:
    """Per planned layer, the statistics its fit uses: a subset of ``("patch", "channel")``."""
    out = {lp.name: kinds_for(lp.spec, [lp.factorization]) for lp in plan.layers}
    return {n: k for n, k in out.items() if k}


def no_fit_note(factorization: str) -> str:
    """Why a planned layer keeps the weight fit: its method has no activation fit."""
    return f"{factorization} of a k×k conv has no activation fit (weight fit)"


def moment_cost(spec, kinds: tuple[str, ...], max_bytes: int = MAX_BYTES) -> tuple[int, int]:
    """``(work, width)`` of the second moments a fit of ``spec`` accumulates (those within
    ``max_bytes``): ``work`` = Σ rows per sample × width² (the accumulation's multiply-adds per
    sample), ``width`` the widest (its solve grows with width³). For run-time estimates."""
    keep = [k for k in kinds if not _over_budget(spec, k, max_bytes)]
    rows = {"patch": spec.out_positions, "channel": spec.in_positions}
    work = sum(rows[k] * _dim(spec, k) ** 2 for k in keep)
    return work, max((_dim(spec, k) for k in keep), default=0)


def _over_budget(spec, kind: str, max_bytes: int) -> bool:
    """Whether the ``kind`` second moment of ``spec``'s input (float64) exceeds ``max_bytes``."""
    return _dim(spec, kind) ** 2 * 8 > max_bytes


def _dim(spec, kind: str) -> int:
    if kind == "channel" or spec.kind == "linear":
        return spec.in_ch
    return spec.in_ch * spec.kernel[0] * spec.kernel[1]


def _rows(x: torch.Tensor, mod: nn.Module, kind: str) -> torch.Tensor:
    """The vectors whose second moment is wanted, one per row."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if kind == "channel":
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    pad = mod.padding
    if isinstance(pad, str):
        raise ValueError(f"padding={pad!r} convs are not supported by the activation fit")
    cols = F.unfold(x, mod.kernel_size, mod.dilation, pad, mod.stride)  # B × C·k × L
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class _Moment:
    """A streaming ``Σ aᵀ b`` over row blocks and its mean. Float32 activations are summed in
    float32 (2–2.4× faster than float64 on this CPU; with the fits' 1e-2 damping the ~1e-5
    relative rounding of a few hundred thousand rows is immaterial), float64 ones in float64;
    the mean is float64. A second moment (``a is b``) of width ≥ 2·:data:`SYM_BLOCK` sums only
    its upper block triangle (0.56–0.75 of the products) and is mirrored once, in :meth:`mean`."""

    def __init__(self):
        self.sum: torch.Tensor | None = None
        self.rows = 0
        self.upper = False  # only the upper block triangle of ``sum`` is summed

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        symmetric = a is b
        if a.dtype != torch.float64:
            a, b = a.float(), b.float()
        if symmetric and a.shape[1] >= 2 * SYM_BLOCK:
            self._add_upper(a)
        elif self.sum is None:
            self.sum = a.T @ b
        else:
            self.sum.addmm_(a.T, b)
        self.rows += a.shape[0]

    def _add_upper(self, a: torch.Tensor) -> None:
        d = a.shape[1]
        if self.sum is None:
            self.sum, self.upper = a.new_zeros(d, d), True
        step = -(-d // (d // SYM_BLOCK))  # equal blocks of about SYM_BLOCK columns
        for i in range(0, d, step):
            self.sum[i:i + step, i:].addmm_(a[:, i:i + step].T, a[:, i:])

    def mean(self) -> torch.Tensor | None:
        if self.sum is None or not self.rows:
            return None
        total = self.sum.to(torch.float64)
        if self.upper:  # the diagonal blocks are whole; the lower triangle is the upper's mirror
            total = total.triu() + total.triu(1).T
        return (total / self.rows).cpu()


def _not_called(name: str) -> RuntimeError:
    return RuntimeError(f"layer {name!r} was not called in the forward pass")


def _run(model: nn.Module, batches, handles, outputs: list | None = None) -> None:
    """The batches through ``model`` in eval mode (its outputs, as float32, appended to
    ``outputs`` when given); the hooks ``handles`` are removed after."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for x, _ in batches:
            y = model(x.to(device))
            if outputs is not None:
                outputs.append(y.float())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


@torch.no_grad()
def augmented_input_moments(model: nn.Module, layers: dict[str, nn.Module], batches
                            ) -> dict[str, torch.Tensor]:
    """Per named layer, ``A = E[[h; 1][h; 1]ᵀ]`` of its input channels ``h`` over ``batches``
    (every position of a conv; float64; the last index is the constant), the second moment the
    interpolative fit (factorizations.interp) works from."""
    sums = {name: _Moment() for name in layers}

    def hook(name):
        def record(mod, args):
            rows = _rows(args[0], mod, "channel").to(torch.float64)
            aug = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
            sums[name].add(aug, aug)
        return record

    _run(model, batches, [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()])
    out = {}
    for name, moment in sums.items():
        a = moment.mean()
        if a is None:
            raise _not_called(name)
        out[name] = a
    return out


@torch.no_grad()
def collect_input_stats(model: nn.Module, batches, plan: Plan, *, max_bytes: int = MAX_BYTES,
                        damping: float = DAMPING) -> tuple[dict[str, LayerStats], dict[str, str]]:
    """One pass over ``batches`` ((x, y) pairs). Returns ``(stats, skipped)``: a
    :class:`LayerStats` per planned layer that got any statistics, and per layer a reason for
    what was left out (over ``max_bytes``, or a method with no activation fit)."""
    want = needs(plan)
    skipped = {lp.name: no_fit_note(lp.factorization) for lp in plan.layers
               if lp.name not in want}
    stats, over = collect_layer_stats(model, batches, {lp.name: lp.spec for lp in plan.layers},
                                      want, max_bytes=max_bytes, damping=damping)
    return stats, {**skipped, **over}


@torch.no_grad()
def collect_layer_stats(model: nn.Module, batches, specs: dict, want: dict[str, tuple[str, ...]],
                        *, max_bytes: int = MAX_BYTES, damping: float = DAMPING,
                        outputs: list | None = None
                        ) -> tuple[dict[str, LayerStats], dict[str, str]]:
    """One pass over ``batches``: the second moments ``want[name]`` (kinds) of each layer's input
    (``specs[name]`` its :class:`LayerSpec`). Returns ``(stats, skipped)``, ``skipped`` naming
    the moments left out for being over ``max_bytes``. ``outputs``: a list that receives the
    model's output on each batch (float32), which the pass computes anyway."""
    skipped: dict[str, str] = {}
    acc: dict[str, dict] = {}
    for name, kinds in want.items():
        keep = []
        for kind in kinds:
            if _over_budget(specs[name], kind, max_bytes):
                d = _dim(specs[name], kind)
                then = ("core fitted as if the taps were uncorrelated" if keep
                        else "weight fit")
                skipped[name] = (f"{kind} second moment {d}×{d} is over the "
                                 f"{max_bytes / 2**20:.0f} MiB budget: {then}")
            else:
                keep.append(kind)
        if keep:
            acc[name] = {k: _Moment() for k in keep}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach()
            for kind, moment in acc[name].items():
                rows = _rows(x, mod, kind)
                moment.add(rows, rows)
        return fn

    _run(model, batches, [model.get_submodule(n).register_forward_pre_hook(hook(n))
                          for n in acc], outputs)
    stats = {}
    for name, a in acc.items():
        st = LayerStats(damping=damping)
        for kind, moment in a.items():
            if moment.rows:
                setattr(st, kind, moment.mean())
                st.rows = max(st.rows, moment.rows)
        stats[name] = st
    return stats, skipped


@torch.no_grad()
def output_errors(model: nn.Module, batches, chains: dict[str, dict[str, nn.Module]]
                  ) -> dict[str, dict[str, float]]:
    """``{layer: {fit: ‖y − ŷ‖_F / ‖y‖_F}}`` over ``batches``, ``y`` the dense layer's output in
    ``model`` and ``ŷ`` that of ``chains[fit][layer]`` on the same input."""
    device = next(model.parameters()).device
    names = sorted({n for per in chains.values() for n in per})
    num = {n: {fit: 0.0 for fit in chains if n in chains[fit]} for n in names}
    den = dict.fromkeys(names, 0.0)

    def hook(name):
        def fn(mod, args, out):
            y = out.detach().double()
            den[name] += float(y.square().sum())
            for fit in num[name]:
                chain = chains[fit][name].to(device)
                yh = chain(args[0].detach()).double()
                num[name][fit] += float((y - yh).square().sum())
        return fn

    _run(model, batches, [model.get_submodule(n).register_forward_hook(hook(n)) for n in names])
    return {n: {fit: (v / den[n]) ** 0.5 if den[n] > 0 else 0.0 for fit, v in num[n].items()}
            for n in names}


def fit_report(source: nn.Module, student: nn.Module, plan: Plan, batches, results,
               skipped: dict[str, str], kind: str = "activation") -> dict:
    """The decompose stage's report of an activation-aware fit: per layer the fit used and the
    relative output error on the calibration inputs of that fit and of the weight fit."""
    from lrcompress.factorizations import get_factorization

    weight_chains = {}
    with torch.no_grad():
        for lp in plan.layers:
            mod = source.get_submodule(lp.name)
            weight_chains[lp.name] = get_factorization(lp.factorization).from_weight(
                mod.weight, mod.bias, lp.spec, lp.rank)
    fitted = {lp.name: student.get_submodule(lp.name) for lp in plan.layers}
    errs = output_errors(source, batches, {"fitted": fitted, "weight": weight_chains})
    used = {r.name: r.fit for r in results}
    return {"kind": kind, "damping": DAMPING, "max_bytes": MAX_BYTES,
            "layers": {n: {"fit": used.get(n, "weight"), "output_error": e["fitted"],
                           "output_error_weight_fit": e["weight"],
                           **({"note": skipped[n]} if n in skipped else {})}
                       for n, e in errs.items()}}


class _Captured(Exception):
    """Stops a forward pass once the hooked layer's input is captured (nothing after it is
    needed)."""


class ReferenceInputs:
    """The original model's input to each of ``names`` (in forward order) on each of
    ``batches``, for the sequential fit's cross moments. One forward of the original per batch
    captures a *window* of the next layers whose inputs, over all batches, fit ``max_bytes``
    (at least one layer), and stops after the window's last layer; a layer past the window
    starts the next window. At 28×28 every layer fits one window: one forward per batch
    instead of one per layer and batch. ``forwards`` counts the forwards run."""

    def __init__(self, model: nn.Module, batches, names: list[str],
                 max_bytes: int = WINDOW_BYTES):
        self.model, self.batches, self.names, self.max_bytes = model, batches, names, max_bytes
        self.window: dict[str, list[torch.Tensor]] = {}
        self.forwards = 0

    def get(self, name: str, b: int) -> torch.Tensor:
        """The original's input to layer ``name`` on batch ``b``."""
        if name not in self.window:
            self.window = {}  # release the previous window first
            self.window = self._fill(self.names[self.names.index(name):])
        return self.window[name][b]

    @torch.no_grad()
    def _fill(self, names: list[str]) -> dict[str, list[torch.Tensor]]:
        window: list[str] | None = None  # fixed by the first batch
        out: dict[str, list[torch.Tensor]] = {}
        for x, _ in self.batches:
            seen = self._capture(x, names if window is None else window, window is None)
            if window is None:
                window = [n for n in names if n in seen]
                if not window:
                    raise _not_called(names[0])
            for n in window:
                out.setdefault(n, []).append(seen[n])
        return out

    def _capture(self, x: torch.Tensor, names: list[str], sizing: bool) -> dict:
        """One forward of the original on ``x``: the inputs of ``names`` (:func:`_capture_inputs`),
        within the budget while the window is being sized."""
        self.forwards += 1
        budget = self.max_bytes // len(self.batches) if sizing else None
        return _capture_inputs(self.model, x.to(next(self.model.parameters()).device), names,
                              budget)


@torch.no_grad()
def collect_paired_stats(original: nn.Module, current: nn.Module, batches, name: str, spec,
                         kinds: tuple[str, ...], *, max_bytes: int = MAX_BYTES,
                         damping: float = DAMPING, reference: ReferenceInputs | None = None
                         ) -> tuple[LayerStats | None, str | None]:
    """The sequential fit's statistics of layer ``name``: the second moments ``kinds`` of its
    input in ``current`` (the model whose earlier layers are already compressed) and, when the
    patch moment fits ``max_bytes``, the cross moment ``E[p p̃ᵀ]`` with its input ``p`` in
    ``original`` on the same batch (from ``reference`` when given: its windows of captured
    inputs; else one forward of ``original`` per batch, stopped at the layer). Returns
    ``(stats, note)``, ``note`` saying what was left out."""
    keep = [k for k in kinds if not _over_budget(spec, k, max_bytes)]
    note = None if keep == list(kinds) else (
        f"{', '.join(k for k in kinds if k not in keep)} second moment over the "
        f"{max_bytes / 2**20:.0f} MiB budget")
    if not keep:
        return None, note
    device = next(current.parameters()).device
    mod, ref = current.get_submodule(name), original.get_submodule(name)
    acc = {k: _Moment() for k in keep}
    cross = _Moment() if "patch" in keep else None
    for b, (x, _) in enumerate(batches):
        x = x.to(device)
        inp = _layer_input(current, name, x)
        mine = {k: _rows(inp, mod, k) for k in keep}
        for k in keep:
            acc[k].add(mine[k], mine[k])
        if cross is not None:
            theirs = (reference.get(name, b) if reference is not None
                      else _layer_input(original, name, x))
            cross.add(_rows(theirs, ref, "patch"), mine["patch"])
    st = LayerStats(damping=damping)
    for k in keep:
        setattr(st, k, acc[k].mean())
    if cross is not None:
        st.cross = cross.mean()
    st.rows = max(m.rows for m in acc.values())
    return st, note


def _layer_input(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The input of ``model``'s layer ``name`` on ``x`` (the forward stops there)."""
    got = _capture_inputs(model, x, [name])
    if not got:
        raise _not_called(name)
    return got[name]


def _capture_inputs(model: nn.Module, x: torch.Tensor, names: list[str],
                   max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """One forward of ``model`` (in eval mode) on ``x``: the first input of each of ``names``
    (a module called twice keeps its first), the forward stopped once all are captured or
    (``max_bytes``) once the next one would take the captured inputs over it (the first is
    always kept). Layers not reached are absent."""
    seen: dict[str, torch.Tensor] = {}
    size = 0

    def hook(name):
        def fn(_mod, args):
            nonlocal size
            if name in seen:
                return
            t = args[0].detach()
            if max_bytes is not None:
                size += t.numel() * t.element_size()
                if seen and size > max_bytes:
                    raise _Captured
            seen[name] = t
            if len(seen) == len(names):
                raise _Captured
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        model(x)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen
