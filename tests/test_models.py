"""Model loading: architectures, checkpoint formats, inference of num_classes/in_chans, errors."""

from __future__ import annotations

import collections
import struct

import pytest
import torch

from lrcompress.errors import CheckpointError, UserError
from lrcompress.model.arch import parse_arch
from lrcompress.model.loading import load_model

from .conftest import tiny_resnet


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_loads_and_infers_classes_and_channels(resnet_ckpt, fmt):
    lm = load_model(str(resnet_ckpt[fmt]))  # arch from the file stem
    assert lm.info.arch == "timm:test_resnet"
    assert (lm.info.num_classes, lm.info.in_chans) == (10, 1)
    assert _same_weights(lm.model, resnet_ckpt["model"])


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "ema"])
def test_nested_state_dict_keys(tmp_path, key):
    m = tiny_resnet()
    p = tmp_path / "ckpt.pth"
    torch.save({key: m.state_dict(), "epoch": 3}, p)
    lm = load_model(str(p), arch="timm:test_resnet")
    assert _same_weights(lm.model, m)


def test_ddp_prefix_is_stripped(tmp_path):
    m = tiny_resnet()
    p = tmp_path / "test_resnet.pt"
    torch.save(collections.OrderedDict(("module." + k, v) for k, v in m.state_dict().items()), p)
    assert _same_weights(load_model(str(p)).model, m)


def test_stem_suffixes_are_dropped(tmp_path):
    m = tiny_resnet()
    p = tmp_path / "test_resnet_fmnist_v2.pt"
    torch.save(m.state_dict(), p)
    assert load_model(str(p)).info.arch == "timm:test_resnet"


def test_torchvision_arch_with_other_channels(tmp_path):
    import torchvision

    from lrcompress.model.arch import ArchSpec, build

    m = build(ArchSpec("torchvision", "resnet18"), num_classes=7, in_chans=1)
    p = tmp_path / "weights.pt"
    torch.save(m.state_dict(), p)
    lm = load_model(str(p), arch="torchvision:resnet18")
    assert (lm.info.num_classes, lm.info.in_chans) == (7, 1)
    assert isinstance(lm.model, torchvision.models.ResNet)


def test_bare_name_gives_random_weights_with_warning(caplog):
    lm = load_model("timm:test_resnet")
    assert lm.info.source == "random"
    assert "random weights" in caplog.text


def test_arch_kwargs_are_parsed():
    a = parse_arch("timm:test_vit(img_size=32,patch_size=4)")
    assert a.kwargs == {"img_size": 32, "patch_size": 4}
    assert str(a) == "timm:test_vit(img_size=32,patch_size=4)"


def test_unknown_arch_suggests_close_matches():
    with pytest.raises(UserError, match="resnet18"):
        parse_arch("timm:resnet181")


