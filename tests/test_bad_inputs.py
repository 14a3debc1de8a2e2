"""The bad-input corpus of issue #7 (Build §1), every case through the CLI.

Each case must end in exit code 2 with an ``Error:`` message that names the problem and how to
fix it (the ``words`` below), no traceback, every input file byte-for-byte unchanged (SHA-256),
and no output left behind: the RUN directory absent (or, if it existed, exactly as before) and no
temporary files anywhere.

Checklist (issue #7 §1 item -> CASES id, or the test function below the table):

  empty file ................................ empty_pt, empty_safetensors
  truncated .pt / .safetensors .............. truncated_pt, truncated_safetensors
  safetensors: overlapping offsets .......... st_overlapping_offsets
  safetensors: out-of-range offsets ......... st_offsets_past_the_end
  safetensors: absurd sizes / entry counts .. st_absurd_header_length, st_absurd_shape;
                                              test_absurd_safetensors_refused_before_allocating
  a pickle that would run code on load ...... pickle_runs_code_zip, pickle_runs_code_legacy;
                                              test_code_running_pickle_never_runs
  torch with known weights_only bypasses .... test_old_torch_refuses_pt_files
  never retry with weights_only=False ....... test_failed_safe_load_is_never_retried_unsafely
  whole pickled module (needs --trust-pickle) whole_module
  state_dict of another architecture ........ other_architecture
  wrong num_classes ......................... wrong_num_classes, num_classes_below_the_data,
                                              num_classes_above_the_data;
                                              test_allow_class_mismatch_lets_a_wider_head_run
  NaN / Inf weights ......................... nan_weights, inf_weights
  extra / missing keys ...................... extra_keys, missing_keys
  unknown --arch ............................ unknown_arch
  target <= 0, >= 1, unreachable ............ target_zero, target_negative, target_nan,
                                              target_one, target_above_one,
                                              target_params_zero, target_unreachable
  --data missing / malformed dataset ........ data_missing_dir, data_empty_dir,
                                              data_bad_idx_file, data_labels_out_of_range,
                                              data_unknown_kind
  unwritable output directory ............... output_parent_is_a_file, output_unwritable
  output is a file .......................... output_is_a_file
  non-empty output (refused w/o --overwrite)  output_not_empty;
                                              test_overwrite_replaces_results_only
  no decomposable layer ..................... no_decomposable_layer, everything_excluded
  layers too small to gain .................. layers_too_small
  --device cuda without a GPU ............... device_cuda_without_gpu

Issue #18 items 1 and 2 (nothing of the user's is replaced; one writer per RUN/):

  --overwrite on a folder that is not a run . overwrite_not_a_run
  --overwrite removes only the run's files .. test_overwrite_replaces_results_only,
                                              test_overwrite_on_a_run_from_before_manifests
  --overwrite would remove an input ......... test_overwrite_never_removes_an_input
  -o "" ..................................... test_output_empty_name_is_refused
  a second writer of RUN/ ................... test_a_second_writer_is_refused_naming_the_holder
  a stale lock (its holder died) ............ test_a_stale_lock_is_taken_over
  two searches into one empty -o ............ test_two_searches_into_one_empty_folder

Issue #18 (validated before RUN/ exists; no exit 3 on bad input):

  --plan against the model .................. plan_other_in_chans, plan_other_num_classes,
                                              plan_other_input_size, plan_other_architecture,
                                              plan_with_another_input_size_flag,
                                              plan_layer_shape_edited, plan_dense_cost_edited,
                                              plan_unknown_layer, plan_unknown_factorization
  plan ranks and layers ..................... plan_rank_zero, plan_rank_negative,
                                              plan_rank_above_full_rank,
                                              plan_rank_not_a_whole_number, plan_duplicated_layer
  plan vs --decomp / target ................. plan_contradicts_decomp, plan_misses_the_target;
                                              test_plan_brings_its_decomp_and_input_size
  edited plan / data seen on re-run ......... test_fingerprint_records_plan_and_data_contents
  --batch-size 1 with BatchNorm ............. batch_size_one_batchnorm,
                                              batch_size_one_finetuning;
                                              test_refused_input_leaves_nothing_so_the_fix_runs
  tiny image folder ......................... tiny_image_folder
  unreadable images ......................... image_folder_corrupt_image,
                                              image_folder_truncated_image;
                                              test_corrupt_image_found_later_is_exit_2_naming_it
  devices ................................... device_meta, device_other_backend
  numeric flags ............................. kd_temperature_zero, kd_temperature_nan, lr_inf,
                                              weight_decay_negative, grad_clip_negative,
                                              search_tol_nan, vbmf_weaken_nan, mean_nan,
                                              std_inf, rank_multiple_above_every_rank
  -o "" ..................................... test_output_empty_name_is_refused
  damaged state/fingerprint.json ............ damaged_fingerprint, fingerprint_not_an_object;
                                              test_damaged_run_folder_fix_works
  meta / sparse tensors in a checkpoint ..... meta_tensor_checkpoint, sparse_tensor_checkpoint
  int8 / complex weights .................... integer_weights, complex_weights;
                                              test_half_precision_weights_still_load
  architecture constructor errors ........... test_architecture_errors_are_exit_2
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner

from lrcompress.cli import main
from lrcompress.model import checkpoint
from lrcompress.model.costs import count_model
from lrcompress.model.layers import find_layers
from lrcompress.model.plan import LayerPlan, Plan, Target

from .conftest import tiny_resnet
from .test_data import fake_mnist

ROOT = Path(__file__).resolve().parents[1]
SEARCH = ("--input-size", "1,32,32", "--data", "synthetic:16", "--method", "uniform",
          "--batch-size", "8")
TINY_ARCH = "timm:resnet18(channels=(1,1,1,1),stem_type='deep',stem_width=1)"


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], obj={})
    return r.exit_code, r.output


def _digest(path: Path) -> dict:
    """SHA-256 of a file, or of every file under a folder."""
    if path.is_dir():
        return {str(p.relative_to(path)): _digest(p) for p in sorted(path.rglob("*"))
                if p.is_file()}
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _safetensors(header: dict, data: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


class _RunsCode:
    """Unpickling this calls builtins.exec, which would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


