"""``hrsa extract``: every flag is a field of :class:`~hrsa.extract.config.ExtractConfig` (flag > YAML > default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hrsa.extract.config import ExtractConfig, ExtractRunOptions, ModelSourceOptions
from hrsa.runtime.cli_options import config_file_option, config_options
from hrsa.store.errors import HrsaError

__all__ = ["extract"]

_METAVARS = {"store": "URL", "model": "SPEC", "corpus": "SPEC", "name": "ID", "text": "FIELD", "template": "TEXT",
             "id_field": "FIELD", "layers": "0,12,24-28", "workers": "N", "max_docs": "N", "max_tokens": "N",
             "token_budget": "N", "shard_tokens": "N", "address": "ADDR", "revision": "REV", "gguf_file": "FILE"}


@click.command("extract")
@config_file_option
# What to extract (store, model, corpus) first, then the option groups the pipeline's models share.
@config_options(ExtractConfig, exclude=[*ModelSourceOptions.model_fields, *ExtractRunOptions.model_fields],
                metavars=_METAVARS)
@config_options(ModelSourceOptions, metavars=_METAVARS)
@config_options(ExtractRunOptions, metavars=_METAVARS)
def extract(config_file: Path | None, **flags: Any) -> None:
    """Extract every hidden state of a model over a corpus into the store, on Ray (resumable).

    --store, --model and --corpus are required, as flags or in --config. Flags left out take their value from
    --config, else their default.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hrsa.extract.config import load_extract_config
    from hrsa.extract.job import run_extraction
    from hrsa.runtime.progress import gathered_warnings

    config = load_extract_config(config_file, flags)  # every problem at once, one line
    bar = Progress(TextColumn("extracting"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeElapsedColumn())
    task = bar.add_task("extract", total=None)

    def advance(tokens: int, total: int) -> None:  # the bar shows once work starts: an error before stays one line
        if not bar.live.is_started:
            bar.start()
        bar.update(task, total=total, advance=tokens)

    warned: list[str] = []
    try:
        with gathered_warnings() as warned:  # printed below the bar, not through it
            result = run_extraction(config, on_progress=advance)
    except HrsaError as error:  # a failed run's warnings still hold: hrsa prints them before its error line
        error.warnings = tuple(warned)
        raise
    finally:
        if bar.live.is_started:
            bar.stop()
    for message in warned:
        click.echo(f"hrsa: warning: {message}", err=True)
    nodes = f" on {', '.join(result.nodes)}" if result.nodes else ""
    others = f" ({result.units_by_others} by other extractions running at once)" if result.units_by_others else ""
    click.echo(f"{result.model_id}: {result.units_written} of {result.n_units} units written this run{nodes}{others}; "
               f"{result.n_tokens} tokens of corpus {result.corpus_id} in {config.store}")
