"""``hrsa train``: every flag is a field of :class:`~hrsa.train.config.TrainConfig` (flag > YAML > default)."""

from __future__ import annotations

import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hrsa.train.config import TrainConfig

__all__ = ["train"]


def _click_type(annotation: Any) -> Any:
    """The click type of a config field: a choice for Literal, else its scalar type (Optional unwrapped)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(a) for a in args])
    if args:  # X | None
        return _click_type(args[0])
    return {int: int, float: float, Path: click.Path(path_type=Path)}.get(annotation, str)


def _config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One flag per config field, with the field's description as help; unset flags stay None."""
    for name, field in reversed(list(TrainConfig.model_fields.items())):
        flag = "--" + name.replace("_", "-")
        default = "" if field.is_required() or field.default is None else f" [default: {field.default}]"
        help_text = f"{field.description}{default}"
        if field.annotation in (bool, bool | None):
            option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
        else:
            option = click.option(flag, name, type=_click_type(field.annotation), default=None, help=help_text)
        command = option(command)
    return command


@click.command("train")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML file of settings (keys are the flag names with underscores); flags override it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_config_options
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
