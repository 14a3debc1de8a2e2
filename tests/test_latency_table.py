"""The candidate latency table: engines, standalone layer graphs, cache, additive model, snapping.

Every timing figure asserted here comes from a deterministic fake timer (MACs plus a step function
of the rank); only the ORT parity checks and one smoke test run anything for real.
"""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch

from lrcompress.errors import UserError
from lrcompress.factorizations import get_factorization
from lrcompress.measure.latency_table import (
    LatencyTable,
    additive_estimate,
    check_additive,
    default_cache_dir,
    measure_models,
    snap_options,
    snap_ranks,
)
from lrcompress.measure.layer_timing import (
    Candidate,
    Engine,
    Timing,
    candidate_module,
    input_shape,
    layer_graph,
    ort_session,
    round_robin,
)
from lrcompress.model.costs import dense_macs
from lrcompress.model.layers import LayerSpec
from lrcompress.model.plan import LayerPlan
from lrcompress.rank.problem import DENSE, layer_options

CONV = LayerSpec("conv", "conv2d", 16, 32, (3, 3), (1, 1), (1, 1), in_hw=(8, 8), out_hw=(8, 8))
CONV_S2 = LayerSpec("down", "conv2d", 32, 32, (3, 3), (2, 2), (1, 1), in_hw=(8, 8),
                    out_hw=(4, 4))
FC = LayerSpec("fc", "linear", 64, 10, bias=True)
TOKENS = LayerSpec("mlp", "linear", 32, 48, bias=True, in_hw=(5, 1), out_hw=(5, 1))
GROUPED = LayerSpec("grp", "conv2d", 16, 32, (3, 3), (1, 1), (1, 1), groups=4, bias=True,
                    in_hw=(8, 8), out_hw=(8, 8))


def fake_ms(spec: LayerSpec, c: Candidate) -> float:
    """1 ms per million MACs, plus 0.01 ms per started block of 8 ranks."""
    if c.factorization == DENSE:
        return dense_macs(spec) * 1e-6
    fact = get_factorization(c.factorization)
    r = fact.scalar_rank(fact.rank_from(spec, c.rank))
    return fact.macs(spec, c.rank) * 1e-6 + 0.01 * math.ceil(r / 8)


class FakeTimer:
    def __init__(self):
        self.calls: list[list[tuple]] = []

    def __call__(self, spec, candidates):
        self.calls.append([(c.factorization, c.rank) for c in candidates])
        return [fake_ms(spec, c) for c in candidates]

    @property
    def timed(self) -> int:
        return sum(len(c) for c in self.calls)


def table(tmp_path, engine="ort-cpu", **kw):
    return LatencyTable(engine, cache_dir=tmp_path, timer=kw.pop("timer", FakeTimer()), **kw)


# ---------------------------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{"name": "tensorrt"}, {"name": "ort"}, {"threads": -1},
                                {"batch": 0}])
def test_bad_engine_is_a_user_error(kw):
    with pytest.raises(UserError):
        Engine(**kw)


@pytest.mark.parametrize("kw", [{"repeats": 0}, {"warmup": -1}])
def test_bad_repeats_are_user_errors(tmp_path, kw):
    with pytest.raises(UserError):
        table(tmp_path, **kw)


def test_zero_threads_means_all_cores():
    assert Engine("torch-cpu", threads=0).threads >= 1


def test_cuda_engines_without_cuda_are_user_errors(monkeypatch, tmp_path):
    import onnxruntime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(UserError, match="torch.cuda.is_available"):
        LatencyTable("torch-cuda", cache_dir=tmp_path)
    with pytest.raises(UserError, match=r"CUDAExecutionProvider.*lrcompress\[gpu\]"):
        LatencyTable(Engine("ort-cuda"), cache_dir=tmp_path)
    Engine("ort-cpu").check_available()


# ---------------------------------------------------------------------------------------------
# cache and laziness
# ---------------------------------------------------------------------------------------------


def test_second_table_measures_nothing_it_knows(tmp_path):
    opts = layer_options(CONV, ["tucker2"], 4)
    t1 = table(tmp_path)
    first = t1.layer_times(CONV, opts)
    assert t1.counts() == {"measured": len(opts), "cached": 0}
    assert first == {o: pytest.approx(fake_ms(CONV, Candidate(o.factorization, o.rank)))
                     for o in opts}
    t2 = table(tmp_path)
    assert t2.layer_times(CONV, opts) == first
    assert t2.counts() == {"measured": 0, "cached": len(opts)} and t2.timer.calls == []
    data = json.loads(t2.cache_path.read_text())
    assert data["fingerprint"]["engine"] == "ort-cpu" and data["fingerprint"]["threads"] == 1
    assert data["fingerprint"]["runtime"].startswith("onnxruntime ")
    (entries,) = data["layers"].values()
    assert set(entries) == {"dense", "tucker2:4x4", "tucker2:8x8", "tucker2:12x12",
                            "tucker2:16x16", "tucker2:20x16", "tucker2:24x16"}


