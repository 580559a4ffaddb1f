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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hrsa.store.corpus import CorpusTable, CorpusTokens, document_text_sha256
from hrsa.store.errors import UserError
from hrsa.store.records import CorpusError, read_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ChatMarkupWarning", "CorpusSpec", "Segment", "VocabularyError", "check_texts_vocabulary", "check_vocabulary",
           "load_records", "render_spans", "render_text", "tokenize_corpus", "special_token_ids"]

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

    def source_fields(self) -> tuple[str, ...]:
        """The record fields a document's text is made of: all that extraction reads of a record besides its id
        (a label or any other field can change without changing what is extracted)."""
        if self.template is None:
            return (self.text or "text",)
        return tuple(dict.fromkeys(_template_fields(self.template)))


def _template_fields(template: str) -> Iterator[str]:
    """The record fields a template reads, in order: ``{chat:FIELD}``'s field, and each field's root, with those its
    format spec names (``{text:>{width}}`` pads the text to the record's ``width``: an edited width is another text)."""
    for _, name, format_spec, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "chat" and format_spec:
            yield format_spec
            continue
        yield _root(name)
        if format_spec:
            yield from _template_fields(format_spec)


def load_records(spec: CorpusSpec) -> Iterator[dict[str, Any]]:
    """The records of ``spec.source`` in order, at most ``spec.max_docs``; each has an ``_id`` (see :mod:`hrsa.store.records`)."""
    return read_records(spec.source, id_field=spec.id_field, max_docs=spec.max_docs)


@dataclass(frozen=True)
class Segment:
    """Characters ``start:stop`` of a rendered text are characters ``offset:`` of source field ``field``'s text.

    A chat field's text is its messages' contents laid end to end: the template's role tags and markers around
    them are markup, and each model may render them its own way.
    """

    field: str
    start: int
    stop: int
    offset: int


def render_text(record: Mapping[str, Any], spec: CorpusSpec, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The one text of ``record`` that goes through the model."""
    return render_spans(record, spec, tokenizer)[0]


def render_spans(record: Mapping[str, Any], spec: CorpusSpec,
                 tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[str, list[Segment]]:
    """The text of ``record`` and where each source field's characters are in it (the rest is markup)."""
    rendered = _render(record, spec, tokenizer)
    return rendered.text, rendered.segments


@dataclass(frozen=True)
class _Rendered:
    """A record rendered: its text, where each source field's characters are in it, each source field's own text
    (what its segments' offsets count in: a chat field's message contents laid end to end, whatever the template
    makes of them; a field the template uses twice, its renderings laid end to end; the model never sees these
    texts, their digests tell two corpora's documents apart), and per chat field, its messages with content
    (``messages``) and those of them the template put in the text changed beyond finding (``unlabelled``)."""

    text: str
    segments: list[Segment]
    texts: dict[str, str]
    messages: dict[str, int]
    unlabelled: dict[str, int]


def _render(record: Mapping[str, Any], spec: CorpusSpec, tokenizer: PreTrainedTokenizerBase | None) -> _Rendered:
    """:func:`render_spans`, with each source field's own text and the chat messages left as markup."""
    if spec.template is None:
        field = spec.text or "text"
        if field not in record:
            raise CorpusError(f"Expected a field {field!r} in every record. Got fields {_fields(record)} instead. Pick one with --text.")
        text = str(_present(record, field))
        return _Rendered(text, [Segment(field, 0, len(text), 0)], {field: text}, {}, {})
    pieces: list[str] = []
    segments: list[Segment] = []
    texts: dict[str, str] = {}
    messages: dict[str, int] = {}
    unlabelled: dict[str, int] = {}
    at = 0
    for literal, name, format_spec, conversion in string.Formatter().parse(spec.template):
        pieces.append(literal)
        at += len(literal)
        if name is None:
            continue
        if name == "chat" and format_spec:  # {chat:FIELD}: Python's parser reads FIELD as a format spec
            text, found, lost = _chat(record, format_spec, tokenizer)
            segments += [Segment(s.field, at + s.start, at + s.stop, s.offset) for s in found]
            messages[format_spec] = messages.get(format_spec, 0) + sum(1 for c in _contents(record[format_spec]) if c)
            unlabelled[format_spec] = unlabelled.get(format_spec, 0) + lost
            texts[format_spec] = texts.get(format_spec, "") + "".join(_contents(record[format_spec]))
        else:
            if _root(name) not in record:
                missing = [f for _, f, fs, _ in string.Formatter().parse(spec.template)
                           if f and not (f == "chat" and fs) and _root(f) not in record]
                raise CorpusError(f"Expected fields {missing} used by the template in every record. Got fields {_fields(record)}.")
            _present(record, _root(name))
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{format_spec}" if format_spec else "") + "}"
            try:
                text = string.Formatter().format(field, **record)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:  # e.g. {score:.2f} of a text
                raise CorpusError(f"Expected the template's {field} to format every record. Got {type(error).__name__}: "
                                  f"{error} on record {record.get('_id')} instead. Fix the template or that record.") from None
            segments.append(Segment(name, at, at + len(text), 0))
            texts[name] = texts.get(name, "") + text
        pieces.append(text)
        at += len(text)
    return _Rendered("".join(pieces), segments, texts, messages, unlabelled)


