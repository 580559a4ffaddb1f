"""Fault matrix: damage a store the way disks, users and kills do; verify must name it, repair must undo it.

Every row runs on a local store and on S3 (moto's server on 127.0.0.1). Damage goes through the Zarr store's
own API (the objects a backend holds), reads and repairs through the real ActivationStore, ModelWriter and CLI.
Model "m": 1000 tokens in 4 units of 256; unit 3 covers only part of its shard (tokens 768:1000).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from hrsa.cli import cli
from hrsa.store import (
    ActivationStore,
    CorruptDataError,
    HalfCreatedModelError,
    IncompleteModelError,
    ModelInUseError,
    StoreFormatError,
)
from hrsa.store.testing import HIDDEN, LAYERS, expected_layer, fill_model, make_table, new_model, unit_values
from hrsa.store.verify import verify_store

from .conftest import Target


# -- raw objects, through the Zarr store of the backend ------------------------------------------------------------
def _sync(coroutine: Any) -> Any:
    from zarr.core.sync import sync

    return sync(coroutine)


def _raw(store: ActivationStore) -> Any:
    return store.group("corpora").store


def _get(store: ActivationStore, key: str) -> bytes | None:
    from zarr.core.buffer import default_buffer_prototype

    buffer = _sync(_raw(store).get(key, prototype=default_buffer_prototype()))
    return None if buffer is None else buffer.to_bytes()


def _put(store: ActivationStore, key: str, data: bytes) -> None:
    from zarr.core.buffer import cpu

    _sync(_raw(store).set(key, cpu.Buffer.from_bytes(data)))


def _delete(store: ActivationStore, key: str) -> None:
    _sync(_raw(store).delete(key))


def _objects(store: ActivationStore, prefix: str = "") -> dict[str, bytes]:
    raw = _raw(store)

    async def keys() -> list[str]:
        return [k async for k in raw.list_prefix(prefix)]

    return {k: _get(store, k) for k in sorted(_sync(keys()))}  # type: ignore[misc]


def _shard(k: int, u: int) -> str:
    return f"models/m/hidden/{k}/c/{u}/0"


def _edit_json(store: ActivationStore, key: str, edit: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads(_get(store, key))  # type: ignore[arg-type]
    edit(meta)
    _put(store, key, json.dumps(meta).encode())


def _filled(target: Target, suffix: str = "") -> ActivationStore:
    store = target.open("a", suffix)
    new_model(store, "m")
    fill_model(store, "m")
    return store


def _cli(target: Target, *args: str) -> Any:
    return CliRunner().invoke(cli, list(args), env=target.env)


def _one_error_line(result: Any, code: int) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hrsa: error:"), result.stderr
    assert "Traceback" not in result.output


# -- damage a done unit can suffer; each is named by verify and repaired by reset + rewrite ------------------------
def _truncate(store: ActivationStore, key: str) -> None:
    _put(store, key, _get(store, key)[: len(_get(store, key)) // 2])  # type: ignore[index]


def _flip(store: ActivationStore, key: str, offset: int = 200) -> None:
    data = bytearray(_get(store, key))  # type: ignore[arg-type]
    data[offset] ^= 0xFF
    _put(store, key, bytes(data))


def _record(u: int) -> str:
    return f"models/m/done/{u}"


def _forge_record_of_never_written_unit(store: ActivationStore) -> None:
    """Unit 2 never written, but a done record for it whose own hash is right (as a user with the format spec could)."""
    from hrsa.store.unit_records import DoneRecord

    writer = store.writer("m")
    record = writer.record(writer.units()[2])
    writer.reset_unit(writer.units()[2])
    _put(store, _record(2), record.to_bytes())


def _stale_record(store: ActivationStore) -> None:
    """Unit 2's record as if written under other model settings (a model replaced under the same id)."""
    import dataclasses

    writer = store.writer("m")
    record = writer.record(writer.units()[2])
    _put(store, _record(2), dataclasses.replace(record, settings="0" * 32).to_bytes())


def _swap(store: ActivationStore) -> None:
    _put(store, _shard(2, 0), _get(store, _shard(2, 1)))  # type: ignore[arg-type]