# --------------------------------------------------------------------------- the cases
@dataclass
class Env:
    tmp: Path
    pt: Path  # a good test_resnet state_dict (10 classes, 1 channel)
    st: Path  # the same as safetensors
    out: Path  # where -o points unless a case says otherwise

    def file(self, name: str, data: bytes) -> Path:
        p = self.tmp / "in" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        return p

    def state_dict_file(self, name: str, sd: dict) -> Path:
        p = self.tmp / "in" / name
        p.parent.mkdir(exist_ok=True)
        torch.save(sd, p)
        return p


@dataclass
class Case:
    id: str
    build: Callable[[Env], tuple[list, list[Path]]]  # -> (CLI args, inputs to keep unchanged)
    words: tuple[str, ...]  # what the message must say (the problem and the fix)


def search(model, *extra, target=("--target-flops", "0.5"), env=None):
    return ["search", model, *SEARCH, *target, "-o", env.out, *extra]


def _classes_case(e: Env, num_classes: int):
    """A test_resnet with ``num_classes`` outputs searched on a 10-class Fashion-MNIST."""
    ckpt = e.state_dict_file("test_resnet.pt", tiny_resnet(num_classes=num_classes).state_dict())
    return (["search", ckpt, "--input-size", "1,28,28", "--data",
             f"fashionmnist:{fake_mnist(e.tmp / 'fm')}", "--target-flops", "0.5", "--method",
             "uniform", "-o", e.out], [ckpt, e.tmp / "fm"])


def _sd(**changes):
    sd = tiny_resnet().state_dict()
    for k, v in changes.items():
        if v is None:
            sd.pop(k)
        else:
            sd[k] = v
    return sd


def _poisoned(value):
    sd = tiny_resnet().state_dict()
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = value
    return sd


def _tiny_resnet18(env: Env) -> Path:
    m = timm.create_model(TINY_ARCH.split(":", 1)[1].split("(")[0], pretrained=False,
                          num_classes=10, in_chans=1, channels=(1, 1, 1, 1), stem_type="deep",
                          stem_width=1)
    return env.state_dict_file("tiny.pt", m.state_dict())


def _efficientnet(env: Env) -> Path:
    torch.manual_seed(0)
    m = timm.create_model("test_efficientnet", pretrained=False, num_classes=10, in_chans=1)
    return env.state_dict_file("test_efficientnet.pt", m.state_dict())


