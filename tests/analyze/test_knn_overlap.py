"""k-NN overlap, pure math: Jaccard against set arithmetic, neighbours against scikit-learn, invariances."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from hrsa.analyze.metrics.knn_overlap import cosine_neighbors, jaccard_rows, knn_overlap, knn_overlap_from_neighbors


def sklearn_neighbors(x: np.ndarray, k: int) -> np.ndarray:
    """Oracle: brute-force cosine neighbours; kneighbors() without X excludes each point itself."""
    _, idx = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(x).kneighbors()
    return idx


@pytest.mark.parametrize("k", [5, 10, 50])
def test_neighbors_equal_sklearn(rng: np.random.Generator, k: int) -> None:
    x = rng.normal(size=(400, 24))  # continuous: no ties
    np.testing.assert_array_equal(cosine_neighbors(x, k), sklearn_neighbors(x, k))


def test_jaccard_exact(rng: np.random.Generator) -> None:
    a = np.array([rng.choice(60, size=7, replace=False) for _ in range(200)])
    b = np.array([rng.choice(60, size=7, replace=False) for _ in range(200)])
    expected = [len(set(r) & set(s)) / len(set(r) | set(s)) for r, s in zip(a, b)]
    np.testing.assert_array_equal(jaccard_rows(a, b), expected)  # exact: small integer ratios
    res = knn_overlap_from_neighbors(a, b, return_per_token=True)
    assert res.mean == pytest.approx(np.mean(expected)) and res.median == pytest.approx(np.median(expected))
    assert res.std == pytest.approx(np.std(expected)) and res.n_tokens == 200 and res.k == 7


def test_jaccard_extremes() -> None:
    assert jaccard_rows([[1, 2, 3]], [[3, 1, 2]]).tolist() == [1.0]
    assert jaccard_rows([[1, 2, 3]], [[4, 5, 6]]).tolist() == [0.0]


@pytest.mark.parametrize("k", [5, 10])
def test_rotation_and_isotropic_scale_keep_overlap(rng: np.random.Generator, k: int) -> None:
    x = rng.normal(size=(500, 16))
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert knn_overlap(x, 7.5 * x @ q, k=k).mean == 1.0
    assert knn_overlap(x, x * rng.uniform(0.5, 2.0, size=(500, 1)), k=k).mean == 1.0  # per-token scale: cosine ignores it


def test_anisotropic_scale_lowers_overlap(rng: np.random.Generator) -> None:
    x = rng.normal(size=(500, 16))
    res = knn_overlap(x, x * np.geomspace(0.05, 20.0, 16), k=10)
    assert res.mean < 0.7 and res.std > 0


def test_unrelated_near_chance(rng: np.random.Generator) -> None:
    res = knn_overlap(rng.normal(size=(500, 16)), rng.normal(size=(500, 16)), k=10)
    assert res.mean < 0.05  # chance is about k / N = 0.02


def test_invalid_inputs(rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match="k < N"):
        cosine_neighbors(rng.normal(size=(5, 3)), 5)
    with pytest.raises(ValueError, match="same tokens"):
        knn_overlap(rng.normal(size=(5, 3)), rng.normal(size=(6, 3)), k=2)
    with pytest.raises(ValueError, match="equal shape"):
        jaccard_rows([[1, 2]], [[1, 2, 3]])
