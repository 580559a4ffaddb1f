"""`hrsa store rm` against a running extraction: the model-level lease.

An extraction holds a lease on its model (``models/<mid>/leases/<token>``, renewed by its driver like a unit claim)
from before it creates or opens the model for writing until it ends. Unit claims alone left gaps (between two units
of a worker, between creation and the first claim) where `rm` deleted a model under a running job. A deletion holds a
lease of its own while it deletes, so an extraction starting meanwhile is refused in one line instead of writing into
a half-deleted model. Each test runs on a local store and on S3 (moto's server).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from click.testing import CliRunner

from hrsa.cli import cli
from hrsa.store import ActivationStore, ModelInUseError
from hrsa.store.objects import get_bytes, list_keys, put_bytes
from hrsa.store.testing import LAYERS, fill_model, new_model, unit_values
from hrsa.store.unit_records import ModelLease
from hrsa.store.verify import verify_store

from .conftest import Target


def _raw(store: ActivationStore) -> Any:
    return store.group("models").store


def _objects(store: ActivationStore, prefix: str = "models/m") -> dict[str, bytes | None]:
    raw = _raw(store)
    return {key: get_bytes(raw, f"{prefix}/{key}") for key in list_keys(raw, prefix)}


def _cli(target: Target, *args: str) -> Any:
    return CliRunner().invoke(cli, list(args), env=target.env)


def _refused(target: Target, *holders: str) -> str:
    """`hrsa store rm` of m: exit 2, one line naming each holder and the way out; returns the line."""
    result = _cli(target, "store", "rm", target.url, "m", "--yes")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hrsa: error:") and "Traceback" not in result.output, result.stderr
    for holder in holders:
        assert holder in lines[0], lines[0]
    assert "stop it" in lines[0] and f"hrsa store rm {target.url} m" in lines[0], lines[0]
    return lines[0]


def _shown(owner: str) -> str:
    """How a message names a lease's owner: host:pid (``writer_name`` adds the kernel boot and PID namespace)."""
    where, _, pid = owner.rpartition(":")
    return f"{where.partition('@')[0]}:{pid}"


def _write(store: ActivationStore, unit_index: int) -> None:
    writer = store.writer("m")
    unit = writer.units()[unit_index]
    assert writer.write_unit(unit, {k: unit_values(unit.index, unit.start, unit.stop, k, "float32") for k in range(LAYERS)})


def _plant_lease(store: ActivationStore, purpose: str, owner: str, expires: float, token: str = "someone-else") -> None:
    lease = ModelLease(purpose, token, owner, expires)
    put_bytes(_raw(store), f"models/m/{lease.key()}", lease.to_bytes())


def test_rm_is_refused_while_an_extraction_holds_the_model_between_its_units(target: Target) -> None:
    """No unit claim is live between two units of a worker: the extraction's own lease refuses the deletion there."""
    store = target.open("a")
    new_model(store, "m")
    with store.extracting("m") as lease:
        assert list_keys(_raw(store), "models/m/leases") == [lease.token]
        _write(store, 0)  # unit 0 done; no claim is live now, unit 1 not begun
        before = _objects(store)
        line = _refused(target, _shown(lease.owner))
        assert "extraction" in line
        with pytest.raises(ModelInUseError):
            target.open().delete_model("m")
        assert _objects(store) == before and target.open().model_info("m").units_done == 1
        for u in (1, 2, 3):
            _write(store, u)
    assert list_keys(_raw(store), "models/m/leases") == []  # released at its end
    assert verify_store(target.open()).ok
    result = _cli(target, "store", "rm", target.url, "m", "--yes")
    assert result.exit_code == 0, result.output
    assert _objects(store) == {} and target.open().models() == []


