"""HRSA metrics: streaming accumulators on Dask, k-NN overlap on FAISS, linear probes, results, report.

Layers (imports point down): the pure math (``moments``, ``cross_moments``, ``metrics``; numpy only) <-
streaming and orchestration (``backends``, ``plan``, ``stream``, ``pair``, ``knn``, ``probe``; Dask, Ray,
torch, FAISS, scikit-learn) <- I/O (``results``, ``figures``, ``config``, ``cli``). The names below load lazily, so importing the pure math
never pulls in Dask, Zarr or the store.

Example:
    >>> from hrsa.analyze import analyze_pair, save_results  # doctest: +SKIP
    >>> results = analyze_pair(store, "base", "tuned", cross_layer=True, memory_budget="4GB")  # doctest: +SKIP
    >>> save_results(results, Path("out"), store=store)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AnalysisPlan",
    "AnalyzeConfig",
    "KnnOptions",
    "PairResults",
    "ProbeOptions",
    "SavedResults",
    "TokenSelection",
    "analyze_pair",
    "knn_pair",
    "probe_pair",
    "save_results",
]

_LAZY = {
    "AnalysisPlan": "hrsa.analyze.streaming.plan",
    "AnalyzeConfig": "hrsa.analyze.config",
    "KnnOptions": "hrsa.analyze.local.knn",
    "ProbeOptions": "hrsa.analyze.local.probe",
    "knn_pair": "hrsa.analyze.local.knn",
    "probe_pair": "hrsa.analyze.local.probe",
    "PairResults": "hrsa.analyze.pair",
    "SavedResults": "hrsa.analyze.results",
    "TokenSelection": "hrsa.analyze.pair",
    "analyze_pair": "hrsa.analyze.pair",
    "save_results": "hrsa.analyze.results",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
