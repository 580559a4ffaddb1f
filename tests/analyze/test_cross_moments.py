"""CrossMoments: the accumulator conformance suite, direct float64 formulas, and summaries that give the same
metrics as Moments; the shared centring step refuses bad chunks."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest

from hrsa.analyze.accumulators.centring import centre_chunk
from hrsa.analyze.accumulators.cross_moments import CrossMoments, cross_moments_of_block
from hrsa.analyze.accumulators.moments import moments
from hrsa.analyze.accumulators.testing import AccumulatorTests, expected_mean, expected_products
from hrsa.analyze.metrics import (
    dimwise_correlation_from_moments,
    dimwise_correlation_from_summaries,
    linear_cka_from_moments,
    linear_cka_from_summaries,
)


class TestCrossMomentsConformance(AccumulatorTests[CrossMoments]):
    """Identity, associativity, any order and split points, equality with the one-shot float64 oracle."""

    def from_chunk(self, x: np.ndarray, y: np.ndarray) -> CrossMoments:
        return CrossMoments.from_chunk(x, y)

    def empty(self, dx: int, dy: int) -> CrossMoments:
        return CrossMoments.empty(dx, dy)

    def oracle(self, x: np.ndarray, y: np.ndarray) -> dict:
        u, v = x - x.mean(0), y - y.mean(0)
        return {"mean_x": expected_mean(x), "mean_y": expected_mean(y), "c_xy": expected_products(u, v)}


def direct_c_xy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = x.astype(np.float64), y.astype(np.float64)
    return (x - x.mean(0)).T @ (y - y.mean(0))


@pytest.mark.parametrize(("n", "d"), [(3000, 12), (30, 40)])
def test_merged_chunks_match_the_direct_formula(make_pair, n: int, d: int) -> None:
    x, y = make_pair(n, d)
    cuts = [0, 1, 7, n // 3, n // 2, n - 1, n]
    parts = [CrossMoments.from_chunk(x[a:b], y[a:b]) for a, b in itertools.pairwise(cuts)]
    left = parts[0]
    for part in parts[1:]:
        left = left.merge(part)
    right = parts[-1]
    for part in reversed(parts[:-1]):
        right = part.merge(right)
    want = direct_c_xy(x, y)
    for m in (left, right):
        assert m.n == n
        np.testing.assert_allclose(m.c_xy, want, rtol=0, atol=1e-9 * np.abs(want).max())
        np.testing.assert_allclose(m.mean_x, x.astype(np.float64).mean(0), rtol=1e-12)


def test_empty_is_the_identity_and_it_pickles() -> None:
    x = np.random.default_rng(0).normal(size=(50, 3))
    m = CrossMoments.from_chunk(x, x)
    assert CrossMoments.empty(3, 3).merge(m) is m and m.merge(CrossMoments.empty(3, 3)) is m
    again = pickle.loads(pickle.dumps(m))
    np.testing.assert_array_equal(again.c_xy, m.c_xy)
    with pytest.raises(ValueError, match="same pair"):
        m.merge(CrossMoments.empty(3, 4))


def test_summaries_give_the_same_cka_and_dimcorr_as_moments(make_pair) -> None:
    x, y = make_pair(2000, 10)
    block = cross_moments_of_block({"x": x, "y": y}, [("x", "y"), ("x", "x"), ("y", "y")])
    xy, xx, yy = (block[p].summary() for p in [("x", "y"), ("x", "x"), ("y", "y")])
    m = moments(x, y)
    assert linear_cka_from_summaries(xy, xx, yy).value == pytest.approx(linear_cka_from_moments(m).value, rel=1e-12)
    got, want = dimwise_correlation_from_summaries(xy, xx, yy), dimwise_correlation_from_moments(m)
    np.testing.assert_allclose(got.per_dim, want.per_dim, rtol=1e-12)
    assert got.n_degenerate == want.n_degenerate


def test_float32_products_of_centred_chunks_stay_accurate(make_pair) -> None:
    x, y = make_pair(4000, 32)  # offsets up to 1e4
    exact = CrossMoments.from_chunk(x, y).c_xy
    low = CrossMoments.from_chunk(x, y, compute_dtype=np.float32).c_xy
    np.testing.assert_allclose(low, exact, rtol=0, atol=1e-5 * np.abs(exact).max())


def test_bad_chunks_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        centre_chunk(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="shape"):
        centre_chunk(np.zeros(3))
    with pytest.raises(ValueError, match="compute_dtype"):
        centre_chunk(np.zeros((2, 2)), np.float16)
    with pytest.raises(ValueError, match="same tokens"):
        CrossMoments.from_chunk(np.zeros((3, 2)), np.zeros((4, 2)))
