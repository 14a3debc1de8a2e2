"""LoRITa over-parameterisation: exact start, balanced factors, collapse, and the CLI stage."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from lrcompress import load
from lrcompress.cli import main
from lrcompress.errors import UserError
from lrcompress.measure.metrics import independent_macs
from lrcompress.recover.lorita import LoritaConfig, collapse, overparameterize
from lrcompress.recover.losses import schatten_penalty

LAYERS = [
    lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1),
    lambda: nn.Conv2d(12, 5, (3, 1), padding=(1, 0), bias=False),  # T < S k²
    lambda: nn.Conv2d(4, 16, 1),
    lambda: nn.Linear(20, 7),
    lambda: nn.Linear(6, 11, bias=False),  # out > in
]


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_overparameterized_chain_computes_the_same_function(make, n):
    torch.manual_seed(0)
    layer = make().double()
    chain = overparameterize(layer, n)
    assert len(chain) == n
    x = torch.randn(3, layer.weight.shape[1], 9, 9, dtype=torch.float64) \
        if isinstance(layer, nn.Conv2d) else torch.randn(3, layer.weight.shape[1],
                                                          dtype=torch.float64)
    torch.testing.assert_close(chain(x), layer(x), rtol=1e-10, atol=1e-10)
    w, b = collapse(chain, layer)
    torch.testing.assert_close(w, layer.weight.detach(), rtol=1e-10, atol=1e-10)
    assert (b is None) == (layer.bias is None)


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("n", [2, 3])
def test_factors_start_balanced_so_weight_decay_is_the_schatten_quasi_norm(make, n):
    """Prop. 4.2: at the balanced split every factor has ‖F_j‖² = Σσ^{2/N}, and the plain
    weight-decay sum Σ_j ‖F_j‖² equals N·Σσ^{2/N} (rel. 1e-9)."""
    torch.manual_seed(1)
    layer = make().double()
    chain = overparameterize(layer, n)
    s = torch.linalg.svdvals(layer.weight.detach().reshape(layer.weight.shape[0], -1))
    each = float(s.pow(2.0 / n).sum())
    norms = [float(m.weight.detach().pow(2).sum()) for m in chain]
    assert norms == pytest.approx([each] * n, rel=1e-9)
    assert sum(norms) == pytest.approx(schatten_penalty(layer.weight, n), rel=1e-9)


def test_weight_decay_step_on_balanced_factors_matches_closed_form():
    """The gradient of Σ_j‖F_j‖² is 2F_j, so one SGD step (η) scales every factor by (1 − 2η) and
    the collapsed product by (1 − 2η)^N with the singular vectors unchanged (rtol 1e-9)."""
    torch.manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    sig = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    layer = nn.Linear(8, 8, bias=False).double()
    layer.weight.data = u @ torch.diag(sig) @ v.T
    chain = overparameterize(layer, 3)
    penalty = sum(m.weight.pow(2).sum() for m in chain)
    penalty.backward()
    with torch.no_grad():
        for m in chain:
            m.weight -= 1e-3 * m.weight.grad
    w, _ = collapse(chain, layer)
    torch.testing.assert_close(w, layer.weight.detach() * (1 - 2e-3) ** 3, rtol=1e-9,
                               atol=1e-12)


def test_config_validation():
    with pytest.raises(UserError, match="2 or more"):
        LoritaConfig(factors=1)
    assert not LoritaConfig().enabled and LoritaConfig(factors=3).enabled


def test_search_with_lorita_through_the_cli(resnet_ckpt, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [
        "search", str(resnet_ckpt["pt"]), "--input-size", "1,32,32", "--decomp", "svd",
        "--method", "lsvt", "--target-flops", "0.5", "--data", "synthetic:64",
        "--rank-multiple", "1", "--batch-size", "16", "--lorita", "3", "--lorita-steps", "3",
        "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    lo = report["lorita"]
    assert lo["factors"] == 3 and lo["steps"] == 3
    assert lo["schatten_after"] > 0 and "top1" in lo["dense_accuracy"]
    assert (out / "state" / "lorita.safetensors").exists()
    model = load(out / "model.safetensors")
    assert independent_macs(model, (1, 32, 32)) <= 0.5 * report["totals"]["macs_before"]