@pytest.mark.parametrize("engine", [Engine("ort-cpu", threads=2), Engine("ort-cpu", batch=8),
                                    Engine("torch-cpu")])
def test_threads_batch_and_engine_are_in_the_key(tmp_path, engine):
    table(tmp_path).layer_times(CONV, [DENSE])
    other = table(tmp_path, engine)
    other.layer_times(CONV, [DENSE])
    assert other.counts()["measured"] == 1
    assert other.cache_path != table(tmp_path).cache_path
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_layer_shape_is_in_the_key_not_its_name(tmp_path):
    t = table(tmp_path)
    t.dense_time(CONV)
    t.dense_time(LayerSpec(**{**CONV.to_dict(), "name": "renamed"}))
    t.dense_time(LayerSpec(**{**CONV.to_dict(), "bias": True}))
    assert t.counts() == {"measured": 2, "cached": 1}


def test_only_requested_candidates_are_measured(tmp_path):
    t = table(tmp_path)
    t.layer_times(CONV, [("tucker2", 8), DENSE])
    t.layer_times(CONV, [("tucker2", 8), ("tt", 4), DENSE])
    assert t.timer.calls == [[("tucker2", 8), (DENSE, 0)], [("tt", 4)]]
    assert t.counts() == {"measured": 3, "cached": 2}


def test_same_chain_is_measured_once(tmp_path):
    t = table(tmp_path)  # on a linear layer every method is the same SVD chain
    times = t.layer_times(FC, [("svd", 4), ("tucker2", 4), ("tt", (4, 9))])
    assert len(set(times.values())) == 1 and t.timer.timed == 1


def test_fewer_repeats_in_the_cache_are_measured_again(tmp_path):
    table(tmp_path, repeats=3).dense_time(CONV)
    t = table(tmp_path, repeats=20)
    t.dense_time(CONV)
    assert t.counts()["measured"] == 1
    t5 = table(tmp_path, repeats=5)
    t5.dense_time(CONV)  # measured with 20 >= 5 repeats: served
    assert t5.counts() == {"measured": 0, "cached": 1}


def test_concurrent_tables_merge_their_writes(tmp_path):
    a, b = table(tmp_path), table(tmp_path)
    a.dense_time(CONV)
    b.dense_time(FC)  # b never saw CONV: its write must keep a's entry
    c = table(tmp_path)
    c.dense_time(CONV)
    c.dense_time(FC)
    assert c.counts() == {"measured": 0, "cached": 2}
    assert not list(tmp_path.glob(".*.tmp"))


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path):
    t = table(tmp_path)
    t.cache_path.write_text("{not json")
    table(tmp_path).dense_time(CONV)
    assert table(tmp_path).layer_times(CONV, [DENSE]) and json.loads(t.cache_path.read_text())


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("LRCOMPRESS_CACHE_DIR", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "latency"
    t = LatencyTable("ort-cpu", timer=FakeTimer())
    t.dense_time(CONV)
    assert t.cache_path.parent == tmp_path / "root" / "latency" and t.cache_path.exists()
    monkeypatch.delenv("LRCOMPRESS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lrcompress" / "latency"


# ---------------------------------------------------------------------------------------------
# standalone graphs and timing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,cand,ops", [
    (CONV, Candidate("tucker2", 8), ["Conv"] * 3),
    (CONV_S2, Candidate("tt", (4, 8)), ["Conv"] * 3),
    (CONV, Candidate("cp4", 6), ["Conv"] * 4),
    (GROUPED, Candidate(DENSE), ["Conv"]),
    (FC, Candidate("svd", 5), ["Gemm", "Gemm"]),
    (TOKENS, Candidate("svd", 7), ["MatMul", "MatMul", "Add"]),
])
def test_layer_graph_matches_the_torch_chain(spec, cand, ops):
    import onnx

    mod = candidate_module(spec, cand, seed=1)
    proto = layer_graph(spec, mod, batch=2)
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node] == ops
    x = torch.randn(input_shape(spec, 2))
    with torch.no_grad():
        want = mod(x).numpy()
    got = ort_session(proto.SerializeToString(), Engine("ort-cpu")).run(None, {"x": x.numpy()})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_round_robin_interleaves_and_takes_medians():
    now, order = [0.0], []

    def fn(name, seconds):
        def run():
            order.append(name)
            now[0] += seconds
        return run

    fns = [fn("a", 0.001), fn("b", 0.002), fn("c", 0.004)]
    out = round_robin(fns, repeats=3, warmup=1, clock=lambda: now[0])
    assert order == list("abc") + list("abc") + list("bca") + list("cab")
    assert [t.median_ms for t in out] == pytest.approx([1, 2, 4])
    assert [t.iqr_ms for t in out] == pytest.approx([0, 0, 0], abs=1e-9)