def _present(record: Mapping[str, Any], field: str) -> Any:
    """The value of ``field``; a missing one (JSON's null, a CSV's empty cell) is refused: str() made it the text
    "None" and extracted it as a document."""
    value = record[field]
    if value is None:
        raise CorpusError(f"Expected a value of field {field!r} in every record. Got none in record {record.get('_id')} "
                          "instead. Fill it in or drop the record.")
    return value


def _root(name: str) -> str:
    """The record field a format-string field names (``a`` of ``a.b`` or ``a[0]``)."""
    return name.split(".")[0].split("[")[0]


def _chat(record: Mapping[str, Any], field: str,
          tokenizer: PreTrainedTokenizerBase | None) -> tuple[str, list[Segment], int]:
    """``record[field]``'s messages through the tokenizer's chat template, where each message's content is in it, and
    how many contents the template put in the text changed beyond finding (left as markup).

    Where a content lands is found from the template itself, not by searching the text for it: a content may also
    appear in the template's own text before it (a default system prompt such as SmolLM2's "... trained by Hugging
    Face", a role tag), and searching labelled those characters as the message (:func:`_content_spans`). A content
    the template changed beyond trimming, or dropped, is left as markup.
    """
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise CorpusError(f"Expected a tokenizer with a chat template for {{chat:{field}}}. Got none. Use a plain template.")
    if field not in record:
        raise CorpusError(f"Expected fields {[f'chat:{field}']} used by the template in every record. Got fields {_fields(record)}.")
    messages = list(record[field])

    def render(these: list[Any]) -> str:
        return tokenizer.apply_chat_template(these, tokenize=False, add_generation_prompt=True)

    try:
        text = render(messages)
    except Exception as error:  # noqa: BLE001 -- jinja's errors (a content that is no text, a role it refuses)
        raise CorpusError(
            f"Expected the chat template to render the messages of field {field!r} in every record. Got "
            f"{type(error).__name__}: {error} on record {record.get('_id')} instead. Fix that record's messages "
            "(each a role and a text content, as the template expects) or drop the record."
        ) from None
    contents = _contents(messages)
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in contents])]).tolist()
    spans, placed = _content_spans(text, messages, contents, render)
    # A blank content that the template trimmed to nothing has nothing to find and no token to leave out: not lost.
    lost = sum(1 for i in placed - {i for i, _, _, _ in spans} if contents[i].strip())
    return text, [Segment(field, start, stop, offsets[i] + skip) for i, start, stop, skip in spans], lost


