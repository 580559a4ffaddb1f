"""``hrsa demo``: thin verbs of the cluster package."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["demo"]


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("hrsa-out"), show_default=True,
              help="Folder for the store and everything the demo writes; re-running resumes there.")
@click.option("--corpus", type=click.Path(exists=True, path_type=Path), default=None,
              help="A CoT corpus (.jsonl file or folder, fields messages + reasoning), e.g. ../shared/data/cot/samples. "
                   "Default: word problems the demo writes itself.")
@click.option("--max-docs", type=click.IntRange(min=1), default=16, show_default=True, help="Use at most N documents.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=384, show_default=True, help="Cut documents to N tokens.")
@click.option("--address", default=None, help="Ray address (default RAY_ADDRESS, else an embedded local Ray).")
def demo(out: Path, corpus: Path | None, max_docs: int, max_tokens: int, address: str | None) -> None:
    """Run the demo pipeline offline: real SmolLM2 on a CoT corpus into a local store."""
    from rich.console import Console

    from hrsa.cluster.demo import DemoConfig, run_demo

    console = Console()
    result = run_demo(DemoConfig(out=out, corpus=corpus, max_docs=max_docs, max_tokens=max_tokens, address=address), console)
    console.print(f"\nstore: {result.store_url} ({result.units_written} unit(s) written this run)")
    console.print(f"look inside:  hrsa store ls {result.store_url}")
    console.print(f"              hrsa store info {result.store_url} {result.model_id}")
    console.print(f"              hrsa store get {result.store_url} {result.model_id} --layer 15 --docs 0 --out layer15.npy")
