"""A model's per-unit bookkeeping (store format 3): claims that give a unit one writer, and done records.

Keys below a model's group (raw objects beside its Zarr arrays, not Zarr nodes)::

    claims/<unit>/<attempt>   {"token", "owner", "expires"}: attempt n holds the unit until it expires
    leases/<token>            {"purpose", "token", "owner", "expires"}: the whole model held by one process, an
                              extraction writing it ("extract"), a deletion ("delete") or a reset of damaged units ("reset") under way; renewed like a
                              claim, deleted by its holder at its end (readers before these records ignore them)
    done/<unit>               the unit's manifest: every shard object's key, byte count and xxh3 (format 2: a sha256
                              too), the model settings it was written under, and a sha256 of the record itself

Both are created with :func:`~hrsa.store.objects.create_if_absent`, so of any number of writers exactly one
takes attempt n, and exactly one done record is ever created per unit. A claim is taken over by creating
attempt n+1 once attempt n has expired (its writer died: nobody renewed it); attempts are never rewritten by
anyone but their owner, so no compare-and-swap is needed. Clocks of the writers' machines are compared, so a
lease is generous (:data:`LEASE_S`) against skew.

This module knows the records' format and their rules, not the arrays (``units.py`` writes those).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LEASE_S", "LEASES", "ShardRecord", "DoneRecord", "Claim", "ModelLease", "done_key", "claim_prefix", "parse_done_units",
    "settings_fingerprint", "sha256", "xxh3", "differs", "size_problem", "writer_name",
]

LEASE_S = 120.0  # a claim unrenewed for this long belongs to a dead writer; renewed every LEASE_S / 4


LEASES = "leases"  # the folder of a model's leases (ModelLease)


def done_key(unit: int) -> str:
    return f"done/{unit}"


def claim_prefix(unit: int) -> str:
    return f"claims/{unit}"


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def settings_fingerprint(attrs: dict[str, Any]) -> str:
    """Fingerprint of a model's attributes: a done record counts only for the settings it was written under."""
    return sha256(_canonical(attrs))[:32]


def parse_done_units(names: list[str]) -> list[int]:
    """Unit indices from a listing of ``done/`` (names that are not a unit number as :func:`done_key` writes it are
    ignored: ``01`` beside ``1`` counted one unit twice, and a model with a unit pending read as complete)."""
    return sorted(int(n) for n in names if n.isascii() and n.isdigit() and str(int(n)) == n)


def xxh3(data: bytes | memoryview) -> str:
    """A fast non-cryptographic hash (~7 GB/s here, against sha256's ~1.4). Not a CRC: a Zarr shard object is
    chunks each followed by its own crc32c, so the whole object's crc32c depends on the chunk lengths only."""
    import xxhash

    return xxhash.xxh3_64_hexdigest(data)


