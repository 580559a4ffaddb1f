"""Corpora: the records of a :class:`CorpusSpec` (read by :mod:`hrsa.store.records`: jsonl, csv, parquet, or a
Hugging Face dataset), each rendered to one text and tokenised once per tokenizer into a
:class:`~hrsa.store.CorpusTable`.

The text of a record is one field (``text="reasoning"``) or a template over fields. A template is a
Python format string; ``{chat:FIELD}`` renders a list of chat messages with the tokenizer's chat
template (generation prompt added), so ``"{chat:messages}{reasoning}"`` is the CoT data's problem as
the model saw it, followed by its reasoning.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hrsa.store.corpus import CorpusTable
from hrsa.store.records import CorpusError, read_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["CorpusSpec", "load_records", "render_text", "tokenize_corpus", "special_token_ids"]

_CHAT_FIELD = re.compile(r"\{chat:([A-Za-z0-9_]+)\}")


@dataclass(frozen=True)
class CorpusSpec:
    """Which records, and which text of each.

    Attributes:
        source: a .jsonl/.csv/.parquet file, a folder of them (sorted by name), or ``hf:NAME[:SPLIT]``.
        text: the field holding the text (default "text" when no template is given).
        template: a format string over fields, with ``{chat:FIELD}`` for chat messages.
        id_field: the field holding each record's id (default: "id" if present, else file:line).
        max_docs: keep the first N records.
        max_tokens: cut each document to N tokens (and record that it was cut).
    """

    source: str
    text: str | None = None
    template: str | None = None
    id_field: str | None = None
    max_docs: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.text and self.template:
            raise CorpusError(f"Expected --text or --template, not both. Got text={self.text!r} and template={self.template!r}.")
        for name in ("max_docs", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CorpusError(f"Expected a positive {name}. Got {value} instead.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_records(spec: CorpusSpec) -> Iterator[dict[str, Any]]:
    """The records of ``spec.source`` in order, at most ``spec.max_docs``; each has an ``_id`` (see :mod:`hrsa.store.records`)."""
    return read_records(spec.source, id_field=spec.id_field, max_docs=spec.max_docs)


def render_text(record: Mapping[str, Any], spec: CorpusSpec, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The one text of ``record`` that goes through the model."""
    if spec.template is None:
        field = spec.text or "text"
        if field not in record:
            raise CorpusError(f"Expected a field {field!r} in every record. Got fields {sorted(record)} instead. Pick one with --text.")
        return str(record[field])
    chats = {}
    for field in _CHAT_FIELD.findall(spec.template):
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise CorpusError(f"Expected a tokenizer with a chat template for {{chat:{field}}}. Got none. Use a plain template.")
        chats[field] = tokenizer.apply_chat_template(list(record[field]), tokenize=False, add_generation_prompt=True)
    template = _CHAT_FIELD.sub(lambda m: "{__chat_" + m.group(1) + "}", spec.template)
    values = {**record, **{f"__chat_{k}": v for k, v in chats.items()}}
    missing = [f for _, f, _, _ in string.Formatter().parse(template) if f and f.split(".")[0] not in values]
    if missing:
        raise CorpusError(f"Expected fields {missing} used by the template in every record. Got fields {sorted(record)}.")
    return template.format(**values)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Ids of every special token: BOS/EOS/PAD and added special tokens such as chat markers."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", False)}
    return np.array(sorted(ids), dtype=np.int64)


def tokenize_corpus(
    records: Sequence[Mapping[str, Any]],
    spec: CorpusSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    context_length: int | None = None,
) -> CorpusTable:
    """Render and tokenise ``records`` into one table; documents are cut to ``spec.max_tokens``.

    Raises:
        CorpusError: an empty document, or a document longer than ``context_length`` with no
            ``max_tokens`` to cut it.
    """
    if not records:
        raise CorpusError(f"Expected at least one document in the corpus {spec.source}. Got none (it holds no records). "
                          "Point --corpus at a file or folder with records in it.")
    texts = [render_text(r, spec, tokenizer) for r in records]
    ids = [list(tokenizer(t, add_special_tokens=spec.template is None or "{chat:" not in spec.template)["input_ids"]) for t in texts]
    empty = [r["_id"] for r, i in zip(records, ids) if not i]
    if empty:
        raise CorpusError(f"Expected text in every document. Got {len(empty)} empty document(s) {empty[:3]} instead. "
                          "Remove them or pick another --text field.")
    original = np.array([len(i) for i in ids], dtype=np.int64)
    limit = spec.max_tokens
    if limit is None and context_length is not None and original.max() > context_length:
        longest = records[int(original.argmax())]["_id"]
        raise CorpusError(
            f"Expected documents of at most {context_length} tokens (the model's context). Got {int(original.max())} "
            f"in {longest}. Cut them with --max-tokens {context_length}."
        )
    ids = [i[:limit] if limit else i for i in ids]
    lengths = np.array([len(i) for i in ids], dtype=np.int64)
    token_ids = np.fromiter((t for doc in ids for t in doc), dtype=np.int32, count=int(lengths.sum()))
    return CorpusTable(
        token_ids=token_ids,
        doc_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        is_special=np.isin(token_ids, special_token_ids(tokenizer)),
        record_ids=[str(r["_id"]) for r in records],
        truncated=lengths < original,
        original_length=original,
    )

