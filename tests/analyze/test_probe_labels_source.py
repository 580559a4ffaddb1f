"""Standalone `hrsa analyze --metrics probe` without --labels reads the corpus file each model was extracted from,
as it was then: a file changed since, a relabelled copy, or another file of the same relative name is never read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hrsa.cli import cli
from hrsa.runtime.fingerprint import file_digest, records_fingerprint
from hrsa.store import ActivationStore

N_DOCS = 16
WORDS = ("the quick brown fox", "jumps over the lazy dog", "hidden states of a tiny model", "w1 w2 w3")


def _write_corpus(path: Path, labels: tuple[str, str]) -> None:
    """No id field: the records' ids are FILE:LINE, as in the reviewer's report."""
    rows = [{"text": f"{WORDS[i % len(WORDS)]} {i}", "label": labels[(i // 2) % 2]} for i in range(N_DOCS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@dataclass(frozen=True)
class Extracted:
    store: str
    original: Path  # "a", "b" were extracted from it, named relatively ("mail.jsonl" from its folder)
    copy: Path  # the same texts labelled otherwise: "c", "d", in the same stored corpus


@pytest.fixture(scope="module")
def extracted(ray_local: Any, tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Extracted:
    from hrsa.extract.job import ExtractConfig, ExtractionWorkers, run_extraction

    root = tmp_path_factory.mktemp("labels-source")
    (root / "data").mkdir()
    (root / "copy").mkdir()
    original, copy = root / "data" / "mail.jsonl", root / "copy" / "mail.jsonl"
    _write_corpus(original, ("ham", "spam"))
    _write_corpus(copy, ("neg", "pos"))  # same texts, same line ids: the same content-derived corpus
    store = str(root / "store")
    with ExtractionWorkers() as workers, pytest.MonkeyPatch.context() as mp:  # one worker loads each model in turn
        mp.chdir(root / "data")
        for name, corpus in (("a", "mail.jsonl"), ("b", "mail.jsonl"), ("c", str(copy)), ("d", str(copy))):
            run_extraction(ExtractConfig(store=store, model=str(tiny_models.dir("llama")), corpus=corpus, name=name,
                                         text="text", workers=1), workers=workers)
    opened = ActivationStore.open(store)
    assert len({opened.model_info(m).corpus for m in "abcd"}) == 1
    return Extracted(store, original, copy)


def _analyze(ex: Extracted, out: Path, a: str, b: str, *extra: str) -> tuple[int, str, dict[str, Any] | None]:
    result = CliRunner().invoke(cli, ["analyze", "--store", ex.store, "--pair", a, b, "--metrics", "probe",
                                      "--label-field", "label", "--out", str(out), *extra])
    doc = json.loads((out / "results.json").read_text()) if result.exit_code == 0 else None
    return result.exit_code, result.stderr, doc


def _error_line(stderr: str) -> str:
    """The one line of the error (the plan printed before it aside)."""
    (line,) = (text for text in stderr.splitlines() if text.startswith("hrsa: error"))
    return line


def test_each_model_records_the_corpus_file_it_was_extracted_from(extracted: Extracted) -> None:
    store = ActivationStore.open(extracted.store)
    for mid, path in (("a", extracted.original), ("b", extracted.original), ("c", extracted.copy)):
        recorded = store.model_info(mid).extraction["corpus_file"]
        assert recorded == {"path": str(path.resolve()), "digest": file_digest(path),
                            "records": {"sha256": records_fingerprint(str(path), fields=("text",)), "fields": ["text"],
                                        "id_field": None, "max_docs": None}}


def test_an_unchanged_file_gives_the_labels_as_before_and_results_name_it(extracted: Extracted, tmp_path: Path) -> None:
    code, err, doc = _analyze(extracted, tmp_path / "default", "a", "b")
    assert code == 0, err
    probe = doc["settings"]["probe"]
    assert probe["labels_file"] == str(extracted.original.resolve())
    assert probe["labels_digest"] == file_digest(extracted.original)
    assert probe["classes"] == ["ham", "spam"] and probe["n_docs"] == N_DOCS
    code, err, given = _analyze(extracted, tmp_path / "given", "a", "b", "--labels", str(extracted.original))
    assert code == 0, err
    assert given["metrics"]["probe"] == doc["metrics"]["probe"]  # the same labels as the file passed explicitly
    assert given["settings"]["probe"]["labels_digest"] == probe["labels_digest"]


def test_a_line_prepended_after_extraction_is_refused_not_shifted(
    extracted: Extracted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(extracted.original.parent)  # where the relative source recorded for the corpus resolves
    text = extracted.original.read_text()
    try:
        extracted.original.write_text(json.dumps({"text": "a new first line", "label": "spam"}) + "\n" + text)
        code, err, _ = _analyze(extracted, tmp_path / "out", "a", "b")
    finally:
        extracted.original.write_text(text)
    assert code == 2, err  # not every label shifted by one line
    line = _error_line(err)
    assert str(extracted.original.resolve()) in line and "--labels" in line, err


def _rewritten(path: Path, edit: Any) -> str:
    """Rewrite the corpus file record by record through ``edit``; returns the text as it was."""
    text = path.read_text()
    path.write_text("".join(json.dumps(edit(json.loads(line))) + "\n" for line in text.splitlines()))
    return text


def test_labels_edited_after_extraction_are_read_as_edited(extracted: Extracted, tmp_path: Path) -> None:
    """Each record's id and text as extracted: the labels are the stored documents' (a pipeline re-run keeps both
    extractions through a label edit, and analysing them alone refused the file)."""
    text = _rewritten(extracted.original, lambda r: {**r, "label": {"ham": "neg", "spam": "pos"}[r["label"]], "new": 1})
    try:
        code, err, doc = _analyze(extracted, tmp_path / "out", "a", "b")
        digest = file_digest(extracted.original)
    finally:
        extracted.original.write_text(text)
    assert code == 0, err
    probe = doc["settings"]["probe"]
    assert probe["classes"] == ["neg", "pos"] and probe["n_docs"] == N_DOCS
    assert probe["labels_digest"] == digest != file_digest(extracted.original)  # the file as read, not as extracted


def test_a_pair_extracted_before_and_after_a_label_edit_reads_the_file_as_it_is(
    extracted: Extracted, tiny_models: Any, tmp_path: Path
) -> None:
    """A pipeline re-run extracts a new checkpoint after the labels were edited: both models read the same ids and
    texts of the same file, whose labels now are the ones to read (refused as files that differ before)."""
    from hrsa.extract.job import ExtractConfig, run_extraction

    text = _rewritten(extracted.original, lambda r: {**r, "label": {"ham": "neg", "spam": "pos"}[r["label"]]})
    try:
        run_extraction(ExtractConfig(store=extracted.store, model=str(tiny_models.dir("llama")),
                                     corpus=str(extracted.original), name="after-edit", text="text", workers=1))
        code, err, doc = _analyze(extracted, tmp_path / "out", "a", "after-edit")
    finally:
        extracted.original.write_text(text)
    assert code == 0, err
    assert doc["settings"]["probe"]["classes"] == ["neg", "pos"]
    code, err, _ = _analyze(extracted, tmp_path / "restored", "a", "after-edit")  # the labels as extracted by a
    assert code == 0, err


@pytest.mark.parametrize("edit", [
    pytest.param(lambda r: {**r, "text": r["text"].replace("fox", "cat")}, id="a text"),
    pytest.param(lambda r: {k: v for k, v in r.items() if k != "text"} if r["text"].endswith(" 3") else r,
                 id="a text gone"),
])
def test_a_text_edited_after_extraction_is_refused(extracted: Extracted, tmp_path: Path, edit: Any) -> None:
    text = _rewritten(extracted.original, edit)
    try:
        code, err, _ = _analyze(extracted, tmp_path / "out", "a", "b")
    finally:
        extracted.original.write_text(text)
    assert code == 2, err
    line = _error_line(err)
    assert str(extracted.original.resolve()) in line and "changed since" in line and "--labels" in line, err


def test_a_deleted_corpus_file_is_refused_in_one_line(extracted: Extracted, tmp_path: Path) -> None:
    moved = extracted.original.with_suffix(".moved")
    extracted.original.rename(moved)
    try:
        code, err, _ = _analyze(extracted, tmp_path / "out", "a", "b")
    finally:
        moved.rename(extracted.original)
    assert code == 2
    line = _error_line(err)
    assert str(extracted.original.resolve()) in line and "--labels" in line, err


def test_models_extracted_from_a_relabelled_copy_read_the_copy(extracted: Extracted, tmp_path: Path) -> None:
    code, err, doc = _analyze(extracted, tmp_path / "copy", "c", "d")
    assert code == 0, err
    probe = doc["settings"]["probe"]
    assert probe["classes"] == ["neg", "pos"]
    assert probe["labels_file"] == str(extracted.copy.resolve())
    assert probe["labels_digest"] == file_digest(extracted.copy)


def test_a_pair_from_two_differently_labelled_files_is_refused(extracted: Extracted, tmp_path: Path) -> None:
    code, err, _ = _analyze(extracted, tmp_path / "mixed", "a", "c")
    assert code == 2
    line = _error_line(err)
    assert str(extracted.original.resolve()) in line and str(extracted.copy.resolve()) in line
    assert "--labels" in line


def test_another_folder_holding_a_file_of_the_same_name_is_not_read(
    extracted: Extracted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _write_corpus(elsewhere / "mail.jsonl", ("x", "y"))  # unrelated labels under the relative name recorded
    monkeypatch.chdir(elsewhere)
    code, err, doc = _analyze(extracted, tmp_path / "out", "a", "b")
    assert code == 0, err
    assert doc["settings"]["probe"]["classes"] == ["ham", "spam"]
    assert doc["settings"]["probe"]["labels_file"] == str(extracted.original.resolve())


def test_a_corpus_named_through_a_symlink_reads_its_labels_by_the_ids_extraction_gave(
    extracted: Extracted, tiny_models: Any, tmp_path: Path
) -> None:
    """Records without an id are named FILE:LINE by the name extraction read them under (the link's): the recorded
    path was resolved to the target, whose name gave other ids, and no document found its label."""
    from hrsa.extract.job import ExtractConfig, run_extraction

    link = tmp_path / "link.jsonl"
    link.symlink_to(extracted.original)
    store = str(tmp_path / "store")
    for name in ("x", "y"):
        run_extraction(ExtractConfig(store=store, model=str(tiny_models.dir("llama")), corpus=str(link), name=name,
                                     text="text", workers=1))
    assert ActivationStore.open(store).model_info("x").extraction["corpus_file"]["path"] == str(link)
    code, err, doc = _analyze(Extracted(store, link, extracted.copy), tmp_path / "out", "x", "y")
    assert code == 0, err
    assert doc["settings"]["probe"]["classes"] == ["ham", "spam"] and doc["settings"]["probe"]["n_docs"] == N_DOCS


def test_a_corpus_file_changed_while_extraction_read_it_is_refused_before_anything_is_stored(
    extracted: Extracted, tiny_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's digest was taken when the model was created, after the read: a file rewritten in between was
    recorded as what was extracted, and its labels read against documents of the earlier texts."""
    import hrsa.extract.corpus as corpus_module
    from hrsa.extract.job import ExtractConfig, run_extraction
    from hrsa.store.records import CorpusError

    corpus = tmp_path / "mail.jsonl"
    corpus.write_text(extracted.original.read_text())
    real = corpus_module.load_records

    def rewritten_after_the_read(spec: Any) -> Any:
        records = list(real(spec))
        _rewritten(corpus, lambda r: {**r, "text": r["text"] + " edited"})
        return iter(records)

    monkeypatch.setattr(corpus_module, "load_records", rewritten_after_the_read)
    with pytest.raises(CorpusError, match="changed while"):
        run_extraction(ExtractConfig(store=str(tmp_path / "store"), model=str(tiny_models.dir("llama")),
                                     corpus=str(corpus), name="z", text="text", workers=1))
    assert not (tmp_path / "store").exists()