def _record_edited_to_list_a_substituted_shard(store: ActivationStore) -> None:
    """Unit 0's shard of hidden state 2 replaced by unit 1's (the same size), and unit 0's done record edited, as valid
    JSON, to list that shard's hash: only the record's own sha256 tells (a flipped byte above is not JSON any more)."""
    listed = json.loads(_get(store, _record(1)))["shards"]["2"]  # type: ignore[arg-type]
    doc = json.loads(_get(store, _record(0)))  # type: ignore[arg-type]
    _swap(store)
    doc["shards"]["2"] = {**doc["shards"]["2"], "bytes": listed["bytes"], "xxh3": listed["xxh3"]}
    _put(store, _record(0), json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


REPAIRABLE: dict[str, tuple[Callable[[ActivationStore], None], int, str, type[Exception]]] = {
    # name: (damage, damaged unit, what verify says, what a read of every layer raises)
    "missing shard": (lambda s: _delete(s, _shard(2, 1)), 1, "shard object missing", CorruptDataError),
    "empty shard": (lambda s: _put(s, _shard(2, 1), b""), 1, "shard object empty", CorruptDataError),
    "truncated partial shard": (lambda s: _truncate(s, _shard(0, 3)), 3, "bytes, its done record", CorruptDataError),
    "bit-flipped partial shard": (lambda s: _flip(s, _shard(1, 3), -10), 3, "xxh3 differs", CorruptDataError),  # in its index
    "bit-flipped full shard": (lambda s: _flip(s, _shard(3, 0)), 0, "xxh3 differs", CorruptDataError),
    # float32 is stored uncompressed: the other unit's shard has the very size, and another xxh3
    "another unit's intact shard": (_swap, 0, "xxh3 differs", CorruptDataError),
    "bit-flipped done record": (lambda s: _flip(s, _record(2), 40), 2, "done record", CorruptDataError),
    "another unit's done record": (lambda s: _put(s, _record(2), _get(s, _record(1))), 2, "is unit 1's", CorruptDataError),  # type: ignore[arg-type]
    "done record of a never-written unit": (_forge_record_of_never_written_unit, 2, "shard object missing", CorruptDataError),
    "done record of other settings": (_stale_record, 2, "other model settings", CorruptDataError),
    "done record edited to list a substituted shard": (_record_edited_to_list_a_substituted_shard, 0,
                                                         "own sha256 does not match", CorruptDataError),
}


def _data_objects(store: ActivationStore) -> dict[str, bytes]:
    """The model's metadata and shard objects, and each done record's manifest (without who wrote it, when)."""
    from hrsa.store.unit_records import DoneRecord

    objects = _objects(store, "models/m/")
    data = {k: v for k, v in objects.items() if not k.startswith(("models/m/claims/", "models/m/done/"))}
    for key, value in objects.items():
        if key.startswith("models/m/done/"):
            record = DoneRecord.parse(value, int(key.rsplit("/", 1)[1]))
            data[key] = repr((record.start, record.stop, record.settings, record.shards)).encode()
    return data


_REFERENCES: dict[str, dict[str, bytes]] = {}


def _reference(target: Target) -> dict[str, bytes]:
    """The objects of an undamaged filled model, once per backend (they are the same bytes in every store)."""
    kind = "local" if target.storage_options is None else "s3"
    if kind not in _REFERENCES:
        _REFERENCES[kind] = _data_objects(_filled(target, "-reference"))
    return _REFERENCES[kind]


@pytest.mark.slow_on_s3(keep=("missing shard", "bit-flipped partial shard", "another unit's done record"))
@pytest.mark.parametrize("fault", sorted(REPAIRABLE))
def test_damage_is_named_by_verify_and_repaired_to_identical_bytes(target: Target, fault: str) -> None:
    damage, unit, what, read_error = REPAIRABLE[fault]
    store = _filled(target)
    reference = _reference(target)
    damage(store)
    # Verify names the damaged unit, and only it.
    report = verify_store(store)
    assert report.damaged_units() == {"m": [unit]}
    assert any(what in p.what and p.unit == unit for p in report.problems), report.problems
    assert all(p.model == "m" for p in report.problems)
    # Reads refuse; they never return fill values for a done unit.
    with pytest.raises(read_error):
        for k in range(LAYERS):
            store.hidden_state("m", k).compute()
    # The CLI: exit 1, the problem listed; --reset-damaged makes the unit rewritable.
    result = _cli(target, "store", "verify", target.url)
    assert result.exit_code == 1 and "PROBLEM" in result.stdout and "Traceback" not in result.output
    result = _cli(target, "store", "verify", target.url, "--reset-damaged")
    assert result.exit_code == 1 and "reset 1 damaged unit(s) of m" in result.stdout, result.output
    # The rewrite through the real writer gives the bytes of an undamaged store.
    writer = target.open().writer("m")
    assert [u.index for u in writer.pending_units()] == [unit]
    fill_model(target.open(), "m")
    assert verify_store(target.open("r")).ok
    assert _data_objects(target.open("r")) == reference
    assert _cli(target, "store", "verify", target.url).exit_code == 0


def _without_leases(objects: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in objects.items() if "/leases/" not in k}


def test_reset_damaged_is_refused_while_an_extraction_holds_the_model(target: Target) -> None:
    """`verify --reset-damaged` deleted units of a model an extraction held (one replacing the model under the same id
    could have its fresh units taken for the damaged ones verify read before): it is refused in one line (exit 2)
    naming the way out, with nothing changed, and resets once the extraction has ended."""
    store = _filled(target)
    _delete(store, _shard(2, 1))
    before = _without_leases(_objects(store, "models/m/"))
    with store.extracting("m"):
        result = _cli(target, "store", "verify", target.url, "--reset-damaged")
        assert _without_leases(_objects(store, "models/m/")) == before
    assert result.exit_code == 2 and "PROBLEM models/m/hidden/2 shard 1" in result.stdout, result.output
    _one_error_line(result, 2)
    assert "an extraction holding it" in result.stderr and "reset its damaged units" in result.stderr, result.stderr
    assert f"hrsa store verify {target.url} --model m --reset-damaged` again" in result.stderr, result.stderr
    result = _cli(target, "store", "verify", target.url, "--reset-damaged")
    assert result.exit_code == 1 and "reset 1 damaged unit(s) of m" in result.stdout, result.output
    assert [u.index for u in target.open().writer("m").pending_units()] == [1]


def test_an_extraction_is_refused_while_damaged_units_are_reset(target: Target) -> None:
    """The other way round: an extraction starting while a reset holds the model stops before it writes."""
    store = _filled(target)
    with store.resetting("m"):
        with pytest.raises(ModelInUseError, match=r"Got it having damaged units reset \(`hrsa store verify --reset-damaged`"):
            with store.extracting("m"):
                pass
    with store.extracting("m"):  # and starts once the reset has ended
        pass


def test_a_unit_rewritten_since_verify_read_it_is_not_reset(target: Target) -> None:
    """What verify found may be stale by the time it resets (an extraction replacing the model, an operator restoring
    a shard): each unit is checked again under the reset's hold and reset only while still damaged."""
    from hrsa.store.verify import ResetOutcome, reset_damaged

    store = _filled(target)
    intact = _get(store, _shard(2, 1))
    _flip(store, _shard(2, 1))
    _delete(store, _shard(0, 3))
    report = verify_store(store)
    assert report.damaged_units() == {"m": [1, 3]}
    _put(store, _shard(2, 1), intact)  # unit 1 whole again
    assert reset_damaged(store, "m", report.damaged_units()["m"]) == ResetOutcome("m", reset=(3,), whole=(1,))
    assert [u.index for u in target.open().writer("m").pending_units()] == [3]
    fill_model(target.open(), "m")
    assert verify_store(target.open("r")).ok


def test_a_reset_of_a_model_deleted_since_verify_read_it_creates_nothing(target: Target) -> None:
    """The reset's hold is a lease object under the model's folder: taken for a model `hrsa store rm` deleted after
    verify read it, it left that folder behind (a half-created model for `ls`). The model is looked up first."""
    from hrsa.store import ModelNotFoundError
    from hrsa.store.verify import reset_damaged

    store = _filled(target)
    _delete(store, _shard(2, 1))
    report = verify_store(store)
    store.delete_model("m")
    with pytest.raises(ModelNotFoundError):
        reset_damaged(store, "m", report.damaged_units()["m"])
    assert _objects(store, "models/m") == {} and store.half_created_models() == []


def test_a_reset_refused_for_one_model_still_lists_the_models_reset_before_it(target: Target) -> None:
    """Models are reset one by one: a refusal of a later one (exit 2) printed nothing of the earlier ones it had
    reset. Each is listed as it ends; the refused one is left as it was."""
    store = _filled(target)
    new_model(store, "n")
    fill_model(store, "n")
    _delete(store, _shard(2, 1))
    _delete(store, "models/n/hidden/2/c/1/0")
    with target.open("r+").extracting("n"):
        result = _cli(target, "store", "verify", target.url, "--reset-damaged")
    assert result.exit_code == 2 and "reset 1 damaged unit(s) of m" in result.stdout, result.output
    assert "model n of" in result.stderr and "--model n --reset-damaged" in result.stderr, result.stderr
    assert [u.index for u in target.open().writer("m").pending_units()] == [1]
    assert target.open().writer("n").pending_units() == []


def test_a_deletion_and_a_reset_of_one_model_exclude_each_other(target: Target) -> None:
    """`hrsa store rm` counted only extractions: it deleted a model under a reset (and the reset's lease with it, so an
    extraction could start and have a good unit of the new model reset). Each is refused while the other holds."""
    store = _filled(target)
    _delete(store, _shard(2, 1))
    other = target.open("r+")
    with store.resetting("m"):
        with pytest.raises(ModelInUseError, match=r"to delete it\. Got it having damaged units reset \(`hrsa store verify"):
            other.delete_model("m")
    assert target.open().model_info("m").complete
    with other._holding_unused("m", "delete", set()):  # a deletion under way, before it deletes anything
        with pytest.raises(ModelInUseError, match=r"to reset its damaged units\. Got it being deleted \(`hrsa store rm`"):
            with store.resetting("m"):
                pass
        assert target.open().model_info("m").complete
        _delete(store, "models/m/zarr.json")  # and once it has deleted the model's metadata: still "being deleted"
        with pytest.raises(ModelInUseError, match=r"to reset its damaged units\. Got it being deleted \(`hrsa store rm`"):
            with store.resetting("m"):
                pass


def test_units_reset_or_replaced_since_verify_are_left_and_said_so(target: Target) -> None:
    """The CLI said "whole when checked again" of every unit it did not reset, also of one no longer done."""
    from hrsa.store.verify import ResetOutcome, reset_damaged

    store = _filled(target)
    _delete(store, _shard(2, 1))
    report = verify_store(store)
    store.writer("m").reset_unit(store.writer("m").units()[1])  # another reset (or a replaced model) since
    assert reset_damaged(store, "m", report.damaged_units()["m"]) == ResetOutcome("m", not_done=(1,))


def test_a_model_whose_array_metadata_is_damaged_is_not_reset_unit_by_unit(target: Target) -> None:
    """A hidden state's zarr.json missing: the reset opened every array and crashed (a traceback) after deleting part of
    a unit. The model is extracted again, not repaired unit by unit: it says so, and deletes nothing."""
    store = _filled(target)
    _delete(store, _shard(2, 1))
    _delete(store, "models/m/hidden/1/zarr.json")
    before = _without_leases(_objects(store, "models/m/"))
    result = _cli(target, "store", "verify", target.url, "--reset-damaged")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"not reset: model m: the metadata of hidden/1 is damaged; `hrsa store rm {target.url} m`" in result.stdout
    assert _without_leases(_objects(store, "models/m/")) == before


def test_a_unit_of_zeros_is_stored_not_skipped(target: Target) -> None:
    """Zarr skips all-fill chunks by default; then a done unit's missing shard would be legitimate. It is not."""
    store = target.open("a")
    new_model(store, "m")
    writer = store.writer("m")
    for unit in writer.units():
        writer.write_unit(unit, {k: np.zeros((unit.n_tokens, HIDDEN), np.float32) for k in range(LAYERS)})
    assert all(_get(store, _shard(k, u)) for k in range(LAYERS) for u in range(4))
    assert verify_store(store).ok
    assert not store.hidden_state("m", 0).compute().any()


def test_a_substituted_shard_of_the_same_size_is_caught_by_its_hash(target: Target) -> None:
    """Uncompressed, every full shard has the same size: only the recorded xxh3 tells unit 1's shard from unit 0's.
    Verify names it, and reads refuse it, whole or in blocks smaller than a shard (each read once, then cut)."""
    store = target.open("a")
    new_model(store, "m", codec="none")
    fill_model(store, "m")
    assert len(_get(store, _shard(2, 0))) == len(_get(store, _shard(2, 1)))  # type: ignore[arg-type]
    _swap(store)
    report = verify_store(store)
    assert report.damaged_units() == {"m": [0]}
    assert [p.what for p in report.problems] == ["shard object's xxh3 differs from its done record (substituted, stale or damaged)"]
    block = store.model_info("m").layout.shard_tokens // 4
    for chunk_tokens in (None, block):
        with pytest.raises(CorruptDataError, match=r"shard 0 .*xxh3 differs from its done record"):
            store.hidden_state("m", 2, chunk_tokens=chunk_tokens).compute()
    shard_tokens = store.model_info("m").layout.shard_tokens  # the other units and hidden states read as written
    assert np.array_equal(store.hidden_state("m", 2)[shard_tokens:].compute(), expected_layer(store, "m", 2)[shard_tokens:])
    assert np.array_equal(store.hidden_state("m", 1).compute(), expected_layer(store, "m", 1))


def test_a_unit_is_written_with_one_hash_of_its_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A done record lists each shard's size and xxh3, no sha256: hashing every shard twice (sha256 ran at ~3 GB/s
    where xxh3 runs at ~10) was a third of the write path's CPU. Only the record's own canonical text is sha256'd."""
    import hrsa.store.unit_records as unit_records

    sha_bytes: list[int] = []
    real = unit_records.sha256
    monkeypatch.setattr(unit_records, "sha256", lambda data: sha_bytes.append(len(data)) or real(data))
    store = _filled(Target(str(tmp_path / "store"), None, {}))
    writer = store.writer("m")
    for unit in writer.units():
        doc = json.loads(writer.record(unit).to_bytes())
        assert all(set(shard) == {"key", "bytes", "xxh3"} for shard in doc["shards"].values()), doc
    shard_bytes = min(r.size for u in writer.units() for r in writer.record(u).shards.values())
    assert sha_bytes and max(sha_bytes) < shard_bytes  # record texts only
    assert verify_store(store).ok


