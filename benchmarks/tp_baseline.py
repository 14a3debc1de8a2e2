"""The Torch-Pruning baseline: structured channel pruning to a MACs target, then the same
fine-tuning budget as an lrcompress run.

    python benchmarks/tp_baseline.py resnet18_fmnist.pt --arch timm:resnet18 --input-size 1,28,28 \\
        --target-flops 0.5 --data fashionmnist:/usr/share/datasets/fashion-mnist \\
        -o runs/tp-r18-50 --max-steps 200

Pruning (the ``torch-pruning`` package, a benchmark-only dependency: ``pip install -e '.[bench]'``):
``torch_pruning.pruner.BasePruner`` on the dependency graph of the model, with group-magnitude
importance (``GroupMagnitudeImportance``, L2 by default: the group-norm criterion of DepGraph,
Fang et al. 2023), the classifier kept whole, channel counts rounded to ``--round-to`` (8, like
lrcompress's ``--rank-multiple``). ``--scope global`` (the default) ranks all channel groups of
the model together, so layers lose different shares; ``local`` cuts every group by the same
ratio. With rounding to 8, local pruning moves every layer in lock-step and lands well under the
target (resnet18: 0.483 for 0.5, 0.274 for 0.3), which would handicap the baseline; global lands
within about 1 % of it. The ratio is solved by bisection so that the pruned model's
MACs, counted by torch's ``FlopCounterMode``
(``lrcompress.measure.metrics.independent_macs``), are at most the target and as close to it
as the rounding allows.

Fine-tuning reuses ``lrcompress.recover.finetune.distill`` with the very flags of ``lrcompress
search`` (steps, optimizer, learning rate and schedule, batch, logit KD, clipping), so the budget
is identical. One difference is forced: RENE's layer matching (weights and layer outputs, λ) needs
the student's layers to have the teacher's shapes, which pruning changes, so λ is 0 here and the
loss is CE + logit KD. The data split, test subset and seed are lrcompress's own.

RUN/ gets ``model.safetensors`` (pruned weights; the pruned channel counts in its header, reloaded
by :func:`load_pruned` without pickle), ``model.onnx`` (dynamic batch, checked against PyTorch in
ONNX Runtime) and ``report.json`` (the same keys as an lrcompress report where they mean the same;
``accuracy.pruned`` is the model after pruning, before fine-tuning).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import click
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrcompress import __version__  # noqa: E402
from lrcompress.cli import finetune_config, finetune_options, model_options, parse_floats  # noqa: E402
from lrcompress.commands.search import resolve_device  # noqa: E402
from lrcompress.data import DataConfig, build_loaders, parse_data_spec, resolve_preprocess  # noqa: E402,E501
from lrcompress.deploy.onnx import check_parity, export_onnx  # noqa: E402
from lrcompress.errors import LrcError, TargetError, UserError  # noqa: E402
from lrcompress.measure.metrics import evaluate, independent_macs, param_count  # noqa: E402
from lrcompress.model.arch import build, io_layers, load_state_dict_strict, parse_arch  # noqa: E402
from lrcompress.model.loading import load_model  # noqa: E402
from lrcompress.model.plan import Plan  # noqa: E402
from lrcompress.recover.finetune import distill  # noqa: E402
from lrcompress.util.io import atomic_path, write_json  # noqa: E402

log = logging.getLogger("tp_baseline")
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features",
               "out_features", "num_heads", "head_dim", "attn_dim", "normalized_shape")
META_KEY = "tp_baseline.shapes"


def _import_tp():
    try:
        import torch_pruning as tp
    except ImportError as e:
        raise UserError("The Torch-Pruning baseline needs the torch-pruning package, a "
                        "benchmark-only dependency: pip install -e '.[bench]' (or pip install "
                        "torch-pruning).") from e
    return tp


def classifier_name(model: nn.Module) -> str:
    _, head = io_layers(model)
    if head is None:
        raise UserError("Cannot find the model's classifier (no timm pretrained_cfg and no "
                        "nn.Linear): Torch-Pruning must keep its outputs whole.")
    return head


def attention_heads(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """The multi-head attention blocks of ``model`` (timm's ``Attention``: a fused ``qkv``
    Linear and integer ``num_heads`` / ``head_dim``), keyed by their qkv layer."""
    return {m.qkv: m for m in model.modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int)
            and isinstance(getattr(m, "head_dim", None), int)}


def _sync_attention(attn: dict[nn.Module, nn.Module], num_heads: dict) -> None:
    """After pruning, an attention block's head count and head width follow its qkv layer (the
    fused and the eager paths then scale logits alike, by the new head width)."""
    for qkv, m in attn.items():
        m.num_heads = num_heads[qkv]
        m.head_dim = qkv.out_features // (3 * m.num_heads)
        _set_head_dim(m, m.head_dim)


def _set_head_dim(m: nn.Module, head_dim: int) -> None:
    if hasattr(m, "attn_dim"):
        m.attn_dim = m.num_heads * head_dim
    if isinstance(getattr(m, "scale", None), float):
        m.scale = head_dim ** -0.5


def prune_once(model: nn.Module, input_size, ratio: float, *, importance: str = "l2",
               scope: str = "global", round_to: int | None = 8) -> nn.Module:
    """A pruned copy of ``model``: every prunable channel group cut by ``ratio`` (local scope) or
    the least important groups of the whole model (global scope). In attention blocks the
    width of every head is pruned alike (Torch-Pruning's ``num_heads``), and the token width
    (embedding, class token, position embedding) with the rest of its group."""
    tp = _import_tp()
    m = copy.deepcopy(model).cpu().eval()
    imp = tp.importance.GroupMagnitudeImportance(p=2 if importance == "l2" else 1)
    attn = attention_heads(m)
    pruner = tp.pruner.BasePruner(
        m, torch.randn(1, *input_size), importance=imp, pruning_ratio=ratio,
        global_pruning=scope == "global", ignored_layers=[m.get_submodule(classifier_name(m))],
        round_to=round_to, num_heads={qkv: a.num_heads for qkv, a in attn.items()})
    pruner.step()
    _sync_attention(attn, pruner.num_heads)
    return m


def prune_to_macs(model: nn.Module, input_size, target: float, *, importance: str = "l2",
                  scope: str = "global", round_to: int | None = 8, max_ratio: float = 0.9,
                  iters: int = 16) -> tuple[nn.Module, dict]:
    """Bisection on the pruning ratio: the least-pruned model whose FlopCounterMode MACs are
    at most ``target`` × the original's. Returns (pruned model, record of the search)."""
    base = independent_macs(model, input_size)
    budget = target * base
    trials = []

    def trial(ratio):
        m = prune_once(model, input_size, ratio, importance=importance, scope=scope,
                       round_to=round_to)
        macs = independent_macs(m, input_size)
        trials.append({"ratio": round(ratio, 6), "macs": macs, "macs_ratio": macs / base})
        return m, macs

    # MACs fall with the ratio only up to a point: with rounding, a layer whose channels round
    # to 0 is skipped by Torch-Pruning and keeps them all. So scan up in steps of 0.1 to the
    # first ratio that meets the budget, then bisect below it.
    lo, best = 0.0, None
    for k in range(1, round(max_ratio * 10) + 1):
        m, mm = trial(k / 10)
        if mm <= budget:
            hi, best, macs, best_ratio = k / 10, m, mm, k / 10
            break
        lo = k / 10
    if best is None:
        raise TargetError(f"Torch-Pruning cannot reach {target} of the MACs with pruning ratios "
                          f"up to {max_ratio} (least: {min(t['macs_ratio'] for t in trials):.3f};"
                          " the classifier is kept whole).")
    for _ in range(iters):
        if best_macs_close(macs, budget) or hi - lo < 1e-4:
            break
        mid = (lo + hi) / 2
        m, mm = trial(mid)
        if mm <= budget:
            hi, best, macs, best_ratio = mid, m, mm, mid
        else:
            lo = mid
    info = {"pruning_ratio": best_ratio, "importance": f"GroupMagnitudeImportance(p="
            f"{2 if importance == 'l2' else 1})", "scope": scope, "round_to": round_to,
            "ignored_layers": [classifier_name(model)], "macs_before": base, "macs_after": macs,
            "macs_ratio": macs / base, "trials": trials}
    return best, info


def hidden_narrower(keep: float, calib_batches: int = 8, round_to: int = 8):
    """A ``prune`` for :func:`run`: every inverted-residual block's hidden width narrowed to
    ``keep`` by lrcompress's interpolative-decomposition fit (lrcompress.model.narrow), on the
    first ``calib_batches`` batches of the calibration split."""
    from lrcompress.model.narrow import narrow_hidden

    def prune(model, input_size, target, loaders):
        batches = [x for x, _ in itertools.islice(loaders.calib, calib_batches)]
        narrowed, blocks = narrow_hidden(model, batches, keep, multiple=round_to)
        if not blocks:
            raise UserError("--narrow-hidden found no block whose hidden width it can narrow "
                            "(inverted-residual blocks without squeeze-excitation).")
        base, macs = independent_macs(model, input_size), independent_macs(narrowed, input_size)
        return narrowed, {"keep": keep, "round_to": round_to, "calib_batches": len(batches),
                          "macs_before": base, "macs_after": macs, "macs_ratio": macs / base,
                          "blocks": [asdict(b) for b in blocks]}
    return prune


def best_macs_close(macs: int, budget: float, rel: float = 0.002) -> bool:
    """Close enough: within 0.2 % of the budget (channel rounding makes MACs a step function)."""
    return budget - macs <= rel * budget


def _shapes(model: nn.Module) -> dict:
    out = {}
    for name, m in model.named_modules():
        attrs = {a: _shape_value(getattr(m, a, None)) for a in SHAPE_ATTRS}
        attrs = {a: v for a, v in attrs.items() if v is not None}
        if attrs:
            out[name] = attrs
    return out


def _shape_value(v):
    """An int, or a tuple of ints as a list (LayerNorm's normalized_shape); else None."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, tuple) and v and all(isinstance(x, int) for x in v):
        return list(v)
    return None


def save_pruned(model: nn.Module, arch: str, num_classes: int, in_chans: int, path) -> Path:
    """Weights to safetensors; the architecture and every pruned module's channel counts in the
    header, so :func:`load_pruned` rebuilds the model without pickle."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {META_KEY: json.dumps(_shapes(model)), "tp_baseline.arch": arch,
            "tp_baseline.num_classes": str(num_classes), "tp_baseline.in_chans": str(in_chans),
            "format": "pt"}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=meta)
    return path