def _fmnist_with(env: Env, broken: str) -> Path:
    root = fake_mnist(env.tmp / "fm")
    if broken == "idx":
        (root / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip, not IDX")
    elif broken == "labels":
        import gzip

        n = 200
        data = struct.pack(">BBBBI", 0, 0, 8, 1, n) + bytes([42] * n)
        with gzip.open(root / "train-labels-idx1-ubyte.gz", "wb") as f:
            f.write(data)
    return root


def _data_case(spec: Callable[[Env], str]):
    def build(env):
        d = spec(env)
        root = Path(d.split(":", 1)[1]) if ":" in d else None
        ins = [env.pt] + ([root] if root is not None and root.exists() else [])
        return ["search", env.pt, "--input-size", "1,28,28", "--data", d, "--target-flops",
                "0.5", "--method", "uniform", "-o", env.out], ins
    return build


def _ckpt_case(make: Callable[[Env], Path], *extra, arch="timm:test_resnet"):
    def build(env):
        p = make(env)
        return search(p, "--arch", arch, *extra, env=env), [p]
    return build


def _target_case(*target):
    return lambda env: (search(env.pt, target=target, env=env), [env.pt])


# ------------------------------------------------------------ issue 18: validated before RUN/
PLAN_LAYERS = ("layer1.0.conv2", "layer2.0.conv2", "layer4.0.conv2")


def _plan_dict() -> dict:
    """A valid plan for the test_resnet of ``resnet_ckpt`` at 1,32,32 (tt, rank 4 on three
    layers: 0.76 of the MACs, so it meets --target-flops 0.9)."""
    m, size = tiny_resnet(), (1, 32, 32)
    specs = {s.name: s for s in find_layers(m, size)}
    cost = count_model(m, list(specs.values()), size)
    layers = tuple(LayerPlan(n, "tt", 4, specs[n]) for n in PLAN_LAYERS)
    return Plan("timm:test_resnet", 10, 1, size, layers, cost.macs, cost.params,
                Target("flops", 0.9), "uniform").to_dict()


def _plan_file(env: Env, edit: Callable[[dict], object] = lambda d: None) -> Path:
    d = _plan_dict()
    edit(d)
    return env.file("plan.json", json.dumps(d).encode())


def _plan_case(edit: Callable[[dict], object] = lambda d: None, *extra, target="0.9"):
    def build(env):
        p = _plan_file(env, edit)
        return search(env.pt, "--plan", p, *extra, target=("--target-flops", target),
                      env=env), [env.pt, p]
    return build


def _set_layer(i: int, **values):
    def edit(d):
        d["layers"][i].update(values)
    return edit


def _image(path: Path, seed: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    px = torch.randint(0, 256, (20, 20, 3), generator=torch.Generator().manual_seed(seed))
    Image.fromarray(px.to(torch.uint8).numpy()).save(path)


def _image_tree(root: Path, per_class: int, classes="ab", val: int = 2) -> Path:
    for c in classes:
        for i in range(per_class):
            _image(root / "train" / c / f"{i}.png", i)
        for i in range(val):
            _image(root / "val" / c / f"{i}.png", 100 + i)
    return root


def _rgb_checkpoint(env: Env, classes: int = 2) -> Path:
    return env.state_dict_file("test_resnet.pt", tiny_resnet(classes, in_chans=3).state_dict())


def _folder_case(make: Callable[[Path], Path], *extra):
    def build(env):
        ck, root = _rgb_checkpoint(env), make(env.tmp / "images")
        return ["search", ck, "--input-size", "3,32,32", "--data", f"imagefolder:{root}",
                "--method", "uniform", "--batch-size", "4", "--target-flops", "0.5",
                "--rank-multiple", "1", *extra, "-o", env.out], [ck, root]
    return build


def _corrupt_first(root: Path) -> Path:
    _image_tree(root, 4)
    (root / "train" / "b" / "0.png").write_bytes(b"not an image")
    return root


def _damaged_run(env: Env, text: bytes) -> None:
    """A run folder (its manifest says so) whose recorded fingerprint is damaged."""
    (env.out / "state").mkdir(parents=True)
    (env.out / "state" / "manifest.json").write_text(
        json.dumps({"written_by": "lrcompress", "files": []}))
    (env.out / "state" / "fingerprint.json").write_bytes(text)


def _flags(*flags):
    """A search of the good checkpoint with these flags."""
    return _ckpt_case(lambda e: e.pt, *flags)


def _tensor_case(key: str, make: Callable[[torch.Tensor], torch.Tensor]):
    def tensors(env):
        sd = tiny_resnet().state_dict()
        sd[key] = make(sd[key])
        return env.state_dict_file("test_resnet.pt", sd)
    return _ckpt_case(tensors)


CASES = [
    Case("empty_pt", _ckpt_case(lambda e: e.file("test_resnet.pt", b"")),
         ("empty", "Re-save")),
    Case("empty_safetensors", _ckpt_case(lambda e: e.file("test_resnet.safetensors", b"")),
         ("0 bytes", "truncated", "re-download")),
    Case("truncated_pt", _ckpt_case(
        lambda e: e.file("test_resnet.pt", e.pt.read_bytes()[: e.pt.stat().st_size // 3])),
        ("truncated", "re-save")),
    Case("truncated_safetensors", _ckpt_case(
        lambda e: e.file("test_resnet.safetensors",
                         e.st.read_bytes()[: e.st.stat().st_size // 3])),
        ("truncated",)),
    Case("st_overlapping_offsets", _ckpt_case(lambda e: e.file("test_resnet.safetensors", (
        _safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                     bytes(12))))),
        ("overlap", "corrupt")),
    Case("st_offsets_past_the_end", _ckpt_case(lambda e: e.file("test_resnet.safetensors", (
        _safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                     bytes(8))))),
        ("offsets 0..16", "data section of 8 bytes", "truncated")),
    Case("st_absurd_header_length", _ckpt_case(lambda e: e.file("test_resnet.safetensors", (
        _safetensors({}, b"", length=2**62)))),
        ("header claims", "not a safetensors file")),
    Case("st_absurd_shape", _ckpt_case(lambda e: e.file("test_resnet.safetensors", (
        _safetensors({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}},
                     bytes(8))))),
        ("offsets 0..8", "corrupt")),
    Case("pickle_runs_code_zip", _ckpt_case(
        lambda e: e.state_dict_file("test_resnet.pt", {"w": _RunsCode(e.tmp / "ran")})),
        ("imports __builtin__.exec", "run code", "--trust-pickle", "state_dict")),
    Case("pickle_runs_code_legacy", _ckpt_case(
        lambda e: e.file("test_resnet.pt", pickle.dumps({"w": _RunsCode(e.tmp / "ran")}))),
        ("imports builtins.exec", "run code", "--trust-pickle")),
    Case("whole_module", _ckpt_case(lambda e: e.state_dict_file("test_resnet.pt", tiny_resnet())),
         ("whole pickled model", "--trust-pickle")),
    Case("other_architecture", _ckpt_case(lambda e: e.pt, arch="timm:test_efficientnet"),
         ("does not fit", "timm:test_efficientnet", "--arch")),
    Case("wrong_num_classes", _ckpt_case(lambda e: e.pt, "--num-classes", "5"),
         ("--num-classes 5 contradicts", "has 10", "Drop --num-classes")),
    Case("num_classes_below_the_data", lambda e: _classes_case(e, 5),
         ("has 10 classes but the model has 5 outputs", "num_classes=10", "--num-classes 10")),
    Case("num_classes_above_the_data", lambda e: _classes_case(e, 20),
         ("has 10 classes but the model has 20 outputs", "replaced", "--allow-class-mismatch")),
    Case("nan_weights", _ckpt_case(
        lambda e: e.state_dict_file("test_resnet.pt", _poisoned(float("nan")))),
        ("NaN or Inf", "layer1.0.conv1.weight", "before training diverged")),
    Case("inf_weights", _ckpt_case(
        lambda e: e.state_dict_file("test_resnet.pt", _poisoned(float("-inf")))),
        ("NaN or Inf", "layer1.0.conv1.weight")),
    Case("extra_keys", _ckpt_case(lambda e: e.state_dict_file(
        "test_resnet.pt", _sd(**{"head.extra.weight": torch.zeros(3)}))),
        ("unexpected key(s): head.extra.weight", "--arch")),
    Case("missing_keys", _ckpt_case(lambda e: e.state_dict_file(
        "test_resnet.pt", _sd(**{"fc.weight": None, "fc.bias": None}))),
        ("missing key(s): fc.weight", "--arch")),
    Case("unknown_arch", _ckpt_case(lambda e: e.pt, arch="timm:test_resnett"),
         ("Unknown architecture 'test_resnett'", "Close matches: test_resnet")),
    Case("target_zero", _target_case("--target-flops", "0"), ("strictly between 0 and 1",)),
    Case("target_negative", _target_case("--target-flops", "-0.3"),
         ("strictly between 0 and 1",)),
    Case("target_nan", _target_case("--target-flops", "nan"), ("strictly between 0 and 1",)),
    Case("target_one", _target_case("--target-flops", "1"), ("strictly between 0 and 1",)),
    Case("target_above_one", _target_case("--target-flops", "1.5"),
         ("strictly between 0 and 1", "e.g. 0.3")),
    Case("target_params_zero", _target_case("--target-params", "0"),
         ("--target-params", "strictly between 0 and 1")),
    Case("target_unreachable", _target_case("--target-flops", "0.01"),
         ("cannot be reached", "Ask for")),
    Case("data_missing_dir", _data_case(lambda e: f"fashionmnist:{e.tmp / 'nowhere'}"),
         ("does not exist", "apt-get install dataset-fashion-mnist")),
    Case("data_empty_dir", _data_case(
        lambda e: f"fashionmnist:{(e.tmp / 'empty').mkdir() or e.tmp / 'empty'}"),
        ("No fashionmnist files", "train-images-idx3-ubyte")),
    Case("data_bad_idx_file", _data_case(lambda e: f"fashionmnist:{_fmnist_with(e, 'idx')}"),
         ("not a valid IDX file", "re-download")),
    Case("data_labels_out_of_range", _data_case(
        lambda e: f"fashionmnist:{_fmnist_with(e, 'labels')}"),
        ("labels span [42, 42]", "not fashionmnist")),
    Case("data_unknown_kind", _data_case(lambda e: "imagenet:/data/imagenet"),
         ("Cannot read --data", "imagefolder")),
    Case("output_parent_is_a_file", lambda e: (
        search(e.pt, env=Env(e.tmp, e.pt, e.st, e.file("notes.txt", b"mine") / "run")),
        [e.pt, e.tmp / "in" / "notes.txt"]),
        ("is a file, not a directory", "Choose another -o")),
    Case("output_unwritable", lambda e: (
        search(e.pt, env=Env(e.tmp, e.pt, e.st, Path("/proc/lrcompress-test/run"))), [e.pt]),
        ("Cannot write to /proc", "Choose another -o")),
    Case("output_is_a_file", lambda e: (
        search(e.pt, env=Env(e.tmp, e.pt, e.st, e.file("run.txt", b"mine"))),
        [e.pt, e.tmp / "in" / "run.txt"]),
        ("exists and is not a directory", "Choose another -o")),
    Case("output_not_empty", lambda e: (
        (e.out.mkdir(), (e.out / "keep.txt").write_text("mine"), search(e.pt, env=e))[-1],
        [e.pt]),
        ("is not empty", "--overwrite")),
    Case("overwrite_not_a_run", lambda e: (
        (e.out.mkdir(), (e.out / "state").mkdir(), (e.out / "state" / "mine.json").write_text("1"),
         (e.out / "report.md").write_text("my notes"), (e.out / "plan.json").write_text("{}"),
         search(e.pt, "--overwrite", env=e))[-1], [e.pt]),
        ("is not an lrcompress run", "only replaces files an lrcompress run wrote",
         "Choose another -o")),
    Case("no_decomposable_layer", lambda e: (
        ["search", _efficientnet(e), *SEARCH, "--target-flops", "0.5", "--include", "*conv_dw",
         "-o", e.out], [e.tmp / "in" / "test_efficientnet.pt"]),
        ("No layer of timm:test_efficientnet can be factorized", "depthwise", "--include")),
    Case("everything_excluded", lambda e: (search(e.pt, "--exclude", "*", env=e), [e.pt]),
         ("No layer", "excluded by --exclude", "--include more layers")),
    Case("layers_too_small", lambda e: (
        ["search", _tiny_resnet18(e), "--arch", TINY_ARCH, *SEARCH, "--target-flops", "0.5",
         "--decomp", "svd", "--include", "layer*", "-o", e.out], [e.tmp / "in" / "tiny.pt"]),
        ("No layer", "too small", "no svd rank saves MACs and params", "another --decomp")),
    Case("plan_other_in_chans", _plan_case(lambda d: d.update(in_chans=3)),
         ("another variant of timm:test_resnet", "in_chans 3 (the model has 1)")),
    Case("plan_other_num_classes", _plan_case(lambda d: d.update(num_classes=5)),
         ("another variant", "num_classes 5 (the model has 10)")),
    Case("plan_other_input_size", _plan_case(lambda d: d.update(input_size=[1, 64, 64])),
         ("made for input size 1,64,64", "this run uses 1,32,32", "--input-size")),
    Case("plan_with_another_input_size_flag", lambda e: (
        ["search", e.pt, "--plan", _plan_file(e), "--data", "synthetic:16", "--method",
         "uniform", "--batch-size", "8", "--target-flops", "0.9", "--input-size", "1,40,40",
         "-o", e.out], [e.pt, e.tmp / "in" / "plan.json"]),
        ("made for input size 1,32,32", "uses 1,40,40", "Drop --input-size")),
    Case("plan_other_architecture", _plan_case(lambda d: d.update(arch="timm:resnet18")),
         ("made for timm:resnet18, not timm:test_resnet",)),
    Case("plan_rank_zero", _plan_case(_set_layer(0, rank=0)),
         ("'layer1.0.conv2' rank 0", "1 or more", "Fix the rank")),
    Case("plan_rank_negative", _plan_case(_set_layer(1, rank=-3)),
         ("'layer2.0.conv2' rank -3", "1 or more")),
    Case("plan_rank_above_full_rank", _plan_case(_set_layer(0, rank=100000)),
         ("rank 100000", "above the layer's full rank (32 with tt)")),
    Case("plan_rank_not_a_whole_number", _plan_case(_set_layer(0, rank=2.5)),
         ("rank 2.5, not a whole number",)),
    Case("plan_duplicated_layer", _plan_case(lambda d: d["layers"].append(d["layers"][0])),
         ("lists layer 'layer1.0.conv2' twice", "Remove the duplicate")),
    Case("plan_unknown_layer", _plan_case(_set_layer(0, name="nope.conv")),
         ("names layer 'nope.conv'", "lrcompress inspect")),
    Case("plan_unknown_factorization", _plan_case(_set_layer(0, method="bogus")),
         ("layer 'layer1.0.conv2'", "Unknown decomposition 'bogus'")),
    Case("plan_layer_shape_edited", _plan_case(
        lambda d: d["layers"][0]["spec"].update(in_ch=99)),
        ("describes layer 'layer1.0.conv2' as conv2d 99->32", "model's is conv2d 32->32")),
    Case("plan_dense_cost_edited", _plan_case(lambda d: d.update(base_macs=5)),
         ("records the dense model at 5 MACs", "another model or edited")),
    Case("plan_misses_the_target", _plan_case(target="0.5"),
         ("keeps 0.7591 of the model's MACs", "--target-flops 0.5", "(--target-flops 0.9)")),
    Case("plan_contradicts_decomp", _plan_case(lambda d: None, "--decomp", "svd"),
         ("--decomp svd contradicts", "factorizes with tt", "Drop --decomp")),
    Case("batch_size_one_batchnorm", _flags("--batch-size", "1"),
        ("--batch-size 1", "BatchNorm re-estimation", "2 or more", "--bn-batches 0")),
    Case("batch_size_one_finetuning",
         _flags("--batch-size", "1", "--bn-batches", "0", "--max-steps", "2"),
         ("--batch-size 1", "fine-tuning", "2 or more")),
    Case("tiny_image_folder", _folder_case(lambda r: _image_tree(r, 3)),
         ("calib split holds only 1 sample", "--calib-fraction", "--bn-batches 0")),
    Case("image_folder_corrupt_image", _folder_case(_corrupt_first, "--calib-fraction", "0.3"),
         ("Cannot read image", "train/b/0.png", "Remove or replace")),
    Case("image_folder_truncated_image", _folder_case(
        lambda r: (_image_tree(r, 4), (r / "val" / "a" / "1.png").write_bytes(
            (r / "val" / "a" / "1.png").read_bytes()[:60]))[0], "--calib-fraction", "0.3"),
        ("Cannot read image", "val/a/1.png")),
    Case("device_meta", _ckpt_case(lambda e: e.pt, "--device", "meta"),
         ("--device meta is not supported", "no data", "cpu")),
    Case("device_other_backend", _ckpt_case(lambda e: e.pt, "--device", "mps"),
         ("--device mps is not supported", "auto, cpu, cuda")),
    Case("kd_temperature_zero", _flags("--max-steps", "2", "--kd-temperature", "0"),
        ("--kd-temperature 0.0 is out of range", "> 0")),
    Case("kd_temperature_nan", _flags("--max-steps", "2", "--kd-temperature", "nan"),
        ("--kd-temperature nan", "finite")),
    Case("lr_inf", _flags("--max-steps", "2", "--lr", "inf"),
         ("--lr inf is out of range", "finite")),
    Case("weight_decay_negative", _flags("--max-steps", "2", "--weight-decay", "-1"),
        ("--weight-decay -1.0", ">= 0")),
    Case("grad_clip_negative", _flags("--max-steps", "2", "--grad-clip", "-1"),
        ("--grad-clip -1.0", "0 turns clipping off")),
    Case("search_tol_nan", _flags("--search-tol", "nan"), ("--search-tol nan",)),
    Case("vbmf_weaken_nan", _flags("--vbmf-weaken", "nan"), ("--vbmf-weaken nan",)),
    Case("mean_nan", _flags("--mean", "nan"),
         ("NaN or inf", "finite numbers")),
    Case("std_inf", _flags("--std", "inf"),
         ("NaN or inf",)),
    Case("rank_multiple_above_every_rank", _flags("--rank-multiple", "100000"),
        ("--rank-multiple 100000 is larger than every", "largest that saves MACs is 95",
         "--rank-multiple 16 or less")),
    Case("damaged_fingerprint", lambda e: (
        _damaged_run(e, b'{"arch": '), (search(e.pt, env=e), [e.pt]))[1],
        ("damaged run folder", "fingerprint.json", "--overwrite", "another -o")),
    Case("fingerprint_not_an_object", lambda e: (
        _damaged_run(e, b"[1, 2]"), (search(e.pt, env=e), [e.pt]))[1],
        ("damaged run folder", "a JSON list")),
    Case("meta_tensor_checkpoint", _tensor_case(
        "fc.weight", lambda t: torch.empty(t.shape, device="meta")),
        ("'fc.weight' is a meta tensor", "not dense real-valued weights")),
    Case("sparse_tensor_checkpoint", _tensor_case("fc.weight", lambda t: t.to_sparse()),
         ("'fc.weight' is a sparse_coo tensor",)),
    Case("complex_weights", _tensor_case(
        "layer1.0.conv1.weight", lambda t: t.to(torch.complex64)),
        ("is a complex64 tensor",)),
    Case("integer_weights", _tensor_case(
        "layer1.0.conv1.weight", lambda t: (t * 100).to(torch.int8)),
        ("layer1.0.conv1.weight: int8 where the model keeps float32", "float weights")),
    pytest.param(
        Case("device_cuda_without_gpu", _ckpt_case(lambda e: e.pt, "--device", "cuda"),
             ("no CUDA GPU", "--device cpu")),
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
]


def _ids(c):
    return c.id


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_bad_input_exit_2_message_nothing_written(case, resnet_ckpt, tmp_path):
    env = Env(tmp_path, resnet_ckpt["pt"], resnet_ckpt["safetensors"], tmp_path / "run")
    args, inputs = case.build(env)
    out = Path(args[args.index("-o") + 1])
    inputs = [*inputs, env.pt, env.st]
    before = {p: _digest(p) for p in inputs}
    out_before = _digest(out) if out.is_dir() else None
    code, text = run(*args)
    assert code == 2, text
    assert text.count("Error: ") == 1 and "Traceback" not in text, text
    for w in case.words:
        assert w in text, f"{w!r} not in: {text}"
    assert {p: _digest(p) for p in inputs} == before, "an input was modified"
    if out_before is None:
        assert not out.exists() or out.is_file(), f"{out} was created"
    else:
        assert _digest(out) == out_before, f"{out} was changed"
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left behind"
    assert not (tmp_path / "ran").exists(), "code in a pickle was executed"


# --------------------------------------------------------------- pickle and header safety
def test_code_running_pickle_never_runs(tmp_path, monkeypatch):
    """The pickle is refused from its globals alone: torch.load is never even called, so the
    code in it cannot run, and neither --arch nor the file name changes that."""
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or {})
    marker = tmp_path / "ran"
    p = tmp_path / "test_resnet.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _RunsCode(marker)}, p)
    code, text = run("inspect", p, "--input-size", "1,32,32")
    assert code == 2 and "exec" in text, text
    assert calls == [] and not marker.exists()


def test_failed_safe_load_is_never_retried_unsafely(resnet_ckpt, monkeypatch):
    """torch's own error suggests weights_only=False; lrcompress must not follow it."""
    calls = []

    def failing_load(*a, **k):
        calls.append(k.get("weights_only"))
        raise pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with "
                                     "`weights_only` set to `False` will likely succeed")

    monkeypatch.setattr(torch, "load", failing_load)
    code, text = run("inspect", resnet_ckpt["pt"], "--input-size", "1,32,32")
    assert code == 2 and "weights_only=True" in text and "Traceback" not in text, text
    assert calls == [True]


def test_old_torch_refuses_pt_files(resnet_ckpt, monkeypatch):
    monkeypatch.setattr(checkpoint, "torch_version", lambda: (2, 9))
    code, text = run("inspect", resnet_ckpt["pt"], "--input-size", "1,32,32")
    assert code == 2, text
    for w in ("CVE-2025-32434", "CVE-2026-24747", "torch>=2.10", ".safetensors"):
        assert w in text, text
    assert checkpoint.MIN_SAFE_TORCH >= (2, 10)
    # safetensors holds no pickle: it stays readable with any torch
    assert run("inspect", resnet_ckpt["safetensors"], "--input-size", "1,32,32")[0] == 0


@pytest.mark.parametrize("kind", ["entries", "values", "length", "shape"])
def test_absurd_safetensors_refused_before_allocating(tmp_path, monkeypatch, kind):
    """Absurd headers are refused from the header alone: safetensors never reads the file, and
    a header with absurdly many values is refused before it is even parsed."""
    import safetensors.torch

    loads, parsed = [], []
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: loads.append(a) or {})
    real_json = checkpoint.json.loads
    monkeypatch.setattr(checkpoint.json, "loads", lambda s: parsed.append(1) or real_json(s))
    if kind == "values":
        monkeypatch.setattr(checkpoint, "MAX_ENTRIES", 8)
        header = {"a": {"dtype": "U8", "shape": [1] * 200, "data_offsets": [0, 1]}}
        data, words = _safetensors(header, bytes(1)), "more than 8 tensors would need"
    elif kind == "entries":
        monkeypatch.setattr(checkpoint, "MAX_ENTRIES", 8)
        header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]}
                  for i in range(9)}
        data, words = _safetensors(header, bytes(9)), "lists 9 tensors"
    elif kind == "length":
        data, words = _safetensors({}, b"", length=2**63 - 1), "header claims"
    else:
        header = {"a": {"dtype": "F64", "shape": [2**31, 2**31, 2**31], "data_offsets": [0, 8]}}
        data, words = _safetensors(header, bytes(8)), "offsets 0..8"
    p = tmp_path / "test_resnet.safetensors"
    p.write_bytes(data)
    code, text = run("inspect", p, "--arch", "timm:test_resnet", "--input-size", "1,32,32")
    assert code == 2 and words in text, text
    assert loads == []
    assert parsed == ([] if kind in ("values", "length") else [1])


