"""JSON-lines inputs of ``hrsa mine-negatives`` and ``hrsa eval``: read, checked, and the bad line named.

Query/positive pairs (``{"query", "pos", "negs"?, "instruction"?}`` a line), documents and labelled texts are
read here; a missing file, invalid JSON or a missing field is a :class:`JsonlError` naming the file and the line.
(Training data has its own reader, :mod:`hrsa.train.data`, which also samples the negatives of each step.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hrsa.store.errors import UserError

__all__ = ["JsonlError", "read_jsonl", "read_pairs"]


class JsonlError(UserError, ValueError):
    """A JSON-lines input that is missing, unreadable, or lacks a field on some line."""


def read_jsonl(path: Path, *, required: Sequence[str] = (), hint: str = "") -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; every one must hold ``required`` as a non-empty string.

    Raises:
        JsonlError: no such file, invalid JSON, or a missing field; the message names the line.
    """
    path = Path(path)
    if not path.is_file():
        raise JsonlError(f"Expected a JSON-lines file at {path}. Got no such file instead. Check the path.")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise JsonlError(f"Expected one JSON object a line in {path}. Got invalid JSON on line {number} "
                                 f"instead ({error.msg}). Fix that line.") from None
            if not isinstance(record, dict):
                raise JsonlError(f"Expected one JSON object a line in {path}. Got a {type(record).__name__} on line "
                                 f"{number} instead. Fix that line.")
            for name in required:
                if not isinstance(record.get(name), str) or not record[name].strip():
                    got = "no" if name not in record else f"an empty or non-text ({type(record[name]).__name__})"
                    raise JsonlError(f"Expected a text field {name!r} on every line of {path}. Got {got} {name!r} on "
                                     f"line {number} instead. Fix that line{hint}.")
            records.append(record)
    if not records:
        raise JsonlError(f"Expected at least one record in {path}. Got an empty file instead.")
    return records


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """Training pairs: ``query`` and ``pos`` (text), optional ``negs`` (list of texts) and ``instruction`` (text)."""
    records = read_jsonl(path, required=("query", "pos"))
    for number, record in enumerate(records, 1):
        negs = record.get("negs", [])
        if not isinstance(negs, list) or not all(isinstance(n, str) for n in negs):
            raise JsonlError(f"Expected 'negs' to be a list of texts in {path}. Got {type(negs).__name__} in record "
                             f"{number} instead. Fix that record.")
        instruction = record.get("instruction")
        if instruction is not None and not isinstance(instruction, str):
            raise JsonlError(f"Expected 'instruction' to be text in {path}. Got {type(instruction).__name__} in record "
                             f"{number} instead. Fix that record.")
    return records
