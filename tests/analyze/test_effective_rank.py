"""Effective rank and participation ratio: SVD oracle, exact cases, invariances, streaming, degenerate inputs."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest
from scipy.special import entr
from scipy.stats import special_ortho_group

from hrsa.analyze.accumulators.moments import Moments
from hrsa.analyze.metrics import EffectiveRankResult, effective_rank, effective_rank_from_moments
from tests.analyze.conftest import streamed

# --- independent float64 oracle: singular values of the centred data --------------------------------------------


def oracle(x: np.ndarray) -> tuple[float, float]:
    """(erank, PR) from s^2 of centred x (Roy & Vetterli 2007 on the covariance spectrum; scipy's entropy terms)."""
    xc = np.asarray(x, dtype=np.float64) - np.mean(x, axis=0, dtype=np.float64)
    s2 = np.linalg.svd(xc, compute_uv=False) ** 2
    p = s2 / s2.sum()
    return float(np.exp(entr(p).sum())), float(s2.sum() ** 2 / np.sum(s2**2))


def _check(res: EffectiveRankResult, x: np.ndarray, y: np.ndarray, rel: float) -> None:
    (ex, px), (ey, py) = oracle(x), oracle(y)
    assert res.effective_rank_x == pytest.approx(ex, rel=rel, abs=0)
    assert res.participation_ratio_x == pytest.approx(px, rel=rel, abs=0)
    assert res.effective_rank_y == pytest.approx(ey, rel=rel, abs=0)
    assert res.participation_ratio_y == pytest.approx(py, rel=rel, abs=0)


# --- oracle agreement ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dx", "dy"), [(12, 12), (12, 5)])
def test_matches_svd_oracle_on_activation_like_data(make_pair, dx: int, dy: int) -> None:
    # 1e3-1e4 offsets in dimensions 3-5 and 30-300x outlier scales in 0-2 (conftest.activations).
    x, y = make_pair(3000, 12, dtype=np.float64)
    x, y = x[:, :dx], y[:, -dy:]
    res = effective_rank(x, y)
    _check(res, x, y, rel=1e-10)
    assert (res.n_tokens, res.underdetermined_x, res.underdetermined_y) == (3000, False, False)
    assert 1.0 <= res.participation_ratio_x <= res.effective_rank_x <= dx  # PR <= erank (Renyi orders 2, 1)


def test_exact_values_for_equal_and_single_directions(rng) -> None:
    z = rng.normal(size=(500, 6))
    q, _ = np.linalg.qr(z - z.mean(0))  # orthonormal columns spanning centred data: centred themselves
    flat = q @ special_ortho_group.rvs(6, random_state=rng) * 7.0 + 1e4  # 6 equal eigenvalues, rotated
    one = np.outer(rng.normal(size=500), rng.normal(size=4)) - 3e3  # rank one
    res = effective_rank(flat, one)
    assert res.effective_rank_x == pytest.approx(6.0, rel=1e-12)
    assert res.participation_ratio_x == pytest.approx(6.0, rel=1e-12)
    assert res.effective_rank_y == pytest.approx(1.0, rel=1e-12)
    assert res.participation_ratio_y == pytest.approx(1.0, rel=1e-12)


def test_streamed_equals_in_memory(make_pair, rng) -> None:
    x, y = make_pair(1999, 10, dtype=np.float64)
    whole, got = effective_rank(x, y), effective_rank_from_moments(streamed(x, y, rng))
    for name in ("effective_rank_x", "effective_rank_y", "participation_ratio_x", "participation_ratio_y"):
        assert getattr(got, name) == pytest.approx(getattr(whole, name), rel=1e-12, abs=0), name


# --- invariances ----------------------------------------------------------------------------------------------


def test_invariant_to_rotations_offsets_and_isotropic_scale(make_pair, rng) -> None:
    x, y = make_pair(2000, 10, dtype=np.float64)
    base = effective_rank(x, y)
    xt = 0.01 * x @ special_ortho_group.rvs(10, random_state=rng) + 5e4
    yt = 40.0 * y[:, rng.permutation(10)] - rng.normal(size=10) * 1e4
    got = effective_rank(xt, yt)
    for name in ("effective_rank_x", "effective_rank_y", "participation_ratio_x", "participation_ratio_y"):
        assert getattr(got, name) == pytest.approx(getattr(base, name), rel=1e-10, abs=0), name


def test_an_outlier_dimension_pulls_both_towards_one(rng) -> None:
    x = rng.normal(size=(3000, 16))
    loud = x * np.r_[100.0, np.ones(15)]
    res = effective_rank(x, loud)
    assert res.effective_rank_x > 15.0 and res.participation_ratio_x > 15.0
    assert res.effective_rank_y < 1.2 and res.participation_ratio_y < 1.01
    _check(res, x, loud, rel=1e-10)


# --- edge cases -------------------------------------------------------------------------------------------------


def test_identical_sides_agree(make_pair) -> None:
    x, _ = make_pair(1000, 9, dtype=np.float64)
    res = effective_rank(x, x)
    assert res.effective_rank_x == res.effective_rank_y and res.participation_ratio_x == res.participation_ratio_y


def test_fewer_tokens_than_dimensions_is_flagged_and_capped(make_pair) -> None:
    x, y = make_pair(40, 60, dtype=np.float64)
    res = effective_rank(x, y[:, :30])
    assert res.underdetermined_x and not res.underdetermined_y
    assert res.effective_rank_x <= 39.0 + 1e-9 and res.participation_ratio_x <= 39.0 + 1e-9
    # The D - N + 1 null eigenvalues are rounding noise (even slightly negative): they must not count.
    _check(res, x, y[:, :30], rel=1e-10)


def test_rank_deficient_inputs_and_duplicate_rows(make_pair) -> None:
    x, y = make_pair(1000, 8, dtype=np.float64)
    x_bad = np.hstack([x, x[:, 4:5], np.full((1000, 1), 1e4 + 0.5)])  # duplicated and constant dimensions
    x_bad, y_bad = np.vstack([x_bad, x_bad[:250]]), np.vstack([y, y[:250]])  # duplicate rows
    res = effective_rank(x_bad, y_bad)
    assert all(math.isfinite(v) for v in (res.effective_rank_x, res.participation_ratio_x))
    _check(res, x_bad, y_bad, rel=1e-10)


def test_constant_side_gives_nan_without_warnings(rng) -> None:
    res = effective_rank(rng.normal(size=(50, 3)), np.full((50, 4), 2.0))
    assert math.isnan(res.effective_rank_y) and math.isnan(res.participation_ratio_y)
    assert math.isfinite(res.effective_rank_x)
    empty = effective_rank_from_moments(Moments.empty(3, 2))
    assert math.isnan(empty.effective_rank_x) and empty.underdetermined_x


def test_docstring_examples() -> None:
    # import_module: the package attribute ``effective_rank`` is the function, which shadows the module.
    module = importlib.import_module("hrsa.analyze.metrics.effective_rank")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_as_many_tokens_as_dimensions_is_underdetermined(rng) -> None:
    """Centred, N tokens span at most N - 1 directions: N = D already caps both measures below D."""
    x, y = rng.normal(size=(8, 8)), rng.normal(size=(8, 7))
    res = effective_rank(x, y)
    assert res.underdetermined_x and not res.underdetermined_y
