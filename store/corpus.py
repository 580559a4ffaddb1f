"""Corpora in the store: a tokenised text collection, shared by every model whose tokenizer gives its tokens.

A corpus's id is derived from what it contains (token ids, document boundaries, special-token flags, record ids
and each token's content span), not from the tokenizer that made it: the same tokens of the same text are one
corpus whoever writes them, so a fine-tuned child whose tokenizer only changed its added tokens or chat template
shares its parent's corpus. Content spans (the source field each token came from and its characters there) are
what selects tokens by field and aligns the tokens of two different tokenizers.

A corpus also keeps a sha256 of each document's text, field by field, and each document's length before any cut;
both are in its id (a corpus stored by an earlier hrsa has neither in its hash, and keeps that hash). A record id
says where a record was (``docs.jsonl:1``), not what it holds: two files of one name in two folders give other texts
the same ids, and texts that differ only after a cut give the same tokens. Without the digests two such corpora
were aligned (spans that happen to coincide, over other words) or merged into one (whose truncation flags were the
first writer's).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hrsa.store.format import ATTRS_KEY
from hrsa.store.objects import ensure_array, ensure_group

if TYPE_CHECKING:
    import pandas as pd
    import zarr

__all__ = [
    "CorpusInfo",
    "CorpusTable",
    "CorpusTokens",
    "TEXT_DIGESTS",
    "content_hash",
    "differing_documents",
    "document_text_sha256",
    "read_corpus_info",
    "corpus_damage",
    "read_corpus_table",
    "read_corpus_tokens",
    "read_token_table",
    "write_corpus",
]

_TOKEN_CHUNK = 1 << 18
TEXT_DIGESTS = "doc_text_sha256"  # the array of each document's text digests, field by field
_DOC_DIGEST_CHUNK = 1 << 14  # documents per chunk of their text digests: 32 bytes a field each


@dataclass(frozen=True)
class CorpusTable:
    """A tokenised corpus in memory, documents laid end to end.

    Args:
        token_ids: (N,) int32, every document's tokens in order.
        doc_offsets: (n_docs + 1,) int64; document i holds tokens ``doc_offsets[i]:doc_offsets[i+1]``.
        is_special: (N,) bool, True where the tokenizer marks a special token (BOS, chat markers...).
        record_ids: one source record id per document.
        truncated: (n_docs,) bool, True where the document was cut to a token limit.
        original_length: (n_docs,) int64, the document's length in tokens before any cut.
        span_fields: the source fields that content spans refer to (empty: no spans, e.g. a slow tokenizer).
        token_field: (N,) int16, each token's field (index into ``span_fields``), -1 for markup (template text,
            chat tags, special tokens).
        char_start, char_end: (N,) int32, each token's characters in its field's text, whitespace trimmed.
        text_fields: the source fields whose text ``text_sha256`` digests.
        text_sha256: (n_docs, len(text_fields), 32) uint8, the sha256 of each document's text of each field
            (:func:`document_text_sha256`): what tells two corpora's documents hold the same text. None: no digests
            (as an earlier hrsa stored its corpora); such a corpus cannot be aligned with another.
    """

    token_ids: np.ndarray
    doc_offsets: np.ndarray
    is_special: np.ndarray
    record_ids: Sequence[str]
    truncated: np.ndarray | None = None
    original_length: np.ndarray | None = None
    span_fields: tuple[str, ...] = ()
    token_field: np.ndarray | None = None
    char_start: np.ndarray | None = None
    char_end: np.ndarray | None = None
    text_fields: tuple[str, ...] = ()
    text_sha256: np.ndarray | None = None

    @property
    def has_spans(self) -> bool:
        return self.token_field is not None

    @property
    def has_text_digests(self) -> bool:
        return self.text_sha256 is not None

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def n_docs(self) -> int:
        return int(self.doc_offsets.shape[0] - 1)

    def doc_index(self) -> np.ndarray:
        """(N,) int32: the document each token belongs to."""
        return np.repeat(np.arange(self.n_docs, dtype=np.int32), np.diff(self.doc_offsets))

    def position(self) -> np.ndarray:
        """(N,) int32: each token's position inside its document."""
        starts = np.repeat(self.doc_offsets[:-1], np.diff(self.doc_offsets))
        return (np.arange(self.n_tokens, dtype=np.int64) - starts).astype(np.int32)

    def check(self) -> None:
        offsets = self.doc_offsets
        if offsets.ndim != 1 or offsets.shape[0] < 2 or offsets[0] != 0 or offsets[-1] != self.n_tokens:
            raise ValueError("doc_offsets must run from 0 to the number of tokens, one more entry than documents")
        if np.any(np.diff(offsets) <= 0):
            raise ValueError("every document must hold at least one token (doc_offsets strictly increasing)")
        if self.is_special.shape != self.token_ids.shape or len(self.record_ids) != self.n_docs:
            raise ValueError("is_special must match token_ids, and record_ids must have one id per document")
        spans = (self.token_field, self.char_start, self.char_end)
        if any(a is not None for a in spans) and not all(a is not None and a.shape == self.token_ids.shape for a in spans):
            raise ValueError("token_field, char_start and char_end must all be given, each matching token_ids")
        if self.token_field is not None and self.token_field.size and self.token_field.max() >= len(self.span_fields):
            raise ValueError("token_field must index span_fields (or be -1 for markup)")
        digests = self.text_sha256
        if (digests is None and self.text_fields) or (digests is not None and (
                digests.shape != (self.n_docs, len(self.text_fields), 32) or digests.dtype != np.uint8)):
            raise ValueError("text_sha256 must be given with text_fields, as (n_docs, len(text_fields), 32) uint8")

    def original_lengths(self) -> np.ndarray:
        """(n_docs,) int64: each document's length in tokens before any cut (its stored length when not given)."""
        if self.original_length is not None:
            return self.original_length.astype(np.int64)
        return np.diff(self.doc_offsets).astype(np.int64)


