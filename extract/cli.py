"""``hrsa extract``: every flag is a field of :class:`~hrsa.extract.job.ExtractConfig`."""

from __future__ import annotations

from typing import Any

import click

from hrsa.extract.job import ExtractConfig

__all__ = ["extract"]


def _layers(text: str | None) -> list[int] | None:
    from hrsa.store.selection import parse_doc_ids

    return parse_doc_ids(text) if text else None  # same "0,3,5-9" syntax as document lists


@click.command("extract")
@click.option("--store", required=True, help=ExtractConfig.model_fields["store"].description)
@click.option("--model", required=True, help=ExtractConfig.model_fields["model"].description)
@click.option("--corpus", required=True, help=ExtractConfig.model_fields["corpus"].description)
@click.option("--name", help=ExtractConfig.model_fields["name"].description)
@click.option("--text", help=ExtractConfig.model_fields["text"].description)
@click.option("--template", help=ExtractConfig.model_fields["template"].description)
@click.option("--id-field", help=ExtractConfig.model_fields["id_field"].description)
@click.option("--layers", help="Hidden states to store, e.g. 0,12,24-28 (default all L+1).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help=ExtractConfig.model_fields["dtype"].description)
@click.option("--attention", type=click.Choice(["auto", "causal", "bidirectional"]), default="auto", show_default=True,
              help=ExtractConfig.model_fields["attention"].description)
@click.option("--revision", help=ExtractConfig.model_fields["revision"].description)
@click.option("--gguf-file", help=ExtractConfig.model_fields["gguf_file"].description)
@click.option("--trust-remote-code", is_flag=True, help=ExtractConfig.model_fields["trust_remote_code"].description)
@click.option("--workers", type=click.IntRange(min=1), help=ExtractConfig.model_fields["workers"].description)
@click.option("--max-docs", type=click.IntRange(min=1), help=ExtractConfig.model_fields["max_docs"].description)
@click.option("--max-tokens", type=click.IntRange(min=1), help=ExtractConfig.model_fields["max_tokens"].description)
@click.option("--token-budget", type=click.IntRange(min=1), default=8192, show_default=True,
              help=ExtractConfig.model_fields["token_budget"].description)
@click.option("--shard-tokens", type=click.IntRange(min=1), help=ExtractConfig.model_fields["shard_tokens"].description)
@click.option("--address", help=ExtractConfig.model_fields["address"].description)
def extract(layers: str | None, **options: Any) -> None:
    """Extract every hidden state of a model over a corpus into the store, on Ray (resumable)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hrsa.extract.job import parse_extract_config, run_extraction

    config = parse_extract_config({"layers": _layers(layers), **options})  # every problem at once, one line
    with Progress(TextColumn("extracting"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeElapsedColumn()) as bar:
        task = bar.add_task("extract", total=None)

        def advance(tokens: int, total: int) -> None:
            bar.update(task, total=total, advance=tokens)

        result = run_extraction(config, on_progress=advance)
    nodes = f" on {', '.join(result.nodes)}" if result.nodes else ""
    click.echo(f"{result.model_id}: {result.units_written} of {result.n_units} units written this run{nodes}; "
               f"{result.n_tokens} tokens of corpus {result.corpus_id} in {config.store}")
