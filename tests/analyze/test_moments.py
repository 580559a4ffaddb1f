"""Moments: the accumulator conformance suite, direct float64 formulas, identity, dtypes, validation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from hrsa.analyze.accumulators.centring import Float32RangeError
from hrsa.analyze.accumulators.moments import Moments, moments
from hrsa.analyze.accumulators.testing import AccumulatorTests, expected_mean, expected_products

FIELDS = ("mean_x", "mean_y", "c_xx", "c_yy", "c_xy", "q_xx", "q_yy", "q_xy", "g_xx", "g_xy", "g_yx", "g_yy")


def direct(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Oracle: every field from the whole arrays, centred once, in float64."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    u, v = x - x.mean(0), y - y.mean(0)
    a, b = (u**2).sum(1), (v**2).sum(1)
    return {
        "mean_x": x.mean(0),
        "mean_y": y.mean(0),
        "c_xx": u.T @ u,
        "c_yy": v.T @ v,
        "c_xy": u.T @ v,
        "q_xx": a @ a,
        "q_yy": b @ b,
        "q_xy": a @ b,
        "g_xx": u.T @ a,
        "g_xy": v.T @ a,
        "g_yx": u.T @ b,
        "g_yy": v.T @ b,
    }


class TestMomentsConformance(AccumulatorTests[Moments]):
    """Identity, associativity, any order and split points, equality with the one-shot float64 oracle."""

    def from_chunk(self, x: np.ndarray, y: np.ndarray) -> Moments:
        return Moments.from_chunk(x, y)

    def empty(self, dx: int, dy: int) -> Moments:
        return Moments.empty(dx, dy)

    def oracle(self, x: np.ndarray, y: np.ndarray) -> dict:
        u, v = x - x.mean(0), y - y.mean(0)
        a, b = (u * u).sum(1), (v * v).sum(1)  # (N,), (N,)
        p = expected_products
        return {"mean_x": expected_mean(x), "mean_y": expected_mean(y),
                "c_xx": p(u, u), "c_yy": p(v, v), "c_xy": p(u, v), "q_xx": p(a, a), "q_yy": p(b, b), "q_xy": p(a, b),
                "g_xx": p(u, a), "g_xy": p(v, a), "g_yx": p(u, b), "g_yy": p(v, b)}


def assert_matches(m: Moments, ref: dict[str, np.ndarray], n: int, rel: float = 1e-9) -> None:
    """Each field within ``rel`` of the largest entry of its oracle (the 3rd-order g sums are near 0)."""
    assert m.n == n
    for name in FIELDS:
        want = np.asarray(ref[name])
        scale = max(float(np.abs(want).max()), 1e-300)
        np.testing.assert_allclose(getattr(m, name), want, rtol=0, atol=rel * scale, err_msg=name)


@pytest.mark.parametrize(("n", "d"), [(2000, 16), (40, 100)])
def test_whole_array_moments_match_direct_formulas(make_pair, n: int, d: int) -> None:
    x, y = make_pair(n, d)
    assert_matches(moments(x, y, chunk_rows=97), direct(x, y), n)


def test_chunk_size_does_not_matter(make_pair) -> None:
    x, y = make_pair(500, 8)
    whole = moments(x, y, chunk_rows=500)
    assert_matches(moments(x, y, chunk_rows=1), {f: getattr(whole, f) for f in FIELDS}, 500)


def test_empty_is_the_identity(make_pair) -> None:
    x, y = make_pair(50, 6)
    m = Moments.from_chunk(x, y)
    e = Moments.empty(6, 6)
    assert m.merge(e) is m and e.merge(m) is m
    assert e.merge(Moments.empty(6, 6)).n == 0
    empty_chunk = Moments.from_chunk(x[:0], y[:0])
    assert empty_chunk.n == 0 and not empty_chunk.c_xy.any()


def test_update_equals_merge_of_chunks(make_pair) -> None:
    x, y = make_pair(100, 6)
    streamed = Moments.empty(6, 6).update(x[:30], y[:30]).update(x[30:], y[30:])
    assert_matches(streamed, direct(x, y), 100)


def test_different_hidden_sizes_are_supported(rng) -> None:
    x, y = rng.normal(size=(64, 3)), rng.normal(size=(64, 9))
    m = moments(x, y, chunk_rows=10)
    assert (m.dx, m.dy, m.c_xy.shape) == (3, 9, (3, 9))
    assert_matches(m, direct(x, y), 64)


def test_bfloat16_input_is_read_exactly(rng) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = rng.normal(size=(80, 6)).astype(ml_dtypes.bfloat16)
    y = (rng.normal(size=(80, 6)) + 300.0).astype(ml_dtypes.bfloat16)
    exact = direct(x.astype(np.float32), y.astype(np.float32))  # bf16 -> f32 is exact
    assert_matches(moments(x, y, chunk_rows=16), exact, 80)


def test_float32_products_of_centred_chunks_stay_accurate(make_pair) -> None:
    x, y = make_pair(3000, 64)
    m = moments(x, y, chunk_rows=1024, compute_dtype=np.float32)
    ref = direct(x, y)
    np.testing.assert_allclose(m.c_xy, ref["c_xy"], rtol=0, atol=1e-5 * np.abs(ref["c_xy"]).max())


def test_moments_pickle_roundtrip(make_pair) -> None:
    x, y = make_pair(20, 6)
    m = moments(x, y)
    assert_matches(pickle.loads(pickle.dumps(m)), {f: getattr(m, f) for f in FIELDS}, 20, rel=0)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.zeros(5), np.zeros((5, 2)), "shape"),
        (np.zeros((5, 2)), np.zeros((4, 2)), "same tokens"),
        (np.zeros((5, 2), dtype=complex), np.zeros((5, 2)), "real-valued"),
        (np.array([[np.nan, 0.0]] * 3), np.zeros((3, 2)), "finite"),
        (np.array([[np.inf, 0.0]] * 3), np.zeros((3, 2)), "finite"),
    ],
)
def test_bad_inputs_say_what_was_expected(x: np.ndarray, y: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        moments(x, y)


def test_bad_options_and_mismatched_merges_raise() -> None:
    x = np.ones((4, 2))
    with pytest.raises(ValueError, match="compute_dtype"):
        Moments.from_chunk(x, x, compute_dtype=np.float16)
    with pytest.raises(ValueError, match="chunk_rows"):
        moments(x, x, chunk_rows=0)
    with pytest.raises(ValueError, match="hidden sizes"):
        Moments.empty(2, 2).merge(Moments.empty(2, 3))
    with pytest.raises(ValueError, match="shape"):
        Moments(1, np.zeros(2), np.zeros(2), np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((3, 2)),
                0.0, 0.0, 0.0, np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2))  # fmt: skip


def test_update_with_the_wrong_hidden_size_raises(rng) -> None:
    m = Moments.from_chunk(rng.normal(size=(5, 3)), rng.normal(size=(5, 3)))
    with pytest.raises(ValueError, match="hidden sizes"):
        m.update(rng.normal(size=(5, 4)), rng.normal(size=(5, 3)))


def test_taking_all_tokens_out_is_refused() -> None:
    """``without`` leaves at least one token: the statistics of none have no means to solve Chan's combine for."""
    m = moments(np.arange(12.0).reshape(6, 2), np.arange(12.0).reshape(6, 2) ** 2)
    with pytest.raises(ValueError, match="fewer than"):
        m.without(m)


def test_float32_products_refuse_a_varying_dimension_that_float32_flushes_to_zero(rng) -> None:
    """Centred values below 2^-149 cast to float32 zeros: that dimension would pass for a constant one (r and CKA
    silently dropping it). The float64 values it came from show it varies, so float32 products are refused."""
    x = rng.normal(size=(50, 3))
    x[:, 1] *= 1e-50  # varies, but every centred value is far below float32's smallest subnormal
    with pytest.raises(Float32RangeError):
        Moments.from_chunk(x, rng.normal(size=(50, 3)), compute_dtype=np.float32)
    m = Moments.from_chunk(x, x, compute_dtype=np.float64)  # float64 products keep it
    assert m.c_xx[1, 1] > 0
