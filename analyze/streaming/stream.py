"""Streaming passes on Dask: one tile of layer pairs, one pass over the selected tokens.

The selected tokens are cut into *blocks* aligned with the store's chunks (one Dask chunk of each
hidden state per block), and the blocks into ``workers`` contiguous *segments*. The graph of a pass is

    segment_0 ... segment_{W-1}      one task each: read a block of every state of the tile, turn it
         \\        /                  into block statistics (backend), merge them into the segment's
          merge tree (fan-in 4)       running accumulators; next block
               |
        {pair: Moments | CrossMoments}

A segment folds its blocks one after the other instead of making one task per block, so that at most
``workers`` copies of the tile's accumulators exist at a time (a per-block tree would hold one per
pending leaf). A cross-layer tile's segment holds one stacked accumulator (:class:`CrossTileTotals`).

Schedulers (:func:`resolve_scheduler`, whose vocabulary :data:`Scheduler` is defined here once): Dask's local
threads by default (numpy releases the GIL in BLAS and in the codecs), ``sync`` for debugging, and Ray when
connected to a Ray cluster, through hrsa's one Ray connection (:func:`hrsa.runtime.connection.connect`). On Ray the
same :func:`fold_segment` and :func:`merge_partials` run as Ray tasks, every tile at once
(:mod:`hrsa.analyze.streaming.ray_passes`), each task reading its blocks straight from the store.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, Union, get_args

import numpy as np

from hrsa.analyze.accumulators.centring import NON_FINITE_MESSAGE
from hrsa.analyze.accumulators.cross_tile import DeviceRoomLost
from hrsa.store.errors import UserError

if TYPE_CHECKING:
    import dask.array as da
    from dask.delayed import Delayed

    from hrsa.analyze.accumulators.cross_moments import CoMomentSummary, CrossMoments
    from hrsa.analyze.accumulators.cross_tile import CrossTileMoments
    from hrsa.analyze.accumulators.groups import GroupedMoments
    from hrsa.analyze.accumulators.moments import Moments
    from hrsa.analyze.streaming.backends import ChunkBackend
    from hrsa.analyze.streaming.plan import StreamKey, StreamPair, Tile

__all__ = [
    "CrossTileTotals",
    "NonFiniteError",
    "OnBlock",
    "ResolvedScheduler",
    "Scheduler",
    "StateReader",
    "TokenBlock",
    "fold_segment",
    "merge_partials",
    "paired_blocks",
    "resolve_scheduler",
    "run_tile",
    "split_segments",
    "token_blocks",
    "with_groups",
]

Scheduler = Literal["auto", "threads", "sync", "ray"]
OnBlock = Callable[[int], None]  # called with the number of tokens of each finished block
Accumulator = Union["Moments", "CrossMoments", "GroupedMoments"]
_FAN_IN = 4


@dataclass(frozen=True, eq=False)  # eq=False: ``rows`` may be an array
class TokenBlock:
    """Selected tokens inside block ``index`` of the ``block_tokens`` grid.

    Attributes:
        index: the block's number; it covers corpus tokens ``index * B`` to ``(index + 1) * B``.
        rows: the selected rows, relative to the block's first token (a slice, or a sorted index).
        n_rows: how many tokens are selected.
        rows_b: when model B's corpus is another (tokens aligned by content span): B's tokens ``start:stop``
            and, relative to ``start``, the row of each of A's selected rows, in their order. None: B reads A's rows.
        groups: when the pass keeps statistics per group of documents: ``(group, lo, hi)`` for each run of the
            block's selected rows ``lo:hi`` (positions among the ``n_rows``) that falls in one group. None: no groups.
    """

    index: int
    rows: slice | np.ndarray
    n_rows: int
    rows_b: tuple[int, int, np.ndarray] | None = None
    groups: tuple[tuple[int, int, int], ...] | None = None


def token_blocks(selection: slice | np.ndarray, block_tokens: int) -> list[TokenBlock]:
    """Cut a selection (a slice of tokens, or an index) into blocks of the ``block_tokens`` grid.

    Order does not matter to the accumulators, so an index is sorted first: each block is then read once.

    Example:
        >>> [(b.index, b.rows, b.n_rows) for b in token_blocks(slice(3, 10), 4)]
        [(0, slice(3, 4, None), 1), (1, slice(0, 4, None), 4), (2, slice(0, 2, None), 2)]
    """
    size = block_tokens
    if isinstance(selection, slice):
        start, stop = selection.start or 0, selection.stop
        return [
            TokenBlock(b, slice(max(start, b * size) - b * size, min(stop, (b + 1) * size) - b * size),
                       min(stop, (b + 1) * size) - max(start, b * size))
            for b in range(start // size, -(-stop // size))
        ]
    index = np.unique(np.asarray(selection, dtype=np.int64))  # sorted, once each
    which = index // size
    cuts = np.flatnonzero(np.diff(which)) + 1
    blocks = []
    for part in np.split(index, cuts):
        b = int(part[0] // size)
        rows = part - b * size
        contiguous = rows[-1] - rows[0] + 1 == rows.size
        blocks.append(TokenBlock(b, slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows, int(rows.size)))
    return blocks


def paired_blocks(rows_a: np.ndarray, rows_b: np.ndarray, block_tokens: int) -> list[TokenBlock]:
    """Cut aligned pairs (A's rows ascending, B's row for each) into blocks of A's ``block_tokens`` grid; each block
    reads B's tokens over the range its pairs span (alignment keeps document order, so that range is short).

    Example:
        >>> [(b.index, b.rows, b.rows_b) for b in paired_blocks(np.array([1, 2, 5]), np.array([0, 3, 4]), 4)]
        [(0, slice(1, 3, None), (0, 4, array([0, 3]))), (1, slice(1, 2, None), (4, 5, array([0])))]
    """
    blocks = []
    which = rows_a // block_tokens
    for part in np.split(np.arange(rows_a.size), np.flatnonzero(np.diff(which)) + 1):
        if not part.size:
            continue
        b = int(which[part[0]])
        rows = rows_a[part] - b * block_tokens
        contiguous = rows[-1] - rows[0] + 1 == rows.size
        lo, hi = int(rows_b[part].min()), int(rows_b[part].max()) + 1
        blocks.append(TokenBlock(b, slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows, int(rows.size),
                                 (lo, hi, rows_b[part] - lo)))
    return blocks


def with_groups(blocks: Sequence[TokenBlock], block_tokens: int, group_starts: np.ndarray) -> list[TokenBlock]:
    """The blocks with their runs of rows per group, groups starting at corpus tokens ``group_starts`` (ascending).

    Example:
        >>> [b.groups for b in with_groups(token_blocks(slice(0, 6), 4), 4, np.array([0, 3]))]
        [((0, 0, 3), (1, 3, 4)), ((1, 0, 2),)]
    """
    out = []
    for block in blocks:
        rows = np.arange(block.rows.start, block.rows.stop) if isinstance(block.rows, slice) else block.rows
        group = np.searchsorted(group_starts, block.index * block_tokens + rows, side="right") - 1  # (n_rows,)
        cuts = [0, *(np.flatnonzero(np.diff(group)) + 1).tolist(), block.n_rows]
        runs = tuple((int(group[lo]), lo, hi) for lo, hi in itertools.pairwise(cuts))
        out.append(replace(block, groups=runs))
    return out


def split_segments(blocks: Sequence[TokenBlock], n: int, per_run: int = 1) -> list[tuple[TokenBlock, ...]]:
    """At most ``n`` contiguous runs of blocks with about equal numbers of tokens, cut only between runs of
    ``per_run`` blocks of the grid (:func:`~hrsa.analyze.accumulators.cross_tile.blocks_per_run`).

    Example:
        >>> [[b.index for b in s] for s in split_segments(token_blocks(slice(0, 12), 2), 2, per_run=4)]
        [[0, 1, 2, 3], [4, 5]]
    """
    runs = np.array([b.index // per_run for b in blocks])
    starts = np.flatnonzero(np.diff(runs)) + 1  # where a segment may start
    n = max(1, min(n, starts.size + 1))
    ends = np.cumsum([b.n_rows for b in blocks])[starts - 1]  # tokens before each possible start
    total = sum(b.n_rows for b in blocks)
    # Cut before the run whose start is nearest to k/n of the total.
    cuts = [int(starts[np.abs(ends - total * k / n).argmin()]) for k in range(1, n)] if starts.size else []
    bounds = [0, *sorted(set(cuts)), len(blocks)]
    return [tuple(blocks[a:b]) for a, b in itertools.pairwise(bounds) if b > a]


class StateReader:
    """Reads one block of a hidden state from arrays read by slices of tokens
    (:meth:`~hrsa.store.ActivationStore.hidden_state_array`: each read checked, no Dask graph per read) on a grid of
    ``block_tokens``.

    It pickles (the arrays point at the store, not at data), so Ray workers read blocks themselves. Not a
    dataclass on purpose: ``dask.delayed`` looks inside dataclasses and would turn arrays it finds into
    dependencies, i.e. load every state whole before the task runs.
    """

    def __init__(self, arrays: Mapping[StreamKey, Any], block_tokens: int, read_threads: int = 1) -> None:
        self.arrays = dict(arrays)
        self.block_tokens = block_tokens  # the grid of the blocks
        self.streams: dict[StreamKey, Any] = {}  # a segment's forward readers (:meth:`streamed`)
        self.read_threads = max(1, read_threads)  # threads reading a block's states at once (:func:`_read_ahead`)

    def group(self, key: StreamKey) -> int:
        """Which of the ``read_threads`` groups reads state ``key`` (one thread a group, its own buffers)."""
        return list(self.arrays).index(key) % self.read_threads

    def read(self, key: StreamKey, block: TokenBlock) -> np.ndarray:
        """The block's selected rows of state ``key``, (n_rows, D), in the stored dtype (B's own rows, in the order
        of A's, when the two corpora are aligned)."""
        if key[0] == "b" and block.rows_b is not None:
            start, stop, rows = block.rows_b
            return self.arrays[key][start:stop][rows]
        start = block.index * self.block_tokens
        if key in self.streams and isinstance(block.rows, slice):  # a run of rows: read forward, one block's bytes held
            return self.streams[key][start + block.rows.start : start + block.rows.stop]
        return self.arrays[key][start : start + self.block_tokens][block.rows]

    @contextmanager
    def streamed(self) -> Iterator[StateReader]:
        """This reader for one segment: runs of rows of checked arrays read forward through shard streams (each
        shard's bytes a block at a time, not whole: :meth:`~hrsa.store.reading.CheckedArray.streamed`), every shard
        opened verified whole when the segment's blocks are done, before its results leave (an error inside the
        segment propagates as it is: nothing is returned then). A state's block read this way is overwritten by the
        one after next (arrays reused, no page faults: :class:`~hrsa.store.reading.ReadScratch`): the fold drops each
        block before it asks for the next (:func:`_read_ahead` reads one ahead)."""
        from hrsa.store.reading import ReadScratch

        segment = StateReader(self.arrays, self.block_tokens, self.read_threads)
        # A scratch per group of states (states i, i + T, ...), each group read by one thread at a time (_read_ahead):
        # a scratch's arrays are reused read after read, so no two reads in flight may share one.
        scratches = [ReadScratch() for _ in range(self.read_threads)]
        segment.streams = {key: array.streamed(scratches[self.group(key)]) for key, array in self.arrays.items()
                           if hasattr(array, "streamed")}
        yield segment
        for stream in segment.streams.values():
            stream.close()


