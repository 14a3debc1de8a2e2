"""Dataset specs -> train / calibration / test loaders.

A spec names a source: ``fashionmnist:ROOT``, ``mnist:ROOT``, ``cifar10:ROOT``, ``cifar100:ROOT``
(local files only, nothing is ever downloaded), ``imagefolder:DIR`` (``DIR/train/CLASS/*``,
``DIR/val/CLASS/*``; or a flat folder of images, ``DIR/*.jpg``: unlabelled, see below) or
``synthetic[:N]`` (seeded random inputs for tests).

A flat image folder has no labels and no test split: every image serves both calibration and
fine-tuning, labelled by the original model's top-1 (lrcompress.batches), and accuracy needs a
labelled test set from elsewhere (``--eval-data``). Every image of a flat folder is opened before
any work, so an unreadable one is named at once; in a class tree the first
:data:`SAMPLE_PER_CLASS` images of every class folder (train/ and val/) are decoded before any
work, and an unreadable image found later stops the run with exit code 2, naming the file (it is
never skipped: the run would silently train and measure on other data than asked).

Splits: a seeded ``calib_fraction`` of the official TRAINING set is held out as the calibration
split that drives rank search; the rest is the train split; the test split is the official
test/val set. The three never overlap, and accuracy is only ever measured on the test split.

MNIST, Fashion-MNIST and CIFAR are decoded once into one uint8 tensor (IDX files are read directly,
in Debian's flat layout or torchvision's ``FashionMNIST/raw``; CIFAR from its python folder through
an unpickler that only accepts numpy arrays). Their transforms run on whole batches of tensors
through the dataset's ``__getitems__``, so a DataLoader with the default collate gets batches at
memory speed. Every split dataset exposes ``indices`` (rows of its pool) and ``pool``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import pickle
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from lrcompress.errors import UserError

log = logging.getLogger(__name__)

SPEC_KINDS = ("fashionmnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
FMNIST_HINT = ("On Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts the files in "
               "/usr/share/datasets/fashion-mnist.")
_NATIVE = {"fashionmnist": (1, 28, 28), "mnist": (1, 28, 28),
           "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}
_NUM_CLASSES = {"fashionmnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100}
# Random-crop padding in native pixels, and whether a horizontal flip keeps the label (digits: no).
_AUGMENT = {"fashionmnist": (2, True), "mnist": (2, False), "cifar10": (4, True),
            "cifar100": (4, True)}
_EXAMPLES = ("fashionmnist:/usr/share/datasets/fashion-mnist, cifar10:~/data, "
             "imagefolder:~/data/imagenette, synthetic or synthetic:256")


# ---------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class DataSpec:
    kind: str  # one of SPEC_KINDS
    root: str | None  # the folder holding the files; None for synthetic
    samples: int = 512  # synthetic only: samples in each of train, calib and test

    def __post_init__(self):
        if self.kind not in SPEC_KINDS:
            raise UserError(f"Unknown data kind {self.kind!r}: use one of {', '.join(SPEC_KINDS)}"
                            f" (e.g. {_EXAMPLES}).")
        if self.kind != "synthetic" and not self.root:
            raise UserError(f"--data {self.kind} needs the folder holding its files: write "
                            f"{self.kind}:ROOT, e.g. {self.kind}:{_example_root(self.kind)}.")
        if self.samples < 1:
            raise UserError(f"synthetic:{self.samples} asks for no samples: write synthetic:N "
                            "with N >= 1 samples per split (default 512).")

    def __str__(self) -> str:
        if self.kind == "synthetic":
            return f"synthetic:{self.samples}"
        return f"{self.kind}:{self.root}"


def _example_root(kind: str) -> str:
    return "/usr/share/datasets/fashion-mnist" if kind == "fashionmnist" else "~/data"


def parse_data_spec(text: str) -> DataSpec:
    """``KIND:ROOT`` or ``synthetic[:N]`` -> DataSpec. Kinds are case- and dash-insensitive."""
    kind, sep, rest = str(text).strip().partition(":")
    kind = kind.lower().replace("-", "").replace("_", "")
    if kind not in SPEC_KINDS:
        raise UserError(f"Cannot read --data {text!r}: the part before ':' must be one of "
                        f"{', '.join(SPEC_KINDS)}. Examples: {_EXAMPLES}.")
    rest = rest.strip()
    if kind == "synthetic":
        if not rest:
            return DataSpec("synthetic", None)
        if not rest.isdigit():
            raise UserError(f"Cannot read --data {text!r}: synthetic takes an optional number of "
                            "samples per split, e.g. synthetic:256.")
        return DataSpec("synthetic", None, samples=int(rest))
    if not sep or not rest:
        raise UserError(f"--data {text!r} names no folder: write {kind}:ROOT, e.g. "
                        f"{kind}:{_example_root(kind)}.")
    return DataSpec(kind, os.path.expanduser(rest))


def files_digest(spec: DataSpec | str) -> dict | None:
    """What a run's fingerprint records of the data's files: their count and a SHA-256 of every
    file's path under the root, size and modification time (None for synthetic data, or a root
    that does not exist: that is refused later, with its own message). Cheap next to reading
    the data, and any file added, removed, replaced or edited changes it."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    root = Path(spec.root) if spec.root else None
    if root is None or not root.is_dir():
        return None
    h, count = hashlib.sha256(), 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            p = Path(folder) / name
            try:
                st = p.stat()
            except OSError:  # a dangling link: listed, it cannot be read either way
                st = None
            rel = p.relative_to(root).as_posix()
            h.update(f"{rel}\0{st and st.st_size}\0{st and st.st_mtime_ns}\n".encode())
            count += 1
    return {"files": count, "sha256": h.hexdigest()}


