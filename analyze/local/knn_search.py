"""Cosine k-NN search on FAISS in blocks of queries against blocks of database rows, exact in float64.

Exact search (:func:`exact_neighbors`, :func:`search_neighbors`) gives the neighbours of float64 cosine on the
stored values, at any offset, and holds one query block and one database block at a time (both read through a
:class:`RowSource`: an in-memory array, or the store block by block, :mod:`hrsa.analyze.local.store_rows`):

1. Candidates on FAISS in float32. Activations share large offsets (and a few dimensions of 1e3-1e5), so
   their unit rows all lie near one direction and float32 cosines differ only past float32's resolution
   (at a 1e4 offset, float32 neighbour sets agreed with float64 ones at Jaccard 0.39). The database rows are
   the unit rows *minus a shift* m (computed in float64), c = u - m: q . c is the cosine less q . m, a constant
   per query, so the ranking is the cosine's for any m, and with m near the shared direction the float32 product
   carries the differences between rows, not the direction. The queries are centred too, as [q - m, 1] against
   rows [c, m . c] (the same q . c): FAISS's float32 error then scales with both rows' spread about m, not with
   |q| = 1, so candidates stay sharp at a 1e5 offset instead of tying and being re-ranked block-wide. m is the
   mean unit row of the first query block (a convex combination of unit rows, so near their shared direction),
   fixed before the first database block. ``faiss.knn`` (``knn_gpu`` when faiss sees a GPU) scores one query
   sub-block against one database block without copying it into an index.
2. Exact re-ranking, while the database block is in memory: each query's ``k + 1 + TIE_MARGIN`` candidates
   of the block are scored again in float64 from the stored values, merged into the query's running list by
   (-score, index) (the rule of :func:`hrsa.analyze.metrics.knn_overlap.rank_candidates` and the numpy reference);
   the query itself is dropped by index (self excluded, duplicates kept). Candidates never need a second
   read: every database row is scored exactly while its block is held.

Approximate search (:func:`approximate_neighbors`, HNSW) holds every row (a graph needs them all); its recall
is measured by exact search on a subsample of queries (:func:`search_neighbors` with ``queries``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from hrsa.analyze.accumulators.centring import NON_FINITE_MESSAGE
from hrsa.analyze.metrics.knn_overlap import check_k

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = [
    "FAISS_SUB_BLOCK",
    "RERANK_ROWS",
    "TIE_MARGIN",
    "InMemoryRows",
    "RowSource",
    "approximate_neighbors",
    "exact_neighbors",
    "faiss_scratch_bytes",
    "neighbor_recall",
    "search_neighbors",
]

TIE_MARGIN = 8  # extra candidates per block, so that ties and float32 rounding at the k-th place resolve exactly
FAISS_SUB_BLOCK = 4096  # queries per faiss.knn call: its BLAS query block, so nothing is lost by cutting there
RERANK_ROWS = 64  # queries whose candidates are gathered and scored in float64 at once: (64, c, D) float64
GPU_MAX_K = 2048  # faiss's GPU k-selection takes at most this many (a widened take may ask more: the CPU's then)
_WIDE_ELEMENTS = 1 << 20  # a widened take's rows at once: (rows, c) scores and ids of at most 8 MB each
_NO_ID = np.iinfo(np.int64).max  # an empty candidate slot: sorts after every real index


class RowSource(Protocol):
    """Rows of an (n, D) matrix, by block: what the search reads instead of holding the matrix."""

    n: int

    def block(self, start: int, stop: int) -> NDArray:
        """Rows start..stop-1 as stored (any float dtype), (stop - start, D)."""

    def take(self, rows: NDArray[np.int64]) -> NDArray:
        """Rows ``rows`` (sorted) as stored, (len(rows), D)."""


@dataclass(frozen=True)
class InMemoryRows:
    """An in-memory (n, D) array as a RowSource (blocks are views)."""

    x: NDArray

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def block(self, start: int, stop: int) -> NDArray:
        return self.x[start:stop]

    def take(self, rows: NDArray[np.int64]) -> NDArray:
        return self.x[rows]


@functools.cache
def _gpu_resources() -> Any:  # pragma: no cover - needs faiss-gpu and a GPU
    """One StandardGpuResources per process: each one reserves scratch memory on the GPU."""
    import faiss

    return faiss.StandardGpuResources()


def _resolve_gpu(use_gpu: bool | None) -> bool:
    import faiss

    has_gpu = hasattr(faiss, "knn_gpu") and faiss.get_num_gpus() > 0
    return has_gpu if use_gpu is None else bool(use_gpu and has_gpu)


def faiss_scratch_bytes(queries: int, rows: int) -> int:
    """Bytes FAISS allocates (in C++) for one ``faiss.knn`` call of ``queries`` against ``rows``: its block of
    float32 inner products when it takes the BLAS path (at least ``distance_compute_blas_threshold`` queries),
    else nothing but its result heaps."""
    import faiss

    if queries < faiss.cvar.distance_compute_blas_threshold:
        return 0
    return 4 * min(queries, faiss.cvar.distance_compute_blas_query_bs) * min(rows, faiss.cvar.distance_compute_blas_database_bs)


def _faiss_top(queries: NDArray[np.float32], database: NDArray[np.float32], c: int,
               gpu: bool) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """(q, c) float32 inner products and indices into ``database`` of each query's c largest (FAISS, no index
    copy)."""
    import faiss

    if gpu and c <= GPU_MAX_K:  # pragma: no cover - needs faiss-gpu and a GPU
        return faiss.knn_gpu(_gpu_resources(), queries, database, c, metric=faiss.METRIC_INNER_PRODUCT)
    return faiss.knn(queries, database, c, metric=faiss.METRIC_INNER_PRODUCT)  # GPU selection stops at k = 2048


def _safe(norms: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.where(norms > 0, norms, 1.0)  # an all-zero row stays zero: similarity 0 to everything


@dataclass(frozen=True)
class _Block:
    """Rows as stored, their float64 norms, and their positions among the source's rows."""

    raw: NDArray
    norms: NDArray[np.float64]
    positions: NDArray[np.int64]

    @classmethod
    def of(cls, raw: NDArray, positions: NDArray[np.int64]) -> _Block:
        norms = np.empty(len(raw))
        for i in range(0, len(raw), FAISS_SUB_BLOCK):  # float64 copies of a sub-block at a time
            norms[i : i + FAISS_SUB_BLOCK] = np.linalg.norm(np.asarray(raw[i : i + FAISS_SUB_BLOCK], np.float64), axis=1)
        # A NaN or inf row has no neighbours: unchecked, it poisons the shift (every centred row NaN), every score
        # turns to "no candidate", and the overlap becomes a plausible constant. A row's float64 norm is finite
        # exactly when the row is (stored values are at most ~3.4e38, whose squares float64 holds).
        if not np.isfinite(norms).all():
            raise ValueError(NON_FINITE_MESSAGE)
        return cls(raw, norms, positions)

    def unit(self, start: int, stop: int) -> NDArray[np.float64]:
        """(stop - start, D) float64 unit rows of a sub-block."""
        return np.asarray(self.raw[start:stop], np.float64) / _safe(self.norms[start:stop])[:, None]

    def mean_unit_row(self) -> NDArray[np.float64]:
        """(D,) float64 mean of the unit rows."""
        total = sum(self.unit(i, i + FAISS_SUB_BLOCK).sum(0) for i in range(0, len(self.raw), FAISS_SUB_BLOCK))
        return np.asarray(total) / len(self.raw)

    def centred(self, shift: NDArray[np.float64]) -> NDArray[np.float32]:
        """(len, D + 1) float32: each unit row c = u - ``shift`` and, last, ``shift . c``, rounded to float32 only
        after the float64 shift (FAISS's database rows; see :func:`_float32_units` for the queries')."""
        out = np.empty((len(self.raw), self.raw.shape[1] + 1), np.float32)
        for i in range(0, len(self.raw), FAISS_SUB_BLOCK):
            c = self.unit(i, i + FAISS_SUB_BLOCK) - shift
            out[i : i + FAISS_SUB_BLOCK, :-1], out[i : i + FAISS_SUB_BLOCK, -1] = c, c @ shift
            del c  # before the next sub-block's float64 copies are made
        return out