def prepare_products(tile: Tile, reader: StateReader, backend: ChunkBackend, limit_bytes: int,
                     workers: int | None = None) -> bool:
    """Settle how a cross-layer tile's products of full blocks run (one GEMM of the tile, or one per pair: see
    :func:`~hrsa.analyze.accumulators.gemm.prepare_tile_gemm`) before the pass's memory counts: once per process.
    ``workers``: the Dask threads of a local pass, one per segment (a fold on a thread count not probed runs a GEMM
    per pair). Returns whether it probed now (False: nothing to probe, or probed before in this process)."""
    if backend.name != "numpy" or tile.rectangle is None:
        return False
    from hrsa.analyze.accumulators.gemm import blas_threads, prepare_tile_gemm, probed

    rows, cols = tile.rectangle
    threads = {blas_threads()} | ({blas_threads_per_worker(workers)} if workers else set())
    products = (backend.compute_dtype, reader.arrays[rows[0]].shape[1], reader.arrays[cols[0]].shape[1],
                reader.block_tokens)
    before = probed(*products, threads=threads)
    prepare_tile_gemm(*products, threads=threads, limit_bytes=limit_bytes)
    return not before and probed(*products, threads=threads)


def fold_segment(
    tile: Tile,
    reader: StateReader,
    blocks: Iterable[TokenBlock],
    backend: ChunkBackend,
    on_block: OnBlock | None = None,
    whole: bool = False,
    host_sums: bool = True,
) -> dict[StreamPair, Accumulator]:
    """One segment task: the tile's accumulators over ``blocks``, one block at a time; each shard it read verified
    whole before they are returned (:meth:`StateReader.streamed`). ``whole``: the segment is the tile's whole pass
    (nothing is merged into it), so a cross-layer tile's sums on a GPU may leave as their summaries
    (:meth:`~hrsa.analyze.accumulators.cross_tile.PendingBlocks.device_summaries`). ``host_sums``: False where the
    plan counted no host memory for the tile's sums (:meth:`AnalysisPlan.sums_on_device`): a GPU that no longer has
    room for them is then an error, not a crossing into host memory nobody budgeted."""
    recent: list[TokenBlock] = []  # the blocks read last: the one folded and the one read ahead

    def remembered() -> Iterator[TokenBlock]:
        for block in blocks:
            recent[:] = [*recent[-1:], block]
            yield block

    with reader.streamed() as segment:
        try:
            if tile.rectangle is not None or tile.kind == "self":
                return _fold_stacked(tile, segment, remembered(), backend, on_block, whole, host_sums)
            return _fold_pairs(tile, segment, remembered(), backend, on_block)
        except DeviceRoomLost as lost:
            raise _room_lost(lost) from None
        except ValueError as error:
            if str(error) != NON_FINITE_MESSAGE:
                raise
            raise _non_finite(reader, tile.streams, recent) from None


