"""k-NN overlap of two models of a store, within a memory budget, with document-bootstrap intervals.

The recipe of :func:`knn_pair`:

1. A seeded token sample shared by both models (:func:`sample_tokens`), and the document of each sampled token.
2. The memory model of the pass (:mod:`hrsa.analyze.local.memory`) picks the largest blocks that fit
   ``memory_budget``, or refuses, before any hidden state is read.
3. Per hidden state and model: neighbours of every sampled token by exact search over blocks of the sample read
   from the store (:mod:`hrsa.analyze.local.knn_search`, :mod:`hrsa.analyze.local.store_rows`): one query block
   and one database block are held, never the layer, and the sample itself only when one block holds it. With
   ``search="hnsw"`` the whole sample is held (a graph needs every row) and the recall of the approximate
   neighbours is measured by exact search on :data:`RECALL_QUERIES` sampled queries.
4. Per k: the per-token Jaccard overlap (:func:`hrsa.analyze.metrics.knn_overlap.knn_overlap_from_neighbors`)
   and the 95% percentile bootstrap interval of its mean, resampling the sample's documents
   (:func:`hrsa.analyze.local.bootstrap.document_bootstrap_interval`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from hrsa.analyze.accumulators.centring import NON_FINITE_MESSAGE
from hrsa.analyze.config import DEFAULT_K, Search
from hrsa.analyze.local.bootstrap import document_bootstrap_interval
from hrsa.analyze.local.hidden_states import shared_hidden_states
from hrsa.analyze.local.knn_search import approximate_neighbors, exact_neighbors, neighbor_recall, search_neighbors
from hrsa.analyze.local.memory import KnnBlocks, KnnPass, bytes_per_value, plan_knn
from hrsa.analyze.local.store_rows import SampleRows, read_rows
from hrsa.analyze.metrics.knn_overlap import KnnOverlapResult, chance_overlap, knn_overlap_from_neighbors
from hrsa.analyze.streaming.plan import parse_memory_budget
from hrsa.analyze.streaming.stream import NonFiniteError
from hrsa.store.errors import UserError

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from hrsa.analyze.metrics.uncertainty import Interval
    from hrsa.store import ActivationStore
    from hrsa.store.alignment import TokenPairs
    from hrsa.store.selection import TokenSelection

__all__ = [
    "CHANCE_WARNING",
    "RECALL_QUERIES",
    "TIES_WARNING",
    "KnnChanceWarning",
    "KnnTiesWarning",
    "KnnOptions",
    "KnnPairResult",
    "approximate_neighbors",
    "check_knn_budget",
    "exact_neighbors",
    "knn_pair",
    "neighbor_recall",
    "sample_tokens",
]

RECALL_QUERIES = 1000  # queries whose exact neighbours measure HNSW's recall (not the whole sample: exact is slow)


def sample_tokens(selected: slice | NDArray, n_sample: int | None, *, seed: int = 0) -> NDArray[np.int64]:
    """A seeded subsample of a store selection, as sorted global token indices.

    Args:
        selected: what :meth:`ActivationStore.select` returned (a slice or an index array).
        n_sample: tokens to keep; None or at least the selection's size keeps all.
        seed: seed of the draw (the same tokens for both models of a pair).

    Example:
        >>> sample_tokens(slice(10, 20), 3, seed=0).tolist(), sample_tokens(np.array([5, 2, 9]), 50).tolist()
        ([15, 16, 19], [2, 5, 9])
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
        recall: {k: per hidden state (recall of A's, recall of B's) approximate neighbours}, with "hnsw",
            measured on ``RECALL_QUERIES`` sampled queries.
        seconds: wall time of the searches.
        overlap_interval: {k: per hidden state Interval of the mean overlap}: 95% percentile bootstrap over
            the sample's documents (B = 1000, seed ``seed``; :mod:`hrsa.analyze.local.bootstrap`).
        n_docs: documents the sampled tokens fall in (the bootstrap's resampling units).
        estimated_peak, memory_budget: bytes of the pass's memory model and of the budget it fits.
        sample_reads: reads of each model's sample per hidden state (1 when one block holds it).
        chance: {k: the mean overlap of unrelated models on this sample} (:func:`chance_overlap`).
        ties: {k: per hidden state the share of tokens whose k-th neighbour ties with the next in both models}
            (exact search only).
    """

    hidden_states: tuple[int, ...]
    overlap: dict[int, tuple[KnnOverlapResult, ...]]
    n_tokens: int
    seed: int
    search: str = "exact"
    recall: dict[int, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    seconds: float = 0.0
    overlap_interval: dict[int, tuple[Interval, ...]] = field(default_factory=dict)
    n_docs: int = 0
    estimated_peak: int = 0
    memory_budget: int = 0
    sample_reads: int = 1
    chance: dict[int, float] = field(default_factory=dict)
    ties: dict[int, tuple[float, ...]] = field(default_factory=dict)


class KnnTiesWarning(UserWarning):
    """Many tokens' neighbours tie across the k-th place in both models, where the shared tie rule agrees for them."""


#: Share of tokens tied across the k-th place in both models above which a run warns.
TIES_WARNING = 0.05


class KnnChanceWarning(UserWarning):
    """k is so large a share of the k-NN sample that unrelated models overlap much by chance alone."""


#: Chance overlap above which a run warns: unrelated models would score this much (k = 10 of 200 tokens: 0.026).
CHANCE_WARNING = 0.05


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
    memory_budget: int | str = "4GB",
    query_block: int | None = None,
    db_block: int | None = None,
    pairs: TokenPairs | None = None,
) -> KnnPairResult:
    """k-NN overlap of models ``a`` and ``b`` on a seeded token subsample they share (see the module docstring).

    Args:
        store: an open store; a and b must be on the same corpus (checked by the caller, ``analyze_pair``).
        a, b: model ids.
        ks: neighbour counts (each 1 <= k < n_tokens).
        n_sample: tokens drawn from the selection (None or more than it holds: all of them).
        seed: seed of the draw and of the bootstrap.
        selection: the token filters of ``hrsa analyze`` (default all tokens).
        hidden_states: which shared hidden states (default all shared).
        search: "exact" (blocked FAISS search, re-ranked in float64) or "hnsw" (approximate, recall measured).
        memory_budget: bytes (or text such as "4GB") the pass may hold; blocks are sized to fit it.
        query_block, db_block: caps on the block sizes the budget allows (default: none).
        pairs: the pair's tokens when its corpora differ (aligned by content span,
            :meth:`ActivationStore.token_pairs`): the sample is drawn from the aligned pairs.

    Returns:
        A KnnPairResult.

    Raises:
        UserError: a k out of range, or no shared hidden states.
        MemoryBudgetError: the pass does not fit the budget (raised before any hidden state is read).

    Warns:
        KnnChanceWarning: unrelated models would overlap more than :data:`CHANCE_WARNING` at some k.
    """
    ks_t, states, ids, ids_b, docs, size, blocks = _planned(
        store, a, b, ks=ks, n_sample=n_sample, seed=seed, selection=selection, hidden_states=hidden_states,
        search=search, memory_budget=memory_budget, query_block=query_block, db_block=db_block, pairs=pairs)
    # Step 3: per hidden state, neighbours of each model in turn, then the overlap and its interval per k.
    chance = {k: chance_overlap(k, int(ids.size)) for k in ks_t}
    _warn_chance(chance, int(ids.size))
    overlap: dict[int, list[KnnOverlapResult]] = {k: [] for k in ks_t}
    interval: dict[int, list[Interval]] = {k: [] for k in ks_t}
    recall: dict[int, list[tuple[float, float]]] = {k: [] for k in ks_t} if search == "hnsw" else {}
    start = time.perf_counter()
    ties: dict[int, list[float]] = {k: [] for k in ks_t} if search == "exact" else {}
    for layer in states:
        nx, sx, rx = _neighbors(store, a, layer, ids, ks_t, blocks, search, seed)
        ny, sy, ry = _neighbors(store, b, layer, ids_b, ks_t, blocks, search, seed)
        for k in ks_t:  # the tie rule is a total order, so the neighbours of a smaller k are a prefix
            res = knn_overlap_from_neighbors(nx[:, :k], ny[:, :k], return_per_token=True)
            overlap[k].append(replace(res, per_token=None))
            interval[k].append(document_bootstrap_interval(res.per_token, docs, seed=seed))  # type: ignore[arg-type]
            if search == "hnsw":
                recall[k].append((rx[k], ry[k]))
            else:
                ties[k].append(_tied_in_both(sx, sy, k))
        del nx, ny, sx, sy
    _warn_ties(states, ties)
    return KnnPairResult(states, {k: tuple(v) for k, v in overlap.items()}, int(ids.size), seed, search,
                         {k: tuple(v) for k, v in recall.items()}, time.perf_counter() - start,
                         {k: tuple(v) for k, v in interval.items()}, size.n_docs, blocks.estimated_peak,
                         blocks.memory_budget, blocks.sample_reads, chance, {k: tuple(v) for k, v in ties.items()})


