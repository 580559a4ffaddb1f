"""The pure math layer imports without Dask, Zarr, Ray or torch (DESIGN: imports only point down)."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = ["hrsa.analyze", "hrsa.analyze.accumulators", "hrsa.analyze.accumulators.centring",
           "hrsa.analyze.accumulators._chan", "hrsa.analyze.accumulators.moments",
           "hrsa.analyze.accumulators.cross_moments", "hrsa.analyze.metrics", "hrsa.analyze.metrics.knn_overlap",
           "hrsa.analyze.metrics.linear_probe"]


@pytest.mark.parametrize("name", MODULES)
def test_math_layer_imports_no_heavy_dependencies(name: str) -> None:
    # A fresh interpreter: this test session may already have imported any of them.
    code = (
        f"import sys; import {name}; "
        "bad = sorted(m for m in ('dask', 'zarr', 'ray', 'torch', 'faiss') if m in sys.modules); "
        "assert not bad, f'{bad} imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_streaming_layer_imports_no_io_layer() -> None:
    # Orchestration may use Dask and the store, but not the result files, figures or CLI above it.
    code = (
        "import sys; import hrsa.analyze.pair, hrsa.analyze.streaming.stream, hrsa.analyze.streaming.plan, hrsa.analyze.streaming.backends; "
        "bad = sorted(m for m in ('hrsa.analyze.results', 'hrsa.analyze.report.figures', 'hrsa.analyze.cli', 'matplotlib') "
        "if m in sys.modules); assert not bad, f'{bad} imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
