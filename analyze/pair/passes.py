"""Phase 2 of ``analyze_pair``: one streaming pass per tile, each tile finished into small results at once.

Each pass (:func:`hrsa.analyze.streaming.stream.run_tile`) folds every token block into the tile's accumulators;
a matched tile's ``Moments`` are finished into CKA, dimension-wise correlation and Procrustes results, a
cross-layer tile's ``CrossMoments`` into their O(D) summaries, so the tile's D x D accumulators are freed before
the next pass.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hrsa.analyze.accumulators.cross_tile import blocks_per_run
from hrsa.analyze.accumulators.groups import GroupedMoments
from hrsa.analyze.metrics import PrecisionWarning, UnderdeterminedWarning
from hrsa.analyze.pair.layer_metrics import layer_results, layer_scores
from hrsa.analyze.pair.uncertainty import layer_intervals, layer_nulls
from hrsa.analyze.streaming.backends import products_on_gpu
from hrsa.analyze.streaming.ray_passes import TilePass, run_tiles_on_ray, task_resources
from hrsa.analyze.streaming.stream import StateReader, TokenBlock, prepare_products, run_tile, split_segments
from hrsa.runtime.resident import allocations_mapped_from, release_freed_heap

if TYPE_CHECKING:
    from hrsa.analyze.accumulators.cross_moments import CoMomentSummary
    from hrsa.analyze.pair.resolve import ResolvedPair
    from hrsa.analyze.streaming.backends import ChunkBackend
    from hrsa.analyze.streaming.plan import StreamPair, Tile
    from hrsa.analyze.streaming.stream import OnBlock, ResolvedScheduler
    from hrsa.store import ActivationStore

__all__ = ["FinishOptions", "PassOutputs", "finish_tile", "run_passes"]


@dataclass(frozen=True)
class PassOutputs:
    """What the passes leave: small results, the accumulators already freed.

    Attributes:
        matched: finished results by matched hidden state, ``{k: {"cka": ..., "procrustes": ...}}`` (only the
            metrics asked for; empty when no matched pass ran), with ``"nulls"`` (score name -> NullBaseline) and,
            when the pass kept groups of documents, ``"intervals"`` (score name -> Interval).
        summaries: co-moment summaries of the cross-layer passes, by pair of stream keys
            (``(("a", i), ("b", j))``, and ``(("a", i), ("a", i))`` for A's self co-moments).
        segments_per_node: on Ray, how many token segments each node (by Ray node id) ran; empty otherwise.
        task_peaks: on Ray with ``tracemalloc`` tracing the workers (``PYTHONTRACEMALLOC=1``), the largest measured
            peak of any task of each kind (``"fold"``, ``"merge"``, ``"finish"``; ``"probe"``: a fold's GEMM probe,
            before its fold, where one ran) in bytes; empty otherwise.
    """

    matched: dict[int, dict[str, Any]]
    summaries: dict[StreamPair, CoMomentSummary]
    segments_per_node: dict[str, int] = field(default_factory=dict)
    task_peaks: dict[str, int] = field(default_factory=dict)


def _check_store_reached(store: ActivationStore) -> None:
    """Refuse a local store that some node of the cluster does not see (a node-local disk): a task there would read
    another store at that path, or none, and fail naming a damage this store does not have."""
    from hrsa.runtime.connection import connect
    from hrsa.runtime.placement import FolderNotWritableError, check_every_node_sees

    try:
        check_every_node_sees(str(store.url), connect().nodes, flag="--store", use_instead=(
            "Use a URL such as s3://BUCKET/store, a path on a filesystem mounted on every node (NFS, EFS), or "
            "--scheduler threads to read it in this process."))
    except FolderNotWritableError:  # a store this process may only read: nothing to ask the nodes with, as before
        pass


def run_passes(
    store: ActivationStore,
    pair: ResolvedPair,
    backend: ChunkBackend,
    scheduler: ResolvedScheduler,
    on_block: OnBlock | None,
    matched: ChunkBackend | None = None,
) -> PassOutputs:
    """Every tile: in turn on this machine's threads, all at once as Ray tasks on a cluster; the matched tiles'
    products on ``matched`` (default ``backend``: see :func:`~hrsa.analyze.streaming.backends.matched_backend`).

    Returns:
        The finished matched results and cross-layer summaries.

    Raises:
        PlacementError: on Ray, no node holds one worker's memory (and a GPU for a CUDA backend).

    Warns:
        UnderdeterminedWarning: once for the run when a Procrustes fit was not unique.
    """
    # The plan counts the arrays alive: freed blocks must leave the resident set (AnalysisPlan.mmap_threshold)
    with allocations_mapped_from(pair.plan.mmap_threshold()):
        return _run_passes(store, pair, backend, scheduler, on_block, matched)


def _run_passes(store: ActivationStore, pair: ResolvedPair, backend: ChunkBackend, scheduler: ResolvedScheduler,
                on_block: OnBlock | None, matched: ChunkBackend | None) -> PassOutputs:
    mids = {"a": pair.info_a.id, "b": pair.info_b.id}

    def reader(tile: Tile) -> StateReader:  # a reader per tile: the shards it caches (counted) go with its pass
        arrays = {(s, k): store.hidden_state_array(mids[s], k) for s, k in tile.streams}
        return StateReader(arrays, pair.block_tokens, read_threads=pair.plan.inputs.read_threads)

    matched_on = matched or backend
    finish = functools.partial(finish_tile, options=FinishOptions(pair.metrics, pair.debiased, pair.save_rotation,
                                                                       matched_on.compute_dtype))

    def backend_of(tile: Tile) -> ChunkBackend:
        return matched_on if tile.kind == "matched" else backend

    def segments(tile: Tile, n: int) -> tuple[tuple[TokenBlock, ...], ...]:
        # float32 sums of a cross-layer tile's runs of blocks: segments cut between runs keep results independent
        # of the number of workers (float64 products sum into the float64 total: any cut gives the same to rounding)
        per_run = blocks_per_run(pair.block_tokens) if tile.rectangle and backend.compute_dtype == "float32" else 1
        return tuple(split_segments(pair.blocks, n, per_run))

    matched: dict[int, dict[str, Any]] = {}
    summaries: dict[StreamPair, CoMomentSummary] = {}
    nodes: Counter[str] = Counter()
    peaks: dict[str, int] = {}
    if scheduler.name == "ray":
        # Every tile at once (pair-parallel), each cut into as many segments as the workers left to it (data-parallel).
        per_tile = max(1, pair.plan.workers // max(1, pair.plan.passes))
        jobs = [TilePass(tile, reader(tile), segments(tile, per_tile), backend_of(tile), pair.plan.mmap_threshold())
                for tile in pair.plan.tiles]
        _check_store_reached(store)
        options = task_resources(pair.plan.estimated_peak, products_on_gpu(backend))
        for _, (m, s), records in run_tiles_on_ray(jobs, finish, options, pair.plan.workers):
            matched.update(m)
            summaries.update(s)
            nodes.update(r.node for r in records if r.kind == "fold")
            for r in records:
                if r.traced_peak is not None:
                    peaks[r.kind] = max(peaks.get(r.kind, 0), r.traced_peak)
            if on_block is not None:
                on_block(pair.n_tokens)
    else:
        for tile in pair.plan.tiles:
            tile_reader, tile_segments = reader(tile), segments(tile, pair.plan.workers)
            prepare_products(tile, tile_reader, backend_of(tile), pair.plan.estimated_peak, len(tile_segments))
            acc = run_tile(tile, tile_reader, tile_segments, backend_of(tile), scheduler, on_block,
                           host_sums=not pair.plan.sums_on_device(tile))
            m, s = finish(tile, acc)
            del acc  # free the tile's D x D accumulators before the next pass
            # and give the kernel back what glibc keeps of them: arrays under the mmap threshold (a D <= 362 co-moment
            # matrix, a group's Moments) stay in the worker threads' heaps, and the next pass's peak would stack on them
            release_freed_heap()
            matched.update(m)
            summaries.update(s)
    undetermined = sorted(k for k, out in matched.items() if "procrustes" in out and out["procrustes"].underdetermined)
    if undetermined:  # one warning for the run, not one per layer, naming its real cause
        d = pair.info_a.hidden_size
        cause = (f"{pair.n_tokens} tokens are no more than D = {d} dimensions: use more tokens than dimensions"
                 if pair.n_tokens <= d else
                 f"the cross-covariance is rank deficient although {pair.n_tokens} tokens exceed D = {d} (few distinct "
                 "tokens, e.g. at the embedding layer, or dimensions constant over the selection)")
        warnings.warn(
            f"Orthogonal Procrustes: the optimal rotation is not unique at hidden states {undetermined}, so their h_inv "
            f"means little (verdicts leave them out): {cause}.",
            UnderdeterminedWarning,
            stacklevel=3  # the caller of analyze_pair,
        )
    imprecise = sorted(k for k, out in matched.items() if "procrustes" in out and out["procrustes"].imprecise)
    if imprecise:
        warnings.warn(
            f"Orthogonal Procrustes: at hidden states {imprecise}, C_xy's two smallest singular values average "
            "below sqrt(float32 eps) of its largest, so the float32 products' rounding may move h_inv by more than 1e-6. "
            "Re-run with --compute-dtype float64 (auto gives Procrustes float64 products).",
            PrecisionWarning,
            stacklevel=3,  # the caller of analyze_pair
        )
    return PassOutputs(matched, summaries, dict(nodes), peaks)


@dataclass(frozen=True)
class FinishOptions:
    """What finishing a matched tile needs of the run (small: it travels to Ray's finish tasks)."""

    metrics: tuple[str, ...]
    debiased: bool
    save_rotation: bool
    compute_dtype: str = "float64"  # the products' dtype: Procrustes' rank test resolves no finer


def finish_tile(tile: Tile, acc: Any, options: FinishOptions) -> tuple[dict[int, dict[str, Any]], dict[StreamPair, CoMomentSummary]]:
    """Reduce each accumulator of the tile to what the results keep (numbers and O(D) vectors): ``(matched, summaries)``.
    A Procrustes fit's own warning is folded into one for the run (:func:`run_passes`)."""
    matched: dict[int, dict[str, Any]] = {}
    summaries: dict[StreamPair, CoMomentSummary] = {}
    summaries.update(getattr(acc, "summaries", {}))  # a whole pass's, reduced on a GPU (CrossTileTotals)
    for streams, value in acc.items():  # a cross-layer tile's CrossTileMoments yields its pairs' CrossMoments alike
        if tile.kind != "matched":
            summaries[streams] = value.summary()
            continue
        grouped = value if isinstance(value, GroupedMoments) else None
        value = grouped.total() if grouped is not None else value
        results = layer_results(value, options.metrics, debiased=options.debiased, save_rotation=options.save_rotation,
                                compute_dtype=options.compute_dtype)
        out: dict[str, Any] = {**results, "nulls": layer_nulls(value, options.metrics)}
        if grouped is not None:
            out["intervals"] = layer_intervals(grouped, value, layer_scores(results), options.metrics, options.debiased)
        matched[streams[0][1]] = out
    return matched, summaries
