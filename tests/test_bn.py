"""BatchNorm re-estimation after decomposition: which layers, what statistics, in the pipeline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrcompress.commands.search import SearchConfig, search
from lrcompress.data import DataConfig
from lrcompress.errors import UserError
from lrcompress.model.plan import Target
from lrcompress.model.weights import load
from lrcompress.recover.bn import recalibrate_bn


def _chain():
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("conv1", nn.Conv2d(3, 8, 3, padding=1))
    m.add_module("bn1", nn.BatchNorm2d(8))
    m.add_module("conv2", nn.Conv2d(8, 8, 3, padding=1))  # "factorized"
    m.add_module("bn2", nn.BatchNorm2d(8))
    m.add_module("relu", nn.ReLU())
    m.add_module("conv3", nn.Conv2d(8, 8, 1))
    m.add_module("bn3", nn.BatchNorm2d(8))
    for bn in (m.bn1, m.bn2, m.bn3):  # stale statistics, far from the data's
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
    return m.eval()


def _loader(n_batches=3, bs=16, nan=False):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        x = torch.randn(bs, 3, 8, 8, generator=g) * 2 + 1
        if nan:
            x[0, 0, 0, 0] = float("nan")
        out.append((x, torch.zeros(bs, dtype=torch.long)))
    return out


def test_downstream_statistics_are_the_calibration_data_statistics():
    m = _chain()
    data = _loader()
    # bn2's input does not depend on any BatchNorm being re-estimated, so its new statistics are
    # exactly the average over batches of the batch mean and unbiased batch variance.
    with torch.no_grad():
        feats = [m.conv2(m.bn1(m.conv1(x))) for x, _ in data]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).reshape(8, -1).var(dim=1, unbiased=True)
                       for f in feats]).mean(0)
    rec = recalibrate_bn(m, ["conv2"], data, "cpu", max_batches=10)
    assert rec is not None and (rec.layers, rec.kept, rec.batches, rec.samples) == (2, 1, 3, 48)
    assert torch.allclose(m.bn2.running_mean, mean, atol=1e-5)
    assert torch.allclose(m.bn2.running_var, var, rtol=1e-4)
    # upstream of the first factorized layer: untouched
    assert torch.equal(m.bn1.running_mean, torch.full((8,), 5.0))
    assert torch.equal(m.bn1.running_var, torch.full((8,), 9.0))
    assert not m.training and all(not b.training for b in (m.bn1, m.bn2, m.bn3))
    assert m.bn2.momentum == 0.1  # restored
    # bn3 now normalises its eval-mode input to about zero mean (stale: mean off by ~5)
    with torch.no_grad():
        x = torch.cat([x for x, _ in data])
        h = m.relu(m.bn2(m.conv2(m.bn1(m.conv1(x)))))
        z = m.bn3(m.conv3(h))
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.15


def test_max_batches_and_batches_of_one_and_nothing_to_do():
    m = _chain()
    rec = recalibrate_bn(m, ["conv2"], _loader(n_batches=5), "cpu", max_batches=2)
    assert rec.batches == 2 and rec.samples == 32
    m = _chain()
    rec = recalibrate_bn(m, ["conv2"], [*_loader(1, bs=1), *_loader(1)], "cpu", max_batches=4)
    assert rec.batches == 1 and rec.samples == 16  # the batch of one is skipped
    assert recalibrate_bn(_chain(), [], _loader(), "cpu", 4) is None
    assert recalibrate_bn(_chain(), ["conv2"], _loader(), "cpu", 0) is None
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    assert recalibrate_bn(no_bn, ["1"], _loader(), "cpu", 4) is None


def test_non_finite_data_is_a_clear_error():
    with pytest.raises(UserError, match="non-finite statistics in bn2.*--bn-batches 0"):
        recalibrate_bn(_chain(), ["conv2"], _loader(nan=True), "cpu", 4)
    with pytest.raises(UserError, match="no calibration batch with 2 or more"):
        recalibrate_bn(_chain(), ["conv2"], _loader(1, bs=1), "cpu", 4)


def _cfg(**kw):
    return SearchConfig(target=Target("flops", 0.5), decomp="tt", method="uniform",
                        rank_multiple=1, calib_batches=2, input_size=(1, 32, 32),
                        data=DataConfig(batch_size=16, test_subset=32), **kw)


def _calib_losses(monkeypatch, *values):
    """The calibration losses bn_stage sees, in order (before, after re-estimation): the
    decision is tested apart from what a random tiny model's loss happens to do."""
    import lrcompress.commands.compress as stages

    it = iter(values)
    monkeypatch.setattr(stages, "calib_loss", lambda *a, **k: next(it))