@pytest.mark.parametrize("kept", ["sha256", "both"])
def test_records_of_earlier_versions_are_read_and_verified_by_their_hashes(target: Target, kept: str) -> None:
    """Done records written before the xxh3 was kept list only the sha256, and those of the versions after it both:
    reads and verify compare what a record lists (the xxh3 where it has one), and still refuse a substituted shard."""
    import dataclasses

    from hrsa.store.unit_records import sha256

    store = target.open("a")
    new_model(store, "m", codec="none")
    fill_model(store, "m")
    writer = store.writer("m")
    for unit in writer.units():
        record = writer.record(unit)
        shards = {k: dataclasses.replace(s, sha256=sha256(_get(store, f"models/m/{s.key}")),  # type: ignore[arg-type]
                                         xxh3=s.xxh3 if kept == "both" else None) for k, s in record.shards.items()}
        old = dataclasses.replace(record, shards=shards)
        assert b"sha256" in old.to_bytes() and (b"xxh3" in old.to_bytes()) == (kept == "both")
        _put(store, _record(unit.index), old.to_bytes())
    assert verify_store(store).ok
    assert np.array_equal(store.hidden_state("m", 2).compute(), expected_layer(store, "m", 2))
    _swap(store)
    checksum = "sha256" if kept == "sha256" else "xxh3"
    with pytest.raises(CorruptDataError, match=rf"shard 0 .*{checksum} differs from its done record"):
        store.hidden_state("m", 2).compute()
    assert [p.what for p in verify_store(store).problems] == [
        f"shard object's {checksum} differs from its done record (substituted, stale or damaged)"]


# -- metadata: edited, half-created, garbage -------------------------------------------------------------------
def _counting_store(root: Path, counted: str = "") -> Any:
    """A read-only local store with 20 ms of latency per read that counts the reads in flight at once (``.most``) of
    keys with ``counted`` in them."""
    import asyncio

    from zarr.storage import LocalStore, WrapperStore

    class Counting(WrapperStore):
        in_flight = most = 0

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            if counted not in key:
                return await super().get(key, prototype, byte_range)
            type(self).in_flight += 1
            type(self).most = max(type(self).most, type(self).in_flight)
            await asyncio.sleep(0.02)
            try:
                return await super().get(key, prototype, byte_range)
            finally:
                type(self).in_flight -= 1

    return Counting(LocalStore(root, read_only=True))


def test_every_hidden_states_metadata_is_read_at_once(tmp_path: Path) -> None:
    """`hrsa store ls`, verify and every extraction's last check read each hidden state's zarr.json one after another:
    one round trip each (tens of ms on S3), ~1 s per 29-state model. They are in flight together now, and a damaged
    one is still named on its own."""
    import zarr

    from hrsa.store.model import array_mismatches

    store = ActivationStore.open(str(tmp_path / "s"), mode="a")
    cid = store.write_corpus(make_table(), tokenizer={"name": "test-tok", "fingerprint": "fp-1"}, source="test")
    store.create_model("m", corpus=cid, n_hidden_states=29, hidden_size=HIDDEN, dtype="bfloat16")
    info = store.model_info("m")
    _edit_json(store, "models/m/hidden/7/zarr.json", lambda meta: meta.update(data_type="int32"))
    counting = _counting_store(tmp_path / "s", "/zarr.json")
    problems = array_mismatches(zarr.open_group(counting, path="models/m", mode="r"), info)
    assert [(where, "data type int32" in what) for where, what in problems] == [("hidden/7", True)], problems
    assert counting.most >= 8, counting.most


