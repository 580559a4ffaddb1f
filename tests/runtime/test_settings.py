"""A verb's settings: output paths checked at validation, every problem listed at once in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hrsa.runtime.settings import FilePath, FolderPath, Problems, parse_settings, validation_problems
from hrsa.store.errors import UserError


class Outputs(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    out: FolderPath = Path("out")
    report: FilePath = Path("report.html")


def test_an_output_folder_may_exist_or_not_but_not_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "existing").mkdir()
    assert Outputs(out=tmp_path / "existing").out == tmp_path / "existing"
    assert Outputs(out=tmp_path / "new" / "deeper").out == tmp_path / "new" / "deeper"  # created later, by the job
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(ValidationError) as error:
        Outputs(out=tmp_path / "file")
    assert validation_problems(error.value) == [
        f"out: expected a folder, got the file {str(tmp_path / 'file')!r}; name a folder (it is created if missing)"]
    assert (tmp_path / "file").read_text() == "keep me"


def test_an_output_file_may_exist_or_not_but_not_be_a_folder(tmp_path: Path) -> None:
    (tmp_path / "old.html").write_text("old")
    assert Outputs(report=tmp_path / "old.html").report == tmp_path / "old.html"  # overwritten later, by the job
    assert Outputs(report=tmp_path / "new.html").report == tmp_path / "new.html"
    with pytest.raises(ValidationError) as error:
        Outputs(report=tmp_path)
    assert validation_problems(error.value) == [
        f"report: expected a file name, got the folder {str(tmp_path)!r}; name a file inside it"]


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    """``corpus.jsonl/out``: the nearest existing parent is a file, so nothing could ever be written there (the job
    would compute, write into the store, and then fail on its first file)."""
    from hrsa.runtime.settings import StoreUrl

    class WithStore(Outputs):
        store: StoreUrl = "store"

    (tmp_path / "corpus.jsonl").write_text("keep me")
    under = tmp_path / "corpus.jsonl" / "sub" / "deeper"
    for field in ("out", "report", "store"):
        with pytest.raises(ValidationError) as error:
            WithStore(**{field: under if field != "store" else str(under)})
        assert validation_problems(error.value) == [
            f"{field}: expected a path inside folders, got {str(under)!r} under the file "
            f"{str(tmp_path / 'corpus.jsonl')!r}; name a path inside a folder"]
    assert WithStore(store="s3://bucket/store").store == "s3://bucket/store"  # a URL is checked when opened
    assert (tmp_path / "corpus.jsonl").read_text() == "keep me" and not (tmp_path / "sub").exists()


def test_parse_settings_reports_both_paths_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError) as error:
        parse_settings(Outputs, {"out": str(tmp_path / "file"), "report": str(tmp_path)}, verb="demo")
    message = str(error.value)
    assert message.startswith("Expected valid demo settings. Got 2 problem(s) instead: out: expected a folder")
    assert "; report: expected a file name" in message and "\n" not in message and message.endswith(".")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    size: int = 1


class Verb(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store_url: str = Field(description="where")
    n: int = 1
    sections: dict[str, Section] = {}
    names: tuple[str, ...] = ()

    @field_validator("n")
    @classmethod
    def _positive(cls, n: int) -> int:
        if n < 1:
            raise ValueError(f"expected a positive count, got {n}.")
        return n

    @field_validator("names")
    @classmethod
    def _names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        bad = [f"{i}: {name!r} is not lower case" for i, name in enumerate(names) if name != name.lower()]
        if bad:
            raise Problems(bad)
        return names

    @model_validator(mode="after")
    def _whole(self) -> Verb:
        if self.n > 5 and not self.sections:
            raise Problems(["sections: needed when n > 5", "n: or keep it at most 5"])
        return self


def problems(values: dict, **kw: bool) -> list[str]:
    with pytest.raises(ValidationError) as error:
        Verb.model_validate(values)
    return validation_problems(error.value, **kw)


def test_a_missing_field_reads_as_a_flag_or_as_a_field() -> None:
    assert problems({}) == ["--store-url is required (as a flag or in --config)"]
    assert problems({}, flags=False) == ["store_url is required"]


def test_nested_problems_name_their_place_in_both_forms() -> None:
    values = {"store_url": "s", "sections": {"a": {"size": 2, "sise": 3}}}
    expected = ["sections.a.path is required", "sections.a.sise: unknown field (a typo?)"]
    assert problems(values) == problems(values, flags=False) == expected


def test_value_errors_lose_pydantics_prefix_and_final_dot() -> None:
    assert problems({"store_url": "s", "n": 0}) == ["n: expected a positive count, got 0"]
    assert problems({"store_url": "s", "typo": 1}) == ["typo: unknown field (a typo?)"]


def test_problems_are_listed_one_by_one_under_their_location() -> None:
    assert problems({"store_url": "s", "names": ["ok", "Bad", "Worse"]}) == [
        "names.1: 'Bad' is not lower case", "names.2: 'Worse' is not lower case"]
    model_level = problems({"store_url": "s", "n": 6})
    assert model_level == ["sections: needed when n > 5", "n: or keep it at most 5"]


def test_every_problem_at_once() -> None:
    found = problems({"n": 0, "names": ["X"], "extra": True})
    assert found == ["--store-url is required (as a flag or in --config)", "n: expected a positive count, got 0",
                     "names.0: 'X' is not lower case", "extra: unknown field (a typo?)"]


def test_a_store_path_with_a_tilde_is_the_home_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """YAML does not expand ~ as a shell does: `store: ~/hrsa-store` in a config opened (or created) ./~/hrsa-store."""
    from hrsa.runtime.settings import StoreUrl

    class WithStore(Outputs):
        store: StoreUrl = "store"

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert WithStore(store="~/hrsa-store").store == str(tmp_path / "home" / "hrsa-store")
    assert WithStore(store="s3://bucket/~x").store == "s3://bucket/~x"  # a URL is as written
