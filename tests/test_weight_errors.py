"""The closed-form weight-fit errors of the rank signals equal the reconstructed ones."""

from __future__ import annotations

import pytest
import torch

from lrcompress.factorizations import get_factorization, relative_error
from tests.test_factorizations import conv_spec, linear_spec


def _reconstructed(fact, w, spec, ranks, **opts):
    return [relative_error(w, fact.reconstruct(fs, spec))
            for fs in fact.decompose_many(w, spec, ranks, **opts)]


@pytest.mark.parametrize("method,ranks", [
    ("tt", [1, 2, 5, (3, 7), (12, 1), (12, 8), 0.5]),
    ("tucker2", [1, (2, 5), (12, 8), (7, 3), 0.25]),
    ("svd", [1, 4, 12, 0.5]),
    ("cp", [2, 6]),  # no closed form: reconstructed, the same numbers by construction
])
def test_weight_errors_equal_the_reconstructed_errors(method, ranks):
    g = torch.Generator().manual_seed(5)
    fact = get_factorization(method)
    for spec in (conv_spec(12, 8, 3, pad=1), linear_spec(10, 6), conv_spec(9, 7, 1)):
        w = torch.randn(spec.weight_shape, generator=g, dtype=torch.float64)
        w[:, : spec.in_ch // 2] *= 0.05  # an uneven spectrum
        ok = [r for r in ranks if not (isinstance(r, tuple) and len(spec.weight_shape) == 2)]
        got = fact.weight_errors(w, spec, ok)
        want = _reconstructed(fact, w, spec, ok)
        assert got == pytest.approx(want, rel=1e-7, abs=1e-7), (spec.name, ok)
        assert all(0 <= e <= 1 + 1e-9 for e in got)


def test_weight_errors_fall_back_where_the_fit_is_not_a_projection():
    """HOOI sweeps: the error is taken from the reconstruction, not the HOSVD formula."""
    g = torch.Generator().manual_seed(6)
    spec = conv_spec(12, 8, 3, pad=1)
    w = torch.randn(spec.weight_shape, generator=g, dtype=torch.float64)
    fact = get_factorization("tucker2")
    got = fact.weight_errors(w, spec, [(3, 2), (6, 5)], hooi_iters=3)
    assert got == pytest.approx(_reconstructed(fact, w, spec, [(3, 2), (6, 5)], hooi_iters=3),
                                rel=1e-9)
    # and HOOI improves on HOSVD, so the two differ: the fallback is not the closed form
    assert got[0] < fact.weight_errors(w, spec, [(3, 2)])[0] - 1e-6


def test_weight_errors_of_a_zero_weight_are_zero():
    spec = conv_spec(6, 4, 3, pad=1)
    assert get_factorization("tt").weight_errors(torch.zeros(spec.weight_shape), spec,
                                                  [1, 3]) == [0.0, 0.0]


@pytest.mark.parametrize("rows,cols", [(30, 8), (6, 20), (12, 12)])
def test_prefix_grams_give_each_leading_block_its_own_basis(rows, cols):
    """The bases from shared Gram matrices of leading rows equal :func:`left_basis` of each
    block on its own (1e-9), on both sides of n = cols."""
    from lrcompress.factorizations._linalg import basis_from_gram, left_basis, prefix_grams

    g = torch.Generator().manual_seed(2)
    m = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    m[:, : cols // 2] *= 0.1  # distinct singular values
    ns = sorted({1, 3, cols - 1, cols, min(rows, cols + 1), rows})
    grams = prefix_grams(m, ns)
    assert sorted(grams) == ns
    for n in ns:
        k = min(n, cols)
        u, p = basis_from_gram(m[:n], *grams[n], k)
        u0, p0 = left_basis(m[:n], k)
        assert torch.allclose(u @ p, u0 @ p0, atol=1e-9)  # the same projection
        assert torch.allclose(u, u0, atol=1e-9)  # and the same signs (deterministic basis)
