"""Source records of a corpus (store/records.py): every format gives the same records, ids as extraction names them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hrsa.store.records import CorpusError, read_records


def test_ids_from_a_field_the_id_column_or_the_line(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"id": 7, "key": "x", "label": "a"}, {"key": "y"}]))
    assert [r["_id"] for r in read_records(str(path))] == ["7", "c.jsonl:2"]  # "id" when present, else FILE:LINE
    assert [r["_id"] for r in read_records(str(path), id_field="key")] == ["x", "y"]
    assert [r.get("label") for r in read_records(str(path), max_docs=1)] == ["a"]


def test_unreadable_sources_are_corpus_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(CorpusError, match="one JSON object per line"):
        list(read_records(str(tmp_path / "bad.jsonl")))
    with pytest.raises(CorpusError, match="Got nothing there"):
        list(read_records(str(tmp_path / "absent.csv")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="Got none"):
        list(read_records(str(tmp_path / "empty")))
