"""Ids of models, corpora and results: validated slugs that can never leave the store root, nor name a node of
the store's own layout."""

from __future__ import annotations

import re

from hrsa.store.errors import InvalidIdError

__all__ = ["RESERVED_NAMES", "parse_id", "slugify"]

_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Names the layout gives nodes of its own (store/format.py, model.py, corpus.py): Zarr's metadata document, the
# root's groups, a model's children and a corpus's arrays. An id is a key beside such names, so one of them as an
# id can replace a node's metadata: `models/zarr.json` deleted models' group on an fsspec store. Compared
# case-insensitively, as case-insensitive filesystems (macOS, Windows) compare them.
RESERVED_NAMES = frozenset({
    "zarr.json", "corpora", "models", "results", "alignments", "hidden", "units", "done", "claims", "leases",
    "token_ids", "doc_index", "position", "is_special", "doc_offsets", "doc_truncated", "doc_original_length",
    "doc_record_id", "token_field", "char_start", "char_end", "doc_text_sha256",
})


def _is_valid(value: object) -> bool:
    return (isinstance(value, str) and bool(_SLUG.match(value)) and ".." not in value
            and value.lower() not in RESERVED_NAMES)


def parse_id(value: object, *, kind: str = "id") -> str:
    """Return ``value`` if it is a safe slug, else raise :class:`InvalidIdError`.

    A slug starts with a letter or digit and holds only letters, digits, ``.``, ``_`` and ``-``
    (at most 128 characters), so it names exactly one folder or key below its parent: no ``/``,
    no ``..``, no leading dot. A name of the layout's own (:data:`RESERVED_NAMES`, such as ``zarr.json``)
    is refused too.
    """
    if _is_valid(value):
        return value  # type: ignore[return-value]  # _is_valid checked it is a str
    if isinstance(value, str) and value.lower() in RESERVED_NAMES and _SLUG.match(value):
        what = f"a name reserved by the store's layout ({', '.join(sorted(RESERVED_NAMES))})"
    else:
        what = ("letters, digits, '.', '_' and '-' (starting with a letter or digit, no '..', at most 128 "
                "characters)")
    prefix = "" if what.startswith("a name") else "made of "
    expectation = f"a {kind} {prefix}{what}" if prefix else f"a {kind} that is not {what}"
    raise InvalidIdError(f"Expected {expectation}. Got {value!r} instead. Choose another {kind}, e.g. "
                         f"{_suggestion(value, kind)}.")


def _suggestion(value: object, kind: str) -> str:
    """A valid id close to ``value``, else one made from ``kind`` ("model id (--name)" -> "my-model")."""
    slug = slugify(str(value))
    for candidate in (slug, f"my-{slug}", f"my-{slugify(kind.split()[0])}"):
        if candidate.strip("-").removeprefix("my") and _is_valid(candidate):
            return candidate
    return "my-id"


def slugify(text: str) -> str:
    """Turn free text (a hub id, a path) into a valid slug: ``Org/Model-1.5B`` -> ``org--model-1.5b``."""
    slug = text.strip().lower().replace("/", "--")
    slug = re.sub(r"[^a-z0-9._-]+", "-", slug)
    slug = re.sub(r"\.{2,}", ".", slug).strip("._-")
    return slug[:128]