class _Best:
    """Each query's running list of its ``keep`` best candidates by (-float64 cosine, index)."""

    def __init__(self, n: int, keep: int) -> None:
        self.scores = np.full((n, keep), -np.inf)
        self.ids = np.full((n, keep), _NO_ID, np.int64)

    def merge(self, rows: NDArray[np.int64], scores: NDArray[np.float64], ids: NDArray[np.int64]) -> None:
        all_s = np.concatenate([self.scores[rows], scores], axis=1)
        all_i = np.concatenate([self.ids[rows], ids], axis=1)
        order = np.lexsort((all_i, -all_s), axis=1)[:, : self.ids.shape[1]]
        self.scores[rows] = np.take_along_axis(all_s, order, axis=1)
        self.ids[rows] = np.take_along_axis(all_i, order, axis=1)

    def drop(self, rows: NDArray[np.int64], lo: int, hi: int) -> None:
        """Forget the candidates of positions lo..hi-1 (one database block) of ``rows``, keeping the order."""
        ids = self.ids[rows]
        gone = (ids >= lo) & (ids < hi)
        if gone.any():
            scores = np.where(gone, -np.inf, self.scores[rows])
            order = np.lexsort((np.where(gone, _NO_ID, ids), -scores), axis=1)
            self.scores[rows] = np.take_along_axis(scores, order, axis=1)
            self.ids[rows] = np.take_along_axis(np.where(gone, _NO_ID, ids), order, axis=1)