def native_input_size(spec: DataSpec | str) -> tuple[int, int, int] | None:
    """(C, H, W) the dataset's images come in: (1,28,28) (Fashion-)MNIST, (3,32,32) CIFAR."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    return _NATIVE.get(spec.kind)


# ----------------------------------------------------------------------------------- preprocess
@dataclass(frozen=True)
class Preprocess:
    input_size: tuple[int, int, int]  # (C, H, W) the model is fed
    mean: tuple[float, ...]  # one per channel, in [0, 1] pixel units
    std: tuple[float, ...]
    interpolation: str = "bilinear"  # used when the data is resized: nearest|bilinear|bicubic
    crop_pct: float = 1.0  # imagefolder only: resize to size/crop_pct, then crop (timm's rule)

    def __post_init__(self):
        for name in ("input_size", "mean", "std"):  # lists from JSON become tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.input_size) != 3 or any(int(v) < 1 for v in self.input_size):
            raise UserError(f"input size {self.input_size} is not C,H,W with positive values; "
                            "pass e.g. --input-size 3,224,224.")
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        c = self.input_size[0]
        for name in ("mean", "std"):
            if len(getattr(self, name)) != c:
                raise UserError(f"--{name} has {len(getattr(self, name))} values but the input "
                                f"has {c} channel(s): give one value per channel.")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise UserError(f"--mean {self.mean} / --std {self.std} holds NaN or inf: give "
                            "finite numbers, one per channel (e.g. --mean 0.5 --std 0.25).")
        if any(s <= 0 for s in self.std):
            raise UserError(f"--std {self.std} has a value <= 0: each std must be positive.")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}.")
        if not 0 < self.crop_pct <= 1:
            raise UserError(f"crop_pct {self.crop_pct} must be in (0, 1].")


def _stem_channels(model: nn.Module | None) -> int | None:
    if model is None:
        return None
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            return int(mod.in_channels)
    return None


def _explicit_size(input_size) -> tuple[int | None, int, int]:
    """int, (H, W) or (C, H, W) -> (C or None, H, W)."""
    if isinstance(input_size, int):
        return None, input_size, input_size
    size = tuple(int(v) for v in input_size)
    if len(size) == 2:
        return None, *size
    if len(size) == 3:
        return size
    raise UserError(f"--input-size {input_size} must be C,H,W (or H,W, or one number for a "
                    "square), e.g. 3,224,224.")


def _adapt_stats(values, chans: int, name: str, explicit: bool) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == chans:
        return values
    if len(values) == 1:  # one value means every channel
        return values * chans
    if not explicit and len(values) == 3 and chans == 1:  # grayscale model, RGB stats: average
        return (sum(values) / 3,)
    raise UserError(f"--{name} has {len(values)} values but the model takes {chans} channel(s): "
                    f"give {chans} value(s) (or one for all channels).")


def resolve_preprocess(model: nn.Module | None, spec: DataSpec | None, input_size=None,
                       mean=None, std=None, in_chans: int | None = None,
                       recorded: dict | None = None) -> Preprocess:
    """The input size, normalization and interpolation the model is fed with on ``spec``
    (None: no data, the model's own).

    Size: explicit ``input_size`` > the dataset's native size (MNIST/CIFAR models usually run at
    native resolution) > the size ``recorded`` in the checkpoint > timm's data config of
    ``model`` > 224. Channels: ``in_chans`` (the model's stem) > an explicit C in ``input_size``
    > the first Conv2d's in_channels > the data's. Mean/std: explicit (one value, or one per
    channel) > ``recorded`` > timm's data config > ImageNet's, adapted to the channel count (RGB
    stats averaged for a 1-channel model).
    """
    native = native_input_size(spec) if spec is not None else None
    cfg = {}
    if model is not None:
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
    cfg.update({k: v for k, v in (recorded or {}).items() if v is not None})
    exp_c, exp_hw = None, None
    if input_size is not None:
        exp_c, *exp_hw = _explicit_size(input_size)
    if in_chans is not None and exp_c is not None and in_chans != exp_c:
        raise UserError(f"--input-size {tuple(input_size)} has {exp_c} channel(s) but the model "
                        f"takes {in_chans}: use --input-size {in_chans},{exp_hw[0]},{exp_hw[1]}.")
    chans = in_chans or exp_c or _stem_channels(model) or (native[0] if native else 3)
    kind = spec.kind if spec is not None else None
    data_chans = native[0] if native else (3 if kind == "imagefolder" else None)
    if data_chans == 3 and chans == 1:
        raise UserError(f"{spec.kind} images have 3 channels but the model takes 1: use a "
                        "model with in_chans=3, or a grayscale dataset (mnist, fashionmnist).")
    if exp_hw:
        hw, src = tuple(exp_hw), "explicit"
    elif native:
        hw, src = native[1:], f"{spec.kind}'s native size"
    elif cfg.get("input_size"):
        hw, src = tuple(cfg["input_size"][1:]), "the checkpoint or timm's data config"
    else:
        hw, src = (224, 224), "default"
    pre = Preprocess(
        input_size=(chans, *hw),
        mean=_adapt_stats(mean if mean is not None else cfg.get("mean", IMAGENET_MEAN), chans,
                          "mean", explicit=mean is not None),
        std=_adapt_stats(std if std is not None else cfg.get("std", IMAGENET_STD), chans,
                         "std", explicit=std is not None),
        interpolation=cfg.get("interpolation", "bilinear"),
        crop_pct=float(cfg.get("crop_pct", 1.0)) if kind == "imagefolder" else 1.0,
    )
    log.info("preprocess for %s: %s (size from %s)", spec, pre, src)
    return pre


# --------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DataConfig:
    batch_size: int = 128  # samples per batch, every split
    workers: int = 0  # DataLoader worker processes (0: load in the main process)
    calib_fraction: float = 0.1  # share of the training set held out for calibration, in (0, 1)
    seed: int = 0  # fixes the split, the subsets, shuffling and augmentation
    train_subset: int | None = None  # use only this many train samples (None: all)
    calib_subset: int | None = None  # likewise for calibration
    test_subset: int | None = None  # likewise for test
    augment: bool = True  # random crop with padding (+ flip where labels allow) on train
    # A model with more outputs than the data set's classes is refused unless this is set (the
    # labels are then taken to be indices into the model's classes).
    allow_class_mismatch: bool = False

    def __post_init__(self):
        if self.batch_size < 1:
            raise UserError(f"batch size {self.batch_size} must be >= 1, e.g. --batch-size 128.")
        if self.workers < 0:
            raise UserError(f"workers {self.workers} must be >= 0 (0 loads in-process).")
        if not 0 < self.calib_fraction < 1:
            raise UserError(f"calib fraction {self.calib_fraction} must be in (0, 1), "
                            "e.g. 0.1 to hold out 10 % of the training set.")
        if self.seed < 0:
            raise UserError(f"seed {self.seed} must be >= 0.")
        for name in ("train_subset", "calib_subset", "test_subset"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"{name} {v} must be >= 1, or None for the whole split.")


@dataclass
class Loaders:
    train: DataLoader
    calib: DataLoader
    test: DataLoader | None  # None: no test split (a flat image folder)
    num_classes: int | None  # None: unlabelled
    preprocess: Preprocess

    @property
    def labelled(self) -> bool:
        return self.num_classes is not None


def _perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _prefix(idx: torch.Tensor, k: int | None, what: str) -> torch.Tensor:
    if k is not None and k > len(idx):
        log.warning("%s asks for %d samples but the split has %d: using all of them",
                    what, k, len(idx))
    return idx if k is None else idx[:k]


def split_indices(n_train: int, n_test: int, cfg: DataConfig):
    """(train, calib, test) row indices: train/calib into the training pool, test into the test
    pool. Calibration is the first ``calib_fraction`` of a seeded permutation of the training pool
    (independent of subsets); each subset is a prefix of its split's fixed seeded order.

    Calibration keeps its permuted order: the search reads only its first few batches, and a pool
    stored class by class (an image folder) would otherwise give it one or two classes.
    """
    perm = _perm(n_train, cfg.seed)
    n_calib = max(1, round(cfg.calib_fraction * n_train))
    if n_calib >= n_train:
        raise UserError(f"calib fraction {cfg.calib_fraction} of {n_train} training samples "
                        "leaves none to train on: use a smaller --calib-fraction.")
    calib = _prefix(perm[:n_calib], cfg.calib_subset, "calib_subset")
    train = _prefix(perm[n_calib:], cfg.train_subset, "train_subset")
    test = _prefix(_perm(n_test, cfg.seed + 1), cfg.test_subset, "test_subset").sort().values
    return train, calib, test


# ---------------------------------------------------------------------------------- file readers
_IDX = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
        "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


def _find_idx_files(kind: str, root: Path) -> dict[str, Path]:
    tv = "FashionMNIST" if kind == "fashionmnist" else "MNIST"
    dirs = [root, root / tv / "raw", root / "raw"]
    for d in dirs:
        found = {}
        for key, stem in _IDX.items():
            hit = next((d / n for n in (stem + ".gz", stem) if (d / n).is_file()), None)
            if hit is None:
                break
            found[key] = hit
        else:
            return found
    hint = f" {FMNIST_HINT}" if kind == "fashionmnist" else ""
    raise UserError(f"No {kind} files in {root}: expected {', '.join(_IDX.values())} (each "
                    f"optionally .gz) in one of {', '.join(str(d) for d in dirs)}.{hint}")


@lru_cache(maxsize=8)
def _read_idx(path: str, _stamp: tuple) -> torch.Tensor:
    """One IDX file (gz or raw) -> uint8 tensor. ``_stamp`` (mtime, size) keys the cache."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        if len(data) < 4 or data[:3] != b"\x00\x00\x08":
            raise ValueError("not an unsigned-byte IDX file (bad magic number)")
        ndim = data[3]
        dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        payload = memoryview(data)[4 + 4 * ndim:]
        if len(payload) != math.prod(dims):
            raise ValueError(f"header says {dims} but {len(payload)} bytes follow")
    except struct.error as e:
        raise ValueError(f"truncated header: {e}") from e
    return torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).reshape(dims).copy())


