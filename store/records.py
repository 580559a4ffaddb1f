"""Source records of a corpus: the rows of a .jsonl/.csv/.parquet file, a folder of them, or a Hugging Face dataset.

Format I/O below both extraction (which renders and tokenises the records into a corpus) and the probes of
``hrsa analyze`` (which read labels back from the same records, joined by record id). Each record gets an
``_id``: its ``id_field``, else its ``"id"`` field, else ``<file name>:<line>`` (``<dataset>:<row>`` on the hub),
so that both sides name a record alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hrsa.store.errors import UserError

__all__ = ["CorpusError", "RECORD_SUFFIXES", "read_records"]

RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class CorpusError(UserError, ValueError):
    """A corpus that cannot be read or rendered as asked."""


def read_records(source: str, *, id_field: str | None = None, max_docs: int | None = None) -> Iterator[dict[str, Any]]:
    """The records of ``source`` in order, at most ``max_docs``; each has an ``_id``.

    Args:
        source: a .jsonl/.csv/.parquet file, a folder of them (read in name order), or ``hf:NAME[:SPLIT]``.
        id_field: the field holding each record's id (default: "id" if present, else file:line).
        max_docs: keep the first N records.

    Raises:
        CorpusError: nothing readable at ``source``, or a line of a .jsonl that is not JSON.
    """
    reader = _read_hub(source) if source.startswith("hf:") else (r for f in _files(source) for r in _read_file(f))
    for n, record in enumerate(reader):
        if max_docs is not None and n >= max_docs:
            return
        default = record.pop("_default_id")
        key = id_field or ("id" if "id" in record else None)
        record["_id"] = str(record[key]) if key and record.get(key) is not None else default  # an empty id: its place
        yield record


def _files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        # Hidden names left out, as the folder's digest leaves them (runtime.fingerprint.folder_files): a hidden file
        # read but not digested changed the corpus while every stage that keys on it stayed up to date.
        files = sorted(p for p in path.iterdir()
                       if p.suffix in RECORD_SUFFIXES and not p.name.startswith(".") and p.is_file())
        if not files:
            raise CorpusError(f"Expected .jsonl, .csv or .parquet files in {path}. Got none. Point --corpus at a data file.")
        return files
    if path.is_file():
        if path.suffix not in RECORD_SUFFIXES:
            raise CorpusError(f"Expected a {', '.join(RECORD_SUFFIXES)} file. Got {path.name} instead.")
        return [path]
    hint = (" (or, for a corpus already in the store, one of the ids `hrsa store ls` lists)"
            if str(source).startswith("corpus-") else "")
    raise CorpusError(f"Expected a corpus file or folder at {source}. Got nothing there instead. Check the path{hint}.")


def _read_file(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix in (".jsonl", ".json"):
        yield from _read_json_lines(path)
        return
    import pandas as pd

    try:
        # A numeric column with a missing cell keeps its integers (numpy's default made the whole column float: id 12
        # read as "12.0", labels 0/1 as "0.0"/"1.0"). pandas' missing-value tokens stay (an empty cell, NA, NaN, null,
        # N/A...): labels written so by R or pandas are missing, not classes.
        frame = (pd.read_csv(path, dtype_backend="numpy_nullable") if path.suffix == ".csv" else pd.read_parquet(path))
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:  # pyarrow's errors are ValueErrors
        raise CorpusError(f"Expected a readable {path.suffix} file at {path}. Got {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''} instead. Check the file.") from e
    if path.suffix == ".csv":
        frame = frame.astype(object).where(frame.notna(), None)  # missing cells read as None, as JSON's null
    for n, record in enumerate(frame.to_dict("records")):
        yield {"_default_id": f"{path.name}:{n}", **record}


def _read_json_lines(path: Path) -> Iterator[dict[str, Any]]:
    for n, record in iter_json_lines(path, error=CorpusError):
        yield {"_default_id": f"{path.name}:{n}", **record}


def iter_json_lines(path: Path, *, error: type[UserError]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines file, from 1.

    Raises:
        error: a line that is not JSON or not an object, or bytes that are not UTF-8 (one line naming the place).
    """
    with Path(path).open("rb") as lines:  # decoded line by line, so a byte that is not UTF-8 names its line
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"Expected UTF-8 text in {path}. Got a byte that is not on line {number} ({e.reason}) "
                            "instead. Convert the file to UTF-8.") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"Expected one JSON object a line in {path}. Got invalid JSON on line {number} "
                            f"instead ({e.msg}). Fix that line.") from None
            if not isinstance(record, dict):
                raise error(f"Expected one JSON object a line in {path}. Got a {type(record).__name__} on line "
                            f"{number} instead. Fix that line.")
            yield number, record


def _read_hub(source: str) -> Iterator[dict[str, Any]]:
    name, _, split = source.removeprefix("hf:").partition(":")
    try:
        import datasets
    except ImportError as e:
        raise CorpusError("Expected the `datasets` package for hf: corpora. Got it missing. pip install datasets.") from e
    for n, record in enumerate(datasets.load_dataset(name, split=split or "train", streaming=True)):
        yield {"_default_id": f"{name}:{n}", **record}
