"""Phase 3 of ``analyze_pair``: the passes' outputs assembled into a frozen :class:`PairResults`.

Per matched hidden state, the results of the matched passes; with cross-layer passes, the (I, J) CKA and
dimension-wise correlation matrices from the co-moment summaries, whose diagonal also gives the per-layer values
when no matched pass ran.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from hrsa.analyze.metrics import (
    CkaResult,
    DimwiseCorrelationResult,
    dimwise_correlation_from_summaries,
    linear_cka_from_summaries,
)
from hrsa.analyze.pair.pair_results import PairResults

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from hrsa.analyze.accumulators.cross_moments import CoMomentSummary
    from hrsa.analyze.pair.passes import PassOutputs
    from hrsa.analyze.pair.resolve import ResolvedPair
    from hrsa.analyze.streaming.plan import StreamPair
    from hrsa.store.selection import TokenSelection

__all__ = ["assemble"]

_PER_LAYER = ("cka", "cka_debiased", "dimcorr", "procrustes", "procrustes_distance", "cca", "svcca", "pwcca",
              "regression", "effective_rank")


def assemble(
    pair: ResolvedPair, selection: TokenSelection, outputs: PassOutputs, settings: Mapping[str, Any]
) -> PairResults:
    """The results of the streaming metrics (the local ones are added by ``analyze_pair``)."""
    matched = outputs.matched
    per_layer: dict[str, Any] = {}
    for name in _PER_LAYER:
        values = [matched[k].get(name) for k in pair.matched] if matched else []
        per_layer[name] = tuple(values) if values and all(v is not None for v in values) else None
    matrices = _cross_layer(pair, outputs.summaries, per_layer) if pair.rows else {}
    return PairResults(
        a=pair.info_a.id, b=pair.info_b.id, corpus=pair.info_a.corpus, n_tokens=pair.n_tokens, selection=selection,
        metrics=pair.metrics, matched=pair.matched,
        hidden_states_a=pair.rows or pair.matched, hidden_states_b=pair.cols or pair.matched,
        plan=pair.plan, settings=dict(settings), alignment=_alignment(pair), **per_layer, **matrices,
        intervals=_per_score(pair, matched, "intervals"), nulls=_per_score(pair, matched, "nulls"),
        n_groups=pair.n_groups, models={"a": pair.info_a.record(), "b": pair.info_b.record()},
    )


def _per_score(pair: ResolvedPair, matched: Mapping[int, Mapping[str, Any]], key: str) -> dict[str, tuple[Any, ...]]:
    """``{score name: (value per matched layer)}`` of the intervals or nulls every matched layer has."""
    if not matched:
        return {}
    names = set.intersection(*(set(matched[k].get(key, {})) for k in pair.matched))
    return {name: tuple(matched[k][key][name] for k in pair.matched) for name in sorted(names)}


def _alignment(pair: ResolvedPair) -> dict[str, Any] | None:
    if pair.pairs.identical:
        return None
    return {"corpus_b": pair.info_b.corpus, "aligned": pair.pairs.n_pairs, "tokens_a": pair.pairs.n_a,
            "tokens_b": pair.pairs.n_b}


def _cross_layer(
    pair: ResolvedPair, summaries: Mapping[StreamPair, CoMomentSummary], per_layer: dict[str, Any]
) -> dict[str, Any]:
    """The (I, J) matrices from the summaries; fills the per-layer CKA/dimcorr when no matched pass ran."""
    self_a = {i: summaries[("a", i), ("a", i)] for i in pair.rows}
    self_b = {j: summaries[("b", j), ("b", j)] for j in pair.cols}
    cross = {(i, j): summaries[("a", i), ("b", j)] for i in pair.rows for j in pair.cols}

    def cka(i: int, j: int) -> CkaResult:
        return linear_cka_from_summaries(cross[i, j], self_a[i], self_b[j])

    def dimcorr(i: int, j: int) -> DimwiseCorrelationResult:
        return dimwise_correlation_from_summaries(cross[i, j], self_a[i], self_b[j])

    out: dict[str, Any] = {}
    if "cka" in pair.metrics:
        out["cka_matrix"] = _matrix(pair, lambda i, j: cka(i, j).value)
        per_layer["cka"] = per_layer["cka"] or tuple(cka(k, k) for k in pair.matched)
    if "dimcorr" in pair.metrics:
        out["dimcorr_matrix"] = _matrix(pair, lambda i, j: dimcorr(i, j).mean)
        per_layer["dimcorr"] = per_layer["dimcorr"] or tuple(dimcorr(k, k) for k in pair.matched)
    return out


def _matrix(pair: ResolvedPair, value: Callable[[int, int], float]) -> NDArray[np.float64]:
    return np.array([[value(i, j) for j in pair.cols] for i in pair.rows], dtype=np.float64)  # (I, J)