def _tied_in_both(sx: NDArray[np.float64] | None, sy: NDArray[np.float64] | None, k: int) -> float:
    """The share of tokens whose k-th neighbour ties with the next (equal float64 cosines) in both models: there the
    shared tie rule (smaller index first) picks the same neighbours in both, whatever the models (duplicate rows: a
    repeated token at the embedding layer; a constant hidden state ties everywhere), which raises the overlap."""
    if sx is None or sy is None or sx.shape[1] <= k:  # k = n - 1: no next neighbour, every token is a neighbour
        return 0.0
    return float(np.mean((sx[:, k - 1] == sx[:, k]) & (sy[:, k - 1] == sy[:, k])))


def _warn_ties(states: tuple[int, ...], ties: dict[int, list[float]]) -> None:
    high = {(k, state): share for k, shares in ties.items() for state, share in zip(states, shares)
            if share > TIES_WARNING}
    if high:
        worst = max(high, key=high.__getitem__)
        warnings.warn(f"k-NN overlap: at hidden states {sorted({s for _, s in high})}, more than {TIES_WARNING:.0%} of "
                      f"the sampled tokens have neighbours tied across the k-th place in both models ({high[worst]:.0%} "
                      f"at hidden state {worst[1]}, k = {worst[0]}): duplicate rows (a repeated token at the embedding "
                      "layer) or a constant state. The tie rule (smaller index first) picks the same ones in both, "
                      "which raises the overlap there (knn.ties in results.json).", KnnTiesWarning, stacklevel=3)