def _room_lost(lost: DeviceRoomLost) -> UserError:
    from hrsa.analyze.streaming.plan import MemoryBudgetError, format_bytes

    return MemoryBudgetError(
        f"Expected room on the GPU for this pass's float64 sums ({format_bytes(lost.needed)}), as planned. Got "
        f"{format_bytes(lost.free)} free on it instead: its free memory fell after the plan (another process took "
        "it). Free the GPU and rerun: the plan fits the tiles to what is free then.")


class NonFiniteError(UserError, ValueError):
    """Stored activations holding NaN or inf, named where they were found (the store and array, the tokens): one line
    instead of a traceback from the centring, which sees them only in a block's mean (and, a math-layer module, raises
    a plain ValueError: it imports nothing of the store)."""


def _non_finite(reader: StateReader, keys: Sequence[StreamKey], blocks: Sequence[TokenBlock]) -> NonFiniteError:
    """The error naming the stored array and tokens that hold a NaN or inf (the centring saw one in a block's mean,
    without knowing whose), found by reading the recent blocks of the tile's states again."""
    for block in blocks:
        for key in keys:
            rows = np.asarray(reader.read(key, block), dtype=np.float64)
            bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
            if bad.size:
                start = block.index * reader.block_tokens
                where = getattr(reader.arrays[key], "where", f"hidden state {key[1]} of model {key[0].upper()}")
                return NonFiniteError(
                    f"Expected finite activations. Got NaN or inf in {where}, in {bad.size} of the tokens "
                    f"{start}-{start + reader.block_tokens - 1} instead: the model overflowed in its dtype or the "
                    "extraction is damaged. Re-extract that model (--dtype float32 where float16 or bfloat16 "
                    "overflowed).")
    return NonFiniteError(NON_FINITE_MESSAGE)