def test_verify_reads_shards_at_once_and_names_each_damaged_one(tmp_path: Path) -> None:
    """verify read one shard after another: on S3 one stream, ~an hour per 7B model over a million tokens. Shards are
    read and hashed in threads now; the findings are the same, in the same order, and the progress count is whole."""
    import zarr

    store = _filled(Target(str(tmp_path / "s"), None, {}))
    _flip(store, _shard(1, 0))
    _delete(store, _shard(3, 2))
    _truncate(store, _shard(0, 3))
    counting = _counting_store(tmp_path / "s", "/c/")  # the shard objects
    read_only = ActivationStore(zarr.open_group(counting, mode="r"), url=str(tmp_path / "s"), read_only=True)
    counted: list[int] = []
    report = verify_store(read_only, on_shard=counted.append)
    assert [(p.unit, p.where.split(" (")[0]) for p in report.problems] == [
        (0, "models/m/hidden/1 shard 0"), (2, "models/m/hidden/3 shard 2"), (3, "models/m/hidden/0 shard 3")], report.problems
    assert report.damaged_units() == {"m": [0, 2, 3]} and sum(counted) == report.shards_read == 4 * LAYERS
    assert counting.most >= 4, counting.most


def test_edited_array_metadata_is_reported(target: Target) -> None:
    store = _filled(target)
    _edit_json(store, "models/m/hidden/1/zarr.json", lambda meta: meta.update(data_type="int32"))
    report = verify_store(target.open("r"))
    assert [(p.where, "data type int32" in p.what) for p in report.problems] == [("models/m/hidden/1", True)]
    assert report.damaged_units() == {}


@pytest.mark.parametrize(("field", "value", "where", "what"), [
    ("dtype", "float16", "models/m/hidden/0", "data type float32 does not match the model's dtype float16"),
    ("hidden_size", HIDDEN + 1, "models/m/hidden/0", "shape (1000, 24) does not match"),
    ("hidden_states", [0, 1, 2], "models/m/hidden", "holds hidden states [0, 1, 2, 3]"),
    ("layout", {"chunk_tokens": 64, "shard_tokens": 512}, "models/m/hidden/0", "do not match the layout"),
])
def test_edited_attributes_are_reported(target: Target, field: str, value: object, where: str, what: str) -> None:
    store = _filled(target)
    _edit_json(store, "models/m/zarr.json", lambda meta: meta["attributes"]["hrsa"].update({field: value}))
    problems = verify_store(target.open("r")).problems
    assert any(p.where == where and what in p.what for p in problems), problems


def _half_created(store: ActivationStore) -> None:
    _edit_json(store, "models/m/zarr.json", lambda meta: meta["attributes"].clear())


HALF_CREATED = {"attributes missing": _half_created, "garbage zarr.json": lambda s: _put(s, "models/m/zarr.json", b"{garb"),
                "an array's metadata, the attributes intact": lambda s: _edit_json(s, "models/m/zarr.json",
                                                                                    lambda meta: meta.update(node_type="array"))}


@pytest.mark.parametrize("fault", sorted(HALF_CREATED))
def test_half_created_model_is_listed_apart_reported_and_replaceable(target: Target, fault: str) -> None:
    store = _filled(target)
    HALF_CREATED[fault](store)
    store = target.open()
    assert store.models() == [] and store.half_created_models() == ["m"]
    report = verify_store(store)
    assert [(p.where, "creation interrupted" in p.what) for p in report.problems] == [("models/m", True)]
    with pytest.raises(HalfCreatedModelError, match="hrsa store rm"):
        store.model_info("m")
    before = _objects(store)
    ls = _cli(target, "store", "ls", target.url)
    assert ls.exit_code == 0 and "Traceback" not in ls.output
    _one_error_line(_cli(target, "store", "info", target.url, "m"), 2)
    verify = _cli(target, "store", "verify", target.url)
    assert verify.exit_code == 1 and "creation interrupted" in verify.stdout
    assert _objects(store) == before
    # A re-run of the extraction (create_model with exist_ok) replaces it; a plain create refuses.
    (cid,) = store.corpora()
    with pytest.raises(Exception, match="interrupted"):
        store.create_model("m", corpus=cid, n_hidden_states=LAYERS, hidden_size=HIDDEN, dtype="float32")
    store.create_model("m", corpus=cid, n_hidden_states=LAYERS, hidden_size=HIDDEN, dtype="float32",
                       chunk_tokens=64, shard_tokens=256, exist_ok=True)
    fill_model(store, "m")
    assert verify_store(store).ok
    assert np.array_equal(store.hidden_state("m", 1).compute(), expected_layer(store, "m", 1))


def test_half_created_model_is_deleted_by_delete_model(target: Target) -> None:
    store = _filled(target)
    _put(store, "models/m/zarr.json", b"\x00garbage")
    store.delete_model("m")
    assert store.models() == store.half_created_models() == [] and _objects(store, "models/m/") == {}


def test_cli_rm_deletes_a_half_created_model(target: Target) -> None:
    store = _filled(target)
    _half_created(store)
    result = _cli(target, "store", "rm", target.url, "m", "--yes")
    assert result.exit_code == 0, result.output
    assert target.open().half_created_models() == []


def test_rm_of_a_model_that_an_extraction_is_writing_is_refused_naming_its_units(target: Target) -> None:
    """`hrsa store rm` while a writer held unit 2 deleted the model under it (a traceback when the writer's files
    came in during the deletion); the writer then finished, and the model looked complete with objects missing. A live
    claim of a unit not done now refuses the deletion in one line (exit 2) naming the unit and the way out."""
    store = target.open("a")
    new_model(store, "m")
    writer = store.writer("m")
    units = writer.units()
    for unit in units[:2]:
        writer.write_unit(unit, {k: unit_values(unit.index, unit.start, unit.stop, k, "float32") for k in range(LAYERS)})
    with writer.claimed(units[2]) as claim:  # an extraction computing unit 2 right now
        assert claim is not None
        before = _objects(store)
        result = _cli(target, "store", "rm", target.url, "m", "--yes")
        _one_error_line(result, 2)
        assert "units 2 (held by" in result.stderr and "stop it" in result.stderr and "hrsa store rm" in result.stderr
        with pytest.raises(ModelInUseError):
            target.open().delete_model("m")
        assert _objects(store) == before and target.open().model_info("m").units_done == 2
        unit = units[2]
        assert writer.write_unit(unit, {k: unit_values(2, unit.start, unit.stop, k, "float32") for k in range(LAYERS)},
                                 claim=claim)
    lapsed = target.open().writer("m")  # a claim whose lease ran out (its writer gone, elsewhere) holds nothing
    lapsed.lease_s = -1.0
    assert lapsed.claim(units[3]) is not None
    result = _cli(target, "store", "rm", target.url, "m", "--yes")  # claims of done units, and a lapsed one, do not hold it
    assert result.exit_code == 0, result.output
    assert _objects(store, "models/m/") == {} and target.open().models() == []


