"""Stateful test of the store: random sequences of writes, resets, damage, verifies, reads and a second writer.

A hypothesis ``RuleBasedStateMachine`` (in the spirit of zarr's ``zarr.testing.stateful``) drives a real local
store (model "m": 4 units of 256 tokens, unit 3 partial, 4 hidden states) and keeps a plain Python model of what
it must hold: the bytes of every shard object and done record, the claim keys, and which units a live claim holds.
Everything the store must answer (done mask, pending units, verify's damaged and incomplete units, reads) is
derived from that model by byte comparison, never by asking the package's own parsers. Damage goes through the
raw Zarr store, as a disk or a user would do it.

Modelled as the store promises it, and loosely where it says so:

- Reads of a done unit decode only bytes whose xxh3 its record lists, so another unit's intact shard of the same
  byte count (compressed shards of units 0 and 2 of hidden state 0 are both 23,077 bytes here) must raise, as any
  other damage of a done unit does. Shards of units not done are not checked: Zarr reads what is there.
- Claims live for their lease (120 s) and a run takes seconds, so a claim never expires in the model: a unit whose
  done record was lost stays held by the claim of the write that made it, and a rewrite is refused until a reset.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from click.testing import CliRunner
from hypothesis import HealthCheck, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hrsa.cli import cli
from hrsa.store import ActivationStore, CorruptDataError, IncompleteModelError
from hrsa.store.objects import delete_key, get_bytes, list_keys, put_bytes
from hrsa.store.testing import HIDDEN, LAYERS, fill_model, new_model, unit_values
from hrsa.store.verify import verify_store

pytestmark = pytest.mark.property

UNITS = 4  # new_model: 1000 tokens in units of 256; unit 3 covers 768:1000 of its shard
SHARD_TOKENS = 256
N_TOKENS = 1000


DAMAGE = [*(f"shard:{how}" for how in ("delete", "empty", "truncate", "flip", "copy")),
          *(f"record:{how}" for how in ("flip", "edit", "stale", "copy", "delete", "forge"))]  # see _damage


def _range(u: int) -> tuple[int, int]:
    return u * SHARD_TOKENS, min((u + 1) * SHARD_TOKENS, N_TOKENS)


def _shard(k: int, u: int) -> str:
    return f"models/m/hidden/{k}/c/{u}/0"


def _record(u: int) -> str:
    return f"models/m/done/{u}"


def _claim(u: int, attempt: int) -> str:
    return f"models/m/claims/{u}/{attempt}"


def _keys(u: int) -> list[str]:
    """The objects of unit ``u``: its shard of every hidden state, and its done record."""
    return [*(_shard(k, u) for k in range(LAYERS)), _record(u)]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(doc: dict[str, Any]) -> bytes:
    """A done record's JSON as the format writes it (sorted keys, no spaces)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _flipped(data: st.DataObject, old: bytes) -> bytes:
    """``old`` with one bit, or every bit of one byte, flipped at a drawn offset."""
    at = data.draw(st.integers(0, len(old) - 1), label="offset")
    mask = data.draw(st.sampled_from([0x01, 0xFF]), label="mask")
    return old[:at] + bytes([old[at] ^ mask]) + old[at + 1 :]


@functools.cache
def _rows(u: int, k: int) -> np.ndarray:
    """What the shard of unit ``u``, hidden state ``k`` holds: its values, then zeros (the fill) up to a whole shard."""
    start, stop = _range(u)
    rows = np.zeros((SHARD_TOKENS, HIDDEN), np.float32)
    rows[: stop - start] = unit_values(u, start, stop, k, "float32")
    return rows


@functools.cache
def _template() -> tuple[str, dict[tuple[int, int], bytes], frozenset[str]]:
    """Made once per process: a store holding the empty model "m" (copied into every run), the bytes of every
    intact shard object (from a filled copy, written by the real writer), and the metadata keys of the model."""
    root = Path(tempfile.mkdtemp(prefix="hrsa-stateful-template-"))
    atexit.register(shutil.rmtree, root, True)
    new_model(ActivationStore.open(root / "empty", mode="a"), "m")
    shutil.copytree(root / "empty", root / "filled")
    filled = ActivationStore.open(root / "filled", mode="a")
    fill_model(filled, "m")
    raw = filled.group("models").store
    shards = {(k, u): get_bytes(raw, _shard(k, u)) for k in range(LAYERS) for u in range(UNITS)}
    assert all(shards.values())
    empty = ActivationStore.open(root / "empty", mode="r").group("models").store
    metadata = frozenset(f"models/m/{key}" for key in list_keys(empty, "models/m"))
    assert all(key.endswith("zarr.json") for key in metadata), metadata
    return str(root / "empty"), shards, metadata


