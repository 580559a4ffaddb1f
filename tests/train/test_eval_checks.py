"""``hrsa eval`` on what it must not trust: checkpoints their manifest calls incomplete, weights that cannot be read,
and an eval.json whose scores were edited (reused scores are shown as reused)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hrsa.train.checkpoints import INFO_FILE, STATE_FILE, file_manifest
from hrsa.train.evaluate import EvalConfig, evaluate


@pytest.fixture()
def cli(verb_cli: Callable[[click.Command], click.Group]) -> click.Group:
    from hrsa.train.cli import eval_command

    return verb_cli(eval_command)


def _pairs(path: Path, n: int = 8) -> Path:
    path.write_text("".join(json.dumps({"query": f"fox {i}", "pos": f"the lazy dog {i} " * 3}) + "\n" for i in range(n)))
    return path


def _checkpoint(tiny_models, folder: Path, step: int) -> Path:
    """A checkpoint as `hrsa train` writes it: the model folder, trainer_state.pt and the manifest."""
    shutil.copytree(tiny_models.dir("bert"), folder)
    (folder / STATE_FILE).write_bytes(b"optimizer state")
    (folder / INFO_FILE).write_text(json.dumps({"step": step, "loss": 1.0, "files": file_manifest(folder)}))
    return folder


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _one_line_exit_2(result) -> str:
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


# --- truncated weights ---------------------------------------------------------------------------------------------


def test_a_checkpoint_its_manifest_calls_incomplete_is_skipped_with_a_note(cli: click.Group, tmp_path: Path,
                                                                            tiny_models) -> None:
    run = tmp_path / "run"
    _checkpoint(tiny_models, run / "step_000001", 1)
    _truncate(_checkpoint(tiny_models, run / "step_000002", 2) / "model.safetensors")
    pairs = _pairs(tmp_path / "pairs.jsonl")
    result = CliRunner().invoke(cli, ["eval", "--model", str(run), "--tasks", f"retrieval:{pairs}", "--no-instructions"])
    assert result.exit_code == 0, result.output
    assert "step_000002" in result.output and "incomplete" in result.output
    data = json.loads((run / "eval" / "eval.json").read_text())
    assert [c["step"] for c in data["checkpoints"]] == [1]

    # asked for by --steps, or the only checkpoint: refused in one line naming the folder, nothing written
    out = tmp_path / "ev"
    args = ["eval", "--model", str(run), "--tasks", f"retrieval:{pairs}", "--steps", "2", "--out", str(out)]
    assert "step_000002" in _one_line_exit_2(CliRunner().invoke(cli, args))
    args = ["eval", "--model", str(run / "step_000002"), "--tasks", f"retrieval:{pairs}", "--out", str(out)]
    assert "step_000002" in _one_line_exit_2(CliRunner().invoke(cli, args))
    assert not out.exists()


def test_unreadable_weights_are_one_line_naming_the_file(cli: click.Group, tmp_path: Path, tiny_models) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_models.dir("bert"), model)  # a plain model folder: no manifest to tell
    _truncate(model / "model.safetensors")
    pairs = _pairs(tmp_path / "pairs.jsonl")
    args = ["eval", "--model", str(model), "--tasks", f"retrieval:{pairs}", "--out", str(tmp_path / "ev")]
    output = _one_line_exit_2(CliRunner().invoke(cli, args))
    assert str(model / "model.safetensors") in output


def test_load_model_names_the_unreadable_weights_file(tmp_path: Path, tiny_models) -> None:
    from hrsa.extract.models import ModelLoadError, load_model, parse_model_spec

    model = tmp_path / "model"
    shutil.copytree(tiny_models.dir("bert"), model)
    (model / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(parse_model_spec(str(model)), device="cpu")
