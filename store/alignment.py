"""Which token of model A's corpus is which token of model B's: pairs of rows that both models compare on.

Two corpora of the same documents made by different tokenizers (a Llama-family BPE against a WordPiece encoder;
or one vocabulary under two chat templates) have different token sequences. Each stored token carries its content
span (:mod:`hrsa.store.corpus`): its source field and its characters in that field's text, whitespace trimmed.
Two tokens are the same token when their document, field and span are equal; those are the *aligned* tokens,
and every metric compares the two models on them. A span a side holds several times (a character split over
byte-level tokens) pairs its tokens in order when both sides hold it as many times, else none of them. Markup (chat
tags, template text, special tokens) is never aligned.

The alignment of a pair of corpora is computed once and kept in the store (``alignments/<A>--<B>``, two int64
arrays and their sha256), like a corpus: its id is the two corpus ids, which are their contents' hashes. One whose
rows do not hash to their digest is computed again, never used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hrsa.store.corpus import TEXT_DIGESTS
from hrsa.store.format import ATTRS_KEY
from hrsa.store.objects import ensure_array, ensure_group

if TYPE_CHECKING:
    import zarr

__all__ = ["TokenPairs", "align_corpora", "alignment_damage", "alignment_key", "alignment_problem", "read_alignment", "write_alignment"]


@dataclass(frozen=True, eq=False)
class TokenPairs:
    """Rows of A's corpus and of B's that are the same tokens, pair by pair, in A's order.

    Attributes:
        rows_a, rows_b: (M,) int64 token indices into A's and B's corpus; when ``identical``, both are the
            selection itself (a slice or an index, as :meth:`ActivationStore.select` gives it).
        n_a, n_b: tokens each side offered (its selection), for the aligned share.
        identical: both models ran over the same token sequence (nothing was aligned).
    """

    rows_a: np.ndarray | slice
    rows_b: np.ndarray | slice
    n_a: int
    n_b: int
    identical: bool

    @property
    def n_pairs(self) -> int:
        return self.n_a if self.identical else int(self.rows_a.size)  # type: ignore[union-attr]

    def share(self) -> tuple[float, float]:
        """The aligned share of A's and of B's selected tokens."""
        return self.n_pairs / max(self.n_a, 1), self.n_pairs / max(self.n_b, 1)


def alignment_key(cid_a: str, cid_b: str) -> str:
    # "v2": tokens holding part of a character pair only as whole runs split alike (see _pairing_keys); alignments
    # kept by the rule before are not read again.
    return f"{cid_a}--{cid_b}--v2"


def _spans(corpus: zarr.Group) -> tuple[list[str], dict[str, np.ndarray]]:
    return list(corpus.attrs[ATTRS_KEY].get("span_fields", [])), {
        "doc": corpus["doc_index"][:].astype(np.int64),
        "field": corpus["token_field"][:].astype(np.int64),
        "start": corpus["char_start"][:].astype(np.int64),
        "end": corpus["char_end"][:].astype(np.int64),
    }


def alignment_problem(corpus_a: zarr.Group, cid_a: str, corpus_b: zarr.Group, cid_b: str) -> tuple[str, str] | None:
    """Why two corpora cannot be aligned, and what to do, as two phrases; None when they can.

    Equal record ids are not enough: an id says where a record was (``docs.jsonl:1``), not what it holds. The
    documents' text digests must be equal too, on every field both corpora hold (a field only one side has never
    aligns)."""
    records_a, records_b = ([str(r) for r in c["doc_record_id"][:]] for c in (corpus_a, corpus_b))
    if records_a != records_b:
        return (f"which hold different documents ({len(records_a)} and {len(records_b)}, or other record ids)",
                "Extract both from the same corpus file with the same --max-docs")
    bare = [cid for cid, c in ((cid_a, corpus_a), (cid_b, corpus_b)) if "token_field" not in c]
    if bare:
        return (f"{' and '.join(bare)} stored without content spans (by an earlier hrsa, or a slow tokenizer)",
                "Extract the models again into a new store, or both on one corpus")
    # A corpus without digests is refused rather than trusted on its record ids: those are what let other texts
    # through, and nothing else stored tells its text (its source file may have changed since).
    undigested = [cid for cid, c in ((cid_a, corpus_a), (cid_b, corpus_b)) if TEXT_DIGESTS not in c]
    if undigested:
        return (f"{' and '.join(undigested)} stored without their documents' text digests (by an earlier hrsa), so "
                "nothing tells that their texts are the same",
                "Delete the models on them (`hrsa store rm`) and run the same `hrsa extract` again, which stores "
                "their corpus with digests, or extract into a new store")
    other = _documents_of_other_text(corpus_a, corpus_b)
    if other:
        named = ", ".join(records_a[d] for d in other[:3]) + (", ..." if len(other) > 3 else "")
        return (f"whose documents hold other text ({len(other)} of {len(records_a)}: {named}) under the same "
                "record ids",
                "Extract both from the same corpus file, unchanged in between (a file of the same name elsewhere, "
                "or edited, is another text)")
    return None


def _documents_of_other_text(corpus_a: zarr.Group, corpus_b: zarr.Group) -> list[int]:
    """Documents whose text digest differs on a field both corpora hold."""
    fields_a, fields_b = (list(c.attrs[ATTRS_KEY].get("text_fields") or []) for c in (corpus_a, corpus_b))
    shared = [f for f in fields_a if f in fields_b]
    if not shared:
        return []
    digests_a = corpus_a[TEXT_DIGESTS][:][:, [fields_a.index(f) for f in shared]]
    digests_b = corpus_b[TEXT_DIGESTS][:][:, [fields_b.index(f) for f in shared]]
    return np.flatnonzero((digests_a != digests_b).any(axis=(1, 2))).tolist()


def align_corpora(corpus_a: zarr.Group, corpus_b: zarr.Group) -> tuple[np.ndarray, np.ndarray]:
    """(rows_a, rows_b): the tokens of the two corpora whose document, field and character span are equal, in A's
    order (check :func:`alignment_problem` first)."""
    import pandas as pd

    fields_a, spans_a = _spans(corpus_a)
    fields_b, spans_b = _spans(corpus_b)
    # B's field numbers in A's numbering (fields only one side has never align: -2).
    to_a = np.array([fields_a.index(f) if f in fields_a else -2 for f in fields_b] + [-2], dtype=np.int64)
    spans_b["field"] = to_a[spans_b["field"]]  # -1 (markup) indexes the trailing -2
    keys = ["doc", "field", "start", "end", "split", "place"]
    frames = []
    for spans in (spans_a, spans_b):
        frame = pd.DataFrame({**spans, **_pairing_keys(spans)})
        frame["row"] = np.arange(len(frame), dtype=np.int64)
        frame = frame[(frame["field"] >= 0) & (frame["end"] > frame["start"])]
        groups = frame.groupby(keys, sort=False)
        frames.append(frame.assign(nth=groups.cumcount(), times=groups["row"].transform("size")))
    joined = frames[0].merge(frames[1], on=[*keys, "nth", "times"], suffixes=("_a", "_b"))
    joined = joined.sort_values("row_a", kind="stable")
    return joined["row_a"].to_numpy(np.int64), joined["row_b"].to_numpy(np.int64)


def _pairing_keys(spans: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Where tokens share characters, what they pair by instead of their own spans. Byte-level tokenizers split a
    character's bytes over tokens whose spans all widen to that character: by span and count, a token of "a" and half
    of "ï" (span 1:3) paired with another tokenizer's "aï" (1:3), the cut side's last token too. A run of tokens that
    share characters pairs only with a run of the same spans in the same order (a tokenizer of the same vocabulary
    splits alike): its tokens get the run's span, its spans' signature (``split``) and their place in it; other
    tokens keep their span (split 0, place 0)."""
    doc, field, start, end = (spans[k].copy() for k in ("doc", "field", "start", "end"))
    split, place = np.zeros(doc.size, np.int64), np.zeros(doc.size, np.int64)
    shared = (doc[1:] == doc[:-1]) & (field[1:] == field[:-1]) & (field[1:] >= 0) & (end[:-1] > start[1:]) & (
        start[:-1] < end[1:])  # token i and i + 1 share a character
    if shared.any():
        first = np.flatnonzero(shared & ~np.concatenate([[False], shared[:-1]]))  # each run's first token
        last = np.flatnonzero(shared & ~np.concatenate([shared[1:], [False]])) + 1  # and its last
        for lo, hi in zip(first.tolist(), last.tolist()):
            run = slice(lo, hi + 1)
            signature = hash(tuple(zip(spans["start"][run].tolist(), spans["end"][run].tolist()))) or 1
            split[run], place[run] = signature, np.arange(hi + 1 - lo)
            start[run], end[run] = spans["start"][run].min(), spans["end"][run].max()
    return {"start": start, "end": end, "split": split, "place": place}


