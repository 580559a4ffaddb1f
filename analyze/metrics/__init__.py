"""HRSA metrics as pure functions of streaming statistics (numpy only; no Dask, Zarr, Ray or FAISS).

Each metric module offers ``<metric>_from_moments(m, ...)`` (the core, used by the streaming layer) and a
thin in-memory ``<metric>(x, y, ...)`` that builds ``hrsa.analyze.accumulators.moments.Moments`` and calls
it. A new metric is one file here plus its names in ``__all__``. The local metrics differ in their statistics:
k-NN overlap works from neighbour indices (``knn_overlap_from_neighbors``) and the probe from pooled
per-document features (``linear_probe``; scikit-learn, imported when called).
"""

from __future__ import annotations

from hrsa.analyze.metrics._common import PrecisionWarning, UnderdeterminedWarning
from hrsa.analyze.metrics.cca import CcaResult, cca, cca_from_moments
from hrsa.analyze.metrics.dimwise_correlation import (
    DimwiseCorrelationResult,
    dimwise_correlation,
    dimwise_correlation_from_moments,
    dimwise_correlation_from_summaries,
)
from hrsa.analyze.metrics.effective_rank import EffectiveRankResult, effective_rank, effective_rank_from_moments
from hrsa.analyze.metrics.knn_overlap import (
    KnnOverlapResult,
    cosine_neighbors,
    jaccard_rows,
    knn_overlap,
    knn_overlap_from_neighbors,
)
from hrsa.analyze.metrics.linear_cka import CkaResult, linear_cka, linear_cka_from_moments, linear_cka_from_summaries
from hrsa.analyze.metrics.linear_probe import ProbeResult, ProbeScores, SplitScores, linear_probe, stratified_split
from hrsa.analyze.metrics.linear_regression import (
    LinearRegressionResult,
    linear_regression,
    linear_regression_from_moments,
)
from hrsa.analyze.metrics.procrustes import (
    ProcrustesResult,
    inverse_row_entropy,
    procrustes,
    procrustes_from_moments,
    procrustes_similarity,
    procrustes_similarity_from_moments,
)
from hrsa.analyze.metrics.procrustes_distance import (
    ProcrustesDistanceResult,
    procrustes_distance,
    procrustes_distance_from_moments,
)
from hrsa.analyze.metrics.pwcca import PwccaResult, pwcca, pwcca_from_moments
from hrsa.analyze.metrics.svcca import SvccaResult, svcca, svcca_from_moments

__all__ = [
    "CcaResult",
    "CkaResult",
    "DimwiseCorrelationResult",
    "EffectiveRankResult",
    "KnnOverlapResult",
    "LinearRegressionResult",
    "ProbeResult",
    "ProbeScores",
    "ProcrustesDistanceResult",
    "ProcrustesResult",
    "PwccaResult",
    "SplitScores",
    "SvccaResult",
    "PrecisionWarning",
    "UnderdeterminedWarning",
    "cca",
    "cca_from_moments",
    "cosine_neighbors",
    "dimwise_correlation",
    "dimwise_correlation_from_moments",
    "dimwise_correlation_from_summaries",
    "effective_rank",
    "effective_rank_from_moments",
    "inverse_row_entropy",
    "jaccard_rows",
    "knn_overlap",
    "knn_overlap_from_neighbors",
    "linear_cka",
    "linear_cka_from_moments",
    "linear_cka_from_summaries",
    "linear_probe",
    "linear_regression",
    "linear_regression_from_moments",
    "procrustes",
    "procrustes_distance",
    "procrustes_distance_from_moments",
    "procrustes_from_moments",
    "procrustes_similarity",
    "procrustes_similarity_from_moments",
    "pwcca",
    "pwcca_from_moments",
    "stratified_split",
    "svcca",
    "svcca_from_moments",
]
