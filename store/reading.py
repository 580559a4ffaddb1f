"""Reading a hidden state through Zarr without trusting what is (not) there.

:class:`CheckedArray` is what :meth:`ActivationStore.hidden_state` wraps in Dask: a done unit's missing or empty
shard is an error (Zarr would read its fill values, zeros, as data), and a checksum failure names the fix.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from hrsa.store.errors import CorruptDataError
from hrsa.store.format import as_logical
from hrsa.store.units import checked_record, shard_problem

if TYPE_CHECKING:
    import zarr

__all__ = ["CheckedArray"]


class CheckedArray:
    """A Zarr array seen in the model's dtype, whose checksum failures name the fix.

    Dask indexes it like an array (``from_array``); it pickles, so Ray workers can read from it.
    """

    def __init__(self, array: zarr.Array, dtype: str, where: str, *, done: np.ndarray, shard_tokens: int,
                 model_prefix: str, layer: int, settings: str) -> None:
        self._array, self._dtype, self._where = array, dtype, where
        self._done, self._shard_tokens = done, shard_tokens
        self._model_prefix, self._layer, self._settings = model_prefix, layer, settings
        self._present: set[int] = set()  # done shards already seen in the store: a shard is looked up once
        self._lock = threading.Lock()  # Dask's threads read blocks of one shard at once: one of them looks it up
        self.shape, self.ndim = array.shape, array.ndim
        self.dtype = as_logical(np.empty(0, array.dtype), dtype).dtype

    def _units(self, selection: Any) -> np.ndarray:
        """The shards (work units) a selection's rows fall in."""
        rows = selection[0] if isinstance(selection, tuple) else selection
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(self.shape[0])
            return np.arange(start // self._shard_tokens, -(-stop // self._shard_tokens))
        return np.unique(np.asarray(rows).reshape(-1) // self._shard_tokens)

    def _check_shards(self, selection: Any) -> None:
        """A done unit's record must be intact and of this model's settings, its shard present and of the recorded
        size: Zarr would read a missing shard as zeros.

        One record read and one stat (one GET and one HEAD on S3) per shard, the first time a read touches it
        (Dask reads a shard in several blocks when its chunks are smaller than a shard). Content hashes are
        verify's job; reads rely on each chunk's crc32c.
        """
        unseen = [u for u in self._units(selection).tolist() if self._done[u] and u not in self._present]
        if not unseen:
            return
        with self._lock:
            for u in unseen:
                if u in self._present:
                    continue
                try:
                    record = checked_record(self._array.store_path.store, self._model_prefix, u, self._settings)
                    problem = shard_problem(self._array, self._model_prefix, self._layer, record, content=False)
                except ValueError as error:
                    problem = str(error)
                if problem:
                    raise CorruptDataError(
                        f"Expected an intact shard {u} in {self._where} (its unit is done). Got: {problem}. "
                        "Run `hrsa store verify --reset-damaged` to list and reset the damaged units, then re-extract them."
                    )
                self._present.add(u)

    def __getstate__(self) -> dict[str, Any]:  # pickled to Ray or Dask workers: a lock does not travel
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __getitem__(self, selection: Any) -> np.ndarray:
        self._check_shards(selection)
        try:
            return as_logical(self._array[selection], self._dtype)
        except ValueError as error:
            if "checksum" not in str(error):
                raise
            raise CorruptDataError(
                f"Expected intact chunks in {self._where}. Got a checksum mismatch instead ({error}). "
                "Run `hrsa store verify` to list the damaged shards, then re-extract them."
            ) from error
