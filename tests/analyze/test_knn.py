"""Blocked FAISS search: equal to brute force for any blocking; approximate recall; k-NN overlap from a store."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from hrsa.analyze.local.knn import approximate_neighbors, exact_neighbors, knn_pair, neighbor_recall, sample_tokens
from hrsa.analyze.metrics.knn_overlap import cosine_neighbors, knn_overlap
from hrsa.store.errors import UserError
from hrsa.store.selection import TokenSelection


@pytest.mark.parametrize("k", [5, 10, 50])
def test_exact_equals_sklearn(rng: np.random.Generator, k: int) -> None:
    x = rng.normal(size=(600, 32)).astype(np.float32)
    _, expected = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(x).kneighbors()
    np.testing.assert_array_equal(exact_neighbors(x, k), expected)


# Blocks of 1 query and 7 rows (fewer than k, merged block after block) on 143 rows, not 700: a Python step per pair
# of blocks made that row 7 s of the suite; 143 rows are 20 blocks of 7 and a ragged one of 3 (700 had none).
@pytest.mark.parametrize(("query_block", "db_block", "n"), [(64, 100, 700), (1, 7, 143), (333, 1000, 700), (1000, 53, 700)])
def test_blocked_equals_unblocked(rng: np.random.Generator, query_block: int, db_block: int, n: int) -> None:
    x = rng.normal(size=(n, 16))
    whole = exact_neighbors(x, 10, query_block=10_000, db_block=10_000)
    np.testing.assert_array_equal(exact_neighbors(x, 10, query_block=query_block, db_block=db_block), whole)
    np.testing.assert_array_equal(whole, cosine_neighbors(x, 10))


def test_ties_break_by_index() -> None:
    # Duplicated rows tie exactly (score 1 with each other): the smaller index comes first, for any blocking.
    x = np.repeat(np.eye(4), 5, axis=0) + 0.0  # (20, 4): 5 copies of each direction
    expected = cosine_neighbors(x, 4)
    for qb, db in [(3, 2), (20, 20), (1, 1)]:
        np.testing.assert_array_equal(exact_neighbors(x, 4, query_block=qb, db_block=db), expected)
    assert expected[0].tolist() == [1, 2, 3, 4] and expected[7].tolist() == [5, 6, 8, 9]


def test_approximate_recall(rng: np.random.Generator) -> None:
    x = rng.normal(size=(2000, 16))
    exact = exact_neighbors(x, 10)
    recall = neighbor_recall(approximate_neighbors(x, 10), exact)
    assert 0.9 <= recall <= 1.0
    assert neighbor_recall(exact, exact) == 1.0


def test_sample_tokens_seeded() -> None:
    first = sample_tokens(slice(0, 1000), 100, seed=3)
    assert first.size == 100 and np.all(np.diff(first) > 0)
    np.testing.assert_array_equal(first, sample_tokens(slice(0, 1000), 100, seed=3))
    np.testing.assert_array_equal(sample_tokens(np.array([5, 2, 9]), 50), [2, 5, 9])  # fewer than asked: all


def test_knn_pair_matches_in_memory(pair_store) -> None:
    store = pair_store.open()
    sel = TokenSelection(exclude_special=True)
    res = knn_pair(store, "a", "b", ks=(5, 10), n_sample=300, seed=1, selection=sel, db_block=128, query_block=50)
    kept = np.flatnonzero(~pair_store.is_special)
    ids = np.sort(np.random.default_rng(1).choice(kept, size=300, replace=False))
    assert res.n_tokens == 300 and res.hidden_states == (0, 1, 2, 3)
    for i, layer in enumerate(res.hidden_states):
        for k in (5, 10):
            expected = knn_overlap(pair_store.x[layer][ids], pair_store.y[layer][ids], k=k)
            # The store's activations carry offsets of 1e3-1e4: float32 cosines alone would reorder near-ties.
            assert res.overlap[k][i].mean == pytest.approx(expected.mean, abs=1e-3)
            assert 0.0 < res.overlap[k][i].mean < 1.0


def test_knn_pair_approximate_reports_recall(pair_store) -> None:
    res = knn_pair(pair_store.open(), "a", "b", ks=(5,), n_sample=None, search="hnsw", hidden_states=[1])
    assert res.n_tokens == 1000 and res.search == "hnsw"
    assert all(0.8 <= r <= 1.0 for pair in res.recall[5] for r in pair)


def test_knn_pair_k_too_large(pair_store) -> None:
    with pytest.raises(UserError, match="k < 20"):
        knn_pair(pair_store.open(), "a", "b", ks=(50,), n_sample=20)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_row_is_refused_not_scored(bad: float) -> None:
    """One NaN or inf value would otherwise turn every score into "no candidate", and the overlap into a
    plausible constant ((k-1)/(k+1)) for the whole layer."""
    from hrsa.analyze.local.knn_search import exact_neighbors

    x = np.random.default_rng(0).standard_normal((60, 8))
    x[7, 3] = bad
    with pytest.raises(ValueError, match="Expected finite activations"):
        exact_neighbors(x, 5)


@pytest.mark.parametrize(("query_block", "db_block"), [(16384, 262144), (700, 900)])
def test_tie_groups_far_larger_than_the_margin_break_by_index(query_block: int, db_block: int) -> None:
    """At the embedding layer every occurrence of a token is one row: a frequent token ties with hundreds of rows,
    far more than the candidates FAISS keeps a block (k + 1 + TIE_MARGIN), which it picks among by float32
    rounding. The rule is still the smallest indices first, as the O(N^2) reference has it."""
    rng = np.random.default_rng(0)
    tokens = rng.zipf(1.3, size=3000) % 300  # a few ids hundreds of times
    assert np.bincount(tokens).max() > 500
    embedding = rng.normal(size=(300, 64)).astype(np.float32) + 30.0  # and a shared offset
    x = embedding[tokens]
    want = cosine_neighbors(x, 10)
    got = exact_neighbors(x, 10, query_block=query_block, db_block=db_block)
    assert np.array_equal(got, want), int((got != want).any(1).sum())


def test_a_widened_take_past_the_gpus_k_limit_runs_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss's GPU k-selection stops at 2048; a tie group of 3000 rows widens a take past it (19, 76, 304, 1216,
    4864 at k = 10; 14 ... 3584 at k = 5): that take runs on the CPU instead of failing, and the neighbours are still
    the definition's."""
    import faiss

    import hrsa.analyze.local.knn_search as knn_search

    seen: list[int] = []

    def knn_gpu(resources: object, queries: np.ndarray, database: np.ndarray, k: int, metric: int) -> object:
        assert k <= 2048, k  # what faiss-gpu refuses
        seen.append(k)
        return faiss.knn(queries, database, k, metric=metric)

    monkeypatch.setattr(faiss, "knn_gpu", knn_gpu, raising=False)
    monkeypatch.setattr(knn_search, "_resolve_gpu", lambda use_gpu: True)
    monkeypatch.setattr(knn_search, "_gpu_resources", lambda: None)
    rng = np.random.default_rng(0)
    x = np.vstack([np.tile(rng.normal(size=(1, 16)), (3000, 1)), rng.normal(size=(500, 16))])
    got = exact_neighbors(x, 5, query_block=1000)
    assert np.array_equal(got, cosine_neighbors(x, 5)) and max(seen) <= 2048 and 896 in seen