def test_a_deletion_cut_short_leaves_the_model_half_created_and_is_one_line_naming_rm_again(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer adding files while `rm` deleted the model's folder (OSError: Directory not empty from rmtree) left a
    traceback and the model's own metadata in place: `store ls` showed it complete with a hidden state's metadata and
    shards gone. Its metadata now goes first, and a failure part way is one line (exit 1) naming `rm` again."""
    store = _filled(target)
    backend = type(_raw(store))
    real = backend.delete_dir

    async def cut_short(self: Any, prefix: str) -> None:  # one hidden state goes, then the folder is found not empty
        if prefix.endswith(("models/m", "models/m/hidden")):  # the model's folder, or its hidden states' (a lease kept)
            await real(self, f"{prefix.removesuffix('/hidden')}/hidden/2")
            raise OSError(39, "Directory not empty", prefix)
        await real(self, prefix)

    with monkeypatch.context() as patch:
        patch.setattr(backend, "delete_dir", cut_short)
        result = _cli(target, "store", "rm", target.url, "m", "--yes")
    _one_error_line(result, 1)
    assert "Directory not empty" in result.stderr and f"hrsa store rm {target.url} m --yes` again" in result.stderr
    store = target.open()
    assert store.models() == [] and store.half_created_models() == ["m"]  # never whole with objects missing
    with pytest.raises(HalfCreatedModelError):
        store.hidden_state("m", 1)
    ls = _cli(target, "store", "ls", target.url)
    assert ls.exit_code == 0 and "half-created" in ls.output
    result = _cli(target, "store", "rm", target.url, "m", "--yes")
    assert result.exit_code == 0, result.output
    assert _objects(store, "models/m/") == {} and target.open().half_created_models() == []


def test_garbage_hidden_state_metadata_is_one_line(target: Target, tmp_path) -> None:
    store = _filled(target)
    _put(store, "models/m/hidden/2/zarr.json", b"not json")
    report = verify_store(store)
    assert [p.where for p in report.problems] == ["models/m/hidden/2"] and "unreadable" in report.problems[0].what
    with pytest.raises(CorruptDataError, match="hidden/2"):
        store.hidden_state("m", 2)
    assert np.array_equal(store.hidden_state("m", 1).compute(), expected_layer(store, "m", 1))
    before = _objects(store)
    _one_error_line(_cli(target, "store", "get", target.url, "m", "--layer", "2", "--out", str(tmp_path / "x.npy")), 1)
    assert _objects(store) == before and not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize(("key", "code", "error"), [("zarr.json", 2, StoreFormatError), ("models/zarr.json", 1, CorruptDataError)])
def test_garbage_group_metadata_is_one_line(target: Target, key: str, code: int, error: type[Exception]) -> None:
    store = _filled(target)
    _put(store, key, b"\xff{")
    before = _objects(store)
    with pytest.raises(error, match="zarr.json"):
        target.open("r").models()
    for args in (("ls", target.url), ("verify", target.url), ("info", target.url, "m")):
        _one_error_line(_cli(target, "store", *args), code)
    assert _objects(store) == before


def test_read_of_a_missing_shard_is_one_line_and_changes_nothing(target: Target, tmp_path) -> None:
    store = _filled(target)
    _delete(store, _shard(1, 2))
    before = _objects(store)
    out = tmp_path / "x.npy"
    _one_error_line(_cli(target, "store", "get", target.url, "m", "--layer", "1", "--out", str(out)), 1)
    assert "hrsa store verify" in _cli(target, "store", "get", target.url, "m", "--layer", "1", "--out", str(out)).stderr
    assert not out.exists() and _objects(store) == before
    # Units the read does not span still read.
    assert np.array_equal(store.hidden_state("m", 1, tokens=(0, 512)).compute(), expected_layer(store, "m", 1)[:512])


@pytest.mark.parametrize("rows", [[5, 600], [600, 5], [5, 300, 999, 600]], ids=["in-order", "reversed", "scattered"])
def test_a_read_by_row_index_checks_every_shard_its_rows_fall_in(tmp_path, rows: list[int]) -> None:
    """k-NN and probes read sampled rows by index (a CheckedArray indexed by an array): every done shard the rows fall
    in is checked, not the first row's alone, so a missing shard never reads as zeros."""
    store = _filled(Target(str(tmp_path / "store"), None, {}))
    _delete(store, _shard(1, 2))  # tokens 512:768
    with pytest.raises(CorruptDataError, match="shard 2"):
        store.hidden_state_array("m", 1)[np.array(rows)]
    intact = np.array([r for r in rows if not 512 <= r < 768])
    assert np.array_equal(store.hidden_state_array("m", 1)[intact], expected_layer(store, "m", 1)[intact])



def test_the_reader_drops_each_shard_once_it_has_read_its_last_rows(tmp_path) -> None:
    # The analysis plan counts the reader's cached shards (store.reading.cache_bound): blocks of one shard leave none
    # behind, forward reads of blocks that divide the shard keep only the shard they are in, and blocks that straddle
    # two shards keep those two.
    import hrsa.store.reading as reading

    store = _filled(Target(str(tmp_path / "store"), None, {}))
    info = store.model_info("m")
    shard = info.layout.shard_tokens
    checked = reading.CheckedArray(store.group("models/m")["hidden/1"], info.dtype, "x", done=np.ones(info.n_units, bool),
                                   shard_tokens=shard, model_prefix="models/m", layer=1, settings=store.writer("m").settings)
    want = expected_layer(store, "m", 1)
    for u in range(info.n_units):
        assert np.array_equal(checked[u * shard : (u + 1) * shard], want[u * shard : (u + 1) * shard])
        assert len(checked._shards._cache) == 0
    quarter = shard // 4
    for start in range(0, info.n_tokens, quarter):
        assert np.array_equal(checked[start : start + quarter], want[start : start + quarter])
        assert len(checked._shards._cache) <= 1
    straddling = 3 * shard // 8
    for start in range(0, info.n_tokens, straddling):
        assert np.array_equal(checked[start : start + straddling], want[start : start + straddling])
        assert len(checked._shards._cache) <= 2
    bound = reading.cache_bound(shard_tokens=shard, chunk_tokens=info.layout.chunk_tokens, n_tokens=info.n_tokens,
                                row_bytes=want.shape[1] * want.itemsize, readers=1, every_block=True, block_tokens=quarter)
    assert bound == reading.cache_bound(shard_tokens=shard, chunk_tokens=info.layout.chunk_tokens, n_tokens=info.n_tokens,
                                        row_bytes=want.shape[1] * want.itemsize, readers=1, block_tokens=shard)


def test_a_shard_is_fetched_and_hashed_once_however_many_blocks_read_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # The record and hash check sits on the read path: Dask blocks smaller than a shard must not each cost a record
    # GET and a whole-shard GET on S3, and an index selection must look up only the shards its rows fall in.
    import hrsa.store.reading as reading

    store = _filled(Target(str(tmp_path / "store"), None, {}))
    info = store.model_info("m")
    looked: list[int] = []
    real = reading.checked_record
    monkeypatch.setattr(reading, "checked_record", lambda store, prefix, u, settings: looked.append(u) or real(store, prefix, u, settings))
    import hrsa.store.unit_records as unit_records

    hashed: list[int] = []
    real_hash = unit_records.xxh3
    monkeypatch.setattr(unit_records, "xxh3", lambda data: hashed.append(len(data)) or real_hash(data))
    block = info.layout.shard_tokens // 4
    values = store.hidden_state("m", 1, chunk_tokens=block).compute()
    assert np.array_equal(values, expected_layer(store, "m", 1))
    assert sorted(looked) == list(range(info.n_units))  # each shard once, not once per block
    records = [store.writer("m").record(u) for u in store.writer("m").units()]
    assert sorted(hashed) == sorted(r.shards[1].size for r in records)  # each whole shard object fetched and hashed once
    looked.clear()
    rows = np.array([1, info.layout.shard_tokens + 2])
    assert np.array_equal(store.hidden_state("m", 1).compute()[rows], values[rows])
    looked.clear()
    writer = store.writer("m")
    reading.CheckedArray(store.group("models/m")["hidden/1"], info.dtype, "x", done=np.ones(info.n_units, bool),
                         shard_tokens=info.layout.shard_tokens, model_prefix="models/m", layer=1, settings=writer.settings)[rows]
    assert sorted(looked) == [0, 1]

# -- kills at every metadata write of create_model ---------------------------------------------------------------
CREATE = r"""
import json, os, signal, sys
from zarr.storage import FsspecStore, LocalStore
from hrsa.store import ActivationStore
a = json.loads(sys.argv[1])
store = ActivationStore.open(a["url"], mode="r+", storage_options=a["so"])
count = [0]
def dying(cls):
    original = cls.set
    async def set(self, key, value, *args, **kwargs):
        if key.startswith("models/") and key.endswith("zarr.json"):
            if count[0] == a["kill_at"]:
                if a["torn"]:  # half the bytes reach the backend, as a write cut short does
                    await original(self, key, type(value).from_bytes(value.to_bytes()[: len(value) // 2]), *args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
            count[0] += 1
        return await original(self, key, value, *args, **kwargs)
    cls.set = set
dying(LocalStore)
dying(FsspecStore)
real_set_sync = LocalStore.set_sync
def set_sync(self, key, value):  # hrsa writes a local object in the caller's thread, not through LocalStore.set
    if key.startswith("models/") and key.endswith("zarr.json"):
        if count[0] == a["kill_at"]:
            if a["torn"]:
                real_set_sync(self, key, type(value).from_bytes(value.to_bytes()[: len(value) // 2]))
            os.kill(os.getpid(), signal.SIGKILL)
        count[0] += 1
    return real_set_sync(self, key, value)
LocalStore.set_sync = set_sync
import hrsa.store.model as model_module
real_create = model_module.create_if_absent
def create(raw, key, data):  # the model's own metadata, written last, is created only if absent (os.link, S3 PUT)
    if count[0] == a["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)
    count[0] += 1
    return real_create(raw, key, data)
model_module.create_if_absent = create
store.create_model("m", corpus=a["cid"], n_hidden_states=4, hidden_size=24, dtype="float32", chunk_tokens=64,
                   shard_tokens=256, exist_ok=True)
print(count[0])
"""


def _create_in_a_process(target: Target, cid: str, kill_at: int, torn: bool) -> subprocess.CompletedProcess[str]:
    args = json.dumps({"url": target.url, "so": target.storage_options, "cid": cid, "kill_at": kill_at, "torn": torn})
    return subprocess.run([sys.executable, "-c", CREATE, args], capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_kill_at_every_metadata_write_of_create_model_leaves_it_absent_or_half_created(target: Target) -> None:
    store = target.open("a")
    cid = store.write_corpus(make_table(), tokenizer={"name": "test-tok", "fingerprint": "fp-1"}, source="test")
    # How many metadata objects create_model writes on this backend (group, 4 arrays, attributes).
    done = _create_in_a_process(target, cid, 10**6, False)
    assert done.returncode == 0, done.stderr
    n_writes = int(done.stdout)
    assert n_writes == 6, n_writes  # every write, whichever path it takes: hidden/, 4 arrays, then the model's
    store.delete_model("m")
    # A torn object is a local file cut short; an S3 PUT lands whole or not at all.
    for kill_at in range(n_writes):
        for torn in (False, True) if target.storage_options is None else (False,):
            assert _create_in_a_process(target, cid, kill_at, torn).returncode == -signal.SIGKILL
            store = target.open()
            state = "absent" if (kill_at, torn) == (0, False) else "half"
            assert store.models() == []
            assert store.half_created_models() == (["m"] if state == "half" else [])
            problems = verify_store(store).problems
            if state == "half":
                assert [p.what.startswith("creation interrupted") for p in problems] == [True]
                assert _cli(target, "store", "ls", target.url).exit_code == 0
                _one_error_line(_cli(target, "store", "info", target.url, "m"), 2)
            else:
                assert problems == ()
            # Repair: a re-run replaces a half-created model (even kills), or deleting it does (odd kills).
            if kill_at % 2 == 0:
                store.create_model("m", corpus=cid, n_hidden_states=4, hidden_size=24, dtype="float32", chunk_tokens=64,
                                   shard_tokens=256, exist_ok=True)
                fill_model(store, "m")
                assert verify_store(store).ok
                assert np.array_equal(store.hidden_state("m", 3).compute(), expected_layer(store, "m", 3))
            if state != "absent" or kill_at % 2 == 0:
                store.delete_model("m")
            assert _objects(store, "models/m/") == {}


# -- format 1 stores: refused with the fix named, upgraded in place ---------------------------------------------
def _as_format_1(store: ActivationStore, flags: list[int]) -> None:
    """Turn a format-2 store into what format 1 wrote: a ``units`` array of done flags, no records, version 1."""
    import zarr

    group = store.group("models/m")
    for key in list(_objects(store, "models/m/")):
        if key.startswith(("models/m/done/", "models/m/claims/")):
            _delete(store, key)
    units = zarr.open_group(_raw(store), path="models/m", mode="r+").create_array(
        "units", shape=(len(flags),), dtype="uint8", chunks=(1,), compressors=None, fill_value=0)
    units[:] = np.array(flags, np.uint8)
    del group
    _edit_json(store, "zarr.json", lambda meta: meta["attributes"]["hrsa"].update(format_version=1))


def test_a_format_1_store_is_refused_then_upgraded_keeping_every_intact_unit(target: Target) -> None:
    store = _filled(target)
    reference = {k: store.hidden_state("m", k).compute() for k in range(LAYERS)}
    _as_format_1(store, [1, 1, 1, 0])
    _flip(store, _shard(2, 1))  # damaged before the upgrade: it must not be recorded as done
    for verb in (["ls", target.url], ["verify", target.url], ["info", target.url, "m"]):
        result = _cli(target, "store", *verb)
        _one_error_line(result, 2)
        assert f"hrsa store upgrade {target.url}" in result.stderr
    result = _cli(target, "store", "upgrade", target.url)
    assert result.exit_code == 0, result.output
    assert "m: 2 done unit(s) recorded; units [1] were damaged" in result.stdout and "format 1 -> 4" in result.stdout
    upgraded = target.open()
    report = verify_store(upgraded)
    assert report.damaged_units() == {} and report.incomplete_units == {"m": [1, 3]}
    assert _objects(upgraded, "models/m/units/") == {}
    before = _objects(upgraded)
    again = _cli(target, "store", "upgrade", target.url)  # again: nothing left to do, and nothing written
    assert again.exit_code == 0 and again.stdout.strip() == f"store format 4 already: nothing to do: {target.url}"
    assert _objects(upgraded) == before
    fill_model(upgraded, "m")
    assert verify_store(target.open("r")).ok
    for k in range(LAYERS):
        assert np.array_equal(target.open("r").hidden_state("m", k).compute(), reference[k])


@pytest.mark.parametrize("version", [2, 3])
def test_an_older_format_store_is_refused_then_upgraded_by_its_version_alone(target: Target, version: int) -> None:
    """Format 2's done records list a sha256 beside the xxh3, which hrsa before format 3 requires: a store holding
    format 3's records must not be opened by it (it would call every unit damaged). Format 4's corpora hold their
    documents' text digests in their ids, which hrsa before format 4 would recompute without them and call every
    such corpus damaged. So an older store is moved on once, on purpose; the upgrade rewrites nothing but the
    version, its records read as they were, and a corpus stored without digests keeps its id and reads."""
    import dataclasses

    from hrsa.store.unit_records import sha256

    store = _filled(target)
    writer = store.writer("m")
    if version == 2:
        for unit in writer.units():  # records as format 2 wrote them
            record = writer.record(unit)
            shards = {k: dataclasses.replace(s, sha256=sha256(_get(store, f"models/m/{s.key}")))  # type: ignore[arg-type]
                      for k, s in record.shards.items()}
            _put(store, _record(unit.index), dataclasses.replace(record, shards=shards).to_bytes())
    _edit_json(store, "zarr.json", lambda meta: meta["attributes"]["hrsa"].update(format_version=version))
    before = {k: v for k, v in _objects(store).items() if k != "zarr.json"}
    for verb in (["ls", target.url], ["verify", target.url]):
        result = _cli(target, "store", *verb)
        _one_error_line(result, 2)
        assert f"hrsa store upgrade {target.url}" in result.stderr
    result = _cli(target, "store", "upgrade", target.url)
    assert result.exit_code == 0 and f"format {version} -> 4" in result.stdout, result.output
    upgraded = target.open("r")
    assert {k: v for k, v in _objects(upgraded).items() if k != "zarr.json"} == before
    assert verify_store(upgraded).ok
    assert np.array_equal(upgraded.hidden_state("m", 1).compute(), expected_layer(upgraded, "m", 1))


def test_a_corpus_deleted_under_a_model_is_reported_and_restored_by_writing_it_again(target: Target, tmp_path) -> None:
    store = _filled(target)
    cid = store.model_info("m").corpus
    for key in _objects(store, f"corpora/{cid}/"):
        _delete(store, key)
    report = verify_store(store)
    assert [(p.where, p.what) for p in report.problems] == [(f"corpora/{cid}", "missing or incomplete, but a model refers to it")]
    assert _cli(target, "store", "verify", target.url).exit_code == 1
    # A read that needs the corpus (a document selection) is one line; nothing is changed by it.
    before = _objects(store)
    _one_error_line(_cli(target, "store", "get", target.url, "m", "--layer", "1", "--docs", "0", "--out", str(tmp_path / "x.npy")), 2)
    assert _objects(store) == before
    # The corpus is content-addressed: writing the same table again restores it under the same id.
    assert store.write_corpus(make_table(), tokenizer={"name": "test-tok", "fingerprint": "fp-1"}, source="test") == cid
    assert verify_store(target.open("r")).ok


def _truncate_corpus_metadata(store: ActivationStore, cid: str) -> None:
    key = f"corpora/{cid}/zarr.json"
    _put(store, key, _get(store, key)[:40])  # type: ignore[index]


def _drop_corpus_complete_flag(store: ActivationStore, cid: str) -> None:
    _edit_json(store, f"corpora/{cid}/zarr.json", lambda meta: meta["attributes"]["hrsa"].pop("complete"))


@pytest.mark.slow_on_s3
@pytest.mark.parametrize("damage", [_truncate_corpus_metadata, _drop_corpus_complete_flag])
def test_a_corpus_whose_metadata_does_not_read_is_named_with_its_fix(target: Target, damage: Callable, tmp_path) -> None:
    """A corpus a model refers to, present but unreadable (truncated metadata; a write killed before its last
    step), is named as such with the fix, not as an unknown id of a store that has "none"."""
    store = _filled(target)
    cid = store.model_info("m").corpus
    damage(store, cid)
    store = target.open("a")
    assert [p.where for p in verify_store(store).problems] == [f"corpora/{cid}"]
    result = _cli(target, "store", "get", target.url, "m", "--layer", "1", "--docs", "0", "--out", str(tmp_path / "x.npy"))
    _one_error_line(result, 1)  # damaged data, as for a corpus whose arrays were damaged
    assert f"corpus {cid} of {target.url}" in result.stderr and "Extract any model on it again" in result.stderr
    assert "(none)" not in result.stderr
    assert store.write_corpus(make_table(), tokenizer={"name": "test-tok", "fingerprint": "fp-1"}, source="test") == cid
    assert verify_store(target.open("r")).ok


# -- a corpus's arrays: Zarr reads a missing chunk as zeros; the content hash is what vouches for them -------------
def _forge_token(store: ActivationStore, cid: str) -> None:
    array = store.group(f"corpora/{cid}")["token_ids"]
    array[5] = int(array[5]) + 1  # a valid chunk with a right crc32c: only the content hash tells


def _forge_truncation(store: ActivationStore, cid: str) -> None:
    store.group(f"corpora/{cid}")["doc_truncated"][1] = True  # all False until now: stored as no chunk at all


def _chunks_deleted(name: str) -> Callable[[ActivationStore, str], None]:
    def damage(store: ActivationStore, cid: str) -> None:
        chunks = _objects(store, f"corpora/{cid}/{name}/c/")
        assert chunks, f"{name} has no chunk to lose"
        for key in chunks:
            _delete(store, key)

    return damage


CORPUS_DAMAGE = {**{f"{name} chunks missing": _chunks_deleted(name) for name in (
    "token_ids", "is_special", "position", "doc_index", "doc_offsets", "doc_record_id", "doc_original_length")},
    "a token id changed": _forge_token, "a truncation flag set": _forge_truncation}


@pytest.mark.slow_on_s3(keep=("token_ids chunks missing",))
@pytest.mark.parametrize("fault", sorted(CORPUS_DAMAGE))
def test_a_damaged_corpus_is_named_by_verify_refused_by_reads_and_restored_by_writing_it(target: Target, fault: str,
                                                                                         tmp_path: Path) -> None:
    store = _filled(target)
    cid = store.model_info("m").corpus
    CORPUS_DAMAGE[fault](store, cid)
    store = target.open("a")
    report = verify_store(store)
    assert [p.where for p in report.problems] == [f"corpora/{cid}"], report.problems
    assert _cli(target, "store", "verify", target.url).exit_code == 1
    # Every read that takes tokens from the corpus refuses it (a document selection, the special-token filter,
    # the token table), in one line, and changes nothing.
    with pytest.raises(CorruptDataError, match=f"corpus {cid} .* damaged"):
        store.tokens(cid)
    before = _objects(store)
    _one_error_line(_cli(target, "store", "get", target.url, "m", "--layer", "1", "--exclude-special",
                         "--out", str(tmp_path / "x.npy")), 1)
    assert _objects(store) == before and not (tmp_path / "x.npy").exists()
    # The id is the content's hash: writing the same table again (as any extraction on it does) restores it.
    assert store.write_corpus(make_table(), tokenizer={"name": "test-tok", "fingerprint": "fp-1"}, source="test") == cid
    restored = target.open("r")
    assert verify_store(restored).ok
    assert restored.tokens(cid)["token_id"].tolist() == make_table().token_ids.tolist()


def test_an_edited_codec_chain_is_reported(target: Target) -> None:
    """Big-endian bytes in the codec chain: every shard still matches its hash, yet every value would read wrong."""
    store = _filled(target)

    def big_endian(meta: dict[str, Any]) -> None:
        inner = meta["codecs"][0]["configuration"]["codecs"]
        next(c for c in inner if c["name"] == "bytes")["configuration"]["endian"] = "big"

    _edit_json(store, "models/m/hidden/1/zarr.json", big_endian)
    report = verify_store(target.open("r"))
    assert [(p.where, p.what.startswith("codecs ")) for p in report.problems] == [("models/m/hidden/1", True)]


def _big_endian(meta: dict[str, Any]) -> None:
    inner = meta["codecs"][0]["configuration"]["codecs"]
    next(c for c in inner if c["name"] == "bytes")["configuration"]["endian"] = "big"


FORGED_ARRAY_METADATA = {
    "data type int32": lambda meta: meta.update(data_type="int32"),  # same width: read as garbage with exit 0
    "data type float64": lambda meta: meta.update(data_type="float64"),  # other widths: a traceback
    "data type float16": lambda meta: meta.update(data_type="float16"),
    "big-endian bytes": _big_endian,
    "chunk grid": lambda meta: meta["codecs"][0]["configuration"].update(chunk_shape=[128, HIDDEN]),
}


@pytest.mark.slow_on_s3(keep=("data type int32", "big-endian bytes"))
@pytest.mark.parametrize("fault", sorted(FORGED_ARRAY_METADATA))
def test_a_hidden_state_whose_array_metadata_was_edited_is_refused_not_decoded(target: Target, fault: str,
                                                                               tmp_path: Path) -> None:
    """Every shard still matches its record's xxh3 whatever the array's zarr.json says, so only its metadata tells:
    `store get` wrote garbage with exit 0 (int32, big endian), other widths were a traceback, and an analysis
    reported a wrong CKA. Reads now refuse it in one line naming the fix, as verify reports it."""
    store = _filled(target)
    _edit_json(store, "models/m/hidden/1/zarr.json", FORGED_ARRAY_METADATA[fault])
    store = target.open("r")
    assert {p.where.split(" shard ")[0] for p in verify_store(store).problems} == {"models/m/hidden/1"}
    for read in (lambda: store.hidden_state("m", 1), lambda: store.hidden_state_array("m", 1)):  # analyze reads by the latter
        with pytest.raises(CorruptDataError, match=r"models/m/hidden/1 stored as model m's attributes say .*"
                                                   r"\(`hrsa store rm .* m`\) and extract it again"):
            read()
    assert np.array_equal(store.hidden_state("m", 2).compute(), expected_layer(store, "m", 2))  # the others still read
    before = _objects(store)
    out = tmp_path / "x.npy"
    result = _cli(target, "store", "get", target.url, "m", "--layer", "1", "--out", str(out))
    _one_error_line(result, 1)
    assert "hrsa store rm" in result.stderr and not out.exists() and _objects(store) == before


def test_hidden_state_metadata_is_checked_once_per_opened_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads of one array pay its metadata check once; an edit made after is still caught (it changes what is read)."""
    from hrsa.store import activation_store

    store = ActivationStore.open(tmp_path / "s", mode="a")
    new_model(store, "m")
    fill_model(store, "m")
    calls = []
    check = activation_store.hidden_array_mismatches
    monkeypatch.setattr(activation_store, "hidden_array_mismatches", lambda *a, **k: calls.append(1) or check(*a, **k))
    for _ in range(3):
        store.hidden_state_array("m", 1)[0:10]
    assert len(calls) == 1
    _edit_json(store, "models/m/hidden/1/zarr.json", lambda meta: meta.update(data_type="int32"))
    with pytest.raises(CorruptDataError, match="data type int32"):
        store.hidden_state_array("m", 1)


def test_a_stray_file_among_the_hidden_states_leaves_verify_whole(target: Target) -> None:
    """A ``zarr.<hex>.partial`` that a SIGKILLed write leaves in ``hidden/`` is not a hidden state: every shard is
    still read, and a missing one still named (and reset)."""
    store = _filled(target)
    _put(store, "models/m/hidden/zarr.0123456789abcdef0123456789abcdef.partial", b"{")
    _delete(store, _shard(1, 2))
    report = verify_store(target.open("r"))
    assert [p.where for p in report.problems] == ["models/m/hidden/1 shard 2 (tokens 512:768)"]
    assert report.damaged_units() == {"m": [2]}


def test_a_coordinator_that_loses_the_creation_to_other_settings_leaves_the_winners_model_whole(
        target: Target) -> None:
    """Two coordinators create model "m" at the same instant: the loser (float16, its probe said "absent") writes
    its arrays' metadata before it loses the group's; the winner's model must still write, read and verify."""
    from dataclasses import replace

    from hrsa.store.model import create_model_group

    store = target.open("a")
    new_model(store, "m")  # the winner: float32, hidden states 0..LAYERS-1
    loser = replace(store.model_info("m"), dtype="float16", hidden_states=(0, 1, LAYERS))
    assert create_model_group(store.group("models"), loser) is False
    store = target.open("r+")
    fill_model(store, "m")
    assert np.array_equal(store.hidden_state("m", 1).compute(), expected_layer(store, "m", 1))
    assert verify_store(target.open("r")).ok


def test_a_corpus_stored_before_content_spans_reads_by_its_hash_of_then(tmp_path: Path) -> None:
    """hrsa before 2026-11-30 hashed the tokenizer's fingerprint into a corpus's content hash: such a corpus is whole,
    not damaged; a lost chunk of it is still caught."""
    import hashlib

    store = ActivationStore.open(tmp_path / "s", mode="a")
    new_model(store, "m")
    fill_model(store, "m")
    cid = store.model_info("m").corpus
    table = make_table()
    then = hashlib.sha256(b"fp-1")  # the formula of then, on the test table's arrays
    for array in (table.token_ids.astype("<i4"), table.doc_offsets.astype("<i8"), table.is_special.astype("u1")):
        then.update(np.ascontiguousarray(array).tobytes())
    then.update(json.dumps(list(table.record_ids)).encode())
    _edit_json(store, f"corpora/{cid}/zarr.json",
               lambda meta: meta["attributes"]["hrsa"].update(content_hash=then.hexdigest()))
    store = ActivationStore.open(tmp_path / "s", mode="r+")
    assert verify_store(store).ok and store.tokens(cid)["token_id"].tolist() == table.token_ids.tolist()
    _chunks_deleted("token_ids")(store, cid)
    assert [p.where for p in verify_store(ActivationStore.open(tmp_path / "s")).problems] == [f"corpora/{cid}"]