def _fold_pairs(tile: Tile, reader: StateReader, blocks: Iterable[TokenBlock], backend: ChunkBackend,
                on_block: OnBlock | None) -> dict[StreamPair, Accumulator]:
    """A tile's pairs one by one (matched pairs, or cross pairs that make no rectangle)."""
    totals: dict[StreamPair, Accumulator] = {}
    # Step 1: every state of the tile over the block's tokens (each read once, shared by its pairs). The
    # next block is read meanwhile: decompression, and on object stores the request latency, overlap the products.
    for block, xs in _read_ahead(reader, tile.streams, blocks):
        # Step 2: block statistics pair by pair, each merged before the next is made (one temporary).
        parts: Iterable[tuple[Any, Accumulator]]
        if tile.kind == "matched" and block.groups is not None:
            parts = ((p, _grouped_moments(backend, xs[p[0]], xs[p[1]], block.groups)) for p in tile.pairs)
        elif tile.kind == "matched":
            parts = ((p, backend.moments(xs[p[0]], xs[p[1]])) for p in tile.pairs)
        else:
            parts = backend.cross_moments(xs, tile.pairs)
        for pair, part in parts:
            totals[pair] = totals[pair].merge(part) if pair in totals else part  # type: ignore[arg-type]
        del xs
        if on_block is not None:
            on_block(block.n_rows)
    return totals


