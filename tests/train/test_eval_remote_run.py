"""``hrsa eval --model s3://bucket/run``: a training run on object storage (where the README sends cluster runs) is
evaluated as a local one is: every complete checkpoint in step order, a curve, incomplete ones skipped with the same
note, ``--steps``, scores reused by the checkpoints' content (a checkpoint re-written at the same URL is scored
again); and a URL that is neither a model nor a run is one line naming it, exit code 2, nothing written."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hrsa.train.checkpoints import INFO_FILE, STATE_FILE, file_manifest
from hrsa.train.recipe import RECIPE_FILE

pytestmark = pytest.mark.integration


def _pairs(path: Path, n: int = 8) -> Path:
    lines = (json.dumps({"query": f"fox {i}", "pos": f"the lazy dog {i} " * 3}) for i in range(n))
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _checkpoint(source: Path, folder: Path, step: int) -> Path:
    """A checkpoint as `hrsa train` writes it: the model folder, trainer_state.pt and the manifest, written last."""
    shutil.copytree(source, folder)
    (folder / STATE_FILE).write_bytes(b"optimizer state")
    (folder / INFO_FILE).write_text(json.dumps({"step": step, "loss": 1.0, "files": file_manifest(folder)}))
    return folder


def _retrained(folder: Path) -> None:
    """Other weights in a checkpoint folder (a run trained again into the same output), and its manifest anew."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    (folder / INFO_FILE).unlink()
    (folder / INFO_FILE).write_text(json.dumps({"step": 2, "loss": 1.0, "files": file_manifest(folder)}))


def _upload(local: Path, url: str) -> str:
    """The files of a local folder, below ``url`` (the manifests last, as the trainer writes them)."""
    from hrsa.runtime.locations import parse_location

    remote = parse_location(url)
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == INFO_FILE)
    for file in files:
        remote.child(file.relative_to(local).as_posix()).write(file.read_bytes())
    return remote.url


def _local_run(tmp_path: Path, tiny_models) -> Path:
    """A run of hrsa train: steps 1 and 2 complete, step 3 still being copied (no manifest yet), and its recipe."""
    run = tmp_path / "run"
    for step in (1, 2):
        _checkpoint(tiny_models.dir("bert"), run / f"step_{step:06d}", step)
    shutil.copytree(tiny_models.dir("bert"), run / "step_000003")
    (run / RECIPE_FILE).write_text("{}")
    return run


@pytest.fixture
def s3(s3_endpoint: str, tmp_path: Path, monkeypatch) -> str:
    """A fresh prefix of the test bucket, with the environment a run's reader has."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("HRSA_CACHE", str(tmp_path / "cache"))
    return f"s3://hrsa-test/runs-{uuid.uuid4().hex[:8]}"


def _eval(eval_cli: click.Group, model: str, pairs: Path, out: Path, *extra: str):
    args = ["eval", "--model", model, "--tasks", f"retrieval:{pairs}", "--no-instructions", "--out", str(out), *extra]
    return CliRunner().invoke(eval_cli, args)


def _one_line_exit_2(result) -> str:
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "eval.json").read_text())["checkpoints"]


def test_an_s3_run_is_evaluated_as_a_local_run_is(eval_cli: click.Group, tmp_path: Path, tiny_models, s3: str) -> None:
    """It was taken as one model and refused ("Expected a model folder holding config.json")."""
    local = _local_run(tmp_path, tiny_models)
    run = _upload(local, f"{s3}/run")
    pairs = _pairs(tmp_path / "pairs.jsonl")

    result = _eval(eval_cli, run, pairs, tmp_path / "remote")
    assert result.exit_code == 0, result.output
    assert (f"skipped step_000003: {run}/step_000003 is incomplete: it has no {INFO_FILE}, which hrsa train writes last"
            in result.output)
    remote_rows = _rows(tmp_path / "remote")
    assert [(r["step"], r["name"], r["model"]) for r in remote_rows] == [
        (1, "step_000001", f"{run}/step_000001"), (2, "step_000002", f"{run}/step_000002")]
    assert (tmp_path / "remote" / "eval_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same shape and scores as the run evaluated where it was trained
    assert _eval(eval_cli, str(local), pairs, tmp_path / "local").exit_code == 0
    local_rows = _rows(tmp_path / "local")
    assert [sorted(r) for r in remote_rows] == [sorted(r) for r in local_rows]
    assert [r["results"] for r in remote_rows] == [r["results"] for r in local_rows]


def test_steps_of_an_s3_run(eval_cli: click.Group, tmp_path: Path, tiny_models, s3: str) -> None:
    run = _upload(_local_run(tmp_path, tiny_models), f"{s3}/run")
    pairs = _pairs(tmp_path / "pairs.jsonl")
    result = _eval(eval_cli, run, pairs, tmp_path / "ev", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in _rows(tmp_path / "ev")] == [2]

    # an incomplete step asked for, or one the run does not have: one line, nothing written
    out = tmp_path / "none"
    line = _one_line_exit_2(_eval(eval_cli, run, pairs, out, "--steps", "3"))
    assert f"Got {run}/step_000003 is incomplete: it has no {INFO_FILE}" in line
    assert "Got none for [7]" in _one_line_exit_2(_eval(eval_cli, run, pairs, out, "--steps", "7"))
    assert not out.exists()


def test_an_s3_checkpoint_overwritten_at_the_same_size_is_skipped_as_a_local_one_is(
        eval_cli: click.Group, tmp_path: Path, tiny_models, s3: str) -> None:
    """Its listing's sizes match the manifest; the digests of the copy eval loads do not: skipped with the note of a
    local checkpoint whose digests do not match, not scored, and not the end of the whole run's evaluation."""
    from hrsa.runtime.locations import parse_location

    local = _local_run(tmp_path, tiny_models)
    shutil.rmtree(local / "step_000003")
    run = _upload(local, f"{s3}/run")
    weights = local / "step_000002" / "model.safetensors"
    manifest = (local / "step_000002" / INFO_FILE).read_text()
    _retrained(local / "step_000002")  # other weights of the same size, the old manifest kept
    parse_location(f"{run}/step_000002/model.safetensors").write(weights.read_bytes())
    assert json.loads(manifest)["files"]["model.safetensors"]["size"] == weights.stat().st_size

    result = _eval(eval_cli, run, _pairs(tmp_path / "pairs.jsonl"), tmp_path / "ev")
    assert result.exit_code == 0, result.output
    assert f"skipped step_000002: {run}/step_000002 is incomplete by its {INFO_FILE}" in result.output
    assert [r["step"] for r in _rows(tmp_path / "ev")] == [1]


