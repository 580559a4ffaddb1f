"""Linear CKA: explicit-Gram oracles, published values, appendix-B invariances, numerics of centring."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import special_ortho_group

from hrsa.analyze.metrics import CkaResult, linear_cka, linear_cka_from_moments
from hrsa.analyze.accumulators.moments import Moments, moments

# --- independent float64 oracles on N x N Gram matrices --------------------------------------------------


def oracle_cka(x: np.ndarray, y: np.ndarray) -> float:
    """<HKH, HLH> / (|HKH| |HLH|) with K = X X^T, L = Y Y^T (Kornblith et al. 2019, eq. 2-4)."""
    k, l_ = _gram(x), _gram(y)
    kc, lc = _double_centre(k), _double_centre(l_)
    return float((kc * lc).sum() / (np.linalg.norm(kc) * np.linalg.norm(lc)))


def oracle_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA with the unbiased HSIC estimator of Song et al. (2012), eq. 5, on zero-diagonal Grams."""
    k, l_ = _gram(x), _gram(y)
    return _hsic_u(k, l_) / np.sqrt(_hsic_u(k, k) * _hsic_u(l_, l_))


def _gram(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x @ x.T  # (N, N)


def _double_centre(k: np.ndarray) -> np.ndarray:
    """H K H with H = I - 11^T / N, written out as row, column and grand means."""
    return k - k.mean(0, keepdims=True) - k.mean(1, keepdims=True) + k.mean()


def _hsic_u(k: np.ndarray, l_: np.ndarray) -> float:
    n = k.shape[0]
    k, l_ = k.copy(), l_.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l_, 0.0)
    # O(N^2) forms of tr(K L), 1^T K 1 and 1^T K L 1 (K, L symmetric).
    k_row, l_row = k.sum(1), l_.sum(1)  # (N,)
    term1 = np.sum(k * l_)
    term2 = k_row.sum() * l_row.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (k_row @ l_row)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def _centred64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(0)


# --- oracle agreement --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d"), [(1200, 24), (40, 100)], ids=["N>>D", "N<D"])
@pytest.mark.parametrize("debiased", [False, True])
def test_matches_gram_oracle_on_activation_like_float32(make_pair, n: int, d: int, debiased: bool) -> None:
    x, y = make_pair(n, d)
    # HSIC_u is translation invariant; the oracle centres first only to keep its own float64 Grams exact
    # at offsets of 1e4 (test_debiased_oracle_needs_no_centring checks the invariance itself).
    oracle = oracle_debiased_cka if debiased else oracle_cka
    want = oracle(_centred64(x), _centred64(y))
    got = linear_cka(x, y, debiased=debiased)
    assert got == CkaResult(value=pytest.approx(want, rel=1e-6, abs=0), n_tokens=n, debiased=debiased)


def test_debiased_oracle_needs_no_centring(rng) -> None:
    x = rng.normal(size=(60, 5)) + 3.0
    y = x @ rng.normal(size=(5, 4)) + rng.normal(size=(60, 4)) - 2.0
    assert linear_cka(x, y, debiased=True).value == pytest.approx(oracle_debiased_cka(x, y), rel=1e-9)


def test_streamed_equals_in_memory(make_pair) -> None:
    x, y = make_pair(999, 12)
    streamed = Moments.empty(12, 12)
    for start in range(0, 999, 101):
        streamed = streamed.merge(Moments.from_chunk(x[start : start + 101], y[start : start + 101]))
    for debiased in (False, True):
        a = linear_cka_from_moments(streamed, debiased=debiased).value
        assert a == pytest.approx(linear_cka(x, y, debiased=debiased).value, rel=1e-12)


# --- published values (DESIGN.md; Kornblith's demo notebook) ------------------------------------------------


def test_reference_values_on_kornblith_demo_data() -> None:
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = x + np.random.randn(100, 10)
    assert round(linear_cka(x, y).value, 5) == 0.55761
    assert round(linear_cka(x, y, debiased=True).value, 5) == 0.51346


