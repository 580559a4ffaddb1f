"""Store fixtures: deterministic activations shaped like real ones, and a local S3 endpoint."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

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
