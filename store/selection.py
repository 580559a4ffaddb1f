"""Which tokens to read: a token range, a list of documents, and token filters, resolved once.

:class:`TokenSelection` (a range, documents, and a :class:`TokenFilter`) is what every reader of a store takes;
:func:`resolve_selection` is the one resolver (reached through :meth:`hrsa.store.ActivationStore.select`), used
alike by reads of hidden states, by the streaming pair analysis, k-NN overlap and probes. A selection resolves to
a ``slice`` when it is one contiguous run (cheap for Dask) and to a sorted or document-ordered int64 index
otherwise. Filters need the token table, which is small next to the activations (13 bytes a token against
D * 2 or D * 4).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hrsa.store.errors import SelectionError

if TYPE_CHECKING:
    import zarr

__all__ = ["TokenFilter", "TokenSelection", "parse_doc_ids", "parse_int_list", "parse_name_list", "parse_token_range",
           "resolve_selection"]


@dataclass(frozen=True)
class TokenFilter:
    """Tokens to drop from every analysis or read.

    Args:
        exclude_special: drop tokens the tokenizer marks special (BOS, chat-template markers, padding).
        exclude_first: drop position 0 of every document; attention sinks there carry huge norms.
        positions: keep only positions ``a <= p < b`` inside each document.
        fields: keep only tokens of these source fields (their content spans), dropping markup: chat tags,
            template text, special tokens.
    """

    exclude_special: bool = False
    exclude_first: bool = False
    positions: tuple[int, int] | None = None
    fields: tuple[str, ...] | None = None

    @property
    def is_identity(self) -> bool:
        return not (self.exclude_special or self.exclude_first or self.positions or self.fields)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["positions"] = list(self.positions) if self.positions else None
        d["fields"] = list(self.fields) if self.fields else None
        return d


@dataclass(frozen=True)
class TokenSelection:
    """Which tokens of a corpus to read or compare on (all by default).

    Attributes:
        exclude_special: drop special tokens (BOS, chat-template markers).
        exclude_first: drop position 0 of every document (attention sinks carry huge norms).
        positions: keep positions ``a <= p < b`` inside each document.
        fields: keep only the tokens of these source fields (e.g. ``("reasoning",)``), markup dropped.
        docs: keep only these documents (indices into the corpus's document table), in this order.
        tokens: keep only the global token range ``(start, stop)``.
    """

    exclude_special: bool = False
    exclude_first: bool = False
    positions: tuple[int, int] | None = None
    docs: tuple[int, ...] | None = None
    tokens: tuple[int, int] | None = None
    fields: tuple[str, ...] | None = None

    @classmethod
    def of(cls, *, tokens: tuple[int, int] | None = None, docs: Sequence[int] | None = None,
           token_filter: TokenFilter | None = None) -> TokenSelection:
        """The selection of a range, documents and a filter (the keyword arguments of a store's reads)."""
        f = token_filter or TokenFilter()
        return cls(exclude_special=f.exclude_special, exclude_first=f.exclude_first, positions=f.positions,
                   docs=tuple(int(d) for d in docs) if docs is not None else None, tokens=tokens, fields=f.fields)

    @property
    def is_everything(self) -> bool:
        """True when nothing is dropped (every token of the corpus, in order)."""
        return self.tokens is None and self.docs is None and self.token_filter().is_identity

    def token_filter(self) -> TokenFilter:
        return TokenFilter(exclude_special=self.exclude_special, exclude_first=self.exclude_first,
                           positions=self.positions, fields=self.fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.token_filter().to_dict(),
            "docs": list(self.docs) if self.docs is not None else None,
            "tokens": list(self.tokens) if self.tokens is not None else None,
        }


def parse_token_range(text: str, n_tokens: int) -> tuple[int, int]:
    """``"A:B"`` (either side may be empty, negatives count from the end) -> checked ``(A, B)``."""
    try:
        a_text, b_text = text.split(":")
        ends = (int(a_text) if a_text else None, int(b_text) if b_text else None)
    except ValueError:
        raise SelectionError(f"Expected a token range A:B such as 0:1000. Got {text!r} instead.") from None
    start, stop, _ = slice(*ends).indices(n_tokens)
    # Python's slices clip an end past the tokens; a range asked for is taken as asked, or refused.
    if stop <= start or any(end is not None and not -n_tokens <= end <= n_tokens for end in ends):
        raise SelectionError(
            f"Expected a non-empty token range inside 0:{n_tokens}. Got {text!r} instead. "
            f"Pick A < B <= {n_tokens}."
        )
    return start, stop


def parse_int_list(text: str, *, ranges: bool = True, negative: bool = False, what: str = "integers",
                   below: int | None = None) -> list[int]:
    """Comma-separated integers, and with ``ranges`` inclusive ranges ``A-B``, in the order written.

    The one parser of every integer-list flag: ``--docs``, extraction's ``--layers``, analysis's ``--k`` and
    ``--hidden-states``, and evaluation's ``--steps``. Blank parts are skipped (``"1,,2"`` is ``[1, 2]``), but a
    list of none (``""``, ``","``: an unset shell variable) is refused (:func:`_some`), never read as "all".

    Args:
        text: e.g. ``"0,3,5-9"``.
        ranges: accept ``A-B`` parts; without, a part is one (possibly negative) integer.
        negative: with ``ranges``, also accept a part ``-N``, one negative integer (an index counted from the end,
            for the caller to resolve); a range with a negative end stays refused (``0--1``, ``-3--1`` read two ways).
        what: what the integers are, for the error message (e.g. "document indices").
        below: with it, a part at or past it is refused before a range is expanded (``0-999999999`` was a list of
            a billion integers before any check).

    Raises:
        SelectionError: a part that is not an integer (or range), a range written high to low (``5-3``), or no
            part at all; a ``ValueError``, so a pydantic validator that calls this reports it with the other problems.

    Example:
        >>> parse_int_list("0,3,5-9")
        [0, 3, 5, 6, 7, 8, 9]
        >>> parse_int_list("5, 10,50", ranges=False)
        [5, 10, 50]
    """
    example = ("0,3,5-9,-1" if negative else "0,3,5-9") if ranges else "5,10,50"
    values: list[int] = []
    try:
        for part in _some(text, what=what, example=example):
            one_negative = negative and part.startswith("-") and part[1:].isdigit()
            if ranges and "-" in part and not one_negative:
                lo, hi = (int(v) for v in part.split("-", 1))
                if negative and hi < 0:  # "0--1": to the last, or an empty range? Not guessed
                    raise ValueError(part)
                _check_low_to_high(lo, hi, part, text, what)
                _check_below(hi, below, part, what)
                values.extend(range(lo, hi + 1))
            else:
                _check_below(int(part), below, part, what)
                values.append(int(part))
    except SelectionError:  # a range high to low: its own message
        raise
    except ValueError:
        how = (" (A-B for a range, -N counted from the end)" if negative else " (A-B for a range)") if ranges else ""
        raise SelectionError(f"Expected {what} such as {example}. Got {text!r} instead. "
                             f"Write integers separated by commas{how}.") from None
    return values


def parse_name_list(text: str, *, what: str, example: str) -> list[str]:
    """Comma-separated names (``--fields``, ``--metrics``), trimmed, blank parts skipped, in the order written; a
    list of none is refused as :func:`parse_int_list` refuses one.

    Raises:
        SelectionError: no name at all (``""``, ``" , "``); a ``ValueError``, gathered by pydantic validators.

    Example:
        >>> parse_name_list(" reasoning, answer", what="source fields", example="reasoning")
        ['reasoning', 'answer']
    """
    return _some(text, what=what, example=example)


def _some(text: str, *, what: str, example: str) -> list[str]:
    """The non-blank comma-separated parts of a list flag's value; none is refused, not taken as "all" (an empty
    ``--docs "$UNSET"`` read every token, while ``--docs ,`` was refused)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise SelectionError(f"Expected {what} such as {example}. Got {text!r}, which lists none, instead. "
                             "List at least one, or leave the flag out.")
    return parts


def _check_below(value: int, below: int | None, part: str, what: str) -> None:
    if below is not None and value >= below:
        raise SelectionError(f"Expected {what} in 0..{below - 1}. Got {part!r} instead. Pick indices below {below}.")


def _check_low_to_high(lo: int, hi: int, part: str, text: str, what: str) -> None:
    """Refuse a range written high to low: ``5-3`` is an empty range, which selected nothing without a word."""
    if lo <= hi:
        return
    where = "" if part == text.strip() else f" in {text!r}"
    raise SelectionError(f"Expected {what} with each range A-B from low to high. Got {part!r}{where} instead. "
                         f"Write it {hi}-{lo}.")


def parse_doc_ids(text: str, n_docs: int | None = None) -> list[int]:
    """``"0,3,5-9"`` -> ``[0, 3, 5, 6, 7, 8, 9]``: document indices (:func:`parse_int_list`); with ``n_docs``, an
    index past the corpus is refused before a range is expanded."""
    return parse_int_list(text, what="document indices", below=n_docs)


def _doc_index(doc_offsets: np.ndarray, docs: Sequence[int]) -> np.ndarray:
    n_docs = doc_offsets.shape[0] - 1
    docs = [int(d) for d in docs]
    bad = [d for d in docs if not 0 <= d < n_docs]
    if bad or not docs:
        raise SelectionError(
            f"Expected document indices in 0..{n_docs - 1}. Got {_few(bad) if bad else 'none'} instead. "
            "List the corpus's documents with `hrsa store info`."
        )
    if len(set(docs)) != len(docs):
        twice = sorted(d for d, n in Counter(docs).items() if n > 1)
        raise SelectionError(f"Expected each document once. Got {_few(twice)} more than once instead.")
    return np.concatenate([np.arange(doc_offsets[d], doc_offsets[d + 1], dtype=np.int64) for d in docs])


def _few(values: Sequence[int], shown: int = 5) -> str:
    """A list in an error's one line: its first few and how many more (a range past the corpus listed every one)."""
    more = len(values) - shown
    return ", ".join(map(str, values[:shown])) + (f" and {more} more" if more > 0 else "")


def _field_indices(corpus: zarr.Group, fields: Sequence[str]) -> list[int]:
    """Indices of ``fields`` among the corpus's content-span fields. Raises SelectionError naming the fix."""
    from hrsa.store.format import ATTRS_KEY

    known = corpus.attrs[ATTRS_KEY].get("span_fields")
    if not known or "token_field" not in corpus:
        raise SelectionError(
            "Expected a corpus with content spans to select tokens by field. Got one stored without them (by an "
            "earlier hrsa, or tokenised by a slow tokenizer). Extract the model again into a new store, or drop --fields."
        )
    unknown = [f for f in fields if f not in known]
    if unknown:
        raise SelectionError(f"Expected fields among {', '.join(known)}. Got {', '.join(unknown)} instead.")
    return [known.index(f) for f in fields]


def _filter_masks(corpus: zarr.Group, token_filter: TokenFilter, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Each filter's own (hi - lo,) mask over tokens ``lo:hi``, by the flag that asks for it."""
    masks: dict[str, np.ndarray] = {}
    position = corpus["position"][lo:hi]
    if token_filter.exclude_special:
        masks["--exclude-special"] = ~corpus["is_special"][lo:hi]
    if token_filter.exclude_first:
        masks["--exclude-first"] = position != 0
    if token_filter.positions:
        a, b = token_filter.positions
        masks[f"--positions {a}:{b}"] = (position >= a) & (position < b)
    if token_filter.fields:
        wanted = _field_indices(corpus, token_filter.fields)  # refuses a corpus without spans first
        masks[f"--fields {','.join(token_filter.fields)}"] = np.isin(corpus["token_field"][lo:hi], wanted)
    return masks


def _why_none(corpus: zarr.Group, masks: dict[str, np.ndarray], token_filter: TokenFilter) -> str:
    """Which filter left nothing (a field no stored token lies in names the documents cut before it), or that the
    filters keep tokens alone but none together: "Got none. Loosen the filters." left the user to find which."""
    from hrsa.store.format import ATTRS_KEY

    empty = [name for name, mask in masks.items() if not mask.any()]
    if not empty:
        return f"each of {', '.join(masks)} keeps some tokens, but no token passes all of them. Drop one of them"
    reasons = []
    for name in empty:
        if name.startswith("--fields"):
            cut = int(corpus.attrs[ATTRS_KEY].get("n_truncated", 0))
            n_docs = int(corpus.attrs[ATTRS_KEY].get("n_docs", 0))
            reasons.append(f"{name} keeps nothing: no stored token of field {','.join(token_filter.fields or ())} "
                           f"in the selected tokens" + (f" ({cut} of {n_docs} documents were cut at extraction's "
                                                         "--max-tokens, maybe before it)" if cut else ""))
        else:
            reasons.append(f"{name} keeps nothing of the selected tokens")
    return "; ".join(reasons) + ". Loosen the filters" + (", or extract again with a larger --max-tokens"
                                                          if any("cut at" in r for r in reasons) else "")


def resolve_selection(corpus: zarr.Group, selection: TokenSelection | None = None) -> slice | np.ndarray:
    """Resolve ``selection`` (default: every token) against ``corpus``'s token table.

    Returns:
        A ``slice`` of token indices when the selection is contiguous, else an (M,) int64 index in
        document order (and token order inside each document).

    Raises:
        SelectionError: the range or documents are out of bounds, or nothing is left after filtering.
    """
    n_tokens = int(corpus["token_ids"].shape[0])
    selection = selection or TokenSelection()
    tokens, docs, token_filter = selection.tokens, selection.docs, selection.token_filter()
    # Step 1: the candidate tokens, as a range or an index.
    if tokens is not None:
        start, stop = tokens
        if not 0 <= start < stop <= n_tokens:
            raise SelectionError(f"Expected a token range inside 0:{n_tokens}. Got {start}:{stop} instead.")
    else:
        start, stop = 0, n_tokens
    index: np.ndarray | None = None
    if docs is not None:
        doc_offsets = corpus["doc_offsets"][:]
        index = _doc_index(doc_offsets, docs)
        if tokens is not None:
            index = index[(index >= start) & (index < stop)]
            outside = [d for d in docs if doc_offsets[d + 1] <= start or doc_offsets[d] >= stop]
            if index.size and outside:  # none left at all is said below; one document of several dropped was silent
                raise SelectionError(
                    f"Expected each listed document to hold tokens of the token range {start}:{stop}. Got document(s) "
                    f"{_few(outside)}, which lie outside it, instead. Widen --tokens or drop them from --docs."
                )
    # Step 2: the filters, read only over the candidate range.
    masks: dict[str, np.ndarray] = {}  # each filter's own mask over the candidates (for the message if none is left)
    candidates = index
    if not token_filter.is_identity:
        lo, hi = (int(index.min()), int(index.max()) + 1) if index is not None and index.size else (start, stop)
        masks = _filter_masks(corpus, token_filter, lo, hi)
        if index is not None:  # judged on the documents' tokens, not on the range between them
            masks = {name: mask[index - lo] for name, mask in masks.items()}
        keep = np.logical_and.reduce(list(masks.values()))
        index = index[keep] if index is not None else np.flatnonzero(keep).astype(np.int64) + lo
    # Step 3: the cheapest form that says the same.
    if index is None:
        return slice(start, stop)
    if index.size == 0:
        why = ("the documents lie outside the token range. Widen --tokens or pick other --docs"
               if candidates is not None and candidates.size == 0 else _why_none(corpus, masks, token_filter))
        raise SelectionError(f"Expected at least one token after selection and filters. Got none: {why}.")
    if index[-1] - index[0] + 1 == index.size and np.all(np.diff(index) == 1):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index
