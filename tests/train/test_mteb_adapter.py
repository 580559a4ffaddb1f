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
