"""Every docstring Example in the analyze math layer runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "hrsa.analyze.moments",
    "hrsa.analyze.cross_moments",
    "hrsa.analyze.plan",
    "hrsa.analyze.stream",
    "hrsa.analyze.metrics.linear_cka",
    "hrsa.analyze.metrics.dimwise_correlation",
    "hrsa.analyze.metrics.procrustes",
    "hrsa.analyze.metrics.knn_overlap",
    "hrsa.analyze.metrics.linear_probe",
    "hrsa.analyze.knn",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{name} has no Example"
    assert result.failed == 0