@dataclass(frozen=True)
class CorpusInfo:
    """What the store records about a corpus (its attributes)."""

    id: str
    n_tokens: int
    n_docs: int
    n_truncated: int
    content_hash: str
    tokenizer: dict[str, Any] = field(default_factory=dict)  # the first writer's; each model records its own
    span_fields: tuple[str, ...] | None = None  # None: stored before content spans were kept
    source: str | None = None
    fields: tuple[str, ...] = ()
    template: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def document_text_sha256(texts: Sequence[Mapping[str, str]], fields: Sequence[str]) -> np.ndarray:
    """(n_docs, len(fields), 32) uint8: the sha256 of each document's text of each field (``texts[d][field]``,
    UTF-8), for :attr:`CorpusTable.text_sha256`.

    Raises:
        ValueError: a document without one of ``fields``.
    """
    out = np.zeros((len(texts), len(fields), 32), dtype=np.uint8)
    for d, doc in enumerate(texts):
        missing = [f for f in fields if f not in doc]
        if missing:
            raise ValueError(f"document {d} has no text for fields {missing}")
        for j, name in enumerate(fields):
            out[d, j] = np.frombuffer(hashlib.sha256(doc[name].encode()).digest(), dtype=np.uint8)
    return out


def content_hash(table: CorpusTable) -> str:
    """sha256 over everything that defines the corpus; equal hashes mean identical token tables.

    The tokenizer is not in it: two tokenizers that give the same tokens of the same text make one corpus.
    """
    h = hashlib.sha256()
    for array in (table.token_ids.astype("<i4"), table.doc_offsets.astype("<i8"), table.is_special.astype("u1")):
        h.update(np.ascontiguousarray(array).tobytes())
    h.update(json.dumps(list(table.record_ids)).encode())
    if table.has_spans:
        h.update(json.dumps(list(table.span_fields)).encode())
        for array in (table.token_field.astype("<i2"), table.char_start.astype("<i4"), table.char_end.astype("<i4")):  # type: ignore[union-attr]
            h.update(np.ascontiguousarray(array).tobytes())
    if table.has_text_digests:  # only then: a corpus stored without them keeps the hash it recorded
        h.update(json.dumps(list(table.text_fields)).encode())
        h.update(np.ascontiguousarray(table.text_sha256).tobytes())
        # The original lengths too: texts alike up to a cut give the same tokens, and the truncation flags (which
        # follow from these lengths: corpus_damage checks it) belong to each text, not to the first one stored.
        h.update(np.ascontiguousarray(table.original_lengths().astype("<i8")).tobytes())
    return h.hexdigest()


def _array(group: zarr.Group, name: str, values: np.ndarray, chunk: int) -> None:
    from zarr.codecs import Crc32cCodec, ZstdCodec

    chunks = (min(chunk, max(1, values.shape[0])), *values.shape[1:])  # along the first axis only
    arr = ensure_array(
        group, name, shape=values.shape, dtype=values.dtype, chunks=chunks,
        compressors=[ZstdCodec(level=3), Crc32cCodec()], fill_value=0,
    )
    arr[:] = values