def _idx(path: Path, kind: str) -> torch.Tensor:
    try:
        st = path.stat()
        return _read_idx(str(path), (st.st_mtime_ns, st.st_size))
    except (OSError, EOFError, ValueError) as e:
        hint = f" {FMNIST_HINT}" if kind == "fashionmnist" else ""
        raise UserError(f"{path} is not a valid IDX file ({e}): re-download or reinstall the "
                        f"{kind} files.{hint}") from e


def _load_idx_pools(kind: str, root: Path):
    files = _find_idx_files(kind, root)
    pools = []
    for split in ("train", "test"):
        x, y = _idx(files[f"{split}_x"], kind), _idx(files[f"{split}_y"], kind)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise UserError(f"{kind} {split} files disagree: images {tuple(x.shape)}, labels "
                            f"{tuple(y.shape)} in {root}; expected N×H×W images and N labels.")
        pools.append((x.unsqueeze(1), y.long()))
    return pools


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches hold dicts of numpy arrays; refuse anything else a pickle names."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"  # numpy 2 moved it; the old name warns
        return super().find_class(module, name)


def _load_cifar_pools(kind: str, root: Path):
    folder, train_files, label_key = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "labels")
        if kind == "cifar10" else ("cifar-100-python", ["train"], "fine_labels"))
    names = [*train_files, "test_batch" if kind == "cifar10" else "test"]
    d = next((d for d in (root / folder, root) if all((d / n).is_file() for n in names)), None)
    if d is None:
        raise UserError(f"No {kind} files in {root}: expected {', '.join(names)} in {root / folder}"
                        f" or {root} (the 'python version' archive from the CIFAR site, "
                        "extracted).")

    def read(names):
        xs, ys = [], []
        for n in names:
            try:
                with open(d / n, "rb") as f:
                    batch = _NumpyOnlyUnpickler(f, encoding="latin1").load()
                x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = np.asarray(batch[label_key], dtype=np.int64)
            except (OSError, EOFError, KeyError, ValueError, TypeError,
                    pickle.UnpicklingError) as e:
                raise UserError(f"{d / n} is not a valid {kind} batch ({e!r}): re-extract the "
                                "python version of the dataset.") from e
            if len(x) != len(y):
                raise UserError(f"{d / n} has {len(x)} images but {len(y)} labels.")
            xs.append(x)
            ys.append(y)
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    return [read(train_files), read(names[-1:])]


