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
    with pytest.raises(CorpusError, match="one JSON object a line"):
        list(read_records(str(tmp_path / "bad.jsonl")))
    with pytest.raises(CorpusError, match="Got nothing there"):
        list(read_records(str(tmp_path / "absent.csv")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="Got none"):
        list(read_records(str(tmp_path / "empty")))


@pytest.mark.parametrize(("name", "content", "message"), [
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "Expected UTF-8 text in .* on line 2"),
    ("string.jsonl", b'{"text": "ok"}\n"just a string"\n', "Got a str on line 2"),
    ("fake.parquet", b"PAR1 not really", "Expected a readable .parquet file"),
    ("latin1.csv", b"text\ncaf\xe9\n", "Expected a readable .csv file"),
])
def test_malformed_files_are_one_line_corpus_errors(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    """Not UTF-8, a JSON value that is not an object, a file that is not Parquet: one line naming the file (and the
    line), never a traceback from deep in a reader."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CorpusError, match=message) as error:
        list(read_records(str(tmp_path / name)))
    assert "\n" not in str(error.value) and name in str(error.value)


def test_a_settings_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    from hrsa.runtime.settings import read_yaml_mapping
    from hrsa.store.errors import UserError

    (tmp_path / "bin.yaml").write_bytes(b"store: caf\xe9\xff\n")
    with pytest.raises(UserError, match="Expected a readable YAML config") as error:
        read_yaml_mapping(tmp_path / "bin.yaml")
    assert "\n" not in str(error.value)


def test_a_folder_corpus_reads_the_files_its_digest_covers_hidden_ones_left_out(tmp_path: Path) -> None:
    """A hidden record file in a corpus folder was read by extraction but not covered by the folder's digest (hidden
    names are left out there, as a .git is): edited, it changed the corpus while every stage stayed up to date."""
    from hrsa.runtime.fingerprint import records_digest

    folder = tmp_path / "corp"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"id": "a1", "text": "one"}\n')
    (folder / ".b.jsonl").write_text('{"id": "b1", "text": "hidden"}\n')
    assert [r["id"] for r in read_records(str(folder))] == ["a1"]
    before = records_digest(folder)
    (folder / ".b.jsonl").write_text('{"id": "b2", "text": "edited"}\n')
    assert records_digest(folder) == before and [r["id"] for r in read_records(str(folder))] == ["a1"]