def test_shape_mismatch_names_layer(tmp_path):
    m = tiny_resnet(num_classes=10)
    p = tmp_path / "x.pt"
    sd = m.state_dict()
    sd["layer1.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(sd, p)
    with pytest.raises(CheckpointError, match=r"layer1\.0\.conv1\.weight: expected"):
        load_model(str(p), arch="timm:test_resnet")


def test_missing_and_unexpected_keys_are_counted(tmp_path):
    sd = tiny_resnet().state_dict()
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(3)
    p = tmp_path / "x.pt"
    torch.save(sd, p)
    with pytest.raises(CheckpointError) as e:
        load_model(str(p), arch="timm:test_resnet")
    assert "1 missing key(s): fc.bias" in str(e.value)
    assert "1 unexpected key(s): extra.weight" in str(e.value)


def test_contradicting_num_classes(resnet_ckpt):
    with pytest.raises(CheckpointError, match="--num-classes 5 contradicts"):
        load_model(str(resnet_ckpt["pt"]), num_classes=5)


def test_nan_weights_are_refused(tmp_path):
    sd = tiny_resnet().state_dict()
    sd["fc.weight"][0, 0] = float("nan")
    p = tmp_path / "test_resnet.pt"
    torch.save(sd, p)
    with pytest.raises(CheckpointError, match="NaN or Inf.*fc.weight"):
        load_model(str(p))


def test_truncated_files(resnet_ckpt, tmp_path):
    for fmt in ("pt", "safetensors"):
        data = resnet_ckpt[fmt].read_bytes()
        p = tmp_path / f"test_resnet_cut.{fmt}"
        p.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated|corrupt"):
            load_model(str(p), arch="timm:test_resnet")


def test_empty_file(tmp_path):
    for suffix in (".pt", ".safetensors"):
        p = tmp_path / f"test_resnet{suffix}"
        p.write_bytes(b"")
        with pytest.raises(CheckpointError, match="empty"):
            load_model(str(p))


def test_safetensors_header_with_overlapping_offsets(tmp_path):
    import json

    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    raw = json.dumps(header).encode()
    p = tmp_path / "test_resnet.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 12)
    with pytest.raises(CheckpointError, match="overlap"):
        load_model(str(p))


def test_safetensors_header_claiming_huge_size(tmp_path):
    p = tmp_path / "test_resnet.safetensors"
    p.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(CheckpointError, match="header claims"):
        load_model(str(p))


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_code_executing_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "test_resnet.pt"
    torch.save({"state_dict": tiny_resnet().state_dict(), "evil": Boom()}, p)
    with pytest.raises(CheckpointError, match="run code|--trust-pickle"):
        load_model(str(p))
    assert not (tmp_path / "PWNED").exists()


def test_whole_pickled_module_needs_trust_pickle(tmp_path):
    m = tiny_resnet()
    p = tmp_path / "test_resnet.pt"
    torch.save(m, p)
    with pytest.raises(CheckpointError, match="whole pickled model"):
        load_model(str(p))
    lm = load_model(str(p), trust_pickle=True)
    assert _same_weights(lm.model, m)


def test_unknown_suffix_and_missing_file(tmp_path):
    p = tmp_path / "w.h5"
    p.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="Unknown checkpoint type"):
        load_model(str(p))
    with pytest.raises(CheckpointError, match="No such file"):
        load_model(str(tmp_path / "nope.pt"))


def test_a_deep_stem_checkpoint_gives_its_channels_and_classes(tmp_path):
    """timm's config names the deep stem's container ('conv1', a Sequential): in_chans comes
    from its first conv, not the default 3."""
    import timm

    arch = "timm:resnet18(channels=(1,1,1,1),stem_type='deep',stem_width=1)"
    m = timm.create_model("resnet18", channels=(1, 1, 1, 1), stem_type="deep", stem_width=1,
                          num_classes=7, in_chans=1)
    p = tmp_path / "tiny.pt"
    torch.save(m.state_dict(), p)
    lm = load_model(str(p), arch=arch)
    assert (lm.info.in_chans, lm.info.num_classes) == (1, 7)


def test_file_name_guess_takes_the_source_whose_keys_fit(tmp_path):
    # efficientnet_b0 exists in timm and torchvision with different keys: a torchvision
    # checkpoint must be built as torchvision, not fail or be read as timm.
    import torchvision

    tv = torchvision.models.efficientnet_b0(num_classes=3)
    p = tmp_path / "efficientnet_b0.pt"
    torch.save(tv.state_dict(), p)
    lm = load_model(str(p))
    assert lm.info.arch == "torchvision:efficientnet_b0"
    assert isinstance(lm.model, torchvision.models.EfficientNet)
    assert _same_weights(lm.model, tv)


def test_file_name_guess_fitting_both_sources_says_which_and_how(tmp_path, caplog):
    # timm's and torchvision's resnet18 have the same keys: the choice is named, with the flag
    # that picks the other.
    import torchvision

    p = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), p)
    lm = load_model(str(p))
    assert lm.info.arch == "timm:resnet18"
    assert "fits both timm:resnet18 and torchvision:resnet18" in caplog.text
    assert "--arch torchvision:resnet18" in caplog.text
    assert isinstance(load_model(str(p), arch="torchvision:resnet18").model,
                      torchvision.models.ResNet)