def test_allow_class_mismatch_lets_a_wider_head_run(tmp_path):
    """A 20-output classifier on a 10-class data set: refused by eval, run with the flag."""
    ckpt = tmp_path / "test_resnet.pt"
    torch.save(tiny_resnet(num_classes=20).state_dict(), ckpt)
    args = ("eval", ckpt, "--input-size", "1,28,28", "--data",
            f"fashionmnist:{fake_mnist(tmp_path / 'fm')}", "--no-latency", "--json")
    code, text = run(*args)
    assert code == 2 and "--allow-class-mismatch" in text and "Traceback" not in text
    code, text = run(*args, "--allow-class-mismatch")
    assert code == 0, text
    assert json.loads(text[text.index("{"):])["accuracy"]["n"] > 0


# ---------------------------------------------------------------------- --overwrite
def _manifest(out: Path) -> set[str]:
    return set(json.loads((out / "state" / "manifest.json").read_text())["files"])


def test_overwrite_replaces_results_only(resnet_ckpt, tmp_path):
    """A folder that is not a run is refused, --overwrite or not (cases output_not_empty,
    overwrite_not_a_run). In a run folder --overwrite removes exactly the files the manifest
    lists (and the stage state): the user's files there, even inside the run's own plots/,
    are left alone."""
    out = tmp_path / "run"
    args = ("search", resnet_ckpt["pt"], *SEARCH, "--rank-multiple", "1", "-o", out)
    code, text = run(*args, "--target-flops", "0.5")
    assert code == 0, text
    written = _manifest(out)
    assert {"model.safetensors", "plan.json", "report.json", "report.md", "report.html"} <= written
    assert all((out / f).is_file() for f in written - {"cache/signals.json"})
    old_model = (out / "model.safetensors").read_bytes()
    (out / "keep.txt").write_text("mine")
    (out / "plots" / "mine.png").write_bytes(b"my plot")
    code, text = run(*args, "--target-flops", "0.7", "--overwrite")
    assert code == 0, text
    assert (out / "keep.txt").read_text() == "mine"
    assert (out / "plots" / "mine.png").read_bytes() == b"my plot"
    assert (out / "model.safetensors").read_bytes() != old_model  # the new result
    assert json.loads((out / "report.json").read_text())["target"]["ratio"] == 0.7
    assert "keep.txt" not in _manifest(out) and "plots/mine.png" not in _manifest(out)
    assert not (out / ".lrcompress.lock").exists()


