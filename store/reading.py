"""Reading a hidden state through Zarr without trusting what is (not) there.

:class:`CheckedArray` is what :meth:`ActivationStore.hidden_state` wraps in Dask: a done unit's missing or empty
shard is an error (Zarr would read its fill values, zeros, as data), and a checksum failure names the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hrsa.store.errors import CorruptDataError
from hrsa.store.format import as_logical
from hrsa.store.units import shard_size

if TYPE_CHECKING:
    import zarr

__all__ = ["CheckedArray"]


class CheckedArray:
    """A Zarr array seen in the model's dtype, whose checksum failures name the fix.

    Dask indexes it like an array (``from_array``); it pickles, so Ray workers can read from it.
    """

    def __init__(self, array: zarr.Array, dtype: str, where: str, *, done: np.ndarray, shard_tokens: int) -> None:
        self._array, self._dtype, self._where = array, dtype, where
        self._done, self._shard_tokens = done, shard_tokens
        self.shape, self.ndim = array.shape, array.ndim
        self.dtype = as_logical(np.empty(0, array.dtype), dtype).dtype

    def _check_shards(self, selection: Any) -> None:
        """A done unit's shard must exist and hold bytes: Zarr would read a missing one as zeros.

        One stat (one HEAD on S3) per shard a read touches, beside the shard's own reads.
        """
        rows = selection[0] if isinstance(selection, tuple) else selection
        if isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = rows.indices(self.shape[0])
            units = range(start // self._shard_tokens, -(-stop // self._shard_tokens))
        else:
            units = range(self._done.size)
        for u in units:
            if self._done[u] and not shard_size(self._array, u):
                raise CorruptDataError(
                    f"Expected a stored shard {u} in {self._where} (its unit is done). Got a missing or empty object instead. "
                    "Run `hrsa store verify --reset-damaged` to list and reset the damaged units, then re-extract them."
                )

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
