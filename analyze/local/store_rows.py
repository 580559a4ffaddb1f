"""Rows of a stored hidden state, read a piece at a time: what the local metrics hold instead of a layer.

A read of rows ``ids`` walks the token range they cover one piece (a shard of the store, by default) at a
time: each piece is the Dask slice ``hidden[lo:hi]`` of its first to last wanted token, computed alone
(synchronously: one piece in flight), and only its wanted rows are kept. So a read holds the rows it returns
plus one piece (and the store's few cached shards), never the layer, whatever the layer's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import dask.array as da
    from numpy.typing import NDArray

__all__ = ["SampleRows", "read_rows"]


def read_rows(hidden: da.Array, ids: NDArray[np.int64], *, piece: int) -> NDArray:
    """Rows ``ids`` of a lazy (N, D) hidden state, in the order of ``ids``, as stored.

    Args:
        hidden: the lazy array of :meth:`ActivationStore.hidden_state`.
        ids: token indices (any order; repeats allowed).
        piece: tokens per read (align it with the store's shards).

    Returns:
        (len(ids), D) in the store's dtype.
    """
    ids = np.asarray(ids, np.int64)
    out = np.empty((ids.size, hidden.shape[1]), hidden.dtype)
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    cuts = np.flatnonzero(np.diff(ordered // piece)) + 1  # where the next piece starts, in ``ordered``
    for part in np.split(np.arange(ordered.size), cuts):
        if part.size == 0:
            continue
        lo, hi = int(ordered[part[0]]), int(ordered[part[-1]]) + 1
        rows = np.asarray(hidden[lo:hi].compute(scheduler="sync"))  # (hi - lo, D): one piece at most
        out[order[part]] = rows[ordered[part] - lo]
    return out


@dataclass(frozen=True)
class SampleRows:
    """A token sample of one stored hidden state as a :class:`~hrsa.analyze.local.knn_search.RowSource`.

    Attributes:
        hidden: the lazy (N, D) array; ids: (n,) the sample's token indices; piece: tokens per read.
    """

    hidden: da.Array
    ids: NDArray[np.int64]
    piece: int

    @property
    def n(self) -> int:
        return int(self.ids.size)

    def block(self, start: int, stop: int) -> NDArray:
        return read_rows(self.hidden, self.ids[start:stop], piece=self.piece)

    def take(self, rows: NDArray[np.int64]) -> NDArray:
        return read_rows(self.hidden, self.ids[rows], piece=self.piece)