def _warn_chance(chance: dict[int, float], n: int) -> None:
    high = {k: c for k, c in chance.items() if c > CHANCE_WARNING}
    if high:
        said = ", ".join(f"{c:.3f} at k = {k}" for k, c in high.items())
        warnings.warn(f"k-NN overlap: on {n} sampled tokens, unrelated models would overlap {said} by chance alone "
                      "(verdicts take it out). Sample more tokens (--knn-sample) or use a smaller --k.",
                      KnnChanceWarning, stacklevel=3)


def check_knn_budget(store: ActivationStore, a: str, b: str, *, memory_budget: int | str, **options: Any) -> int:
    """The estimated peak of the k-NN pass :func:`knn_pair` would make with these arguments, without reading any
    hidden state: ``analyze_pair`` asks before its streaming passes, so a pass that cannot fit says so at once.

    Raises:
        UserError, MemoryBudgetError: as :func:`knn_pair`.
    """
    return _planned(store, a, b, memory_budget=memory_budget, **options)[-1].estimated_peak


def _planned(
    store: ActivationStore, a: str, b: str, *, ks: Iterable[int] = DEFAULT_K, n_sample: int | None = 50_000,
    seed: int = 0, selection: TokenSelection | None = None, hidden_states: Sequence[int] | None = None,
    search: Search = "exact", memory_budget: int | str = "4GB", query_block: int | None = None,
    db_block: int | None = None, pairs: TokenPairs | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...], NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], KnnPass, KnnBlocks]:
    """Steps 1 and 2 of :func:`knn_pair`: (ks, hidden states, sample of A, of B, document of each, pass, blocks)."""
    ks_t = tuple(sorted({int(k) for k in ks}))
    info_a, info_b = store.model_info(a), store.model_info(b)
    states = shared_hidden_states(store, a, b, hidden_states)
    # Step 1: the shared subsample, as global token indices of each model, and the document of each token.
    ids, ids_b = _draw_sample(store, a, selection, n_sample, seed, pairs)
    for k in ks_t:
        if not 1 <= k < ids.size:
            raise UserError(f"Expected 1 <= k < {ids.size} (tokens in the k-NN sample). Got k = {k} instead. "
                            "Use a smaller --k or more tokens.")
    docs = np.searchsorted(store.corpus_tokens(info_a.corpus).doc_offsets, ids, side="right") - 1  # (n,)
    # Step 2: block sizes within the budget, before any read of a hidden state.
    size = KnnPass(n=int(ids.size), d=max(info_a.hidden_size, info_b.hidden_size),
                   read_bytes=max(bytes_per_value(i.dtype) for i in (info_a, info_b)),
                   k=_searched_k(ks_t, int(ids.size)) if search == "exact" else ks_t[-1],
                   shard_tokens=max(min(i.layout.shard_tokens, i.n_tokens) for i in (info_a, info_b)),
                   n_docs=int(np.unique(docs).size),
                   selection=_held_bytes(pairs), search=search)
    blocks = plan_knn(size, parse_memory_budget(memory_budget), query_block=query_block, db_block=db_block)
    return ks_t, states, ids, ids_b, docs, size, blocks