def write_corpus(
    parent: zarr.Group,
    cid: str,
    table: CorpusTable,
    *,
    tokenizer: Mapping[str, Any],
    source: str | None,
    fields: Sequence[str],
    template: str | None,
    digest: str,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``table`` as ``parent/<cid>``; ``complete`` is set last, so a torn write is never used.

    Nothing is deleted first: a corpus id is its content's hash, so two coordinators writing the same corpus at once
    write the same bytes, and a reader never sees an array of a complete corpus vanish under it.
    """
    group = ensure_group(parent.store, f"{parent.store_path.path}/{cid}".lstrip("/"))
    n_docs = table.n_docs
    truncated = table.truncated if table.truncated is not None else np.zeros(n_docs, bool)
    original = table.original_lengths()
    _array(group, "token_ids", table.token_ids.astype(np.int32), _TOKEN_CHUNK)
    _array(group, "doc_index", table.doc_index(), _TOKEN_CHUNK)
    _array(group, "position", table.position(), _TOKEN_CHUNK)
    _array(group, "is_special", table.is_special.astype(bool), _TOKEN_CHUNK)
    _array(group, "doc_offsets", table.doc_offsets.astype(np.int64), _TOKEN_CHUNK)
    _array(group, "doc_truncated", truncated.astype(bool), _TOKEN_CHUNK)
    _array(group, "doc_original_length", original.astype(np.int64), _TOKEN_CHUNK)
    if table.has_spans:
        _array(group, "token_field", table.token_field.astype(np.int16), _TOKEN_CHUNK)  # type: ignore[union-attr]
        _array(group, "char_start", table.char_start.astype(np.int32), _TOKEN_CHUNK)  # type: ignore[union-attr]
        _array(group, "char_end", table.char_end.astype(np.int32), _TOKEN_CHUNK)  # type: ignore[union-attr]
    if table.has_text_digests:
        _array(group, TEXT_DIGESTS, table.text_sha256, _DOC_DIGEST_CHUNK)  # type: ignore[arg-type]
    records = ensure_array(group, "doc_record_id", shape=(n_docs,), dtype=str, chunks=(min(_TOKEN_CHUNK, n_docs),))
    records[:] = np.asarray(list(table.record_ids), dtype=object)
    group.attrs[ATTRS_KEY] = {
        "kind": "corpus",
        "n_tokens": table.n_tokens,
        "n_docs": n_docs,
        "n_truncated": int(truncated.sum()),
        "content_hash": digest,
        "tokenizer": dict(tokenizer),
        "source": source,
        "fields": list(fields),
        "span_fields": list(table.span_fields) if table.has_spans else [],
        "text_fields": list(table.text_fields),
        "template": template,
        "extra": dict(extra or {}),
        "complete": True,
    }


def read_corpus_info(cid: str, group: zarr.Group) -> CorpusInfo:
    a = group.attrs[ATTRS_KEY]
    return CorpusInfo(
        id=cid,
        n_tokens=int(a["n_tokens"]),
        n_docs=int(a["n_docs"]),
        n_truncated=int(a["n_truncated"]),
        content_hash=a["content_hash"],
        tokenizer=dict(a.get("tokenizer") or {}),
        span_fields=tuple(a["span_fields"]) if "span_fields" in a else None,
        source=a.get("source"),
        fields=tuple(a.get("fields") or ()),
        template=a.get("template"),
        extra=dict(a.get("extra") or {}),
    )


def read_token_table(group: zarr.Group) -> pd.DataFrame:
    """The per-token table as a DataFrame: token_id, doc_index, position, is_special, is_first, and with content
    spans field (its name; None for markup), char_start and char_end."""
    import pandas as pd

    position = group["position"][:]
    table = pd.DataFrame(
        {
            "token_id": group["token_ids"][:],
            "doc_index": group["doc_index"][:],
            "position": position,
            "is_special": group["is_special"][:],
            "is_first": position == 0,
        }
    )
    if "token_field" in group:
        names = np.array([*group.attrs[ATTRS_KEY].get("span_fields", []), None], dtype=object)
        table["field"] = names[group["token_field"][:]]  # -1 (markup) indexes the trailing None
        table["char_start"] = group["char_start"][:]
        table["char_end"] = group["char_end"][:]
    return table


def differing_documents(group: zarr.Group, table: CorpusTable) -> list[str]:
    """Record ids of the documents whose token ids in ``table`` are not those stored in ``group``, in corpus order
    (every document of either when the two hold different documents)."""
    records = [str(r) for r in group["doc_record_id"][:]]
    if records != [str(r) for r in table.record_ids]:
        return list(dict.fromkeys([*records, *map(str, table.record_ids)]))
    offsets, ids = group["doc_offsets"][:], group["token_ids"][:]
    return [records[d] for d in range(len(records))
            if not np.array_equal(ids[offsets[d] : offsets[d + 1]], table.token_ids[table.doc_offsets[d] : table.doc_offsets[d + 1]])]


@dataclass(frozen=True)
class CorpusTokens:
    """A stored corpus's token ids and document boundaries: what a model runs over.

    Attributes:
        token_ids: (N,) int32, every document's tokens in order.
        doc_offsets: (n_docs + 1,) int64; document i holds tokens ``doc_offsets[i]:doc_offsets[i+1]``.
    """

    token_ids: np.ndarray
    doc_offsets: np.ndarray

    def document(self, d: int) -> np.ndarray:
        """(n,) the token ids of document ``d``."""
        return self.token_ids[self.doc_offsets[d] : self.doc_offsets[d + 1]]


def read_corpus_table(group: zarr.Group) -> CorpusTable:
    """The corpus stored in ``group`` as the table it was written from (unchecked: see :func:`corpus_damage`)."""
    spans = "token_field" in group
    digests = TEXT_DIGESTS in group
    return CorpusTable(
        token_ids=group["token_ids"][:], doc_offsets=group["doc_offsets"][:], is_special=group["is_special"][:],
        record_ids=[str(r) for r in group["doc_record_id"][:]], truncated=group["doc_truncated"][:],
        original_length=group["doc_original_length"][:],
        span_fields=tuple(group.attrs[ATTRS_KEY].get("span_fields") or ()) if spans else (),
        token_field=group["token_field"][:] if spans else None, char_start=group["char_start"][:] if spans else None,
        char_end=group["char_end"][:] if spans else None,
        text_fields=tuple(group.attrs[ATTRS_KEY].get("text_fields") or ()) if digests else (),
        text_sha256=group[TEXT_DIGESTS][:] if digests else None,
    )


def corpus_damage(group: zarr.Group, info: CorpusInfo) -> str | None:
    """What is wrong with a stored corpus, or None when it is the corpus its id names.

    Zarr reads a chunk that is not there as its fill value (0), and its crc32c guards only the chunks that are: so
    the arrays are hashed again against the recorded content hash (which covers token ids, offsets, special flags,
    record ids and spans), and the arrays derived from them (document index, position, truncation) are compared
    with what they derive from.
    """
    try:
        table = read_corpus_table(group)
        table.check()
    except Exception as error:  # any decode failure or broken invariant is damage, told in one line
        return f"unreadable ({type(error).__name__}: {error})"
    if info.content_hash not in (content_hash(table), _content_hash_before_spans(table, info)):
        return "its tokens do not hash to its recorded content hash (a chunk missing and read as zeros, or changed)"
    lengths = np.diff(table.doc_offsets)
    derived = {"doc_index": table.doc_index(), "position": table.position()}
    for name, values in derived.items():
        if not np.array_equal(group[name][:], values):
            return f"its {name} does not follow from its document offsets"
    if table.truncated is None or table.original_length is None or not np.array_equal(
            table.truncated, lengths < table.original_length) or np.any(table.original_length < lengths):
        return "its truncation flags do not match its documents' stored and original lengths"
    return None


def _content_hash_before_spans(table: CorpusTable, info: CorpusInfo) -> str | None:
    """The content hash a corpus stored before content spans (hrsa before 2026-11-30) recorded: the tokenizer's
    fingerprint first, then what :func:`content_hash` hashes of a table without spans."""
    fingerprint = info.tokenizer.get("fingerprint")
    if table.has_spans or not isinstance(fingerprint, str):
        return None
    h = hashlib.sha256(fingerprint.encode())
    for array in (table.token_ids.astype("<i4"), table.doc_offsets.astype("<i8"), table.is_special.astype("u1")):
        h.update(np.ascontiguousarray(array).tobytes())
    h.update(json.dumps(list(table.record_ids)).encode())
    return h.hexdigest()


def read_corpus_tokens(group: zarr.Group) -> CorpusTokens:
    """The token ids and document offsets of the corpus stored in ``group``."""
    return CorpusTokens(token_ids=group["token_ids"][:], doc_offsets=group["doc_offsets"][:])