# ------------------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class _BatchTransform:
    """uint8 N×C×H×W -> float32 normalized model input: crop/flip, channels, resize, normalize."""

    pre: Preprocess
    pad: int = 0  # random crop with this much zero padding (0: none)
    flip: bool = False
    _stats: tuple = field(init=False, repr=False)

    def __post_init__(self):
        c = self.pre.input_size[0]
        object.__setattr__(self, "_stats", (torch.tensor(self.pre.mean).view(1, c, 1, 1),
                                            torch.tensor(self.pre.std).view(1, c, 1, 1)))

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        x = x.float().div_(255)
        n, _, h, w = x.shape
        if self.pad:
            p = self.pad
            wp = w + 2 * p
            oy, ox = torch.randint(0, 2 * p + 1, (2, n, 1, 1), generator=gen)
            # one gather over flattened pixels: each sample's window at its own offset
            idx = (oy + torch.arange(h).view(1, h, 1)) * wp + ox + torch.arange(w)
            idx = idx.view(n, 1, h * w).expand(n, x.shape[1], h * w)
            x = F.pad(x, (p, p, p, p)).flatten(2).gather(2, idx).view(n, -1, h, w)
        if self.flip:
            mask = (torch.rand(n, generator=gen) < 0.5).view(n, 1, 1, 1)
            x = torch.where(mask, x.flip(-1), x)
        c, th, tw = self.pre.input_size
        if x.shape[1] != c:  # grayscale into an RGB model
            x = x.expand(-1, c, -1, -1)
        if (h, w) != (th, tw):
            mode = self.pre.interpolation
            smooth = mode != "nearest"
            x = F.interpolate(x, size=(th, tw), mode=mode, align_corners=False if smooth else None,
                              antialias=smooth and (th < h or tw < w))
            if mode == "bicubic":
                x = x.clamp_(0, 1)
        mean, std = self._stats
        return ((x - mean) / std).contiguous()


