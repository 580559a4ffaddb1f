"""In-process extraction: fill a model's pending work units from one loaded model, one document at a
time. The Ray actors of the distributed extraction run the same unit loop on their share of units.

A unit is a token range of the corpus; documents are laid end to end, so a document may straddle two
units. Such a document is run whole for each unit it touches (causal context needs its start) and
only the unit's rows are kept: a little repeated compute buys units that any worker can redo alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from hrsa.extract.models import LoadedModel, forward_hidden_states

if TYPE_CHECKING:
    import torch

    from hrsa.store import ActivationStore, WorkUnit
    from hrsa.store.units import ModelWriter

__all__ = ["extract_units", "unit_hidden_states"]


def unit_hidden_states(loaded: LoadedModel, token_ids: np.ndarray, doc_offsets: np.ndarray, unit: WorkUnit,
                       layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Hidden states ``layers`` of the unit's tokens, each (unit.n_tokens, D), in the model's dtype."""
    import torch

    # Step 1: the documents that overlap the unit.
    first = int(np.searchsorted(doc_offsets, unit.start, side="right")) - 1
    last = int(np.searchsorted(doc_offsets, unit.stop, side="left"))
    docs = range(first, last)
    # Step 2: run each whole document; keep only the rows inside the unit.
    pieces: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    for d, states in zip(docs, forward_hidden_states(loaded, [token_ids[doc_offsets[d]:doc_offsets[d + 1]].tolist() for d in docs])):
        lo = max(unit.start, int(doc_offsets[d])) - int(doc_offsets[d])
        hi = min(unit.stop, int(doc_offsets[d + 1])) - int(doc_offsets[d])
        for k in layers:
            pieces[k].append(states[k, lo:hi])  # (rows, D)
    return {k: torch.cat(v) for k, v in pieces.items()}


def extract_units(store: ActivationStore, writer: ModelWriter, loaded: LoadedModel,
                  on_unit: Callable[[WorkUnit], None] | None = None) -> int:
    """Write every pending unit of ``writer``'s model; returns how many were written."""
    corpus = store.group(f"corpora/{writer.info.corpus}")
    token_ids, doc_offsets = corpus["token_ids"][:], corpus["doc_offsets"][:]
    written = 0
    for unit in writer.pending_units():
        states = unit_hidden_states(loaded, token_ids, doc_offsets, unit, writer.info.hidden_states)
        written += writer.write_unit(unit, states)
        if on_unit:
            on_unit(unit)
    return written