def test_the_lease_is_held_from_before_the_model_is_created_and_kept_by_its_creation(target: Target) -> None:
    """An extraction takes its lease before it creates the model: rm of what is there then (the lease alone, a model
    half-created) is refused, and create_model (which clears what a killed creation left) keeps the lease."""
    store = target.open("a")
    new_model(store, "other")  # the corpus
    cid = store.model_info("other").corpus
    with store.extracting("m") as lease:
        _refused(target, _shown(lease.owner))
        store.create_model("m", corpus=cid, n_hidden_states=LAYERS, hidden_size=24, dtype="float32", chunk_tokens=64,
                           shard_tokens=256, exist_ok=True)
        assert list_keys(_raw(store), "models/m/leases") == [lease.token]
        _refused(target, _shown(lease.owner))  # created, no unit claimed yet
        fill_model(store, "m")
        assert verify_store(store, models=["m"]).ok  # a live lease is no damage
    assert store.models() == ["m", "other"] and list_keys(_raw(store), "models/m/leases") == []


def test_the_lease_is_renewed_while_the_extraction_runs(target: Target) -> None:
    """Renewed by a thread at the claims' cadence (lease / 4): held past its first expiry while the holder lives."""
    store = target.open("a")
    new_model(store, "m")
    with store.extracting("m", lease_s=1.0) as lease:
        time.sleep(2.0)
        held = ModelLease.parse(get_bytes(_raw(store), f"models/m/{lease.key()}"), lease.token)
        assert held is not None and held.expires > lease.expires and held.live
        with pytest.raises(ModelInUseError):
            target.open().delete_model("m")


HOLDER = r"""
import json, sys, time
from hrsa.store import ActivationStore
a = json.loads(sys.argv[1])
store = ActivationStore.open(a["url"], mode="r+", storage_options=a["so"])
with store.extracting("m"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_killed_extraction_does_not_block_rm(target: Target) -> None:
    """Its lease ends with its process on its machine (at once), elsewhere when it runs out (a short lease here)."""
    store = target.open("a")
    new_model(store, "m")
    fill_model(store, "m")
    args = json.dumps({"url": target.url, "so": target.storage_options})
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held", holder.stderr
        _refused(target, f":{holder.pid}")
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert len(list_keys(_raw(store), "models/m/leases")) == 1  # left by the killed process: it holds nothing
    assert verify_store(target.open()).ok
    # Another machine's lease: live until it runs out, then nothing.
    _plant_lease(store, "extract", "elsewhere:1", time.time() + 1.5)
    _refused(target, "elsewhere:1")
    time.sleep(1.6)
    result = _cli(target, "store", "rm", target.url, "m", "--yes")
    assert result.exit_code == 0, result.output
    assert _objects(store) == {} and target.open().models() == []


def test_an_extraction_starting_during_a_deletion_is_refused_in_one_line(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """rm first: its metadata gone and its hidden states deleting, an extraction of the model starts. It must not
    write into the half-deleted model: ModelInUseError naming the deletion; after it, the model extracts anew."""
    store = _filled(target)
    other = target.open("a")
    backend = type(_raw(store))
    real = backend.delete_dir
    seen: list[BaseException] = []

    def start_extraction() -> None:
        with pytest.raises(ModelInUseError) as refused:
            with other.extracting("m"):
                pass
        seen.append(refused.value)

    async def racing(self: Any, prefix: str) -> None:
        if prefix.endswith("models/m/hidden") and not seen:  # (Zarr's loop runs this: the extraction, another thread)
            await asyncio.to_thread(start_extraction)
        await real(self, prefix)

    monkeypatch.setattr(backend, "delete_dir", racing)
    store.delete_model("m")
    monkeypatch.undo()
    assert seen, "the deletion never reached the hidden states"
    message = str(seen[0])
    assert "being deleted" in message and "run the same command again" in message.lower(), message
    assert _objects(store) == {} and store.models() == store.half_created_models() == []
    with other.extracting("m"):  # the deletion over: the model is extracted anew
        new_model(other, "m", exist_ok=True)
        fill_model(other, "m")
    assert verify_store(target.open()).ok


def _filled(target: Target) -> ActivationStore:
    store = target.open("a")
    new_model(store, "m")
    fill_model(store, "m")
    return store


@pytest.mark.parametrize("when", ["before its lease", "after its lease"])
def test_rm_and_an_extraction_starting_at_once_never_both_go_on(
        target: Target, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """rm checks for holders, takes its own lease, checks again; an extraction takes its lease, then checks for a
    deletion. Whichever order their steps interleave in, one of them is refused: the extraction's lease taken just
    after rm's first check is seen by its second; taken after rm's lease, it sees rm's."""
    store = _filled(target)
    other = target.open("r+")
    check = store._check_not_in_use
    checks: list[None] = []
    calls: list[Any] = []
    held = other.extracting("m")

    def enter() -> None:
        try:
            calls.append(held.__enter__())
        except ModelInUseError as error:
            calls.append(error)

    def interleaved(*args: Any, **kwargs: Any) -> Any:
        checks.append(None)
        if when == "before its lease" and len(checks) == 1:  # rm's first check passed; rm has no lease yet
            result = check(*args, **kwargs)
            enter()
            return result
        if when == "after its lease" and len(checks) == 2:  # rm holds its lease, about to check again
            enter()
        return check(*args, **kwargs)

    monkeypatch.setattr(store, "_check_not_in_use", interleaved)
    if when == "before its lease":  # the extraction holds the model: rm is refused, nothing deleted
        before = _objects(store)
        with pytest.raises(ModelInUseError):
            store.delete_model("m")
        assert isinstance(calls[0], ModelLease)
        after = _objects(store)
        assert after.pop(f"leases/{calls[0].token}") is not None  # the extraction's, held
        assert after == before and store.models() == ["m"]
        held.__exit__(None, None, None)
    else:  # rm holds it: the extraction is refused, the model deleted
        store.delete_model("m")
        assert isinstance(calls[0], ModelInUseError) and "being deleted" in str(calls[0])
        assert _objects(store) == {}


