"""Which accumulators to hold at once: tiles of layer pairs that fit a memory budget.

Every tile is one streaming pass over the selected tokens. Three kinds:

- ``matched``: hidden state k of A against hidden state k of B, full :class:`Moments` per pair
  (C_xx, C_yy, C_xy: everything dimension-wise correlation, CKA, debiased CKA and Procrustes need).
- ``cross``: a rectangle of the (L+1) x (L+1) grid of A's states against B's, one
  :class:`CrossMoments` (C_xy only) per pair. Square-ish rectangles read the fewest states per pass.
- ``self``: states against themselves (C_xx of A's, C_yy of B's), once per state, for the CKA
  denominators and the variances of dimension-wise correlation in the cross-layer matrices.

Memory model: an upper bound, in bytes, of what one tile's pass holds at its peak (``AnalysisPlan.estimate``;
``estimated_peak`` is the largest tile's). With ``W`` segment tasks at once, ``n`` = block_tokens, ``D_s`` and
``r_s`` the hidden size and stored bytes per value of state s, ``c`` the compute bytes (``c' = c`` for float32
products, 0 for float64: no cast copy), ``I`` the largest accumulator of the tile, ``M = max(Dx, Dy)``::

    peak = max(W * (h A + B + S), g A + F) + C      h = g = 1 without groups of documents (below)

    A = sum of item(pair) over the tile      its accumulators (:meth:`_MemoryModel.item`: one pair's), one copy
                                             per worker while streaming, one after the merge
    B = 2 sum_s n D_s r_s + 3 sum_{T largest s} n'_s D_s r_s
                                             each state's block in use and the next one read ahead; the reads'
                                             own buffers, T states at a time (``read_threads``; Zarr's output and
                                             the shard's decoded part, Dask's copy: measured 3.1 blocks a read),
                                             of the n'_s >= n rows a read decodes (``decoded_tokens_a/b``: the
                                             whole grid block a selection of rows is picked from)
    S = the block statistics, the largest of their steps:
        matched:      n (max(8 (Dx + Dy) + 8 M, (8 + c') (Dx + Dy)) + 16) + 2 I + c' M^2
                      (a state's float64 and centred copies beside the other's centred one; or both centred and
                      cast; the row norms), the previous pair's block statistics and those being built, the cast
                      product; or the Chan merge: 2 I + 8 M^2 (block part and new total beside the old one in A,
                      and the rank-one temporary)
        cross, self:  n c (sum_rows D_x + sum_cols D_y) + 16 n max_s D_s + c' (sum_rows D_x)(sum_cols D_y)
                      + sum_selfs c' D^2 + n c max_s D_s
                      (a cross-layer tile's row and column states centred and cast side by side (none for a self
                      tile), the float64 and centred copies of the one being centred (torch's; numpy centres by one
                      subtraction into the slot), the running float32 sum of the GEMMs (none for float64 products:
                      they sum into the total; merges are in place: CrossTileMoments); the self co-moments, from the
                      same centred blocks or one state at a time: their running float32 sums, one state's copy)
        other cross:  n c sum_s D_s + max(n (16 - c) max_s D_s + I, 2 I + 8 max D_x D_y)
                      (cross pairs that do not make a rectangle, pair by pair: every state of the tile centred and
                      cast once per block, the float64 and centred copies of the one being centred; then each pair's
                      product and merge, as above)
    F = 13 * 8 M^2 for a matched tile, 0 otherwise
                                             finishing one pair: the largest of the metrics from Moments, CCA,
                                             SVCCA and PWCCA (measured 12.5 D^2 float64; Procrustes' SVD 7.6,
                                             regression 7.0, the others 1 or less)
    C = sum_s cache_bytes_s                  what the store's readers keep per state: for runs of tokens, each
                                             segment's shard stream (an index and two chunks: store.reading.
                                             streamed_bound); else cached whole shard objects (cache_bound),
                                             shared by the workers, for as long as the tile's reader lives

Measured against real passes (tests/analyze/test_memory_model.py: numpy by tracemalloc, torch by the resident
set of a subprocess), a tile's peak is 0.55-0.85 of its estimate with one worker and 0.4-0.65 with two (both
workers rarely peak at once) at D = 96 and blocks of 512 tokens; up to 0.99 at D = 48 and blocks of 1024. Outside
the budget, as the interpreter and its libraries are: the Python objects each worker has in flight (a block
read's Dask graph, Zarr's requests: about 0.1 MB + 12 kB per stored chunk of a block, whatever D). Not counted
yet: Procrustes rotations kept with ``save_rotation`` (D^2 per matched layer, for the run).

Per-worker budgets (``per_worker``, Ray tasks: each segment, merge and finish runs in its own worker process): W = 1
in the streaming term, whatever the workers, and h = G. A merge task holds the merged output beside its inputs,
which stay in Ray's object store (outside the budget, as Ray accounts it apart); its rank-one corrections go in
place, so one copy of A is all it allocates (tests/analyze/test_memory_model.py measures the merge, and every task on
Ray against this estimate).

Products on a GPU (``device_budget``: its free memory): a stacked tile's stacks, run sum and float64 sums must fit
there too (:meth:`_MemoryModel.device_peak`), and a pass of one segment keeps them there and reduces them there to the
metrics' summaries, so the host holds B + C alone for it (:meth:`_MemoryModel.sums_on_device`).

Groups of documents (``groups`` G >= 2, matched tiles: the jackknife's per-group accumulators): a worker holds the
groups its segment touches, h = min(G, ceil(G / W) + 1) copies of A, the merged pass g = G copies, and finishing a pair adds
the total and one leave-one-group-out statistics (2 I) to F.

When even one pair does not fit with ``W`` workers, the plan falls back to one worker before it gives up.

Pure Python: the planner runs before any Dask graph exists, and the memory budget parser lives here too.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

from hrsa.analyze.accumulators.cross_tile import device_sum_headroom
from hrsa.store.errors import UserError

__all__ = [
    "AnalysisPlan",
    "MemoryBudgetError",
    "PlanInputs",
    "StreamKey",
    "StreamPair",
    "Tile",
    "TileKind",
    "format_bytes",
    "parse_memory_budget",
    "plan_analysis",
]

#: One hidden state to stream: ("a", hidden-state index) or ("b", hidden-state index).
StreamKey = tuple[str, int]
#: Two stream keys whose accumulator a tile holds (not a pair of models: A's state i against B's state j,
#: or a state against itself in a ``self`` tile).
StreamPair = tuple[StreamKey, StreamKey]
TileKind = Literal["matched", "cross", "self"]

#: Buffers of one block read besides the block itself, in blocks (Zarr's output and shard part, Dask's copy).
_READ_COPIES = 3
#: float64 D x D matrices alive while a matched pair is finished (CCA, SVCCA, PWCCA: measured 12.5).
_FINISH_SQUARES = 13

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class MemoryBudgetError(UserError, ValueError):
    """The memory budget cannot hold even one pair's accumulators."""

    def __init__(self, message: str, need: int = 0) -> None:
        super().__init__(message)
        self.need = need  # the least budget, in bytes, this refusal asked for (0: not one of the host's)


