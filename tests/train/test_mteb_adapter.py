"""mteb's local tasks as hrsa builds them: a classification file's labels are classes by the probes' rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hrsa.store.errors import UserError


def write_labels(path: Path, labels: list[object]) -> Path:
    path.write_text("".join(json.dumps({"text": f"text {i}", "label": v}) + "\n" for i, v in enumerate(labels)))
    return path


def classes_of(path: Path) -> list[int]:
    from hrsa.train.mteb_adapter import LocalClassificationTask

    task = LocalClassificationTask(path, name="local-classification")
    task.load_data()
    return sorted({*task.dataset["train"]["label"], *task.dataset["test"]["label"]})


def test_an_integral_float_is_the_class_of_its_integer(tmp_path: Path) -> None:
    """1 and 1.0 (JSON writes a float column's 1 as 1.0) were classes "1" and "1.0": four classes of two labels."""
    path = write_labels(tmp_path / "labels.jsonl", [1, 1.0, 1, 1.0, 2, 2.0, 2, 2.0])
    assert classes_of(path) == [0, 1]


@pytest.mark.parametrize(("labels", "got"), [([1, "1", 1, "1"], "Got 1 (a number) and '1' (a string) instead"),
                                             ([True, 1, False, 0], "Got True (a boolean) and 1 (a number) instead")])
def test_labels_of_mixed_kinds_are_refused_in_one_line(tmp_path: Path, labels: list[object], got: str) -> None:
    """The probes' rule (hrsa.store.labels): 1 and "1" were one class "1", true and 1 two classes, silently."""
    path = write_labels(tmp_path / "labels.jsonl", labels)
    with pytest.raises(UserError) as info:
        classes_of(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"Expected the labels of 'label' in {path} to be of one type. ")
    assert f"{got}. Make the labels one type (e.g. all strings)." in message


def test_a_retrieval_corpus_holds_every_pos_and_neg_once(tmp_path: Path) -> None:
    """The documents ranked are every distinct pos and neg text (the negatives are what makes the task hard); each
    query's relevant ones are its positives only."""
    from hrsa.train.mteb_adapter import LocalRetrievalTask

    rows = [{"query": "q1", "pos": "a", "negs": ["x", "y"]}, {"query": "q2", "pos": "b", "negs": ["x", "a"]},
            {"query": "q3", "pos": "c"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = LocalRetrievalTask(path, name="local-retrieval-pairs")
    task.load_data()
    split = task.dataset["default"]["test"]
    text_of = {d["id"]: d["text"] for d in split["corpus"]}
    assert sorted(text_of.values()) == ["a", "b", "c", "x", "y"]
    queries = {q["id"]: q["text"] for q in split["queries"]}
    relevant = {queries[q]: sorted(text_of[d] for d, score in docs.items() if score > 0)
                for q, docs in split["relevant_docs"].items()}
    assert relevant == {"q1": ["a"], "q2": ["b"], "q3": ["c"]}


def test_classification_halves_keep_each_text_with_its_label(tmp_path: Path) -> None:
    """Every record in exactly one half with its own label; each label in both halves, the train half the larger
    (3 of 5, 2 of 3, 1 of 2)."""
    labels = ["spam"] * 5 + ["ham"] * 3 + ["eggs"] * 2
    order = [3, 8, 0, 5, 9, 1, 6, 2, 7, 4]  # labels interleaved in the file
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i}", "label": labels[i]}) + "\n" for i in order))
    from hrsa.train.mteb_adapter import LocalClassificationTask

    task = LocalClassificationTask(path, name="local-classification", seed=4)
    task.load_data()
    names = sorted(set(labels))
    halves = {}
    for split in ("train", "test"):
        pairs = list(zip(task.dataset[split]["text"], task.dataset[split]["label"]))
        assert all(names[label] == labels[int(text.split()[1])] for text, label in pairs), pairs
        halves[split] = [text for text, _ in pairs]
    assert sorted(halves["train"] + halves["test"]) == sorted(f"text {i}" for i in range(10))
    counts = {split: {n: sum(labels[int(t.split()[1])] == n for t in texts) for n in names}
              for split, texts in halves.items()}
    assert counts == {"train": {"eggs": 1, "ham": 2, "spam": 3}, "test": {"eggs": 1, "ham": 1, "spam": 2}}
