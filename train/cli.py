"""``hrsa train``: every flag is a field of :class:`~hrsa.train.config.TrainConfig` (flag > YAML > default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hrsa.runtime.cli_options import config_file_option, config_options
from hrsa.train.config import TrainConfig

__all__ = ["train"]


@click.command("train")
@config_file_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_options(TrainConfig)
def train(config_file: Path | None, quiet: bool, **flags: Any) -> None:
    """Train an embedding model with InfoNCE on Ray Train; re-running the same --output resumes.

    Checkpoints are Hugging Face model folders OUTPUT/step_000100 ... that `hrsa extract --model` loads.
    """
    from hrsa.train.config import load_train_config
    from hrsa.train.trainer import run_training

    config = load_train_config(config_file, flags)  # every problem at once, one line
    result = run_training(config, progress=not quiet)
    start = f"resumed from step {result.resumed_from}, " if result.resumed_from is not None else ""
    last = result.checkpoints[-1] if result.checkpoints else "none"
    loss = f"; final loss {result.final_loss:.4f}" if result.steps else ""
    click.echo(f"{start}{len(result.steps)} steps this run{loss}; latest checkpoint: {last}")
