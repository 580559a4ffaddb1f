"""SVCCA: oracle from SVDs of the centred data, invariances, streaming, degenerate and underdetermined inputs."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest

from hrsa.analyze.metrics import SvccaResult, svcca, svcca_from_moments
from tests.analyze.conftest import random_rotation, streamed

# --- independent float64 oracle: SVD of each centred side, then CCA of the kept left singular vectors ---------


def oracle_svcca(x: np.ndarray, y: np.ndarray, kept: float) -> tuple[np.ndarray, int, int]:
    """(rhos, k_x, k_y) as in Raghu et al.: top singular directions holding ``kept`` of the variance, then CCA.

    The reduced representations U_k S_k have orthonormal bases U_k, so the canonical correlations are the
    singular values of U_kx^T U_ky.
    """
    ux, kx = _top_left_singular_vectors(x, kept)
    uy, ky = _top_left_singular_vectors(y, kept)
    return np.linalg.svd(ux.T @ uy, compute_uv=False), kx, ky


def _top_left_singular_vectors(a: np.ndarray, kept: float) -> tuple[np.ndarray, int]:
    ac = np.asarray(a, dtype=np.float64) - np.mean(a, axis=0, dtype=np.float64)
    u, s, _ = np.linalg.svd(ac, full_matrices=False)
    rank = int(np.sum(s > 1e-8 * s[0]))  # singular values at rounding level are null directions
    fraction = np.cumsum(s[:rank] ** 2) / np.sum(s[:rank] ** 2)
    k = rank if kept >= 1.0 else int(np.argmax(fraction >= kept)) + 1
    return u[:, :k], k


def spectral_pair(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """x with a geometric spectrum (clear gaps), an outlier direction, a 1e4 offset; y = a noisy map of x.

    The outlier direction has 100x the bulk's largest scale, so it holds 99.9% of the variance: 0.99 keeps it
    alone, and 0.99999 (4 directions at d = 12) or 0.999999 (7) keep more.
    """
    scales = np.geomspace(1.0, 0.01, d)
    scales[0] = 100.0  # an outlier direction
    x = (rng.normal(size=(n, d)) * scales) @ random_rotation(rng, d)
    x[:, 0] += 1e4
    y = x @ (np.eye(d) + 0.3 * rng.normal(size=(d, d))) + 0.05 * rng.normal(size=(n, d)) - 3e3
    return x, y


# --- oracle agreement ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kept", [0.99, 0.99999, 0.999999])
def test_matches_svd_oracle(rng, kept: float) -> None:
    x, y = spectral_pair(rng, 3000, 12)
    want, kx, ky = oracle_svcca(x, y, kept)
    got = svcca(x, y, variance_kept=kept)
    assert (got.kept_x, got.kept_y) == (kx, ky)
    np.testing.assert_allclose(got.rhos, want, rtol=1e-10, atol=0)
    assert got.value == pytest.approx(np.mean(want), rel=1e-10, abs=0)
    assert got.r2 == pytest.approx(np.mean(want**2), rel=1e-10, abs=0)
    assert (got.variance_kept, got.n_tokens, got.underdetermined) == (kept, 3000, False)


@pytest.mark.parametrize("kept", [0.999, 1.0])
def test_matches_oracle_on_activation_like_data_of_different_sizes(make_pair, kept: float) -> None:
    # Offsets 1e3-1e4 and outlier scales 30-300 along coordinates, as in LLM hidden states. (Keeping every
    # direction of a spectrum spanning 1e8 in variance in *rotated* coordinates costs digits: from co-moments
    # the small directions carry errors of eps * lambda_1 / lambda_k.)
    x, y = make_pair(3000, 12, dtype=np.float64)
    x, y = x[:, :12], y[:, :8]
    want, kx, ky = oracle_svcca(x, y, kept)
    got = svcca(x, y, variance_kept=kept)
    assert (got.kept_x, got.kept_y) == (kx, ky)
    np.testing.assert_allclose(got.rhos, want, rtol=1e-10, atol=0)


def test_streamed_equals_in_memory(rng) -> None:
    x, y = spectral_pair(rng, 2001, 10)
    whole = svcca(x, y, variance_kept=0.99999)
    got = svcca_from_moments(streamed(x, y, rng), variance_kept=0.99999)
    assert (got.kept_x, got.kept_y) == (whole.kept_x, whole.kept_y)
    np.testing.assert_allclose(got.rhos, whole.rhos, rtol=1e-11, atol=0)


# --- invariances ----------------------------------------------------------------------------------------------


def test_invariant_to_rotations_isotropic_scaling_and_offsets(rng) -> None:
    x, y = spectral_pair(rng, 2000, 10)
    base = svcca(x, y, variance_kept=0.99999)
    for name, (xt, yt) in {
        "rotation of x": (x @ random_rotation(rng, 10), y),
        "rotation and scale of y": (x, 0.01 * y @ random_rotation(rng, 10)),
        "scale and offsets": (7.0 * x - 4e4, y + rng.normal(size=10) * 1e4),
    }.items():
        got = svcca(xt, yt, variance_kept=0.99999)
        assert (got.kept_x, got.kept_y) == (base.kept_x, base.kept_y), name
        np.testing.assert_allclose(got.rhos, base.rhos, rtol=1e-9, atol=0, err_msg=name)


def test_anisotropic_scaling_changes_what_is_kept(rng) -> None:
    # Unlike CCA, the SVD step sees the scales: shrinking X's loud direction changes the kept subspace.
    x, y = spectral_pair(rng, 2000, 10)
    shrunk = x @ random_rotation(rng, 10) * np.geomspace(1e-3, 1.0, 10)
    assert svcca(shrunk, y, variance_kept=0.99999).value != pytest.approx(
        svcca(x, y, variance_kept=0.99999).value, abs=1e-3)


# --- edge cases -------------------------------------------------------------------------------------------------


def test_identical_sides_give_one(rng) -> None:
    x, _ = spectral_pair(rng, 1000, 9)
    res = svcca(x, x, variance_kept=0.999999)
    assert res.kept_x == res.kept_y > 1
    # 7 kept directions spanning 1e6 in variance: from co-moments, ~1e-11 off 1 for the faintest.
    np.testing.assert_allclose(res.rhos, 1.0, rtol=0, atol=1e-10)
    assert res.value == pytest.approx(1.0, abs=1e-10)


def test_independent_sides_give_small_correlations(rng) -> None:
    n, d = 20000, 6
    res = svcca(rng.normal(size=(n, d)) + 1e4, rng.normal(size=(n, d)) * 100.0)
    assert res.r2 < 5 * (2 * d) / n
    assert res.value < 0.05
    assert not res.underdetermined


def test_fewer_tokens_than_dimensions_is_flagged(rng) -> None:
    x, y = rng.normal(size=(40, 60)), rng.normal(size=(40, 60)) + 1e4  # isotropic: 0.99 keeps ~37 of 39
    res = svcca(x, y)
    assert res.kept_x + res.kept_y > 39 and res.underdetermined
    want, kx, ky = oracle_svcca(x, y, 0.99)
    assert (res.kept_x, res.kept_y) == (kx, ky)
    np.testing.assert_allclose(res.rhos, want, rtol=1e-8, atol=0)
    # Keeping few directions is what SVCCA is for: then nothing is forced to 1.
    low = svcca(x, y, variance_kept=0.3)
    assert not low.underdetermined and low.kept_x + low.kept_y <= 39
    np.testing.assert_allclose(low.rhos, oracle_svcca(x, y, 0.3)[0], rtol=1e-9, atol=0)


def test_rank_deficient_inputs_match_the_oracle(make_pair) -> None:
    x, y = make_pair(1000, 8, dtype=np.float64)
    x_bad = np.hstack([x, x[:, 4:5], np.full((1000, 1), 1e4 + 0.5)])  # duplicated and constant dimensions
    x_bad, y_bad = np.vstack([x_bad, x_bad[:300]]), np.vstack([y, y[:300]])  # and duplicate rows
    for kept in (0.999, 1.0):
        got = svcca(x_bad, y_bad, variance_kept=kept)
        want, kx, ky = oracle_svcca(x_bad, y_bad, kept)
        assert got.kept_x <= 8 and np.all(np.isfinite(got.rhos))
        assert (got.kept_x, got.kept_y) == (kx, ky)
        np.testing.assert_allclose(got.rhos, want, rtol=1e-9, atol=0)


def test_constant_side_gives_nan_and_bad_fraction_raises(rng) -> None:
    res = svcca(rng.normal(size=(50, 3)), np.full((50, 4), 2.0))
    assert np.isnan(res.value) and np.isnan(res.r2) and res.kept_y == 0 and res.rhos.shape == (0,)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="variance_kept in"):
            svcca(np.eye(5), np.eye(5), variance_kept=bad)


def test_result_type_and_docstring_examples(rng) -> None:
    assert isinstance(svcca(rng.normal(size=(30, 2)), rng.normal(size=(30, 2))), SvccaResult)
    # import_module: the package attribute ``svcca`` is the function, which shadows the module of that name.
    result = doctest.testmod(importlib.import_module("hrsa.analyze.metrics.svcca"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_directions_at_rounding_level_are_never_kept_even_when_they_move_the_running_sum(rng) -> None:
    """X of rank 3 in 6 dimensions plus noise 1e-13 of its variance (float32 rounding of a dependent dimension is
    this size): above the float64 ulp of the running sum, so variance_kept = 1 would reach it only at the last
    direction, but below rtol (1e-10) of the largest eigenvalue. Only the 3 real directions are kept; whitened, the
    noise directions would be as large as the real ones."""
    n = 2000
    signal = rng.normal(size=(n, 3))
    x = signal @ rng.normal(size=(3, 6)) + 1e-6 * rng.normal(size=(n, 6)) + 1e3
    y = signal @ rng.normal(size=(3, 5)) + 0.5 * rng.normal(size=(n, 5))
    res = svcca(x, y, variance_kept=1.0)
    assert res.kept_x == 3 and res.kept_y == 5
    top = np.linalg.svd(x - x.mean(0), full_matrices=False)[0][:, :3]  # X's 3 real directions, in token space
    want = np.linalg.svd(top.T @ _orthonormal(y), compute_uv=False)  # their CCA with all of Y
    np.testing.assert_allclose(res.rhos, want, rtol=0, atol=1e-9)


def test_the_fewest_directions_that_reach_the_fraction_exactly_are_kept() -> None:
    """Two directions of equal variance (exactly: c_xx = diag(2, 2)): 0.5 of the variance is reached by one."""
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]] * 3)
    res = svcca(x, x, variance_kept=0.5)
    assert (res.kept_x, res.kept_y) == (1, 1)


def _orthonormal(a: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(a - a.mean(0))
    return q
