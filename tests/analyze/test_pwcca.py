"""PWCCA: oracle with explicit token-space canonical variates, invariances, streaming, degenerate inputs."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest

from hrsa.analyze.metrics import PwccaResult, pwcca, pwcca_from_moments
from tests.analyze.conftest import random_rotation, streamed

# --- independent float64 oracle: canonical variates of X as (N,) vectors, projections on every neuron ---------


def oracle_pwcca(
    x: np.ndarray, y: np.ndarray, *, keep: np.ndarray | None = None, centre_neurons: bool = True
) -> dict[str, np.ndarray | float]:
    """Morcos et al. (2018): alpha_i = sum_j |<h_i, x_j>| with h_i the unit-norm canonical variates of X.

    The variates are built in token space, H = Q_x U (N, r), from QR bases of the centred data and the SVD
    of Q_x^T Q_y; ``keep`` lists X's columns that form a basis (for rank-deficient X), while the weights still
    sum over every neuron of X. ``centre_neurons=False`` projects the raw neurons, as Morcos et al.'s code
    does: the same in exact arithmetic (h_i sums to 0), but h_i's rounding residue times a 1e4 offset costs digits.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xb = x if keep is None else x[:, keep]
    qx, _ = np.linalg.qr(xb - xb.mean(0))  # (N, kx)
    qy, _ = np.linalg.qr(y - y.mean(0))  # (N, ky)
    u, rhos, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
    h = qx @ u[:, : rhos.size]  # (N, r) canonical variates, orthonormal columns
    neurons = x - x.mean(0) if centre_neurons else x  # (N, Dx)
    alpha = np.abs(h.T @ neurons).sum(axis=1)  # (r,) sum over neurons j of |<h_i, x_j>|
    weights = alpha / alpha.sum()
    return {"rhos": rhos, "weights": weights, "value": float(weights @ rhos)}


# --- oracle agreement ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dx", "dy"), [(10, 10), (10, 6), (6, 10)])
def test_matches_token_space_oracle_on_activation_like_data(make_pair, dx: int, dy: int) -> None:
    # 1e3-1e4 offsets in dimensions 3-5 and 30-300x outlier scales in 0-2 (conftest.activations).
    x, y = make_pair(3000, 10, dtype=np.float64)
    x, y = x[:, :dx], y[:, -dy:]
    want = oracle_pwcca(x, y)
    got = pwcca(x, y)
    np.testing.assert_allclose(got.rhos, want["rhos"], rtol=1e-10, atol=0)
    np.testing.assert_allclose(got.weights, want["weights"], rtol=1e-10, atol=0)
    assert got.value == pytest.approx(want["value"], rel=1e-10, abs=0)
    # Raw neurons, as in Morcos et al.'s code: the same weights (to the digits the offsets leave the oracle).
    np.testing.assert_allclose(got.weights, oracle_pwcca(x, y, centre_neurons=False)["weights"], rtol=1e-7, atol=0)
    assert (got.rank_x, got.rank_y, got.n_tokens, got.underdetermined) == (dx, dy, 3000, False)


def test_weights_favour_the_variates_that_carry_the_neurons(rng) -> None:
    # X's loud neuron is copied into Y, its quiet neurons are not: PWCCA leans towards the copied one.
    x = rng.normal(size=(5000, 4)) * [20.0, 1.0, 1.0, 1.0]
    y = np.column_stack([x[:, 0] + 0.1 * rng.normal(size=5000), rng.normal(size=(5000, 3))])
    res = pwcca(x, y)
    want = oracle_pwcca(x, y)
    assert res.value == pytest.approx(want["value"], rel=1e-10)
    assert res.value > 0.8 > np.mean(res.rhos)


def test_streamed_equals_in_memory(make_pair, rng) -> None:
    x, y = make_pair(1999, 9, dtype=np.float64)
    whole = pwcca(x, y)
    got = pwcca_from_moments(streamed(x, y, rng))
    assert got.value == pytest.approx(whole.value, rel=1e-11, abs=0)
    np.testing.assert_allclose(got.weights, whole.weights, rtol=1e-9, atol=0)