class _SyntheticPool:
    """Standard-normal images (already in normalized space), each seeded by (seed, row)."""

    def __init__(self, shape: tuple[int, int, int], n: int, seed: int):
        self.shape, self.n, self.seed = shape, n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(rows), *self.shape)
        g = torch.Generator()
        for k, r in enumerate(rows.tolist()):
            out[k] = torch.randn(self.shape, generator=g.manual_seed((self.seed << 32) + r))
        return out


class SplitDataset(Dataset):
    """Rows ``indices`` of an in-memory image pool, transformed a whole batch at a time.

    ``__getitems__`` (used by DataLoader's batched fetch) draws augmentation from a generator
    seeded by the config's seed in the main process, or by the worker's seed in a worker, so runs
    are reproducible with any number of workers.
    """

    def __init__(self, images, labels: torch.Tensor, indices: torch.Tensor, pool: str,
                 transform: _BatchTransform | None, seed: int):
        self.images, self.labels, self.indices = images, labels, indices
        self.pool, self.transform, self.seed = pool, transform, seed
        self.base_seed = seed
        self._gen, self._gen_seed = None, None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def set_epoch(self, epoch: int) -> None:
        """Augmentation from here on depends only on (seed, epoch): resumed runs match."""
        self.seed = self.base_seed * 1_000_003 + epoch
        self._gen = None

    def _generator(self) -> torch.Generator:
        info = get_worker_info()
        seed = self.seed if info is None else info.seed
        if self._gen is None or self._gen_seed != seed:
            self._gen, self._gen_seed = torch.Generator().manual_seed(seed), seed
        return self._gen

    def __getitems__(self, idx: list[int]):
        rows = self.indices[torch.as_tensor(idx, dtype=torch.long)]
        x = self.images[rows]
        if self.transform is not None:
            x = self.transform(x, self._generator())
        return list(zip(x.unbind(0), self.labels[rows].tolist(), strict=True))

    def __getstate__(self):  # generators do not pickle; workers make their own
        return {**self.__dict__, "_gen": None, "_gen_seed": None}


