"""Cosine k-NN search on FAISS, blocked, and k-NN overlap of two models of a store.

Exact search (:func:`exact_neighbors`) gives the neighbours of float64 cosine on the stored values, at any
offset, in two steps:

1. Candidates on FAISS in float32. Activations share large offsets (and a few dimensions of 1e3-1e5), so
   their unit rows all lie near one direction and float32 cosines differ only past float32's resolution
   (at a 1e4 offset, float32 neighbour sets agreed with float64 ones at Jaccard 0.39). The database rows are
   the unit rows *minus their mean* (computed in float64), the queries the unit rows: q . (u - mean) is the
   cosine less q . mean, a constant per query, so the ranking is the cosine's, and the float32 product now
   carries the differences between rows, not the shared direction. An ``IndexFlatIP`` (a ``GpuIndexFlatIP``
   when faiss sees a GPU) scores one block of database rows against one block of queries at a time; each
   query keeps a running list of ``k + 1 + TIE_MARGIN`` candidates, so memory stays at
   O(query_block x (db_block + k)) besides the data, and a million tokens never need their N x N Gram matrix.
2. Exact re-ranking: each query's candidates are scored again in float64 from the stored values and ordered
   by (-score, index) (:func:`hrsa.analyze.metrics.knn_overlap.rank_candidates`), the rule of the numpy
   reference; the query itself is dropped by index (self excluded, duplicates kept).

Approximate search (:func:`approximate_neighbors`, HNSW) is an option; its recall against exact search
on the same tokens is measured and reported beside the overlap (:class:`KnnPairResult`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hrsa.analyze.config import DEFAULT_K, Search
from hrsa.analyze.metrics.knn_overlap import KnnOverlapResult, check_k, knn_overlap_from_neighbors, rank_candidates
from hrsa.store.errors import UserError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

    from hrsa.store import ActivationStore
    from hrsa.store.alignment import TokenPairs
    from hrsa.store.selection import TokenSelection

__all__ = [
    "KnnOptions",
    "KnnPairResult",
    "approximate_neighbors",
    "exact_neighbors",
    "knn_pair",
    "neighbor_recall",
    "sample_tokens",
]

TIE_MARGIN = 8  # extra candidates per block search, so that ties at the k-th place resolve by index


@functools.cache
def _gpu_resources() -> Any:  # pragma: no cover - needs faiss-gpu and a GPU
    """One StandardGpuResources per process: each one reserves scratch memory on the GPU."""
    import faiss

    return faiss.StandardGpuResources()


def _flat_index(d: int, use_gpu: bool) -> Any:
    import faiss

    if use_gpu:  # pragma: no cover - needs faiss-gpu and a GPU
        return faiss.GpuIndexFlatIP(_gpu_resources(), d)
    return faiss.IndexFlatIP(d)


def _resolve_gpu(use_gpu: bool | None) -> bool:
    import faiss

    has_gpu = hasattr(faiss, "GpuIndexFlatIP") and faiss.get_num_gpus() > 0
    return has_gpu if use_gpu is None else bool(use_gpu and has_gpu)


def _safe(norms: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.where(norms > 0, norms, 1.0)  # an all-zero row stays zero: similarity 0 to everything


def _centred_unit_rows(x: NDArray) -> tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.float64]]:
    """(centred, mean, norms): the unit rows minus their mean, rounded to float32 only after the float64 shift (the
    shared direction removed before rounding); that mean; the rows' float64 norms. One float32 copy of the data,
    built in blocks of ~16 MB of float64."""
    n, d = x.shape
    step = max(1, (1 << 21) // max(1, d))
    norms, mean = np.empty(n), np.zeros(d)
    for i in range(0, n, step):
        block = np.array(x[i : i + step], dtype=np.float64)
        norms[i : i + step] = np.linalg.norm(block, axis=1)
        block /= _safe(norms[i : i + step])[:, None]
        mean += block.sum(axis=0)
    mean /= max(n, 1)
    centred = np.empty((n, d), np.float32)
    for i in range(0, n, step):
        block = np.array(x[i : i + step], dtype=np.float64)
        block /= _safe(norms[i : i + step])[:, None]
        block -= mean
        centred[i : i + step] = block
    return centred, mean, norms


def _exact_scores(x: NDArray, norms: NDArray[np.float64], rows: NDArray[np.int64], cand: NDArray[np.int64]) -> NDArray[np.float64]:
    """(b, c) float64 cosines of rows ``rows`` against their candidates ``cand`` (-1: none, scored -inf)."""
    out = np.full(cand.shape, -np.inf)
    for i in range(0, len(rows), 64):  # (64, c, D) float64 at a time
        r, c = rows[i : i + 64], np.maximum(cand[i : i + 64], 0)
        q = np.asarray(x[r], dtype=np.float64)  # (b, D)
        v = np.asarray(x[c.ravel()], dtype=np.float64).reshape(*c.shape, -1)  # (b, c, D)
        cosines = np.einsum("bd,bcd->bc", q, v) / (_safe(norms[r])[:, None] * _safe(norms[c]))
        out[i : i + 64] = np.where(cand[i : i + 64] >= 0, cosines, -np.inf)
    return out


def exact_neighbors(
    x: ArrayLike, k: int, *, query_block: int = 16384, db_block: int = 262144, use_gpu: bool | None = None
) -> NDArray[np.int64]:
    """Exact cosine k nearest neighbours (those of float64 cosine), self excluded, ties by smaller index; FAISS
    candidates re-ranked in float64 (see the module docstring).

    Args:
        x: (N, D) rows (any float dtype).
        k: neighbours per row, 1 <= k < N.
        query_block: queries scored at once.
        db_block: database rows indexed at once.
        use_gpu: None for a GPU index when faiss has one, else False/True.

    Returns:
        (N, k) int64 indices, most similar first; equal to
        :func:`hrsa.analyze.metrics.knn_overlap.cosine_neighbors` for any block sizes.

    Example:
        >>> exact_neighbors([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], 1, query_block=1, db_block=2).ravel().tolist()
        [1, 0, 1]
    """
    x = np.asarray(x)
    database, mean, norms = _centred_unit_rows(x)  # (N, D) float32, (D,), (N,) float64
    n, d = database.shape
    k = check_k(k, n)
    if query_block < 1 or db_block < 1:
        raise ValueError(f"Expected positive block sizes. Got query_block={query_block}, db_block={db_block} instead.")
    gpu = _resolve_gpu(use_gpu)
    keep = k + 1 + TIE_MARGIN  # running candidates per query: k, self, and a margin for rounding and ties
    out = np.empty((n, k), dtype=np.int64)

    def db_blocks() -> Iterator[tuple[int, Any]]:  # each database block as (first row, index of its rows)
        for j0 in range(0, n, db_block):
            index = _flat_index(d, gpu)
            index.add(database[j0 : j0 + db_block])
            yield j0, index

    single = list(db_blocks()) if n <= db_block else None  # one block: index it once, not once per query block
    for i0 in range(0, n, query_block):
        q = database[i0 : i0 + query_block] + mean.astype(np.float32)  # (b, D) float32: the unit rows, the queries
        best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
        best_i = np.full((len(q), 0), -1, dtype=np.int64)
        # Step 1: float32 candidates: each database block's top list merged into the running one.
        for j0, index in single or db_blocks():
            s, i = index.search(q, min(keep, index.ntotal))  # (b, c), (b, c)
            cand_s, cand_i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i + j0], axis=1)
            order = np.lexsort((cand_i, -cand_s), axis=1)[:, :keep]
            best_s, best_i = np.take_along_axis(cand_s, order, axis=1), np.take_along_axis(cand_i, order, axis=1)
        # Step 2: exact float64 cosines of the candidates, the query itself dropped by index, ties by index.
        rows = np.arange(i0, i0 + len(q))
        exact = _exact_scores(x, norms, rows, best_i)
        not_self = best_i != rows[:, None]  # (b, keep)
        out[i0 : i0 + len(q)] = rank_candidates(np.where(not_self & (best_i >= 0), exact, -np.inf),
                                                np.where(not_self & (best_i >= 0), best_i, np.iinfo(np.int64).max), k)
    return out


def approximate_neighbors(
    x: ArrayLike, k: int, *, m: int = 32, ef_search: int = 128, seed: int = 0
) -> NDArray[np.int64]:
    """Approximate cosine k nearest neighbours (FAISS HNSW on unit rows), self excluded.

    Args:
        x: (N, D) rows.
        k: neighbours per row, 1 <= k < N.
        m: HNSW graph degree.
        ef_search: HNSW search breadth (>= k + 1; larger is slower and more exact).
        seed: seed of faiss's level assignment, for reproducible graphs.

    Returns:
        (N, k) int64 indices, most similar first by the index's own scores.
    """
    import faiss

    x = np.asarray(x)
    centred, _, norms = _centred_unit_rows(x)
    k = check_k(k, centred.shape[0])
    # On the unit sphere, cosine order is L2 order, and L2 distances do not change when every row moves by the
    # same vector: so an L2 graph of the centred unit rows (symmetric, which HNSW needs) ranks by cosine.
    index = faiss.IndexHNSWFlat(centred.shape[1], m, faiss.METRIC_L2)
    index.hnsw.efConstruction = max(40, 2 * m)
    index.hnsw.efSearch = max(ef_search, k + 1 + TIE_MARGIN)
    index.add(centred)
    _, i = index.search(centred, k + 1 + TIE_MARGIN)  # (N, c); the graph's candidates, re-ranked in float64
    rows = np.arange(centred.shape[0])
    ok = (i != rows[:, None]) & (i >= 0)
    exact = _exact_scores(x, norms, rows, np.where(ok, i, -1))
    return rank_candidates(np.where(ok, exact, -np.inf), np.where(ok, i, np.iinfo(np.int64).max), k)


def neighbor_recall(approx: ArrayLike, exact: ArrayLike) -> float:
    """Mean fraction of the exact k neighbours that the approximate search found (recall@k)."""
    a, e = np.asarray(approx), np.asarray(exact)
    both = np.sort(np.concatenate([a, e], axis=1), axis=1)
    return float((both[:, 1:] == both[:, :-1]).sum() / e.size)


def sample_tokens(selected: slice | NDArray, n_sample: int | None, *, seed: int = 0) -> NDArray[np.int64]:
    """A seeded subsample of a store selection, as sorted global token indices.

    Args:
        selected: what :meth:`ActivationStore.select` returned (a slice or an index array).
        n_sample: tokens to keep; None or at least the selection's size keeps all.
        seed: seed of the draw (the same tokens for both models of a pair).
    """
    ids = np.arange(selected.start, selected.stop) if isinstance(selected, slice) else np.unique(np.asarray(selected))
    if n_sample is None or n_sample >= ids.size:
        return ids.astype(np.int64)
    return np.sort(np.random.default_rng(seed).choice(ids, size=n_sample, replace=False)).astype(np.int64)


@dataclass(frozen=True)
class KnnOptions:
    """Settings of the ``knn`` metric of ``analyze_pair`` (the keyword arguments of :func:`knn_pair`).

    Attributes:
        ks: neighbour counts; n_sample: tokens in the shared subsample (None: all); seed: its seed;
        search: "exact" or "hnsw"; hidden_states: which shared hidden states (None: all).
    """

    ks: tuple[int, ...] = DEFAULT_K
    n_sample: int | None = 50_000
    seed: int = 0
    search: Search = "exact"
    hidden_states: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ks": tuple(self.ks), "n_sample": self.n_sample, "seed": self.seed, "search": self.search,
                "hidden_states": self.hidden_states}


@dataclass(frozen=True)
class KnnPairResult:
    """k-NN overlap of two models of a store, per matched hidden state and k.

    Attributes:
        hidden_states: the matched hidden states, in the order of every tuple below.
        overlap: {k: per hidden state KnnOverlapResult}.
        n_tokens: size of the shared token subsample; seed: its seed.
        search: "exact" or "hnsw".
        recall: {k: per hidden state (recall of A's, recall of B's) approximate neighbours}, with "hnsw".
        seconds: wall time of the searches.
    """

    hidden_states: tuple[int, ...]
    overlap: dict[int, tuple[KnnOverlapResult, ...]]
    n_tokens: int
    seed: int
    search: str = "exact"
    recall: dict[int, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    seconds: float = 0.0


def knn_pair(
    store: ActivationStore,
    a: str,
    b: str,
    *,
    ks: Iterable[int] = DEFAULT_K,
    n_sample: int | None = 50_000,
    seed: int = 0,
    selection: TokenSelection | None = None,
    hidden_states: Sequence[int] | None = None,
    search: Search = "exact",
    query_block: int = 16384,
    db_block: int = 262144,
    pairs: TokenPairs | None = None,
) -> KnnPairResult:
    """k-NN overlap of models ``a`` and ``b`` on a seeded token subsample they share.

    Args:
        store: an open store; a and b must be on the same corpus (checked by the caller, ``analyze_pair``).
        a, b: model ids.
        ks: neighbour counts (each 1 <= k < n_tokens).
        n_sample: tokens drawn from the selection (None or more than it holds: all of them).
        seed: seed of the draw.
        selection: the token filters of ``hrsa analyze`` (default all tokens).
        hidden_states: which shared hidden states (default all shared).
        search: "exact" (blocked FAISS flat index) or "hnsw" (approximate, recall measured against exact).
        query_block, db_block: block sizes of the exact search.
        pairs: the pair's tokens when its corpora differ (aligned by content span,
            :meth:`ActivationStore.token_pairs`): the sample is drawn from the aligned pairs.

    Returns:
        A KnnPairResult.

    Raises:
        UserError: a k out of range, or no shared hidden states.
    """
    ks_t = tuple(sorted({int(k) for k in ks}))
    shared = sorted(set(store.model_info(a).hidden_states) & set(store.model_info(b).hidden_states))
    states = tuple(shared if hidden_states is None else [k for k in hidden_states if k in shared])
    if not states:
        raise UserError(f"Expected hidden states shared by {a} and {b}. Got {list(hidden_states or [])} instead.")
    # Step 1: the shared subsample, as global token indices.
    if pairs is not None and not pairs.identical:
        drawn = sample_tokens(slice(0, pairs.n_pairs), n_sample, seed=seed)
        ids, ids_b = pairs.rows_a[drawn], pairs.rows_b[drawn]
    else:
        ids = ids_b = sample_tokens(store.select(a, selection), n_sample, seed=seed)
    for k in ks_t:
        if not 1 <= k < ids.size:
            raise UserError(f"Expected 1 <= k < {ids.size} (tokens in the k-NN sample). Got k = {k} instead. "
                            "Use a smaller --k or more tokens.")
    overlap: dict[int, list[KnnOverlapResult]] = {k: [] for k in ks_t}
    recall: dict[int, list[tuple[float, float]]] = {k: [] for k in ks_t} if search == "hnsw" else {}
    start = time.perf_counter()
    for layer in states:
        # Step 2: read both models' rows of the sample (D x n floats each; the store's dtype is upcast).
        x, y = (np.asarray(store.hidden_state(m, layer)[rows].compute(), dtype=np.float32) for m, rows in ((a, ids), (b, ids_b)))
        # Step 3: neighbours once for the largest k; the tie rule is a total order, so smaller k are prefixes.
        k_max = ks_t[-1]
        nx, ny = (exact_neighbors(v, k_max, query_block=query_block, db_block=db_block) for v in (x, y))
        if search == "hnsw":
            ax, ay = approximate_neighbors(x, k_max), approximate_neighbors(y, k_max)
        for k in ks_t:
            if search == "hnsw":
                recall[k].append((neighbor_recall(ax[:, :k], nx[:, :k]), neighbor_recall(ay[:, :k], ny[:, :k])))
                overlap[k].append(knn_overlap_from_neighbors(ax[:, :k], ay[:, :k]))
            else:
                overlap[k].append(knn_overlap_from_neighbors(nx[:, :k], ny[:, :k]))
    return KnnPairResult(states, {k: tuple(v) for k, v in overlap.items()}, int(ids.size), seed, search,
                         {k: tuple(v) for k, v in recall.items()}, time.perf_counter() - start)
