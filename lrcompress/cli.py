"""Command-line interface: parse options, call ONE library function, render the result.

Exit codes: 0 success, 1 a failed gate, 2 bad input or usage, 3 an internal error.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import traceback

import click

from . import __version__
from .errors import EXIT_INTERNAL, LrcError, UserError

log = logging.getLogger("lrcompress")


class _Group(click.Group):
    """Maps lrcompress errors to exit codes and one-paragraph messages (tracebacks only --debug)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LrcError as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"Error: {e}", err=True)
            sys.exit(e.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the last line of defence: exit 3, not a crash
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"Internal error ({type(e).__name__}: {e}). This is a bug in lrcompress: "
                       "re-run with --debug and report the traceback.", err=True)
            sys.exit(EXIT_INTERNAL)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lrcompress")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.pass_context
def main(ctx, debug, verbose):
    """Compress pretrained image models by low-rank factorization.

    \b
    Typical flow:
      lrcompress inspect resnet18.pt --input-size 1,28,28
      lrcompress search resnet18.pt --decomp tt --target-flops 0.3 \\
          --data fashionmnist:/usr/share/datasets/fashion-mnist -o runs/r18
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


# ------------------------------------------------------------------ shared option groups


def _parse_input_size(value):
    if value is None:
        return None
    try:
        parts = tuple(int(p) for p in value.replace("x", ",").split(","))
        if len(parts) != 3 or min(parts) < 1:
            raise ValueError
        return parts
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: write C,H,W with positive integers, e.g. 1,28,28.") from None


def model_options(f):
    @click.option("--arch", help="Architecture, e.g. timm:resnet18 or torchvision:resnet18 "
                  "(default: from the file name). Arguments: timm:NAME(img_size=28).")
    @click.option("--num-classes", type=click.IntRange(min=1),
                  help="Classes (default: read from the checkpoint).")
    @click.option("--in-chans", type=click.IntRange(min=1),
                  help="Input channels (default: read from the checkpoint).")
    @click.option("--trust-pickle", is_flag=True,
                  help="Allow a .pt holding arbitrary pickled objects. This runs code from the "
                  "file: only for files you trust.")
    @click.option("--input-size", callback=lambda c, p, v: _parse_input_size(v),
                  help="Input C,H,W (default: the model's own, or the dataset's).")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def finetune_options(f):
    """Fine-tuning flags -> a FinetuneConfig under the key ``finetune``."""
    opts = [
        click.option("--finetune-epochs", "epochs", default=0, show_default=True,
                     type=click.IntRange(min=0), help="Distillation fine-tuning epochs (0: none)."),
        click.option("--max-steps", type=click.IntRange(min=1),
                     help="Fine-tuning step budget (stops mid-epoch); CPU-sized runs."),
        click.option("--lr", default=0.01, show_default=True, type=float,
                     help="Fine-tuning learning rate (cosine decay)."),
        click.option("--optimizer", default="sgd", show_default=True,
                     type=click.Choice(["sgd", "adamw"]), help="sgd = SGD-Nesterov, momentum 0.9."),
        click.option("--weight-decay", default=0.0, show_default=True, type=float),
        click.option("--warmup-steps", default=0, show_default=True, type=click.IntRange(min=0)),
        click.option("--diss-weight", "lam", default=0.5, show_default=True, type=float,
                     help="λ of RENE's distillation term (weights + layer outputs)."),
        click.option("--diss-reduction", default="mean", show_default=True,
                     type=click.Choice(["mean", "sum"]), help="sum = the paper's literal Eq. 10."),
        click.option("--kd", default=1.0, show_default=True, type=float,
                     help="Weight of logit distillation (KL at --kd-temperature; 0: off)."),
        click.option("--kd-temperature", default=4.0, show_default=True, type=float),
        click.option("--frobenius-decay", default=0.0, show_default=True, type=float,
                     help="Khodak's Frobenius decay on reconstructed weights (0: off)."),
        click.option("--orth", type=click.Choice(["dso", "so"]),
                     help="Orthogonality on factor matrices: dso (ELRT) or so."),
        click.option("--orth-weight", default=1e-3, show_default=True, type=float),
        click.option("--grad-clip", default=5.0, show_default=True, type=float,
                     help="Gradient-norm clip (0: off)."),
        click.option("--precision", default="auto", show_default=True,
                     type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
                     help="auto: bf16 autocast on CUDA, fp32 on CPU."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _finetune_config(kw: dict):
    from .finetune import FinetuneConfig

    keys = ("epochs", "max_steps", "lr", "optimizer", "weight_decay", "warmup_steps", "lam",
            "diss_reduction", "kd", "kd_temperature", "frobenius_decay", "orth", "orth_weight",
            "grad_clip", "precision")
    vals = {k: kw.pop(k) for k in keys}
    vals["grad_clip"] = vals["grad_clip"] or None
    return FinetuneConfig(**vals)


def _load(model, arch, num_classes, in_chans, trust_pickle, input_size=None):
    from pathlib import Path

    from .models import load_model

    if in_chans is None and input_size is not None and not Path(model).exists():
        in_chans = input_size[0]  # a bare architecture name: build it for the asked channels
    return load_model(model, arch=arch, num_classes=num_classes, in_chans=in_chans,
                      trust_pickle=trust_pickle)


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# ------------------------------------------------------------------ inspect


@main.command()
@click.argument("model")
@model_options
@click.option("--include", multiple=True, help="Only these layers (glob or re:REGEX); repeatable.")
@click.option("--exclude", multiple=True, help="Never these layers (glob or re:REGEX); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(model, arch, num_classes, in_chans, trust_pickle, input_size, include, exclude,
            as_json):
    """Per-layer census: shapes, MACs, params, and what factorizing could save.

    MODEL is a checkpoint (.safetensors, .pt/.pth/.bin), a RUN directory, or an architecture
    name such as timm:resnet18 (random weights).

    \b
    Examples:
      lrcompress inspect timm:resnet18 --input-size 1,28,28
      lrcompress inspect resnet18.pt --input-size 1,28,28 --json
      lrcompress inspect resnet18.safetensors --include 'layer3.*'
    """
    from .census import census
    from .models import default_input_size
    from .render import render_census

    lm = _load(model, arch, num_classes, in_chans, trust_pickle, input_size)
    size = input_size or lm.info.input_size or default_input_size(lm.model, lm.info.in_chans)
    if size[0] != lm.info.in_chans:
        raise UserError(f"--input-size has {size[0]} channels but the model takes "
                        f"{lm.info.in_chans}. Use --input-size "
                        f"{lm.info.in_chans},{size[1]},{size[2]}.")
    c = census(lm.model, lm.info.arch, size, include, exclude)
    if as_json:
        _emit_json(c.to_dict())
    else:
        render_census(c)


# ------------------------------------------------------------------ search


def _floats(value, name):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: write comma-separated numbers for {name}.") from None


@main.command()
@click.argument("model")
@model_options
@click.option("--decomp", default="tt", show_default=True,
              type=click.Choice(["svd", "tucker2", "tucker", "cp", "cp4", "tt", "auto"]),
              help="Factorization: tt (3-core TT), tucker2, cp (CP-3), cp4 (Lebedev), svd, or "
              "auto (the search picks one per layer; rene only).")
@click.option("--target-flops", type=float, help="Keep at most this fraction of the whole "
              "model's MACs, 0 < R < 1 (e.g. 0.3).")
@click.option("--target-params", type=float, help="Keep at most this fraction of the "
              "parameters, 0 < R < 1.")
@click.option("--method", default="rene", show_default=True,
              type=click.Choice(["rene", "uniform"]),
              help="Rank selection: rene (softmax rank search, budget-aware) or uniform "
              "(one rank ratio everywhere).")
@click.option("--data", "data_spec", required=True,
              help="fashionmnist:ROOT, mnist:ROOT, cifar10:ROOT, cifar100:ROOT, "
              "imagefolder:DIR or synthetic.")
@click.option("-o", "--output", "out", required=True, help="Run directory to write (RUN/).")
@click.option("--include", multiple=True, help="Only these layers (glob or re:REGEX).")
@click.option("--exclude", multiple=True, help="Never these layers (glob or re:REGEX).")
@click.option("--rank-multiple", default=8, show_default=True, type=click.IntRange(min=1),
              help="Ranks are multiples of this (hardware-friendly); 1 for any rank.")
@click.option("--plan", "plan_path", type=click.Path(exists=True, dir_okay=False),
              help="Re-apply this plan.json instead of searching.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="DataLoader worker processes.")
@click.option("--calib-fraction", default=0.1, show_default=True, type=float,
              help="Share of the training set held out for the rank search.")
@click.option("--calib-batches", default=8, show_default=True, type=click.IntRange(min=1),
              help="Calibration batches the search uses.")
@click.option("--test-subset", type=click.IntRange(min=1),
              help="Evaluate on the first N test images only (faster; default: all).")
@click.option("--search-iters", default=100, show_default=True, type=click.IntRange(min=1),
              help="rene: joint iterations per search step.")
@click.option("--search-warmup", default=20, show_default=True, type=click.IntRange(min=0),
              help="rene: weight-only iterations before each step.")
@click.option("--mean", help="Normalisation mean, comma-separated (default: the model's).")
@click.option("--std", help="Normalisation std, comma-separated (default: the model's).")
@click.option("--train-subset", type=click.IntRange(min=1),
              help="Fine-tune on the first N training images only (seeded).")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Where decompositions/sensitivities are cached (default RUN/cache); share it "
              "between runs at other targets to reuse the work.")
@finetune_options
@click.option("--overwrite", is_flag=True, help="Replace results in a non-empty RUN directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def search(model, arch, num_classes, in_chans, trust_pickle, input_size, decomp, target_flops,
           target_params, method, data_spec, out, include, exclude, rank_multiple, plan_path,
           seed, device, batch_size, workers, calib_fraction, calib_batches, test_subset,
           search_iters, search_warmup, mean, std, train_subset, cache_dir, overwrite, as_json,
           **finetune_kw):
    """Compress MODEL to a FLOPs or params target: rank search, decomposition, evaluation.

    Writes RUN/model.safetensors (reload with lrcompress.load), RUN/plan.json and
    RUN/report.json. The target counts the WHOLE model: layers kept dense count too.
    With --finetune-epochs or --max-steps the compressed model is then distilled from the
    original (CE + λ·layer matching + logit KD). A killed run resumes when re-run with the
    same command.

    \b
    Examples:
      lrcompress search resnet18.pt --input-size 1,28,28 --decomp tt --target-flops 0.3 \\
          --data fashionmnist:/usr/share/datasets/fashion-mnist -o runs/r18-tt30
      lrcompress search timm:test_resnet --data synthetic --target-params 0.5 -o runs/dry
      lrcompress search resnet18.pt --input-size 1,28,28 --target-flops 0.3 --max-steps 400 \\
          --data fashionmnist:/usr/share/datasets/fashion-mnist -o runs/r18-ft
      lrcompress search resnet18.pt --plan runs/r18-tt30/plan.json --data ... -o runs/again
    """
    from .data import DataConfig
    from .pipeline import SearchConfig
    from .pipeline import search as run_search
    from .plan import Target
    from .progress import RichProgress
    from .rank.rene import ReneConfig
    from .render import render_search

    if (target_flops is None) == (target_params is None) and plan_path is None:
        raise UserError("Give exactly one of --target-flops R or --target-params R "
                        "(the fraction of the original model to keep, e.g. 0.3).")
    target = Target("flops", target_flops) if target_flops is not None else (
        Target("params", target_params) if target_params is not None else None)
    if target is None:
        raise UserError("With --plan, still give the target the plan was made for "
                        "(--target-flops or --target-params).")
    if not 0 < calib_fraction < 1:
        raise UserError(f"--calib-fraction {calib_fraction} must be between 0 and 1.")
    cfg = SearchConfig(
        target=target, decomp=decomp, method=method, rank_multiple=rank_multiple,
        include=tuple(include), exclude=tuple(exclude), seed=seed, device=device,
        calib_batches=calib_batches,
        data=DataConfig(batch_size=batch_size, workers=workers, calib_fraction=calib_fraction,
                        seed=seed, test_subset=test_subset, train_subset=train_subset),
        finetune=_finetune_config(finetune_kw), cache_dir=cache_dir,
        rene=ReneConfig(iters=search_iters, warmup=search_warmup),
        input_size=input_size, mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
        plan_path=plan_path, overwrite=overwrite,
    )
    res = run_search(model, data_spec, out, cfg, arch=arch, num_classes=num_classes,
                     in_chans=in_chans, trust_pickle=trust_pickle, progress=RichProgress(),
                     command=sys.argv)
    if as_json:
        _emit_json(res.report)
    else:
        render_search(res.report)


def run() -> None:  # console-script entry point
    main(obj={})


if __name__ == "__main__":
    run()