def test_pipeline_ships_the_re_estimated_statistics(resnet_ckpt, tmp_path, monkeypatch):
    orig = resnet_ckpt["model"]
    _calib_losses(monkeypatch, 1.0, 0.5)
    res = search(str(resnet_ckpt["pt"]), "synthetic:64", tmp_path / "on", _cfg(bn_batches=3))
    bn = res.report["bn_recalibration"]
    assert bn["batches"] == 3 and bn["samples"] == 48 and bn["layers"] > 0 and bn["kept"] >= 1
    assert "bn_recalibrated" in res.report["accuracy"]
    assert "bn_recalibrated" in (tmp_path / "on" / "report.md").read_text()
    shipped = dict(load(tmp_path / "on").named_buffers())
    before = dict(orig.named_buffers())
    changed = [k for k in before if k.endswith("running_mean")
               and not torch.equal(before[k], shipped[k])]
    assert len(changed) == bn["layers"]
    # conv1.0 (the stem's first conv) is not factorized, so the BatchNorm after it is upstream
    assert "conv1.0" not in {lp.name for lp in res.plan.layers}
    assert torch.equal(shipped["conv1.1.running_mean"], before["conv1.1.running_mean"])

    off = search(str(resnet_ckpt["pt"]), "synthetic:64", tmp_path / "off", _cfg(bn_batches=0))
    assert off.report["bn_recalibration"] is None
    assert "bn_recalibrated" not in off.report["accuracy"]
    kept = dict(load(tmp_path / "off").named_buffers())
    assert all(torch.equal(before[k], kept[k]) for k in before if k.endswith("running_var"))


def test_re_estimation_that_raises_the_calibration_loss_is_not_applied(resnet_ckpt, tmp_path,
                                                                       monkeypatch):
    """When the re-estimated statistics make the calibration loss worse, the decomposed model's
    statistics are restored exactly (the original's: decomposition leaves BatchNorm alone), the
    report says so with both losses, and no "after re-estimation" accuracy is claimed."""
    _calib_losses(monkeypatch, 0.5, 1.0)
    res = search(str(resnet_ckpt["pt"]), "synthetic:64", tmp_path / "r", _cfg(bn_batches=3))
    bn = res.report["bn_recalibration"]
    assert bn["applied"] is False and (bn["calib_loss_before"], bn["calib_loss_after"]) == (0.5, 1)
    assert "bn_recalibrated" not in res.report["accuracy"]
    assert "statistics were kept instead" in (tmp_path / "r" / "report.md").read_text()
    before = dict(resnet_ckpt["model"].named_buffers())
    shipped = dict(load(tmp_path / "r").named_buffers())
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], shipped[k]) for k in stats)


def test_re_estimation_is_judged_on_batches_it_did_not_read(resnet_ckpt, tmp_path, monkeypatch):
    """With more calibration batches than re-estimation reads, the before/after losses come from
    the batches after them (none of theirs), and the report says so; with too few, from the
    same batches, and the report says that instead."""
    import itertools

    import lrcompress.commands.compress as stages

    judged, read = [], []
    real_loss, real_rec = stages.calib_loss, stages.recalibrate_bn

    def loss_spy(model, batches, device):
        judged.append([x for x, _ in batches])
        return real_loss(model, batches, device)

    def rec_spy(model, changed, loader, device, max_batches, **kw):
        read.extend(x for x, _ in itertools.islice(loader, max_batches))
        return real_rec(model, changed, loader, device, max_batches, **kw)

    monkeypatch.setattr(stages, "calib_loss", loss_spy)
    monkeypatch.setattr(stages, "recalibrate_bn", rec_spy)
    res = search(str(resnet_ckpt["pt"]), "synthetic:1024", tmp_path / "h", _cfg(bn_batches=2))
    bn = res.report["bn_recalibration"]
    assert bn["judged_on"] == "held-out calibration batches" and bn["judged_batches"] == 2
    assert len(read) == 2 and len(judged[-1]) == 2
    assert not any(torch.equal(a, b) for a in judged[-1] for b in read)
    assert "held-out calibration batches" in (tmp_path / "h" / "report.md").read_text()

    judged.clear()
    read.clear()
    res = search(str(resnet_ckpt["pt"]), "synthetic:64", tmp_path / "s", _cfg(bn_batches=16))
    bn = res.report["bn_recalibration"]
    assert bn["judged_on"] == "the re-estimation's batches"
    assert any(torch.equal(a, b) for a in judged[-1] for b in read)
