"""Linear regression R^2: lstsq residual oracle, ridge oracle, invariances, streaming, underdetermined inputs."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest

from hrsa.analyze.metrics import LinearRegressionResult, linear_regression, linear_regression_from_moments
from tests.analyze.conftest import random_rotation, streamed

# --- independent float64 oracles: fit on the centred tokens, measure the residual ----------------------------


def oracle_r2(x: np.ndarray, y: np.ndarray, *, ridge: float = 0.0) -> float:
    """R^2(Y|X) = 1 - |Yc - Xc B|_F^2 / |Yc|_F^2, B by numpy's lstsq (or the ridge normal equations)."""
    xc = np.asarray(x, dtype=np.float64) - np.mean(x, axis=0, dtype=np.float64)
    yc = np.asarray(y, dtype=np.float64) - np.mean(y, axis=0, dtype=np.float64)
    if ridge == 0.0:
        b, *_ = np.linalg.lstsq(xc, yc, rcond=None)  # (Dx, Dy), SVD-based
    else:
        mu = ridge * np.sum(xc**2) / xc.shape[1]  # lambda relative to tr(Xc^T Xc) / Dx
        b = np.linalg.solve(xc.T @ xc + mu * np.eye(xc.shape[1]), xc.T @ yc)
    return float(1.0 - np.sum((yc - xc @ b) ** 2) / np.sum(yc**2))


# --- oracle agreement ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dx", "dy"), [(12, 12), (12, 5), (5, 12)])
def test_matches_lstsq_residuals_on_activation_like_data(make_pair, dx: int, dy: int) -> None:
    # 1e3-1e4 offsets in dimensions 3-5 and 30-300x outlier scales in 0-2 (conftest.activations).
    x, y = make_pair(3000, 12, dtype=np.float64)
    x, y = x[:, :dx], y[:, -dy:]
    got = linear_regression(x, y)
    assert got.r2_y_from_x == pytest.approx(oracle_r2(x, y), rel=1e-10, abs=0)
    assert got.r2_x_from_y == pytest.approx(oracle_r2(y, x), rel=1e-10, abs=0)
    assert got == LinearRegressionResult(got.r2_y_from_x, got.r2_x_from_y, dx, dy, 0.0, 3000, False, False)
    assert not got.underdetermined


def test_unexplained_fraction_is_accurate_too(rng) -> None:
    # Near-perfect fits: 1 - R^2 (the residual share, ~1e-6 here) must still be right to many digits.
    x = rng.normal(size=(2000, 8)) * np.geomspace(1.0, 100.0, 8) + 1e4
    y = x @ rng.normal(size=(8, 4)) + 1e-3 * rng.normal(size=(2000, 4))
    got = linear_regression(x, y).r2_y_from_x
    assert 1.0 - got == pytest.approx(1.0 - oracle_r2(x, y), rel=1e-6)


@pytest.mark.parametrize("ridge", [1e-3, 0.1, 10.0])
def test_ridge_matches_the_normal_equations(make_pair, ridge: float) -> None:
    x, y = make_pair(2000, 10, dtype=np.float64)
    got = linear_regression(x, y[:, :6], ridge=ridge)
    assert got.r2_y_from_x == pytest.approx(oracle_r2(x, y[:, :6], ridge=ridge), rel=1e-10, abs=0)
    assert got.r2_x_from_y == pytest.approx(oracle_r2(y[:, :6], x, ridge=ridge), rel=1e-10, abs=0)
    assert got.r2_y_from_x < linear_regression(x, y[:, :6]).r2_y_from_x and got.ridge == ridge


def test_streamed_equals_in_memory(make_pair, rng) -> None:
    x, y = make_pair(1999, 10, dtype=np.float64)
    for ridge in (0.0, 0.1):
        whole = linear_regression(x, y, ridge=ridge)
        got = linear_regression_from_moments(streamed(x, y, rng), ridge=ridge)
        assert got.r2_y_from_x == pytest.approx(whole.r2_y_from_x, rel=1e-12, abs=0)
        assert got.r2_x_from_y == pytest.approx(whole.r2_x_from_y, rel=1e-12, abs=0)


# --- invariances ----------------------------------------------------------------------------------------------


def test_invariant_to_invertible_maps_of_the_regressor_and_rotations_of_the_target(make_pair, rng) -> None:
    x, y = make_pair(2000, 9, dtype=np.float64)
    base = linear_regression(x, y).r2_y_from_x
    a = random_rotation(rng, 9) @ np.diag(rng.uniform(0.5, 3.0, size=9)) @ random_rotation(rng, 9)  # invertible, cond <= 6
    for name, (xt, yt) in {
        "invertible map of x": (x @ a, y),
        "anisotropic column scales of x": (x * np.geomspace(1e-3, 1e3, 9), y),
        "rotation and isotropic scale of y": (x, 0.1 * y @ random_rotation(rng, 9)),
        "offsets": (x - 3e4, y + rng.normal(size=9) * 1e4),
    }.items():
        assert linear_regression(xt, yt).r2_y_from_x == pytest.approx(base, rel=1e-10, abs=0), name


