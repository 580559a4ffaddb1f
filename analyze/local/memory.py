"""Memory models of the local metrics (k-NN overlap, probes): bytes held at once, checked before any read.

Each pass is sized from what is known before a hidden state is read (sample size, hidden size, stored dtype,
the store's shards, documents), its block sizes are the largest that fit ``--memory-budget``, and a pass that
cannot fit raises :class:`MemoryBudgetError` naming the fix. All counts are upper bounds in bytes; the tests
measure the real peak (tracemalloc) under them. FAISS's own buffers (C++, invisible to tracemalloc) are counted
too. Notation: n sampled tokens, D hidden size, r bytes per stored value, k the largest k, c = k + 1 + 8
candidates per query, Q and B query and database rows per block, s = min(Q, 4096) queries per FAISS call,
S tokens per shard (at most the store's tokens), G documents in the sample.

Exact k-NN, one model at a time (:meth:`KnnPass.search_bytes`)::

    search(Q, B) = Q (D r + 16 c + 16)                 query block as stored; running candidates, norms, positions
                 + B (4 D + 16) + [n > Q] B D r         centred float32 database rows, norms, positions (+ the block
                                                        as stored when it is not the query block)
                 + s (max(16 D + 24 c, 112 c) + 64)     a sub-block: float64 unit rows (with the previous sub-block's
                                                        candidates), or candidates being merged (both lists, sort order)
                 + 64 D (c (r + 8) + 8) + 4 s min(B, 1024)   candidate rows gathered for float64 re-ranking;
                                                        FAISS's BLAS scratch (C++; only on its BLAS path)
                 + 8 S D r + 24 Q                       reading: the store's 4 cached verified shards, one being
                                                        fetched, a piece decoded and its rows (7.1 shards measured);
                                                        the read's index arrays
                 + 16 S D r + 16 s D                    freed buffers glibc keeps resident: those under its mmap
                                                        threshold, which it raises up to 32 MiB (shards, float64
                                                        sub-blocks), stay in its heaps. Invisible to tracemalloc; in
                                                        RSS, 160 MB above the live peak at 200k tokens of D = 576 in
                                                        19 MB shards, 250 MB at 1M (both under this term)

and around the searches, for the whole pass (:meth:`KnnPass.held_bytes`, :meth:`KnnPass.overlap_bytes`)::

    held    = 16 n k + 24 n + selection             A's neighbours during B's search, B's; sample ids, documents
    overlap = n (34 k + 72) + 32 G + min(8000 G, 4 MiB)   per-token Jaccard (2k ids a row sorted), bootstrap
                                                    (np.unique of the documents, per-document sums, weights)
    peak    = held + max(search(Q, B), overlap) + 2 MiB (Python objects, Dask graphs)

The sample is read block by block (Q = B = the largest block that fits): once when one block holds it, else
``ceil(n / Q)`` times (each query block scans every database block); more than :data:`MAX_SAMPLE_READS`
reads is refused as not fitting. HNSW holds the whole sample (a graph needs every row), its float32 centred
rows, FAISS's copy of them and the graph (m links a row on upper levels, 2m on level 0), a visited table of n
bytes per search thread, and the sub-block terms above::

    hnsw = n (D r + 8 D + 12 m + 16 c + 40 + threads) + sub-block terms

Probes (:class:`ProbePass`), M documents of N corpus tokens, T tokens pooled per block::

    probe = 48 M D + 256 M + 48 N + T (D (r + 24) + 24) + 24 S D r + 2 MiB

48 M D: the (M, D) float64 features, at most 6 copies at once (measured 5: while B pools, A's features, B's sums
and its labelled rows; in the fit, both models' features, their standardised copies and a split's rows);
256 M: labels and per-document arrays; 48 N: the kept-token mask, its running count and the selection;
T (D (r + 24) + 24): a block as stored, its float64 copy, its kept rows and their sums; 24 S D r: reading and
the freed shard-sized buffers glibc keeps resident, as for k-NN.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from hrsa.analyze.local.knn_search import FAISS_SUB_BLOCK, RERANK_ROWS, TIE_MARGIN, faiss_scratch_bytes
from hrsa.analyze.streaming.plan import MemoryBudgetError, format_bytes

__all__ = ["MAX_SAMPLE_READS", "KnnBlocks", "KnnPass", "ProbePass", "bytes_per_value", "plan_knn", "plan_probe"]

MAX_SAMPLE_READS = 8  # reads of a model's sample per hidden state before a k-NN pass counts as not fitting
_SHARD_READS = 8  # the store's 4 cached verified shards, one being fetched, the piece decoded, its kept rows (7.1 measured)
_SHARDS_RETAINED = 16  # freed shard-sized buffers glibc keeps resident (RSS), with 16 s D bytes of float64 sub-blocks
_BOOTSTRAP_CHUNK = 4 << 20  # replicate weights of the document bootstrap drawn at once (see bootstrap.py)
_SLACK = 2 << 20  # Python objects, Dask graphs, small arrays
_MIN_POOL_TOKENS = 256  # fewer tokens per pooling block than this is refused as not fitting
_POOL_TOKENS = 1 << 16  # tokens per pooling block when the budget allows


def bytes_per_value(dtype: str) -> int:
    """Bytes per value a model's hidden states are read in (its stored dtype: bf16 reads as bf16)."""
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4)