def _draw_sample(
    store: ActivationStore, a: str, selection: TokenSelection | None, n_sample: int | None, seed: int,
    pairs: TokenPairs | None,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(A's, B's) global token indices of the sample: the same tokens, or aligned pairs drawn together."""
    if pairs is not None and not pairs.identical:
        drawn = sample_tokens(slice(0, pairs.n_pairs), n_sample, seed=seed)
        return pairs.rows_a[drawn], pairs.rows_b[drawn]  # type: ignore[index]
    ids = sample_tokens(store.select(a, selection), n_sample, seed=seed)
    return ids, ids


def _held_bytes(pairs: TokenPairs | None) -> int:
    """Bytes of the pair's token index arrays, held by the caller through the pass."""
    if pairs is None:
        return 0
    return sum(int(getattr(rows, "nbytes", 0)) for rows in (pairs.rows_a, pairs.rows_b))


def _neighbors(
    store: ActivationStore, mid: str, layer: int, ids: NDArray[np.int64], ks: tuple[int, ...], blocks: KnnBlocks,
    search: Search, seed: int,
) -> tuple[NDArray[np.int64], NDArray[np.float64] | None, dict[int, float]]:
    """(n, max k) neighbours of the sampled tokens in one hidden state of one model; exact: (n, max k + 1) (at most
    n - 1) of them with their cosines, the next one telling ties at the k-th place; with HNSW no cosines, and the
    recall@k of each k on ``RECALL_QUERIES`` sampled queries."""
    hidden = store.hidden_state(mid, layer)  # (N, D) lazy: read below a piece (one shard) at a time
    piece = store.model_info(mid).layout.shard_tokens
    try:
        if search == "exact":
            source = SampleRows(hidden, ids, piece)
            found, cosines = search_neighbors(source, _searched_k(ks, ids.size), query_block=blocks.query_block,
                                              db_block=blocks.db_block, return_scores=True)
            return found, cosines, {}
        x = read_rows(hidden, ids, piece=piece)  # (n, D) as stored: a graph holds every row
        approx = approximate_neighbors(x, ks[-1])
    except ValueError as error:
        if str(error) != NON_FINITE_MESSAGE:
            raise
        raise NonFiniteError(f"Expected finite activations. Got NaN or inf in hidden state {layer} of model {mid} "
                             f"(store {store.url}) among the k-NN sample's tokens instead: the model overflowed in its "
                             "dtype or the extraction is damaged. Re-extract that model (--dtype float32 where float16 "
                             "or bfloat16 overflowed).") from None
    queries = sample_tokens(slice(0, len(x)), RECALL_QUERIES, seed=seed)
    exact = exact_neighbors(x, ks[-1], queries=queries, db_block=len(x))
    return approx, None, {k: neighbor_recall(approx[queries, :k], exact[:, :k]) for k in ks}


def _searched_k(ks: tuple[int, ...], n: int) -> int:
    """Neighbours an exact search finds: one past the largest k (its tie with the next), at most all n - 1 others."""
    return min(ks[-1] + 1, n - 1)