def _fold_stacked(tile: Tile, reader: StateReader, blocks: Iterable[TokenBlock], backend: ChunkBackend,
                  on_block: OnBlock | None, whole: bool = False, host_sums: bool = True) -> CrossTileTotals | None:
    """A cross-layer tile's segment as one stacked accumulator (one GEMM per block into a running sum, folded into the
    float64 total run by run), and the self co-moments of its states (riding along, or a self tile's), alike: every
    float32 sum covers the same runs of the grid whatever the tile, so the results do not depend on the plan."""
    from hrsa.analyze.accumulators.cross_tile import CrossTileMoments, PendingBlocks, blocks_per_run

    per_run = blocks_per_run(reader.block_tokens)

    def pending(rows: tuple[StreamKey, ...], cols: tuple[StreamKey, ...], xs: dict) -> PendingBlocks:
        empty = CrossTileMoments.empty(rows, cols, xs[rows[0]].shape[1], xs[cols[0]].shape[1])
        return PendingBlocks(empty, None, host_sums=host_sums)

    stacked, selfs, run = None, None, None
    for block, xs in _read_ahead(reader, tile.streams, blocks):
        if selfs is None:
            stacked = pending(*tile.rectangle, xs) if tile.rectangle else None
            selfs = {k: pending((k,), (k,), xs) for k, _ in tile.selfs}
        elif block.index // per_run != run:  # the grid's runs, whatever the segments: see blocks_per_run
            for each in (stacked, *selfs.values()):
                if each is not None:
                    each.flush()
        run = block.index // per_run
        backend.fold_cross_tile(stacked, xs, selfs)
        del xs
        if on_block is not None:
            on_block(block.n_rows)
    if selfs is None:
        return None
    summaries: dict[StreamPair, CoMomentSummary] = {}

    def on_device(each: Any) -> bool:  # a whole pass's GPU sums reduced there (never on the host); else finish them
        found = each.device_summaries() if whole else None
        summaries.update(found or {})
        return found is not None

    rectangle = None if stacked is None or on_device(stacked) else stacked.finish()
    kept = {p: m for own in selfs.values() if not on_device(own) for p, m in own.finish().items()}
    return CrossTileTotals(rectangle, kept, summaries)