def _digest(rows_a: np.ndarray, rows_b: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha256()
    for rows in (rows_a, rows_b):
        h.update(np.ascontiguousarray(rows, dtype="<i8").tobytes())
    return h.hexdigest()


def alignment_damage(group: zarr.Group) -> str | None:
    """What is wrong with a stored alignment, or None. Zarr reads a missing chunk as zeros (every pair's row 0), so
    its rows are hashed against the digest written with them."""
    return _checked_rows(group)[1]


def _checked_rows(group: zarr.Group) -> tuple[tuple[np.ndarray, np.ndarray] | None, str | None]:
    """(the rows, None) when they hash to their digest; (None, what is wrong) when not; (None, None) when there is
    nothing to check (not finished, or kept by an earlier hrsa without a digest: never used, so not damage)."""
    meta = group.attrs.get(ATTRS_KEY, {})
    if not meta.get("complete") or "digest" not in meta:
        return None, None
    try:
        rows = group["rows_a"][:], group["rows_b"][:]
    except Exception as error:  # any decode failure is damage
        return None, f"unreadable ({type(error).__name__}: {error})"
    if _digest(*rows) != meta["digest"]:
        return None, "its rows do not hash to its recorded digest (a chunk missing and read as zeros, or changed)"
    return rows, None


def read_alignment(parent: zarr.Group, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A stored alignment, or None when there is none, its write was not finished, it has no digest, or it is
    damaged (then it is computed again: it derives from the two corpora)."""
    return _checked_rows(parent[key])[0] if key in parent else None


def write_alignment(parent: zarr.Group, key: str, rows_a: np.ndarray, rows_b: np.ndarray) -> None:
    """Keep an alignment; ``complete`` is set last, so a torn write is computed again, never used."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    group = ensure_group(parent.store, f"{parent.store_path.path}/{key}".lstrip("/"))
    for name, rows in (("rows_a", rows_a), ("rows_b", rows_b)):
        array = ensure_array(group, name, shape=rows.shape, dtype=np.int64, chunks=(max(1, min(1 << 18, rows.size)),),
                             compressors=[ZstdCodec(level=3), Crc32cCodec()], fill_value=0)
        array[:] = rows
    group.attrs[ATTRS_KEY] = {"kind": "alignment", "n_pairs": int(rows_a.size), "digest": _digest(rows_a, rows_b),
                              "complete": True}
