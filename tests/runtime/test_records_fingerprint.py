"""What extraction reads of a corpus (each record's id and text fields): the key of a pipeline's extractions and what
`hrsa analyze` checks before it reads a probe's labels back from an edited corpus file. Parsing every record costs
~23 s a GB, and a pipeline keys many extractions on one corpus a run, so it is kept per machine under the corpus's
content digest; no kept value ever stands for other content."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hrsa.runtime.fingerprint as fingerprint
import hrsa.store.records as records
from hrsa.runtime.fingerprint import records_fingerprint

ROWS = ({"id": "d0", "text": "héllo world", "label": 1}, {"text": "second line", "label": 0, "extra": [1, 2]},
        {"id": "d2", "text": "third", "label": None})


def _write(path: Path, rows: Any = ROWS) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture
def parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The corpora parsed (each call of the record reader), with a cache of this test's own."""
    monkeypatch.setenv("HRSA_CACHE", str(tmp_path / "cache"))
    fingerprint._memo.clear()
    fingerprint._records_memo.clear()
    seen: list[str] = []
    real = records.read_records

    def counting(source: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        seen.append(source)
        return real(source, **kwargs)

    monkeypatch.setattr(records, "read_records", counting)
    return seen


def _as_another_process() -> None:
    fingerprint._memo.clear()
    fingerprint._records_memo.clear()


def test_keys_recorded_by_earlier_pipelines_stay_the_same(tmp_path: Path, parses: list[str]) -> None:
    """Values taken with the rule before it was kept per machine (the pipeline's extraction keys): a changed
    serialisation would re-extract every stored model once."""
    corpus = str(_write(tmp_path / "pin.jsonl"))
    assert records_fingerprint(corpus, fields=("text",)) == (
        "bd75734a0fa29e6766649d9b5d081d010ca24970fff089b51de99a7dabbc3727")
    assert records_fingerprint(corpus, fields=("text", "label"), max_docs=2) == (
        "693475684919ad8b0b856706eb7087d6e976b77081d9687f07bf73625aa62a06")


def test_one_content_is_parsed_once_per_machine(tmp_path: Path, parses: list[str]) -> None:
    corpus = str(_write(tmp_path / "pin.jsonl"))
    first = records_fingerprint(corpus, fields=("text",))
    assert records_fingerprint(corpus, fields=("text",)) == first
    _as_another_process()
    assert records_fingerprint(corpus, fields=("text",)) == first
    assert parses == [corpus]
    records_fingerprint(corpus, fields=("text",), id_field="label")  # other arguments: another value, parsed
    records_fingerprint(corpus, fields=("text",), max_docs=1)
    assert len(parses) == 3


def test_a_label_edit_keeps_it_and_a_text_or_id_edit_changes_it(tmp_path: Path, parses: list[str]) -> None:
    path = _write(tmp_path / "pin.jsonl")
    first = records_fingerprint(str(path), fields=("text",))
    _write(path, [{**r, "label": "relabelled", "added": True} for r in ROWS])
    assert records_fingerprint(str(path), fields=("text",)) == first
    for edited in ([{**ROWS[0], "text": "hello world"}, *ROWS[1:]],  # one character of one text
                   [{**ROWS[0], "id": "d9"}, *ROWS[1:]],  # an id
                   [{"text": "a new first line"}, *ROWS],  # a line prepended: FILE:LINE ids shift
                   ROWS[:2]):  # a record dropped
        _write(path, edited)
        assert records_fingerprint(str(path), fields=("text",)) != first, edited
    assert len(parses) == 6  # each new content parsed, none taken from another's entry


def test_a_file_changed_while_parsed_keeps_nothing(tmp_path: Path, parses: list[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewrite between the content digest and the end of the parse: the value is of neither content for sure,
    so it is kept under no digest (the next run parses again)."""
    path = _write(tmp_path / "pin.jsonl")
    real = records.read_records

    def rewritten_midway(source: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        for n, record in enumerate(real(source, **kwargs)):
            if n == 1:
                _write(path, [{**r, "text": r["text"].upper()} for r in ROWS])
            yield record

    monkeypatch.setattr(records, "read_records", rewritten_midway)
    records_fingerprint(str(path), fields=("text",))
    monkeypatch.setattr(records, "read_records", real)
    for content in ([{**r, "text": r["text"].upper()} for r in ROWS], ROWS):  # as left, then as it was before
        _write(path, content)
        _as_another_process()
        assert records_fingerprint(str(path), fields=("text",)) == _uncached(path)


def _uncached(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()  # the rule, from its definition: each record's [id, [text]] as a JSON line
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        record = json.loads(line)
        row = [str(record["id"]) if "id" in record else f"{path.name}:{n}", [record.get("text")]]
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def test_the_value_is_each_record_s_id_and_text_fields(tmp_path: Path, parses: list[str]) -> None:
    path = _write(tmp_path / "pin.jsonl")
    assert records_fingerprint(str(path), fields=("text",)) == _uncached(path)


def test_broken_or_misplaced_entries_are_not_believed(tmp_path: Path, parses: list[str]) -> None:
    path = _write(tmp_path / "pin.jsonl")
    other = _write(tmp_path / "other.jsonl", [{**r, "text": "other"} for r in ROWS])
    right = records_fingerprint(str(path), fields=("text",))
    (entry,) = (tmp_path / "cache" / "records").iterdir()
    records_fingerprint(str(other), fields=("text",))
    (other_entry,) = [p for p in (tmp_path / "cache" / "records").iterdir() if p != entry]
    for broken in (other_entry.read_text(), entry.read_text()[:20], "", "[]", "not json",
                   entry.read_text().replace(right, "xyz")):
        entry.write_text(broken)
        _as_another_process()
        assert records_fingerprint(str(path), fields=("text",)) == right, broken


def test_an_unwritable_cache_costs_time_not_correctness(tmp_path: Path, parses: list[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("HRSA_CACHE", str(blocker / "cache"))  # below a file: nothing can be made there
    path = _write(tmp_path / "pin.jsonl")
    assert records_fingerprint(str(path), fields=("text",)) == _uncached(path)


def test_a_folder_is_keyed_by_its_record_files(tmp_path: Path, parses: list[str]) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    _write(folder / "a.jsonl")
    first = records_fingerprint(str(folder), fields=("text",))
    (folder / "notes.txt").write_text("not read by the corpus reader")
    assert records_fingerprint(str(folder), fields=("text",)) == first
    _write(folder / "b.jsonl", ROWS[:1])
    assert records_fingerprint(str(folder), fields=("text",)) != first


def test_nothing_local_is_none(tmp_path: Path, parses: list[str]) -> None:
    assert records_fingerprint(str(tmp_path / "gone.jsonl"), fields=("text",)) is None
    assert records_fingerprint("hf:someone/dataset", fields=("text",)) is None
    assert parses == []


def test_a_copy_under_another_name_is_another_corpus(tmp_path: Path, parses: list[str]) -> None:
    """Records without an id are named FILE:LINE: the same bytes under another name are other ids."""
    first = records_fingerprint(str(_write(tmp_path / "pin.jsonl")), fields=("text",))
    copy = _write(tmp_path / "copy.jsonl")
    assert records_fingerprint(str(copy), fields=("text",)) != first
    assert records_fingerprint(str(copy), fields=("text",)) == _uncached(copy)


def test_a_field_a_template_s_format_spec_names_is_a_text_field(tmp_path: Path, parses: list[str]) -> None:
    """``{text:>{width}}`` pads each text to its record's ``width``: an edited width is another text, so another key
    (it was left out, and the pipeline kept the extraction of the old texts)."""
    from hrsa.cluster.stage_keys import corpus_fingerprint
    from hrsa.extract.config import CorpusOptions
    from hrsa.extract.corpus import CorpusSpec, render_text

    template = "{text:>{width}}|{chat:messages}"
    assert CorpusSpec(source="x", template=template).source_fields() == ("text", "width", "messages")
    path = _write(tmp_path / "c.jsonl", [{"id": "a", "text": "hi", "width": 4}])
    spec = CorpusSpec(source=str(path), template="{text:>{width}}")
    assert render_text({"text": "hi", "width": 4}, spec) == "  hi"
    options = CorpusOptions(template="{text:>{width}}")
    before = corpus_fingerprint(str(path), options)
    _write(path, [{"id": "a", "text": "hi", "width": 8}])
    assert render_text({"text": "hi", "width": 8}, spec) != "  hi"
    assert corpus_fingerprint(str(path), options) != before
