"""``hrsa store upgrade``: bring an older store to the current format.

Format 3 -> 4 raises the version only: format 4's corpora hold their documents' text digests in their ids, which
hrsa before format 4 would recompute without them (calling every such corpus damaged); format-3 corpora, without
digests, keep their ids and read as they are.
Format 2 -> 3 raises the version only: format 2's done records (a sha256 and an xxh3 a shard) are read as they are;
format 3's list the xxh3 alone, which hrsa before format 3 cannot read, so a store is moved on once, on purpose.
Format 1 (done flags in a ``units`` array) -> done records:

For each done unit of each model, every shard object is read back through Zarr (its crc32c checked) and hashed;
the unit's done record is created from what is stored. A unit whose shards are missing or fail their checksum
gets no record: it is left not done, and re-running its extraction rewrites it. The ``units`` array goes once a
model's records exist, and the store's format version is raised last, so a kill at any point leaves a store that
the next ``upgrade`` finishes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hrsa.store.activation_store import ActivationStore
from hrsa.store.format import ATTRS_KEY, FORMAT_VERSION
from hrsa.store.model import hidden_key
from hrsa.store.objects import create_if_absent, delete_prefix, get_bytes
from hrsa.store.opening import open_root, stored_format
from hrsa.store.unit_records import DoneRecord, ShardRecord, done_key
from hrsa.store.units import ModelWriter, WorkUnit, shard_key

__all__ = ["UpgradeReport", "upgrade_store"]


@dataclass
class UpgradeReport:
    from_version: int
    units_recorded: dict[str, int] = field(default_factory=dict)
    units_left_pending: dict[str, list[int]] = field(default_factory=dict)  # damaged: re-extract them


def upgrade_store(url: str, storage_options: Mapping[str, Any] | None = None) -> UpgradeReport:
    root = open_root(url, "r+", storage_options, upgrading=True)
    report = UpgradeReport(stored_format(root) or FORMAT_VERSION)
    store = ActivationStore(root, url=url, read_only=False)
    for mid in store.models():
        group = store.group(f"models/{mid}")
        if "units" not in group:
            continue  # upgraded already
        writer = ModelWriter(group, store.model_info(mid))
        flags = group["units"][:]
        recorded, damaged = 0, []
        for unit in writer.units():
            if flags[unit.index] != 1 or writer.is_done(unit):
                continue
            record = _record_of_stored(writer, group, unit)
            if record is None:
                damaged.append(unit.index)
                continue
            create_if_absent(group.store, f"{group.store_path.path}/{done_key(unit.index)}", record.to_bytes())
            recorded += 1
        delete_prefix(group.store, f"{group.store_path.path}/units")
        report.units_recorded[mid], report.units_left_pending[mid] = recorded, damaged
    if report.from_version != FORMAT_VERSION:  # a current store is left byte for byte as it was
        root.attrs[ATTRS_KEY] = {**root.attrs.get(ATTRS_KEY, {}), "format_version": FORMAT_VERSION}
    return report


def _record_of_stored(writer: ModelWriter, group: Any, unit: WorkUnit) -> DoneRecord | None:
    """The done record of what is stored for ``unit``, or None when a shard is missing, empty or fails its crc32c."""
    prefix = group.store_path.path
    shards = {}
    for k in writer.info.hidden_states:
        array = group[hidden_key(k)]
        key = shard_key(array, unit.index)
        data = get_bytes(group.store, key)
        if not data:
            return None
        try:
            array[unit.start : unit.stop]  # every chunk's crc32c
        except ValueError:
            return None
        shards[k] = ShardRecord.of(key.removeprefix(prefix + "/"), data)
    return DoneRecord(unit.index, unit.start, unit.stop, writer.settings, shards, 0, "hrsa store upgrade")