def test_a_rerun_reuses_scores_by_content_and_scores_a_rewritten_checkpoint_again(
        eval_cli: click.Group, tmp_path: Path, tiny_models, s3: str, monkeypatch) -> None:
    """Scores are keyed by the digest of the checkpoint's files (the copy loaded here), not by its URL: a re-run loads
    nothing, and a checkpoint trained anew at the same URL is scored again, its neighbour's score reused."""
    from hrsa.extract.identity import model_digest
    from hrsa.train.encode import TextEncoder

    local = _local_run(tmp_path, tiny_models)
    shutil.rmtree(local / "step_000003")
    run = _upload(local, f"{s3}/run")
    pairs, out = _pairs(tmp_path / "pairs.jsonl"), tmp_path / "ev"
    loads: list[str] = []
    real_load = TextEncoder.load.__func__
    monkeypatch.setattr(TextEncoder, "load", classmethod(lambda cls, model, **kw: loads.append(model)
                                                         or real_load(cls, model, **kw)))

    assert _eval(eval_cli, run, pairs, out).exit_code == 0
    first = _rows(out)
    assert loads == [f"{run}/step_000001", f"{run}/step_000002"]
    assert first[0]["model_digest"] == first[1]["model_digest"]  # the same weights at two URLs: one digest

    result = _eval(eval_cli, run, pairs, out)
    assert result.exit_code == 0, result.output
    assert len(loads) == 2 and "reused from eval.json" in result.output
    assert _rows(out) == first

    _retrained(local / "step_000002")  # trained again into the same output: other weights at the same URL
    _upload(local / "step_000002", f"{run}/step_000002")
    assert model_digest(f"{run}/step_000002") != first[1]["model_digest"]
    assert _eval(eval_cli, run, pairs, out).exit_code == 0
    again = _rows(out)
    assert loads[2:] == [f"{run}/step_000002"]
    assert again[0] == first[0] and again[1]["model_digest"] != first[1]["model_digest"]
    key = "local-retrieval-pairs"
    assert again[1]["results"][key]["main_score"] != first[1]["results"][key]["main_score"]


@pytest.mark.parametrize("what", ["missing", "empty", "other files"])
def test_an_s3_url_that_is_neither_a_model_nor_a_run_is_one_line(eval_cli: click.Group, tmp_path: Path, s3: str,
                                                                 what: str) -> None:
    from hrsa.runtime.locations import parse_location

    url = f"{s3}/nothing"
    if what == "empty":  # the marker object a console's "create folder" leaves
        folder = parse_location(url)
        folder.filesystem.create_dir(folder.path)
    elif what == "other files":
        parse_location(url).child("notes.txt").write("not a model")
        parse_location(url).child("logs", "step_1.txt").write("not a checkpoint")
    out = tmp_path / "ev"
    line = _one_line_exit_2(_eval(eval_cli, url, _pairs(tmp_path / "pairs.jsonl"), out))
    assert f"Got {url} with neither instead" in line and "training run holding step_XXXXXX" in line
    assert "Check --model" in line
    assert not out.exists()


def test_a_checkpoint_copied_between_disk_and_s3_keeps_its_digest(tmp_path: Path, tiny_models, s3_endpoint: str,
                                                                  monkeypatch) -> None:
    """The same files are the same model wherever they are: the digest held the spec's kind ("local", "remote"), so a
    checkpoint uploaded after it was evaluated on disk (or the other way) was scored again as another model."""
    from hrsa.extract.identity import model_digest

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("HRSA_CACHE", str(tmp_path / "cache"))
    local = _checkpoint(tiny_models.dir("bert"), tmp_path / "run" / "step_000001", 1)
    url = _upload(local, f"s3://hrsa-test/moved-{uuid.uuid4().hex[:8]}/step_000001")
    assert model_digest(url) == model_digest(str(local))
    _retrained(local)
    assert model_digest(url) != model_digest(str(local))  # other files: another model
