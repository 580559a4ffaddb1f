"""CCA: QR/SVD oracle on centred data, invariances, streaming, degenerate and underdetermined inputs."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest

from hrsa.analyze.accumulators.moments import Moments, moments
from hrsa.analyze.metrics import CcaResult, cca, cca_from_moments
from tests.analyze.conftest import random_rotation, streamed

# --- independent float64 oracle: orthonormal bases of the centred columns, then an SVD ---------------------


def oracle_rhos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Canonical correlations as the singular values of Q_x^T Q_y (Bjorck & Golub 1973), full-rank inputs."""
    qx, _ = np.linalg.qr(_centred64(x))  # (N, Dx)
    qy, _ = np.linalg.qr(_centred64(y))  # (N, Dy)
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


def _centred64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(0)


# --- oracle agreement ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dx", "dy"), [(12, 12), (12, 7), (7, 12)])
def test_matches_qr_oracle_on_activation_like_data(make_pair, dx: int, dy: int) -> None:
    # 1e3-1e4 offsets in dimensions 3-5 and 30-300x outlier scales in 0-2 (conftest.activations).
    x, y = make_pair(3000, 12, dtype=np.float64)
    x, y = x[:, :dx], y[:, -dy:]
    want = oracle_rhos(x, y)
    got = cca(x, y)
    np.testing.assert_allclose(got.rhos, want, rtol=1e-10, atol=0)
    assert got.r2_cca == pytest.approx(np.mean(want**2), rel=1e-10, abs=0)
    assert got.mean_rho == pytest.approx(np.mean(want), rel=1e-10, abs=0)
    assert (got.rank_x, got.rank_y, got.n_tokens, got.underdetermined) == (dx, dy, 3000, False)


def test_float32_input_is_computed_in_float64(make_pair) -> None:
    x, y = make_pair(2000, 10)  # float32, as stored activations are
    np.testing.assert_allclose(cca(x, y).rhos, oracle_rhos(x, y), rtol=1e-10, atol=0)


def test_streamed_equals_in_memory(make_pair, rng) -> None:
    x, y = make_pair(1999, 10, dtype=np.float64)
    whole = cca(x, y)
    for _ in range(3):
        got = cca_from_moments(streamed(x, y, rng))
        np.testing.assert_allclose(got.rhos, whole.rhos, rtol=1e-11, atol=0)
        assert got.r2_cca == pytest.approx(whole.r2_cca, rel=1e-11, abs=0)


# --- invariances ----------------------------------------------------------------------------------------------


def test_invariant_to_invertible_linear_maps_and_offsets(make_pair, rng) -> None:
    x, y = make_pair(2000, 10, dtype=np.float64)
    base = cca(x, y).rhos
    # From co-moments the error grows as eps * cond(Xc)^2, and the maps multiply the data's conditioning
    # (outlier scales of 300): keep the general map well conditioned (cond <= 6), and make the strongly
    # anisotropic one a rotation followed by column scales 1e-2..1e2, which the whitening's unit-variance step undoes.
    a = random_rotation(rng, 10) @ np.diag(rng.uniform(0.5, 3.0, size=10)) @ random_rotation(rng, 10)
    b = random_rotation(rng, 10) @ np.diag(np.geomspace(1e-2, 1e2, 10))
    for name, (xt, yt) in {
        "map of x": (x @ a, y),
        "map of y": (x, y @ b),
        "both, and offsets": (x @ b + 5e3, y @ a - rng.normal(size=10) * 1e4),
        "permutation": (x[:, ::-1], y[:, rng.permutation(10)]),
    }.items():
        np.testing.assert_allclose(cca(xt, yt).rhos, base, rtol=1e-9, atol=0, err_msg=name)


def test_symmetric_in_x_and_y(make_pair) -> None:
    x, y = make_pair(1500, 8, dtype=np.float64)
    np.testing.assert_allclose(cca(x, y[:, :5]).rhos, cca(y[:, :5], x).rhos, rtol=1e-11, atol=0)


# --- edge cases -------------------------------------------------------------------------------------------------


def test_identical_and_linearly_related_sides_give_one(make_pair, rng) -> None:
    x, _ = make_pair(1000, 9, dtype=np.float64)
    # A random Gaussian map has cond ~100, which costs a few digits on top of the data's outlier scales.
    for y, tol in ((x, 1e-12), (x @ rng.normal(size=(9, 9)) + 1e4, 1e-10)):
        res = cca(x, y)
        np.testing.assert_allclose(res.rhos, 1.0, rtol=0, atol=tol)
        assert res.r2_cca == pytest.approx(1.0, abs=tol)
        assert res.mean_rho == pytest.approx(1.0, abs=tol)


