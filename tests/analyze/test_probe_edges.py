"""Probes at the edges of their labels: empty cells, labels for a few documents, a selection of one class, too few
documents to split, hidden states that are not there. Each gave a result (or a traceback) without a word."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from hrsa.analyze.local.probe import ProbeCoverageWarning, check_probe, probe_pair, read_labels
from hrsa.store.errors import UserError
from hrsa.store.records import read_records
from hrsa.store.selection import TokenSelection


def _csv(path: Path, rows: list[tuple[str, str]]) -> str:
    path.write_text("id,label\n" + "".join(f"{i},{v}\n" for i, v in rows))
    return str(path)


def test_an_empty_csv_cell_is_a_missing_label_not_a_class_named_nan(labelled_store, tmp_path: Path) -> None:
    """pandas reads an empty cell as NaN; str(NaN) made a third class "nan" of the unlabelled documents."""
    store, _, labels = labelled_store
    rows = [(f"rec-{i}", "" if i % 7 == 0 else v) for i, v in enumerate(labels)]
    with pytest.warns(ProbeCoverageWarning, match=r"labels for 342 of the 400 documents"):
        res = probe_pair(store, "a", "c", label_field="label", labels_file=_csv(tmp_path / "l.csv", rows),
                         hidden_states=[1])
    assert res.classes == ("ham", "spam") and res.n_docs == 400 - 58


def test_a_json_null_or_nan_label_is_missing(labelled_store, tmp_path: Path) -> None:
    store, _, labels = labelled_store
    source = tmp_path / "l.jsonl"
    source.write_text("".join(json.dumps({"id": f"rec-{i}", "label": None if i == 3 else float("nan") if i == 4 else v})
                              + "\n" for i, v in enumerate(labels)))
    got = read_labels(store, store.model_info("a").corpus, label_field="label", labels_file=str(source))
    assert got[3] is None and got[4] is None and got[5] == labels[5]


def test_csv_integers_with_a_missing_cell_stay_integers(tmp_path: Path) -> None:
    """A numeric column with one empty cell was read as float: ids 12 -> "12.0" (no longer matching the corpus's),
    labels 0/1 -> "0.0"/"1.0". pandas' missing tokens (NA, null, NaN) are missing, as an empty cell; floats stay
    numbers."""
    path = tmp_path / "r.csv"
    path.write_text("id,label,text,score\n10,0,a,0.5\n11,,b,NaN\n,1,x,\n12,NA,y,1.5\n")
    records = list(read_records(str(path)))
    assert [r["_id"] for r in records] == ["10", "11", "r.csv:2", "12"]
    assert [r["label"] for r in records] == [0, None, 1, None] and [r["score"] for r in records] == [0.5, None, None, 1.5]


def test_labels_for_a_few_documents_warn_with_the_count(labelled_store, tmp_path: Path) -> None:
    store, _, labels = labelled_store
    rows = [(f"rec-{i}", v) for i, v in enumerate(labels) if i % 10 == 0]
    with pytest.warns(ProbeCoverageWarning, match=r"^Probe: labels for 40 of the 400 documents .*; the other 360 are "
                                                  r"left out\. Check --labels and --id-field"):
        probe_pair(store, "a", "c", label_field="label", labels_file=_csv(tmp_path / "l.csv", rows), hidden_states=[1])


def test_every_document_labelled_gives_no_warning(labelled_store) -> None:
    store, _, _ = labelled_store
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe_pair(store, "a", "c", label_field="label", hidden_states=[1])


def test_a_selection_of_one_class_is_refused_before_any_pass(labelled_store) -> None:
    """The two-class check ran over the whole corpus, so a --docs selection of one class reached scikit-learn and
    ended in a ValueError traceback (exit 1), after the streaming passes."""
    store, _, labels = labelled_store
    hams = [i for i, v in enumerate(labels) if v == "ham"][:30]
    selection = TokenSelection(docs=tuple(hams))
    with pytest.raises(UserError, match=r"^Expected at least two values of 'label' among the 30 labelled documents "
                                        r"selected\. Got \['ham'\] instead\. Select documents of two classes"):
        check_probe(store, "a", "c", selection=selection, memory_budget="1GB", label_field="label")


def test_too_few_documents_to_split_are_refused(labelled_store) -> None:
    """Four documents gave empty dev and test splits: nan scores and 'function not measured', without a why."""
    store, _, labels = labelled_store
    two = [next(i for i, v in enumerate(labels) if v == c) for c in ("ham", "spam")]
    selection = TokenSelection(docs=tuple(two))
    with pytest.raises(UserError, match=r"^Expected enough labelled documents for a test split\. Got 2 \(train 2, "
                                        r"dev 0, test 0\) instead\. Select more documents"):
        check_probe(store, "a", "c", selection=selection, memory_budget="1GB", label_field="label")


def test_a_hidden_state_not_stored_is_refused_naming_the_shared_ones(labelled_store) -> None:
    store, _, _ = labelled_store
    with pytest.raises(UserError, match=r"^Expected hidden states shared by a and c \(0, 1; from the end -2, -1\)\. "
                                        r"Got 5 instead\. Pick --hidden-states among them"):
        check_probe(store, "a", "c", selection=None, memory_budget="1GB", label_field="label", hidden_states=(0, 5))


def test_labels_matching_no_document_show_both_kinds_of_ids(labelled_store, tmp_path: Path) -> None:
    """A CSV read by an older hrsa gave ids such as "12.0"; a labels file of other ids said only "Check
    --label-field": the ids on both sides say which it is."""
    store, _, labels = labelled_store
    path = _csv(tmp_path / "l.csv", [(f"{i}.0", v) for i, v in enumerate(labels)])
    with pytest.raises(UserError, match=r"\(such as \['rec-0', 'rec-1'\]\)\. Got none \(the file's ids are such as "
                                        r"\['0\.0', '1\.0'\]\)"):
        read_labels(store, store.model_info("a").corpus, label_field="label", labels_file=path)


def _jsonl(path: Path, labels: list[object]) -> str:
    path.write_text("".join(json.dumps({"id": f"rec-{i}", "label": v}) + "\n" for i, v in enumerate(labels)))
    return str(path)


def test_integral_floats_and_integers_are_one_class(labelled_store, tmp_path: Path) -> None:
    """Each label became a class by its str(): 1 and 1.0 were classes "1" and "1.0", a silent 4-class probe."""
    store, _, labels = labelled_store
    numbers = [(1 if v == "spam" else 0) + (0.0 if i % 2 else 0) for i, v in enumerate(labels)]  # 1, 1.0, 0, 0.0
    assert {type(v) for v in numbers} == {int, float}
    res = probe_pair(store, "a", "c", label_field="label", labels_file=_jsonl(tmp_path / "l.jsonl", numbers),
                     hidden_states=[1], selection=TokenSelection(exclude_special=True))
    assert res.classes == ("0", "1") and res.n_docs == 400
    assert res.a_to_b[1].source.test.accuracy > 0.85  # the same two classes as ham/spam


def test_non_integral_floats_and_booleans_of_one_kind_are_classes(labelled_store, tmp_path: Path) -> None:
    store, _, labels = labelled_store
    for values, classes in (({"ham": 0.5, "spam": 2.0}, ("0.5", "2")),
                            ({"ham": False, "spam": True}, ("False", "True"))):
        path = _jsonl(tmp_path / "l.jsonl", [values[v] for v in labels])
        res = probe_pair(store, "a", "c", label_field="label", labels_file=path, hidden_states=[1])
        assert res.classes == classes


@pytest.mark.parametrize(("ham", "spam", "kinds"), [
    (1, "1", ("a number", "a string")), (1.0, "spam", ("a number", "a string")), (True, 1, ("a boolean", "a number")),
    ("true", True, ("a string", "a boolean")),
])
def test_labels_of_mixed_kinds_are_refused_before_any_pass(labelled_store, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, ham: object, spam: object,
                                                           kinds: tuple[str, str]) -> None:
    """1, "1", 1.0 and true were four classes (str of each): a file mixing kinds is refused, naming two values."""
    store, _, labels = labelled_store
    values = [ham if v == "ham" else spam for v in labels]
    path = _jsonl(tmp_path / "l.jsonl", values)
    monkeypatch.setattr(type(store), "hidden_state", lambda *a, **k: pytest.fail("a hidden state was read"))
    with pytest.raises(UserError) as refused:
        check_probe(store, "a", "c", selection=None, memory_budget="1GB", label_field="label", labels_file=path)
    ham_first = labels[0] == "ham"  # the file's first value is named first
    (a, b), (kind_a, kind_b) = ((ham, spam), kinds) if ham_first else ((spam, ham), kinds[::-1])
    assert str(refused.value) == (f"Expected the labels of 'label' in {path} to be of one type. Got {a!r} ({kind_a}) "
                                  f"and {b!r} ({kind_b}) instead. Make the labels one type (e.g. all strings).")


def test_a_record_id_labelled_true_then_1_is_refused_as_mixed_kinds(labelled_store, tmp_path: Path) -> None:
    """True == 1 in Python: a second record of the same id labelled 1 passed as the same label."""
    store, _, labels = labelled_store
    path = Path(_jsonl(tmp_path / "l.jsonl", [v == "spam" for v in labels]))
    with path.open("a") as f:
        f.write(json.dumps({"id": "rec-0", "label": int(labels[0] == "spam")}) + "\n")
    with pytest.raises(UserError, match=r"\(a boolean\) and [01] \(a number\)"):
        read_labels(store, store.model_info("a").corpus, label_field="label", labels_file=str(path))


def test_a_csv_column_is_one_kind_whatever_its_cells_look_like(labelled_store, tmp_path: Path) -> None:
    """pandas reads a CSV column as one type: cells "1" and "x" are both strings (not refused as mixed); a column of
    0.0/1.0 is numbers, the same classes as 0/1."""
    store, _, labels = labelled_store
    for cells, classes in ((("x", "1"), ("1", "x")), (("0.0", "1.0"), ("0", "1")),
                           (("false", "true"), ("False", "True"))):
        rows = [(f"rec-{i}", cells[v == "spam"]) for i, v in enumerate(labels)]
        res = probe_pair(store, "a", "c", label_field="label", labels_file=_csv(tmp_path / "l.csv", rows),
                         hidden_states=[1])
        assert res.classes == classes


def _pipeline_keys(field: str) -> str:
    return f"pairs.0.{field}"


@pytest.mark.parametrize(("names", "fix"), [(None, "--label-field"), (_pipeline_keys, "pairs.0.label_field")],
                         ids=["hrsa-analyze", "pipeline"])
def test_a_label_field_of_one_value_names_the_setting_as_the_caller_does(labelled_store, tmp_path: Path, names,
                                                                          fix: str) -> None:
    """A pipeline has no flags: its messages named `hrsa analyze`'s (--label-field), not the YAML key to change."""
    store, _, labels = labelled_store
    path = _csv(tmp_path / "l.csv", [(f"rec-{i}", "ham") for i in range(len(labels))])
    given = {} if names is None else {"names": names}
    with pytest.raises(UserError, match=rf"Got \['ham'\] instead\. Pick another {fix}\.$"):
        check_probe(store, "a", "c", selection=None, memory_budget="1GB", label_field="label", labels_file=path,
                    **given)


def test_every_probe_message_names_the_pipelines_keys(labelled_store, tmp_path: Path) -> None:
    store, _, labels = labelled_store
    keys = {"names": _pipeline_keys}
    with pytest.raises(UserError, match=r"Pick pairs\.0\.hidden_states among them\.$"):
        check_probe(store, "a", "c", selection=None, memory_budget="1GB", label_field="label", hidden_states=(5,),
                    **keys)
    hams = TokenSelection(docs=tuple(i for i, v in enumerate(labels) if v == "ham"))
    with pytest.raises(UserError, match=r"Select documents of two classes \(pairs\.0\.docs, the token filters\)\.$"):
        check_probe(store, "a", "c", selection=hams, memory_budget="1GB", label_field="label", **keys)
    with pytest.raises(UserError, match=r"Check pairs\.0\.label_field, pairs\.0\.labels and pairs\.0\.id_field\.$"):
        check_probe(store, "a", "c", selection=None, memory_budget="1GB", label_field="nope", **keys)
    twice = _csv(tmp_path / "twice.csv", [("rec-1", "ham"), ("rec-1", "spam")])
    with pytest.raises(UserError, match=r"\(pairs\.0\.id_field names a unique field\)\.$"):
        check_probe(store, "a", "c", selection=None, memory_budget="1GB", label_field="label", labels_file=twice,
                    **keys)
    few = _csv(tmp_path / "few.csv", [(f"rec-{i}", v) for i, v in enumerate(labels) if i % 10 == 0])
    with pytest.warns(ProbeCoverageWarning, match=r"Check pairs\.0\.labels and pairs\.0\.id_field if"):
        probe_pair(store, "a", "c", label_field="label", labels_file=few, hidden_states=[1], **keys)