# --- appendix-B invariances ---------------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
def test_invariances(rng, debiased: bool) -> None:
    x = rng.normal(size=(500, 16)) * rng.uniform(0.5, 3.0, size=16)
    y = x @ rng.normal(size=(16, 16)) + rng.normal(size=(500, 16))
    q = special_ortho_group.rvs(16, random_state=1)
    base = linear_cka(x, y, debiased=debiased).value
    transformed = {
        "rotation": linear_cka(x, y @ q, debiased=debiased).value,
        "isotropic scale": linear_cka(x, 7.5 * y, debiased=debiased).value,
        "offset": linear_cka(x, y + rng.normal(size=16) * 1e3, debiased=debiased).value,
        "permutation": linear_cka(x[:, ::-1], y, debiased=debiased).value,
    }
    for name, value in transformed.items():
        assert value == pytest.approx(base, rel=1e-9), name
    assert linear_cka(x, x @ q, debiased=debiased).value == pytest.approx(1.0, rel=1e-12)


def test_anisotropic_scaling_lowers_cka(rng) -> None:
    x = rng.normal(size=(500, 16))
    stretched = x * np.geomspace(0.1, 10.0, 16)
    assert linear_cka(x, stretched).value < 0.8
    assert linear_cka(x, stretched, debiased=True).value < 0.8


def test_constant_representation_gives_nan_without_warnings() -> None:
    x = np.random.default_rng(0).normal(size=(20, 3))
    assert np.isnan(linear_cka(x, np.full((20, 3), 4.0)).value)
    assert np.isnan(linear_cka(x, np.full((20, 3), 4.0), debiased=True).value)


def test_debiased_needs_four_tokens() -> None:
    with pytest.raises(ValueError, match="at least 4 tokens"):
        linear_cka(np.eye(3), np.eye(3), debiased=True)


# --- numerics: centring before the products is what keeps CKA ----------------------------------------------


def _raw_moment_cka(x: np.ndarray, y: np.ndarray, dtype: type) -> float:
    """CKA from raw sums X^T Y - n mu_x mu_y^T in ``dtype``: the approach Moments must not take."""
    x, y = x.astype(dtype), y.astype(dtype)
    n = x.shape[0]
    mx, my = x.mean(0, dtype=dtype), y.mean(0, dtype=dtype)
    cxy, cxx, cyy = (
        a.T @ b - n * np.outer(ma, mb) for a, b, ma, mb in ((x, y, mx, my), (x, x, mx, mx), (y, y, my, my))
    )
    sq = [float(np.sum(c.astype(np.float64) ** 2)) for c in (cxy, cxx, cyy)]
    return sq[0] / np.sqrt(sq[1] * sq[2])


@pytest.fixture
def offset_pair(rng) -> tuple[np.ndarray, np.ndarray]:
    """float32 activations with an offset of ~1e3 in every dimension (as in DESIGN's numerics note)."""
    x = rng.normal(size=(2000, 32)) * rng.uniform(1, 5, size=32)
    y = x @ (np.eye(32) + 0.3 * rng.normal(size=(32, 32)) / np.sqrt(32)) + rng.normal(size=(2000, 32))
    offsets = rng.uniform(1e3, 2e3, size=32)
    return (x + offsets).astype(np.float32), (y - offsets).astype(np.float32)


def test_float32_raw_moments_lose_cka_but_moments_do_not(offset_pair) -> None:
    x, y = offset_pair
    truth = oracle_cka(_centred64(x), _centred64(y))
    assert abs(_raw_moment_cka(x, y, np.float32) - truth) > 1e-3 * truth  # the failure mode is real here
    assert linear_cka(x, y).value == pytest.approx(truth, rel=1e-9)
    # float32 products are fine too, but only because the chunks are centred first.
    m32 = moments(x, y, chunk_rows=1024, compute_dtype=np.float32)
    assert linear_cka_from_moments(m32).value == pytest.approx(truth, rel=1e-6)
    assert linear_cka_from_moments(m32, debiased=True).value == pytest.approx(
        oracle_debiased_cka(_centred64(x), _centred64(y)), rel=1e-6
    )