def _unreadable(path, e: Exception) -> UserError:
    return UserError(f"Cannot read image {path}: {e} ({type(e).__name__}). Remove or replace the "
                     "file (it may be truncated or not an image), then run again (with "
                     "--overwrite if a run stopped on it: its data changed).")


def open_rgb(path):
    """The image at ``path``, decoded, as RGB; any failure is an unreadable-image UserError
    (decoders raise many kinds of error on a damaged file)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - whatever the decoder raised, the file is bad
        raise _unreadable(path, e) from e


# Images of every class folder (train/ and val/) decoded before any work: a damaged file among
# them is named at once; one found later stops the run with exit 2, naming it.
SAMPLE_PER_CLASS = 4


def check_class_samples(samples: list[tuple[str, int]], per_class: int = SAMPLE_PER_CLASS):
    """Decode the first ``per_class`` images of each class of an ImageFolder's ``samples``."""
    seen: dict[int, int] = {}
    for path, y in samples:
        if seen.get(y, 0) < per_class:
            seen[y] = seen.get(y, 0) + 1
            open_rgb(path)


class FolderSplit(Dataset):
    """Rows ``indices`` of a torchvision ImageFolder, with per-image PIL transforms."""

    def __init__(self, folder, indices: torch.Tensor, pool: str, transform):
        self.folder, self.indices, self.pool, self.transform = folder, indices, pool, transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i: int):
        path, y = self.folder.samples[int(self.indices[i])]
        return self.transform(open_rgb(path)), y


class FlatImages(Dataset):
    """A flat folder's images, unlabelled: each item is the transformed image alone."""

    def __init__(self, files: list[Path], transform):
        self.files, self.transform = files, transform
        self.indices, self.pool = torch.arange(len(files)), "unlabelled"

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(open_rgb(self.files[i]))


def flat_image_files(root: Path) -> list[Path]:
    """The image files directly in ``root`` (by extension, sorted); [] when it has none."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def _check_images(files: list[Path]) -> None:
    """Open every image (header and data checks, no decoding): an unreadable one is named."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as img:
                img.verify()
        except (OSError, ValueError, SyntaxError) as e:
            raise _unreadable(f, e) from e


