"""Shared fixtures: tiny real architectures (timm test_* models) saved in several formats."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def tiny_resnet(num_classes=10, in_chans=1, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False, num_classes=num_classes,
                             in_chans=in_chans).eval()


@pytest.fixture(scope="module")
def fast_torch():
    """One intra-op thread: on a loaded 2-core machine multi-threaded PyTorch spends most of its
    time waking threads (a tiny forward goes from ~1 ms to ~400 ms). And torch.export logs
    structured DEBUG traces to "torch.__trace", whose records pytest 9's capture handlers would
    format on every ONNX export."""
    trace = logging.getLogger("torch.__trace")
    old_level, old_threads = trace.level, torch.get_num_threads()
    trace.setLevel(logging.INFO)
    torch.set_num_threads(1)
    yield
    trace.setLevel(old_level)
    torch.set_num_threads(old_threads)


@pytest.fixture
def resnet_ckpt(tmp_path):
    """A test_resnet state_dict (10 classes, 1 channel) as .pt and .safetensors."""
    m = tiny_resnet()
    sd = m.state_dict()
    pt = tmp_path / "test_resnet.pt"
    torch.save(sd, pt)
    st = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    return {"model": m, "pt": pt, "safetensors": st, "dir": tmp_path}


@pytest.fixture(scope="module")
def module_ckpt(tmp_path_factory):
    """A test_resnet state_dict (.pt) shared by one test module's fixtures (runs built once)."""
    path = tmp_path_factory.mktemp("ckpt") / "test_resnet.pt"
    torch.save(tiny_resnet().state_dict(), path)
    return path


# Tiny models gain nothing from a second thread, and on a busy 2-core machine two threads per
# process make torch dramatically slower (seen: 100x); one thread keeps the suite fast and stable.
torch.set_num_threads(1)
