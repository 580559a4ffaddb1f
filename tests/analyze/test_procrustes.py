"""Orthogonal Procrustes: scipy oracle, the residual identity, published value, invariances, N <= D."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes
from scipy.special import entr
from scipy.stats import special_ortho_group

from hrsa.analyze.metrics import (
    UnderdeterminedWarning,
    inverse_row_entropy,
    procrustes,
    procrustes_from_moments,
    procrustes_similarity,
)
from hrsa.analyze.metrics.procrustes import (
    procrustes_similarity_from_moments,
)
from hrsa.analyze.accumulators.moments import Moments, moments

# (2 - Euler's gamma - ln 2): E[z^2 ln z^2] for z ~ N(0, 1); H_inv of a Haar rotation tends to this / ln D.
RANDOM_ROTATION_CONSTANT = 2.0 - np.euler_gamma - np.log(2.0)


def centred64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(0)


def oracle(x: np.ndarray, y: np.ndarray) -> dict[str, float | np.ndarray]:
    """Procrustes by scipy on explicitly centred float64 data, H_inv by scipy's entropy terms."""
    xc, yc = centred64(x), centred64(y)
    rotation, _ = orthogonal_procrustes(xc, yc)  # argmin |xc R - yc|_F
    d = rotation.shape[0]
    return {
        "rotation": rotation,
        "h_inv": 1.0 - entr(rotation**2).sum() / (d * np.log(d)),
        "residual": np.sum((xc @ rotation - yc) ** 2) / np.sum(yc**2),
        "similarity": np.linalg.norm(xc.T @ yc, "nuc") / (np.linalg.norm(xc) * np.linalg.norm(yc)),
    }


def test_matches_scipy_on_activation_like_float32(make_pair) -> None:
    x, y = make_pair(1500, 24)
    want = oracle(x, y)
    res = procrustes(x, y, return_rotation=True)
    assert res.h_inv == pytest.approx(want["h_inv"], abs=1e-5)
    assert res.residual == pytest.approx(want["residual"], rel=1e-6)
    assert res.similarity == pytest.approx(want["similarity"], rel=1e-6)
    np.testing.assert_allclose(res.rotation, want["rotation"], atol=1e-6)
    assert (res.n_tokens, res.underdetermined) == (1500, False)


def test_residual_identity_from_moments(rng) -> None:
    # |Xc O* - Yc|^2 = tr C_xx + tr C_yy - 2 sum(S): checked against the fitted tokens themselves.
    x = rng.normal(size=(400, 12)) * rng.uniform(0.2, 5.0, size=12) + 50.0
    y = x @ rng.normal(size=(12, 12)) + rng.normal(size=(400, 12))
    res = procrustes(x, y, return_rotation=True)
    direct = np.sum((centred64(x) @ res.rotation - centred64(y)) ** 2) / np.sum(centred64(y) ** 2)
    assert res.residual == pytest.approx(direct, rel=1e-9)


def test_underdetermined_warns_and_keeps_residual_and_similarity_exact(make_pair) -> None:
    x, y = make_pair(40, 100)  # N < D: centred rank <= 39, O* is not unique
    want = oracle(x, y)
    with pytest.warns(UnderdeterminedWarning, match="not unique"):
        res = procrustes(x, y)
    assert res.underdetermined
    assert res.residual == pytest.approx(want["residual"], rel=1e-6)
    assert res.similarity == pytest.approx(want["similarity"], rel=1e-6)
    assert res.rotation is None


def test_reference_similarity_on_kornblith_demo_data() -> None:
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = x + np.random.randn(100, 10)
    assert round(procrustes_similarity(x, y), 5) == 0.73626
    assert round(procrustes(x, y).similarity, 5) == 0.73626


def test_similarity_allows_different_hidden_sizes(rng) -> None:
    x = rng.normal(size=(300, 5))
    y = np.hstack([2.0 * x, np.zeros((300, 3))]) @ special_ortho_group.rvs(8, random_state=0)
    assert procrustes_similarity(x, y) == pytest.approx(1.0, rel=1e-9)
    with pytest.raises(ValueError, match="equal size"):
        procrustes(x, y)


def test_signed_permutation_has_h_inv_one(rng) -> None:
    x = rng.normal(size=(600, 16))
    perm = rng.permutation(16)
    signs = rng.choice([-1.0, 1.0], size=16)
    res = procrustes(x, x[:, perm] * signs)
    assert res.h_inv == pytest.approx(1.0, abs=1e-9)
    assert res.residual == pytest.approx(0.0, abs=1e-9)
    assert res.similarity == pytest.approx(1.0, rel=1e-12)