@dataclass(frozen=True)
class ShardRecord:
    """One stored shard object as its writer wrote it: its size and a hash of its bytes.

    New records list the xxh3 of the whole object, which tells any accidental change or another shard of the same
    size (a miss has probability 2**-64); reads and verify compare it. Records of earlier versions list a sha256 too
    (the xxh3 is compared then), or only a sha256 (written before the xxh3 was kept: compared instead). One hash a
    shard: sha256 (~3 GB/s with SHA-NI, ~1.4 without) beside the xxh3 (~10) was a third of the write path's CPU, and
    no key protects either from someone who can rewrite the record, so a cryptographic hash bought nothing.
    """

    key: str  # relative to the model's group: hidden/<k>/c/<unit>/0
    size: int
    sha256: str | None = None
    xxh3: str | None = None

    def __post_init__(self) -> None:
        if self.sha256 is None and self.xxh3 is None:
            raise ValueError(f"shard {self.key} lists no hash")

    @classmethod
    def of(cls, key: str, data: bytes | memoryview) -> ShardRecord:
        return cls(key, len(data), xxh3=xxh3(data))

    @classmethod
    def of_pieces(cls, key: str, pieces: Sequence[memoryview]) -> ShardRecord:
        """The record of the object ``pieces`` make, joined in order (hashed as a stream: no joined copy)."""
        import xxhash

        digest = xxhash.xxh3_64()
        for piece in pieces:
            digest.update(piece)
        return cls(key, sum(piece.nbytes for piece in pieces), xxh3=digest.hexdigest())

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key": self.key, "bytes": self.size}
        return {**doc, **self.checksums()}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ShardRecord:
        return cls(doc["key"], int(doc["bytes"]), *(None if doc.get(name) is None else str(doc[name])
                                                      for name in ("sha256", "xxh3")))

    def checksums(self) -> dict[str, str]:
        """The hashes this record lists, by name."""
        return {name: value for name, value in (("sha256", self.sha256), ("xxh3", self.xxh3)) if value is not None}

    @property
    def checksum(self) -> tuple[str, str]:
        """``(name, hex digest)`` of the hash reads and verify compare: the xxh3 where the record lists one."""
        return ("xxh3", self.xxh3) if self.xxh3 is not None else ("sha256", self.sha256)  # type: ignore[return-value]

    def problem(self, data: bytes | memoryview | None) -> str | None:
        """What is wrong with ``data`` as this shard's object (its size, then its hash), or None."""
        if data is None or len(data) != self.size:
            return size_problem(None if data is None else len(data), self.size)
        name, digest = self.checksum
        return None if (xxh3 if name == "xxh3" else sha256)(data) == digest else differs(name)


def differs(checksum: str) -> str:
    return f"shard object's {checksum} differs from its done record (substituted, stale or damaged)"


def size_problem(size: int | None, recorded: int) -> str:
    if size is None:
        return "shard object missing (Zarr would read fill values)"
    if size == 0:
        return "shard object empty (0 bytes)"
    return f"shard object has {size} bytes, its done record {recorded}"


@dataclass(frozen=True)
class DoneRecord:
    """The manifest of a done unit; its own sha256 makes a flipped byte anywhere in it a finding."""

    unit: int
    start: int
    stop: int
    settings: str
    shards: dict[int, ShardRecord]
    attempt: int
    writer: str

    def to_bytes(self) -> bytes:
        body = self._body()
        return _canonical({**body, "record_sha256": sha256(_canonical(body))})

    def _body(self) -> dict[str, Any]:
        return {
            "unit": self.unit, "tokens": [self.start, self.stop], "settings": self.settings, "attempt": self.attempt,
            "writer": self.writer,
            "shards": {str(k): s.to_json() for k, s in sorted(self.shards.items())},
        }

    @classmethod
    def parse(cls, data: bytes | None, unit: int) -> DoneRecord:
        """The record of ``unit`` from its bytes.

        Raises:
            ValueError: missing, not JSON, its own checksum does not match (forged or flipped), or of another unit.
        """
        if data is None:
            raise ValueError("done record missing")
        try:
            doc = json.loads(data)
            stated = doc.pop("record_sha256")
            if stated != sha256(_canonical(doc)):
                raise ValueError("its own sha256 does not match (forged or damaged)")
            shards = {int(k): ShardRecord.from_json(s) for k, s in doc["shards"].items()}
            record = cls(int(doc["unit"]), int(doc["tokens"][0]), int(doc["tokens"][1]), str(doc["settings"]), shards,
                         int(doc["attempt"]), str(doc["writer"]))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
            raise ValueError(f"done record unreadable ({type(error).__name__}: {error})") from None
        if record.unit != unit:
            raise ValueError(f"done record is unit {record.unit}'s, found at unit {unit}'s key")
        return record


def writer_name() -> str:
    """``host@pid-space:pid``: whose PIDs ``pid`` is one of (``host:pid`` where the system does not say)."""
    space = _pid_space()
    return f"{socket.gethostname()}{'@' + space if space else ''}:{os.getpid()}"


