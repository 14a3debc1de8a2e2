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