class StoreMachine(RuleBasedStateMachine):
    """One fresh store per run; ``self.objects`` is the model: what every shard and done record key must hold."""

    def __init__(self) -> None:
        super().__init__()
        template, self.intact, self.metadata = _template()
        self.root = tempfile.mkdtemp(prefix="hrsa-stateful-")
        self.url = f"{self.root}/store"
        shutil.copytree(template, self.url)
        self.store = ActivationStore.open(self.url, mode="a")
        self.raw = self.store.group("models").store  # the root's Zarr store: keys are relative to the store root
        self.writer = self.store.writer("m")
        self.units = {unit.index: unit for unit in self.writer.units()}
        self.second: Any = None  # another process's writer: the store opened again, created on first use
        # The model.
        self.objects: dict[str, bytes | None] = {
            **{_shard(k, u): None for k in range(LAYERS) for u in range(UNITS)},
            **{_record(u): None for u in range(UNITS)},
        }
        self.claims: dict[int, list[int]] = {u: [] for u in range(UNITS)}  # attempts stored under claims/<u>/
        self.holder: dict[int, Any] = {}  # unit -> "first" or the second writer's Claim: the live claim on it
        self.second_taken: list[Any] = []  # every claim the second writer took (the older ones stale)
        self.records: dict[int, set[bytes]] = {u: set() for u in range(UNITS)}  # every done record written for u
        self.verified: Any = None  # the model's state at the last verify, and at the last read
        self.last_read: Any = None
        self.by_intact = {data: key for key, data in self.intact.items()}  # an intact shard's bytes -> (k, u)
        assert len(self.by_intact) == len(self.intact)

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- what the model says ---------------------------------------------------------------------------------------
    def state(self) -> tuple[bytes | None, ...]:
        """What verify and reads depend on: the bytes of every shard and record."""
        return tuple(self.objects.values())

    def done(self, u: int) -> bool:
        return self.objects[_record(u)] is not None

    def done_units(self) -> list[int]:
        return [u for u in range(UNITS) if self.done(u)]

    def pending(self) -> list[int]:
        return [u for u in range(UNITS) if not self.done(u)]

    def record_intact(self, u: int) -> bool:
        """A done record counts when it is byte for byte one the writer wrote for this unit (a replay of an older
        one of this unit too: the model's settings never change)."""
        return self.objects[_record(u)] in self.records[u]

    def shard_intact(self, u: int, k: int) -> bool:
        return self.objects[_shard(k, u)] == self.intact[(k, u)]

    def damaged(self) -> list[int]:
        """Done units whose record is not one written for them, or whose shards are not the bytes it lists."""
        return [u for u in self.done_units()
                if not self.record_intact(u) or not all(self.shard_intact(u, k) for k in range(LAYERS))]

    def read_outcome(self, u: int, k: int) -> np.ndarray | None:
        """Rows of unit ``u`` in a read of hidden state ``k`` (allow_incomplete), or None for a CorruptDataError."""
        data = self.objects[_shard(k, u)]
        n = _range(u)[1] - _range(u)[0]
        if not self.done(u):  # not checked: Zarr reads whatever is there (an orphan shard of a lost record)
            if not data:
                return np.zeros((n, HIDDEN), np.float32)  # no object, or an empty one: fill values
            return _rows(*self.by_intact[data][::-1])[:n] if data in self.by_intact else None  # else crc32c fails
        if not self.record_intact(u) or not self.shard_intact(u, k):
            return None  # a done unit reads only the bytes its record lists: not another intact shard of that size
        return _rows(u, k)[:n]

    # -- initial state ---------------------------------------------------------------------------------------------
    @initialize(units=st.lists(st.sampled_from(range(UNITS)), unique=True), damage=st.lists(st.sampled_from(DAMAGE), max_size=2),
                data=st.data())
    def start(self, units: list[int], damage: list[str], data: st.DataObject) -> None:
        """Start from an empty model, or from one where the writer has written some units, or all, maybe damaged
        already (so that every kind of damage meets verify in most runs)."""
        for u in units:
            self._write_first(u)
        for kind in damage:
            self._damage(data, kind)

    def _unit(self, data: st.DataObject) -> int:
        """A unit, its kind drawn first (done or not, held by a live claim or not, with claims or none), so that rare
        states (a done unit nobody holds after a forged record, a pending one still held) get their share."""
        kinds: dict[tuple[bool, bool, bool], list[int]] = {}
        for u in range(UNITS):
            kinds.setdefault((self.done(u), u in self.holder, bool(self.claims[u])), []).append(u)
        kind = data.draw(st.sampled_from(sorted(kinds)), label="kind of unit")
        return data.draw(st.sampled_from(kinds[kind]), label="unit")

    # -- writing ----------------------------------------------------------------------------------------------------
    def _values(self, u: int) -> dict[int, np.ndarray]:
        start, stop = _range(u)
        return {k: unit_values(u, start, stop, k, "float32") for k in range(LAYERS)}

    def _written(self, u: int, attempt: int) -> None:
        """The model after a write of ``u`` under claim ``attempt``: its intact shards, and the record it created."""
        for k in range(LAYERS):
            self.objects[_shard(k, u)] = self.intact[(k, u)]
        record = get_bytes(self.raw, _record(u))
        assert record is not None
        doc = json.loads(record)
        assert (doc["unit"], doc["tokens"], doc["attempt"]) == (u, list(_range(u)), attempt), doc
        assert doc["shards"] == {
            str(k): {"key": f"hidden/{k}/c/{u}/0", "bytes": len(self.intact[(k, u)]),
                     "xxh3": xxhash.xxh3_64_hexdigest(self.intact[(k, u)])}
            for k in range(LAYERS)
        }, doc
        self.objects[_record(u)] = record
        self.records[u].add(record)

    def _next_attempt(self, u: int) -> int:
        return (self.claims[u][-1] if self.claims[u] else 0) + 1

    @rule(data=st.data())
    def write_unit(self, data: st.DataObject) -> None:
        self._write_first(self._unit(data))

    def _write_first(self, u: int) -> None:
        """Done (intact or damaged) or held by a live claim: False and nothing written; else True, done and intact."""
        expected = not self.done(u) and u not in self.holder
        attempt = self._next_attempt(u)
        assert self.writer.write_unit(self.units[u], self._values(u)) is expected
        if expected:
            self.claims[u].append(attempt)
            self.holder[u] = "first"  # its claim stays, live for its lease, after the unit is done
            self._written(u, attempt)

    @precondition(lambda self: bool(self.pending()))
    @rule()
    def write_pending(self) -> None:
        """What an extraction worker does (fill_model): write every unit the listing says is pending."""
        pending = [unit.index for unit in self.writer.pending_units()]
        assert pending == self.pending()
        for u in pending:
            self._write_first(u)

    @rule(data=st.data())
    def reset_unit(self, data: st.DataObject) -> None:
        """What ``verify --reset-damaged`` or an operator does to one unit."""
        u = self._unit(data)
        self.writer.reset_unit(self.units[u])
        self._reset(u)

    def _reset(self, u: int) -> None:
        for key in _keys(u):
            self.objects[key] = None
        self.claims[u] = []
        self.holder.pop(u, None)

    # -- a second writer (another process) --------------------------------------------------------------------------
    def _second(self) -> Any:
        if self.second is None:
            self.second = ActivationStore.open(self.url, mode="a").writer("m")
        return self.second

    @rule(data=st.data(), write=st.booleans())
    def second_writer(self, data: st.DataObject, write: bool) -> None:
        """The second writer claims a unit, or writes one with a claim it took (one rule, so that both happen in a
        run: the write is what tests the claim)."""
        if write and self.second_taken:
            self._second_writes(data.draw(st.sampled_from(self.second_taken), label="claim"))
        else:
            self._second_claims(self._unit(data))

    def _second_claims(self, u: int) -> None:
        """A claim is taken only on a unit not done and held by no live claim; then the first writer skips it."""
        expected = not self.done(u) and u not in self.holder
        attempt = self._next_attempt(u)
        claim = self._second().claim(self.units[u])
        assert (claim is not None) is expected
        if claim is not None:
            assert (claim.unit, claim.attempt) == (u, attempt)
            self.claims[u].append(attempt)
            self.holder[u] = claim
            self.second_taken.append(claim)

    def _second_writes(self, claim: Any) -> None:
        """A write with a claim the second writer took: only while that claim is the live one and the unit is not
        done (a reset deletes claims, and a later claim of the same attempt has another token; a record put there
        makes the unit done)."""
        u = claim.unit
        expected = self.holder.get(u) is claim and not self.done(u)
        event(f"second writer writes: {'with its live claim' if self.holder.get(u) is claim else 'with a stale claim'}"
              f"{', unit done' if self.done(u) else ''}")
        assert self._second().write_unit(self.units[u], self._values(u), claim=claim) is expected
        if expected:
            self._written(u, claim.attempt)

    # -- damage, through the raw store ----------------------------------------------------------------------------
    def _put(self, key: str, data: bytes | None) -> None:
        if data is None:
            delete_key(self.raw, key)
        else:
            put_bytes(self.raw, key, data)
        self.objects[key] = data

    def _damage(self, data: st.DataObject, kind: str) -> None:
        """Damage one unit the way ``kind`` says (nothing when no unit is in a state to take it):

        - ``shard:delete``, ``shard:empty``, ``shard:truncate`` (to half): a done unit's shard object, changed in size;
        - ``shard:flip`` (a bit or a byte), ``shard:copy`` (another shard object over it, of the same size or not):
          its bytes changed, which only the record's xxh3 catches in general;
        - ``record:flip`` (a bit or a byte), ``record:edit`` (valid JSON, its own sha256 left as it was),
          ``record:stale`` (as if under other model settings, its own sha256 made right), ``record:copy`` (another
          unit's): a done record no longer the one written for it;
        - ``record:delete``: the unit is then not done, its shards left behind; ``record:forge``: a record put where a
          unit is not done (another unit's, or an older one of its own as a restore from a backup would put back),
          which makes the unit done, intact only if its shards are the ones that record lists.
        """
        what, how = kind.split(":")
        done = self.done_units()
        if what == "shard":
            targets = [(u, k) for u in done for k in range(LAYERS) if self.objects[_shard(k, u)]]
            if not targets:
                return
            u, k = data.draw(st.sampled_from(targets), label="unit, hidden state")
            key, old = _shard(k, u), self.objects[_shard(k, u)]
            assert old
            if how == "copy":
                sources = [key for key, value in self.objects.items() if "/hidden/" in key and value and key != _shard(k, u)]
                new = self.objects[data.draw(st.sampled_from(sources), label="source")]  # unit u's other shards at least
                if new in self.by_intact and len(new) == len(self.intact[(k, u)]) and new != old:  # type: ignore[arg-type]
                    event("damage: an intact shard of the same size copied over")
            else:
                new = {"delete": None, "empty": b"", "truncate": old[: len(old) // 2]}.get(how) if how != "flip" else _flipped(data, old)
        elif how == "forge":
            if not self.pending() or not done:
                return
            u = data.draw(st.sampled_from(self.pending()), label="unit")
            key = _record(u)
            new = data.draw(st.sampled_from(sorted(self.records[u]) + [self.objects[_record(v)] for v in done]), label="record")
        else:
            targets = {"copy": done if len(done) > 1 else [], "edit": [u for u in done if self.record_intact(u)],
                       "stale": [u for u in done if self.record_intact(u)]}.get(how, done)  # edit, stale: one that parses
            if not targets:
                return
            u = data.draw(st.sampled_from(targets), label="unit")
            key, old = _record(u), self.objects[_record(u)]
            assert old
            if how == "delete":
                new = None
            elif how == "flip":  # a flipped bit can leave valid JSON: only the record's own sha256 catches it then
                new = _flipped(data, old)
            elif how == "copy":
                new = self.objects[_record(data.draw(st.sampled_from([v for v in done if v != u]), label="source"))]
            else:
                doc = json.loads(old)
                if how == "edit":  # a field nothing else checks: only the record's own sha256 catches it
                    doc["writer"] = f"{doc['writer']}-edited"
                else:  # stale: what a user who read the format could forge, the record's hash made right
                    del doc["record_sha256"]
                    doc["settings"] = "0" * 32
                    doc["record_sha256"] = _sha(_canonical(doc))
                new = _canonical(doc)
        event(f"damage: {kind}")
        self._put(key, new)

    @rule(data=st.data(), how=st.sampled_from(["delete", "empty", "truncate"]))
    def damage_shard_size(self, data: st.DataObject, how: str) -> None:
        self._damage(data, f"shard:{how}")

    @rule(data=st.data(), how=st.sampled_from(["flip", "copy"]))
    def damage_shard_bytes(self, data: st.DataObject, how: str) -> None:
        self._damage(data, f"shard:{how}")

    @rule(data=st.data(), how=st.sampled_from(["flip", "edit", "stale", "copy"]))
    def damage_record(self, data: st.DataObject, how: str) -> None:
        self._damage(data, f"record:{how}")

    @rule(data=st.data(), how=st.sampled_from(["delete", "forge"]))
    def lose_or_forge_record(self, data: st.DataObject, how: str) -> None:
        self._damage(data, f"record:{how}")

    # -- verify, repair, read -----------------------------------------------------------------------------------------
    def _verify(self) -> None:
        report = verify_store(self.store)
        damaged = self.damaged()
        event(f"verify: {'damaged' if damaged else 'incomplete' if self.pending() else 'ok'}")
        assert report.damaged_units() == ({"m": damaged} if damaged else {}), report.problems
        assert report.incomplete_units == ({"m": self.pending()} if self.pending() else {})
        assert report.ok is (not damaged and not self.pending()), report.problems
        assert all(p.model == "m" for p in report.problems), report.problems

    @precondition(lambda self: bool(self.damaged()))
    @rule()
    def repair(self) -> None:
        """``hrsa store verify --reset-damaged``: exit 1, and every damaged unit is reset, pending and clean again
        (its shards, record and claims gone: ``objects_match`` checks what it deleted, and nothing else). While a live
        claim holds a unit not done (a writer at work, as far as anyone can tell) it is refused, and changes nothing."""
        damaged = self.damaged()
        result = CliRunner().invoke(cli, ["store", "verify", self.url, "--reset-damaged"])
        if any(not self.done(u) for u in self.holder):
            event("repair: refused beside a live claim")
            assert result.exit_code == 2 and "hrsa: error: Expected no extraction writing model m" in result.stderr, result.output
            return
        assert result.exit_code == 1, result.output
        assert f"reset {len(damaged)} damaged unit(s) of m" in result.stdout, result.output
        for u in damaged:
            self._reset(u)

    @precondition(lambda self: self.state() != self.last_read)  # the same bytes read the same: no step wasted
    @rule()
    def read(self) -> None:
        """Every hidden state, as a user reads it, and with ``allow_incomplete`` when units are pending. A layer reads
        only when every done unit's record is intact and its shard of that layer is the recorded one; never fill
        values or another unit's rows for a done unit."""
        self.last_read = self.state()
        for k in range(LAYERS):
            self._read(k, allow_incomplete=False)
            if self.pending():
                self._read(k, allow_incomplete=True)

    def _read(self, k: int, allow_incomplete: bool) -> None:
        def read() -> np.ndarray:
            return self.store.hidden_state("m", k, allow_incomplete=allow_incomplete).compute()

        if self.pending() and not allow_incomplete:
            event("read: incomplete")
            with pytest.raises(IncompleteModelError):
                read()
            return
        outcomes = [self.read_outcome(u, k) for u in range(UNITS)]
        note(f"read of hidden state {k}: {['rows' if o is not None else 'corrupt' for o in outcomes]}")
        if any(o is None for o in outcomes):
            event("read: corrupt")
            with pytest.raises(CorruptDataError):
                read()
            return
        got = read()
        assert got.dtype == np.float32 and got.shape == (N_TOKENS, HIDDEN)
        event(f"read: values ({'allow_incomplete' if self.pending() else 'complete'})")
        for u, outcome in enumerate(outcomes):
            start, stop = _range(u)
            assert np.array_equal(got[start:stop], outcome), f"unit {u}"

    # -- after every step ---------------------------------------------------------------------------------------------
    @invariant()
    def listing_matches(self) -> None:
        """The done listing and pending units are the model's (a damaged unit whose record exists counts as done)."""
        assert self.writer.done_mask().tolist() == [self.done(u) for u in range(UNITS)]
        assert [unit.index for unit in self.writer.pending_units()] == self.pending()
        assert self.store.model_info("m").units_done == len(self.done_units())

    @invariant()
    def verify_matches(self) -> None:
        """``verify`` names exactly the damaged units and the pending ones (run after every step that changed the
        store; a read or a refused write changes nothing, which ``objects_match`` checks)."""
        if self.state() != self.verified:
            self._verify()
            self.verified = self.state()

    @invariant()
    def objects_match(self) -> None:
        """Every shard and record key holds exactly the model's bytes, and nothing else is under the model: a write
        refused (done, or held by another writer) wrote nothing."""
        root = Path(self.url)  # a local store's objects are its files: read here directly, for speed
        for key, expected in self.objects.items():
            path = root / key
            assert (path.read_bytes() if path.is_file() else None) == expected, key
        claims = {_claim(u, a) for u, attempts in self.claims.items() for a in attempts}
        present = {key for key, value in self.objects.items() if value is not None}
        listed = {path.relative_to(root).as_posix() for path in (root / "models/m").rglob("*") if path.is_file()}
        assert listed == self.metadata | present | claims


TestStore = StoreMachine.TestCase
TestStore.settings = settings(
    max_examples=25, stateful_step_count=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
