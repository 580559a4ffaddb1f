"""Test tiers and shared fixtures.

Tiers (markers): unit (default), property, integration, slow (opt-in with --run-slow), gpu (skips
without CUDA), data (skips without ../shared/data), real_model (skips without the packaged models).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub is reachable; never wait on one
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    skip_gpu = pytest.mark.skip(reason="gpu: no CUDA device here")
    skip_data = pytest.mark.skip(reason=f"data: {SHARED_DATA} is absent")
    has_cuda = _has_cuda() if any("gpu" in item.keywords for item in items) else False
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(skip_data)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository (tests using it are marked ``data``)."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole test session (starting one costs ~5 s), via hrsa's own connect."""
    ray = pytest.importorskip("ray")
    from hrsa.cluster.connection import connect

    connection = connect(num_cpus=2)
    yield connection
    ray.shutdown()
