"""Ids of models, corpora and results: validated slugs that can never leave the store root."""

from __future__ import annotations

import re

from hrsa.store.errors import InvalidIdError

__all__ = ["parse_id", "slugify"]

_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def parse_id(value: object, *, kind: str = "id") -> str:
    """Return ``value`` if it is a safe slug, else raise :class:`InvalidIdError`.

    A slug starts with a letter or digit and holds only letters, digits, ``.``, ``_`` and ``-``
    (at most 128 characters), so it names exactly one folder or key below its parent: no ``/``,
    no ``..``, no leading dot.
    """
    if not isinstance(value, str) or not _SLUG.match(value) or ".." in value:
        raise InvalidIdError(
            f"Expected a {kind} made of letters, digits, '.', '_' and '-' (starting with a letter or "
            f"digit, no '..', at most 128 characters). Got {value!r} instead. "
            f"Choose another {kind}, e.g. {slugify(str(value)) or 'my-' + kind}."
        )
    return value


def slugify(text: str) -> str:
    """Turn free text (a hub id, a path) into a valid slug: ``Org/Model-1.5B`` -> ``org--model-1.5b``."""
    slug = text.strip().lower().replace("/", "--")
    slug = re.sub(r"[^a-z0-9._-]+", "-", slug)
    slug = re.sub(r"\.{2,}", ".", slug).strip("._-")
    return slug[:128]
