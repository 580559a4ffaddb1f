"""``hrsa mine-negatives`` and ``hrsa eval``: thin click commands over :mod:`hrsa.train.mine` and
:mod:`hrsa.train.evaluate`. Flags default to None so that --config values show through; every flag is a field
of :class:`~hrsa.train.mine.MineConfig` or :class:`~hrsa.train.evaluate.EvalConfig`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

__all__ = ["eval_command", "mine_negatives_command"]

_CONFIG = click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                       help="YAML file of settings named like these flags; flags given here win.")
_ATTENTION = click.option("--attention", type=click.Choice(["auto", "causal", "bidirectional"]),
                          help="Attention mode; auto = what the model or checkpoint says.  [default: auto]")
_DTYPE = click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                      help="Compute dtype; auto = bfloat16 on GPU, float32 on CPU.  [default: auto]")
_DEVICE = click.option("--device", help="cpu, cuda, cuda:1 ...  [default: CUDA when available]")


@click.command("mine-negatives")
@_CONFIG
@click.option("--input", "input", type=click.Path(path_type=Path),
              help="JSON lines with query and pos (optional negs, instruction) per line.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output JSON lines: query, pos, negs (+ instruction).  [default: <input stem>.mined.jsonl]")
@click.option("--corpus", type=click.Path(path_type=Path),
              help="JSON lines of candidate documents.  [default: every distinct pos of --input]")
@click.option("--corpus-field", help="The field of --corpus holding the text.  [default: text]")
@click.option("--model", help="Embedding model: hub id, folder, .gguf or packaged:NAME.  [default: packaged:all-minilm-l6-v2]")
@click.option("--k", type=int, help="Negatives per query.  [default: 7]")
@click.option("--max-score-ratio", type=float,
              help="Positive-aware margin: keep candidates scoring under this times the positive's score.  [default: 0.95]")
@click.option("--depth", type=int, help="Candidates retrieved per query at first; short queries are searched deeper.  [default: 100]")
@click.option("--keep-existing/--replace-existing", default=None,
              help="Keep the input's negs first and mine the rest up to k, or replace them.  [default: replace]")
@click.option("--query-instructions/--no-query-instructions", default=None,
              help="Embed queries as 'Instruct: {instruction}\\nQuery: {query}' (instruction-tuned models).  [default: no]")
@click.option("--batch-size", type=int, help="Texts per forward pass.  [default: 64]")
@click.option("--max-length", type=int, help="Cut texts to this many tokens.  [default: 256]")
@_DEVICE
@_DTYPE
@_ATTENTION
@click.option("--overwrite", is_flag=True, default=None, help="Replace --out when it exists.")
def mine_negatives_command(config_file: Path | None, **flags: Any) -> None:
    """Mine hard negatives for query/pos pairs with an embedding model and FAISS (exact inner product).

    A candidate becomes a negative only if it is not the positive (nor the same text), and scores under
    --max-score-ratio times the positive's score (positive-aware mining drops likely false negatives).
    Reports how many queries got fewer than --k negatives.
    """
    from rich.console import Console

    from hrsa.runtime.settings import load_settings
    from hrsa.train.mine import MineConfig, mine_negatives

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = load_settings(MineConfig, config_file, flags, verb="mine-negatives")
    console = Console(stderr=True)
    result = mine_negatives(config, on_stage=lambda text: console.print(f"[dim]{text}[/dim]"))
    click.echo(result.summary())


@click.command("eval")
@_CONFIG
@click.option("--model", help="A model (hub id, folder, .gguf, packaged:NAME) or a training output folder of "
                              "step_XXXXXX checkpoints: each is evaluated and the scores form a curve.")
@click.option("--tasks", multiple=True,
              help="Repeatable or comma-separated. retrieval:FILE (JSON lines query, pos[, negs, instruction]; "
                   "nDCG@10), classification:FILE[:TEXT_FIELD[:LABEL_FIELD]] (JSON lines, default fields text and "
                   "label; accuracy), or an MTEB task or benchmark name such as SciFact or 'MTEB(eng, v2)' "
                   "(mteb:NAME also works; needs the Hugging Face hub).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Results folder: eval.json, eval_curve.png, mteb-results/.  [default: <model>/eval, else ./eval]")
@click.option("--instructions/--no-instructions", default=None,
              help="Queries (and classification inputs) get 'Instruct: {task instruction}\\nQuery: '; use "
                   "--no-instructions for models trained without them.  [default: on]")
@click.option("--instruction", help="Instruction of local tasks.  [default: mteb's default for the task type]")
@click.option("--steps", help="Only these checkpoint steps, comma-separated, e.g. 100,200.  [default: all]")
@click.option("--limit", type=int, help="Local tasks: evaluate a seeded sample of at most this many records.  [default: all]")
@click.option("--batch-size", type=int, help="Texts per forward pass.  [default: 32]")
@click.option("--max-length", type=int, help="Cut texts to this many tokens.  [default: 512]")
@_DEVICE
@_DTYPE
@_ATTENTION
@click.option("--seed", type=int, help="Seed of local tasks' sampling and train/test split.  [default: 0]")
@click.option("--resume/--no-resume", default=None,
              help="Keep results already in <out>/eval.json made with the same settings.  [default: resume]")
def eval_command(config_file: Path | None, **flags: Any) -> None:
    """Score a model, or every checkpoint of a training run, on MTEB tasks or local retrieval and
    classification files; writes eval.json (schema hrsa.eval/1) and, for several checkpoints, a curve."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from hrsa.runtime.settings import load_settings
    from hrsa.train.evaluate import EvalConfig, evaluate

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = load_settings(EvalConfig, config_file, flags, verb="eval")
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    progress = Progress(*columns, console=console, transient=True)  # started once the checks have passed
    checkpoints = progress.add_task("checkpoints", total=None)
    texts = progress.add_task("texts embedded", total=None)

    def on_checkpoint(checkpoint: Any, index: int, count: int) -> None:
        if not progress.live.is_started:
            progress.start()
        progress.update(checkpoints, total=count, completed=index, description=f"checkpoint {checkpoint.name}")

    try:
        result = evaluate(config, on_checkpoint=on_checkpoint, on_texts=lambda n: progress.advance(texts, n),
                          on_task=lambda name: progress.update(texts, description=f"texts embedded (done: {name})"))
    finally:
        progress.stop()
    table = Table("checkpoint", "step", *result.tasks)
    for row in result.checkpoints:
        scores = row.main_scores()
        table.add_row(row.name, "" if row.step is None else str(row.step), *(f"{scores[t]:.4f}" for t in result.tasks))
    Console().print(table)
    click.echo(f"wrote {result.json_path}" + (f", {result.figure_path.name}" if result.figure_path else ""))