# --- invariances ----------------------------------------------------------------------------------------------


def test_invariances(make_pair, rng) -> None:
    x, y = make_pair(2000, 9, dtype=np.float64)
    base = pwcca(x, y).value
    perm, signs = rng.permutation(9), rng.choice([-1.0, 1.0], size=9)
    b = random_rotation(rng, 9) @ np.diag(rng.uniform(0.5, 3.0, size=9)) @ random_rotation(rng, 9)  # invertible, cond <= 6
    for name, (xt, yt) in {
        "offsets": (x + 4e4, y - rng.normal(size=9) * 1e4),
        "isotropic scales": (0.01 * x, 300.0 * y),
        "signed permutation of x": (x[:, perm] * signs, y),
        "invertible map of y": (x, y @ b),
    }.items():
        assert pwcca(xt, yt).value == pytest.approx(base, rel=1e-9, abs=0), name


def test_rotating_x_moves_the_weights(make_pair, rng) -> None:
    # The weights sum |<h_i, x_j>| over X's own coordinates, so a rotation of X changes PWCCA (not the rhos).
    x, y = make_pair(2000, 9, dtype=np.float64)
    rotated = pwcca(x @ random_rotation(rng, 9), y)
    np.testing.assert_allclose(rotated.rhos, pwcca(x, y).rhos, rtol=1e-9)
    assert rotated.value != pytest.approx(pwcca(x, y).value, abs=1e-4)


# --- edge cases -------------------------------------------------------------------------------------------------


def test_identical_sides_give_one(make_pair) -> None:
    x, _ = make_pair(1000, 9, dtype=np.float64)
    res = pwcca(x, x)
    assert res.value == pytest.approx(1.0, abs=1e-12)
    assert res.weights.sum() == pytest.approx(1.0, rel=1e-14) and np.all(res.weights >= 0)


def test_independent_sides_give_small_values(rng) -> None:
    n, d = 20000, 6
    res = pwcca(rng.normal(size=(n, d)) + 1e4, rng.normal(size=(n, d)) * 100.0)
    assert res.value < 0.05 and not res.underdetermined


def test_fewer_tokens_than_dimensions_is_flagged(make_pair) -> None:
    x, y = make_pair(40, 60, dtype=np.float64)
    res = pwcca(x, y)
    assert res.underdetermined and (res.rank_x, res.rank_y) == (39, 39)
    assert res.value == pytest.approx(1.0, abs=1e-8)
    assert np.all(np.isfinite(res.weights))


def test_rank_deficient_x_keeps_every_neuron_in_the_weights(make_pair) -> None:
    x, y = make_pair(2000, 8, dtype=np.float64)
    # A duplicated neuron counts twice in the weights; a constant one (1e4 offset) counts for nothing.
    x_bad = np.hstack([x, x[:, 1:2], np.full((2000, 1), 1e4 + 0.5)])
    got = pwcca(x_bad, y)
    want = oracle_pwcca(x_bad, y, keep=np.arange(8))
    assert got.underdetermined and (got.rank_x, got.rank_y) == (8, 8)
    np.testing.assert_allclose(got.weights, want["weights"], rtol=1e-9, atol=0)
    assert got.value == pytest.approx(want["value"], rel=1e-10)
    assert got.value != pytest.approx(pwcca(x, y).value, abs=1e-6)  # the duplicate does shift the weights


def test_constant_side_gives_nan_without_warnings(rng) -> None:
    res = pwcca(rng.normal(size=(50, 3)), np.full((50, 4), 2.0))
    assert np.isnan(res.value) and res.weights.shape == (0,) and res.rank_y == 0


def test_result_type_and_docstring_examples(rng) -> None:
    assert isinstance(pwcca(rng.normal(size=(30, 2)), rng.normal(size=(30, 2))), PwccaResult)
    # import_module: the package attribute ``pwcca`` is the function, which shadows the module of that name.
    result = doctest.testmod(importlib.import_module("hrsa.analyze.metrics.pwcca"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
