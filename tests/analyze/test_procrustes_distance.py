"""Procrustes angular distance: scipy rotation oracle, metric axioms, invariances, streaming, edge cases."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes
from scipy.stats import special_ortho_group

from hrsa.analyze.metrics import ProcrustesDistanceResult, procrustes_distance, procrustes_distance_from_moments
from tests.analyze.conftest import streamed

# --- independent float64 oracle: fit the rotation explicitly on normalised, zero-padded data -------------------


def oracle_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Williams et al. (2021): arccos <X~ Q*, Y~> with X~, Y~ centred, unit Frobenius norm, padded to one width."""
    xs, ys = _normalised(x), _normalised(y)
    d = max(xs.shape[1], ys.shape[1])
    xs, ys = _pad(xs, d), _pad(ys, d)
    rotation, _ = orthogonal_procrustes(xs, ys)  # argmin |xs Q - ys|_F over orthogonal Q
    return float(np.arccos(np.clip(np.sum((xs @ rotation) * ys), -1.0, 1.0)))


def _normalised(a: np.ndarray) -> np.ndarray:
    ac = np.asarray(a, dtype=np.float64) - np.mean(a, axis=0, dtype=np.float64)
    return ac / np.linalg.norm(ac)


def _pad(a: np.ndarray, d: int) -> np.ndarray:
    return np.hstack([a, np.zeros((a.shape[0], d - a.shape[1]))])


# --- oracle agreement ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dx", "dy"), [(12, 12), (12, 7), (7, 12)])
def test_matches_rotation_oracle_on_activation_like_data(make_pair, dx: int, dy: int) -> None:
    # 1e3-1e4 offsets in dimensions 3-5 and 30-300x outlier scales in 0-2 (conftest.activations).
    x, y = make_pair(2000, 12, dtype=np.float64)
    x, y = x[:, :dx], y[:, -dy:]
    got = procrustes_distance(x, y)
    assert got.distance == pytest.approx(oracle_distance(x, y), rel=1e-10, abs=0)
    assert got.similarity == pytest.approx(math.cos(got.distance), rel=1e-14)
    assert 0.0 < got.distance < math.pi / 2 and got.n_tokens == 2000


def test_reference_value_on_kornblith_demo_data() -> None:
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = x + np.random.randn(100, 10)
    res = procrustes_distance(x, y)
    assert round(res.similarity, 5) == 0.73626  # DESIGN.md
    assert res.distance == pytest.approx(math.acos(res.similarity), rel=1e-15)
    assert res.distance == pytest.approx(oracle_distance(x, y), rel=1e-10)


def test_streamed_equals_in_memory(make_pair, rng) -> None:
    x, y = make_pair(1999, 10, dtype=np.float64)
    got = procrustes_distance_from_moments(streamed(x, y, rng)).distance
    assert got == pytest.approx(procrustes_distance(x, y).distance, rel=1e-12, abs=0)


# --- metric axioms -----------------------------------------------------------------------------------------------


def test_triangle_inequality_and_symmetry(rng) -> None:
    # Triples of related representations of different widths, from near-identical to unrelated.
    n = 300
    base = rng.normal(size=(n, 9)) * np.geomspace(1.0, 50.0, 9)
    for _ in range(40):
        reps = []
        for d in rng.choice([5, 7, 9], size=3):
            noise = rng.choice([1e-3, 0.1, 1.0, 30.0])
            rep = base[:, rng.permutation(9)[:d]] @ special_ortho_group.rvs(int(d), random_state=rng)
            reps.append(rep + noise * rng.normal(size=(n, d)) + rng.normal(size=d) * 1e4)
        a, b, c = reps
        ab, bc, ac = (procrustes_distance(p, q).distance for p, q in ((a, b), (b, c), (a, c)))
        # Near 0, rounding of the similarity (~eps) moves the angle by ~eps / theta: 1e-10 at theta ~ 1e-5.
        assert ac <= ab + bc + 1e-10
        assert procrustes_distance(b, a).distance == pytest.approx(ab, rel=1e-12, abs=1e-10)


