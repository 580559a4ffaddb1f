"""Synthetic corpora and activations for tests and benchmarks, shaped like real ones.

Values of a unit are a function of (unit, layer) only, so any process can write or re-check them.
"""

from __future__ import annotations

import numpy as np

from hrsa.store.activation_store import ActivationStore
from hrsa.store.corpus import CorpusTable

__all__ = ["HIDDEN", "LAYERS", "DOC_LENGTHS", "make_table", "unit_values", "fill_model", "expected_layer", "new_model"]

HIDDEN = 24
LAYERS = 4
DOC_LENGTHS = (130, 1, 300, 69, 500)  # crosses shard boundaries; one document of a single token


def make_table(doc_lengths: tuple[int, ...] = DOC_LENGTHS, vocab: int = 97) -> CorpusTable:
    offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
    n = int(offsets[-1])
    token_ids = (np.arange(n) * 7 % vocab).astype(np.int32)
    is_special = np.zeros(n, bool)
    is_special[offsets[:-1]] = True  # a BOS at the start of every document
    return CorpusTable(token_ids, offsets, is_special, [f"rec-{i}" for i in range(len(doc_lengths))])


def unit_values(unit_index: int, start: int, stop: int, layer: int, dtype: str, hidden: int = HIDDEN) -> np.ndarray:
    """Activations of one unit and layer, a function of (unit, layer) only, so any writer can redo them.

    Like real activations: a few dimensions with offsets of 1e3..1e5 (past fp16's 65,504 for bf16).
    """
    import ml_dtypes

    rng = np.random.default_rng([unit_index, layer])
    values = rng.standard_normal((stop - start, hidden)).astype(np.float32)
    values[:, 0] += 3e3
    values[:, 1] *= 1e4
    if dtype == "bfloat16":
        values[:, 2] = 1.2e5
        return values.astype(ml_dtypes.bfloat16)
    return values.astype(dtype)


def fill_model(store: ActivationStore, mid: str) -> None:
    writer = store.writer(mid)
    info = writer.info
    for unit in writer.pending_units():
        writer.write_unit(unit, {k: unit_values(unit.index, unit.start, unit.stop, k, info.dtype) for k in info.hidden_states})


def expected_layer(store: ActivationStore, mid: str, layer: int) -> np.ndarray:
    info = store.model_info(mid)
    ranges = [info.layout.unit_range(u, info.n_tokens) for u in range(info.n_units)]
    return np.concatenate([unit_values(u, a, b, layer, info.dtype) for u, (a, b) in enumerate(ranges)])


def new_model(store: ActivationStore, mid: str = "m", *, dtype: str = "float32", **kw: object) -> str:
    """A corpus of DOC_LENGTHS documents and an empty model on it (64-token chunks, 256-token units)."""
    cid = store.write_corpus(make_table(), tokenizer={"name": "test-tok", "fingerprint": "fp-1"}, source="test")
    store.create_model(mid, corpus=cid, n_hidden_states=LAYERS, hidden_size=HIDDEN, dtype=dtype,
                       chunk_tokens=kw.pop("chunk_tokens", 64), shard_tokens=kw.pop("shard_tokens", 256), **kw)  # type: ignore[arg-type]
    return cid