@pytest.mark.parametrize("engine", ["ort-cpu", "torch-cpu"])
def test_real_measurement_smoke(tmp_path, engine):
    t = LatencyTable(engine, cache_dir=tmp_path, repeats=3, warmup=1)
    times = t.layer_times(CONV, [DENSE, ("tucker2", 8)])
    assert all(math.isfinite(v) and v > 0 for v in times.values())
    assert t.counts() == {"measured": 2, "cached": 0}


# ---------------------------------------------------------------------------------------------
# additive model
# ---------------------------------------------------------------------------------------------


def test_additive_model_and_correction_factor(tmp_path):
    t = table(tmp_path)
    specs = [CONV, CONV_S2, FC]
    d = [fake_ms(s, Candidate(DENSE)) for s in specs]
    f = fake_ms(CONV, Candidate("tucker2", 8))
    assert additive_estimate(specs, {}, t) == pytest.approx(sum(d))
    assert additive_estimate(specs, {"conv": ("tucker2", 8)}, t, rest_ms=0.5) == pytest.approx(
        0.5 + f + d[1] + d[2])
    chk = check_additive(specs, {"conv": ("tucker2", 8)}, t, original_ms=2.0, compressed_ms=1.5)
    rest = 2.0 - sum(d)
    est = rest + f + d[1] + d[2]
    assert chk.rest_ms == pytest.approx(rest) and chk.dense_layers_ms == pytest.approx(sum(d))
    assert chk.estimate_ms == pytest.approx(est)
    assert chk.factor == pytest.approx(1.5 / est)
    assert chk.rel_error == pytest.approx((est - 1.5) / 1.5)
    plan = types.SimpleNamespace(layers=(LayerPlan("conv", "tucker2", 8, CONV),))
    assert check_additive(specs, plan, t, 2.0, 1.5) == chk
    with pytest.raises(ValueError, match="not in specs"):
        additive_estimate(specs, {"nope": DENSE}, t)
    with pytest.raises(ValueError):
        check_additive(specs, {}, t, 0.0, 1.0)


def test_measure_models_returns_each_model():
    from torch import nn

    models = {"a": nn.Conv2d(1, 4, 3), "b": nn.Conv2d(1, 2, 3)}
    out = measure_models(models, (1, 8, 8), Engine("torch-cpu"), repeats=2, warmup=0)
    assert set(out) == {"a", "b"} and all(v > 0 for v in out.values())


# ---------------------------------------------------------------------------------------------
# rank snapping
# ---------------------------------------------------------------------------------------------


def test_snap_keeps_the_top_of_each_plateau():
    times = {8: 1.00, 16: 1.01, 24: 1.02, 32: 1.50, 40: 1.51, 48: 2.00}
    assert snap_ranks(times) == [24, 40, 48]
    assert snap_ranks(times, dense_ms=2.0) == [24, 40]  # 48 is as slow as dense
    assert snap_ranks(times, dense_ms=1.0) == []
    assert snap_ranks(times, rtol=0.0) == [8, 16, 24, 32, 40, 48]


def test_snap_plateaus_are_anchored_at_their_start():
    rising = {r: 1.0 + 0.012 * i for i, r in enumerate(range(1, 11))}  # +1.2 % per rank
    assert snap_ranks(rising) == [3, 6, 9, 10]
    outlier = {8: 2.0, 16: 1.0, 24: 1.02, 32: 1.5, 40: 1.52}  # rank 8 slower than 16
    assert snap_ranks(outlier) == [24, 40]


def test_snap_uses_the_iqr_and_drops_dominated_ranks():
    noisy = {8: Timing(1.0, 0.2), 16: Timing(1.15, 0.1), 24: Timing(1.5, 0.0)}
    assert snap_ranks(noisy) == [16, 24]
    dip = {8: 1.2, 16: 1.5, 24: 1.1, 32: 2.0}  # rank 24 is faster than 8 and 16
    assert snap_ranks(dip) == [24, 32]


def test_snap_options_with_the_table(tmp_path):
    spec = LayerSpec("big", "conv2d", 64, 64, (3, 3), (1, 1), (1, 1), in_hw=(8, 8),
                     out_hw=(8, 8))
    steps = {DENSE: 9.0}

    def timer(spec, cands):  # steps of 32 ranks; ranks >= 40 are slower than dense
        return [steps.get(c.factorization)
                or (10.0 if c.rank >= 40 else 1.0 + math.ceil(c.rank / 16))
                for c in cands]

    opts = layer_options(spec, ["tucker2"], 8)
    kept = snap_options(spec, opts, table(tmp_path, timer=timer))
    assert [(o.factorization, o.rank) for o in kept] == [("tucker2", 16), ("tucker2", 32),
                                                         (DENSE, 0)]
    low = snap_options(spec, opts, table(tmp_path, timer=timer), keep_smallest=True)
    assert [(o.factorization, o.rank) for o in low] == [("tucker2", 8), ("tucker2", 16),
                                                        ("tucker2", 32), (DENSE, 0)]