def test_independent_sides_give_small_correlations(rng) -> None:
    n, d = 20000, 6
    res = cca(rng.normal(size=(n, d)) + 1e4, rng.normal(size=(n, d)) * 100.0)
    # Each rho^2 is of order (Dx + Dy) / N under independence.
    assert res.r2_cca < 5 * (2 * d) / n
    assert not res.underdetermined


def test_fewer_tokens_than_dimensions_is_flagged_and_trivially_one(make_pair) -> None:
    x, y = make_pair(40, 60, dtype=np.float64)  # centred rank 39: both sides span all of token space
    res = cca(x, y)
    assert res.underdetermined
    assert (res.rank_x, res.rank_y) == (39, 39)
    np.testing.assert_allclose(res.rhos, 1.0, rtol=0, atol=1e-9)
    assert np.isfinite(res.r2_cca) and np.isfinite(res.mean_rho)


def test_ranks_summing_past_the_tokens_force_rhos_to_one(rng) -> None:
    # N - 1 = 49 > max(Dx, Dy) = 30 but 30 + 30 > 49: at least 11 canonical correlations are exactly 1.
    x, y = rng.normal(size=(50, 30)), rng.normal(size=(50, 30))
    res = cca(x, y)
    assert res.underdetermined
    assert np.sum(res.rhos > 1 - 1e-9) >= 11
    np.testing.assert_allclose(res.rhos, oracle_rhos(x, y), rtol=1e-8, atol=0)


def test_rank_deficient_side_drops_duplicated_and_constant_dimensions(make_pair) -> None:
    x, y = make_pair(2000, 10, dtype=np.float64)
    # A duplicated dimension and a constant one (with a 1e4 offset) in X: rank 10, not 12.
    x_bad = np.hstack([x, x[:, 1:2], np.full((2000, 1), 1e4 + 0.5)])
    res = cca(x_bad, y)
    assert (res.rank_x, res.rank_y) == (10, 10)
    assert res.underdetermined  # a rank-deficient side is flagged
    np.testing.assert_allclose(res.rhos, oracle_rhos(x, y), rtol=1e-9, atol=0)
    assert np.all(np.isfinite(res.rhos))


def test_streamed_constant_dimension_is_still_dropped(make_pair, rng) -> None:
    # Chunk means of a constant column differ by rounding; merging must not turn that into a direction.
    x, y = make_pair(1500, 8, dtype=np.float64)
    c = np.full((1500, 1), 3.1e3 + 1.0 / 3.0)
    res = cca_from_moments(streamed(np.hstack([x, c]), np.hstack([y, c]), rng))
    assert (res.rank_x, res.rank_y) == (8, 8)
    np.testing.assert_allclose(res.rhos, oracle_rhos(x, y), rtol=1e-9, atol=0)


def test_duplicate_rows_change_nothing(make_pair) -> None:
    x, y = make_pair(800, 8, dtype=np.float64)
    np.testing.assert_allclose(cca(np.vstack([x, x]), np.vstack([y, y])).rhos, cca(x, y).rhos, rtol=1e-10, atol=0)


def test_constant_side_gives_nan_without_warnings(rng) -> None:
    res = cca(rng.normal(size=(50, 3)), np.full((50, 4), 2.0))
    assert np.isnan(res.r2_cca) and np.isnan(res.mean_rho)
    assert res.rhos.shape == (0,) and res.rank_y == 0
    empty = cca_from_moments(Moments.empty(3, 4))
    assert np.isnan(empty.r2_cca) and empty.underdetermined


def test_bad_cutoff_is_a_value_error(rng) -> None:
    x = rng.normal(size=(50, 3))
    with pytest.raises(ValueError, match="rtol in"):
        cca(x, x, rtol=1.5)


def test_result_type_and_docstring_examples(rng) -> None:
    assert isinstance(cca_from_moments(moments(rng.normal(size=(30, 2)), rng.normal(size=(30, 2)))), CcaResult)
    # import_module: the package attribute ``cca`` is the function, which shadows the module of that name.
    result = doctest.testmod(importlib.import_module("hrsa.analyze.metrics.cca"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