@dataclass(frozen=True)
class Tile:
    """One streaming pass: the stream pairs whose accumulators are held together."""

    kind: TileKind
    pairs: tuple[StreamPair, ...]

    @property
    def streams(self) -> tuple[StreamKey, ...]:
        """The hidden states this pass reads, each once per block."""
        return tuple(sorted({key for pair in self.pairs for key in pair}))

    @property
    def rectangle(self) -> tuple[tuple[StreamKey, ...], tuple[StreamKey, ...]] | None:
        """A cross tile's row states and column states when its A-against-B pairs are every row against every column
        (as the planner makes them, in that order); None otherwise. Its :attr:`selfs` ride along."""
        crossed = tuple(p for p in self.pairs if p[0] != p[1])
        rows = tuple(dict.fromkeys(a for a, _ in crossed))
        cols = tuple(dict.fromkeys(b for _, b in crossed))
        if self.kind != "cross" or not crossed or crossed != tuple((a, b) for a in rows for b in cols):
            return None
        return rows, cols

    @property
    def selfs(self) -> tuple[StreamPair, ...]:
        """The self co-moments (a state against itself): a self tile's, or a cross tile's of states it reads anyway
        (no pass of their own)."""
        return tuple(p for p in self.pairs if p[0] == p[1]) if self.kind in ("cross", "self") else ()