def test_an_extraction_replacing_its_model_deletes_it_under_its_own_lease(target: Target) -> None:
    """A pipeline's extraction with changed inputs deletes the stored model (replace) while it holds it: its own lease
    does not refuse that deletion and survives it; another extraction's does refuse it."""
    store = _filled(target)
    cid = store.model_info("m").corpus
    with target.open("r+").extracting("m") as theirs:
        with store.extracting("m") as mine:
            with pytest.raises(ModelInUseError, match=re.escape(_shown(theirs.owner))):
                store.delete_model("m", held=mine)
    with store.extracting("m") as mine:
        store.delete_model("m", held=mine)
        assert list_keys(_raw(store), "models/m") == [f"leases/{mine.token}"]
        store.create_model("m", corpus=cid, n_hidden_states=LAYERS, hidden_size=24, dtype="float32", chunk_tokens=64,
                           shard_tokens=256, exist_ok=True)
        fill_model(store, "m")
    assert verify_store(target.open()).ok and list_keys(_raw(store), "models/m/leases") == []


def test_lease_records_are_no_damage_to_verify_nor_to_a_re_created_model(target: Target) -> None:
    """Lease records (live, expired, torn) are the model's own bookkeeping: verify reports none of them, and a re-run
    that clears a half-created model's records leaves the leases alone."""
    store = _filled(target)
    _plant_lease(store, "extract", "elsewhere:1", time.time() + 60, token="live")
    _plant_lease(store, "extract", "elsewhere:1", time.time() - 60, token="expired")
    put_bytes(_raw(store), "models/m/leases/torn", b'{"tok')
    assert verify_store(target.open()).ok
    result = _cli(target, "store", "verify", target.url)
    assert result.exit_code == 0, result.output
    ls = _cli(target, "store", "ls", target.url)
    assert ls.exit_code == 0 and "half-created" not in ls.output, ls.output
