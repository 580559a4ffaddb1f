"""Which documents a work unit runs through the model, so that every document's forward pass happens once.

A unit is a fixed token range of the corpus (one shard), so documents straddle units. Each document belongs to the
unit it starts in, which runs it; the rows it has past that unit's end are carried to the next unit by the worker
(:class:`Carried`) instead of being computed again there. Before, every unit ran each document it overlapped, so a
document straddling two units ran twice (and one spanning k units, k times).

Bits must not depend on which unit or worker computes a document: a unit whose predecessor ran elsewhere (another
worker, or an earlier run that was interrupted) computes the straddling document itself, and the two halves of the
document must still be the same forward pass's. Batched CPU kernels sum in another order for another batch shape
(a few ulps), so a document that leaves its unit always runs alone, in a batch of one: its bits are then a function
of the document only, whoever runs it. The documents inside a unit run batched as before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["Carried", "UnitDocuments", "unit_documents"]


@dataclass(frozen=True)
class UnitDocuments:
    """The documents over one unit's tokens ``start:stop`` (indices into the corpus's documents).

    Attributes:
        head: the document begun in an earlier unit that reaches into this one (its rows come from the unit
            before, carried, or from running it alone here when they are not at hand), or None.
        inside: documents that start and end inside the unit: run batched.
        tail: the document that starts inside the unit and ends past it: run alone, its later rows carried on.
    """

    head: int | None
    inside: tuple[int, ...]
    tail: int | None

    def run_here(self) -> tuple[int, ...]:
        """The documents whose forward pass belongs to this unit (the ones that start in it)."""
        return self.inside + (() if self.tail is None else (self.tail,))


def unit_documents(doc_offsets: np.ndarray, start: int, stop: int) -> UnitDocuments:
    """Split the documents overlapping tokens ``start:stop`` by where they start and end (offsets: (n_docs + 1,))."""
    first = int(np.searchsorted(doc_offsets, start, side="right")) - 1
    last = int(np.searchsorted(doc_offsets, stop, side="left"))  # one past the last document overlapping the unit
    head = first if doc_offsets[first] < start else None
    starts_here = range(first if head is None else first + 1, last)
    tail = last - 1 if starts_here and doc_offsets[last] > stop else None
    inside = tuple(d for d in starts_here if d != tail)
    return UnitDocuments(head, inside, tail)


class Carried:
    """Rows of straddling documents computed by one unit for the units after it, kept in the worker's memory.

    An entry is ``(model, document) -> (first token, {hidden state: (rows, D) tensor})``: the document's rows
    from that corpus token to its end. Entries that no unit of this worker takes (the next unit ran on another
    worker) are dropped oldest first: at most ``capacity`` documents are held.
    """

    def __init__(self, capacity: int = 4) -> None:
        self._rows: OrderedDict[tuple[str, int], tuple[int, dict[int, torch.Tensor]]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def put(self, mid: str, doc: int, first_token: int, rows: dict[int, torch.Tensor]) -> None:
        with self._lock:
            self._rows[(mid, doc)] = (first_token, rows)
            while len(self._rows) > self._capacity:
                self._rows.popitem(last=False)

    def clear(self) -> None:
        """Forget every row held (another model, or a model's store record read afresh)."""
        with self._lock:
            self._rows.clear()

    def take(self, mid: str, doc: int, first_token: int) -> dict[int, torch.Tensor] | None:
        """The document's rows from ``first_token`` on, removed from the store of rows; None when not held."""
        with self._lock:
            held = self._rows.pop((mid, doc), None)
        if held is None or held[0] > first_token:
            return None
        skip = first_token - held[0]
        return {k: v[skip:] for k, v in held[1].items()}