def test_geodesic_midpoint_makes_the_triangle_inequality_tight(rng) -> None:
    # On the shape sphere the midpoint of the aligned, normalised ends lies on the geodesic: ab + bc = ac.
    a = rng.normal(size=(300, 6)) * np.geomspace(1.0, 30.0, 6) + 1e4
    c = a @ rng.normal(size=(6, 6)) + rng.normal(size=(300, 6))
    an, cn = _normalised(a), _normalised(c)
    rotation, _ = orthogonal_procrustes(cn, an)
    b = an + cn @ rotation
    ab, bc, ac = (procrustes_distance(p, q).distance for p, q in ((a, b), (b, c), (a, c)))
    assert ab + bc == pytest.approx(ac, rel=1e-10) and ab == pytest.approx(bc, rel=1e-9)


# --- invariances ----------------------------------------------------------------------------------------------


def test_invariant_to_rotations_isotropic_scale_and_offsets(make_pair, rng) -> None:
    x, y = make_pair(2000, 10, dtype=np.float64)
    base = procrustes_distance(x, y).distance
    for name, (xt, yt) in {
        "rotation of x": (x @ special_ortho_group.rvs(10, random_state=rng), y),
        "reflection of y": (x, y[:, ::-1] * np.r_[-1.0, np.ones(9)]),
        "isotropic scales": (0.001 * x, 50.0 * y),
        "offsets": (x + 7e4, y - rng.normal(size=10) * 1e4),
    }.items():
        assert procrustes_distance(xt, yt).distance == pytest.approx(base, rel=1e-10, abs=0), name


def test_anisotropic_scaling_moves_the_distance(make_pair) -> None:
    x, y = make_pair(2000, 10, dtype=np.float64)
    moved = procrustes_distance(x * np.geomspace(0.01, 1.0, 10), y).distance
    assert moved != pytest.approx(procrustes_distance(x, y).distance, abs=1e-3)


# --- edge cases -------------------------------------------------------------------------------------------------


def test_identical_and_scaled_rotated_sides_give_zero(make_pair, rng) -> None:
    x, _ = make_pair(1000, 9, dtype=np.float64)
    q = special_ortho_group.rvs(9, random_state=rng)
    # Near 0 the arccos turns eps in the similarity into ~1e-8 in the angle (the module says so).
    for y in (x, 3.0 * x @ q - 2e4, np.hstack([x, np.zeros((1000, 3))])):
        assert procrustes_distance(x, y).distance == pytest.approx(0.0, abs=1e-7)


def test_independent_sides_are_nearly_orthogonal(rng) -> None:
    n, d = 20000, 6
    res = procrustes_distance(rng.normal(size=(n, d)) + 1e4, rng.normal(size=(n, d)) * 100.0)
    # The similarity of independent sides shrinks like sqrt(D / N).
    assert res.similarity < 5 * math.sqrt(d / n) and res.distance > math.pi / 2 - 0.1


def test_fewer_tokens_than_dimensions_is_well_defined(make_pair) -> None:
    x, y = make_pair(40, 60, dtype=np.float64)
    assert procrustes_distance(x, y).distance == pytest.approx(oracle_distance(x, y), rel=1e-9)


def test_rank_deficient_and_duplicate_rows_match_the_oracle(make_pair) -> None:
    x, y = make_pair(1000, 8, dtype=np.float64)
    x_bad = np.hstack([x, x[:, 1:2], np.full((1000, 1), 1e4 + 0.5)])
    x_bad, y_bad = np.vstack([x_bad, x_bad[:200]]), np.vstack([y, y[:200]])
    assert procrustes_distance(x_bad, y_bad).distance == pytest.approx(oracle_distance(x_bad, y_bad), rel=1e-10)


def test_constant_side_gives_nan_without_warnings(rng) -> None:
    res = procrustes_distance(rng.normal(size=(50, 3)), np.full((50, 4), 2.0))
    assert math.isnan(res.distance) and math.isnan(res.similarity)


def test_result_type_and_docstring_examples(rng) -> None:
    assert isinstance(procrustes_distance(rng.normal(size=(30, 2)), rng.normal(size=(30, 2))), ProcrustesDistanceResult)
    # import_module: the package attribute ``procrustes_distance`` is the function, which shadows the module.
    module = importlib.import_module("hrsa.analyze.metrics.procrustes_distance")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
