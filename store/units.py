"""Exactly-once writing: a work unit is one whole shard (a token range) of every hidden state.

The protocol (store format 3; the records are :mod:`hrsa.store.unit_records`):

1. A writer claims the unit: it creates ``claims/<unit>/<attempt>`` with create-if-absent (attempt 1, or n+1
   once attempt n has expired). Exactly one writer holds a unit; the others skip it.
2. It computes the unit, checks it still holds the claim and no done record exists, and writes every stored
   hidden state's shard object whole, hashing the bytes on their way to the store.
3. It creates ``done/<unit>``, the unit's manifest (keys, byte counts and xxh3 of each shard, the model's
   settings), with create-if-absent. The record is what makes the unit count, so a writer killed at any
   instant before leaves the unit not done, and its claim expires; a done record always lists shards that were
   whole when it was written. Verify hashes the shards against it, so any later change is caught.

Writers of different units touch disjoint objects; two writers never share a shard (Zarr loses data silently
when processes write different inner chunks of one shard).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hrsa.store.format import as_storage
from hrsa.store.model import ModelInfo, hidden_key
from hrsa.store.objects import (
    create_if_absent, delete_key, delete_prefix, get_bytes, list_keys, object_size, put_bytes, put_pieces,
)
from hrsa.store.shard_encoding import encode_shard_pieces
from hrsa.store.unit_records import (
    LEASE_S, LEASES, Claim, DoneRecord, ModelLease, ShardRecord, claim_prefix, done_key, parse_done_units,
    settings_fingerprint, writer_name,
)

if TYPE_CHECKING:
    import zarr

__all__ = ["WorkUnit", "ModelWriter", "array_through", "done_units", "live_claims", "live_leases", "holding_model",
           "shard_key", "checked_record", "recorded_shard", "shard_problem"]


log = logging.getLogger(__name__)


def shard_key(array: zarr.Array, unit: int) -> str:
    """Store key of the object holding shard ``unit`` (tokens ``unit * shard_tokens`` on) of a (N, D) array."""
    return f"{array.store_path.path}/{array.metadata.encode_chunk_key((unit, 0))}"


def _model_prefix(group: zarr.Group) -> str:
    return group.store_path.path


def done_units(group: zarr.Group) -> list[int]:
    """Units of a model group that have a done record: one listing of ``done/`` (O(units / 1000) requests on S3)."""
    return parse_done_units(list_keys(group.store, f"{_model_prefix(group)}/done"))


def live_claims(store: Any, model_prefix: str) -> list[Claim]:
    """The live claims (latest attempt, unexpired, its writer not a dead process of this machine) of units that have no
    done record: the units some writer is computing or writing now. One listing of ``claims/`` and one of ``done/``,
    then one read per claimed unit not done. Needs no model attributes (a half-created model has claims too)."""
    done = set(parse_done_units(list_keys(store, f"{model_prefix}/done")))
    attempts: dict[int, list[int]] = {}
    for key in list_keys(store, f"{model_prefix}/claims"):
        unit, _, attempt = key.partition("/")
        if unit.isdigit() and attempt.isdigit():
            attempts.setdefault(int(unit), []).append(int(attempt))
    live = []
    for unit in sorted(set(attempts) - done):
        latest = max(attempts[unit])
        claim = Claim.parse(get_bytes(store, f"{model_prefix}/{claim_prefix(unit)}/{latest}"), unit, latest)
        if claim is not None and claim.live:
            live.append(claim)
    return live


def live_leases(store: Any, model_prefix: str) -> list[ModelLease]:
    """The live leases on a model (:class:`~hrsa.store.unit_records.ModelLease`): extractions running on it and
    deletions under way. One listing of ``leases/`` and one read per lease there."""
    leases = []
    for token in list_keys(store, f"{model_prefix}/{LEASES}"):
        lease = ModelLease.parse(get_bytes(store, f"{model_prefix}/{LEASES}/{token}"), token)
        if lease is not None and lease.live:
            leases.append(lease)
    return leases


@contextmanager
def renewing(renew: Callable[[], None], lease_s: float, name: str) -> Iterator[None]:
    """Call ``renew`` every ``lease_s / 4`` in a thread while the body runs (a lease's holder keeps it live)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(lease_s / 4):
            renew()

    thread = threading.Thread(target=loop, daemon=True, name=name)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def holding_model(store: Any, model_prefix: str, purpose: str, *, lease_s: float = LEASE_S) -> Iterator[ModelLease]:
    """Hold the model at ``model_prefix`` (its folder need not exist yet) while the body runs: a lease record of this
    process, renewed like a unit's claim, deleted at the end; a killed holder's ends with its process on its
    machine, elsewhere when it runs out. Checking what others hold is the caller's (:func:`live_leases`)."""
    lease = ModelLease.new(purpose, lease_s)
    key = f"{model_prefix}/{lease.key()}"
    put_bytes(store, key, lease.to_bytes())  # the token is this process's own: nobody else writes this key
    holder = {"lease": lease}

    def renew() -> None:
        renewed = holder["lease"].renewed(lease_s)
        try:
            put_bytes(store, key, renewed.to_bytes())
        except OSError as error:  # a storage hiccup: tried again at the next tick, while the lease still runs
            log.warning("renewing the lease on %s failed (%s); trying again", model_prefix, error)
            return
        holder["lease"] = renewed

    try:
        with renewing(renew, lease_s, f"hrsa-model-lease-{purpose}"):
            yield lease
    finally:
        delete_key(store, key)


def read_record(store: Any, model_prefix: str, unit: int) -> DoneRecord:
    """The done record of ``unit``. Raises ValueError when it is missing, unreadable or forged."""
    return DoneRecord.parse(get_bytes(store, f"{model_prefix}/{done_key(unit)}"), unit)


def checked_record(store: Any, model_prefix: str, unit: int, settings: str) -> DoneRecord:
    """``unit``'s done record, intact and written under ``settings``. Raises ValueError saying what is wrong."""
    record = read_record(store, model_prefix, unit)
    if record.settings != settings:
        raise ValueError("done record was written under other model settings (stale)")
    return record


def recorded_shard(array: zarr.Array, model_prefix: str, layer: int, record: DoneRecord) -> ShardRecord:
    """The shard of ``layer`` that a done record lists, at the key this array keeps that unit's shard.

    Raises:
        ValueError: the record lists no such shard (or lists it at another key).
    """
    shard = record.shards.get(layer)
    key = shard_key(array, record.unit)
    if shard is None or f"{model_prefix}/{shard.key}" != key:
        raise ValueError(f"done record lists no shard of hidden state {layer} at {key}")
    return shard


def shard_problem(array: zarr.Array, model_prefix: str, layer: int, record: DoneRecord) -> str | None:
    """What is wrong with a done unit's shard of ``layer``, or None.

    The shard object must be the one its record lists: present, of the recorded size and hash (reading the
    object). Zarr reads a missing shard as fill values, so whoever trusts a done unit asks this, never Zarr.
    """
    try:
        shard = recorded_shard(array, model_prefix, layer, record)
    except ValueError as error:
        return str(error)
    return shard.problem(get_bytes(array.store_path.store, shard_key(array, record.unit)))


def array_through(array: zarr.Array, store: Any) -> zarr.Array:
    """``array`` (same metadata, path and config) read and written through ``store``, a wrapper of its own store."""
    import zarr
    from zarr.core.array import AsyncArray
    from zarr.storage import StorePath

    return zarr.Array(AsyncArray(metadata=array.metadata, store_path=StorePath(store, array.store_path.path),
                                 config=array.async_array.config))


@dataclass(frozen=True)
class WorkUnit:
    """Token range ``start:stop`` of a model's corpus; ``index`` is its shard number."""

    index: int
    start: int
    stop: int

    @property
    def n_tokens(self) -> int:
        return self.stop - self.start


class ModelWriter:
    """Claims and writes whole work units of one model; safe to use from many processes at once."""

    def __init__(self, group: zarr.Group, info: ModelInfo, *, lease_s: float = LEASE_S) -> None:
        self._group = group
        self._store = group.store
        self._prefix = _model_prefix(group)
        self.info = info
        self.settings = settings_fingerprint(info.to_attrs())
        self.lease_s = lease_s
        self._arrays: dict[int, zarr.Array] = {}  # opened once: a unit's write needs each state's codecs and grid

    def _array(self, k: int) -> zarr.Array:
        """Hidden state ``k``'s array, opened once per writer (its metadata is fixed when the model is created; a
        model deleted and created again gets a new writer): opening reads and parses its zarr.json, ~2 ms, or one
        GET on S3, for each of a model's ~30 states in every unit."""
        if k not in self._arrays:
            self._arrays[k] = self._group[hidden_key(k)]
        return self._arrays[k]

    def units(self) -> list[WorkUnit]:
        n_tokens = self.info.n_tokens
        return [WorkUnit(i, *self.info.layout.unit_range(i, n_tokens)) for i in range(self.info.n_units)]

    def done_mask(self) -> np.ndarray:
        """(n_units,) bool, from a fresh listing of the done records (other processes may have finished units)."""
        mask = np.zeros(self.info.n_units, bool)
        mask[[u for u in done_units(self._group) if u < self.info.n_units]] = True
        return mask

    def is_done(self, unit: WorkUnit) -> bool:
        """One lookup (one HEAD on S3), whatever the number of units."""
        return object_size(self._store, self._key(done_key(unit.index))) is not None

    def pending_units(self) -> list[WorkUnit]:
        done = self.done_mask()
        return [u for u in self.units() if not done[u.index]]

    def _key(self, relative: str) -> str:
        return f"{self._prefix}/{relative}"

    # -- claims --------------------------------------------------------------------------------------------------
    def _attempts(self, unit: WorkUnit) -> list[int]:
        return sorted(int(a) for a in list_keys(self._store, self._key(claim_prefix(unit.index))) if a.isdigit())

    def holder(self, unit: WorkUnit) -> Claim | None:
        """The live claim on ``unit``, if any (its latest attempt, unexpired)."""
        attempts = self._attempts(unit)
        if not attempts:
            return None
        key = self._key(f"{claim_prefix(unit.index)}/{attempts[-1]}")
        claim = Claim.parse(get_bytes(self._store, key), unit.index, attempts[-1])
        return claim if claim is not None and claim.live else None

    def claim(self, unit: WorkUnit) -> Claim | None:
        """Take ``unit`` for this writer; None when it is done or another live writer holds it."""
        if self.is_done(unit):
            return None
        attempts = self._attempts(unit)
        if attempts:
            latest = Claim.parse(get_bytes(self._store, self._key(f"{claim_prefix(unit.index)}/{attempts[-1]}")),
                                 unit.index, attempts[-1])
            if latest is not None and latest.live:
                return None
        claim = Claim.new(unit.index, (attempts[-1] if attempts else 0) + 1, self.lease_s)
        if not create_if_absent(self._store, self._key(claim.key()), claim.to_bytes()):
            return None  # another writer took this attempt first
        return claim

    def holds(self, claim: Claim) -> bool:
        """Whether ``claim`` is still the unit's latest attempt, unexpired, and the unit not done."""
        unit = self.units()[claim.unit]
        if self.is_done(unit) or self._attempts(unit)[-1:] != [claim.attempt]:
            return False
        current = Claim.parse(get_bytes(self._store, self._key(claim.key())), claim.unit, claim.attempt)
        return current is not None and current.token == claim.token and current.live

    def renew(self, claim: Claim) -> Claim:
        """Push the claim's expiry on (only its owner ever writes its key, so a plain write is safe)."""
        renewed = claim.renewed(self.lease_s)
        put_bytes(self._store, self._key(claim.key()), renewed.to_bytes())
        return renewed

    @contextmanager
    def claimed(self, unit: WorkUnit) -> Iterator[Claim | None]:
        """Hold ``unit`` (None when done or held elsewhere) while the body runs, renewing the lease in a thread."""
        claim = self.claim(unit)
        if claim is None:
            yield None
            return
        holder = {"claim": claim}

        def renew() -> None:
            holder["claim"] = self.renew(holder["claim"])

        with renewing(renew, self.lease_s, f"hrsa-lease-{unit.index}"):
            yield claim

    # -- writing ---------------------------------------------------------------------------------------------------
    def write_unit(self, unit: WorkUnit, states: Mapping[int, object], *, claim: Claim | None = None,
                   threads: int = 1) -> bool:
        """Write one unit: ``states[k]`` is hidden state k over the unit's tokens, shape (n, D).

        Args:
            unit: the unit to write, from :meth:`units` or :meth:`pending_units`.
            states: every stored hidden state, as numpy arrays or torch tensors of the model's dtype.
            claim: this writer's claim on the unit (from :meth:`claimed`); taken here when not given.
            threads: hidden states encoded, hashed and stored at once. The bytes written do not depend on it.

        Returns:
            True if this call wrote the unit; False if it was done, or another writer holds or finished it.
        """
        arrays = self._checked(unit, states)  # every mistake is raised before anything is written
        if claim is None:
            with self.claimed(unit) as taken:
                return taken is not None and self._write(unit, arrays, taken, threads)
        return self._write(unit, arrays, claim, threads)

    def _checked(self, unit: WorkUnit, states: Mapping[int, object]) -> dict[int, np.ndarray]:
        expected = (unit.n_tokens, self.info.hidden_size)
        missing = sorted(set(self.info.hidden_states) - set(states))
        if missing:
            raise ValueError(f"Expected every stored hidden state for unit {unit.index}. Missing {missing}.")
        arrays = {k: as_storage(states[k], self.info.dtype) for k in self.info.hidden_states}
        for k, values in arrays.items():
            if values.shape != expected:
                raise ValueError(f"Expected hidden state {k} of shape {expected} for unit {unit.index}. Got {values.shape}.")
        return arrays

    def _write(self, unit: WorkUnit, arrays: dict[int, np.ndarray], claim: Claim, threads: int = 1) -> bool:
        # Step 1: a writer whose lease lapsed (a stalled process) must not overwrite the taker's shards.
        if not self.holds(claim):
            return False
        # Step 2: whole shard objects, encoded here with the arrays' own codecs (shard_encoding.py) and hashed before
        # they go to the store. Every object is written, all-zero ones too, so a done unit's missing object always
        # means damage; each replaces whatever a dead writer left at its key whole, never merged into it.
        def put_shard(k: int) -> ShardRecord:
            array = self._array(k)
            key = shard_key(array, unit.index)
            pieces = encode_shard_pieces(array, unit.index, arrays[k])
            record = ShardRecord.of_pieces(key.removeprefix(self._prefix + "/"), pieces)
            put_pieces(self._store, key, pieces)
            return record

        # Several states at once where the worker has the cores (a GPU worker's CPUs are otherwise idle): the
        # codecs, hashes and file writes let go of the GIL. The first failure stops the states not yet begun and
        # is raised once those under way have ended: nothing of this call is written after it returns.
        if threads > 1:
            with ThreadPoolExecutor(threads, thread_name_prefix="hrsa-shard") as pool:
                futures = {k: pool.submit(put_shard, k) for k in arrays}
                wait(futures.values(), return_when=FIRST_EXCEPTION)
                for future in futures.values():
                    future.cancel()
            failed = [f.exception() for f in futures.values() if not f.cancelled() and f.exception() is not None]
            if failed:
                raise failed[0]
            shards = {k: future.result() for k, future in futures.items()}
        else:
            shards = {k: put_shard(k) for k in arrays}
        # Step 3: the done record, created once; it is what makes the unit count.
        record = DoneRecord(unit.index, unit.start, unit.stop, self.settings, shards, claim.attempt, writer_name())
        return create_if_absent(self._store, self._key(done_key(unit.index)), record.to_bytes())

    def reset_unit(self, unit: WorkUnit) -> None:
        """Make a unit not done and rewritable: delete its shard objects, its done record, then its claims
        (``verify --reset-damaged``).

        Deleting the shards first means a kill in between leaves a done unit with missing shards, which verify
        reports (and a second reset finishes), never a pending unit whose damaged shard a rewrite would merge into.
        """
        for k in self.info.hidden_states:
            delete_key(self._store, shard_key(self._array(k), unit.index))
        delete_key(self._store, self._key(done_key(unit.index)))
        delete_prefix(self._store, self._key(claim_prefix(unit.index)))

    def record(self, unit: WorkUnit) -> DoneRecord:
        """The unit's done record. Raises ValueError when missing, unreadable or forged."""
        return read_record(self._store, self._prefix, unit.index)
