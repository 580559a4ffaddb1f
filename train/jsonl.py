"""JSON-lines inputs of ``hrsa train``, ``hrsa mine-negatives`` and ``hrsa eval``: read, checked, and the bad line
named.

Query/positive pairs (``{"query", "pos", "negs"?, "instruction"?}`` a line), documents and labelled texts are
read here; a missing file, invalid JSON or a bad field is a :class:`JsonlError` (or the error class the caller
names) naming the file and the line. :func:`check_pair` is the one rule of the pairs format, used by
:func:`read_pairs` and by the training reader (:func:`hrsa.train.data.load_training_records`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hrsa.store.errors import UserError
from hrsa.store.records import iter_json_lines

__all__ = ["JsonlError", "check_pair", "iter_jsonl", "read_jsonl", "read_pairs"]


class JsonlError(UserError, ValueError):
    """A JSON-lines input that is missing, unreadable, or lacks a field on some line."""


def iter_jsonl(path: Path, *, error: type[UserError] = JsonlError) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines file, from 1.

    Raises:
        error: no such file, invalid JSON, or a line that holds something other than an object.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"Expected a JSON-lines file at {path}. Got no such file instead. Check the path.")
    yield from iter_json_lines(path, error=error)


def read_jsonl(path: Path, *, required: Sequence[str] = (), hint: str = "") -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; every one must hold ``required`` as a non-empty string.

    Raises:
        JsonlError: no such file, invalid JSON, or a missing field; the message names the line.
    """
    records = []
    for number, record in iter_jsonl(path):
        _check_texts(record, required, path=path, line=number, hint=hint, error=JsonlError)
        records.append(record)
    return _not_empty(records, path, error=JsonlError)


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """Query/positive pairs (:func:`check_pair`): ``query`` and ``pos``, optional ``negs`` and ``instruction``.

    Raises:
        JsonlError: no such file, invalid JSON, or a record that breaks the pairs format; the message names the line.
    """
    records = []
    for number, record in iter_jsonl(path):
        check_pair(record, path=path, line=number)
        records.append(record)
    return _not_empty(records, path, error=JsonlError)


def check_pair(record: dict[str, Any], *, path: Path, line: int, negs_required: bool = False,
               error: type[UserError] = JsonlError) -> None:
    """The pairs format: ``query`` and ``pos`` non-empty texts, ``negs`` a list of texts (optional unless
    ``negs_required``), ``instruction`` a text or absent.

    Raises:
        error: the first field that breaks the format, naming ``path`` and ``line``.
    """
    _check_texts(record, ("query", "pos"), path=path, line=line, hint="", error=error)
    if "negs" not in record and negs_required:
        raise error(f"Expected a list of hard-negative texts 'negs' on every line of {path}. Got no 'negs' on line "
                    f"{line} instead. Add them (hrsa mine-negatives writes them).")
    negs = record.get("negs", [])
    if not isinstance(negs, list) or not all(isinstance(n, str) for n in negs):
        raise error(f"Expected 'negs' to be a list of texts in {path}. Got {type(negs).__name__} on line {line} "
                    "instead. Fix that line.")
    instruction = record.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise error(f"Expected 'instruction' to be text in {path}. Got {type(instruction).__name__} on line {line} "
                    "instead. Fix that line.")


def _check_texts(record: dict[str, Any], names: Sequence[str], *, path: Path, line: int, hint: str,
                 error: type[UserError]) -> None:
    for name in names:
        if not isinstance(record.get(name), str) or not record[name].strip():
            got = "no" if name not in record else f"an empty or non-text ({type(record[name]).__name__})"
            raise error(f"Expected a text field {name!r} on every line of {path}. Got {got} {name!r} on "
                        f"line {line} instead. Fix that line{hint}.")


def _not_empty(records: list[dict[str, Any]], path: Path, *, error: type[UserError]) -> list[dict[str, Any]]:
    if not records:
        raise error(f"Expected at least one record in {path}. Got an empty file instead.")
    return records
