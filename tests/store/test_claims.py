"""Exactly-once with many writers: claims, leases, done records created once; kills at every store write of a unit.

Each test runs on a local store and on S3 (moto's server), through real processes where processes race.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

from hrsa.store import ActivationStore
from hrsa.store.objects import delete_key, get_bytes, list_keys, put_bytes
from hrsa.store.testing import LAYERS, expected_layer, fill_model, make_table, new_model, unit_values
from hrsa.store.unit_records import Claim, writer_name
from hrsa.store.verify import verify_store

from .conftest import Target

pytestmark = pytest.mark.integration

# A writer process: opens the store (creating it, the corpus and the model if absent, as racing coordinators do),
# then tries to write every unit; prints how many it wrote.
RACER = r"""
import json, sys
from hrsa.store import ActivationStore
from hrsa.store.testing import new_model, unit_values
a = json.loads(sys.argv[1])
store = ActivationStore.open(a["url"], mode="a", storage_options=a["so"])
new_model(store, "m", shard_tokens=128, chunk_tokens=32, exist_ok=True)
writer = store.writer("m")
written = 0
for unit in writer.units():
    written += writer.write_unit(unit, {k: unit_values(unit.index, unit.start, unit.stop, k, "float32") for k in range(4)})
print(written)
"""


def _racers(target: Target, n: int) -> list[int]:
    args = json.dumps({"url": target.url, "so": target.storage_options})
    procs = [subprocess.Popen([sys.executable, "-c", RACER, args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    return [int(out) for out, _ in outs]


def test_racing_writers_create_one_store_and_write_each_unit_exactly_once(target: Target) -> None:
    """Four processes create the same new store, corpus and model, then all try every unit: 8 units, 8 writes."""
    written = _racers(target, 4)
    store = target.open("r")
    assert sum(written) == store.model_info("m").n_units == 8, written
    assert verify_store(store).ok
    for k in range(LAYERS):
        assert np.array_equal(store.hidden_state("m", k).compute(), expected_layer(store, "m", k))


def _stale_probe(store: ActivationStore, monkeypatch: pytest.MonkeyPatch, before_clearing: Any) -> None:
    """Make ``store`` see model "m" half-created once (as while another coordinator was between its arrays and its
    group metadata), then run ``before_clearing``: what that coordinator did since."""
    probe = store._probe_model
    seen = iter([("half-created", None)])

    def stale(mid: str) -> tuple[str, Any]:
        answer = next(seen, None)
        if answer is None:
            return probe(mid)
        before_clearing()
        return answer

    monkeypatch.setattr(store, "_probe_model", stale)


def test_a_creator_that_saw_the_model_half_created_keeps_what_another_finished_meanwhile(
    target: Target, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Coordinator B probes while A is mid-creation; A then finishes and writes a unit (its claim still held on
    another). B's re-run (exist_ok) must keep A's metadata, done record and claim: it found them, it did not leave them."""
    a = target.open("a")
    cid = a.write_corpus(make_table(), tokenizer={"name": "test-tok", "fingerprint": "fp-1"}, source="test")
    spec = {"corpus": cid, "n_hidden_states": LAYERS, "hidden_size": 24, "dtype": "float32", "chunk_tokens": 32,
            "shard_tokens": 128, "exist_ok": True}
    b = target.open("a")
    held: list[Any] = []

    def a_creates_and_writes() -> None:
        a.create_model("m", **spec)
        writer = a.writer("m")
        unit = writer.units()[0]
        writer.write_unit(unit, {k: unit_values(0, unit.start, unit.stop, k, "float32") for k in range(LAYERS)})
        held.extend([writer.claim(writer.units()[1]), get_bytes(_raw(a), "models/m/zarr.json")])

    _stale_probe(b, monkeypatch, a_creates_and_writes)
    assert b.create_model("m", **spec) == a.model_info("m")
    claim, meta = held
    assert claim is not None and meta is not None and get_bytes(_raw(a), "models/m/zarr.json") == meta
    assert a.writer("m").done_mask().tolist() == [True] + [False] * 7
    assert a.writer("m").holder(a.writer("m").units()[1]) is not None
    assert [p.what.split(";")[0] for p in verify_store(a).problems] == ["7 of 8 work units not done"]


