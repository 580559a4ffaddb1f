"""HRSA metrics as pure functions of streaming statistics (numpy only; no Dask, Zarr or Ray).

Each metric module offers ``<metric>_from_moments(m, ...)`` (the core, used by the streaming layer) and a
thin in-memory ``<metric>(x, y, ...)`` that builds ``hrsa.analyze.moments.Moments`` and calls it. A new
metric is one file here plus its names in ``__all__``.
"""

from __future__ import annotations

from hrsa.analyze.metrics._common import UnderdeterminedWarning
from hrsa.analyze.metrics.dimwise_correlation import (
    DimwiseCorrelationResult,
    dimwise_correlation,
    dimwise_correlation_from_moments,
    dimwise_correlation_from_summaries,
)
from hrsa.analyze.metrics.linear_cka import CkaResult, linear_cka, linear_cka_from_moments, linear_cka_from_summaries
from hrsa.analyze.metrics.procrustes import (
    ProcrustesResult,
    inverse_row_entropy,
    procrustes,
    procrustes_from_moments,
    procrustes_similarity,
    procrustes_similarity_from_moments,
)

__all__ = [
    "CkaResult",
    "DimwiseCorrelationResult",
    "ProcrustesResult",
    "UnderdeterminedWarning",
    "dimwise_correlation",
    "dimwise_correlation_from_moments",
    "dimwise_correlation_from_summaries",
    "inverse_row_entropy",
    "linear_cka",
    "linear_cka_from_moments",
    "linear_cka_from_summaries",
    "procrustes",
    "procrustes_from_moments",
    "procrustes_similarity",
    "procrustes_similarity_from_moments",
]