@dataclass(frozen=True)
class KnnPass:
    """What a k-NN pass over both models holds (see the module docstring).

    Attributes:
        n: sampled tokens; d: the larger hidden size; read_bytes: the larger bytes per stored value;
        k: the largest k; shard_tokens: the larger shard; n_docs: documents of the sample;
        selection: bytes of the token index arrays held besides the sample; search: "exact" or "hnsw".
    """

    n: int
    d: int
    read_bytes: int
    k: int
    shard_tokens: int
    n_docs: int
    selection: int = 0
    search: str = "exact"

    @property
    def candidates(self) -> int:
        return self.k + 1 + TIE_MARGIN

    def _sub_block(self, q: int, b: int) -> int:
        s, c, d, r = min(q, FAISS_SUB_BLOCK), self.candidates, self.d, self.read_bytes
        rerank = RERANK_ROWS * d * (c * (r + 8) + 8) + faiss_scratch_bytes(s, b)
        reading = _SHARD_READS * self.shard_tokens * d * r + 24 * q
        retained = _SHARDS_RETAINED * self.shard_tokens * d * r + 16 * s * d
        return s * (max(16 * d + 24 * c, 112 * c) + 64) + rerank + reading + retained

    def search_bytes(self, q: int, b: int) -> int:
        """Bytes of one model's exact search with query blocks of q rows and database blocks of b rows."""
        q, b = min(q, self.n), min(b, self.n)
        d, r, c = self.d, self.read_bytes, self.candidates
        database = b * (4 * (d + 1) + 16) + (b * d * r if self.n > q else 0)  # centred rows and shift . c
        return q * (d * r + 16 * c + 16) + database + self._sub_block(q, b)

    def hnsw_bytes(self, m: int = 32) -> int:
        """Bytes of one model's HNSW search (every row held, the graph, its re-ranking and recall queries)."""
        n, d, r, c = self.n, self.d, self.read_bytes, self.candidates
        threads = os.cpu_count() or 1  # FAISS keeps a visited table of n bytes per search thread
        return n * (d * r + 8 * d + 12 * m + 16 * c + 40 + threads) + self._sub_block(n, n)

    def held_bytes(self) -> int:
        return 16 * self.n * self.k + 24 * self.n + self.selection

    def overlap_bytes(self) -> int:
        bootstrap = 32 * self.n_docs + min(8000 * self.n_docs, _BOOTSTRAP_CHUNK)
        return self.n * (34 * self.k + 72) + bootstrap

    def peak(self, q: int, b: int) -> int:
        """Estimated peak bytes of the pass with blocks of q query rows and b database rows."""
        search = self.hnsw_bytes() if self.search == "hnsw" else self.search_bytes(q, b)
        return self.held_bytes() + max(search, self.overlap_bytes()) + _SLACK


@dataclass(frozen=True)
class KnnBlocks:
    """Block sizes of a k-NN pass that fits the budget, and its estimated peak.

    Attributes:
        query_block, db_block: rows per block; sample_reads: reads of a model's sample per hidden state;
        estimated_peak: bytes (:meth:`KnnPass.peak`); memory_budget: bytes.
    """

    query_block: int
    db_block: int
    sample_reads: int
    estimated_peak: int
    memory_budget: int