@dataclass(eq=False)
class CrossTileTotals:
    """A tile's stacked accumulators: the rectangle of a cross-layer tile (None for a self tile, or when reduced to
    summaries), the self co-moments, and the summaries of the pairs a whole pass reduced on a GPU (not in
    :meth:`items`: read them too)."""

    stacked: CrossTileMoments | None
    selfs: dict[StreamPair, CrossMoments]
    summaries: dict[StreamPair, CoMomentSummary] = field(default_factory=dict)  # a whole pass's, reduced on a GPU

    def merge(self, other: CrossTileTotals) -> CrossTileTotals:
        """Fold ``other`` in (the stacked part in place, into a copy when read-only as Ray hands it out)."""
        if self.summaries or other.summaries:
            raise ValueError("Expected the totals of segments. Got a whole pass's summaries, which do not merge.")
        if self.stacked is not None and other.stacked is not None:
            self.stacked = self.stacked.writable().merge(other.stacked)
        self.selfs = merge_partials(self.selfs, dict(other.selfs))
        return self

    def items(self) -> Iterator[tuple[StreamPair, CrossMoments]]:
        if self.stacked is not None:
            yield from self.stacked.items()
        yield from self.selfs.items()


def _grouped_moments(backend: ChunkBackend, x: np.ndarray, y: np.ndarray, runs: Sequence[tuple[int, int, int]]) -> GroupedMoments:
    """A block's statistics, one Moments per run of its rows in one group of documents."""
    from hrsa.analyze.accumulators.groups import GroupedMoments

    return GroupedMoments({g: backend.moments(x[lo:hi], y[lo:hi]) for g, lo, hi in runs})


def _read_ahead(
    reader: StateReader, keys: Sequence[StreamKey], blocks: Iterable[TokenBlock]
) -> Iterator[tuple[TokenBlock, dict[StreamKey, np.ndarray]]]:
    """(block, {key: values}) for each block, reading block i + 1 in a thread while block i is used; that block's
    states in ``reader.read_threads`` threads at once, a group of states each (:meth:`StateReader.group`).

    Exactly one block ahead: a segment's readers reuse their arrays (:meth:`StateReader.streamed`), so a block's values
    are overwritten by the block after next; reading further ahead would fold overwritten values."""
    from concurrent.futures import ThreadPoolExecutor

    groups = [[key for key in keys if reader.group(key) == g] for g in range(reader.read_threads)]
    groups = [group for group in groups if group]
    states = ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="hrsa-read") if len(groups) > 1 else None

    def read_group(block: TokenBlock, group: list[StreamKey]) -> dict[StreamKey, np.ndarray]:
        return {key: reader.read(key, block) for key in group}

    def read_all(block: TokenBlock) -> tuple[TokenBlock, dict[StreamKey, np.ndarray]]:
        if states is None:
            return block, read_group(block, list(keys))
        got: dict[StreamKey, np.ndarray] = {}
        for part in states.map(functools.partial(read_group, block), groups):
            got.update(part)
        return block, {key: got[key] for key in keys}  # in the tile's order, however the threads finished

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hrsa-read-ahead") as pool, (states or nullcontext()):
        pending = None
        for block in blocks:
            future = pool.submit(read_all, block)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def merge_partials(*parts: dict[StreamPair, Accumulator]) -> dict[StreamPair, Accumulator]:
    """Merge segment results pair by pair, emptying the inputs as it goes so their memory is freed early."""
    stacked = [part for part in parts if not isinstance(part, dict)]  # a cross-layer tile's CrossTileTotals
    if stacked:
        total = CrossTileTotals(stacked[0].stacked, dict(stacked[0].selfs), dict(stacked[0].summaries))
        for part in stacked[1:]:
            total.merge(part)
        return total
    out: dict[StreamPair, Accumulator] = {}
    for part in parts:
        for pair in list(part):
            value = part.pop(pair)
            out[pair] = out[pair].merge(value) if pair in out else value  # type: ignore[arg-type]
    return out