def _folder_transforms(pre: Preprocess, augment: bool):
    from torchvision import transforms as T

    _, h, w = pre.input_size
    interp = T.InterpolationMode(pre.interpolation)
    scaled = (math.floor(h / pre.crop_pct), math.floor(w / pre.crop_pct))
    resize = T.Resize(scaled[0] if h == w else scaled, interpolation=interp)
    tail = [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    ev = T.Compose([resize, T.CenterCrop((h, w)), *tail])
    if not augment:
        return ev, ev
    pad = 4 if scaled == (h, w) else 0  # otherwise the resize margin already gives room to move
    tr = T.Compose([resize, T.RandomCrop((h, w), padding=pad), T.RandomHorizontalFlip(), *tail])
    return tr, ev


def _flat_splits(root: Path, files: list[Path], pre: Preprocess, cfg: DataConfig):
    """A flat folder: every image for calibration (eval transform) and fine-tuning (augmented);
    no labels, no test split."""
    _check_images(files)
    tr_tf, ev_tf = _folder_transforms(pre, cfg.augment)
    calib = FlatImages(_subset(files, cfg.calib_subset, cfg.seed), ev_tf)
    train = FlatImages(_subset(files, cfg.train_subset, cfg.seed), tr_tf)
    log.info("imagefolder:%s is a flat folder of %d unlabelled images", root, len(files))
    return train, calib


def _subset(files: list[Path], k: int | None, seed: int) -> list[Path]:
    """``files`` in a seeded order (the first ``k`` of it when given)."""
    order = _perm(len(files), seed).tolist()
    return [files[i] for i in _prefix(torch.tensor(order), k, "subset").tolist()]


def _imagefolder_splits(root: Path, pre: Preprocess, cfg: DataConfig):
    from torchvision.datasets import ImageFolder

    folders = {}
    for part in ("train", "val"):
        try:
            folders[part] = ImageFolder(str(root / part))
        except (FileNotFoundError, OSError) as e:
            raise UserError(f"imagefolder:{root} needs {root / part}/CLASS/*.jpg (one subfolder "
                            f"per class, in train/ and val/), or unlabelled images directly in "
                            f"{root}: {e}") from e
    if folders["train"].classes != folders["val"].classes:
        raise UserError(f"{root}/train and {root}/val have different class folders: "
                        f"{folders['train'].classes} vs {folders['val'].classes}.")
    for folder in folders.values():
        check_class_samples(folder.samples)
    tr_tf, ev_tf = _folder_transforms(pre, cfg.augment)
    train, calib, test = split_indices(len(folders["train"]), len(folders["val"]), cfg)
    return (FolderSplit(folders["train"], train, "train", tr_tf),
            FolderSplit(folders["train"], calib, "train", ev_tf),
            FolderSplit(folders["val"], test, "test", ev_tf), len(folders["train"].classes))


def _tensor_splits(spec: DataSpec, pre: Preprocess, cfg: DataConfig, num_classes: int | None):
    if spec.kind == "synthetic":
        n, k = spec.samples, num_classes or 10
        if num_classes is None:
            log.info("synthetic data: 10 classes (pass num_classes for another count)")
        images = _SyntheticPool(pre.input_size, 3 * n, cfg.seed)
        labels = torch.randint(0, k, (3 * n,), generator=torch.Generator().manual_seed(cfg.seed))
        ar = torch.arange(3 * n)
        parts = [_prefix(ar[i * n:(i + 1) * n], sub, name) for i, (sub, name) in enumerate(
            [(cfg.train_subset, "train_subset"), (cfg.calib_subset, "calib_subset"),
             (cfg.test_subset, "test_subset")])]
        return [SplitDataset(images, labels, idx, "synthetic", None, cfg.seed) for idx in parts], k
    root = Path(spec.root)
    if not root.is_dir():
        hint = f" {FMNIST_HINT}" if spec.kind == "fashionmnist" else ""
        raise UserError(f"--data {spec}: folder {root} does not exist.{hint}")
    load = _load_idx_pools if spec.kind in ("mnist", "fashionmnist") else _load_cifar_pools
    (trx, try_), (tex, tey) = load(spec.kind, root)
    k = _NUM_CLASSES[spec.kind]
    for y, split in ((try_, "train"), (tey, "test")):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
            raise UserError(f"{spec} {split} labels span [{int(y.min())}, {int(y.max())}], "
                            f"outside [0, {k}): the files are not {spec.kind}.")
    if trx.shape[1] == 3 and pre.input_size[0] == 1:
        raise UserError(f"{spec.kind} images have 3 channels but the model takes 1: use a model "
                        "with in_chans=3.")
    train, calib, test = split_indices(len(trx), len(tex), cfg)
    pad, flip = _AUGMENT[spec.kind]
    aug = _BatchTransform(pre, pad=pad, flip=flip) if cfg.augment else _BatchTransform(pre)
    ev = _BatchTransform(pre)
    return [SplitDataset(trx, try_, train, "train", aug, cfg.seed),
            SplitDataset(trx, try_, calib, "train", ev, cfg.seed),
            SplitDataset(tex, tey, test, "test", ev, cfg.seed)], k


def build_loaders(spec: DataSpec, pre: Preprocess, cfg: DataConfig = DataConfig(),
                  num_classes: int | None = None) -> Loaders:
    """Train (shuffled, augmented), calib and test (in order, eval transforms) loaders.

    ``num_classes`` is the model's output count: synthetic labels are drawn from it, and for a
    real dataset it must cover the dataset's classes.
    """
    if spec.kind == "imagefolder":
        root = Path(spec.root)
        if not root.is_dir():
            raise UserError(f"--data {spec}: folder {root} does not exist.")
        if pre.input_size[0] != 3:
            raise UserError(f"imagefolder images are RGB but the model takes {pre.input_size[0]} "
                            "channel(s): use a model with in_chans=3.")
        files = [] if (root / "train").is_dir() else flat_image_files(root)
        if files:
            return _unlabelled_loaders(*_flat_splits(root, files, pre, cfg), pre, cfg)
        *datasets, k = _imagefolder_splits(root, pre, cfg)
    else:
        datasets, k = _tensor_splits(spec, pre, cfg, num_classes)
    check_classes(spec, k, num_classes, cfg.allow_class_mismatch)
    train, calib, test = datasets
    log.info("%s: %d train, %d calib, %d test samples, %d classes",
             spec, len(train), len(calib), len(test), k)
    return Loaders(_loader(train, True, cfg), _loader(calib, False, cfg),
                   _loader(test, False, cfg), k, pre)


def check_classes(spec, k: int, num_classes: int | None, allow: bool) -> None:
    """The model's outputs must be the data set's classes: a 1000-class classifier on a 10-class
    data set scores 0 % top-1 everywhere and every comparison built on it is meaningless."""
    if num_classes is None or num_classes == k:
        return
    if num_classes > k and allow:
        log.warning("the model has %d outputs but %s has %d classes (--allow-class-mismatch: "
                    "labels are read as indices into the model's classes)", num_classes, spec, k)
        return
    advice = (f"For an architecture name (random weights) pass --num-classes {k}. A "
              f"checkpoint's classifier must be replaced and trained for this data set first "
              f"(e.g. timm.create_model(NAME, num_classes={k}), load the checkpoint without its "
              "head, fine-tune).")
    if num_classes > k:
        advice += (" If the labels are indices into the model's classes (a subset of its label "
                   "set), pass --allow-class-mismatch.")
    raise UserError(f"{spec} has {k} classes but the model has {num_classes} outputs, so its "
                    f"predictions cannot be compared with these labels. {advice}")


def _unlabelled_loaders(train, calib, pre: Preprocess, cfg: DataConfig) -> Loaders:
    return Loaders(_loader(train, True, cfg), _loader(calib, False, cfg), None, None, pre)


def _loader(ds, shuffle: bool, cfg: DataConfig) -> DataLoader:
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=shuffle, num_workers=cfg.workers,
                      generator=torch.Generator().manual_seed(cfg.seed),
                      persistent_workers=cfg.workers > 0,
                      # a last batch of 1 breaks BatchNorm in training mode
                      drop_last=shuffle and len(ds) > cfg.batch_size)


def test_set_digest(loader, spec: str) -> str | None:
    """SHA-256 naming exactly which test samples ``loader`` yields: the spec, the rows, their
    labels (and for an image folder the file names, for synthetic data the seed), so two runs
    compare accuracies only when this is equal. None for batches lrcompress did not build."""
    ds = getattr(loader, "dataset", None)
    if isinstance(ds, SplitDataset):
        which = {"labels": ds.labels[ds.indices].tolist()}
        if isinstance(ds.images, _SyntheticPool):
            which.update(seed=ds.images.seed, shape=list(ds.images.shape), pool=ds.images.n)
    elif isinstance(ds, FolderSplit):
        root = Path(ds.folder.root)
        which = {"files": [[str(Path(f).relative_to(root)), y]
                           for f, y in (ds.folder.samples[int(r)] for r in ds.indices)]}
    else:
        return None
    ident = {"spec": str(spec), "pool": ds.pool, "rows": ds.indices.tolist(), **which}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()