def test_overwrite_on_a_run_from_before_manifests(resnet_ckpt, tmp_path):
    """A run written before state/manifest.json existed is still a run (its fingerprint says
    so): --overwrite removes the result files earlier versions wrote, and nothing else."""
    out = tmp_path / "run"
    args = ("search", resnet_ckpt["pt"], *SEARCH, "--target-flops", "0.5", "-o", out)
    assert run(*args)[0] == 0
    (out / "state" / "manifest.json").unlink()
    (out / "keep.txt").write_text("mine")
    code, text = run(*args, "--overwrite")
    assert code == 0, text
    assert (out / "keep.txt").read_text() == "mine" and "keep.txt" not in _manifest(out)
    # a state/fingerprint.json that is not lrcompress's does not make a run
    other = tmp_path / "other"
    (other / "state").mkdir(parents=True)
    (other / "state" / "fingerprint.json").write_text('{"mine": 1}')
    code, text = run("search", resnet_ckpt["pt"], *SEARCH, "--target-flops", "0.5", "-o", other,
                     "--overwrite")
    assert code == 2 and "is not an lrcompress run" in text, text
    assert (other / "state" / "fingerprint.json").read_text() == '{"mine": 1}'


def test_overwrite_never_removes_an_input(resnet_ckpt, tmp_path):
    """--overwrite refuses (exit 2, nothing changed) when the checkpoint or the data it reads
    is among, or inside, what it would remove: here the user put their checkpoint where the
    run's model was, and points --data at the run's plots/."""
    out = tmp_path / "run"
    code, text = run("search", resnet_ckpt["pt"], *SEARCH, "--target-flops", "0.5", "-o", out)
    assert code == 0, text
    ckpt = out / "model.safetensors"
    ckpt.write_bytes(resnet_ckpt["safetensors"].read_bytes())  # the user's original model
    before = _digest(out)
    for model, data, hit in ((ckpt, "synthetic:16", ckpt),
                             (resnet_ckpt["pt"], f"imagefolder:{out / 'plots'}", "plots/")):
        code, text = run("search", model, "--arch", "timm:test_resnet", "--input-size",
                         "1,32,32", "--data", data, "--method", "uniform", "--target-flops",
                         "0.5", "-o", out, "--overwrite")
        assert code == 2 and "--overwrite would remove" in text and str(hit) in text, text
        assert "Move the input out of" in text and "Traceback" not in text
        assert _digest(out) == before


