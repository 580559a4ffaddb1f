"""train/'s verbs: flags generated from their configs keep the names they always had, and --config works."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hrsa.train.cli import eval_command, mine_negatives_command, train

FLAGS = {
    mine_negatives_command: ["--config", "--input", "--out", "--corpus", "--corpus-field", "--model", "--k",
                             "--max-score-ratio", "--depth", "--keep-existing", "--replace-existing",
                             "--query-instructions", "--no-query-instructions", "--batch-size", "--max-length",
                             "--device", "--dtype", "--attention", "--overwrite"],
    eval_command: ["--config", "--model", "--tasks", "--out", "--instructions", "--no-instructions", "--instruction",
                   "--steps", "--limit", "--batch-size", "--max-length", "--device", "--dtype", "--attention", "--seed",
                   "--resume", "--no-resume"],
}


@pytest.mark.parametrize("command", list(FLAGS), ids=lambda c: c.name)
def test_flags_keep_their_names(command: click.Command) -> None:
    names = [opt for param in command.params for opt in (*param.opts, *param.secondary_opts)]
    assert set(FLAGS[command]) <= set(names)
    assert len(names) == len(set(names)), "a flag defined twice"
    assert all(p.help for p in command.params if isinstance(p, click.Option)), "every flag has help"


def test_train_has_config_and_its_fields() -> None:
    names = {opt for param in train.params for opt in param.opts}
    assert {"--config", "--backbone", "--data", "--output", "--attention", "--dtype", "--quiet"} <= names


def test_eval_tasks_repeat_and_config_file_values_show_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_evaluate(config, **callbacks):
        seen["config"] = config
        raise click.exceptions.Exit(0)

    monkeypatch.setattr("hrsa.train.evaluate.evaluate", fake_evaluate)
    settings = tmp_path / "eval.yaml"
    settings.write_text(json.dumps({"model": "m", "tasks": ["SciFact"], "batch_size": 8}))
    result = CliRunner().invoke(eval_command, ["--config", str(settings), "--tasks", "A,B", "--tasks", "C",
                                               "--no-resume", "--steps", "1,2"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.tasks == ("A", "B", "C") and config.batch_size == 8 and config.resume is False
    assert config.steps == (1, 2) and config.model == "m"


def test_mine_replace_existing_is_the_off_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_mine(config, **kwargs):
        seen.append(config.keep_existing)
        raise click.exceptions.Exit(0)

    monkeypatch.setattr("hrsa.train.mine.mine_negatives", fake_mine)
    settings = tmp_path / "mine.yaml"
    settings.write_text(json.dumps({"input": "pairs.jsonl", "keep_existing": True}))
    for args in ([], ["--replace-existing"], ["--keep-existing"]):
        assert CliRunner().invoke(mine_negatives_command, ["--config", str(settings), *args]).exit_code == 0
    assert seen == [True, False, True]


def test_generated_help_carries_the_models_defaults() -> None:
    from hrsa.runtime.cli_options import field_help
    from hrsa.train.mine import MineConfig

    assert field_help(MineConfig, "k") == "Negatives per query.  [default: 7]"
    assert field_help(MineConfig, "batch_size") == "Texts per forward pass.  [default: 64]"  # mining's own default
    help_of = {p.name: p.help for p in mine_negatives_command.params}
    assert help_of["keep_existing"].endswith("[default: --replace-existing]")
    assert help_of["max_length"].endswith("[default: 256]")
    assert {p.name: p.help for p in eval_command.params}["max_length"].endswith("[default: 512]")
