"""Phase 1 of ``analyze_pair``: a pair checked, its tokens resolved and cut into blocks, its passes planned.

:class:`ResolvedPair` is everything the streaming passes (:mod:`.passes`) and the assembly (:mod:`.assembly`)
need, decided once before the first read of a hidden state.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from hrsa.analyze.accumulators.cross_tile import FLOAT32_SUM_TOKENS
from hrsa.analyze.accumulators.groups import document_groups
from hrsa.analyze.config import MOMENT_METRICS
from hrsa.analyze.pair.checks import check_metrics, check_pair
from hrsa.analyze.metrics.linear_cka import DEBIASED_MIN_TOKENS
from hrsa.analyze.streaming.plan import AnalysisPlan, MemoryBudgetError, PlanInputs, plan_analysis
from hrsa.analyze.streaming.stream import TokenBlock, paired_blocks, token_blocks, with_groups
from hrsa.runtime.locations import is_url
from hrsa.store.errors import UserError
from hrsa.store.reading import cache_bound, streamed_bound

if TYPE_CHECKING:
    from collections.abc import Sequence

    from hrsa.store import ActivationStore, ModelInfo
    from hrsa.store.alignment import TokenPairs
    from hrsa.store.selection import TokenSelection

__all__ = ["DepthWarning", "ResolvedPair", "resolve_pair"]


class DepthWarning(UserWarning):
    """Two models of different depths: their per-layer scores pair hidden states by index, leaving the deeper one's
    last states out."""

_BLOCK_BYTES = 32 << 20  # float64 bytes of one state's block: big enough for fast GEMMs, small next to D^2


@dataclass(frozen=True)
class ResolvedPair:
    """A pair checked and planned: the inputs of the passes and of the assembly.

    Attributes:
        info_a, info_b: the two models; metrics: the metrics asked for, in canonical order.
        debiased, save_rotation: as asked.
        matched: hidden states compared one to one; rows, cols: A's and B's hidden states of the
            cross-layer matrices (empty without them).
        n_tokens: tokens selected; block_tokens: tokens per block; blocks: the selection in blocks.
        plan: the tiles (one pass each) under the memory budget.
        pairs: which token of A is which of B (the same tokens, or aligned by content span).
        n_groups: groups of documents the matched passes keep statistics for (the jackknife's); 0 when none.
    """

    info_a: ModelInfo
    info_b: ModelInfo
    metrics: tuple[str, ...]
    debiased: bool
    save_rotation: bool
    matched: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    n_tokens: int
    block_tokens: int
    blocks: tuple[TokenBlock, ...]
    plan: AnalysisPlan
    pairs: TokenPairs
    n_groups: int = 0


def _warn_of_other_depths(info_a: ModelInfo, info_b: ModelInfo, matched: tuple[int, ...]) -> None:
    """Say that models of different depths are compared index by index (hidden state k of A with k of B), and which
    states of the deeper one no per-layer score covers: left unsaid, a 3-state model against a 7-state one read as a
    whole comparison."""
    if info_a.n_hidden_states == info_b.n_hidden_states:
        return
    deeper = max(info_a, info_b, key=lambda info: info.n_hidden_states)
    left = sorted(set(deeper.hidden_states) - set(matched))
    span = (f"{left[0]}-{left[-1]}" if left and left == list(range(left[0], left[-1] + 1))
            else ", ".join(map(str, left)) or "none")
    warnings.warn(f"{info_a.id} ({info_a.n_hidden_states} hidden states) and {info_b.id} ({info_b.n_hidden_states}) "
                  f"are of different depths: per-layer scores pair hidden state k of one with k of the other, and "
                  f"hidden states {span} of {deeper.id} are in none; --cross-layer compares every state of one with "
                  "every state of the other.", DepthWarning, stacklevel=4)


def resolve_pair(
    store: ActivationStore,
    a: str,
    b: str,
    *,
    metrics: Sequence[str],
    debiased: bool,
    cross_layer: bool,
    selection: TokenSelection,
    memory_budget: int,
    block_tokens: int | None,
    workers: int,
    save_rotation: bool,
    compute_bytes: int,
    groups: int = 0,
    per_worker_budget: bool = False,
    read_threads: int = 1,
    device_budget: int | None = None,
) -> ResolvedPair:
    """Check the pair, resolve its tokens and plan its passes (see ``analyze_pair`` for the arguments).

    Raises:
        UserError: as :func:`check_pair`, an empty selection, too few tokens for debiased CKA, a bad block
            size, or a memory budget too small for one pair.
    """
    # Step 1: the pair itself.
    metrics_t = check_metrics(metrics)
    streaming = bool(set(metrics_t) & set(MOMENT_METRICS))
    info_a, info_b = check_pair(store, a, b, metrics_t)
    # Step 2: the tokens: the same ones, or those whose content spans coincide in both corpora.
    pairs = store.token_pairs(a, b, selection)
    n_tokens = pairs.n_pairs
    if streaming and n_tokens < DEBIASED_MIN_TOKENS:  # two points correlate perfectly, three nearly: any pair scores ~1
        raise UserError(f"Expected at least {DEBIASED_MIN_TOKENS} tokens to compare (CKA, correlations and rotations of "
                        f"fewer are ~1 for any two models, and have no null baseline). Got {n_tokens} instead. "
                        "Loosen the selection.")
    if block_tokens is not None and block_tokens < 1:
        raise UserError(f"Expected a positive block size. Got {block_tokens} instead.")
    # Step 3: what to accumulate.
    matched = tuple(sorted(set(info_a.hidden_states) & set(info_b.hidden_states)))
    needs_matched = streaming and (not cross_layer or bool(set(metrics_t) & set(MOMENT_METRICS) - {"cka", "dimcorr"})
                                   or debiased)
    if needs_matched:
        _warn_of_other_depths(info_a, info_b, matched)
    crossed = cross_layer and bool({"cka", "dimcorr"} & set(metrics_t))
    rows, cols = (tuple(info_a.hidden_states), tuple(info_b.hidden_states)) if crossed else ((), ())
    base = PlanInputs(
        matched=matched if needs_matched else (), rows=rows, cols=cols, dx=info_a.hidden_size, dy=info_b.hidden_size,
        read_bytes_a=_itemsize(info_a), read_bytes_b=_itemsize(info_b), compute_bytes=compute_bytes, n_tokens=n_tokens,
        block_tokens=0, n_blocks=0, workers=workers, memory_budget=memory_budget, per_worker=per_worker_budget,
        read_threads=read_threads, device_budget=device_budget,
    )
    # Step 4: blocks and tiles, chosen together: a given block size is planned as it is; by default, one shard, ~32 MB
    # of float64 per state and its halvings down to 64 tokens are planned, and the plan that keeps every group of
    # documents, then has the least projected time (its reads and its products: projected_seconds), then has the
    # largest blocks, wins.
    offsets = store.corpus_tokens(info_a.corpus).doc_offsets if needs_matched and groups >= 2 else None
    layout = _Layout(pairs, base, offsets, groups if needs_matched else 0, info_a, info_b)
    if block_tokens and compute_bytes < 8 and block_tokens > FLOAT32_SUM_TOKENS:
        raise UserError(f"Expected a block of at most {FLOAT32_SUM_TOKENS} tokens with float32 products (a float32 sum "
                        f"over more tokens loses precision). Got {block_tokens} instead. Pass a smaller block, or "
                        "--compute-dtype float64.")
    candidates = [block_tokens] if block_tokens else _candidate_block_tokens(info_a, info_b, compute_bytes)
    options, refusals = _plans(layout, candidates, least_passes=int(bool(base.matched)) + int(bool(rows)))
    if not options:  # the least budget of the sizes tried: the one a user can pass
        raise min(refusals, key=lambda refusal: (refusal.need == 0, refusal.need))
    remote = is_url(store.url)
    size, blocks, plan = min(options, key=lambda o: (o[2].inputs.groups < o[2].groups_asked,
                                                     projected_seconds(o[2], remote=remote), -o[0]))
    n_groups = plan.inputs.groups
    return ResolvedPair(info_a, info_b, metrics_t, debiased, save_rotation, matched, rows, cols, n_tokens, size, blocks,
                        plan, pairs, n_groups)


#: What a plan's block size is chosen by (:func:`projected_seconds`), fitted to hrsa's own passes ((e) of
#: benchmarks/analyze.py on 2 cores, six block sizes at 1.1 GB, 2026-12-05): a store's bytes read, decoded and centred
#: (0.73-0.84 GB/s from a local disk or the page cache; object storage taken 10x slower), the products (float32 and
#: float64 on the CPU, on a GPU), and how much slower thin blocks make them: a GEMM of K tokens updates its D x D sums
#: once per K tokens, ~1 + THIN_BLOCK / K times the thick one's time (blocks of 144 tokens against 288, both 5 passes:
#: 58.7 s against 52.9). Rough rates: only their ratios decide, between reading more and multiplying slower.
READ_BYTES_PER_S = {"local": 1e9, "remote": 1e8}
PRODUCT_FLOPS = {4: 3e11, 8: 1.4e11, "gpu": 5e13}
THIN_BLOCK = 45


def projected_seconds(plan: AnalysisPlan, *, remote: bool = False) -> float:
    """A plan's rough time, by which the block size is chosen: its reads of the store (each pass reads its tiles'
    states again) and its products, slower in thin blocks. Fewest passes first chose blocks of 288 tokens and 5 passes
    for (e) at 1.1 GB, which read 8.57 GB (its tiles read more states each): 50.6-55.1 s, against 45.2-46.1 s in
    blocks of 1,024 and 6 passes that read 7.14 GB."""
    p = plan.inputs
    rate = PRODUCT_FLOPS["gpu"] if p.device_budget is not None else PRODUCT_FLOPS[8 if p.compute_bytes >= 8 else 4]
    reads = plan.bytes_read() / READ_BYTES_PER_S["remote" if remote else "local"]
    return reads + plan.product_flops() / rate * (1 + THIN_BLOCK / p.block_tokens)


@dataclass(frozen=True)
class _Layout:
    """The selected tokens cut into blocks of one size (and into groups of documents), and their plan."""

    pairs: TokenPairs
    base: PlanInputs
    offsets: np.ndarray | None  # the corpus's document offsets when groups are kept
    groups: int
    info_a: ModelInfo
    info_b: ModelInfo

    def plan(self, size: int) -> tuple[int, tuple[TokenBlock, ...], AnalysisPlan]:
        """``(size, blocks, plan)``; fewer groups when the budget holds fewer (the documents are cut again).

        Raises:
            MemoryBudgetError: one pair does not fit at this size.
        """
        pairs = self.pairs
        raw = tuple(token_blocks(pairs.rows_a, size) if pairs.identical else paired_blocks(pairs.rows_a, pairs.rows_b, size))
        held = max(block.n_rows for block in raw)  # what a block holds: less than the grid's size for few tokens
        decoded = _decoded_rows(raw, size, self.info_a.n_tokens)
        w = 1 if self.base.per_worker else self.base.workers  # readers that share one budget
        if pairs.identical and isinstance(pairs.rows_a, slice):  # runs of rows: read forward, a block's bytes at a time
            base = replace(self.base, decoded_tokens_a=decoded[0], decoded_tokens_b=decoded[1], cache_bytes_a=_streamed_bytes(self.info_a, w), cache_bytes_b=_streamed_bytes(self.info_b, w))
            return self._grouped(size, raw, held, base)
        cache_b = _cache_bytes(self.info_b, w, size if pairs.identical else 0)  # aligned rows of B come in any range
        base = replace(self.base, decoded_tokens_a=decoded[0], decoded_tokens_b=decoded[1],
                       cache_bytes_a=_cache_bytes(self.info_a, w, size), cache_bytes_b=cache_b)
        if not self.base.per_worker and len(raw) == -(-self.info_a.n_tokens // size) and pairs.identical:
            # one worker reading every block of the grid in order reads each shard whole: it holds fewer
            lone = (_cache_bytes(self.info_a, 1, size, True), _cache_bytes(self.info_b, 1, size, True))
            base = replace(base, lone_cache_bytes=lone)
        return self._grouped(size, raw, held, base)

    def _grouped(self, size: int, raw: tuple[TokenBlock, ...], held: int,
                 base: PlanInputs) -> tuple[int, tuple[TokenBlock, ...], AnalysisPlan]:
        pairs = self.pairs
        wanted, possible = self.groups, None  # possible: the groups the documents allow (at most those asked)
        while True:
            starts = None if self.offsets is None else _group_starts(self.offsets, pairs.rows_a, wanted)
            blocks = raw if starts is None else tuple(with_groups(raw, size, starts))
            n_groups = 0 if starts is None else int(starts.size)
            possible = n_groups if possible is None else possible
            plan = plan_analysis(replace(base, block_tokens=held, n_blocks=len(blocks), groups=n_groups))
            if plan.inputs.groups >= n_groups:
                return size, blocks, replace(plan, groups_asked=possible, groups_wanted=self.groups)
            wanted = plan.inputs.groups  # the budget holds fewer groups: cut the documents again


def _decoded_rows(blocks: Sequence[TokenBlock], size: int, n_tokens: int) -> tuple[int, int]:
    """The most rows one read of a block decodes for A and for B (StateReader.read): a run of rows reads just those
    rows, other rows are picked out of the whole grid block (of A's ``n_tokens``), and B's rows aligned by content
    span out of the range they cover."""
    a = max(block.n_rows if isinstance(block.rows, slice) else min(size, n_tokens - block.index * size)
            for block in blocks)
    b = max(block.rows_b[1] - block.rows_b[0] if block.rows_b is not None else 0 for block in blocks)
    return a, b or a


def _plans(layout: _Layout, sizes: list[int], least_passes: int = 0) -> tuple[
        list[tuple[int, tuple[TokenBlock, ...], AnalysisPlan]], list[MemoryBudgetError]]:
    """The plans of the block sizes (largest first) whose one pair fits the budget, and the refusals of the others;
    none smaller once one keeps every group in ``least_passes`` passes (a smaller block can only tie it, and cutting
    ten million tokens into blocks of 64 takes seconds)."""
    options, refusals = [], []
    for size in sizes:
        try:
            options.append(layout.plan(size))
        except MemoryBudgetError as refusal:
            refusals.append(refusal)
            continue
        plan = options[-1][2]
        if plan.passes <= least_passes and plan.inputs.groups >= plan.groups_asked:
            break
    return options, refusals


def _candidate_block_tokens(info_a: ModelInfo, info_b: ModelInfo, compute_bytes: int = 8) -> list[int]:
    """One shard (each shard read once and dropped: the reader holds no cache), the default block size, the halvings
    of the shard shared by both stores down to D tokens, then blocks of D tokens (or the shard, if less) and their
    halvings down to 64 (a hidden size under 64: D tokens). Blocks that divide the shard never straddle two shards,
    so a reader going through every block holds one shard per state, not two (:func:`cache_bound`): at tight
    budgets that is room for larger tiles. Blocks under D tokens cost more in Chan merges (O(D^2) per pair and block,
    memory-bound) than their products (O(n D^2)), but each pass they save reads the selection again: the planner
    weighs both (:func:`projected_seconds`) over all sizes."""
    floor = max(64, info_a.hidden_size, info_b.hidden_size)
    chunk = max(info_a.layout.chunk_tokens, info_b.layout.chunk_tokens)
    shard = math.gcd(info_a.layout.shard_tokens, info_b.layout.shard_tokens)
    sizes = {info_a.layout.shard_tokens, _default_block_tokens(info_a, info_b)}
    size = shard
    while size >= floor and size % chunk == 0:
        sizes.add(size)
        size //= 2
    if compute_bytes < 8:  # a block is one GEMM: its float32 sum must cover no more than FLOAT32_SUM_TOKENS tokens
        sizes = {s for s in sizes if s <= FLOAT32_SUM_TOKENS} or {FLOAT32_SUM_TOKENS}  # chunks may be larger
    small = min(min(sizes), max(info_a.hidden_size, info_b.hidden_size))
    sizes.add(small)
    while small > 64:  # a tight budget: blocks under D tokens may hold more pairs a pass
        small = max(64, small // 2)
        sizes.add(small)
    return sorted(sizes, reverse=True)


def _group_starts(doc_offsets: np.ndarray, rows: slice | np.ndarray, n_groups: int) -> np.ndarray | None:
    """The first selected token of each group of whole documents (:func:`document_groups`); None below 2 groups."""
    if n_groups < 2:
        return None
    if isinstance(rows, slice):  # per document, not per token: a slice may cover a whole corpus
        lo = np.clip(doc_offsets[:-1], rows.start or 0, rows.stop)
        counts = np.clip(doc_offsets[1:], rows.start or 0, rows.stop) - lo
        firsts, counts = lo[counts > 0], counts[counts > 0]
    else:
        tokens = np.unique(rows)  # the order the blocks read them
        doc = np.searchsorted(doc_offsets, tokens, side="right") - 1
        first = np.flatnonzero(np.r_[True, np.diff(doc) != 0])
        firsts, counts = tokens[first], np.diff(np.r_[first, tokens.size])
    group = document_groups(counts, n_groups)
    if group.size == 0 or group[-1] < 1:
        return None
    return firsts[np.r_[True, np.diff(group) != 0]]


def _default_block_tokens(info_a: ModelInfo, info_b: ModelInfo) -> int:
    """A whole number of both stores' chunks, ~32 MB of float64 per state, at most one shard."""
    chunk = max(info_a.layout.chunk_tokens, info_b.layout.chunk_tokens)
    shard = max(info_a.layout.shard_tokens, info_b.layout.shard_tokens)
    target = _BLOCK_BYTES // (8 * max(info_a.hidden_size, info_b.hidden_size))
    return max(chunk, min(shard, target) // chunk * chunk)


def _cache_bytes(info: ModelInfo, workers: int, block_tokens: int, every_block: bool = False) -> int:
    """What the store's reader may hold in shard objects per hidden state of ``info`` (:func:`cache_bound`)."""
    return cache_bound(shard_tokens=info.layout.shard_tokens, chunk_tokens=info.layout.chunk_tokens,
                       n_tokens=info.n_tokens, row_bytes=info.hidden_size * _itemsize(info), readers=workers,
                       block_tokens=block_tokens, every_block=every_block)


def _streamed_bytes(info: ModelInfo, workers: int) -> int:
    """What the store's streamed readers hold per hidden state of ``info`` (:func:`streamed_bound`)."""
    return streamed_bound(shard_tokens=info.layout.shard_tokens, chunk_tokens=info.layout.chunk_tokens,
                          row_bytes=info.hidden_size * _itemsize(info), readers=workers)


def _itemsize(info: ModelInfo) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(info.dtype, 4)