@functools.cache
def _pid_space() -> str:
    """This kernel's boot id and this process's PID namespace: processes that share a host name need not share PIDs
    (containers run with the host's network take its name; machines can be named alike), so a claim's owner is
    looked up only by a process with the same kernel and namespace. Empty where /proc does not say (not Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}.{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


@dataclass(frozen=True)
class Claim:
    """Attempt ``attempt`` at writing ``unit``, held by whoever holds ``token`` until ``expires`` (unix time)."""

    unit: int
    attempt: int
    token: str
    owner: str
    expires: float

    @classmethod
    def new(cls, unit: int, attempt: int, lease_s: float = LEASE_S) -> Claim:
        return cls(unit, attempt, uuid.uuid4().hex, writer_name(), time.time() + lease_s)

    def renewed(self, lease_s: float = LEASE_S) -> Claim:
        return Claim(self.unit, self.attempt, self.token, self.owner, time.time() + lease_s)

    def key(self) -> str:
        return f"{claim_prefix(self.unit)}/{self.attempt}"

    def to_bytes(self) -> bytes:
        return _canonical({"token": self.token, "owner": self.owner, "expires": self.expires})

    @classmethod
    def parse(cls, data: bytes | None, unit: int, attempt: int) -> Claim | None:
        """The claim, or None when gone or unreadable (then it holds nothing: a torn claim's writer died)."""
        try:
            doc = json.loads(data or b"")
            return cls(unit, attempt, str(doc["token"]), str(doc["owner"]), float(doc["expires"]))
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def live(self) -> bool:
        """Unexpired, and not held by a process of this machine that is gone (a killed writer's unit is taken over at
        once on its own machine; elsewhere its lease runs out)."""
        return _live(self.expires, self.owner)


@dataclass(frozen=True)
class ModelLease:
    """A whole model held by one process until ``expires`` (unix time): ``purpose`` "extract" (an extraction's
    driver, from before it creates or opens the model until it ends), "delete" (a deletion under way) or "reset"
    (``verify --reset-damaged`` resetting units). An extraction refuses to start beside either of the last two, and they
    refuse to start beside an extraction.

    Any number of processes hold leases on one model at once (extractions of one model share it unit by unit); each
    writes only its own key, ``leases/<token>``, so a plain write renews it. Live by the same rule as a :class:`Claim`.
    """

    purpose: str
    token: str
    owner: str
    expires: float

    @classmethod
    def new(cls, purpose: str, lease_s: float = LEASE_S) -> ModelLease:
        return cls(purpose, uuid.uuid4().hex, writer_name(), time.time() + lease_s)

    def renewed(self, lease_s: float = LEASE_S) -> ModelLease:
        return ModelLease(self.purpose, self.token, self.owner, time.time() + lease_s)

    def key(self) -> str:
        return f"{LEASES}/{self.token}"

    def to_bytes(self) -> bytes:
        return _canonical({"purpose": self.purpose, "token": self.token, "owner": self.owner, "expires": self.expires})

    @classmethod
    def parse(cls, data: bytes | None, token: str) -> ModelLease | None:
        """The lease at ``leases/<token>``, or None when gone or unreadable (a torn lease's holder died writing it)."""
        try:
            doc = json.loads(data or b"")
            lease = cls(str(doc["purpose"]), str(doc["token"]), str(doc["owner"]), float(doc["expires"]))
        except (ValueError, KeyError, TypeError):
            return None
        return lease if lease.token == token else None

    @property
    def live(self) -> bool:
        return _live(self.expires, self.owner)


def _live(expires: float, owner: str) -> bool:
    """A lease (a unit's claim, a model's lease) holds until it expires, or until its owner, a process of this
    machine, is gone."""
    return time.time() < expires and not _dead_local_process(owner)


def _dead_local_process(owner: str) -> bool:
    where, _, pid = owner.rpartition(":")
    host, _, space = where.partition("@")
    if host != socket.gethostname() or space != _pid_space() or not pid.isdigit():
        return False  # another machine's or namespace's PID (or an older hrsa's, which did not say): the lease decides
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
