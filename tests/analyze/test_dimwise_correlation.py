"""Dimension-wise correlation: np.corrcoef oracle, degenerate dimensions, invariances, streaming."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import special_ortho_group

from hrsa.analyze.metrics import dimwise_correlation, dimwise_correlation_from_moments
from hrsa.analyze.accumulators.moments import Moments


def oracle_r(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-dimension Pearson r by np.corrcoef on float64 copies."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return np.array([np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(x.shape[1])])


@pytest.mark.parametrize(("n", "d"), [(1500, 24), (40, 100)], ids=["N>>D", "N<D"])
def test_matches_corrcoef_on_activation_like_float32(make_pair, n: int, d: int) -> None:
    x, y = make_pair(n, d)
    want = oracle_r(x, y)
    res = dimwise_correlation(x, y)
    np.testing.assert_allclose(res.per_dim, want, rtol=0, atol=1e-6)
    assert res.mean == pytest.approx(want.mean(), abs=1e-6)
    assert res.median == pytest.approx(np.median(want), abs=1e-6)
    assert (res.q25, res.q75) == pytest.approx(tuple(np.percentile(want, [25, 75])), abs=1e-6)
    assert (res.min, res.max) == pytest.approx((want.min(), want.max()), abs=1e-6)
    assert (res.n_dims, res.n_degenerate, res.n_tokens) == (d, 0, n)


def test_degenerate_dimensions_are_counted_and_left_out(rng) -> None:
    x = rng.normal(size=(300, 6)).astype(np.float32)
    y = (x + 0.5 * rng.normal(size=(300, 6))).astype(np.float32)
    x[:, 1] = 0.0  # a dead unit in A
    y[:, 4] = 1e4  # a constant large channel in B
    # A channel whose only variation is float32 rounding of 1e4 (relative spread ~1e-8): degenerate.
    y[:, 5] = np.float32(1e4) + np.float32(1e4) * np.float32(2**-23) * rng.integers(0, 2, size=300)
    res = dimwise_correlation(x, y)
    assert res.n_degenerate == 3
    assert np.isnan(res.per_dim[[1, 4, 5]]).all()
    keep = [0, 2, 3]
    assert res.mean == pytest.approx(oracle_r(x[:, keep], y[:, keep]).mean(), abs=1e-6)


def test_rtol_decides_what_counts_as_degenerate(rng) -> None:
    x = rng.normal(size=(200, 2))
    x[:, 1] = 100.0 + 1e-3 * rng.normal(size=200)  # relative spread 1e-5
    assert dimwise_correlation(x, x).n_degenerate == 0
    assert dimwise_correlation(x, x, rtol=1e-4).n_degenerate == 1


def test_all_degenerate_gives_nan_summary() -> None:
    res = dimwise_correlation(np.ones((10, 3)), np.zeros((10, 3)))
    assert res.n_degenerate == 3
    assert all(np.isnan(v) for v in (res.mean, res.median, res.q25, res.q75, res.min, res.max))


def test_streamed_equals_in_memory(make_pair) -> None:
    x, y = make_pair(700, 10)
    m = Moments.empty(10, 10)
    for start in range(0, 700, 64):
        m = m.merge(Moments.from_chunk(x[start : start + 64], y[start : start + 64]))
    np.testing.assert_allclose(dimwise_correlation_from_moments(m).per_dim, oracle_r(x, y), atol=1e-9)


def test_invariant_to_positive_affine_maps_per_dimension(rng) -> None:
    x = rng.normal(size=(500, 8))
    y = x + rng.normal(size=(500, 8))
    base = dimwise_correlation(x, y).per_dim
    scaled = dimwise_correlation(x, y * rng.uniform(0.1, 10, size=8) + rng.normal(size=8) * 1e3).per_dim
    np.testing.assert_allclose(scaled, base, atol=1e-9)
    np.testing.assert_allclose(dimwise_correlation(x, -y).per_dim, -base, atol=1e-12)


def test_rotation_drops_correlation_but_not_identity(rng) -> None:
    x = rng.normal(size=(2000, 32))
    q = special_ortho_group.rvs(32, random_state=3)
    assert dimwise_correlation(x, x).mean == pytest.approx(1.0, abs=1e-12)
    assert abs(dimwise_correlation(x, x @ q).mean) < 0.2


def test_needs_equal_hidden_sizes(rng) -> None:
    with pytest.raises(ValueError, match="equal size"):
        dimwise_correlation(rng.normal(size=(10, 3)), rng.normal(size=(10, 4)))
    with pytest.raises(ValueError, match="rtol"):
        dimwise_correlation(np.eye(3), np.eye(3), rtol=-1.0)


def test_summaries_judge_each_side_s_degenerate_dimensions_by_its_own_mean(rng) -> None:
    """The cross-layer path reads a dimension of B as degenerate by B's spread against B's size (1e4), not A's: a
    channel of B whose only variation is float32 rounding of 1e4 is left out there too, as by the Moments path."""
    from hrsa.analyze.accumulators.cross_moments import CrossMoments
    from hrsa.analyze.metrics import dimwise_correlation_from_summaries

    x = rng.normal(size=(300, 6))
    y = x + 0.5 * rng.normal(size=(300, 6))
    y[:, 5] = np.float32(1e4) + np.float32(1e4) * np.float32(2**-23) * rng.integers(0, 2, size=300)
    x[:, 2] = 1e4 + x[:, 2] * 1e4 * 2**-23  # and one of A's, likewise, against B's mean of ~0 there
    xx, yy, xy = (CrossMoments.from_chunk(a, b).summary() for a, b in ((x, x), (y, y), (x, y)))
    res = dimwise_correlation_from_summaries(xy, xx, yy)
    assert res.n_degenerate == 2
    assert np.isnan(res.per_dim[[2, 5]]).all()
    ok = [0, 1, 3, 4]
    np.testing.assert_allclose(res.per_dim[ok], oracle_r(x, y)[ok], rtol=0, atol=1e-12)
