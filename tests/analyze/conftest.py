"""Fixtures for the metric tests: seeded generators and activations shaped like real LLM hidden states.

Oracles are *not* here: each test file keeps its own plain float64 formulas, independent of hrsa.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

# Shape of "real" activations: a few massive-offset dimensions (LLMs carry 1e3-1e4 in some channels)
# and a few outlier-scale dimensions, on top of a unit-scale bulk.
OFFSETS = (1e3, 3e3, 1e4)
OUTLIER_SCALES = (30.0, 100.0, 300.0)

MakePair = Callable[..., tuple[np.ndarray, np.ndarray]]


@pytest.fixture(autouse=True)
def _seed_legacy_numpy() -> None:
    """Seed numpy's global generator, so any code that uses it is reproducible."""
    np.random.seed(0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20260121)


def activations(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """(n, d) float64 values: outlier scales in dimensions 0-2, large offsets in dimensions 3-5 (d >= 6)."""
    if d < 6:
        raise ValueError(f"Expected d >= 6 for activation-like data. Got {d} instead.")
    x = rng.normal(size=(n, d))  # (n, d)
    x[:, :3] *= OUTLIER_SCALES
    x[:, 3:6] += OFFSETS
    return x


@pytest.fixture
def make_pair(rng: np.random.Generator) -> MakePair:
    """Factory: (x, y) of shape (n, d), y a noisy mix of x; float32 by default, as stored activations are."""

    def make(n: int, d: int, *, dtype: type = np.float32, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        x = activations(rng, n, d)
        mix = np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)  # (d, d), close to the identity
        y = x @ mix + noise * activations(rng, n, d)
        return x.astype(dtype), y.astype(dtype)

    return make