def test_random_rotation_has_h_inv_near_073_over_ln_d(rng) -> None:
    d = 64
    x = rng.normal(size=(3000, d))
    res = procrustes(x, x @ special_ortho_group.rvs(d, random_state=7))
    assert res.residual == pytest.approx(0.0, abs=1e-9)
    # Finite-D correction: about 0.171 at D = 64 against the asymptotic 0.175.
    assert res.h_inv == pytest.approx(RANDOM_ROTATION_CONSTANT / np.log(d), abs=0.02)


def test_isotropic_scale_and_offset_change_nothing_but_scale_moves_residual(rng) -> None:
    x = rng.normal(size=(800, 10)) * rng.uniform(0.5, 2.0, size=10)
    y = x @ rng.normal(size=(10, 10)) + rng.normal(size=(800, 10))
    base = procrustes(x, y)
    shifted = procrustes(x + rng.normal(size=10) * 1e3, y - 5e3)
    scaled = procrustes(3.0 * x, 0.25 * y)
    for res in (shifted, scaled):
        assert res.h_inv == pytest.approx(base.h_inv, abs=1e-9)
        assert res.similarity == pytest.approx(base.similarity, rel=1e-9)
    assert shifted.residual == pytest.approx(base.residual, rel=1e-9)
    assert scaled.residual != pytest.approx(base.residual, rel=1e-3)  # |Xc O - Yc| compares magnitudes


def test_streamed_equals_in_memory(make_pair) -> None:
    x, y = make_pair(900, 12)
    parts = [Moments.from_chunk(x[s : s + 128], y[s : s + 128]) for s in range(0, 900, 128)]
    m = parts[0]
    for p in parts[1:]:
        m = p.merge(m)
    a, b = procrustes_from_moments(m), procrustes_from_moments(moments(x, y))
    assert (a.h_inv, a.residual, a.similarity) == pytest.approx((b.h_inv, b.residual, b.similarity), rel=1e-9)


def test_inverse_row_entropy_edges() -> None:
    assert inverse_row_entropy(np.eye(1)) == 1.0
    assert inverse_row_entropy(np.eye(5)) == 1.0  # exact zeros: 0 ln 0 = 0, and no warning
    hadamard = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2.0
    assert inverse_row_entropy(hadamard) == pytest.approx(0.0, abs=1e-12)  # maximally spread rows


def test_constant_side_gives_nan_without_numpy_warnings() -> None:
    x = np.random.default_rng(0).normal(size=(30, 3))
    with pytest.warns(UnderdeterminedWarning):  # C_xy = 0: every rotation fits equally badly
        res = procrustes(x, np.zeros((30, 3)))
    assert np.isnan(res.residual) and np.isnan(res.similarity)


def test_a_constant_side_has_no_rotation_nor_similarity() -> None:
    """Equal float64 rows centre to a rounding residue (and one token to nothing): an all-zero C_xy gives U = V = I,
    h_inv = 1, a "perfect permutation". Every Procrustes number is NaN there."""
    rng = np.random.default_rng(0)
    constant = np.tile(rng.normal(size=(1, 6)) + 0.1, (50, 1))
    varying = rng.normal(size=(50, 6))
    for x, y in ((constant, varying), (varying, constant), (varying[:1], varying[:1])):
        with pytest.warns(UnderdeterminedWarning):
            res = procrustes_from_moments(moments(x, y))
        assert np.isnan(res.h_inv) and np.isnan(res.residual) and np.isnan(res.similarity), res
        assert np.isnan(procrustes_similarity_from_moments(moments(x, y)))


def test_residual_of_an_exact_permutation_is_never_below_zero() -> None:
    """tr C_xx + tr C_yy - 2 |C_xy|_* is a difference of equal terms for Y = X P: rounding leaves it a few ulps
    either side of 0 (below it for about a third of these seeds); the residual, a squared norm, is clipped at 0."""
    for seed in range(30):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(300, 16)) * rng.uniform(0.1, 10.0, 16) + rng.uniform(-1e3, 1e3, 16)
        res = procrustes(x, x[:, rng.permutation(16)])
        assert 0.0 <= res.residual <= 1e-12 and res.similarity == pytest.approx(1.0, abs=1e-12)