# ------------------------------------------------------------------ one writer per RUN/
_HOLD = """
import sys, time
from lrcompress.util.folder_lock import FolderLock
lock = FolderLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_holder(resnet_ckpt, tmp_path):
    """Another process holds RUN/'s lock: search (resuming or overwriting) and export are
    refused at once, before any work, naming the holder's pid and host; nothing is changed."""
    import socket
    import subprocess
    import sys

    out = tmp_path / "run"
    args = ("search", resnet_ckpt["pt"], *SEARCH, "--target-flops", "0.5", "-o", out)
    assert run(*args)[0] == 0
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _digest(out)
        for cmd in (args, (*args, "--overwrite"), ("export", out, "--no-latency")):
            code, text = run(*cmd)
            assert code == 2, text
            for w in ("being written by another lrcompress process", f"pid {holder.pid}",
                      socket.gethostname(), "started"):
                assert w in text, text
            assert _digest(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert run(*args, "--overwrite")[0] == 0  # its lock died with it


def test_a_stale_lock_is_taken_over(resnet_ckpt, tmp_path):
    """A lock file left by a process that died (kill -9: no clean-up) does not block: the
    kernel dropped its lock, so the next writer takes the file over and removes it at the end."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".lrcompress.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": "here", "started": "earlier"}))
    code, text = run("search", resnet_ckpt["pt"], *SEARCH, "--target-flops", "0.5", "-o", out)
    assert code == 0, text
    assert (out / "report.json").is_file() and not lock.exists()


def test_two_searches_into_one_empty_folder(resnet_ckpt, tmp_path, monkeypatch):
    """Two different searches started into the same empty -o: both pass the early check, one
    finishes first; the other re-checks under the lock before writing anything and is refused,
    so the finished result is not lost (before: both exited 0, one result overwritten)."""
    from lrcompress.commands import run_dir
    from lrcompress.commands.search import SearchConfig
    from lrcompress.commands.search import search as api_search
    from lrcompress.data import DataConfig
    from lrcompress.model.plan import Target

    out = tmp_path / "run"
    real_open, first = run_dir.RunDir.open, []

    def open_after_the_other_finished(self):
        if not first:
            first.append(1)
            cfg = SearchConfig(target=Target("flops", 0.7), method="uniform",
                               input_size=(1, 32, 32), data=DataConfig(batch_size=8))
            api_search(str(resnet_ckpt["pt"]), "synthetic:16", out, cfg)
        return real_open(self)

    monkeypatch.setattr(run_dir.RunDir, "open", open_after_the_other_finished)
    code, text = run("search", resnet_ckpt["pt"], *SEARCH, "--target-flops", "0.5", "-o", out)
    assert code == 2 and "holds the finished result of a different command" in text, text
    assert "differs in: target" in text and "Traceback" not in text
    report = json.loads((out / "report.json").read_text())
    assert report["target"]["ratio"] == 0.7  # the other search's result is intact
    assert not (out / ".lrcompress.lock").exists()


def test_the_corpus_covers_every_item_of_the_issue():
    """The checklist in the module docstring names only cases and tests that exist."""
    names = {(c.values[0] if hasattr(c, "values") else c).id for c in CASES}
    names |= {n for n in globals() if n.startswith("test_")}
    listed = __doc__.split("Checklist", 1)[1]
    tokens = set(re.findall(r"\b[a-z]+(?:_[a-z0-9]+)+\b", listed))
    tokens -= {"weights_only", "num_classes", "state_dict"}  # words of the issue, not ids
    assert len(tokens) > 40
    assert tokens <= names, f"listed but not defined: {sorted(tokens - names)}"
    assert {c for c in names if not c.startswith("test_")} <= tokens, "a case is not listed"


# ----------------------------------------------------------------------- issue 18, by test
def test_output_empty_name_is_refused(resnet_ckpt, tmp_path, monkeypatch):
    """-o "" is not the current folder: refused, and nothing is written there."""
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    code, text = run("search", resnet_ckpt["pt"], *SEARCH, "--target-flops", "0.5", "-o", "")
    assert code == 2 and '-o "" names no folder' in text, text
    assert sorted(tmp_path.rglob("*")) == before


def test_refused_input_leaves_nothing_so_the_fix_runs(resnet_ckpt, tmp_path):
    """A refused --batch-size 1 writes nothing, so the fixed command (same -o) is not refused
    as "a different command"."""
    out = tmp_path / "run"
    code, text = run("search", resnet_ckpt["pt"], *SEARCH, "--target-flops", "0.5",
                     "--batch-size", "1", "-o", out)
    assert code == 2 and not out.exists(), text
    code, text = run("search", resnet_ckpt["pt"], *SEARCH, "--target-flops", "0.5",
                     "--rank-multiple", "1", "-o", out)
    assert code == 0, text
    assert (out / "report.json").is_file()


def test_damaged_run_folder_fix_works(resnet_ckpt, tmp_path):
    """The fix the damaged-fingerprint message gives (--overwrite) then runs."""
    out = tmp_path / "run"
    _damaged_run(Env(tmp_path, resnet_ckpt["pt"], resnet_ckpt["safetensors"], out), b"\xff\xfe")
    args = ("search", resnet_ckpt["pt"], *SEARCH, "--target-flops", "0.5", "--rank-multiple",
            "1", "-o", out)
    code, text = run(*args)
    assert code == 2 and "damaged run folder" in text and "--overwrite" in text, text
    code, text = run(*args, "--overwrite")
    assert code == 0, text
    assert json.loads((out / "state" / "fingerprint.json").read_text())["data_spec"]


def test_plan_brings_its_decomp_and_input_size(resnet_ckpt, tmp_path):
    """--plan without --decomp or --input-size: the plan's own (tt, 1,32,32) are used and the
    report says so; the compressed model has exactly the plan's MACs."""
    env = Env(tmp_path, resnet_ckpt["pt"], resnet_ckpt["safetensors"], tmp_path / "run")
    plan = _plan_file(env)
    code, text = run("search", env.pt, "--plan", plan, "--data", "synthetic:16", "--method",
                     "uniform", "--batch-size", "8", "--target-flops", "0.9", "-o", env.out)
    assert code == 0, text
    report = json.loads((env.out / "report.json").read_text())
    assert report["config"]["decomp"] == "tt"
    written = json.loads((env.out / "plan.json").read_text())
    assert written["input_size"] == [1, 32, 32]
    assert [(x["name"], x["rank"]) for x in written["layers"]] == [(n, 4) for n in PLAN_LAYERS]
    assert written["macs"] == Plan.from_dict(_plan_dict()).macs


def test_fingerprint_records_plan_and_data_contents(tmp_path):
    """An edited plan file or changed data changes the fingerprint (the path alone did not),
    so a re-run never continues a run made from other contents."""
    from lrcompress.commands.compress import CompressConfig
    from lrcompress.commands.search import fingerprint

    env = Env(tmp_path, tmp_path / "x.pt", tmp_path / "x.st", tmp_path / "run")
    plan = _plan_file(env)
    root = _image_tree(tmp_path / "images", 2)
    cfg = CompressConfig(Target("flops", 0.9), plan_path=str(plan))
    spec = f"imagefolder:{root}"

    def fp():
        return fingerprint("timm:test_resnet", spec, cfg, {"eval_spec": spec})

    first = fp()
    assert fp() == first  # stable when nothing changed
    _plan_file(env, _set_layer(0, rank=8))
    edited = fp()
    assert edited["plan_sha256"] != first["plan_sha256"]
    assert {k for k in first if first[k] != edited[k]} == {"plan_sha256"}
    _image(root / "train" / "a" / "extra.png", 7)
    changed = fp()
    assert changed["data_files"]["files"] == first["data_files"]["files"] + 1
    assert changed["data_files"]["sha256"] != edited["data_files"]["sha256"]
    assert changed["eval_files"] == changed["data_files"]


def test_corrupt_image_found_later_is_exit_2_naming_it(tmp_path):
    """An unreadable image outside the sample decoded up front stops the run with exit 2
    naming it, also from a DataLoader worker process (no traceback in the message)."""
    env = Env(tmp_path, tmp_path / "x.pt", tmp_path / "x.st", tmp_path / "run")
    root = _image_tree(tmp_path / "images", 10)
    bad = root / "train" / "b" / "8.png"
    bad.write_bytes(bad.read_bytes()[:50])
    ck = _rgb_checkpoint(env)
    code, text = run("search", ck, "--input-size", "3,32,32", "--data", f"imagefolder:{root}",
                     "--method", "uniform", "--batch-size", "4", "--target-flops", "0.5",
                     "--rank-multiple", "1", "--calib-fraction", "0.3", "--max-steps", "6",
                     "--workers", "2", "-o", env.out)
    assert code == 2, text
    assert f"Cannot read image {bad}" in text and "--overwrite" in text, text
    assert "Traceback" not in text and "DataLoader worker" not in text, text


def test_half_precision_weights_still_load(tmp_path):
    """float16 weights are floats: loaded (converted), unlike int8 / complex ones."""
    p = tmp_path / "test_resnet.pt"
    torch.save({k: v.half() if v.is_floating_point() else v
                for k, v in tiny_resnet().state_dict().items()}, p)
    code, text = run("inspect", p, "--input-size", "1,32,32", "--json")
    assert code == 0, text


@pytest.mark.parametrize("arch, words", [
    ("timm:test_resnet(channels=())", ("Cannot build timm:test_resnet", "IndexError",
                                       "Check the arguments")),
    ("timm:test_resnet(channels=(1,))", ("The model failed", "AttributeError",
                                         "architecture's arguments")),
    ("timm:test_resnet(drop_rate='x')", ("The model failed", "ValueError")),
])
def test_architecture_errors_are_exit_2(arch, words):
    """A constructor (or the built model's forward) failing on the spec's arguments is bad
    input naming the spec, not an internal error."""
    code, text = run("inspect", arch)
    assert code == 2, text
    assert text.count("Error: ") == 1 and "Traceback" not in text, text
    for w in words:
        assert w in text, text