@dataclass(frozen=True)
class PlanInputs:
    """What the planner needs to know about the pair of models and the run.

    Attributes:
        matched: hidden states compared one to one (k of A against k of B); empty for no matched pass.
        rows, cols: A's and B's hidden states of the cross-layer matrices; empty for no cross-layer pass.
        dx, dy: hidden sizes of A and B.
        read_bytes_a, read_bytes_b: bytes per stored value (2 for bf16, 4 for float32).
        compute_bytes: bytes per value of the products (4 for float32, 8 for float64).
        n_tokens: selected tokens; block_tokens: most tokens a block holds; n_blocks: blocks per pass.
        workers: segment tasks run at once.
        memory_budget: bytes.
        groups: groups of documents a matched pair keeps one Moments for (the jackknife's); 0 for none.
        cache_bytes_a, cache_bytes_b: bytes the store's reader keeps per hidden state of A, of B while a tile's
            pass reads it (its cached shard objects); 0 when the caller's reader keeps nothing beyond the blocks.
        lone_cache_bytes: the same for one worker, when it keeps fewer (it reads each shard whole, in order); None:
            as for several.
        per_worker: the budget is each worker's own (Ray tasks, each in its own process: one segment's copy of the
            accumulators per budget, whatever the workers); False: one process's, shared by its ``workers`` threads.
        read_threads: threads that read one segment's states of a block at once, each with its own buffers.
        device_budget: bytes the GPU the products run on has free for them (None: products on the CPU, or on
            workers whose GPUs this process does not see): a cross-layer tile's stacked blocks, product sum and
            float64 device sum must fit there too (see :meth:`_MemoryModel.device_peak`).
        decoded_tokens_a, decoded_tokens_b: the most rows one read of a block decodes for a state of A, of B, when
            more than the block keeps (0: ``block_tokens``): a selection that is not a run of rows picks its rows out
            of the whole grid block, and B's rows aligned by content span out of the range they cover.
    """

    matched: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    dx: int
    dy: int
    read_bytes_a: int
    read_bytes_b: int
    compute_bytes: int
    n_tokens: int
    block_tokens: int
    n_blocks: int
    workers: int
    memory_budget: int
    groups: int = 0
    cache_bytes_a: int = 0
    cache_bytes_b: int = 0
    per_worker: bool = False
    lone_cache_bytes: tuple[int, int] | None = None  # (A, B) when one worker reads: it may hold fewer shards
    read_threads: int = 1
    device_budget: int | None = None
    decoded_tokens_a: int = 0
    decoded_tokens_b: int = 0


