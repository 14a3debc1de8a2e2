"""Data specs, preprocessing resolution, splits and loaders (on small fake files and the real
Fashion-MNIST folder when it is installed)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from lrcompress.data import (
    DataConfig,
    DataSpec,
    Preprocess,
    build_loaders,
    native_input_size,
    parse_data_spec,
    resolve_preprocess,
    split_indices,
)
from lrcompress.errors import UserError

FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------- helpers
def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    data = struct.pack(f">BBBB{arr.ndim}I", 0, 0, 8, arr.ndim, *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_mnist(root: Path, n_train=200, n_test=50, gz=True, sub="") -> Path:
    """IDX files with the real names: random images, row i labelled i % 10."""
    d = root / sub if sub else root
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(d / f"{prefix}-images-idx3-ubyte", fake_images(n), gz)
        _write_idx(d / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), gz)
    return root


def fake_images(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def fake_cifar10(root: Path, per_batch=20, n_test=30) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": list(rng.integers(0, 10, n).tolist()), "batch_label": name}
        (d / name).write_bytes(pickle.dumps(batch))
    return root


def _first_batch(loader):
    return next(iter(loader))


# ------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, kind, root", [
    ("fashionmnist:/data/fm", "fashionmnist", "/data/fm"),
    ("Fashion-MNIST:/data/fm", "fashionmnist", "/data/fm"),
    ("cifar10:/c", "cifar10", "/c"),
    ("cifar100:/c", "cifar100", "/c"),
    ("mnist:/m", "mnist", "/m"),
    ("imagefolder:/imgs", "imagefolder", "/imgs"),
    ("synthetic", "synthetic", None),
])
def test_parse_good_specs(text, kind, root):
    spec = parse_data_spec(text)
    assert (spec.kind, spec.root) == (kind, root)


def test_parse_synthetic_count_and_str_round_trip():
    assert parse_data_spec("synthetic").samples == 512
    spec = parse_data_spec("synthetic:64")
    assert spec.samples == 64
    assert parse_data_spec(str(spec)) == spec
    fm = parse_data_spec("fashionmnist:/x")
    assert parse_data_spec(str(fm)) == fm
    assert parse_data_spec("mnist:~/m").root == str(Path("~/m").expanduser())


@pytest.mark.parametrize("text, words", [
    ("imagenet:/x", ["imagenet", "fashionmnist", "synthetic"]),
    ("fashionmnist", ["fashionmnist:ROOT", "/usr/share/datasets/fashion-mnist"]),
    ("cifar10:", ["cifar10:ROOT"]),
    ("synthetic:lots", ["synthetic:256"]),
    ("synthetic:0", ["N >= 1"]),
    ("/usr/share/datasets/fashion-mnist", ["must be one of"]),
])
def test_parse_bad_specs_teach(text, words):
    with pytest.raises(UserError) as e:
        parse_data_spec(text)
    for w in words:
        assert w in str(e.value)


def test_native_input_size():
    assert native_input_size(parse_data_spec("fashionmnist:/x")) == (1, 28, 28)
    assert native_input_size("mnist:/x") == (1, 28, 28)
    assert native_input_size("cifar100:/x") == (3, 32, 32)
    assert native_input_size("imagefolder:/x") is None
    assert native_input_size(DataSpec("synthetic", None)) is None


# ---------------------------------------------------------------------------------- preprocess
@pytest.fixture(scope="module")
def resnet1():
    return timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=10)


@pytest.fixture(scope="module")
def resnet3():
    return timm.create_model("test_resnet", pretrained=False, num_classes=10)


def test_preprocess_priority(resnet1, resnet3):
    fm = parse_data_spec("fashionmnist:/x")
    folder = parse_data_spec("imagefolder:/x")
    cfg = timm.data.resolve_model_data_config(resnet3)
    # explicit beats native
    assert resolve_preprocess(resnet1, fm, input_size=(1, 64, 64)).input_size == (1, 64, 64)
    assert resolve_preprocess(resnet1, fm, input_size=48).input_size == (1, 48, 48)
    # native beats timm's config
    assert resolve_preprocess(resnet1, fm).input_size == (1, 28, 28)
    assert resolve_preprocess(resnet3, parse_data_spec("cifar10:/x")).input_size == (3, 32, 32)
    # timm's config where the data has no native size
    pre = resolve_preprocess(resnet3, folder)
    assert pre.input_size == tuple(cfg["input_size"])
    assert pre.mean == pytest.approx(cfg["mean"]) and pre.interpolation == cfg["interpolation"]
    assert pre.crop_pct == pytest.approx(cfg["crop_pct"])
    # no model at all: ImageNet defaults
    pre = resolve_preprocess(None, folder)
    assert pre.input_size == (3, 224, 224)
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406))


def test_preprocess_channels_and_stats(resnet1, resnet3):
    fm = parse_data_spec("fashionmnist:/x")
    # 1-channel model: RGB stats averaged
    pre = resolve_preprocess(resnet1, fm)
    assert pre.input_size[0] == 1
    rgb = timm.data.resolve_model_data_config(resnet1)
    assert pre.mean[0] == pytest.approx(sum(rgb["mean"]) / 3)
    assert pre.std[0] == pytest.approx(sum(rgb["std"]) / 3)
    # channels from in_chans win over the stem; grayscale data into a 3-channel model is fine
    assert resolve_preprocess(resnet1, fm, in_chans=3).input_size == (3, 28, 28)
    assert resolve_preprocess(resnet3, fm).input_size == (3, 28, 28)
    # explicit stats win; one value broadcasts
    pre = resolve_preprocess(resnet3, fm, mean=(0.5,), std=(0.25,))
    assert pre.mean == (0.5,) * 3 and pre.std == (0.25,) * 3
    assert resolve_preprocess(resnet1, fm, mean=[0.3], std=[0.2]).mean == (0.3,)
    with pytest.raises(UserError, match="2 values but the model takes 3"):
        resolve_preprocess(resnet3, fm, mean=(0.5, 0.5))
    with pytest.raises(UserError, match="3 values but the model takes 1"):
        resolve_preprocess(resnet1, fm, std=(0.2, 0.2, 0.2))
    with pytest.raises(UserError, match="3 channels but the model takes 1"):
        resolve_preprocess(resnet1, parse_data_spec("cifar10:/x"))
    with pytest.raises(UserError, match="--input-size 1,64,64"):
        resolve_preprocess(resnet1, fm, input_size=(3, 64, 64), in_chans=1)


def test_preprocess_validates():
    with pytest.raises(UserError, match="one value per channel"):
        Preprocess((3, 8, 8), (0.5,), (0.5, 0.5, 0.5))
    with pytest.raises(UserError, match="positive"):
        Preprocess((1, 8, 8), (0.5,), (0.0,))
    with pytest.raises(UserError, match="interpolation"):
        Preprocess((1, 8, 8), (0.5,), (0.5,), interpolation="lanczos9")
    assert Preprocess([1, 8, 8], [0.5], [0.5]).input_size == (1, 8, 8)  # JSON lists accepted


def test_data_config_validates():
    for bad in (dict(batch_size=0), dict(calib_fraction=1.0), dict(calib_fraction=0),
                dict(workers=-1), dict(train_subset=0), dict(seed=-3)):
        with pytest.raises(UserError):
            DataConfig(**bad)


# ------------------------------------------------------------------------------------- splits
def test_splits_disjoint_cover_and_deterministic():
    cfg = DataConfig(seed=3, calib_fraction=0.2)
    tr, ca, te = split_indices(1000, 300, cfg)
    assert len(ca) == 200 and len(tr) == 800 and len(te) == 300
    assert set(tr.tolist()).isdisjoint(ca.tolist())
    assert sorted(tr.tolist() + ca.tolist()) == list(range(1000))
    again = split_indices(1000, 300, cfg)
    assert all(torch.equal(a, b) for a, b in zip((tr, ca, te), again, strict=True))
    other = split_indices(1000, 300, DataConfig(seed=4, calib_fraction=0.2))
    assert not torch.equal(ca, other[1]) and not torch.equal(tr, other[0])


def test_subsets_are_prefixes_and_keep_calib_fixed():
    full = split_indices(1000, 300, DataConfig())
    small = split_indices(1000, 300, DataConfig(train_subset=50, calib_subset=20, test_subset=30))
    big = split_indices(1000, 300, DataConfig(train_subset=80, calib_subset=40, test_subset=60))
    assert [len(s) for s in small] == [50, 20, 30]
    assert torch.equal(small[0], full[0][:50]) and torch.equal(big[0][:50], small[0])
    for i in (1, 2):
        assert set(small[i].tolist()) <= set(big[i].tolist()) <= set(full[i].tolist())
    # calibration does not move when the train subset changes
    assert torch.equal(split_indices(1000, 300, DataConfig(train_subset=10))[1], full[1])


def test_calibration_batches_are_a_random_sample_of_a_class_sorted_pool():
    # An image folder lists its files class by class; the search reads only the first batches of
    # the calibration loader, so their order must be the seeded permutation, not the file order.
    labels = torch.arange(1000) // 100  # 10 classes, stored class by class
    _, ca, _ = split_indices(1000, 300, DataConfig(seed=0, calib_fraction=0.2))
    first = labels[ca[:32]]
    assert len(set(first.tolist())) >= 8, first
    assert not torch.equal(ca, ca.sort().values)


# ------------------------------------------------------------------------------- fake datasets
@pytest.mark.parametrize("layout", ["flat_gz", "torchvision_raw"])
def test_mnist_layouts_and_loader_splits(tmp_path, layout):
    if layout == "flat_gz":
        root = fake_mnist(tmp_path)
    else:
        root = fake_mnist(tmp_path, gz=False, sub="FashionMNIST/raw")
    spec = parse_data_spec(f"fashionmnist:{root}")
    pre = resolve_preprocess(None, spec)
    cfg = DataConfig(batch_size=16, calib_fraction=0.25, seed=1)
    lo = build_loaders(spec, pre, cfg)
    tr, ca, te = lo.train.dataset, lo.calib.dataset, lo.test.dataset
    assert (len(tr), len(ca), len(te)) == (150, 50, 50)
    assert (tr.pool, ca.pool, te.pool) == ("train", "train", "test")
    assert set(tr.indices.tolist()).isdisjoint(ca.indices.tolist())
    assert lo.num_classes == 10 and lo.preprocess == pre
    assert tr.transform.flip and tr.transform.pad == 2 and not ca.transform.pad
    x, y = _first_batch(lo.calib)
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    # calib/test are in order with eval transforms: sample 0 is training row calib.indices[0]
    row = torch.from_numpy(fake_images(200)[int(ca.indices[0])]).float() / 255
    torch.testing.assert_close(x[0, 0], (row - pre.mean[0]) / pre.std[0], rtol=0, atol=1e-5)
    assert torch.equal(y, torch.as_tensor(ca.indices[:16] % 10))
    # same seed -> same train batches (shuffle and augmentation); another seed -> different
    b1 = _first_batch(build_loaders(spec, pre, cfg).train)
    b2 = _first_batch(build_loaders(spec, pre, cfg).train)
    b3 = _first_batch(build_loaders(spec, pre, DataConfig(batch_size=16, seed=2)).train)
    assert torch.equal(b1[0], b2[0]) and torch.equal(b1[1], b2[1])
    assert not torch.equal(b1[0], b3[0])


def test_workers_are_deterministic(tmp_path):
    spec = parse_data_spec(f"mnist:{fake_mnist(tmp_path)}")
    pre = resolve_preprocess(None, spec)
    cfg = DataConfig(batch_size=32, workers=1, seed=5)
    assert not build_loaders(spec, pre, cfg).train.dataset.transform.flip  # digits: no flip
    a = [b[0] for b in build_loaders(spec, pre, cfg).train]
    b = [b[0] for b in build_loaders(spec, pre, cfg).train]
    assert len(a) == 5 and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_grayscale_into_rgb_model_and_resize(tmp_path):
    spec = parse_data_spec(f"fashionmnist:{fake_mnist(tmp_path)}")
    pre = resolve_preprocess(None, spec, input_size=(3, 40, 40))
    x, _ = _first_batch(build_loaders(spec, pre, DataConfig(batch_size=8)).test)
    assert x.shape == (8, 3, 40, 40)
    torch.testing.assert_close(x[:, 0] * pre.std[0] + pre.mean[0],
                               x[:, 2] * pre.std[2] + pre.mean[2], rtol=0, atol=1e-5)


def test_malformed_and_missing_files(tmp_path):
    with pytest.raises(UserError) as e:
        build_loaders(parse_data_spec(f"fashionmnist:{tmp_path / 'nope'}"),
                      Preprocess((1, 28, 28), (0.5,), (0.5,)), DataConfig())
    assert "does not exist" in str(e.value)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as e:
        build_loaders(parse_data_spec(f"fashionmnist:{empty}"),
                      Preprocess((1, 28, 28), (0.5,), (0.5,)), DataConfig())
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "/usr/share/datasets/fashion-mnist" in msg and "FashionMNIST/raw" in msg
    root = fake_mnist(tmp_path / "bad")
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="not a valid IDX file"):
        build_loaders(parse_data_spec(f"mnist:{root}"),
                      Preprocess((1, 28, 28), (0.5,), (0.5,)), DataConfig())


def test_num_classes_must_cover_dataset(tmp_path):
    spec = parse_data_spec(f"mnist:{fake_mnist(tmp_path)}")
    with pytest.raises(UserError, match="num_classes=10"):
        build_loaders(spec, resolve_preprocess(None, spec), DataConfig(), num_classes=5)


def test_cifar10_pickle_folder(tmp_path):
    spec = parse_data_spec(f"cifar10:{fake_cifar10(tmp_path)}")
    pre = resolve_preprocess(None, spec)
    lo = build_loaders(spec, pre, DataConfig(batch_size=8, calib_fraction=0.1))
    assert (len(lo.train.dataset), len(lo.calib.dataset), len(lo.test.dataset)) == (90, 10, 30)
    x, y = _first_batch(lo.train)
    assert x.shape == (8, 3, 32, 32) and 0 <= int(y.min()) and int(y.max()) < 10
    # a pickle naming anything but numpy arrays is refused
    evil = tmp_path / "evil" / "cifar-10-batches-py"
    fake_cifar10(tmp_path / "evil")
    (evil / "test_batch").write_bytes(pickle.dumps({"data": nn.Linear(1, 1), "labels": []}))
    with pytest.raises(UserError, match="not a valid cifar10 batch"):
        build_loaders(parse_data_spec(f"cifar10:{tmp_path / 'evil'}"), pre, DataConfig())


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / part / cls / f"{i}.png")
    spec = parse_data_spec(f"imagefolder:{tmp_path}")
    pre = resolve_preprocess(None, spec, input_size=16)
    lo = build_loaders(spec, pre, DataConfig(batch_size=4, calib_fraction=0.25))
    assert (len(lo.train.dataset), len(lo.calib.dataset), len(lo.test.dataset)) == (9, 3, 4)
    assert lo.num_classes == 2
    x, y = _first_batch(lo.train)
    assert x.shape == (4, 3, 16, 16) and set(y.tolist()) <= {0, 1}
    with pytest.raises(UserError, match="val"):
        build_loaders(parse_data_spec(f"imagefolder:{tmp_path / 'train'}"), pre, DataConfig())


# ----------------------------------------------------------------------------------- synthetic
def test_synthetic_shapes_labels_and_determinism():
    spec = parse_data_spec("synthetic:40")
    pre = Preprocess((3, 24, 24), (0.5,) * 3, (0.25,) * 3)
    cfg = DataConfig(batch_size=16, test_subset=10)
    lo = build_loaders(spec, pre, cfg, num_classes=7)
    assert (len(lo.train.dataset), len(lo.calib.dataset), len(lo.test.dataset)) == (40, 40, 10)
    assert lo.num_classes == 7
    x, y = _first_batch(lo.train)
    assert x.shape == (16, 3, 24, 24) and x.dtype == torch.float32
    assert 0 <= int(y.min()) and int(y.max()) < 7
    ids = [set(d.indices.tolist()) for d in (lo.train.dataset, lo.calib.dataset, lo.test.dataset)]
    assert ids[0].isdisjoint(ids[1]) and ids[1].isdisjoint(ids[2]) and ids[0].isdisjoint(ids[2])
    x2, _ = _first_batch(build_loaders(spec, pre, cfg, num_classes=7).train)
    assert torch.equal(x, x2)
    xt, _ = _first_batch(lo.test)
    assert torch.equal(xt[0], lo.test.dataset[0][0])  # single-sample access agrees with batches


# ----------------------------------------------------------------------------- real F-MNIST
@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist(resnet1):
    spec = parse_data_spec(f"fashionmnist:{FMNIST}")
    pre = resolve_preprocess(resnet1, spec)
    lo = build_loaders(spec, pre, DataConfig(batch_size=64), num_classes=10)
    assert len(lo.train.dataset) + len(lo.calib.dataset) == 60_000
    assert len(lo.calib.dataset) == 6_000 and len(lo.test.dataset) == 10_000
    assert set(lo.train.dataset.indices.tolist()).isdisjoint(lo.calib.dataset.indices.tolist())
    x, y = _first_batch(lo.train)
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) <= 9
    assert torch.isfinite(x).all()
    xt, yt = _first_batch(lo.test)
    # normalized eval inputs of natural images: roughly centred, not degenerate
    assert abs(float(xt.mean())) < 1.5 and float(xt.std()) > 0.5
    assert torch.bincount(lo.test.dataset.labels, minlength=10).tolist() == [1000] * 10
