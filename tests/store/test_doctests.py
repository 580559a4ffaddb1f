"""Every docstring Example in the store runs."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["hrsa.store", "hrsa.store.activation_store", "hrsa.store.labels"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
