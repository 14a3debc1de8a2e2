"""Layer factorizations: exactness at full rank, error vs rank, costs vs FlopCounterMode, modules.

Tolerances are written out at each assertion. Weights are float64 unless a test says otherwise.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lrcompress.factorizations.cp as cp_module
from lrcompress.errors import LrcError, UserError
from lrcompress.factorizations import (
    ALIASES,
    FACTORIZATIONS,
    DecompositionError,
    break_even_rank,
    chain_factors,
    get_factorization,
    relative_error,
)
from lrcompress.model.costs import dense_macs
from lrcompress.model.layers import LayerSpec

METHODS = ["svd", "tucker2", "tt", "cp", "cp4"]
EXACT = ["svd", "tucker2", "tt"]


def conv_spec(t, s, k, stride=1, pad=0, dil=1, hw=(9, 9), bias=True, groups=1, name="conv"):
    pair = (lambda v: (v, v) if isinstance(v, int) else tuple(v))
    k, stride, pad, dil = pair(k), pair(stride), pair(pad), pair(dil)
    out = tuple((hw[i] + 2 * pad[i] - dil[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in (0, 1))
    return LayerSpec(name, "conv2d", s, t, k, stride, pad, dil, groups, bias, hw, out)


def linear_spec(t, s, tokens=1, bias=True, name="fc"):
    return LayerSpec(name, "linear", s, t, bias=bias, in_hw=(tokens, 1), out_hw=(tokens, 1))


SHAPES = {
    "3x3": conv_spec(12, 8, 3, pad=1),
    "3x3_s2_nobias": conv_spec(8, 12, 3, stride=2, pad=1, bias=False),
    "3x5_dil": conv_spec(10, 6, (3, 5), stride=(2, 1), pad=(1, 2), dil=(2, 1), hw=(11, 9)),
    "3x1": conv_spec(6, 7, (3, 1), pad=(1, 0)),
    "1x3_s2": conv_spec(7, 5, (1, 3), stride=(1, 2), pad=(0, 1), bias=False),
    "stem_7x7": conv_spec(8, 1, 7, stride=2, pad=3, hw=(12, 12)),
    "1x1_s2": conv_spec(12, 8, 1, stride=2, hw=(8, 8)),
    "1x1_pad": conv_spec(5, 9, 1, pad=1, bias=False, hw=(5, 5)),
    "linear": linear_spec(7, 10),
    "linear_tokens": linear_spec(12, 6, tokens=5, bias=False),
}
KXK = [n for n, s in SHAPES.items() if s.kind == "conv2d" and s.kernel != (1, 1)]


def weights(spec, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(spec.weight_shape, generator=g, dtype=dtype)
    b = torch.randn(spec.out_ch, generator=g, dtype=dtype) if spec.bias else None
    return w, b


def dense_forward(spec, w, b, x):
    if spec.kind == "linear":
        return F.linear(x, w, b)
    return F.conv2d(x, w, b, spec.stride, spec.padding, spec.dilation)


def sample_input(spec, batch=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    if spec.kind == "linear":
        return torch.randn(batch, spec.tokens, spec.in_ch, generator=g, dtype=dtype)
    return torch.randn(batch, spec.in_ch, *spec.in_hw, generator=g, dtype=dtype)


def full_rank(fact, spec):
    """A rank at which the method is exact: max_rank, except tied TT (exact only when T == S)."""
    if fact.name == "tt" and spec.kernel != (1, 1) and spec.kind == "conv2d":
        return fact.rank_from(spec, (spec.out_ch, spec.in_ch))
    return fact.max_rank(spec)


def some_ranks(fact, spec, n=4):
    top = fact.scalar_rank(fact.max_rank(spec))
    return sorted({max(1, round(top * (i + 1) / n)) for i in range(n)})


# ---------------------------------------------------------------------------------------------
# exactness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", EXACT)
def test_full_rank_chain_reproduces_layer(method, shape):
    fact, spec = get_factorization(method), SHAPES[shape]
    w, b = weights(spec)
    seq = fact.from_weight(w, b, spec, full_rank(fact, spec))
    x = sample_input(spec)
    ref = dense_forward(spec, w, b, x)
    with torch.no_grad():
        torch.testing.assert_close(seq(x), ref, rtol=1e-5, atol=1e-9 * ref.abs().max().item())


@pytest.mark.parametrize("shape", ["1x1_s2", "1x1_pad", "linear", "linear_tokens"])
@pytest.mark.parametrize("method", ["cp", "cp4"])
def test_cp_on_matrices_is_exact_svd(method, shape):
    # Linear layers and 1×1 convs reduce to the SVD split for every method.
    fact, spec = get_factorization(method), SHAPES[shape]
    w, b = weights(spec)
    seq = fact.from_weight(w, b, spec, fact.max_rank(spec))
    assert len(chain_factors(seq)) == 2
    x = sample_input(spec)
    ref = dense_forward(spec, w, b, x)
    with torch.no_grad():
        torch.testing.assert_close(seq(x), ref, rtol=1e-5, atol=1e-9 * ref.abs().max().item())


def _known_cp_weight(method, spec, rank, seed=3):
    g = torch.Generator().manual_seed(seed)
    t, s = spec.out_ch, spec.in_ch
    kh, kw = spec.kernel
    a = torch.randn(t, rank, generator=g, dtype=torch.float64)
    c = torch.randn(s, rank, generator=g, dtype=torch.float64)
    if method == "cp":
        k = torch.randn(kh * kw, rank, generator=g, dtype=torch.float64)
        return torch.einsum("tr,kr,sr->tsk", a, k, c).reshape(t, s, kh, kw)
    y = torch.randn(kh, rank, generator=g, dtype=torch.float64)
    x = torch.randn(kw, rank, generator=g, dtype=torch.float64)
    return torch.einsum("tr,hr,wr,sr->tshw", a, y, x, c)


@pytest.mark.parametrize("shape", KXK)
@pytest.mark.parametrize("method", ["cp", "cp4"])
def test_cp_recovers_known_rank(method, shape):
    fact, spec = get_factorization(method), SHAPES[shape]
    rank = 3
    w = _known_cp_weight(method, spec, rank)
    # 100 sweeps: where R equals a mode's size (the 3×1 kernel) ALS converges slowly (relative
    # error 6e-4 after the default 25, 2e-7 after 100); every other shape is < 1e-4 at 25.
    factors = fact.decompose(w, spec, rank, n_iter_max=100)
    assert relative_error(w, fact.reconstruct(factors, spec)) < 1e-4


# ---------------------------------------------------------------------------------------------
# error vs rank
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", KXK)
@pytest.mark.parametrize("method", EXACT)
def test_error_never_grows_with_rank_exact_methods(method, shape):
    fact, spec = get_factorization(method), SHAPES[shape]
    w, _ = weights(spec)
    ranks = list(range(1, fact.scalar_rank(fact.max_rank(spec)) + 1))
    errs = [relative_error(w, fact.reconstruct(fs, spec))
            for fs in fact.decompose_many(w, spec, ranks)]
    for lo, hi in zip(errs, errs[1:]):
        assert hi <= lo + 1e-9, errs
    if method != "tt":  # tied TT is exact at its max only when T == S
        assert errs[-1] < 1e-10


@pytest.mark.parametrize("shape", ["3x3", "3x5_dil", "3x1"])
@pytest.mark.parametrize("method", ["cp", "cp4"])
def test_cp_error_nearly_monotone_in_rank(method, shape):
    # CP-ALS is a local method: its error is not guaranteed monotone in the rank. From the SVD
    # initialisation it is in practice; allow 0.02 (relative error units) of slack.
    fact, spec = get_factorization(method), SHAPES[shape]
    w, _ = weights(spec)
    ranks = [1, 2, 4, 6, 8, 12, 16]  # default ALS budget (25 sweeps)
    errs = [relative_error(w, fact.reconstruct(fs, spec))
            for fs in fact.decompose_many(w, spec, ranks)]
    for lo, hi in zip(errs, errs[1:]):
        assert hi <= lo + 0.02, errs
    assert errs[-1] < errs[0] - 0.2, errs


def test_hooi_improves_on_hosvd_and_matches_tensorly():
    fact, spec = get_factorization("tucker2"), SHAPES["3x3"]
    w, _ = weights(spec)
    rank = (5, 4)
    hosvd = relative_error(w, fact.reconstruct(fact.decompose(w, spec, rank), spec))
    hooi = fact.decompose(w, spec, rank, hooi_iters=5)
    err = relative_error(w, fact.reconstruct(hooi, spec))
    assert err <= hosvd + 1e-12
    ref = fact.decompose(w, spec, rank, hooi_iters=5, impl="tensorly")
    torch.testing.assert_close(fact.reconstruct(hooi, spec), fact.reconstruct(ref, spec),
                               rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# costs
# ---------------------------------------------------------------------------------------------


def counted_macs(seq, spec) -> int:
    if spec.kind == "linear":
        x = torch.zeros(1, spec.tokens, spec.in_ch)
    else:
        x = torch.zeros(1, spec.in_ch, *spec.in_hw)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        seq(x)
    return fc.get_total_flops() // 2


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", METHODS)
def test_params_and_macs_match_built_module(method, shape):
    fact, spec = get_factorization(method), SHAPES[shape]
    ranks = [1, fact.max_rank(spec), 0.5]
    if method in ("tucker2", "tt") and spec.kernel != (1, 1):
        ranks.append((3, 2))
    for rank in ranks:
        seq = fact.skeleton(spec, rank)
        assert fact.params(spec, rank) == sum(p.numel() for p in seq.parameters()), rank
        assert fact.macs(spec, rank) == counted_macs(seq, spec), rank
        y = seq(torch.zeros(1, spec.tokens, spec.in_ch) if spec.kind == "linear"
                else torch.zeros(1, spec.in_ch, *spec.in_hw))
        expect = (1, spec.tokens, spec.out_ch) if spec.kind == "linear" else (
            1, spec.out_ch, *spec.out_hw)
        assert tuple(y.shape) == expect


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", METHODS)
def test_break_even_rank(method, shape):
    fact, spec = get_factorization(method), SHAPES[shape]
    r = break_even_rank(fact, spec)
    dense = dense_macs(spec)
    top = fact.scalar_rank(fact.max_rank(spec))
    if r == 0:
        assert fact.macs(spec, 1) >= dense
        return
    assert fact.macs(spec, r) < dense
    if r < top:
        assert fact.macs(spec, r + 1) >= dense


def test_break_even_known_values():
    # 64→64 3×3 stride 1, 8×8: svd r(64·9+64) < 64·64·9 → r < 57.6; tt 64r+9r²+64r < 36864 → 57.
    spec = conv_spec(64, 64, 3, pad=1, hw=(8, 8))
    assert break_even_rank(get_factorization("svd"), spec) == 57
    assert break_even_rank(get_factorization("tt"), spec) == 57
    assert break_even_rank(get_factorization("cp"), spec) == 269  # R·137 < 36864 → 269; max 269
    grouped = conv_spec(64, 64, 3, pad=1, groups=2)
    assert break_even_rank(get_factorization("svd"), grouped) == 0


# ---------------------------------------------------------------------------------------------
# modules, factors and reconstruction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["3x3", "3x5_dil", "1x1_s2", "linear_tokens"])
@pytest.mark.parametrize("method", METHODS)
def test_skeleton_from_weight_and_reconstruct_agree(method, shape):
    fact, spec = get_factorization(method), SHAPES[shape]
    w, b = weights(spec, dtype=torch.float32)
    rank = 0.5
    seq = fact.from_weight(w, b, spec, rank)
    skel = fact.skeleton(spec, rank, dtype=torch.float32)
    sd, sk = seq.state_dict(), skel.state_dict()
    assert list(sd) == list(sk)
    assert all(sd[k].shape == sk[k].shape and sd[k].dtype == sk[k].dtype for k in sd)
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for m in seq)
    factors = fact.decompose(w, spec, rank)
    assert [f.dtype for f in factors] == [torch.float32] * len(factors)
    via_chain = fact.reconstruct(chain_factors(seq), spec)
    assert via_chain.shape == spec.weight_shape
    err_chain = relative_error(w, via_chain)
    err_factors = relative_error(w, fact.reconstruct(factors, spec))
    assert abs(err_chain - err_factors) < 1e-6  # float32 storage
    if spec.bias:
        torch.testing.assert_close(list(seq.parameters())[-1], b, rtol=0, atol=0)
    # The reconstruction is differentiable w.r.t. the chain's parameters.
    (via_chain - w).pow(2).sum().backward()
    assert all(p.grad is not None for p in chain_factors(seq))


@pytest.mark.parametrize("method", METHODS)
def test_skeleton_loads_a_state_dict_bit_exactly(method):
    fact, spec = get_factorization(method), SHAPES["3x3_s2_nobias"]
    w, b = weights(spec, dtype=torch.float32)
    seq = fact.from_weight(w, b, spec, 4)
    skel = fact.skeleton(spec, 4)
    skel.load_state_dict(seq.state_dict())
    x = sample_input(spec, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(skel(x), seq(x))


@pytest.mark.parametrize("shape", ["3x3", "3x1", "1x1_s2", "linear"])
@pytest.mark.parametrize("method", METHODS)
def test_decompose_many_equals_looping_decompose(method, shape):
    fact, spec = get_factorization(method), SHAPES[shape]
    w, _ = weights(spec)
    ranks = some_ranks(fact, spec, 3)
    many = fact.decompose_many(w, spec, ranks)
    for r, fs in zip(ranks, many):
        one = fact.decompose(w, spec, r)
        assert len(one) == len(fs)
        for a, c in zip(one, fs):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)  # same code path


@pytest.mark.parametrize("method, rank", [("tt", 3), ("tt", (5, 4)), ("tucker2", (5, 3)),
                                          ("cp", 6), ("cp4", 6)])
def test_torch_impl_matches_tensorly_reference(method, rank):
    # The shared-SVD / lean-MTTKRP paths compute what tensorly's tensor_train, partial_tucker and
    # parafac compute, from the same initialisation (10 ALS sweeps for CP, no early stop).
    fact, spec = get_factorization(method), SHAPES["3x5_dil"]
    w, _ = weights(spec)
    opts = {"n_iter_max": 10, "tol": 0} if method.startswith("cp") else {}
    ours = fact.reconstruct(fact.decompose(w, spec, rank, **opts), spec)
    ref = fact.reconstruct(fact.decompose(w, spec, rank, impl="tensorly", **opts), spec)
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-9)


def test_tensorly_backend_is_not_left_changed():
    fact, spec = get_factorization("cp"), SHAPES["3x3"]
    w, _ = weights(spec)
    fact.decompose(w, spec, 3, impl="tensorly", n_iter_max=2)
    tl = sys.modules["tensorly"]  # imported (lazily) by the package, not by this test
    assert tl.get_backend() == "numpy"


def test_dtype_and_threads_are_restored():
    fact, spec = get_factorization("svd"), SHAPES["3x3"]
    w = torch.randn(spec.weight_shape).to(torch.bfloat16)
    threads = torch.get_num_threads()
    factors = fact.decompose(w, spec, 4)
    assert torch.get_num_threads() == threads
    assert all(f.dtype == torch.bfloat16 and f.device == w.device for f in factors)


def test_cp_is_deterministic():
    fact, spec = get_factorization("cp"), SHAPES["3x3"]
    w, _ = weights(spec)
    a, b = fact.decompose(w, spec, 20), fact.decompose(w, spec, 20)  # 20 > kh·kw: random columns
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_cp_degeneration_raises_decomposition_error(monkeypatch):
    fact, spec = get_factorization("cp"), SHAPES["3x3"]
    w, _ = weights(spec)

    def broken(x, init, n_iter_max, tol, ridge=1e-12):
        return [torch.full_like(t, float("nan")) for t in init]

    monkeypatch.setattr(cp_module, "cp_als", broken)
    with pytest.raises(DecompositionError, match=r"'conv'.*rank 5.*non-finite") as e:
        fact.decompose(w, spec, 5)
    assert isinstance(e.value, LrcError)


def test_zero_weight_gives_zero_factors():
    for method in METHODS:
        fact, spec = get_factorization(method), SHAPES["3x3"]
        w = torch.zeros(spec.weight_shape, dtype=torch.float64)
        factors = fact.decompose(w, spec, 3)
        assert all(torch.isfinite(f).all() for f in factors), method
        assert fact.reconstruct(factors, spec).abs().max() == 0, method


# ---------------------------------------------------------------------------------------------
# registry, eligibility, ranks, options
# ---------------------------------------------------------------------------------------------


def test_registry_and_unknown_name():
    assert set(FACTORIZATIONS) == {"svd", "tucker2", "cp", "cp4", "tt"}
    assert ALIASES == {"tucker": "tucker2"}
    assert get_factorization("tucker") is FACTORIZATIONS["tucker2"]
    assert get_factorization("CP4") is FACTORIZATIONS["cp4"]
    with pytest.raises(UserError) as e:
        get_factorization("tucker3")
    for name in FACTORIZATIONS:
        assert name in str(e.value)


@pytest.mark.parametrize("method", METHODS)
def test_unsupported_reason(method):
    fact = get_factorization(method)
    assert fact.unsupported_reason(SHAPES["3x3"]) == ""
    assert fact.unsupported_reason(SHAPES["linear"]) == ""
    grouped = conv_spec(8, 8, 3, groups=2)
    assert "grouped conv (groups=2)" in fact.unsupported_reason(grouped)
    assert "depthwise" in fact.unsupported_reason(conv_spec(8, 8, 3, groups=8))
    odd = LayerSpec(**{**SHAPES["3x3"].to_dict(), "unsupported": "string padding 'same'"})
    assert fact.unsupported_reason(odd) == "string padding 'same'"
    with pytest.raises(ValueError, match="grouped"):
        fact.skeleton(grouped, 2)
    w, _ = weights(SHAPES["3x3"])
    with pytest.raises(ValueError, match="shape"):
        fact.decompose(w[:, :4], SHAPES["3x3"], 2)
    with pytest.raises(ValueError, match="unknown option"):
        fact.decompose(w, SHAPES["3x3"], 2, bogus=1)


def test_rank_from():
    spec = SHAPES["3x3"]  # T=12, S=8, 3×3
    svd, tucker, tt, cp = (get_factorization(n) for n in ("svd", "tucker2", "tt", "cp"))
    assert svd.max_rank(spec) == 12 and svd.rank_from(spec, 100) == 12
    assert svd.rank_from(spec, 0) == 1 and svd.rank_from(spec, 0.5) == 6
    assert svd.rank_from(spec, 1.0) == 12
    assert tucker.max_rank(spec) == (12, 8)
    assert tucker.rank_from(spec, 10) == (10, 8) and tucker.rank_from(spec, [20, 3]) == (12, 3)
    assert tucker.rank_from(spec, 0.5) == (6, 4)
    assert tucker.scalar_rank((10, 8)) == 10
    assert tt.max_rank(spec) == 8 and tt.rank_from(spec, 10) == 8
    assert tt.rank_from(spec, (30, 30)) == (12, 8)
    assert tt.rank_from(conv_spec(8, 1, 3), (8, 8)) == (8, 1)  # r2 <= S
    assert tucker.rank_from(conv_spec(64, 2, (3, 1)), 64) == (6, 2)  # R4 <= R3·kh·kw
    assert cp.max_rank(spec) == (12 * 8 * 9) // (12 + 8 + 9)
    assert svd.rank_from(SHAPES["linear"], (3, 5)) == 3  # a matrix: tuple -> min
    for bad in (True, "4", 1.5, 0.0, -0.1, None, (1.0, 2)):
        with pytest.raises(ValueError):
            tucker.rank_from(spec, bad)
    with pytest.raises(ValueError):
        svd.rank_from(spec, (3, 4))
    with pytest.raises(ValueError):
        tt.rank_from(spec, (3, 4, 5))
