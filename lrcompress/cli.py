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

from lrcompress._version import __version__
from lrcompress.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, LrcError, UserError

log = logging.getLogger("lrcompress")


class _Group(click.Group):
    """Maps lrcompress errors to exit codes and one-paragraph messages (tracebacks only --debug)."""

    def parse_args(self, ctx, args):
        # The exact command line, for reports (sys.argv is not it when called as a library).
        ctx.meta["lrcompress.argv"] = [ctx.info_name or "lrcompress", *args]
        return super().parse_args(ctx, args)

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
            click.echo("Interrupted. Finished stages and fine-tuning epochs are kept in "
                       "RUN/state/: re-run the same command to resume from there.", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the last line of defence: exit 3, not a crash
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA)
                click.echo(f"Out of GPU memory ({str(e).splitlines()[0]}). Re-run the same "
                           "command with --auto-batch (halves the batch and retries) or "
                           "--device cpu: either resumes from the stages finished in RUN/state/. "
                           "Or use a smaller --batch-size (and --calib-batches) with --overwrite "
                           "or a new -o.", err=True)
                sys.exit(EXIT_BAD_INPUT)
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
      lrcompress search resnet18.pt --decomp tt --target-flops 0.3     # data-free
      lrcompress search resnet18.pt --decomp tt --target-flops 0.3 \\
          --data fashionmnist:/usr/share/datasets/fashion-mnist -o runs/r18
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _stop_cleanly_on_sigterm()
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _stop_cleanly_on_sigterm() -> None:
    """SIGTERM (a CI timeout, a scheduler) stops like Ctrl-C: atomic writes finish or roll back,
    and the resume hint is printed, instead of dying mid-write."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


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


ALLOW_CLASS_MISMATCH = click.option(
    "--allow-class-mismatch", is_flag=True,
    help="Accept a model with more outputs than the data set has classes (labels are indices "
    "into the model's classes); refused otherwise.")


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
        click.option("--hoyer", default=0.0, show_default=True, type=click.FloatRange(min=0),
                     help="Hoyer sparsity of each factorized layer's singular values, "
                     "Σ(‖s‖₁/‖s‖₂ − 1) (SVD training; 0: off)."),
        click.option("--grad-clip", default=5.0, show_default=True, type=float,
                     help="Gradient-norm clip (0: off)."),
        click.option("--precision", default="auto", show_default=True,
                     type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
                     help="auto: bf16 autocast on CUDA, fp32 on CPU."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def finetune_config(kw: dict):
    from lrcompress.recover.finetune import FinetuneConfig

    keys = ("epochs", "max_steps", "lr", "optimizer", "weight_decay", "warmup_steps", "lam",
            "diss_reduction", "kd", "kd_temperature", "frobenius_decay", "orth", "orth_weight",
            "hoyer", "grad_clip", "precision")
    vals = {k: kw.pop(k) for k in keys}
    vals["grad_clip"] = vals["grad_clip"] or None
    return FinetuneConfig(**vals)


def _load(model, arch, num_classes, in_chans, trust_pickle, input_size=None):
    from pathlib import Path

    from lrcompress.model.loading import load_model

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
@click.option("--decomp", default="tt", show_default=True,
              type=click.Choice(["svd", "tucker2", "tucker", "cp", "cp4", "tt", "auto"]),
              help="Factorization search would use (for the reachable ratio and the preview).")
@click.option("--rank-multiple", default=16, show_default=True, type=click.IntRange(min=1),
              help="Rank grid search would use.")
@click.option("--target-flops", type=float, help="Preview the plan for this MACs ratio (ranks "
              "per layer, MACs) without decomposing.")
@click.option("--target-params", type=float, help="Preview the plan for this parameter ratio.")
@click.option("--method", default="uniform", show_default=True,
              type=click.Choice(["uniform", "energy", "vbmf", "lsvt", "gsvt", "isvt", "rene",
                                 "sensitivity", "bisect"]),
              help="Rank method of the preview: one that reads no data (uniform, energy, vbmf, "
              "lsvt, gsvt); the others need calibration data, run `search` for them.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(model, arch, num_classes, in_chans, trust_pickle, input_size, include, exclude,
            decomp, rank_multiple, target_flops, target_params, method, as_json):
    """Per-layer census: shapes, MACs, params, and what factorizing could save.

    MODEL is a checkpoint (.safetensors, .pt/.pth/.bin), a RUN directory, or an architecture
    name such as timm:resnet18 (random weights). The smallest reachable ratio is computed by
    search's own code for --decomp and --rank-multiple. A compressed model (a RUN or its
    model.safetensors) is shown with its factorized chains as planned layers.

    \b
    Examples:
      lrcompress inspect timm:resnet18 --input-size 1,28,28
      lrcompress inspect resnet18.pt --input-size 1,28,28 --json
      lrcompress inspect resnet18.safetensors --include 'layer3.*'
      lrcompress inspect resnet18.pt --target-flops 0.3 --method energy   # plan preview
      lrcompress inspect runs/r18                                          # a compressed run
    """
    from lrcompress.model.arch import default_input_size

    lm = _load(model, arch, num_classes, in_chans, trust_pickle, input_size)
    size = input_size or lm.info.input_size or default_input_size(lm.model, lm.info.in_chans)
    if size[0] != lm.info.in_chans:
        raise UserError(f"--input-size has {size[0]} channels but the model takes "
                        f"{lm.info.in_chans}. Use --input-size "
                        f"{lm.info.in_chans},{size[1]},{size[2]}.")
    wants_plan = target_flops is not None or target_params is not None
    if lm.plan is not None:
        if wants_plan:
            raise UserError(f"{model} is a compressed model: inspect shows its chains. Preview "
                            "a plan on the original checkpoint instead (inspect ORIGINAL "
                            "--target-flops R).")
        _inspect_run(lm, size, as_json)
        return
    from lrcompress.commands.compress import CompressConfig, make_target
    from lrcompress.commands.inspect import check_preview_method
    from lrcompress.model.plan import Target

    if wants_plan:
        check_preview_method(method)
    target = (make_target(target_flops, target_params) if wants_plan
              else Target("flops", 0.5))
    cfg = CompressConfig(target, decomp=decomp, method=method, rank_multiple=rank_multiple,
                         include=include, exclude=exclude)
    _inspect_model(lm, size, cfg, wants_plan, as_json)


def _inspect_model(lm, size, cfg, wants_plan, as_json):
    from lrcompress.commands.inspect import model_dict, preview, reach
    from lrcompress.model.census import census
    from lrcompress.report.render import render_census, render_preview, render_reach

    c = census(lm.model, lm.info.arch, size, cfg.include, cfg.exclude)
    r = reach(lm.model, lm.info, size, cfg)
    p = preview(lm.model, lm.info, size, cfg) if wants_plan else None
    if as_json:
        _emit_json(model_dict(c, r, p))
        return
    render_census(c)
    render_reach(r)
    if p is not None:
        render_preview(p)


def _inspect_run(lm, size, as_json):
    from lrcompress.commands.inspect import compressed_census, run_dict
    from lrcompress.model.plan import Plan
    from lrcompress.report.render import render_census, render_chains

    plan = Plan.from_dict(lm.plan)
    c, chains = compressed_census(lm.model, plan, size)
    if as_json:
        _emit_json(run_dict(c, plan, chains))
        return
    render_chains(plan, chains, c)
    render_census(c, compressed=True)


# ------------------------------------------------------------------ search


def parse_floats(value, name):
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
@click.option("--decomp",
              type=click.Choice(["svd", "tucker2", "tucker", "cp", "cp4", "tt", "auto"]),
              help="Factorization: tt (3-core TT), tucker2, cp (CP-3), cp4 (Lebedev), svd, or "
              "auto (the search picks one per layer; rene only). Default: tt, or with --plan "
              "the plan's (a different one is refused).")
@click.option("--target-flops", type=float, help="Keep at most this fraction of the whole "
              "model's MACs, 0 < R < 1 (e.g. 0.3).")
@click.option("--target-params", type=float, help="Keep at most this fraction of the "
              "parameters, 0 < R < 1.")
@click.option("--target-latency", type=float, help="Measured latency at most this fraction of "
              "the original's on --latency-engine, 0 < R < 1 (e.g. 0.4 = 2.5x faster). Layer "
              "candidates are timed (cached in ~/.cache/lrcompress/latency), the result is "
              "measured whole and re-solved if it misses.")
@click.option("--target-speedup", type=float, help="The same as --target-latency 1/S: a "
              "measured speed-up of at least S (> 1).")
@click.option("--latency-engine", default="ort-cpu", show_default=True,
              type=click.Choice(["ort-cpu", "torch-cpu", "ort-cuda", "torch-cuda"]),
              help="Where latency is measured: ONNX Runtime or PyTorch eager, CPU or CUDA.")
@click.option("--latency-threads", default=1, show_default=True, type=click.IntRange(min=0),
              help="Intra-op threads for latency measurements (0: all cores).")
@click.option("--latency-batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Batch size latency is measured at.")
@click.option("--latency-aware", is_flag=True, help="With --target-flops/--target-params: "
              "offer only ranks at the bottom of each measured latency step and never a chain "
              "slower than its dense layer; the report shows the measured speed-up.")
@click.option("--strict-target", is_flag=True, help="Exit 2 when the measured latency still "
              "misses --target-latency after the re-solves (default: say so in the report).")
@click.option("--narrow-hidden", type=float, default=None, metavar="K",
              help="Before factorizing, narrow the hidden width of every inverted-residual "
              "block (1×1 expansion → depthwise → 1×1 projection, as in mobilenetv2) and "
              "every MLP (fc1 → activation → fc2, as in ViT and ConvNeXt) to K of it "
              "(0 < K < 1, rounded to --rank-multiple) by an interpolative decomposition fitted "
              "on the calibration batches; the search then factorizes the narrowed model to "
              "meet the target (layer matching skips the layers narrowing reshaped). Low rank "
              "alone cannot narrow these activations, where such models spend their time: see "
              "the README's latency section for measured numbers.")
@click.option("--method", default="rene", show_default=True,
              type=click.Choice(["rene", "sensitivity", "uniform", "energy", "vbmf", "lsvt",
                                 "gsvt", "isvt", "bisect"]),
              help="Rank selection: rene (softmax rank search, budget-aware); sensitivity "
              "(per-layer calibration-loss model, greedy to the target); baselines: "
              "uniform (one rank ratio everywhere), energy (keep a share of Σσ², Yang 2020), "
              "vbmf (VBMF ranks scaled to the target), lsvt / gsvt (LoRITa's per-layer / "
              "global σ/σ₁ truncation), isvt (LoRITa's greedy loss-guided cuts), bisect "
              "(σ/σ₁ threshold by loss-tolerance bisection). All meet the target.")
@click.option("--data", "data_spec",
              help="fashionmnist:ROOT, mnist:ROOT, cifar10:ROOT, cifar100:ROOT, imagefolder:DIR "
              "(DIR/train/CLASS/*, DIR/val/CLASS/*; or a flat folder of unlabelled images) or "
              "synthetic. Absent: data-free (inputs synthesised from the BatchNorm statistics; "
              "no accuracy unless --eval-data).")
@click.option("--eval-data", "eval_spec",
              help="Measure accuracy on this data spec's labelled test split (instead of "
              "--data's; needed for accuracy in data-free runs and with a flat image folder).")
@click.option("-o", "--output", "out", help="Run directory to write (RUN/). Default: "
              "runs/<checkpoint stem>-<decomp>-<target>, e.g. runs/resnet18-tt-flops0.3, with "
              "-2, -3, ... added rather than reuse a folder that holds files (so a default name "
              "never resumes: pass -o RUN to resume a killed run).")
@click.option("--synth-samples", default=256, show_default=True, type=click.IntRange(min=1),
              help="Data-free: inputs to synthesise.")
@click.option("--synth-iters", default=200, show_default=True, type=click.IntRange(min=1),
              help="Data-free: optimiser steps per batch of synthesised inputs.")
@click.option("--include", multiple=True, help="Only these layers (glob or re:REGEX).")
@click.option("--exclude", multiple=True, help="Never these layers (glob or re:REGEX).")
@click.option("--rank-multiple", default=16, show_default=True, type=click.IntRange(min=1),
              help="Ranks are multiples of this: 16 matches the 16-channel blocks of CPU "
              "convolution kernels (AVX-512) and GPU tensor cores, so chains run near their "
              "MACs; 8 reaches lower MACs targets; 1 allows any rank. A layer whose break-even "
              "rank is below the multiple may take any rank under it.")
@click.option("--plan", "plan_path", type=click.Path(exists=True, dir_okay=False),
              help="Re-apply this plan.json instead of searching.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--auto-batch", is_flag=True, help="On CUDA out-of-memory, halve the batch "
              "(search calibration batches; fine-tuning micro-batches) and retry, down to 1; "
              "the report records the size used. Not under torchrun.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="DataLoader worker processes.")
@click.option("--calib-fraction", default=0.1, show_default=True, type=float,
              help="Share of the training set held out for the rank search.")
@click.option("--calib-batches", default=8, show_default=True, type=click.IntRange(min=1),
              help="Calibration batches the search uses.")
@click.option("--fit", default="auto", show_default=True,
              type=click.Choice(["auto", "weight", "activation", "sequential"]),
              help="What the factors fit: weight (min ‖W − Ŵ‖); activation (min the layer's "
              "output error on the original model's inputs from the calibration batches: "
              "whitened SVD for svd, linear and 1×1 layers; Σ-weighted input factor and "
              "least-squares core for tucker2/tt; cp keeps the weight fit on k×k convs); "
              "sequential (layer by layer, each fitted on the inputs the already-compressed "
              "layers produce, toward the original's output). auto: sequential whenever "
              "calibration inputs exist (real or synthesised), else weight. Before fine-tuning, "
              "uniform ranks, Fashion-MNIST: mobilenetv2 at 50 % MACs 10.0 (weight) / 73.2 "
              "(activation) / 81.7 % (sequential); resnet18 tt at 30 % 80.6 / 88.4 / 89.0 % "
              "(original 89.1 %).")
@click.option("--bn-batches", default=16, show_default=True, type=click.IntRange(min=0),
              help="After decomposition, re-measure the BatchNorm running statistics after the "
              "factorized layers on this many calibration batches (no training; recovers much "
              "of the pre-fine-tuning loss on BatchNorm models). 0: keep the original's.")
@click.option("--test-subset", type=click.IntRange(min=1),
              help="Evaluate on the first N test images only (faster; default: all).")
@click.option("--search-iters", default=12, show_default=True, type=click.IntRange(min=1),
              help="rene: rank (α) iterations per search step.")
@click.option("--search-warmup", default=20, show_default=True, type=click.IntRange(min=0),
              help="rene with --search-weight-steps: weight-only iterations before each step.")
@click.option("--search-weight-steps", is_flag=True,
              help="rene: also run the paper's weight step (the candidates' factors trained so "
              "that their mixture matches the layer) before every rank step. Off by default: "
              "each candidate keeps the factors it was fitted with (what would ship at that "
              "rank), which measured the same plans in less than half the time.")
@click.option("--search-loss", default="kd", show_default=True, type=click.Choice(["kd", "ce"]),
              help="rene's α objective: kd = KL divergence to the original model's calibration "
              "outputs; ce = cross-entropy on the labels (the paper).")
@click.option("--search-prior", default="loss-model", show_default=True,
              type=click.Choice(["loss-model", "zero"]),
              help="rene's initial logits: loss-model = minus each candidate's predicted loss "
              "increase (one calibration pass per layer); zero = the paper.")
@click.option("--search-tol", type=click.FloatRange(min=0),
              help="rene: end a narrowing step once no layer's rank probabilities moved by more "
              "than this (total variation) over 5 iterations, after at least 20; 0 = run all "
              "--search-iters. Default: ReneConfig.stop_tol.")
@click.option("--vbmf-weaken", type=click.FloatRange(0, 1),
              help="vbmf: r = r_full − w·(r_full − r_vbmf); 1 = pure VBMF (default).")
@click.option("--max-loss-increase", type=click.FloatRange(min=0),
              help="bisect: calibration-loss increase tolerated, in nats (default 0.02).")
@click.option("--mean", help="Normalisation mean, comma-separated (default: the model's).")
@click.option("--std", help="Normalisation std, comma-separated (default: the model's).")
@click.option("--train-subset", type=click.IntRange(min=1),
              help="Fine-tune on the first N training images only (seeded).")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Where decompositions/sensitivities are cached (default RUN/cache); share it "
              "between runs at other targets to reuse the work.")
@finetune_options
@click.option("--lorita", "lorita_factors", default=0, show_default=True,
              type=click.IntRange(min=0),
              help="LoRITa pre-tuning: train each selected weight as a product of N factors "
              "(balanced SVD split of the pretrained weight) with weight decay, collapse, then "
              "select ranks (pair with --method lsvt/gsvt/isvt). N=3 is the paper's advice; "
              "0: off.")
@click.option("--lorita-steps", default=300, show_default=True, type=click.IntRange(min=1),
              help="Distillation steps of the over-parameterised model.")
@click.option("--lorita-lr", default=0.01, show_default=True, type=float)
@click.option("--lorita-wd", default=1e-3, show_default=True, type=float,
              help="Weight decay on every factor (a Schatten-2/N penalty on each weight).")
@click.option("--overwrite", is_flag=True, help="Replace results in a non-empty RUN directory.")
@ALLOW_CLASS_MISMATCH
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def search(model, arch, num_classes, in_chans, trust_pickle, input_size, decomp, target_flops,
           target_params, target_latency, target_speedup, latency_engine, latency_threads,
           latency_batch, latency_aware, strict_target, narrow_hidden, method, data_spec,
           eval_spec, out,
           synth_samples, synth_iters, include,
           exclude, rank_multiple, plan_path, seed, device, batch_size, workers,
           calib_fraction, calib_batches, fit, bn_batches, test_subset,
           search_iters, search_warmup, search_weight_steps, search_loss, search_prior,
           search_tol, vbmf_weaken, max_loss_increase, mean, std, train_subset,
           lorita_factors, lorita_steps, lorita_lr, lorita_wd, cache_dir, overwrite, as_json,
           auto_batch, allow_class_mismatch, **finetune_kw):
    """Compress MODEL to a FLOPs, params or measured-latency target: rank search,
    decomposition, evaluation.

    Writes RUN/model.safetensors (reload with lrcompress.load), RUN/plan.json and
    RUN/report.json. The target counts the WHOLE model: layers kept dense count too.
    With --finetune-epochs or --max-steps the compressed model is then distilled from the
    original (CE + λ·layer matching + logit KD). A killed run resumes when re-run with the
    same command and the same -o (a default run folder is never reused).

    Without --data the run is data-free: --synth-samples inputs are optimised until every
    BatchNorm layer sees its training statistics, kept in RUN/state/, and used for the rank
    search, the activation fit, BatchNorm re-estimation and distillation.
    The input size then comes from the checkpoint's metadata or the architecture's data config
    (--input-size overrides). A model without BatchNorm gets inputs drawn at its input mean/std,
    with a warning; --fit activation is refused there. Accuracy is measured only with
    --eval-data (or labelled --data).

    \b
    Examples:
      lrcompress search resnet18.pt --decomp tt --target-flops 0.3
      lrcompress search resnet18.pt --input-size 1,28,28 --target-flops 0.3 --max-steps 100 \\
          --eval-data fashionmnist:/usr/share/datasets/fashion-mnist
      lrcompress search resnet18.pt --input-size 1,28,28 --decomp tt --target-flops 0.3 \\
          --data fashionmnist:/usr/share/datasets/fashion-mnist -o runs/r18-tt30
      lrcompress search timm:test_resnet --data synthetic --target-params 0.5 -o runs/dry
      lrcompress search resnet18.pt --input-size 1,28,28 --target-flops 0.3 --max-steps 400 \\
          --data fashionmnist:/usr/share/datasets/fashion-mnist -o runs/r18-ft
      lrcompress search resnet18.pt --plan runs/r18-tt30/plan.json --data ... -o runs/again
      lrcompress search resnet18.pt --input-size 1,28,28 --target-speedup 2.5 \\
          --latency-engine ort-cpu --latency-batch 64 --data ... -o runs/r18-2.5x
      lrcompress search mobilenetv2.pt --input-size 1,28,28 --target-latency 0.45 \\
          --latency-batch 64 --narrow-hidden 0.3 --data ... -o runs/mbv2-fast
    """
    from lrcompress.calib.synthesize import SynthConfig
    from lrcompress.commands.compress import CompressConfig, make_target
    from lrcompress.commands.run_dir import default_run_dir
    from lrcompress.commands.search import search as run_search
    from lrcompress.data import DataConfig
    from lrcompress.measure.latency_target import LatencyConfig
    from lrcompress.rank.rene import ReneConfig
    from lrcompress.recover.lorita import LoritaConfig
    from lrcompress.report.render import render_search
    from lrcompress.util import distributed
    from lrcompress.util.progress import RichProgress

    if plan_path is not None and all(v is None for v in (target_flops, target_params,
                                                          target_latency, target_speedup)):
        raise UserError("With --plan, still give the target the plan was made for "
                        "(--target-flops or --target-params).")
    target = make_target(target_flops, target_params, target_latency, target_speedup)
    if latency_aware and target.kind == "latency":
        raise UserError("--latency-aware goes with --target-flops or --target-params; a "
                        "latency target is latency-aware already.")
    if not 0 < calib_fraction < 1:
        raise UserError(f"--calib-fraction {calib_fraction} must be between 0 and 1.")
    if out is not None and not out.strip():
        raise UserError('-o "" names no folder: give the run folder, e.g. -o runs/r18 (or leave '
                        "-o out for a default one under runs/).")
    cfg = CompressConfig(
        target=target, decomp=decomp or ("auto" if plan_path else "tt"), method=method,
        rank_multiple=rank_multiple,
        include=tuple(include), exclude=tuple(exclude), seed=seed, device=device,
        calib_batches=calib_batches, bn_batches=bn_batches, fit=fit,
        data=DataConfig(batch_size=batch_size, workers=workers, calib_fraction=calib_fraction,
                        seed=seed, test_subset=test_subset, train_subset=train_subset,
                        allow_class_mismatch=allow_class_mismatch),
        finetune=finetune_config(finetune_kw), cache_dir=cache_dir,
        lorita=LoritaConfig(factors=lorita_factors, steps=lorita_steps, lr=lorita_lr,
                            weight_decay=lorita_wd),
        method_config={**({"vbmf": {"weaken": vbmf_weaken}} if vbmf_weaken is not None else {}),
                       **({"bisect": {"max_loss_increase": max_loss_increase}}
                          if max_loss_increase is not None else {})},
        rene=ReneConfig(iters=search_iters, warmup=search_warmup, alpha_loss=search_loss,
                        weight_steps=search_weight_steps,
                        prior=search_prior.replace("-", "_"),
                        **({} if search_tol is None else {"stop_tol": search_tol})),
        input_size=input_size, mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"),
        plan_path=plan_path, overwrite=overwrite, auto_batch=auto_batch,
        latency=LatencyConfig(engine=latency_engine, threads=latency_threads,
                              batch=latency_batch, strict=strict_target, aware=latency_aware),
        narrow_hidden=narrow_hidden,
    )
    synth = SynthConfig(samples=synth_samples, iters=synth_iters) if data_spec is None else None
    distributed.init_from_env()  # under torchrun: fine-tuning runs data-parallel
    main_rank = distributed.is_main()
    if out is None:
        out = default_run_dir(model, cfg.decomp, target.kind, target.ratio)
    if main_rank:
        click.echo(f"Run folder: {out}", err=True)
    res = run_search(model, data_spec, out, cfg, arch=arch, num_classes=num_classes,
                     in_chans=in_chans, trust_pickle=trust_pickle,
                     progress=RichProgress() if main_rank else None,
                     command=click.get_current_context().meta.get("lrcompress.argv", sys.argv),
                     eval_spec=eval_spec, synth=synth)
    if not main_rank:
        return
    if as_json:
        _emit_json(res.report)
    else:
        render_search(res.report)
    click.echo(f"Run folder: {out}", err=True)



# ------------------------------------------------------------------ export, eval, gate


def latency_options(f):
    """Latency flags -> a LatencyConfig (or None) under the key ``latency``."""
    opts = [
        click.option("--latency/--no-latency", "latency", default=True, show_default=True,
                     help="Measure latency (ONNX Runtime CPU at 1 and all threads, PyTorch "
                     "eager; CUDA too when present)."),
        click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=1),
                     help="Timed runs per configuration; the median is reported."),
        click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=0),
                     help="Untimed runs before timing."),
        click.option("--batch-sizes", default="1,64", show_default=True,
                     help="Batch sizes to time, comma-separated."),
        click.option("--threads", default="1,0", show_default=True,
                     help="Intra-op thread counts to time (ONNX Runtime and PyTorch), "
                     "comma-separated; 0 means all cores."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _latency_config(kw: dict, per_layer: bool):
    from lrcompress.measure.latency import LatencyConfig

    on = kw.pop("latency")
    repeats, warmup = kw.pop("repeats"), kw.pop("warmup")
    ints = {}
    for opt, key, example in (("--batch-sizes", "batch_sizes", "1,64"),
                              ("--threads", "threads", "1,0")):
        try:
            ints[key] = tuple(int(b) for b in kw.pop(key).split(","))
        except ValueError:
            raise click.BadParameter(f"write comma-separated integers, e.g. {example}.",
                                     param_hint=opt) from None
    if not on:
        return None
    return LatencyConfig(repeats=repeats, warmup=warmup, batches=ints["batch_sizes"],
                         threads=ints["threads"], per_layer=per_layer)


def int8_options(f):
    """INT8 export flags -> an Int8Config under the key ``int8`` (None without --int8)."""
    opts = [
        click.option("--int8", is_flag=True, help="Also write model.int8.onnx (same as adding "
                     "onnx-int8 to --format): ONNX Runtime static quantization, checked for "
                     "accuracy and timed against FP32 and the original quantized alone."),
        click.option("--int8-calibration", default="minmax", show_default=True,
                     help="Activation ranges from: minmax, entropy or percentile."),
        click.option("--int8-batches", default=8, show_default=True, type=int,
                     help="Calibration batches of 32 samples from the run's calibration split."),
        click.option("--int8-max-drop", default=0.5, show_default=True, type=float,
                     help="Most top-1 points INT8 may lose against FP32 (ONNX Runtime, the run's "
                     "test split); a larger drop is an error and nothing is written."),
        click.option("--int8-exclude", default="", help="Layers kept in float, comma-separated "
                     "module names (a factorized layer's name covers its factors)."),
        click.option("--int8-balance/--no-int8-balance", default=False, show_default=True,
                     help="Balance channel scales inside each factorized chain (exact) before "
                     "quantizing; off by default: it did not help trained models."),
        click.option("--int8-reduce-range", is_flag=True,
                     help="7-bit weights: avoids int8 saturation on x86 CPUs without VNNI."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _int8_config(kw: dict, formats: str) -> tuple[tuple[str, ...], object]:
    from lrcompress.deploy.int8 import Int8Config

    fmts = tuple(formats.split(",")) + (("onnx-int8",) if kw.pop("int8") else ())
    cfg = Int8Config(calibration=kw.pop("int8_calibration"), batches=kw.pop("int8_batches"),
                     max_drop=kw.pop("int8_max_drop"),
                     exclude=tuple(kw.pop("int8_exclude").split(",")),
                     balance=kw.pop("int8_balance"), reduce_range=kw.pop("int8_reduce_range"))
    return fmts, cfg


@main.command()
@click.argument("run", type=click.Path())
@click.option("--format", "formats", default="onnx,safetensors", show_default=True,
              help="Artifacts, comma-separated: onnx (model.onnx, checked in ONNX Runtime), "
              "safetensors (model.safetensors, reload-validated) and/or onnx-int8 "
              "(model.int8.onnx, see --int8).")
@click.option("--opset", default=18, show_default=True, type=int,
              help="ONNX opset (18 is torch's native one).")
@click.option("--dynamic-batch", is_flag=True,
              help="model.onnx takes any batch size (default: a fixed batch of 1).")
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="Folder for model.onnx and a copy of model.safetensors (default: RUN/).")
@click.option("--data", "data_spec",
              help="Parity inputs from this data spec (default: the run's own test images).")
@click.option("--rtol", default=1e-3, show_default=True, type=click.FloatRange(min=0),
              help="Parity: |onnx - torch| <= atol + rtol*max|torch| of each sample.")
@click.option("--atol", default=1e-4, show_default=True, type=click.FloatRange(min=0))
@click.option("--overwrite", is_flag=True,
              help="With -o DIR: replace model.onnx / model.safetensors an earlier export wrote "
              "there (never a file export did not write, or one changed since).")
@click.option("--allow-modified", is_flag=True,
              help="Use a RUN whose files differ from the sha256 its report.json records "
              "(refused by default: the report no longer describes them).")
@latency_options
@int8_options
@click.option("--json", "as_json", is_flag=True, help="Print the export section as JSON.")
def export(run, formats, opset, dynamic_batch, output, data_spec, rtol, atol, overwrite,
           allow_modified, as_json, **lat_kw):
    """Export RUN's compressed model: ONNX (checked against PyTorch) and safetensors.

    model.onnx is one self-contained file of standard ONNX operators, checked with onnx.checker
    and run in ONNX Runtime on the run's test images: any output off by more than
    atol + rtol*max|torch| of its sample is an error and nothing is written. Latency of the
    original and the compressed model is measured in the same process (median of --repeats
    runs) next to the ideal speed-up (MACs ratio), with a per-layer table that flags factorized
    layers slower than the dense ones. report.json gets an "export" section; report.md/html
    are rewritten.

    --int8 also writes model.int8.onnx: ONNX Runtime static quantization (QDQ, per-channel
    weights) calibrated on the run's calibration split (a data-free run: its synthetic batch),
    after an exact scale balancing inside each factorized chain. Its top-1 is compared with the
    FP32 graph's on the run's test split (a drop over --int8-max-drop is an error, exit 3, and
    nothing is written), and latency is measured for the original and compressed models in FP32
    and INT8 (the original quantized alone is the baseline low-rank must beat).

    \b
    Examples:
      lrcompress export runs/r18-tt30
      lrcompress export runs/r18-tt30 --format onnx --dynamic-batch --repeats 50
      lrcompress export runs/r18-tt30 --format safetensors --no-latency -o deploy/
      lrcompress export runs/r18-tt30 --int8 --int8-calibration entropy
    """
    from lrcompress.commands.export import ExportConfig, export_run
    from lrcompress.report.render import render_export
    from lrcompress.util.progress import RichProgress

    fmts, int8 = _int8_config(lat_kw, formats)
    cfg = ExportConfig(formats=fmts, opset=opset, dynamic_batch=dynamic_batch, output=output,
                       data=data_spec, rtol=rtol, atol=atol, int8=int8,
                       latency=_latency_config(lat_kw, per_layer=True),
                       overwrite=overwrite, allow_modified=allow_modified)
    res = export_run(run, cfg, progress=RichProgress())
    if as_json:
        _emit_json(res.section)
    else:
        render_export(res)


@main.command("eval")
@click.argument("model")
@model_options
@click.option("--data", "data_spec", required=True,
              help="fashionmnist:ROOT, mnist:ROOT, cifar10:ROOT, cifar100:ROOT, "
              "imagefolder:DIR or synthetic.")
@click.option("--test-subset", type=click.IntRange(min=1),
              help="Evaluate on the first N test images only.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--mean", help="Normalisation mean, comma-separated (default: the run's/model's).")
@click.option("--std", help="Normalisation std, comma-separated (default: the run's/model's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--allow-modified", is_flag=True,
              help="Use a RUN whose files differ from the sha256 its report.json records "
              "(refused by default: the report no longer describes them).")
@latency_options
@ALLOW_CLASS_MISMATCH
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_cmd(model, arch, num_classes, in_chans, trust_pickle, input_size, data_spec,
             test_subset, batch_size, workers, mean, std, device, allow_modified, as_json,
             allow_class_mismatch,
             **lat_kw):
    """Top-1/top-5, loss, MACs, params and latency of any model, original or compressed.

    MODEL_OR_RUN is a checkpoint, a RUN directory (its input size and normalisation are used),
    a compressed model.safetensors, or timm:NAME (random weights). Accuracy is measured on the
    test split only; MACs by torch's FlopCounterMode.

    \b
    Examples:
      lrcompress eval runs/r18-tt30 --data fashionmnist:/usr/share/datasets/fashion-mnist
      lrcompress eval resnet18_fmnist.pt --input-size 1,28,28 \\
          --data fashionmnist:/usr/share/datasets/fashion-mnist --json
      lrcompress eval runs/r18-tt30 --data synthetic --no-latency --test-subset 256
    """
    from lrcompress.commands.evaluate import EvalConfig, eval_model
    from lrcompress.data import DataConfig
    from lrcompress.report.render import render_eval
    from lrcompress.util.progress import RichProgress

    cfg = EvalConfig(data=DataConfig(batch_size=batch_size, workers=workers,
                                     test_subset=test_subset,
                                     allow_class_mismatch=allow_class_mismatch),
                     input_size=input_size, mean=parse_floats(mean, "--mean"),
                     std=parse_floats(std, "--std"), device=device,
                     latency=_latency_config(lat_kw, per_layer=False))
    res = eval_model(model, data_spec, cfg, arch=arch, num_classes=num_classes,
                     in_chans=in_chans, trust_pickle=trust_pickle, progress=RichProgress(),
                     allow_modified=allow_modified)
    if as_json:
        _emit_json(res)
    else:
        render_eval(res)


@main.command()
@click.argument("run", type=click.Path())
@click.option("--max-top1-drop", type=float,
              help="Most top-1 points the compressed model may lose (original - final); needs "
              "a run that measured accuracy (labelled test data).")
@click.option("--min-flops-reduction", type=float,
              help="Least share of MACs removed, in [0, 1) (0.5: at least half).")
@click.option("--min-speedup", type=float,
              help="Least measured speed-up (needs `lrcompress export RUN` first).")
@click.option("--speedup-engine", default="onnxruntime", show_default=True,
              type=click.Choice(["onnxruntime", "torch"]),
              help="Which measured speed-up --min-speedup reads (CPU, all threads).")
@click.option("--speedup-batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="... at this batch size.")
@click.option("--baseline", type=click.Path(),
              help="Another RUN: the drop is measured from its final top-1, not the original's.")
@click.option("--junit", type=click.Path(dir_okay=False),
              help="Also write the checks as JUnit XML to this file (for CI systems).")
@click.option("--int8", is_flag=True,
              help="--min-speedup and --max-top1-drop read model.int8.onnx's rows (needs "
              "`lrcompress export RUN --int8`): its speed-up over the original FP32 model, "
              "its top-1 in ONNX Runtime.")
@click.option("--allow-modified", is_flag=True,
              help="Use a RUN whose files differ from the sha256 its report.json records "
              "(refused by default: the report no longer describes them).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def gate(run, max_top1_drop, min_flops_reduction, min_speedup, speedup_engine, speedup_batch,
         baseline, junit, int8, allow_modified, as_json):
    """CI gate: exit 0 when RUN meets every budget, 1 when one fails, 2 on bad input.

    Give at least one budget. A run without accuracy (data-free without --eval-data) takes
    only --min-flops-reduction and --min-speedup.

    The top-1 drop is the original model's top-1 minus the final model's (fine-tuned if the
    run fine-tuned, else decomposed), in points, on the run's test split.

    \b
    Examples:
      lrcompress gate runs/r18-tt30 --max-top1-drop 1.0 --min-flops-reduction 0.5
      lrcompress gate runs/r18-tt30 --max-top1-drop 1.0 --min-speedup 1.3 --junit gate.xml
      lrcompress gate runs/new --max-top1-drop 0.2 --baseline runs/main
    """
    from lrcompress.commands.gate import GateConfig, check_junit_path, write_junit
    from lrcompress.commands.gate import gate as run_gate
    from lrcompress.errors import GateFailure
    from lrcompress.report.render import render_gate

    cfg = GateConfig(max_top1_drop=max_top1_drop, min_flops_reduction=min_flops_reduction,
                     min_speedup=min_speedup, speedup_engine=speedup_engine,
                     speedup_batch=speedup_batch, baseline=baseline, int8=int8,
                     allow_modified=allow_modified)
    if junit is not None:
        check_junit_path(junit)
    res = run_gate(run, cfg)
    if junit is not None:
        write_junit(junit, res)
    if as_json:
        _emit_json(res.to_dict())
    else:
        render_gate(res)
    if not res.passed:
        raise GateFailure("gate failed: " + "; ".join(
            f"{c.budget} (value {c.value:g})" for c in res.failed) + ".")


def run() -> None:  # console-script entry point
    main(obj={})


if __name__ == "__main__":
    run()
