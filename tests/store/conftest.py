"""Store fixtures: deterministic activations shaped like real ones, and a local S3 endpoint."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A local S3 (moto's server mode on 127.0.0.1, as s3fs's own tests do), with one bucket."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="hrsa-test")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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