@dataclass(frozen=True)
class AnalysisPlan:
    """The tiles, in the order they run, with the memory estimate that chose them."""

    tiles: tuple[Tile, ...]
    inputs: PlanInputs
    workers: int
    estimated_peak: int
    groups_asked: int = 0  # groups the selection's documents make (at most --groups); ``inputs.groups`` those the budget holds
    groups_wanted: int = 0  # --groups as given: more than ``groups_asked`` when there are fewer (or long) documents

    @property
    def passes(self) -> int:
        """Streaming passes over the tokens (one per tile)."""
        return len(self.tiles)

    def count(self, kind: TileKind) -> int:
        return sum(t.kind == kind for t in self.tiles)

    def sums_on_device(self, tile: Tile) -> bool:
        """Whether the tile's pass keeps its sums on the GPU, so that the plan counted none of them on the host."""
        return _MemoryModel(self.inputs, self.workers).sums_on_device(tile)

    def estimate(self, tile: Tile) -> int:
        """The memory model's peak of one tile's pass, in bytes (``estimated_peak`` is the largest)."""
        return _MemoryModel(self.inputs, self.workers).peak(tile)

    def mmap_threshold(self) -> int:
        """glibc's mmap threshold for the passes (:func:`hrsa.runtime.resident.map_large_allocations`): a block of the
        narrower state as read, capped at 1 MB, at least 64 kB. The model counts the arrays alive; a freed block under
        the threshold stays in the heaps of the threads that read and fold it, and the resident set outgrows the
        model: a matched pass with 8 groups, D = 384, blocks of 256 tokens (393-786 kB), peaked 6-12% over its
        estimate at 1 MB, under it at this threshold."""
        p = self.inputs
        block = p.block_tokens * min(p.dx * p.read_bytes_a, p.dy * p.read_bytes_b)
        return max(64 << 10, min(1 << 20, block))

    def product_flops(self) -> float:
        """Floating-point operations of the passes' products (2 n D_x D_y per co-moment matrix a block adds)."""
        p, dim = self.inputs, {"a": self.inputs.dx, "b": self.inputs.dy}
        total = 0
        for tile in self.tiles:
            for (s, _), (t, _) in tile.pairs:
                matrices = dim[s] * dim[s] + dim[t] * dim[t] + dim[s] * dim[t] if tile.kind == "matched" else dim[s] * dim[t]
                total += matrices
        return 2.0 * p.n_tokens * total

    def bytes_read(self) -> int:
        """Bytes of activations the passes read from the store (each tile reads each of its states once)."""
        p = self.inputs
        per_state = {"a": p.dx * p.read_bytes_a, "b": p.dy * p.read_bytes_b}
        return sum(p.n_tokens * per_state[s] for tile in self.tiles for s, _ in tile.streams)

    def selection_bytes(self) -> int:
        """Bytes of every hidden state the plan reads, once: what one read of the selection costs."""
        p = self.inputs
        states = {key for tile in self.tiles for key in tile.streams}
        return sum(p.n_tokens * (p.dx * p.read_bytes_a if s == "a" else p.dy * p.read_bytes_b) for s, _ in states)

    def describe(self) -> str:
        """A few human lines: tiles per kind, passes, memory."""
        p = self.inputs
        lines = [f"plan: {self.passes} pass(es) over {p.n_tokens} tokens in blocks of {p.block_tokens}, {self.workers} worker(s)"
                 + (f" of {p.read_threads} reading threads" if p.read_threads > 1 else "")
                 + (" (Ray tasks: tiles at once, tokens split among the workers)" if p.per_worker else "")]
        if self.count("matched"):
            lines.append(f"  matched layers: {len(p.matched)} pair(s) of D={p.dx}x{p.dy} in {self.count('matched')} tile(s)")
        if self.count("cross"):
            largest = max(len(t.pairs) for t in self.tiles if t.kind == "cross")
            riding = sum(len(t.selfs) for t in self.tiles)
            lines.append(
                f"  cross-layer: {len(p.rows)} x {len(p.cols)} pairs in {self.count('cross')} tile(s) of up to {largest} pair(s); "
                f"self co-moments of {len(p.rows) + len(p.cols)} states: {riding} in the cross tiles, the rest in "
                f"{self.count('self')} tile(s) of their own"
            )
        if p.groups or self.groups_asked:
            fewer = ""
            if p.groups < self.groups_asked:
                fewer = f" (of {self.groups_asked} asked: one pair's would not fit the budget)"
            elif self.groups_asked < self.groups_wanted:
                fewer = f" (of {self.groups_wanted} asked: the selection's whole documents make no more)"
            lines.append(f"  intervals: statistics kept per group of documents, {p.groups} groups{fewer}")
        if self.tiles:
            lines.append(f"  reads: {format_bytes(self.bytes_read())} from the store "
                         f"({self.bytes_read() / max(1, self.selection_bytes()):.2f} times the selected states); "
                         f"products: {self.product_flops() / 1e12:.3g} Tflop")
        whose = "per worker" if p.per_worker else "for the process"
        lines.append(f"  memory: ~{format_bytes(self.estimated_peak)} estimated peak of {format_bytes(p.memory_budget)} budget {whose}")
        if self.tiles:  # what decides the tiles: the accumulators, or what reading and multiplying hold beside them
            largest = max(self.tiles, key=self.estimate)
            memory = _MemoryModel(p, self.workers)
            accumulators, shards = memory.accumulators(largest), memory.shards(largest)
            held = "none here (summed and reduced on the GPU)" if memory.sums_on_device(largest) else format_bytes(accumulators)
            lines.append(f"    its largest tile: accumulators {held}, the reader's shard objects "
                         f"{format_bytes(shards)}, blocks and product sums {format_bytes(self.estimate(largest) - accumulators - shards)}")
            if p.device_budget is not None:
                lines.append(f"  GPU: ~{format_bytes(max(memory.device_peak(t) for t in self.tiles))} estimated for the "
                             f"largest tile's products there, of {format_bytes(p.device_budget)} free")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "tiles": {kind: self.count(kind) for kind in get_args(TileKind)},
            "workers": self.workers,
            "block_tokens": self.inputs.block_tokens,
            "memory_budget": self.inputs.memory_budget,
            "estimated_peak": self.estimated_peak,
            "groups": self.inputs.groups,
            "per_worker": self.inputs.per_worker,
            "bytes_read": self.bytes_read(),
            "product_flops": self.product_flops(),
        }


