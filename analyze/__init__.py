"""HRSA metrics: streaming accumulators on Dask, k-NN overlap on FAISS, linear probes, results, report.

Parts, imports pointing down (tests/test_layers.py checks it): the pure math (``accumulators/``, ``metrics/``;
numpy only) <- streaming (``streaming/``: backends, plan, passes on Dask) <- the settings (``config``) <- the local
metrics (``local/``: k-NN overlap, probes) <- the pair analysis (``pair/``) <- the results file (``results``) <-
presentation (``report/``: figures, summary, dynamics, HTML) <- the job (``job``) <- the CLI (``cli``). The names
below load lazily, so importing the pure math never pulls in Dask, Zarr or the store.

Example (what ``hrsa analyze`` does, from Python):
    >>> from hrsa.analyze import AnalyzeConfig, run_analysis  # doctest: +SKIP
    >>> run = run_analysis(AnalyzeConfig(store="hrsa-out/store", pair=("base", "tuned"), cross_layer=True))  # doctest: +SKIP
    >>> run.saved.json_path, run.figures  # results.json, and the figures drawn from it  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AnalysisPlan",
    "AnalysisRun",
    "AnalyzeConfig",
    "KnnOptions",
    "PairResults",
    "ProbeOptions",
    "SavedResults",
    "TokenSelection",
    "analyze_pair",
    "knn_pair",
    "probe_pair",
    "run_analysis",
    "save_results",
]

_LAZY = {
    "AnalysisPlan": "hrsa.analyze.streaming.plan",
    "AnalysisRun": "hrsa.analyze.job",
    "AnalyzeConfig": "hrsa.analyze.config",
    "KnnOptions": "hrsa.analyze.local.knn",
    "PairResults": "hrsa.analyze.pair",
    "ProbeOptions": "hrsa.analyze.local.probe",
    "SavedResults": "hrsa.analyze.results",
    "TokenSelection": "hrsa.store.selection",
    "analyze_pair": "hrsa.analyze.pair",
    "knn_pair": "hrsa.analyze.local.knn",
    "probe_pair": "hrsa.analyze.local.probe",
    "run_analysis": "hrsa.analyze.job",
    "save_results": "hrsa.analyze.results",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
