"""Local paths and URLs as one kind of folder: the same reads, writes and listings on a local disk and on S3 (moto)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hrsa.runtime.locations import Location, LocationError, is_url, parse_location


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def folder(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Location]:
    if request.param == "local":
        yield parse_location(tmp_path / "run")
        return
    endpoint = request.getfixturevalue("s3_endpoint")
    patch = pytest.MonkeyPatch()
    patch.setenv("AWS_ENDPOINT_URL", endpoint)  # pyarrow reads the endpoint from the environment, as on a cluster
    yield parse_location(f"s3://hrsa-test/locations-{uuid.uuid4().hex[:8]}/run")
    patch.undo()


def test_write_read_list_and_delete(folder: Location) -> None:
    assert folder.kind() is None and folder.files() == {} and folder.folders() == []
    folder.child("step_000002", "config.json").write('{"a": 1}')
    folder.child("step_000001/weights.bin").write(b"\0" * 10)
    folder.child("hrsa_recipe.json").write("{}")
    assert folder.kind() == "folder" and folder.child("hrsa_recipe.json").kind() == "file"
    assert folder.files() == {"hrsa_recipe.json": 2, "step_000001/weights.bin": 10, "step_000002/config.json": 8}
    assert [f.name for f in folder.folders()] == ["step_000001", "step_000002"]
    assert folder.child("step_000002/config.json").read_text() == '{"a": 1}'
    folder.child("hrsa_recipe.json").write("[1]")  # replaced whole
    assert folder.child("hrsa_recipe.json").read_bytes() == b"[1]"
    folder.child("hrsa_recipe.json").delete()
    assert folder.child("hrsa_recipe.json").kind() is None
    assert folder.child("hrsa_recipe.json").files() == {}  # a file, or nothing: not a folder


def test_names_urls_and_parents(folder: Location) -> None:
    step = folder.child("step_000004")
    assert step.url == f"{folder.url}/step_000004" and step.name == "step_000004" and step.parent == folder
    assert parse_location(step.url) == step


def test_a_local_path_is_made_absolute_and_stays_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    local = parse_location("runs/a")
    assert local.is_local and local.url == str(tmp_path / "runs" / "a")
    assert local.as_path_or_url() == tmp_path / "runs" / "a"
    assert parse_location(f"file://{tmp_path}/b") == parse_location(tmp_path / "b")
    assert is_url("s3://b/x") and not is_url("runs/a") and not is_url(Path("s3:/x"))


@pytest.mark.integration
def test_a_remote_location_is_a_url_and_has_no_local_path(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    remote = parse_location("s3://hrsa-test/runs/a/")
    assert not remote.is_local and remote.url == "s3://hrsa-test/runs/a" and remote.path == "hrsa-test/runs/a"
    assert remote.as_path_or_url() == "s3://hrsa-test/runs/a"
    with pytest.raises(LocationError, match="Expected a local path. Got s3://hrsa-test/runs/a instead"):
        remote.local_path()


@pytest.mark.parametrize("url", ["nosuch://bucket/x", "s3://hrsa-test/x?endpoint_override=localhost:1"])
def test_a_url_that_names_no_usable_filesystem_is_one_clear_error(url: str) -> None:
    with pytest.raises(LocationError, match=r"^Expected (a local path or a URL|a URL without options)"):
        parse_location(url)
