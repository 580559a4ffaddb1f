"""Phase 2 of ``analyze_pair``: one streaming pass per tile, each tile finished into small results at once.

Each pass (:func:`hrsa.analyze.streaming.stream.run_tile`) folds every token block into the tile's accumulators;
a matched tile's ``Moments`` are finished into CKA, dimension-wise correlation and Procrustes results, a
cross-layer tile's ``CrossMoments`` into their O(D) summaries, so the tile's D x D accumulators are freed before
the next pass.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hrsa.analyze.accumulators.groups import GroupedMoments
from hrsa.analyze.metrics import UnderdeterminedWarning
from hrsa.analyze.pair.layer_metrics import layer_results, layer_scores
from hrsa.analyze.pair.uncertainty import layer_intervals, layer_nulls
from hrsa.analyze.streaming.stream import StateReader, run_tile, split_segments

if TYPE_CHECKING:
    from hrsa.analyze.accumulators.cross_moments import CoMomentSummary
    from hrsa.analyze.pair.resolve import ResolvedPair
    from hrsa.analyze.streaming.backends import ChunkBackend
    from hrsa.analyze.streaming.plan import StreamPair, Tile
    from hrsa.analyze.streaming.stream import OnBlock, ResolvedScheduler
    from hrsa.store import ActivationStore

__all__ = ["PassOutputs", "run_passes"]


@dataclass(frozen=True)
class PassOutputs:
    """What the passes leave: small results, the accumulators already freed.

    Attributes:
        matched: finished results by matched hidden state, ``{k: {"cka": ..., "procrustes": ...}}`` (only the
            metrics asked for; empty when no matched pass ran), with ``"nulls"`` (score name -> NullBaseline) and,
            when the pass kept groups of documents, ``"intervals"`` (score name -> Interval).
        summaries: co-moment summaries of the cross-layer passes, by pair of stream keys
            (``(("a", i), ("b", j))``, and ``(("a", i), ("a", i))`` for A's self co-moments).
    """

    matched: dict[int, dict[str, Any]]
    summaries: dict[StreamPair, CoMomentSummary]


def run_passes(
    store: ActivationStore,
    pair: ResolvedPair,
    backend: ChunkBackend,
    scheduler: ResolvedScheduler,
    on_block: OnBlock | None,
) -> PassOutputs:
    """Every tile in turn.

    Returns:
        The finished matched results and cross-layer summaries.

    Warns:
        UnderdeterminedWarning: once for the run when a Procrustes fit was not unique.
    """
    mids = {"a": pair.info_a.id, "b": pair.info_b.id}
    segments = split_segments(pair.blocks, pair.plan.workers)
    matched: dict[int, dict[str, Any]] = {}
    summaries: dict[StreamPair, CoMomentSummary] = {}
    for tile in pair.plan.tiles:
        # A reader per tile: the shards it caches (counted by the plan) go with the tile's pass.
        reader = StateReader({(s, k): store.hidden_state(mids[s], k, chunk_tokens=pair.block_tokens) for s, k in tile.streams})
        acc = run_tile(tile, reader, segments, backend, scheduler, on_block)
        del reader
        _finish_tile(tile, acc, pair, matched, summaries)
        del acc  # free the tile's D x D accumulators before the next pass
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
    return PassOutputs(matched, summaries)


def _finish_tile(tile: Tile, acc: dict, pair: ResolvedPair, matched: dict, summaries: dict) -> None:
    """Reduce each accumulator of the tile to what the results keep (numbers and O(D) vectors); a Procrustes fit's
    own warning is folded into one for the run (:func:`run_passes`)."""
    for streams, value in acc.items():
        if tile.kind != "matched":
            summaries[streams] = value.summary()
            continue
        grouped = value if isinstance(value, GroupedMoments) else None
        value = grouped.total() if grouped is not None else value
        results = layer_results(value, pair.metrics, debiased=pair.debiased, save_rotation=pair.save_rotation)
        out: dict[str, Any] = {**results, "nulls": layer_nulls(value, pair.metrics)}
        if grouped is not None:
            out["intervals"] = layer_intervals(grouped, value, layer_scores(results), pair.metrics, pair.debiased)
        matched[streams[0][1]] = out