def plan_analysis(inputs: PlanInputs) -> AnalysisPlan:
    """Cut the work into tiles whose estimated peak memory fits the budget; when one matched pair's per-group
    accumulators do not fit, halve the groups (down to none) before giving up.

    Raises:
        MemoryBudgetError: if one pair does not fit even with one worker and no groups.
    """
    groups = inputs.groups
    while True:
        try:
            return replace(_plan(replace(inputs, groups=groups)), groups_asked=inputs.groups)
        except MemoryBudgetError:
            if groups < 2:
                raise
            groups = groups // 2 if groups >= 4 else 0


def _plan(inputs: PlanInputs) -> AnalysisPlan:
    # Each worker holds its own copy of a tile's accumulators, so parallelism over tokens costs passes
    # (and every pass re-reads the tokens), while BLAS threads inside one worker cost nothing. Take the
    # fewest passes, then the most workers among those.
    candidates = []
    most = max(1, min(inputs.workers, inputs.n_blocks))
    # Per-worker budgets: the tiles do not depend on the workers, who run different tiles and segments at once.
    for w in ([most] if inputs.per_worker else range(most, 0, -1)):
        memory = _MemoryModel(inputs, w)
        if memory.fits_one_pair():
            cross, left = _with_selfs(_cross_tiles(inputs.rows, inputs.cols, memory), inputs.rows, inputs.cols, memory)
            tiles = _matched_tiles(inputs.matched, memory) + cross + _pack(left, "self", memory)
            peak = max((memory.peak(t) for t in tiles), default=0)
            candidates.append(AnalysisPlan(tiles=tiles, inputs=inputs, workers=w, estimated_peak=peak))
    if candidates:
        return min(candidates, key=lambda plan: (plan.passes, -plan.workers))
    lone = _MemoryModel(inputs, 1)
    need = lone.smallest_peak()
    if need <= inputs.memory_budget and inputs.device_budget is not None:  # the host has room: the GPU has not
        raise MemoryBudgetError(
            f"Expected {format_bytes(lone.smallest_device_peak())} free on the GPU the products run on (one pair of "
            f"hidden states of D={inputs.dx}x{inputs.dy} in blocks of {inputs.block_tokens} tokens). Got "
            f"{format_bytes(inputs.device_budget)} there (its free memory less {format_bytes(DEVICE_MARGIN)} for the "
            "libraries' workspaces) instead. Free GPU memory (other processes hold it), lower --block-tokens, or pass "
            "--backend numpy."
        )
    raise MemoryBudgetError(
        f"Expected a memory budget of at least {format_bytes_up(need)} (one pair of hidden states of D={inputs.dx}x{inputs.dy} "
        f"in blocks of {inputs.block_tokens} tokens). Got {format_bytes(inputs.memory_budget)} instead. "
        "Raise --memory-budget, or lower --block-tokens.", need=need)