def _exact_scores(q: _Block, rows: NDArray[np.int64], db: _Block, cand: NDArray[np.int64], keep: int,
                  gather_rows: int = RERANK_ROWS) -> NDArray[np.float64]:
    """(b, c) float64 cosines of query rows ``rows`` of ``q`` against their candidates (rows of ``db``; -1: none).

    One formula for every score, whatever the number of candidates: rows that are equal give equal scores, so
    their tie is broken by index alone. ``gather_rows`` rows of ``keep`` candidates are gathered at once (fewer
    rows when each has more: a widened take gathers no more than a narrow one)."""
    out = np.full(cand.shape, -np.inf)
    pairs = gather_rows * keep  # (row, candidate) pairs gathered at once: as many as a narrow take's, however wide
    step = max(1, min(RERANK_ROWS, pairs // max(1, cand.shape[1])))
    width = max(1, pairs // step)
    for i in range(0, len(cand), step):
        at = rows[i : i + step]
        qv = np.asarray(q.raw[at], np.float64)  # (b, D)
        for j in range(0, cand.shape[1], width):
            c = np.maximum(cand[i : i + step, j : j + width], 0)  # (b, w)
            v = np.asarray(db.raw[c.ravel()], np.float64).reshape(*c.shape, -1)  # (b, w, D)
            cosines = np.einsum("bd,bcd->bc", qv, v) / (_safe(q.norms[at])[:, None] * _safe(db.norms[c]))
            out[i : i + step, j : j + width] = np.where(cand[i : i + step, j : j + width] >= 0, cosines, -np.inf)
    return out


def _scan(best: _Best, q: _Block, db: _Block, centred: NDArray[np.float32], shift: NDArray[np.float64], k: int,
          gpu: bool) -> None:
    """Merge each query's best candidates of one database block into ``best``.

    FAISS keeps ``keep`` candidates a block; a row whose last one (its float32 score, plus its error bound) could
    still reach its k-th exact score may have lost rows that tie with it or beat it (a token's every occurrence is
    one row at the embedding layer: ties of hundreds): its candidates of this block are taken again, four times as
    many, until none can (or the block is whole)."""
    # FAISS's float32 product of a query [q - m, 1] and a row [c, m . c] (L = D + 1 terms) is off from the float64
    # one by at most (L + 2) 2^-24 (|q - m| |c| + |m . c|): L for the sum (any order), 2 for rounding both inputs.
    # Both factors are the rows' spread about m, not their offset: at a 1e5 offset the bound falls with it, where a
    # bound of a unit query (|q| = 1) stayed above the cosines' differences and re-ranked whole blocks.
    # Plus float64's own rounding, which that bound no longer hides where the spread is tiny (sd 1e-7 of the offset):
    # q . m and the exact cosines are each within ~(D + 3) 2^-53 of their true values; 4x that, both ways, so a
    # left-out row whose float64 score ties the k-th is taken again (ties break by index).
    spread = max(float(np.max(np.linalg.norm(centred[i : i + FAISS_SUB_BLOCK, :-1], axis=1)))  # a sub-block at a time:
                 for i in range(0, len(centred), FAISS_SUB_BLOCK))  # a strided (N, D) view would be copied whole
    # On a GPU, cuBLAS may round the inputs to TF32 (a 10-bit mantissa) before its float32 sums: not ruled out on a GPU
    # here, so the inputs' rounding is bounded as TF32's there.
    inputs = 2.0**-11 if gpu else 2.0**-24
    error = (centred.shape[1] * 2.0**-24 + 2 * inputs, spread, float(np.max(np.abs(centred[:, -1]))),
             4 * (centred.shape[1] + 2) * 2.0**-53)
    for s in range(0, len(q.raw), FAISS_SUB_BLOCK):
        rows = np.arange(s, min(s + FAISS_SUB_BLOCK, len(q.raw)))
        _take(best, q, rows, db, centred, shift, k, min(best.ids.shape[1], len(db.raw)), error, gpu)


def _float32_units(q: _Block, at: NDArray[np.int64], shift: NDArray[np.float64], step: int = 512
                   ) -> tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.float64]]:
    """Rows ``at`` (sorted) of ``q`` as FAISS's float32 queries [u - m, 1] (u the unit row, m the shift), each one's
    float64 ``u . m`` (what FAISS's score, ``u . c``, lacks of the cosine ``u . (c + m)``) and its float64 ``|u - m|``;
    float64 copies of ``step`` rows at a time."""
    units = np.ones((len(at), q.raw.shape[1] + 1), np.float32)
    offsets, spreads = np.empty(len(at)), np.empty(len(at))
    for j in range(0, len(at), step):
        part = at[j : j + step]
        contiguous = int(part[-1]) - int(part[0]) + 1 == len(part)
        u = q.unit(int(part[0]), int(part[-1]) + 1) if contiguous else (
            np.asarray(q.raw[part], np.float64) / _safe(q.norms[part])[:, None])
        offsets[j : j + step] = u @ shift
        u -= shift
        units[j : j + step, :-1], spreads[j : j + step] = u, np.linalg.norm(u, axis=1)
    return units, offsets, spreads


def _take(best: _Best, q: _Block, rows: NDArray[np.int64], db: _Block, centred: NDArray[np.float32],
          shift: NDArray[np.float64], k: int, c: int, error: tuple[float, float, float, float], gpu: bool) -> None:
    """Merge the ``c`` best candidates of ``db`` for ``rows`` of ``q`` (replacing any of that block taken before),
    then take again, wider, for the rows whose cut could have left out a tie or a better row."""
    for i in range(0, rows.size, max(1, _WIDE_ELEMENTS // c)):  # (rows, c) arrays of at most 32 MB each
        at = rows[i : i + max(1, _WIDE_ELEMENTS // c)]
        units, offsets, spreads = _float32_units(q, at, shift)
        approx, cand = _faiss_top(units, centred, c, gpu)  # (b, c) rows of the block
        del units
        exact = _exact_scores(q, at, db, cand, best.ids.shape[1])
        ids = np.where(cand >= 0, db.positions[np.maximum(cand, 0)], _NO_ID)  # (b, c) global positions
        exact[ids == q.positions[at, None]] = -np.inf  # self excluded by index, not by score
        best.drop(at, int(db.positions[0]), int(db.positions[-1]) + 1)  # a wider take replaces a narrower one
        best.merge(at, exact, np.where(np.isfinite(exact), ids, _NO_ID))
        if c < len(db.raw):
            scale, rows_spread, mc, rounding = error  # what the rows left out can score: FAISS's last, plus errors
            reach = approx[:, -1].astype(np.float64) + offsets + scale * (spreads * rows_spread + mc) + rounding
            cut = at[reach >= best.scores[at, k - 1]]
            if cut.size:
                _take(best, q, cut, db, centred, shift, k, min(4 * c, len(db.raw)), error, gpu)


def search_neighbors(
    source: RowSource, k: int, *, queries: NDArray[np.int64] | None = None, query_block: int = 16384,
    db_block: int = 262144, use_gpu: bool | None = None, return_scores: bool = False,
) -> NDArray[np.int64] | tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Exact cosine k nearest neighbours of rows of ``source`` among all its rows, one block pair at a time.

    Holds one query block (as stored) and one database block (as stored, plus its float32 centred rows); the
    database is read ``ceil(len(queries) / query_block)`` times, unless one block holds it (then once, and a
    query block that is the database block is not read twice).

    Args:
        source: the (n, D) rows.
        k: neighbours per row, 1 <= k < n.
        queries: sorted positions of the query rows (default all).
        query_block, db_block: rows per query block and per database block.
        use_gpu: None for a GPU search when faiss has one, else False/True.
        return_scores: also return their float64 cosines (the tie rule's ties are equal cosines).

    Returns:
        (len(queries), k) int64 positions, most similar first (ties by smaller position), self excluded; with
        ``return_scores``, and (len(queries), k) float64 cosines.
    """
    n = source.n
    k = check_k(k, n)
    if query_block < 1 or db_block < 1:
        raise ValueError(f"Expected positive block sizes. Got query_block={query_block}, db_block={db_block} instead.")
    gpu, keep = _resolve_gpu(use_gpu), k + 1 + TIE_MARGIN  # keep: k, self, and a margin for rounding and ties
    wanted = np.arange(n, dtype=np.int64) if queries is None else np.asarray(queries, np.int64)
    out = np.empty((wanted.size, k), dtype=np.int64)
    cosines = np.empty((wanted.size, k)) if return_scores else None
    shift, single = None, None  # single: the database's only block, centred once for every query block
    contiguous = queries is None  # then a query block is rows positions[0]..positions[-1]: read as a block
    for i0 in range(0, wanted.size, query_block):
        positions = wanted[i0 : i0 + query_block]
        q = _Block.of(source.block(i0, i0 + len(positions)) if contiguous else source.take(positions), positions)
        shift = q.mean_unit_row() if shift is None else shift  # Step 1: the shift, from the first rows read
        best = _Best(len(positions), keep)
        for j0 in range(0, n, db_block):  # Step 2: candidates of each database block, re-ranked exactly
            same = contiguous and j0 == i0 and min(n, j0 + db_block) == i0 + len(positions)
            db = single or _database_block(source, q if same else None, j0, min(n, j0 + db_block), shift)
            _scan(best, q, db[0], db[1], shift, k, gpu)
            single = db if db_block >= n else None
            del db  # freed before the next block is read: one database block at a time
        out[i0 : i0 + len(positions)] = best.ids[:, :k]
        if cosines is not None:
            cosines[i0 : i0 + len(positions)] = best.scores[:, :k]
        del q, best  # freed before the next query block is read
    return (out, cosines) if cosines is not None else out


def _database_block(
    source: RowSource, q: _Block | None, start: int, stop: int, shift: NDArray[np.float64]
) -> tuple[_Block, NDArray[np.float32]]:
    """One database block (the query block itself when given) and its float32 centred unit rows."""
    db = q or _Block.of(source.block(start, stop), np.arange(start, stop, dtype=np.int64))
    return db, db.centred(shift)


def exact_neighbors(
    x: ArrayLike, k: int, *, queries: ArrayLike | None = None, query_block: int = 16384, db_block: int = 262144,
    use_gpu: bool | None = None,
) -> NDArray[np.int64]:
    """Exact cosine k nearest neighbours (those of float64 cosine), self excluded, ties by smaller index; FAISS
    candidates re-ranked in float64 (see the module docstring).

    Args:
        x: (N, D) rows (any float dtype).
        k: neighbours per row, 1 <= k < N.
        queries: only these rows' neighbours (sorted indices; default all rows).
        query_block: queries scored at once.
        db_block: database rows scored at once.
        use_gpu: None for a GPU search when faiss has one, else False/True.

    Returns:
        (N, k) (or (len(queries), k)) int64 indices, most similar first; equal to
        :func:`hrsa.analyze.metrics.knn_overlap.cosine_neighbors` for any block sizes.

    Example:
        >>> exact_neighbors([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], 1, query_block=1, db_block=2).ravel().tolist()
        [1, 0, 1]
    """
    rows = None if queries is None else np.asarray(queries, np.int64)
    return search_neighbors(InMemoryRows(np.asarray(x)), k, queries=rows, query_block=query_block, db_block=db_block,
                            use_gpu=use_gpu)


def approximate_neighbors(x: ArrayLike, k: int, *, m: int = 32, ef_search: int = 128) -> NDArray[np.int64]:
    """Approximate cosine k nearest neighbours (FAISS HNSW on centred unit rows), self excluded, the graph's
    candidates re-ranked in float64.

    Args:
        x: (N, D) rows, all held (with a float32 copy and the graph: see
            :meth:`hrsa.analyze.local.memory.KnnPass.hnsw_bytes`).
        k: neighbours per row, 1 <= k < N.
        m: HNSW graph degree.
        ef_search: HNSW search breadth (>= k + 1; larger is slower and more exact).

    Returns:
        (N, k) int64 indices, most similar first.
    """
    import faiss

    rows = _Block.of(np.asarray(x), np.arange(np.shape(x)[0], dtype=np.int64))
    n = len(rows.raw)
    k = check_k(k, n)
    shift = rows.mean_unit_row()
    # On the unit sphere, cosine order is L2 order, and L2 distances do not change when every row moves by the
    # same vector: so an L2 graph of the centred unit rows (symmetric, which HNSW needs) ranks by cosine.
    index = faiss.IndexHNSWFlat(rows.raw.shape[1], m, faiss.METRIC_L2)
    index.hnsw.efConstruction = max(40, 2 * m)
    index.hnsw.efSearch = max(ef_search, k + 1 + TIE_MARGIN)
    centred = np.ascontiguousarray(rows.centred(shift)[:, :-1])  # the unit rows less the shift alone
    index.add(centred)
    best = _Best(n, k + 1 + TIE_MARGIN)
    for s in range(0, n, FAISS_SUB_BLOCK):  # the graph's candidates, re-ranked in float64 a sub-block at a time
        _, cand = index.search(centred[s : s + FAISS_SUB_BLOCK], k + 1 + TIE_MARGIN)  # (b, c)
        at = np.arange(s, s + len(cand))
        exact = _exact_scores(rows, at, rows, cand, cand.shape[1])
        exact[cand == rows.positions[at, None]] = -np.inf
        best.merge(at, exact, np.where(np.isfinite(exact), cand, _NO_ID))
    return best.ids[:, :k]


def neighbor_recall(approx: ArrayLike, exact: ArrayLike) -> float:
    """Mean fraction of the exact k neighbours that the approximate search found (recall@k)."""
    a, e = np.asarray(approx), np.asarray(exact)
    both = np.sort(np.concatenate([a, e], axis=1), axis=1)
    return float((both[:, 1:] == both[:, :-1]).sum() / e.size)