def _content_spans(text: str, messages: list[Any], contents: list[str],
                   render: Callable[[list[Any]], str]) -> tuple[list[tuple[int, int, int, int]], set[int]]:
    """(message index, start, stop, characters of its content skipped) of each message's content in ``text``, and
    the messages whose content the template put in the text (all of them when it refuses the stand-ins): those of
    them without a span were changed beyond finding, and their tokens are markup.

    The template is rendered again with a unique stand-in for each content: the text around the stand-ins is the
    template's markup, in the order the template placed the messages. When the rendered text is that markup with
    the contents in place, every span is exact. Otherwise (markup that depends on the content, or a content the
    template trims or cuts) the markup pieces are walked in order, each content taken as the text between its
    markup and the next piece, and kept only where it is the content itself, trimmed, or a part found once in it.
    A message rendered twice is labelled at its first place only.
    """
    mark = "\ue000"  # private-use characters: no template changes them, no real text holds them
    while mark in text or any(mark in c for c in contents):
        mark = chr(ord(mark[0]) + 1) + mark
    stand_ins = {f"{mark}{i}{mark}\ue0ff": i for i, c in enumerate(contents)
                 if c and isinstance(messages[i], Mapping) and isinstance(messages[i].get("content"), str)}
    if not stand_ins:
        return [], set()
    by_message = {i: s for s, i in stand_ins.items()}
    try:
        rendered = render([{**m, "content": by_message[i]} if i in by_message else m for i, m in enumerate(messages)])
    except Exception:  # noqa: BLE001 -- a template that refuses the stand-ins: its contents stay markup
        return [], set(stand_ins.values())
    parts = re.split("(" + "|".join(re.escape(s) for s in stand_ins) + ")", rendered)
    markup, order = parts[0::2], [stand_ins[s] for s in parts[1::2]]
    shown = set(order)
    if not order:
        return [], shown
    if "".join(m + c for m, c in zip(markup, [contents[i] for i in order] + [""])) == text:
        spans, at = [], 0
        for m, i in zip(markup, order):
            at += len(m)
            spans.append((i, at, at + len(contents[i]), 0))
            at += len(contents[i])
        return _first_of_each(spans), shown
    if not text.startswith(markup[0]):
        return [], shown
    spans, at = [], len(markup[0])
    for k, i in enumerate(order):
        after = markup[k + 1]
        if k + 1 == len(order):  # the last content runs up to the template's closing markup
            stop = len(text) - len(after) if text.endswith(after) and len(text) - len(after) >= at else -1
        else:
            stop = text.find(after, at) if after else -1  # no markup between two contents: no edge between them
        if stop < 0:
            break
        placed, content = text[at:stop], contents[i]
        if placed and placed.strip():
            if placed == content:
                spans.append((i, at, stop, 0))
            elif placed == content.strip():
                spans.append((i, at, stop, len(content) - len(content.lstrip())))
            elif content.count(placed) == 1:
                spans.append((i, at, stop, content.index(placed)))
        at = stop + len(after)
    return _first_of_each(spans), shown


