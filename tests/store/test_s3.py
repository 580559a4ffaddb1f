"""The same store on s3:// through fsspec, against a local S3 endpoint (moto's server mode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hrsa.store import ActivationStore, StoreNotFoundError
from hrsa.store.testing import LAYERS, expected_layer, new_model
from hrsa.store.verify import verify_store

pytestmark = pytest.mark.integration


def _options(endpoint: str) -> dict[str, object]:
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}


def test_s3_round_trip_and_concurrent_writers(s3_endpoint: str) -> None:
    url = "s3://hrsa-test/store-a"
    store = ActivationStore.open(url, mode="a", storage_options=_options(s3_endpoint))
    new_model(store, "m", dtype="bfloat16", shard_tokens=128, chunk_tokens=32)
    n_units = store.model_info("m").n_units
    script = (
        "import json, sys\n"
        "from hrsa.store import ActivationStore\n"
        "from hrsa.store.testing import unit_values\n"
        "a = json.loads(sys.argv[1])\n"
        "w = ActivationStore.open(a['url'], mode='r+', storage_options=a['so']).writer('m')\n"
        "for u in w.units():\n"
        "    if u.index % 2 == a['rank']:\n"
        "        w.write_unit(u, {k: unit_values(u.index, u.start, u.stop, k, 'bfloat16') for k in w.info.hidden_states})\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, json.dumps({"url": url, "so": _options(s3_endpoint), "rank": r})])
        for r in range(2)
    ]
    assert all(p.wait(timeout=180) == 0 for p in procs)
    again = ActivationStore.open(url, mode="r", storage_options=_options(s3_endpoint))
    info = again.model_info("m")
    assert info.complete and info.n_units == n_units
    for k in range(LAYERS):
        got = again.hidden_state("m", k).compute()
        assert np.array_equal(got.view(np.uint16), expected_layer(again, "m", k).view(np.uint16))
    assert verify_store(again).ok


def test_s3_missing_store_is_a_clear_error(s3_endpoint: str) -> None:
    with pytest.raises(StoreNotFoundError):
        ActivationStore.open("s3://hrsa-test/absent", mode="r", storage_options=_options(s3_endpoint))


def test_cli_reads_s3_with_endpoint_from_the_environment(s3_endpoint: str, tmp_path) -> None:
    url = "s3://hrsa-test/store-cli"
    store = ActivationStore.open(url, mode="a", storage_options=_options(s3_endpoint))
    new_model(store, "m")
    from hrsa.store.testing import fill_model

    fill_model(store, "m")
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint}
    out = tmp_path / "x.npy"
    cmd = [sys.executable, "-m", "hrsa", "store", "get", url, "m", "--layer", "1", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(out), expected_layer(store, "m", 1))


def test_reads_on_s3_make_one_request_an_object(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a store, verifying it and reading every layer fetch each object with one GET: no HEAD before it (s3fs
    asks for a size before every whole read unless told to read in one stream; that doubled every round trip)."""
    import s3fs

    url = "s3://hrsa-test/store-requests"
    store = ActivationStore.open(url, mode="a", storage_options=_options(s3_endpoint))
    new_model(store, "m")
    from hrsa.store.testing import fill_model

    fill_model(store, "m")
    calls: dict[str, int] = {"head_object": 0, "get_object": 0}
    original = s3fs.S3FileSystem._call_s3

    async def counted(self: object, method: str, *args: object, **kwargs: object) -> object:  # every S3 request
        calls[method] = calls.get(method, 0) + 1
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    again = ActivationStore.open(url, mode="r", storage_options=_options(s3_endpoint))
    assert verify_store(again).ok
    for k in range(LAYERS):
        assert np.array_equal(again.hidden_state("m", k).compute(), expected_layer(again, "m", k))
    assert calls["get_object"] > 50 and calls["head_object"] == 0, calls


def test_a_users_own_max_concurrency_wins(s3_endpoint: str) -> None:
    """Shards over s3fs's 50 MB block read in concurrent ranges again when the user asks for it."""
    url = "s3://hrsa-test/store-concurrency"
    ActivationStore.open(url, mode="a", storage_options=_options(s3_endpoint))
    default = ActivationStore.open(url, mode="r", storage_options=_options(s3_endpoint))
    asked = ActivationStore.open(url, mode="r", storage_options={**_options(s3_endpoint), "max_concurrency": 8})
    assert default.group("corpora").store.fs.max_concurrency == 1
    assert asked.group("corpora").store.fs.max_concurrency == 8
