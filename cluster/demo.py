"""The demo pipeline: a real model, real text, a real store, offline on a laptop.

Today it runs what has landed: tokenise a CoT corpus with SmolLM2-135M-Instruct's tokenizer, extract
all 31 hidden states on an embedded local Ray into a store as exactly-once work units, and verify
every checksum. Re-running resumes (only units not done are computed). Stages join as hrsa grows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["DemoConfig", "DemoResult", "run_demo", "DEMO_MODEL", "COT_TEMPLATE"]

DEMO_MODEL = "packaged:smollm2-135m-instruct"
COT_TEMPLATE = "{chat:messages}{reasoning}"  # the problem as the model saw it, then its reasoning


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    corpus: Path | None = None
    max_docs: int = 16
    max_tokens: int = 384
    address: str | None = None


@dataclass(frozen=True)
class DemoResult:
    store_url: str
    model_id: str
    corpus_id: str
    n_tokens: int
    units_written: int


def _corpus_path(config: DemoConfig, console: Console) -> Path:
    if config.corpus is not None:
        return config.corpus
    from hrsa.cluster.demo_corpus import write_word_problems

    path = write_word_problems(config.out / "word-problems.jsonl")
    console.print(f"no --corpus given: wrote {path} (arithmetic word problems answered step by step)")
    return path


def run_demo(config: DemoConfig, console: Console | None = None) -> DemoResult:
    """Run the demo; every stage reports to ``console``."""
    from hrsa.extract.job import ExtractConfig, run_extraction
    from hrsa.store import ActivationStore
    from hrsa.store.verify import verify_store

    console = console or Console()
    config.out.mkdir(parents=True, exist_ok=True)
    store_url = str(config.out / "store")
    # Step 1: extraction on an embedded local Ray (the worker loads the GGUF, dequantised to float32).
    extract = ExtractConfig(store=store_url, model=DEMO_MODEL, corpus=str(_corpus_path(config, console)),
                            template=COT_TEMPLATE, max_docs=config.max_docs, max_tokens=config.max_tokens,
                            dtype="float32", workers=1, shard_tokens=1024, address=config.address)
    console.print(f"[bold]1/2[/] extracting every hidden state of {DEMO_MODEL} over {extract.corpus} "
                  f"(at most {config.max_docs} documents of {config.max_tokens} tokens)")
    with Progress(TextColumn("    "), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("extract", total=None)
        result = run_extraction(extract, on_progress=lambda n, total: progress.update(task, total=total, advance=n))
    # Step 2: read everything back through its checksums.
    report = verify_store(ActivationStore.open(store_url), models=[result.model_id])
    console.print(f"[bold]2/2[/] verify: {'ok' if report.ok else report.problems}, {report.shards_read} shards read")
    return DemoResult(store_url, result.model_id, result.corpus_id, result.n_tokens, result.units_written)