def test_anisotropic_scaling_of_the_target_reweights_it(make_pair) -> None:
    x, y = make_pair(2000, 9, dtype=np.float64)
    stretched = y * np.geomspace(1e-2, 1e2, 9)
    assert linear_regression(x, stretched).r2_y_from_x != pytest.approx(linear_regression(x, y).r2_y_from_x, abs=1e-3)


def test_ridge_is_invariant_to_rotations_and_isotropic_scale_of_the_regressor(make_pair, rng) -> None:
    x, y = make_pair(2000, 9, dtype=np.float64)
    base = linear_regression(x, y, ridge=0.1).r2_y_from_x
    assert linear_regression(5.0 * x @ random_rotation(rng, 9), y, ridge=0.1).r2_y_from_x == pytest.approx(base, rel=1e-10)


# --- edge cases -------------------------------------------------------------------------------------------------


def test_identical_sides_give_one(make_pair) -> None:
    x, _ = make_pair(1000, 9, dtype=np.float64)
    res = linear_regression(x, x)
    assert res.r2_y_from_x == pytest.approx(1.0, abs=1e-12)
    assert res.r2_x_from_y == pytest.approx(1.0, abs=1e-12)


def test_independent_sides_give_about_d_over_n(rng) -> None:
    n, d = 20000, 6
    res = linear_regression(rng.normal(size=(n, d)) + 1e4, rng.normal(size=(n, d)) * 100.0)
    assert res.r2_y_from_x < 5 * d / n and res.r2_x_from_y < 5 * d / n
    assert not res.underdetermined


def test_fewer_tokens_than_regressor_dimensions_is_flagged_and_trivially_one(make_pair, rng) -> None:
    x, _ = make_pair(40, 60, dtype=np.float64)
    y = rng.normal(size=(40, 3))  # unrelated, but 60 regressors fit 40 tokens exactly
    res = linear_regression(x, y)
    assert res.underdetermined_y_from_x and not res.underdetermined_x_from_y and res.underdetermined
    assert res.r2_y_from_x == pytest.approx(1.0, abs=1e-9)
    assert res.r2_x_from_y == pytest.approx(oracle_r2(y, x), rel=1e-9)
    assert res.rank_x == 39
    # N - 1 = Dx is already enough for an exact fit.
    assert linear_regression(rng.normal(size=(11, 10)), rng.normal(size=(11, 2))).underdetermined_y_from_x


def test_rank_deficient_regressor_uses_the_pseudo_inverse(make_pair) -> None:
    x, y = make_pair(2000, 8, dtype=np.float64)
    x_bad = np.hstack([x, x[:, 1:2] - 2.0 * x[:, 4:5], np.full((2000, 1), 1e4 + 0.5)])  # collinear, constant
    res = linear_regression(x_bad, y)
    assert res.rank_x == 8 and np.isfinite(res.r2_y_from_x) and np.isfinite(res.r2_x_from_y)
    assert res.r2_y_from_x == pytest.approx(oracle_r2(x, y), rel=1e-10)
    assert res.r2_x_from_y == pytest.approx(oracle_r2(y, x_bad), rel=1e-10)


def test_duplicate_rows_change_nothing(make_pair) -> None:
    x, y = make_pair(800, 8, dtype=np.float64)
    dup = linear_regression(np.vstack([x, x]), np.vstack([y, y]))
    assert dup.r2_y_from_x == pytest.approx(linear_regression(x, y).r2_y_from_x, rel=1e-12)


def test_constant_sides_give_nan_targets_and_zero_regressors(rng) -> None:
    x = rng.normal(size=(50, 3))
    res = linear_regression(x, np.full((50, 4), 2.0))
    assert np.isnan(res.r2_y_from_x) and res.r2_x_from_y == 0.0 and res.rank_y == 0
    ridged = linear_regression(x, np.full((50, 4), 2.0), ridge=0.1)
    assert np.isnan(ridged.r2_y_from_x) and ridged.r2_x_from_y == 0.0
    with pytest.raises(ValueError, match="ridge lambda >= 0"):
        linear_regression(x, x, ridge=-1.0)


def test_docstring_examples() -> None:
    # import_module: the package attribute ``linear_regression`` is the function, which shadows the module.
    module = importlib.import_module("hrsa.analyze.metrics.linear_regression")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
