"""Store fixtures: deterministic activations shaped like real ones, and one local and one S3 target per test (the
S3 endpoint, moto's server, is tests/conftest.py's `s3_endpoint`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from hrsa.store import ActivationStore
from hrsa.store.testing import fill_model, new_model

@pytest.fixture
def store(tmp_path) -> ActivationStore:
    return ActivationStore.open(tmp_path / "store", mode="a")


@pytest.fixture
def filled_store(store: ActivationStore) -> ActivationStore:
    new_model(store, "m")
    fill_model(store, "m")
    return store


# -- targets: one local and one S3 store per test (the fault and claim matrices run on both) ---------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    url: str
    storage_options: dict[str, Any] | None
    env: dict[str, str]

    def open(self, mode: str = "r+", suffix: str = "") -> ActivationStore:
        return ActivationStore.open(self.url + suffix, mode=mode, storage_options=self.storage_options)  # type: ignore[arg-type]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def target(request: pytest.FixtureRequest, tmp_path) -> Target:
    if request.param == "local":
        return Target(str(tmp_path / "store"), None, {})
    endpoint = request.getfixturevalue("s3_endpoint")
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    return Target(f"s3://hrsa-test/faults-{uuid.uuid4().hex[:8]}", options, {"AWS_ENDPOINT_URL": endpoint})


