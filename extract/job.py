"""``hrsa extract``: a corpus and a model in, every hidden state in the store out, on Ray.

Recipe: (1) tokenise the corpus once into the store, (2) connect to Ray, (3) start the workers; the
first one's description of the model lets the coordinator allocate the arrays (or find them from a
previous run), (4) feed pending units to the workers, two in flight each, (5) report. Re-running the
same extraction resumes: only units not done are computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hrsa.store.errors import CorpusMismatchError, UserError

__all__ = ["ExtractConfig", "ExtractResult", "run_extraction"]


class ExtractConfig(BaseModel):
    """Everything ``hrsa extract`` takes; each field is also a CLI flag."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str = Field(description="Store URL: a local path or an fsspec URL (s3://bucket/store).")
    model: str = Field(description="A local folder, a .gguf file, packaged:<name>, or a hub id org/name[@revision].")
    corpus: str = Field(description="A .jsonl/.csv/.parquet file, a folder of them, hf:NAME[:SPLIT], or a stored corpus id.")
    name: str | None = Field(None, description="Model id in the store (default: derived from --model).")
    text: str | None = Field(None, description="The field holding each record's text (default 'text').")
    template: str | None = Field(None, description="A format string over fields; {chat:FIELD} applies the chat template.")
    id_field: str | None = Field(None, description="The field holding each record's id.")
    layers: list[int] | None = Field(None, description="Hidden states to store (default all L+1).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    attention: Literal["auto", "causal", "bidirectional"] = Field("auto", description="auto: the architecture's own.")
    revision: str | None = Field(None, description="Hub revision.")
    gguf_file: str | None = Field(None, description="A .gguf file inside the folder or hub repository.")
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model.")
    workers: int | None = Field(None, ge=1, description="Workers: default one per GPU, or 1 on CPU.")
    max_docs: int | None = Field(None, ge=1, description="Use the first N documents.")
    max_tokens: int | None = Field(None, ge=1, description="Cut documents to N tokens.")
    token_budget: int = Field(8192, ge=1, description="Padded tokens per forward pass.")
    shard_tokens: int | None = Field(None, ge=1, description="Tokens per work unit (default: ~32 MiB shards).")
    address: str | None = Field(None, description="Ray address (default RAY_ADDRESS, else an embedded local Ray).")


@dataclass(frozen=True)
class ExtractResult:
    model_id: str
    corpus_id: str
    n_tokens: int
    n_units: int
    units_written: int
    nodes: tuple[str, ...]


def _model_id(config: ExtractConfig) -> str:
    from hrsa.store.ids import parse_id, slugify

    if config.name:
        return parse_id(config.name, kind="model id (--name)")
    return parse_id(slugify(config.model.removeprefix("packaged:").rstrip("/").split("/")[-1].removesuffix(".gguf")), kind="model id")


def _store_corpus(config: ExtractConfig, store: Any, spec: Any) -> tuple[str, int]:
    """Tokenise with the model's own tokenizer and store the corpus once, or join a stored corpus by id.

    Returns:
        (corpus id, number of tokens).
    """
    from hrsa.extract.corpus import CorpusSpec, load_records, tokenize_corpus
    from hrsa.extract.models import load_tokenizer, tokenizer_fingerprint

    tokenizer, context = load_tokenizer(spec)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if config.corpus in store.corpora():  # joining a stored corpus: its tokens must be this tokenizer's
        info = store.corpus_info(config.corpus)
        if info.tokenizer.get("fingerprint") != fingerprint:
            raise CorpusMismatchError(
                f"Expected a model whose tokenizer made corpus {config.corpus} ({info.tokenizer.get('name')}). "
                f"Got {spec.name}, whose tokenizer differs. Give the corpus file instead, to tokenise it for this model."
            )
        return config.corpus, info.n_tokens
    corpus_spec = CorpusSpec(source=config.corpus, text=config.text, template=config.template, id_field=config.id_field,
                             max_docs=config.max_docs, max_tokens=config.max_tokens)
    table = tokenize_corpus(list(load_records(corpus_spec)), corpus_spec, tokenizer, context_length=context)
    fields = (config.text or "text",) if config.template is None else ()
    cid = store.write_corpus(table, tokenizer={"name": spec.name, "fingerprint": fingerprint},
                             source=config.corpus, fields=fields, template=config.template,
                             extra={"corpus_spec": corpus_spec.to_dict()})
    return cid, table.n_tokens


def _placement(conn: Any, workers: int | None) -> tuple[int, float, float, int]:
    """(workers, GPUs each, CPUs each, torch threads each): one per GPU, else CPU workers sharing the cores."""
    if conn.n_gpus >= 1:
        return int(workers or conn.n_gpus), 1.0, 1.0, 0
    n = int(workers or 1)
    threads = max(1, int(conn.n_cpus // n))
    return n, 0.0, float(threads), threads


def run_extraction(config: ExtractConfig, *, on_progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Run (or resume) one extraction. ``on_progress(tokens_done, tokens_total)`` drives a progress bar."""
    import ray

    from hrsa.cluster.connection import connect
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.worker import remote_worker_class
    from hrsa.store import ActivationStore

    # Step 1: the corpus, tokenised once per tokenizer.
    mid = _model_id(config)
    spec = parse_model_spec(config.model, revision=config.revision, gguf_file=config.gguf_file, dtype=config.dtype,
                            attention=config.attention, trust_remote_code=config.trust_remote_code)
    store = ActivationStore.open(config.store, mode="a")
    if mid in store.models() and store.model_info(mid).complete:
        info = store.model_info(mid)
        return ExtractResult(mid, info.corpus, info.n_tokens, info.n_units, 0, ())
    cid, n_tokens = _store_corpus(config, store, spec)
    if mid in store.models() and store.model_info(mid).corpus != cid:
        raise CorpusMismatchError(
            f"Expected {mid} to continue on its corpus {store.model_info(mid).corpus}. Got corpus {cid} instead "
            "(other text, limits or tokenizer). Use another --name, or delete the model first."
        )
    # Step 2: Ray, and one worker per GPU (or CPU workers), each loading the model once.
    conn = connect(config.address)
    n, gpus, cpus, threads = _placement(conn, config.workers)
    Worker = remote_worker_class(num_gpus=gpus, num_cpus=cpus)
    workers = [Worker.remote(spec.to_dict(), config.store, None, token_budget=config.token_budget, cpu_threads=threads or None)
               for _ in range(n)]
    # Step 3: the coordinator allocates the arrays from what a loaded worker reports.
    facts = ray.get(workers[0].describe.remote())
    store.create_model(mid, corpus=cid, n_hidden_states=facts["n_hidden_states"], hidden_size=facts["hidden_size"],
                       dtype=facts["dtype"], attention=facts["attention"], hidden_states=config.layers,
                       source=facts["source"], shard_tokens=config.shard_tokens, exist_ok=True,
                       extraction={"token_budget": config.token_budget, "attn_implementation": facts["attn_implementation"],
                                   "max_tokens": config.max_tokens, "max_docs": config.max_docs})
    ray.get([w.bind.remote(mid) for w in workers])
    # Step 4: pending units, two in flight per worker.
    pending = [u.index for u in store.writer(mid).pending_units()]
    done_tokens = n_tokens - sum(store.writer(mid).units()[i].n_tokens for i in pending)
    results = _dispatch(workers, pending, lambda r: on_progress and on_progress(r["tokens"], n_tokens),
                        start=lambda: on_progress and on_progress(done_tokens, n_tokens))
    for w in workers:
        ray.kill(w)
    info = store.model_info(mid)
    if not info.complete:
        raise UserError(f"Expected every unit done. Got {info.units_done}/{info.n_units}. Re-run the same command to resume.")
    return ExtractResult(mid, cid, info.n_tokens, info.n_units, sum(r["written"] for r in results),
                         tuple(sorted({r["node"] for r in results})))


def _dispatch(workers: list[Any], pending: list[int], on_result: Callable[[dict[str, Any]], Any],
              start: Callable[[], Any]) -> list[dict[str, Any]]:
    """Keep two units in flight per worker (one computing, one writing) until none is left."""
    import ray

    start()
    queue = list(reversed(pending))
    inflight: dict[Any, Any] = {}
    for w in workers:
        for _ in range(2):
            if queue:
                inflight[w.run_unit.remote(queue.pop())] = w
    results = []
    while inflight:
        (ref,), _ = ray.wait(list(inflight), num_returns=1)
        worker = inflight.pop(ref)
        results.append(ray.get(ref))
        on_result(results[-1])
        if queue:
            inflight[worker.run_unit.remote(queue.pop())] = worker
    return results