def test_float64_raw_moments_fail_at_huge_offsets_but_moments_do_not(rng) -> None:
    # float64 has ~16 digits: at an offset of 1e8 around unit spread, raw sums keep none of the signal.
    z = rng.normal(size=(3000, 8))
    w = z @ rng.normal(size=(8, 8)) + rng.normal(size=(3000, 8))
    x, y = z + 1e8, w - 1e8
    truth = oracle_cka(z, w)  # offsets removed exactly, before they were ever added
    assert abs(_raw_moment_cka(x, y, np.float64) - truth) > 1e-2 * truth
    assert linear_cka(x, y).value == pytest.approx(truth, rel=1e-6)
    assert linear_cka(x, y, debiased=True).value == pytest.approx(oracle_debiased_cka(z, w), rel=1e-6)


@pytest.mark.property
@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-1e4, 1e4),
    debiased=st.booleans(),
)
def test_invariant_to_scaled_rotations_with_offset(seed: int, scale: float, offset: float, debiased: bool) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(80, 6)) * rng.uniform(0.5, 2.0, size=6)
    y = x @ rng.normal(size=(6, 6)) + rng.normal(size=(80, 6))
    q = special_ortho_group.rvs(6, random_state=seed % 2**31)
    base = linear_cka(x, y, debiased=debiased).value
    assert linear_cka(x, scale * y @ q + offset, debiased=debiased).value == pytest.approx(base, rel=1e-9)


def test_a_constant_float64_representation_gives_nan_not_its_rounding_residue() -> None:
    """Centring 100 equal float64 rows leaves ~3e-14 per value: CKA of that residue is 1 (or 6e-33 against a varying
    side), a number for an undefined quantity. The rows' spread is compared with their size instead."""
    rng = np.random.default_rng(0)
    constant = np.tile(rng.normal(size=(1, 8)) * 0.1 + 0.1, (100, 1))
    varying = rng.normal(size=(100, 8))
    assert np.abs(constant - constant.mean(0)).max() > 0  # the residue is there
    for x, y in ((constant, constant), (constant, varying), (varying, constant)):
        assert np.isnan(linear_cka(x, y).value) and np.isnan(linear_cka(x, y, debiased=True).value)
    # a real spread far below the size is kept: 1e-9 of an offset of 1e5, each a float64 with room to spare
    small = 1e5 + 1e-4 * varying
    assert linear_cka(small, varying).value == pytest.approx(1.0, abs=1e-6)


def test_a_group_left_out_down_to_one_token_has_no_cka() -> None:
    """The jackknife leaves groups out of the pooled sums: with one token left its co-moments are exactly 0, but
    the subtraction leaves ~1e-10 (rounding of the pooled 1000 tokens): CKA 1.05 there, an interval of [-2.2, 3.2]."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(1001, 16)) + 1e3).astype(np.float32)
    y = (x + rng.normal(size=(1001, 16))).astype(np.float32)
    rest = moments(x, y).without(moments(x[1:], y[1:]))
    assert rest.n == 1 and np.abs(rest.c_xx).max() > 0
    assert np.isnan(linear_cka_from_moments(rest).value)


def test_cross_layer_summaries_of_a_constant_float64_representation_give_nan() -> None:
    """The cross-layer path (co-moment summaries) must refuse the same rounding residue as the Moments path: |C_xx|_F
    of 100 equal float64 rows is ~1e-27, not 0, and the ratio of residues would read as a CKA."""
    from hrsa.analyze.accumulators.cross_moments import CrossMoments
    from hrsa.analyze.metrics.linear_cka import linear_cka_from_summaries

    rng = np.random.default_rng(0)
    constant = np.tile(rng.normal(size=(1, 8)) * 0.1 + 0.1, (100, 1))
    varying = rng.normal(size=(100, 8))
    for x, y in ((constant, constant), (constant, varying), (varying, constant)):
        xx, yy, xy = (CrossMoments.from_chunk(a, b).summary() for a, b in ((x, x), (y, y), (x, y)))
        assert xx.sq_frobenius > 0 or yy.sq_frobenius > 0  # the residue is there
        assert np.isnan(linear_cka_from_summaries(xy, xx, yy).value)
    same = CrossMoments.from_chunk(varying, varying).summary()
    assert linear_cka_from_summaries(same, same, same).value == pytest.approx(1.0, abs=1e-12)