@pytest.mark.slow_on_s3  # 18 s on S3 through moto; the stale-probe test above runs both rows
def test_a_re_run_clears_the_records_a_half_deleted_model_left(target: Target) -> None:
    """A model deleted part-way (records left, metadata gone) is half-created: a re-run starts it clean, units undone."""
    store = target.open("a")
    new_model(store, "m", shard_tokens=128, chunk_tokens=32)
    fill_model(store, "m")
    delete_key(_raw(store), "models/m/zarr.json")  # a delete_model killed after the group's metadata
    assert store.half_created_models() == ["m"]
    new_model(store, "m", shard_tokens=128, chunk_tokens=32, exist_ok=True)
    assert not store.writer("m").done_mask().any()
    fill_model(store, "m")
    assert verify_store(store).ok


def _raw(store: ActivationStore):  # type: ignore[no-untyped-def]
    return store.group("models").store


def _plant_claim(store: ActivationStore, unit: int, attempt: int, owner: str, expires: float) -> None:
    claim = Claim(unit, attempt, "someone-else", owner, expires)
    put_bytes(_raw(store), f"models/m/claims/{unit}/{attempt}", claim.to_bytes())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(("owner", "expires_in", "taken"), [
    ("elsewhere:1", 60.0, False),                     # another machine's live lease: left alone
    ("elsewhere:1", -1.0, True),                      # its lease ran out: the writer died
    (f"{writer_name().rpartition(':')[0]}:DEAD", 60.0, True),  # a process of this machine that is gone: at once
    # The same host name, another kernel or PID namespace (a container with the host's network and name, a machine
    # named alike): its PIDs are not ours to look up, so its live lease is left alone.
    (f"{socket.gethostname()}@another-boot.4026531836:DEAD", 60.0, False),
    (f"{socket.gethostname()}:DEAD", 60.0, False),    # written by an hrsa that did not say its PID namespace
])
def test_a_claim_is_taken_over_only_when_its_writer_is_gone(target: Target, owner: str, expires_in: float, taken: bool) -> None:
    store = target.open("a")
    new_model(store, "m")
    owner = owner.replace("DEAD", str(_dead_pid()))
    _plant_claim(store, 1, 1, owner, time.time() + expires_in)
    writer = store.writer("m")
    unit = writer.units()[1]
    assert (writer.holder(unit) is None) == taken
    values = {k: unit_values(1, unit.start, unit.stop, k, "float32") for k in range(LAYERS)}
    assert writer.write_unit(unit, values) is taken
    assert writer.done_mask()[1] == taken
    if taken:
        assert writer.record(unit).attempt == 2  # the next attempt, created once


def test_a_writer_whose_lease_lapsed_writes_nothing(target: Target) -> None:
    """A stalled writer (its lease ran out while it computed) must not overwrite the shards of the one that took over."""
    store = target.open("a")
    new_model(store, "m")
    stalled = store.writer("m")
    unit = stalled.units()[0]
    claim = stalled.claim(unit)
    assert claim is not None
    # Its lease lapses (as seen from elsewhere); another writer takes attempt 2 and writes the unit.
    put_bytes(_raw(store), f"models/m/{claim.key()}", Claim(0, 1, claim.token, "elsewhere:1", time.time() - 1).to_bytes())
    other = target.open().writer("m")
    assert other.write_unit(unit, {k: unit_values(0, unit.start, unit.stop, k, "float32") for k in range(LAYERS)})
    shards = {k: get_bytes(_raw(store), f"models/m/hidden/{k}/c/0/0") for k in range(LAYERS)}
    # The stalled writer comes back with zeros: refused, nothing touched.
    zeros = {k: np.zeros((unit.n_tokens, 24), np.float32) for k in range(LAYERS)}
    assert stalled.write_unit(unit, zeros, claim=claim) is False
    assert {k: get_bytes(_raw(store), f"models/m/hidden/{k}/c/0/0") for k in range(LAYERS)} == shards
    assert list_keys(_raw(store), "models/m/claims/0") == ["1", "2"]


