"""Exactly-once writing: a work unit is one whole shard (a token range) of every hidden state.

A writer fills every stored hidden state's shard for the unit, and only then sets the unit's flag in
the ``units`` array (one chunk, hence one object, per unit). A writer killed before the flag leaves
the unit not done; resuming rewrites exactly that unit. Writers of different units touch disjoint
objects, so any number of processes may write one model at once. Two writers never share a shard:
Zarr loses data silently when processes write different inner chunks of one shard.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hrsa.store.format import as_storage
from hrsa.store.model import ModelInfo, hidden_key

if TYPE_CHECKING:
    import zarr

__all__ = ["WorkUnit", "ModelWriter", "done_mask", "shard_key", "shard_size"]

DONE = 1  # the one flag byte that makes a unit count; any other non-zero byte is damage (verify reports it)


def done_mask(flags: np.ndarray) -> np.ndarray:
    """(n_units,) bool from a model's ``units`` flag bytes: done only where the byte is exactly :data:`DONE`."""
    return np.asarray(flags) == DONE


def shard_key(array: zarr.Array, unit: int) -> str:
    """Store key of the object holding shard ``unit`` (tokens ``unit * shard_tokens`` on) of a (N, D) array."""
    return f"{array.store_path.path}/{array.metadata.encode_chunk_key((unit, 0))}"


def shard_size(array: zarr.Array, unit: int) -> int | None:
    """Bytes of shard ``unit``'s object, or None when there is none.

    Zarr reads a missing shard as fill values without complaint, so whoever trusts a done unit asks the
    store itself (one stat, or one HEAD on S3).
    """
    from zarr.core.sync import sync

    try:
        return int(sync(array.store_path.store.getsize(shard_key(array, unit))))
    except FileNotFoundError:
        return None


def _delete_shard(array: zarr.Array, unit: int) -> None:
    from zarr.core.sync import sync

    sync(array.store_path.store.delete(shard_key(array, unit)))


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
    """Writes whole work units of one model; safe to use from many processes at once."""

    def __init__(self, group: zarr.Group, info: ModelInfo) -> None:
        self._group = group
        self.info = info

    def units(self) -> list[WorkUnit]:
        n_tokens = self.info.n_tokens
        return [WorkUnit(i, *self.info.layout.unit_range(i, n_tokens)) for i in range(self.info.n_units)]

    def done_mask(self) -> np.ndarray:
        """(n_units,) bool, read fresh from the store (other processes may have finished units)."""
        return done_mask(self._group["units"][:])

    def pending_units(self) -> list[WorkUnit]:
        done = self.done_mask()
        return [u for u in self.units() if not done[u.index]]

    def write_unit(self, unit: WorkUnit, states: Mapping[int, object], *, overwrite: bool = False) -> bool:
        """Write one unit: ``states[k]`` is hidden state k over the unit's tokens, shape (n, D).

        Args:
            unit: the unit to write, from :meth:`units` or :meth:`pending_units`.
            states: every stored hidden state, as numpy arrays or torch tensors of the model's dtype.
            overwrite: rewrite a unit that is already done (otherwise it is left alone).

        Returns:
            True if the unit was written, False if it was already done and left untouched.
        """
        # Step 1: a done unit is never written twice (a retried task after a lost reply, say).
        if not overwrite and done_mask(self._group["units"][unit.index]):
            return False
        # Step 2: check everything before writing anything.
        expected = (unit.n_tokens, self.info.hidden_size)
        missing = sorted(set(self.info.hidden_states) - set(states))
        if missing:
            raise ValueError(f"Expected every stored hidden state for unit {unit.index}. Missing {missing}.")
        arrays = {k: as_storage(states[k], self.info.dtype) for k in self.info.hidden_states}
        for k, values in arrays.items():
            if values.shape != expected:
                raise ValueError(f"Expected hidden state {k} of shape {expected} for unit {unit.index}. Got {values.shape}.")
        # Step 3: whole shards, then the flag; the flag is what makes the unit count. Every shard object is
        # written, all-zero ones too, so that a done unit's missing object always means damage. A unit that
        # covers only part of its shard (the last one) starts from no object: Zarr would otherwise read the
        # old one, torn or damaged, to merge the write into it.
        for k, values in arrays.items():
            array = self._group[hidden_key(k)].with_config({"write_empty_chunks": True})
            if unit.n_tokens < self.info.layout.shard_tokens:
                _delete_shard(array, unit.index)
            array[unit.start : unit.stop] = values
        self._group["units"][unit.index] = DONE
        return True

    def reset_unit(self, unit: WorkUnit) -> None:
        """Make a unit not done and rewritable: delete its shard objects, then clear its flag (``verify --reset-damaged``).

        Deleting first means a kill in between leaves a done unit with missing shards, which verify
        reports (and a second reset finishes), never a pending unit whose damaged shard a rewrite would merge into.
        """
        for k in self.info.hidden_states:
            _delete_shard(self._group[hidden_key(k)], unit.index)
        self._group["units"][unit.index] = 0
