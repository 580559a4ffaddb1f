"""Every docstring Example in the analyze math and streaming layers runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "hrsa.analyze.accumulators.centring",
    "hrsa.analyze.accumulators.moments",
    "hrsa.analyze.accumulators.cross_moments",
    "hrsa.analyze.accumulators.testing",
    "hrsa.analyze.streaming.plan",
    "hrsa.analyze.streaming.stream",
    "hrsa.analyze.metrics.linear_cka",
    "hrsa.analyze.metrics.dimwise_correlation",
    "hrsa.analyze.metrics.procrustes",
    "hrsa.analyze.metrics.knn_overlap",
    "hrsa.analyze.metrics.linear_probe",
    "hrsa.analyze.local.knn",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{name} has no Example"
    assert result.failed == 0
