"""The verbs of train/: ``hrsa train``, ``hrsa mine-negatives`` and ``hrsa eval``.

Each verb's flags are generated from its pydantic config (:class:`~hrsa.train.config.TrainConfig`,
:class:`~hrsa.train.mine.MineConfig`, :class:`~hrsa.train.evaluate.EvalConfig`), so defaults and help live in
the model; precedence is flag > ``--config`` YAML > default. Each verb builds its config, calls one job function
and prints a summary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from hrsa.runtime.cli_options import config_file_option, config_options
from hrsa.train.config import TrainConfig
from hrsa.train.evaluate import EvalConfig
from hrsa.train.mine import MineConfig

__all__ = ["eval_command", "mine_negatives_command", "train"]


@click.command("train")
@config_file_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_options(TrainConfig)
def train(config_file: Path | None, quiet: bool, **flags: Any) -> None:
    """Train an embedding model with InfoNCE on Ray Train; re-running the same --output resumes.

    Checkpoints are Hugging Face model folders OUTPUT/step_000100 ... that `hrsa extract --model` loads.
    """
    from hrsa.train.config import load_train_config
    from hrsa.train.trainer import TrainingStopped, run_training

    config = load_train_config(config_file, flags)  # every problem at once, one line
    try:
        result = run_training(config, progress=not quiet)
    except TrainingStopped as stopped:  # Ctrl-C: the workers stopped after a step and saved it
        last = stopped.result.checkpoints[-1] if stopped.result.checkpoints else "none"
        click.echo(f"hrsa: {stopped}; latest checkpoint: {last}. Re-run the same command to resume.", err=True)
        raise SystemExit(130) from None
    start = f"resumed from step {result.resumed_from}, " if result.resumed_from is not None else ""
    if result.restarted_from:
        steps = ", ".join(map(str, result.restarted_from))
        start += f"workers restarted {len(result.restarted_from)}x (from step {steps}), "
    last = result.checkpoints[-1] if result.checkpoints else "none"
    loss = f"; final loss {result.final_loss:.4f}" if result.steps else ""
    click.echo(f"{start}{len(result.steps)} steps this run{loss}; latest checkpoint: {last}")


@click.command("mine-negatives")
@config_file_option
# --keep-existing's off switch has always been --replace-existing (not the usual --no-keep-existing).
@config_options(MineConfig, metavars={"out": "FILE"}, switches={"keep_existing": "--replace-existing"})
def mine_negatives_command(config_file: Path | None, **flags: Any) -> None:
    """Mine hard negatives for query/pos pairs with an embedding model and FAISS (exact inner product).

    A candidate becomes a negative only if it is not the positive (nor the same text), and scores under
    --max-score-ratio times the positive's score (positive-aware mining drops likely false negatives).
    Reports how many queries got fewer than --k negatives.
    """
    from rich.console import Console

    from hrsa.runtime.settings import load_settings
    from hrsa.train.mine import mine_negatives

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = load_settings(MineConfig, config_file, flags, verb="mine-negatives")
    console = Console(stderr=True)
    result = mine_negatives(config, on_stage=lambda text: console.print(f"[dim]{text}[/dim]"))
    click.echo(result.summary())


@click.command("eval")
@config_file_option
# --tasks is repeatable, and EvalConfig splits each value on commas.
@config_options(EvalConfig, metavars={"out": "DIRECTORY"}, repeatable=("tasks",))
def eval_command(config_file: Path | None, **flags: Any) -> None:
    """Score a model, or every checkpoint of a training run, on MTEB tasks or local retrieval and
    classification files; writes eval.json (schema hrsa.eval/1) and, for several checkpoints, a curve."""
    from rich.console import Console

    from hrsa.runtime.settings import load_settings
    from hrsa.train.evaluate import evaluate

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = load_settings(EvalConfig, config_file, flags, verb="eval")
    with _EvalProgress(Console(stderr=True)) as progress:
        result = evaluate(config, on_checkpoint=progress.on_checkpoint, on_texts=progress.on_texts,
                          on_task=progress.on_task, on_note=progress.on_note)
    Console().print(_scores_table(result))
    if any(row.reused for row in result.checkpoints):
        again = ("--no-resume computes every score again" if config.resume else
                 "they are of checkpoints not asked for (--steps): --no-resume computes those asked for again")
        click.echo(f"reused from eval.json: scores read from the earlier {result.json_path} (same model files, task "
                   f"and settings), not computed now; {again}.")
    click.echo(f"wrote {result.json_path}" + (f", {result.figure_path.name}" if result.figure_path else ""))


class _EvalProgress:
    """Bars of checkpoints and embedded texts; shown from the first checkpoint, once the checks have passed."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        self.progress = Progress(*columns, console=console, transient=True)
        self.checkpoints = self.progress.add_task("checkpoints", total=None)
        self.texts = self.progress.add_task("texts embedded", total=None)

    def __enter__(self) -> _EvalProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_checkpoint(self, target: Any, index: int, count: int) -> None:
        if not self.progress.live.is_started:
            self.progress.start()
        self.progress.update(self.checkpoints, total=count, completed=index, description=f"checkpoint {target.name}")

    def on_texts(self, n: int) -> None:
        self.progress.advance(self.texts, n)

    def on_note(self, note: str) -> None:
        """One line on stderr, above the bars."""
        self.progress.console.print(f"hrsa: {note}", markup=False, highlight=False, soft_wrap=True)

    def on_task(self, name: str) -> None:
        self.progress.update(self.texts, description=f"texts embedded (done: {name})")


def _scores_table(result: Any) -> Any:
    """Main score of each task (columns) for each checkpoint (rows), and where the row's scores come from: computed
    now, or reused from the earlier eval.json (all of them, or the tasks named)."""
    from rich.table import Table

    table = Table("checkpoint", "step", *result.tasks, "scores")
    for row in result.checkpoints:
        scores = row.main_scores()
        reused = [t for t in result.tasks if t in row.reused]
        source = ("computed now" if not reused else "reused from eval.json" if len(reused) == len(result.tasks)
                  else f"reused from eval.json: {', '.join(reused)}")
        table.add_row(row.name, "" if row.step is None else str(row.step), *(f"{scores[t]:.4f}" for t in result.tasks),
                      source)
    return table