# -- kills at every store write of one unit -----------------------------------------------------------------------
DYING_WRITER = r"""
import json, os, signal, sys
from zarr.storage import FsspecStore, LocalStore
from hrsa.store import ActivationStore
from hrsa.store.testing import unit_values
a = json.loads(sys.argv[1])
store = ActivationStore.open(a["url"], mode="r+", storage_options=a["so"])
writer = store.writer("m")
count = [0]
def dying(cls, name):
    original = getattr(cls, name)
    async def op(self, key, *args, **kwargs):
        if "models/m/" in key and "/zarr.json" not in key:
            if count[0] == a["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)
            count[0] += 1
        return await original(self, key, *args, **kwargs)
    setattr(cls, name, op)
for cls in (LocalStore, FsspecStore):
    for name in ("set", "set_if_not_exists", "delete"):
        dying(cls, name)
import hrsa.store.objects as objects
real_create = objects._fsspec_create
def create(store, key, data):  # S3's conditional PUT goes through s3fs, not the Zarr store: count it too
    if count[0] == a["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)
    count[0] += 1
    return real_create(store, key, data)
objects._fsspec_create = create
real_set_sync = LocalStore.set_sync
def set_sync(self, key, value):  # hrsa writes a local object in the caller's thread, not through LocalStore.set
    if "models/m/" in key and "/zarr.json" not in key:
        if count[0] == a["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        count[0] += 1
    return real_set_sync(self, key, value)
LocalStore.set_sync = set_sync
real_put_local = objects._put_local
def put_local(store, key, pieces):  # a unit's shards go to a local path piece by piece, not through set_sync
    if "models/m/" in key:
        if count[0] == a["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        count[0] += 1
    return real_put_local(store, key, pieces)
objects._put_local = put_local
unit = writer.units()[a["unit"]]
writer.write_unit(unit, {k: unit_values(unit.index, unit.start, unit.stop, k, "float32") for k in range(4)})
print(count[0])
"""


def _write_dying(target: Target, unit: int, kill_at: int) -> subprocess.CompletedProcess[str]:
    args = json.dumps({"url": target.url, "so": target.storage_options, "unit": unit, "kill_at": kill_at})
    return subprocess.run([sys.executable, "-c", DYING_WRITER, args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow_on_s3  # 2 minutes on S3 through moto; the local rows run by default
@pytest.mark.parametrize("unit", [1, 3])  # a full shard, and the partial last one (whose old object is deleted first)
def test_kill_at_every_store_write_of_a_unit_leaves_it_pending_or_done_and_resume_is_exact(target: Target, unit: int) -> None:
    store = target.open("a")
    new_model(store, "m")
    writer = store.writer("m")
    others = [u for u in writer.units() if u.index != unit]
    for u in others:
        writer.write_unit(u, {k: unit_values(u.index, u.start, u.stop, k, "float32") for k in range(LAYERS)})
    # How many store writes the unit takes (claim, shards, done record; deletes of a partial shard's old objects).
    clean = _write_dying(target, unit, 10**6)
    assert clean.returncode == 0, clean.stderr
    n_writes = int(clean.stdout)
    assert n_writes >= LAYERS + 2
    reference = {k: store.hidden_state("m", k).compute() for k in range(LAYERS)}
    for kill_at in range(n_writes):
        writer.reset_unit(writer.units()[unit])
        assert _write_dying(target, unit, kill_at).returncode == -signal.SIGKILL
        # Killed before its done record (the last write) was created: pending, and nothing reported damaged.
        report = verify_store(target.open("r"))
        assert report.damaged_units() == {}, (kill_at, report.problems)
        assert report.incomplete_units == {"m": [unit]}, (kill_at, report.problems)
        # Resume at once: the dead writer's claim is its dead process's, so it is taken over now, not after the lease.
        fill_model(target.open(), "m")
        resumed = target.open("r")
        assert verify_store(resumed).ok
        for k in range(LAYERS):
            assert np.array_equal(resumed.hidden_state("m", k).compute(), reference[k])


def test_a_server_that_ignores_conditional_writes_is_refused_before_anything_is_written(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """An S3-compatible server without If-None-Match would let two writers both create one done record: refused."""
    import hrsa.store.objects as objects

    if target.storage_options is None:
        pytest.skip("a local path's create-if-absent is os.link, exclusive by construction")
    store = target.open("a")
    new_model(store, "m")
    monkeypatch.setattr(objects, "_fsspec_create", lambda raw, key, data: objects.put_bytes(raw, key, data))  # PUT, no condition
    from hrsa.store import StoreFormatError

    before = list_keys(_raw(store), "")
    with pytest.raises(StoreFormatError, match="honours conditional writes"):
        target.open().writer("m")
    assert list_keys(_raw(store), "") == before