def blas_threads_per_worker(workers: int) -> int:
    """BLAS threads of each of a local pass's ``workers`` Dask threads: the cores split among them (Dask threads x
    BLAS threads would oversubscribe the cores)."""
    return max(1, (os.cpu_count() or 1) // workers)


@dataclass(frozen=True)
class ResolvedScheduler:
    """Where the passes run, as :func:`resolve_scheduler` chose it: a Dask scheduler here, or Ray tasks.

    Attributes:
        name: ``"threads"``, ``"sync"`` or ``"ray"`` (the passes then go to :mod:`.ray_passes`, not :meth:`compute`).
    """

    name: str

    def compute(self, graph: Delayed, workers: int) -> Any:
        """The value of ``graph`` on this machine, with up to ``workers`` of its tasks running at once."""
        import dask

        if self.name == "sync":
            return dask.compute(graph, scheduler="sync")[0]
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=blas_threads_per_worker(workers), user_api="blas"):
            return dask.compute(graph, scheduler="threads", num_workers=workers)[0]


def resolve_scheduler(name: Scheduler = "auto") -> ResolvedScheduler:
    """``"auto"``: Ray when this process is connected to Ray (or ``RAY_ADDRESS`` is set), else local threads.

    ``"ray"`` connects to ``RAY_ADDRESS`` when not yet connected, or starts an embedded local Ray, through
    :func:`hrsa.runtime.connection.connect` (the one connection extraction and training use too).

    Raises:
        UserError: an unknown scheduler name.
        RayConnectionError: ``"ray"`` and no Ray cluster answers at ``RAY_ADDRESS``.
    """
    if name not in get_args(Scheduler):
        raise UserError(f"Expected a scheduler among {', '.join(get_args(Scheduler))}. Got {name!r} instead.")
    if name == "auto":
        connected = "ray" in sys.modules and sys.modules["ray"].is_initialized()
        name = "ray" if connected or os.environ.get("RAY_ADDRESS") else "threads"
    if name == "ray":
        from hrsa.runtime.connection import connect  # imports ray: only when Ray is asked for

        connect()  # the process's one connection: RAY_ADDRESS, else an embedded local Ray; a live one is reused
    return ResolvedScheduler(name=name)


def run_tile(
    tile: Tile,
    reader: StateReader,
    segments: Sequence[Sequence[TokenBlock]],
    backend: ChunkBackend,
    scheduler: ResolvedScheduler,
    on_block: OnBlock | None = None,
    host_sums: bool = True,
) -> dict[StreamPair, Accumulator]:
    """One streaming pass: the tile's accumulators over every segment's tokens.

    Args:
        tile: the pairs to accumulate.
        reader: where the blocks come from.
        segments: contiguous runs of blocks, one task each (see :func:`split_segments`).
        backend: where the block statistics are computed.
        scheduler: where the graph is computed (see :func:`resolve_scheduler`).
        on_block: progress callback, called per block (the tasks run in this process: Ray's passes go through
            :mod:`.ray_passes` instead).
        host_sums: False where the plan counted no host memory for the tile's sums (see :func:`fold_segment`).

    Returns:
        The accumulator of every pair of the tile over all the tokens (a cross-layer tile's :class:`CrossTileTotals`,
        whose ``summaries`` hold the pairs a whole pass reduced on a GPU).
    """
    import dask

    fold = dask.delayed(fold_segment, pure=False)
    whole = len(segments) == 1  # one segment: nothing merges into it (see fold_segment)
    parts = [fold(tile, reader, tuple(blocks), backend, on_block, whole, host_sums) for blocks in segments]
    merge = dask.delayed(merge_partials, pure=False)
    while len(parts) > 1:  # a tree of fan-in 4: merges run in parallel on a cluster
        groups = [parts[i : i + _FAN_IN] for i in range(0, len(parts), _FAN_IN)]
        parts = [merge(*group) if len(group) > 1 else group[0] for group in groups]
    return scheduler.compute(parts[0], len(segments))