class _MemoryModel:
    """Byte counts of the memory model in the module docstring, for ``workers`` segment tasks."""

    def __init__(self, p: PlanInputs, workers: int) -> None:
        self.p, self.workers = p, workers
        self.dim = {"a": p.dx, "b": p.dy}
        self.read = {"a": p.read_bytes_a, "b": p.read_bytes_b}
        self.decoded = {"a": max(p.block_tokens, p.decoded_tokens_a), "b": max(p.block_tokens, p.decoded_tokens_b)}
        lone = p.lone_cache_bytes if workers == 1 and not p.per_worker else None
        self.cache = {"a": p.cache_bytes_a, "b": p.cache_bytes_b} if lone is None else dict(zip("ab", lone))

    def item(self, kind: TileKind, pair: StreamPair) -> int:
        """Bytes of one pair's accumulator: full Moments for ``matched``, CrossMoments otherwise (float64)."""
        da, db = self.dim[pair[0][0]], self.dim[pair[1][0]]
        if kind == "matched":  # Moments: C_xx, C_yy, C_xy, six O(D) vectors, and room for the arrays' headers
            return 8 * (da * da + db * db + da * db + 6 * (da + db))
        return 8 * (da * db + da + db)  # CrossMoments: C_xy and the two means

    def peak(self, tile: Tile) -> int:
        if self.sums_on_device(tile):  # its stacks, run sums and totals are the GPU's (device_peak): the host reads
            return self._blocks(tile) + self.shards(tile)
        acc = sum(self.item(tile.kind, pair) for pair in tile.pairs)  # A, one copy of each accumulator
        held, merged = self._copies(tile)
        sharing = 1 if self.p.per_worker else self.workers  # workers whose copies one budget holds
        streaming = sharing * (held * acc + self._blocks(tile) + self._statistics(tile))
        finishing = merged * acc + self._finish(tile)
        return max(streaming, finishing) + self.shards(tile)

    def accumulators(self, tile: Tile) -> int:
        """The tile's accumulators as its peak holds them: every worker's copies while streaming, or the merged ones
        (none on the host for a pass whose sums stay on the GPU)."""
        if self.sums_on_device(tile):
            return 0
        acc = sum(self.item(tile.kind, pair) for pair in tile.pairs)
        held, merged = self._copies(tile)
        return max((1 if self.p.per_worker else self.workers) * held, merged) * acc

    def sums_on_device(self, tile: Tile) -> bool:
        """Whether the tile's pass keeps its sums on the GPU and reduces them there to what the cross-layer metrics
        read (a stacked tile's pass of one segment, products on a local GPU: ``PendingBlocks.device_summaries``), so
        the host only reads blocks for it. Not with several segments (each crosses its sums to the host to be merged),
        nor on Ray (the plan does not know a tile's segments there). The host's total is still allocated, never
        written (zero pages the kernel maps on first write): it must fit the host's RAM as address space, since
        Linux's default overcommit refuses one allocation larger than RAM and swap."""
        p = self.p
        if p.device_budget is None or p.per_worker or self.workers != 1:
            return False
        if tile.rectangle is None and tile.kind != "self":
            return False
        return sum(self.item(tile.kind, pair) for pair in tile.pairs) <= host_memory_bytes()

    def shards(self, tile: Tile) -> int:
        """C: the shard objects the store's readers keep for the tile's states."""
        return sum(self.cache[s] for s, _ in tile.streams)

    def _copies(self, tile: Tile) -> tuple[int, int]:
        """Accumulators per pair that a worker holds while streaming, and that the merged pass holds.

        With G groups of documents (matched tiles), a segment holds the groups its blocks touch, at most its share of
        them and one it shares with the next segment; the merged pass holds all G.
        """
        g = self.p.groups if tile.kind == "matched" else 0
        if g < 2:
            return 1, 1
        if self.p.per_worker:  # a tile's segments are as many as the workers its pass gets: not known here
            return g, g
        return min(g, -(-g // self.workers) + 1), g

    def _blocks(self, tile: Tile) -> int:
        """B: every state's block in use and the next one read ahead, and the own buffers of the reads in flight."""
        held = [self.p.block_tokens * self.dim[s] * self.read[s] for s, _ in tile.streams]
        decoded = [self.decoded[s] * self.dim[s] * self.read[s] for s, _ in tile.streams]  # rows picked from
        at_once = sorted(decoded, reverse=True)[: max(1, self.p.read_threads)]  # the reads in flight: the largest
        return 2 * sum(held) + _READ_COPIES * sum(at_once)

    def _statistics(self, tile: Tile) -> int:
        """S: a block's float64, centred and cast copies, and the block statistics being built and merged."""
        n, c = self.p.block_tokens, self.p.compute_bytes
        cast = c if c < 8 else 0  # float64 products multiply the centred copy itself
        item = max(self.item(tile.kind, pair) for pair in tile.pairs)  # I
        if tile.kind == "matched":
            dx, dy = self.p.dx, self.p.dy
            square = max(dx, dy) ** 2
            per_token = max(8 * (dx + dy) + 8 * max(dx, dy), (8 + cast) * (dx + dy)) + 16
            return max(n * per_token + 2 * item + cast * square, 2 * item + 8 * square)
        dims = [self.dim[s] for s, _ in tile.streams]
        if tile.rectangle is not None or tile.kind == "self":  # stacked: GEMMs into running sums, folded in place
            rows, cols = tile.rectangle or ((), ())
            widths = sum(self.dim[s] for s, _ in rows), sum(self.dim[s] for s, _ in cols)
            stacks, run_sum = n * c * sum(widths), cast * widths[0] * widths[1]
            # the self co-moments: their running float32 sums, and one state's centred (or contiguous) copy
            selfs = sum(cast * self.dim[p[0][0]] ** 2 for p in tile.selfs) + (n * c * max(dims) if tile.selfs else 0)
            return stacks + 16 * n * max(dims) + run_sum + selfs
        square = max(self.dim[a] * self.dim[b] for (a, _), (b, _) in tile.pairs)  # cross pairs not in a rectangle
        return n * c * sum(dims) + max(n * (16 - c) * max(dims) + item, 2 * item + 8 * square)

    def _finish(self, tile: Tile) -> int:
        """F: finishing one matched pair after the pass (the metrics from Moments, one at a time); with groups, the
        total and one leave-one-group-out statistics beside them (the jackknife)."""
        if tile.kind != "matched":
            return 0
        jackknife = 2 * max(self.item(tile.kind, pair) for pair in tile.pairs) if self.p.groups >= 2 else 0
        return _FINISH_SQUARES * 8 * max(self.p.dx, self.p.dy) ** 2 + jackknife

    def fits(self, tile: Tile) -> bool:
        return self.peak(tile) <= self.p.memory_budget and (
            self.p.device_budget is None or self.device_peak(tile) <= self.p.device_budget)

    def device_peak(self, tile: Tile) -> int:
        """The GPU memory a stacked tile's segments hold there: each block's stacked states with room for their
        float64 centring (twice the stacks; for float32 products the stacks and the room each device sum is admitted
        with), the run's product sum in the compute dtype and, for float32 products, the float64 sum the runs fold
        into (float64 products add into their own sum: one matrix), and the same for the self co-moments riding
        along; 0 for tiles whose products do not stay on the device."""
        if tile.rectangle is None and tile.kind != "self":
            return 0
        n, c = self.p.block_tokens, self.p.compute_bytes
        per_value = c + (8 if c < 8 else 0)  # the run's sum, and the float64 device sum beside a float32 one
        rows, cols = tile.rectangle or ((), ())
        widths = sum(self.dim[s] for s, _ in rows), sum(self.dim[s] for s, _ in cols)
        selfs = sum(per_value * self.dim[p[0][0]] ** 2 for p in tile.selfs)
        widest = max((self.dim[s] for s, _ in tile.streams), default=0)
        stacks = n * c * (sum(widths) or widest)
        # float32 products: the pass admits each float64 sum (the rectangle's, then each self's) while the stacks and
        # the runs' sums are held, with room for the next block beside it (cross_tile._device_sum): one rule, or a
        # tile planned here is refused there
        sides = ([sum(widths)] if tile.rectangle else []) + [2 * self.dim[p[0][0]] for p in tile.selfs]
        room = stacks + max(device_sum_headroom(n, w, c) for w in sides) if c < 8 else 2 * stacks
        sharing = 1 if self.p.per_worker else self.workers  # segments of one process share its GPU
        return sharing * (room + per_value * widths[0] * widths[1] + selfs)

    def fits_one_pair(self) -> bool:
        return self.smallest_peak() <= self.p.memory_budget and (
            self.p.device_budget is None or self.smallest_device_peak() <= self.p.device_budget)

    def smallest_device_peak(self) -> int:
        """The GPU memory of the smallest tile whose products stay there: one cross-layer pair (a 1 x 1 rectangle)."""
        p = self.p
        probes = [Tile("cross", ((("a", i), ("b", j)),)) for i in p.rows[:1] for j in p.cols[:1]]
        return max((self.device_peak(t) for t in probes), default=0)

    def smallest_peak(self) -> int:
        p = self.p
        probes = [Tile("matched", ((("a", k), ("b", k)),)) for k in p.matched[:1]]
        probes += [Tile("cross", ((("a", i), ("b", j)),)) for i in p.rows[:1] for j in p.cols[:1]]
        return max((self.peak(t) for t in probes), default=0)


#: GPU memory a plan leaves to cuBLAS's workspaces, the CUDA context's growth and torch's rounding.
DEVICE_MARGIN = 2 << 30


def host_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _matched_tiles(matched: Sequence[int], memory: _MemoryModel) -> tuple[Tile, ...]:
    return _pack([(("a", k), ("b", k)) for k in matched], "matched", memory)


def _with_selfs(tiles: tuple[Tile, ...], rows: Sequence[int], cols: Sequence[int],
                memory: _MemoryModel) -> tuple[tuple[Tile, ...], list[StreamPair]]:
    """The cross tiles with the self co-moments of the states they read added where they fit (each state's once), and
    the self pairs left for tiles of their own: a state's self co-moments then cost no read of their own."""
    left: list[StreamPair] = [(("a", i), ("a", i)) for i in rows] + [(("b", j), ("b", j)) for j in cols]
    out = []
    for tile in tiles:
        pairs = list(tile.pairs)
        for pair in [p for p in left if p[0] in tile.streams]:
            if memory.fits(Tile("cross", (*pairs, pair))):
                pairs.append(pair)
                left.remove(pair)
        out.append(Tile("cross", tuple(pairs)))
    return tuple(out), left


def _pack(pairs: list[StreamPair], kind: TileKind, memory: _MemoryModel) -> tuple[Tile, ...]:
    """Greedy: consecutive pairs into a tile while it fits (each pair alone fits, by the caller's check)."""
    tiles: list[Tile] = []
    current: list[StreamPair] = []
    for pair in pairs:
        if current and not memory.fits(Tile(kind, (*current, pair))):
            tiles.append(Tile(kind, tuple(current)))
            current = []
        current.append(pair)
    if current:
        tiles.append(Tile(kind, tuple(current)))
    return tuple(tiles)


def _cross_tiles(rows: Sequence[int], cols: Sequence[int], memory: _MemoryModel) -> tuple[Tile, ...]:
    """Rectangles of r x c pairs: the largest square-ish shape that fits, then the grid it tiles."""
    if not rows or not cols:
        return ()
    r, c = _rectangle(len(rows), len(cols), memory)
    tiles = []
    for i0 in range(0, len(rows), r):
        for j0 in range(0, len(cols), c):
            pairs = tuple((("a", i), ("b", j)) for i in rows[i0 : i0 + r] for j in cols[j0 : j0 + c])
            tiles.append(Tile("cross", pairs))
    return tuple(tiles)


def _rectangle(n_rows: int, n_cols: int, memory: _MemoryModel) -> tuple[int, int]:
    """(r, c) minimising the passes ceil(I/r) ceil(J/c), then the states read per pass (r + c)."""
    best = (1, 1)
    best_key = (n_rows * n_cols, 2)
    for r in range(1, n_rows + 1):
        c = _largest(n_cols, functools.partial(_fits_rectangle, memory, r))
        if c == 0:
            break  # taller rectangles fit even less
        key = (math.ceil(n_rows / r) * math.ceil(n_cols / c), r + c)
        if key < best_key:
            best, best_key = (r, c), key
    return best


def _fits_rectangle(memory: _MemoryModel, r: int, c: int) -> bool:
    return memory.fits(_rectangle_tile(r, c))


def _rectangle_tile(r: int, c: int) -> Tile:
    return Tile("cross", tuple((("a", i), ("b", j)) for i in range(r) for j in range(c)))


def _largest(limit: int, ok: Callable[[int], bool]) -> int:
    """The largest c in 1..limit with ok(c) (ok is monotone: true, then false), 0 if none."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def parse_memory_budget(value: str | int) -> int:
    """``"4GB"``, ``"512MiB"``, ``"1.5G"`` or a number of bytes -> bytes (kB/MB/GB decimal, KiB/MiB/GiB binary).

    Example:
        >>> parse_memory_budget("4GB"), parse_memory_budget("512MiB"), parse_memory_budget(1000)
        (4000000000, 536870912, 1000)
    """
    if isinstance(value, int) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?)?b?\s*", str(value).lower())
    size = float(match.group(1)) * _UNITS[match.group(2) or ""] if match else 0.0
    if not 1 <= size < 2**63:  # 1e400 is inf: no machine's bytes
        raise UserError(f"Expected a memory budget such as 4GB, 512MiB or 2e9. Got {value!r} instead.")
    return int(size)


def format_bytes_up(n: int) -> str:
    """``n`` bytes rounded *up* to the three digits :func:`format_bytes` prints: a budget named this way holds ``n``
    (541.3 MB reads "542 MB", not "541 MB", which is less)."""
    step = 10 ** max(0, int(math.log10(max(n, 1))) - 2)
    return format_bytes(-(-n // step) * step)


def format_bytes(n: float) -> str:
    """Bytes for people: ``format_bytes(3.2e9) == '3.2 GB'``."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"