def plan_knn(size: KnnPass, memory_budget: int, *, query_block: int | None = None,
             db_block: int | None = None) -> KnnBlocks:
    """The largest blocks (query block = database block, at most the caps given) whose pass fits the budget.

    Raises:
        MemoryBudgetError: the pass needs more than ``MAX_SAMPLE_READS`` reads of the sample (exact), or the
            whole sample does not fit (hnsw); before anything is read.
    """
    q_cap, b_cap = min(query_block or size.n, size.n), min(db_block or size.n, size.n)
    rows = _largest(min(max(q_cap, b_cap), size.n), lambda t: size.peak(min(t, q_cap), min(t, b_cap)) <= memory_budget)
    q, b = min(rows, q_cap), min(rows, b_cap)
    fewest = math.ceil(size.n / MAX_SAMPLE_READS)  # the smallest query block the budget may force
    if rows == 0 or (q < q_cap and q < fewest) or (size.search == "hnsw" and size.peak(q, b) > memory_budget):
        need = size.peak(min(q_cap, fewest), min(b_cap, fewest))
        raise MemoryBudgetError(
            f"Expected a memory budget of at least {_at_least(need)} for k-NN on {size.n} sampled tokens of "
            f"D={size.d} ({size.search} search, the sample read at most {MAX_SAMPLE_READS} times). Got "
            f"{format_bytes(memory_budget)} instead. {_knn_fix(size, memory_budget, need)}"
        )
    return KnnBlocks(q, b, math.ceil(size.n / q), size.peak(q, b), memory_budget)


def _knn_fix(size: KnnPass, memory_budget: int, need: int) -> str:
    """The one-line fix: a sample that fits, or a larger budget."""
    def fits(n: int) -> bool:
        smaller = replace(size, n=n, n_docs=min(size.n_docs, n))
        rows = max(1, math.ceil(n / MAX_SAMPLE_READS)) if size.search == "exact" else n
        return smaller.peak(rows, rows) <= memory_budget

    n_fit = _largest(size.n - 1, fits)
    sample = f"--knn-sample {n_fit} or " if n_fit > size.k else ""
    return f"Use {sample}--memory-budget {_at_least(need).replace(' ', '')}."


@dataclass(frozen=True)
class ProbePass:
    """What a probe pass holds: M documents pooled ("mean" or "last") from N tokens of hidden size D (see the
    module docstring)."""

    n_docs: int
    n_tokens: int
    d: int
    read_bytes: int
    shard_tokens: int
    pool: str = "mean"

    def peak(self, pool_tokens: int) -> int:
        m, d, r = self.n_docs, self.d, self.read_bytes
        rows = min(pool_tokens, m) if self.pool == "last" else pool_tokens  # "last" reads one row per document
        pooling = rows * (d * (r + 24) + 24) + (_SHARD_READS + _SHARDS_RETAINED) * self.shard_tokens * d * r
        return 48 * m * d + 256 * m + 48 * self.n_tokens + pooling + _SLACK


def plan_probe(size: ProbePass, memory_budget: int) -> tuple[int, int]:
    """(tokens pooled per block, estimated peak bytes): the largest block that fits.

    Raises:
        MemoryBudgetError: not even a block of 256 tokens fits; before anything is read.
    """
    cap = min(_POOL_TOKENS, max(size.n_tokens, 1))
    tokens = _largest(cap, lambda t: size.peak(t) <= memory_budget)
    if tokens < min(_MIN_POOL_TOKENS, cap):
        need = size.peak(min(_MIN_POOL_TOKENS, cap))
        raise MemoryBudgetError(
            f"Expected a memory budget of at least {_at_least(need)} for probes on {size.n_docs} documents of "
            f"D={size.d} (their pooled features in float64). Got {format_bytes(memory_budget)} instead. "
            f"Use --memory-budget {_at_least(need).replace(' ', '')} or fewer documents (--docs)."
        )
    return tokens, size.peak(tokens)


def _largest(limit: int, ok: Callable[[int], bool]) -> int:
    """The largest t in 1..limit with ok(t) (ok is monotone: true, then false), 0 if none."""
    lo, hi = 0, max(limit, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _at_least(n: int) -> str:
    """``n`` bytes rounded *up* to the three digits format_bytes prints, so that the budget it names fits."""
    step = 10 ** max(0, int(math.log10(max(n, 1))) - 2)
    return format_bytes(-(-n // step) * step)