def load_pruned(path) -> nn.Module:
    """Rebuild a model written by :func:`save_pruned`: the dense architecture, resized to the
    saved channel counts, then the weights loaded strictly."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if META_KEY not in meta:
        raise UserError(f"{path} was not written by tp_baseline.save_pruned (no {META_KEY} in "
                        "its header).")
    model = build(parse_arch(meta["tp_baseline.arch"]), int(meta["tp_baseline.num_classes"]),
                  int(meta["tp_baseline.in_chans"]))
    for name, attrs in json.loads(meta[META_KEY]).items():
        mod = model.get_submodule(name)
        for a, v in attrs.items():
            setattr(mod, a, tuple(v) if isinstance(v, list) else v)
        if "head_dim" in attrs:
            _set_head_dim(mod, attrs["head_dim"])
    for key, t in sd.items():
        mod_name, _, pname = key.rpartition(".")
        mod = model.get_submodule(mod_name)
        if pname in mod._parameters:
            mod._parameters[pname] = nn.Parameter(torch.empty_like(t))
        elif pname in mod._buffers:
            mod._buffers[pname] = torch.empty_like(t)
    load_state_dict_strict(model, sd, f"the pruned {meta['tp_baseline.arch']}")
    return model.eval()


def run(model_spec: str, data_spec: str, out_dir, *, target: float, arch=None,
        input_size=None, mean=None, std=None, finetune=None, data: DataConfig | None = None,
        device: str = "auto", seed: int = 0, importance: str = "l2", scope: str = "global",
        round_to: int | None = 8, overwrite: bool = False, command=None, prune=None,
        kind: str = "torch-pruning") -> dict:
    """Prune, evaluate, fine-tune, evaluate, save and export; returns the report.

    ``prune(model, input_size, target, loaders) -> (smaller model, record)`` replaces
    Torch-Pruning (another way of shrinking the model, fine-tuned and saved the same way; the
    record needs ``macs_before``), and ``kind`` names it in the report."""
    data = data or DataConfig()
    out = Path(out_dir)
    if (out / "report.json").exists() and not overwrite:
        raise UserError(f"{out} already holds a finished result. Pass --overwrite to run it "
                        "again, or choose another -o.")
    times: dict[str, float] = {}
    t = time.perf_counter()
    dev = resolve_device(device)
    torch.manual_seed(seed)
    lm = load_model(model_spec, arch=arch)
    model, info = lm.model.eval(), lm.info
    dspec = parse_data_spec(data_spec)
    pre = resolve_preprocess(model, dspec, input_size=input_size, mean=mean, std=std,
                             in_chans=info.in_chans)
    loaders = build_loaders(dspec, pre, data, num_classes=info.num_classes)
    times["load"] = time.perf_counter() - t

    t = time.perf_counter()
    acc_orig = evaluate(model.to(dev), loaders.test, dev)
    times["eval_original"] = time.perf_counter() - t

    t = time.perf_counter()
    if prune is None:
        student, prune_info = prune_to_macs(model.cpu(), pre.input_size, target,
                                            importance=importance, scope=scope,
                                            round_to=round_to)
    else:
        student, prune_info = prune(model.cpu(), pre.input_size, target, loaders)
    times["prune"] = time.perf_counter() - t
    t = time.perf_counter()
    acc_pruned = evaluate(student.to(dev), loaders.test, dev)
    times["eval_pruned"] = time.perf_counter() - t

    accuracy = {"original": acc_orig.to_dict(), "pruned": acc_pruned.to_dict()}
    ft_report = None
    if finetune is not None and finetune.enabled:
        t = time.perf_counter()
        empty = Plan(info.arch, info.num_classes, info.in_chans, tuple(pre.input_size), (),
                     prune_info["macs_before"], param_count(model))
        ft = distill(student, model.to(dev), empty, loaders, finetune, dev, seed=seed)
        times["finetune"] = time.perf_counter() - t
        t = time.perf_counter()
        accuracy["finetuned"] = evaluate(student, loaders.test, dev).to_dict()
        times["eval_finetuned"] = time.perf_counter() - t
        ft_report = {"config": ft.config, "history": ft.history, "best_epoch": ft.best_epoch,
                     "steps": ft.steps}

    t = time.perf_counter()
    student = student.cpu().eval()
    macs = independent_macs(student, pre.input_size)
    params, base_params = param_count(student), param_count(model)
    out.mkdir(parents=True, exist_ok=True)
    save_pruned(student, info.arch, info.num_classes, info.in_chans, out / "model.safetensors")
    reloaded = load_pruned(out / "model.safetensors")
    x = next(iter(loaders.test))[0][:16].cpu()
    with torch.no_grad():
        if not torch.equal(student(x), reloaded(x)):
            raise LrcError(f"{out}/model.safetensors does not reload to the same outputs.")
    proto = export_onnx(student, pre.input_size, dynamic_batch=True)
    onnx_bytes = proto.SerializeToString()
    parity = check_parity(student, onnx_bytes, x, dynamic_batch=True,
                          source="test images").to_dict()
    with atomic_path(out / "model.onnx") as tmp:
        tmp.write_bytes(onnx_bytes)
    times["save_export"] = time.perf_counter() - t

    report = {
        "schema": 1, "kind": kind, "command": command or sys.argv,
        "seed": seed, "model": {"source": info.source, "arch": info.arch,
                                "num_classes": info.num_classes, "in_chans": info.in_chans,
                                "input_size": list(pre.input_size)},
        "data": {"spec": data_spec, "test_samples": acc_orig.n, "config": asdict(data)},
        "target": None if target is None else {"kind": "flops", "ratio": target},
        "totals": {"macs_before": prune_info["macs_before"], "macs_after": macs,
                   "macs_ratio": macs / prune_info["macs_before"], "params_before": base_params,
                   "params_after": params, "params_ratio": params / base_params,
                   "macs_counted_by": "torch.utils.flop_counter.FlopCounterMode"},
        "accuracy": accuracy, "finetune": ft_report, "pruning": prune_info,
        "onnx": {"bytes": len(onnx_bytes), "dynamic_batch": True, "parity": parity},
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torch_pruning": _import_tp().__version__, "lrcompress": __version__,
                     "device": str(dev)},
    }
    write_json(out / "report.json", report)
    return report


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@model_options
@click.option("--target-flops", type=float,
              help="Keep at most this fraction of the model's MACs, 0 < R < 1 (Torch-Pruning; "
              "required unless --narrow-hidden).")
@click.option("--narrow-hidden", type=float, default=None,
              help="Instead of Torch-Pruning: narrow every inverted-residual block's hidden "
              "width to this fraction (0 < K < 1) by lrcompress's interpolative-decomposition "
              "fit on the calibration split, then fine-tune the same way.")
@click.option("--data", "data_spec", required=True,
              help="The data spec of `lrcompress search` (e.g. fashionmnist:ROOT).")
@click.option("-o", "--output", "out", required=True, help="Run directory to write.")
@click.option("--importance", default="l2", show_default=True, type=click.Choice(["l2", "l1"]),
              help="Group-magnitude importance norm (l2: group norm).")
@click.option("--scope", default="global", show_default=True,
              type=click.Choice(["local", "global"]),
              help="local: one ratio for every layer group; global: rank all groups together.")
@click.option("--round-to", default=8, show_default=True, type=click.IntRange(min=1),
              help="Channel counts are multiples of this (lrcompress's --rank-multiple).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--calib-fraction", default=0.1, show_default=True, type=float)
@click.option("--test-subset", type=click.IntRange(min=1),
              help="Evaluate on the first N test images only.")
@click.option("--train-subset", type=click.IntRange(min=1),
              help="Fine-tune on the first N training images only (seeded).")
@click.option("--mean", help="Normalisation mean, comma-separated (default: the model's).")
@click.option("--std", help="Normalisation std, comma-separated (default: the model's).")
@finetune_options
@click.option("--overwrite", is_flag=True, help="Replace a finished result in RUN.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def main(ctx, model, arch, num_classes, in_chans, trust_pickle, input_size, target_flops,
         narrow_hidden, data_spec, out, importance, scope, round_to, seed, device, batch_size,
         calib_fraction,
         test_subset, train_subset, mean, std, overwrite, as_json, **finetune_kw):
    """Torch-Pruning baseline: prune MODEL to a MACs target, fine-tune as lrcompress does.

    The fine-tuning flags are those of `lrcompress search`, with the same defaults; --diss-weight
    (layer matching) cannot apply to a pruned model and is 0.

    \b
    Example:
      python benchmarks/tp_baseline.py resnet18_fmnist.pt --arch timm:resnet18 \\
          --input-size 1,28,28 --target-flops 0.5 --max-steps 200 \\
          --data fashionmnist:/usr/share/datasets/fashion-mnist -o runs/tp-r18-50
    """
    if ctx.get_parameter_source("lam") == click.core.ParameterSource.COMMANDLINE and \
            finetune_kw["lam"] != 0:
        raise click.BadParameter("layer matching needs the teacher's layer shapes, which "
                                 "pruning changes: leave --diss-weight out (it is 0 here).",
                                 param_hint="--diss-weight")
    if num_classes or in_chans or trust_pickle:
        raise click.UsageError("--num-classes, --in-chans and --trust-pickle are not supported "
                               "here: give a plain state_dict checkpoint and --arch.")
    prune, kind = None, "torch-pruning"
    if narrow_hidden is not None:
        if target_flops is not None:
            raise click.UsageError("--narrow-hidden sets the width itself: leave --target-flops "
                                   "out (the report gives the MACs ratio it reaches).")
        if not 0 < narrow_hidden < 1:
            raise click.BadParameter(f"{narrow_hidden} must be strictly between 0 and 1.",
                                     param_hint="--narrow-hidden")
        prune, kind = hidden_narrower(narrow_hidden, round_to=round_to), "hidden-id"
    elif target_flops is None:
        raise click.UsageError("Give --target-flops (or --narrow-hidden).")
    if target_flops is not None and not 0 < target_flops < 1:
        raise click.BadParameter(f"{target_flops} must be strictly between 0 and 1.",
                                 param_hint="--target-flops")
    ft = replace(finetune_config(finetune_kw), lam=0.0)
    data = DataConfig(batch_size=batch_size, calib_fraction=calib_fraction, seed=seed,
                      test_subset=test_subset, train_subset=train_subset)
    report = run(model, data_spec, out, target=target_flops, arch=arch, input_size=input_size,
                 mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"), finetune=ft,
                 data=data, device=device, seed=seed, importance=importance, scope=scope,
                 round_to=round_to, overwrite=overwrite, command=sys.argv, prune=prune,
                 kind=kind)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        acc = report["accuracy"]
        after = acc.get("finetuned", acc["pruned"])["top1"]
        how = report["pruning"].get("pruning_ratio", report["pruning"].get("keep"))
        click.echo(f"MACs ratio {report['totals']['macs_ratio']:.4f} ({kind} "
                   f"{how:.4f}); top-1 original "
                   f"{acc['original']['top1']:.2f}, pruned {acc['pruned']['top1']:.2f}, "
                   f"final {after:.2f}; wrote {out}")


def cli(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        main.main(args=argv, prog_name="tp_baseline.py", standalone_mode=False)
    except click.exceptions.Abort:
        return 130
    except click.ClickException as e:
        e.show()
        return 2
    except LrcError as e:
        click.echo(f"Error: {e}", err=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(cli())