def _first_of_each(spans: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Each message's first span, in the text's order (a template may repeat a message)."""
    first: dict[int, tuple[int, int, int, int]] = {}
    for span in spans:
        first.setdefault(span[0], span)
    return list(first.values())


def _contents(messages: Any) -> list[str]:
    """Each chat message's content as text ("" for a message without one): what a chat field's offsets count in."""
    return [str(m.get("content") or "") if isinstance(m, Mapping) else "" for m in messages]


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Ids of every special token: BOS/EOS/PAD and added special tokens such as chat markers."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", False)}
    return np.array(sorted(ids), dtype=np.int64)


class VocabularyError(UserError, ValueError):
    """A text holding a token the model has no embedding for."""


def check_vocabulary(tokens: Any, vocabulary: int | None, tokenizer: PreTrainedTokenizerBase, *, model: str,
                     names: Sequence[str]) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer whose added tokens lie past the model's
    vocabulary): the model failed on them with an IndexError, mid-extraction (a model half-written, saying to
    re-run) or mid-training.

    Args:
        tokens: ``token_ids`` and ``doc_offsets`` of the texts, laid end to end (a :class:`CorpusTable`, the store's
            ``CorpusTokens``).
        vocabulary: the model's token embeddings (None: not known, nothing checked).
        names: one name per text, for the message.
    Raises:
        VocabularyError: naming the first such token, its text and the fix.
    """
    if vocabulary is None or not len(tokens.token_ids) or int(tokens.token_ids.max()) < vocabulary:
        return
    at = int(np.argmax(tokens.token_ids >= vocabulary))
    token_id = int(tokens.token_ids[at])
    text = names[int(np.searchsorted(tokens.doc_offsets, at, side="right")) - 1]
    raise VocabularyError(
        f"Expected token ids below {vocabulary} (the model's vocabulary) for {model}. Got {token_id} "
        f"({tokenizer.convert_ids_to_tokens(token_id)!r}) in {text} instead: its tokenizer has tokens the model "
        "has no embedding for. Save the model with its embeddings resized to the tokenizer "
        "(model.resize_token_embeddings(len(tokenizer))), or give it the tokenizer it was trained with."
    )


def check_texts_vocabulary(token_ids: Sequence[Sequence[int]] | None, texts: Sequence[str], vocabulary: int | None,
                           tokenizer: PreTrainedTokenizerBase, *, model: str, names: Sequence[str],
                           max_length: int | None = None) -> None:
    """:func:`check_vocabulary` of ``texts`` as ``tokenizer`` gives them (``token_ids``: already tokenised, else
    tokenised here, cut to ``max_length``). Free for a tokenizer whose every id has an embedding (most)."""
    if vocabulary is None or max(tokenizer.get_vocab().values(), default=-1) < vocabulary:
        return
    if token_ids is None:
        token_ids = tokenizer(list(texts), truncation=max_length is not None, max_length=max_length)["input_ids"]
    lengths = np.array([len(ids) for ids in token_ids], dtype=np.int64)
    flat = np.fromiter((t for ids in token_ids for t in ids), dtype=np.int64, count=int(lengths.sum()))
    check_vocabulary(CorpusTokens(flat, np.concatenate([[0], np.cumsum(lengths)])), vocabulary, tokenizer,
                     model=model, names=names)


def tokenize_corpus(
    records: Sequence[Mapping[str, Any]],
    spec: CorpusSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    context_length: int | None = None,
) -> CorpusTable:
    """Render and tokenise ``records`` into one table; documents are cut to ``spec.max_tokens``.

    With a fast tokenizer (offsets known), every token also carries its content span: the source field it came
    from and its characters in that field's text, whitespace trimmed (:func:`token_spans`). Every document keeps
    a sha256 of each source field's text, whatever the tokenizer: what tells two corpora hold the same texts.

    Raises:
        CorpusError: an empty document (no visible character, or no token but special ones), or a document longer
            than ``context_length`` once cut to ``max_tokens`` (none, or one above the context).
    """
    if not records:
        raise CorpusError(f"Expected at least one document in the corpus {spec.source}. Got none (it holds no records). "
                          "Point --corpus at a file or folder with records in it.")
    rendered = [_render(r, spec, tokenizer) for r in records]
    _warn_of_unlabelled_messages(records, rendered)
    fields = tuple(dict.fromkeys(seg.field for r in rendered for seg in r.segments))
    text_fields = tuple(dict.fromkeys(f for r in rendered for f in r.texts))
    add_special = spec.template is None or "{chat:" not in spec.template
    encoded = [_encode(tokenizer, r.text, add_special) for r in rendered]
    ids = [e[0] for e in encoded]
    # A document with no visible character (empty, or whitespace only) or no token but special ones is refused,
    # whatever the tokenizer adds around it. It was refused only when it gave no token at all: a tokenizer that adds
    # special tokens stored an empty document as just [CLS][SEP] (or a BOS), a byte-level one a blank document as its
    # whitespace, rows that stand for no text of the record yet are analysed as data, and one corpus file held other
    # documents under other tokenizers. Extraction has no way to skip a record with a recorded reason, and leaving
    # one out silently would store other documents than the records the user named: the user removes them.
    special = special_token_ids(tokenizer)
    empty = [r["_id"] for r, done, i in zip(records, rendered, ids)
             if not done.text.strip() or np.isin(i, special).all()]
    if empty:
        raise CorpusError(f"Expected text in every document. Got {len(empty)} empty document(s) {empty[:3]} instead "
                          "(no visible characters, or no tokens but special ones). Remove them from the corpus or pick "
                          "another --text field.")
    original = np.array([len(i) for i in ids], dtype=np.int64)
    limit = spec.max_tokens
    # The rows stored are the documents as cut: checked against the context whatever --max-tokens is (one above the
    # context turned the check off, and rows past the model's positions went to the workers). Refused, not cut to
    # the context: --max-tokens is recorded with the corpus and the model as the cut it made, and a corpus file
    # cut to one model's context would be another corpus under a model with a longer one.
    cut = np.minimum(original, limit) if limit else original
    if context_length is not None and cut.max() > context_length:
        longest = records[int(cut.argmax())]["_id"]
        given = "" if limit is None else f"--max-tokens {limit}, which leaves "
        raise CorpusError(
            f"Expected documents of at most {context_length} tokens (the model's context). Got {given}"
            f"{int(cut.max())} in {longest}. Cut them with --max-tokens {context_length}."
        )
    ids = [i[:limit] if limit else i for i in ids]
    lengths = np.array([len(i) for i in ids], dtype=np.int64)
    token_ids = np.fromiter((t for doc in ids for t in doc), dtype=np.int32, count=int(lengths.sum()))
    spans = None
    if all(e[1] is not None for e in encoded):
        per_doc = [token_spans(r.text, r.segments, e[1][: len(i)], fields) for r, e, i in zip(rendered, encoded, ids)]
        spans = tuple(np.concatenate([d[j] for d in per_doc]) for j in range(3))
    return CorpusTable(
        token_ids=token_ids,
        doc_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        is_special=np.isin(token_ids, special),
        record_ids=[str(r["_id"]) for r in records],
        truncated=lengths < original,
        original_length=original,
        span_fields=fields if spans else (),
        token_field=spans[0] if spans else None,
        char_start=spans[1] if spans else None,
        char_end=spans[2] if spans else None,
        text_fields=text_fields,
        text_sha256=document_text_sha256([r.texts for r in rendered], text_fields),
    )


class ChatMarkupWarning(UserWarning):
    """Chat contents that the template put in the text changed beyond finding (rewritten, escaped, cut) are markup:
    their tokens carry no field, so ``--fields`` and alignment across tokenizers leave them out."""


def _warn_of_unlabelled_messages(records: Sequence[Mapping[str, Any]], rendered: Sequence[_Rendered]) -> None:
    """One warning per chat field whose template left some message contents as markup, counting them."""
    import warnings

    for field in dict.fromkeys(f for r in rendered for f in r.unlabelled):
        lost = sum(r.unlabelled.get(field, 0) for r in rendered)
        if not lost:
            continue
        total = sum(r.messages.get(field, 0) for r in rendered)
        where = [str(rec["_id"]) for rec, r in zip(records, rendered) if r.unlabelled.get(field)]
        warnings.warn(ChatMarkupWarning(
            f"{lost} of {total} chat messages of field {field!r} are markup: the chat template changed their contents "
            f"beyond finding them in the text (in {', '.join(where[:3])}{', ...' if len(where) > 3 else ''}); their "
            f"tokens are analysed with all tokens, but --fields {field} and alignment across tokenizers leave them out"
        ), stacklevel=3)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special: bool) -> tuple[list[int], list | None]:
    """Token ids of ``text`` and their character offsets (None from a slow tokenizer, which has none)."""
    if getattr(tokenizer, "is_fast", False):
        out = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        return list(out["input_ids"]), list(out["offset_mapping"])
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"]), None


