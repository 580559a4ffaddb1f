"""One rule for a run's checkpoints: ``step_N`` folders holding the marker file, by step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hrsa.runtime.locations import parse_location
from hrsa.train.checkpoints import (INFO_FILE, Checkpoint, checkpoint_step, file_manifest, list_checkpoints,
                                    manifest_complete, resume_folder, step_folder_name, step_folders)


def _folder(run: Path, name: str, *files: str) -> Path:
    folder = run / name
    folder.mkdir(parents=True)
    for file in files:
        (folder / file).write_text("{}")
    return folder


def test_only_complete_step_folders_in_step_order(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ten = _folder(run, "step_000010", INFO_FILE, "config.json", "model.safetensors")  # written before manifests
    two = _folder(run, "step_2", "config.json", "model.safetensors")
    (two / INFO_FILE).write_text(json.dumps({"step": 2, "files": file_manifest(two)}))
    _folder(run, "step_000012", "config.json")  # still being written: no hrsa_train.json yet
    _folder(run, "step_000014", INFO_FILE, "config.json")  # written before manifests, and no weights
    _folder(run, "step_x", INFO_FILE)
    _folder(run, "checkpoint-5", INFO_FILE)
    (run / "step_000020").write_text("a file, not a folder")
    assert list_checkpoints(run) == [Checkpoint(str(two), 2), Checkpoint(str(ten), 10)]
    assert list_checkpoints(run)[0].path == two
    assert [c.step for c in list_checkpoints(run, marker="config.json")] == [2, 10, 12, 14]
    assert list_checkpoints(tmp_path / "missing") == []


def test_step_folder_name_and_step() -> None:
    assert step_folder_name(100) == "step_000100"
    assert step_folder_name(1234567) == "step_1234567"


def test_checkpoint_step_prefers_the_info_file(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "step_000100")
    assert checkpoint_step(folder) == 100
    (folder / INFO_FILE).write_text(json.dumps({"step": 99, "loss": 1.0}))
    assert checkpoint_step(folder) == 99


def test_checkpoint_step_of_a_folder_not_named_by_step_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Expected a checkpoint folder named step_N"):
        checkpoint_step(_folder(tmp_path, "final_7x"))
    assert checkpoint_step(_folder(tmp_path, "step_7")) == 7


def test_a_checkpoint_is_complete_only_when_every_listed_file_is_there_at_its_size(tmp_path: Path) -> None:
    """Ray copies a checkpoint file by file, in no set order: hrsa_train.json may land before the weights."""
    written = _folder(tmp_path / "written", "step_000004", "config.json")
    (written / "model.safetensors").write_bytes(b"w" * 1000)
    (written / INFO_FILE).write_text(json.dumps({"step": 4, "loss": 1.0, "files": file_manifest(written)}))
    run = tmp_path / "run"
    copying = _folder(run, "step_000004")
    (copying / INFO_FILE).write_text((written / INFO_FILE).read_text())  # the info file came first
    (copying / "config.json").write_text("{}")
    assert list_checkpoints(run) == [] and step_folders(run) == [str(copying)]
    (copying / "model.safetensors").write_bytes(b"w" * 500)  # half the weights
    assert list_checkpoints(run) == []
    # By sizes alone too (an object store's listing, or a caller that checks what it reads): a short file is a copy
    # under way, never complete because its name is there.
    assert list_checkpoints(run, contents=False) == []
    (copying / "model.safetensors").write_bytes(b"w" * 1000)
    assert list_checkpoints(run) == [Checkpoint(str(copying), 4)]
    (copying / INFO_FILE).write_text('{"step": 4, "lo')  # the info file half copied
    assert list_checkpoints(run) == []


def test_a_checkpoint_whose_content_differs_from_its_manifest_is_not_complete(tmp_path: Path) -> None:
    """Sizes alone passed a checkpoint whose weights were overwritten in place at the same size: training resumed from
    it, and a pipeline counted its training stage up to date, the damaged weights extracted and analysed as the step's."""
    run = tmp_path / "run"
    for step in (2, 4):
        folder = _folder(run, step_folder_name(step), "config.json")
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
        (folder / INFO_FILE).write_text(json.dumps({"step": step, "files": file_manifest(folder)}))
    assert [c.step for c in list_checkpoints(run)] == [2, 4]
    weights = run / step_folder_name(4) / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[100:104] = b"\xff\xff\xff\xff"
    weights.write_bytes(bytes(damaged))  # the same size
    assert [c.step for c in list_checkpoints(run)] == [2]
    assert resume_folder(parse_location(run)) == step_folder_name(2)  # recomputed from there, as after a kill
    assert [c.step for c in list_checkpoints(run, marker="config.json")] == [2, 4]  # hrsa eval's any-model-folder rule
    assert [c.step for c in list_checkpoints(run, contents=False)] == [2, 4]  # sizes alone: what this call wrote


def test_resume_checks_the_optimizer_state_too_newest_first(tmp_path: Path) -> None:
    """The model's files decide what a pipeline extracts; a resume also reads trainer_state.pt: a damaged one is not
    resumed from. Checked newest first, so the older checkpoints are not read."""
    run = tmp_path / "run"
    for step in (2, 4):
        folder = _folder(run, step_folder_name(step), "config.json")
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
        (folder / "trainer_state.pt").write_bytes(bytes(range(256)) * 2)
        (folder / INFO_FILE).write_text(json.dumps({"step": step, "files": file_manifest(folder)}))
    state = run / step_folder_name(4) / "trainer_state.pt"
    state.write_bytes(bytes(reversed(range(256))) * 2)  # the same size
    assert [c.step for c in list_checkpoints(run)] == [2, 4]  # its model is whole
    assert resume_folder(parse_location(run)) == step_folder_name(2)
    state.write_bytes(bytes(range(256)))  # cut short: its size tells, with no digest asked of it
    assert manifest_complete(run / step_folder_name(4)) is False
    assert resume_folder(parse_location(run)) == step_folder_name(2)


@pytest.mark.integration
def test_checkpoints_on_s3_are_listed_and_checked_through_its_filesystem(s3_endpoint: str, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An object store (moto) holds a half-uploaded checkpoint as a local disk does: listed, but not complete."""
    import uuid

    from hrsa.runtime.locations import parse_location

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    written = _folder(tmp_path, "step_000004", "config.json")
    (written / "model.safetensors").write_bytes(b"w" * 1000)
    info = json.dumps({"step": 4, "loss": 1.0, "files": file_manifest(written)})
    run = parse_location(f"s3://hrsa-test/checkpoints-{uuid.uuid4().hex[:8]}/run")
    step = run.child("step_000004")
    step.child(INFO_FILE).write(info)
    step.child("config.json").write("{}")
    assert list_checkpoints(run.url) == [] and step_folders(run.url) == [step.url]
    step.child("model.safetensors").write(b"w" * 1000)
    assert list_checkpoints(run.url) == [Checkpoint(step.url, 4)] and checkpoint_step(step.url) == 4
    with pytest.raises(ValueError, match="Expected a local path"):
        _ = list_checkpoints(run.url)[0].path
