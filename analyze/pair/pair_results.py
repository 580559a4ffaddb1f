"""``PairResults``: everything one comparison of model A with model B computed (what ``analyze_pair`` returns)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from hrsa.analyze.local.knn import KnnPairResult
    from hrsa.analyze.local.probe import ProbePairResult
    from hrsa.analyze.metrics import (
        CcaResult,
        CkaResult,
        DimwiseCorrelationResult,
        EffectiveRankResult,
        LinearRegressionResult,
        ProcrustesDistanceResult,
        ProcrustesResult,
        PwccaResult,
        SvccaResult,
    )
    from hrsa.analyze.metrics.uncertainty import Interval, NullBaseline
    from hrsa.analyze.streaming.plan import AnalysisPlan
    from hrsa.store.selection import TokenSelection

__all__ = ["PairResults"]


@dataclass(frozen=True, eq=False)  # eq=False: holds arrays
class PairResults:
    """Everything one comparison of model A with model B computed.

    Attributes:
        a, b: model ids; corpus: their corpus id (A's); n_tokens: tokens compared on.
        selection: the token selection; metrics: the metrics asked for.
        matched: hidden states compared one to one (k of A with k of B); the per-layer tuples below
            follow this order.
        hidden_states_a, hidden_states_b: rows and columns of the cross-layer matrices (both equal
            to ``matched`` without ``cross_layer``).
        cka, cka_debiased, dimcorr, procrustes: per matched layer, or None when not computed; likewise
            procrustes_distance, cca, svcca, pwcca, regression (R^2 both ways) and effective_rank, on request.
        cka_matrix, dimcorr_matrix: (len(hidden_states_a), len(hidden_states_b)) biased CKA and mean
            dimension-wise correlation, or None without ``cross_layer``.
        knn, probe: k-NN overlap and cross-model probes, or None when not asked for.
        plan: the tiles that ran; settings: scheduler, backend, compute dtype, block size, workers.
        intervals: per score (``"cka/diagonal"``, ``"procrustes/h_inv"``, ... as in results.json), its jackknife
            interval per matched layer over ``n_groups`` groups of documents; empty without groups.
        nulls: per score that has one (biased CKA, mean dimension-wise correlation), its permutation null per
            matched layer.
        alignment: when B's corpus is another one whose tokens were aligned with A's by content span: its id, the
            aligned tokens, and the tokens each model offered (``{"corpus_b", "aligned", "tokens_a", "tokens_b"}``);
            None when both ran over the same tokens.
        models: ``{"a": record, "b": record}``, what the store knew of each model when compared
            (:meth:`hrsa.store.ModelInfo.record`: source, weights digest, settings, progress, identity).
    """

    a: str
    b: str
    corpus: str
    n_tokens: int
    selection: TokenSelection
    metrics: tuple[str, ...]
    matched: tuple[int, ...]
    hidden_states_a: tuple[int, ...]
    hidden_states_b: tuple[int, ...]
    plan: AnalysisPlan
    settings: Mapping[str, Any] = field(default_factory=dict)
    cka: tuple[CkaResult, ...] | None = None
    cka_debiased: tuple[CkaResult, ...] | None = None
    dimcorr: tuple[DimwiseCorrelationResult, ...] | None = None
    procrustes: tuple[ProcrustesResult, ...] | None = None
    procrustes_distance: tuple[ProcrustesDistanceResult, ...] | None = None
    cca: tuple[CcaResult, ...] | None = None
    svcca: tuple[SvccaResult, ...] | None = None
    pwcca: tuple[PwccaResult, ...] | None = None
    regression: tuple[LinearRegressionResult, ...] | None = None
    effective_rank: tuple[EffectiveRankResult, ...] | None = None
    cka_matrix: NDArray[np.float64] | None = None
    dimcorr_matrix: NDArray[np.float64] | None = None
    knn: KnnPairResult | None = None
    probe: ProbePairResult | None = None
    alignment: Mapping[str, Any] | None = None
    intervals: Mapping[str, tuple[Interval, ...]] = field(default_factory=dict)
    nulls: Mapping[str, tuple[NullBaseline, ...]] = field(default_factory=dict)
    n_groups: int = 0
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def cross_layer(self) -> bool:
        return self.cka_matrix is not None or self.dimcorr_matrix is not None