def token_spans(text: str, segments: Sequence[Segment], offsets: Sequence[tuple[int, int]],
                fields: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each token's content span: (field index or -1 for markup, start, stop) in that field's own text.

    A token's characters are trimmed of whitespace first (byte-level BPE folds the space before a word into it,
    WordPiece does not), so two tokenizers' tokens of one word get one span. A whitespace-only token keeps its
    whitespace as its span (it can never equal a trimmed span, which starts and ends on a visible character). A
    token belongs to the field whose segment holds its span. Special tokens (no characters), template text and
    tokens that straddle a segment's edge are markup (-1, span 0:0).
    """
    n = len(offsets)
    field, start, stop = np.full(n, -1, np.int16), np.zeros(n, np.int32), np.zeros(n, np.int32)
    index = {name: i for i, name in enumerate(fields)}
    for t, (a0, b0) in enumerate(offsets):
        a, b = _trimmed(text, int(a0), int(b0))
        if b <= a:  # whitespace only, or no characters at all (a special token)
            a, b = int(a0), int(b0)
            if b <= a:
                continue
        for seg in segments:
            if seg.start <= a and b <= seg.stop:
                field[t], start[t], stop[t] = index[seg.field], a - seg.start + seg.offset, b - seg.start + seg.offset
                break
    return field, start, stop


def _trimmed(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _fields(record: dict[str, Any]) -> list[str]:
    """The record's own fields, for a message: not the ``_id`` that reading adds."""
    return sorted(k for k in record if k != "_id")
