"""``hrsa store ...``: look inside a store. Thin: parse, call the library, print."""

from __future__ import annotations

import click

__all__ = ["store_group"]


@click.group("store")
def store_group() -> None:
    """List, describe, read, verify and delete what a store holds."""


@store_group.command("ls")
@click.argument("url")
def ls(url: str) -> None:
    """List the corpora and models in the store at URL (a path or an fsspec URL such as s3://bucket/store)."""
    from rich.console import Console
    from rich.table import Table

    from hrsa.store import ActivationStore

    store = ActivationStore.open(url, mode="r")
    console = Console()
    corpora = Table("corpus", "documents", "tokens", "tokenizer", "source", title="corpora", title_justify="left")
    for cid in store.corpora():
        c = store.corpus_info(cid)
        corpora.add_row(cid, str(c.n_docs), str(c.n_tokens), str(c.tokenizer.get("name", "")), str(c.source or ""))
    models = Table("model", "corpus", "hidden states", "D", "dtype", "attention", "units done", title="models", title_justify="left")
    for mid in store.models():
        m = store.model_info(mid)
        models.add_row(
            mid, m.corpus, f"{len(m.hidden_states)}/{m.n_hidden_states}", str(m.hidden_size), m.dtype, m.attention,
            f"{m.units_done}/{m.n_units}" + ("" if m.complete else " (incomplete)"),
        )
    console.print(corpora)
    console.print(models)
