"""The extraction job, :func:`run_extraction`: a corpus and a model in, every hidden state in the store out, on Ray.

``hrsa extract`` and the pipeline's extract stage both call it with an :class:`~hrsa.extract.config.ExtractConfig`.
Recipe: (1) tokenise the corpus once into the store, (2) connect to Ray, (3) start the workers; the
first one's description of the model lets the coordinator allocate the arrays (or find them from a
previous run), (4) feed pending units to the workers, two in flight each, (5) report. Re-running the
same extraction resumes: only units not done are computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The job's input, re-exported: callers build an ExtractConfig and hand it to run_extraction.
from hrsa.extract.config import ExtractConfig, ExtractConfigError, parse_extract_config
from hrsa.store.errors import CorpusMismatchError, UserError
from hrsa.store.ids import parse_id

__all__ = ["ExtractConfig", "ExtractConfigError", "ExtractResult", "parse_extract_config", "run_extraction"]


@dataclass(frozen=True)
class ExtractResult:
    """What one extraction did: the model and corpus ids, their size, and which units this run wrote where."""

    model_id: str
    corpus_id: str
    n_tokens: int
    n_units: int
    units_written: int
    nodes: tuple[str, ...]  # host names of the workers that ran units
    node_ids: tuple[str, ...] = ()  # their Ray node ids (several nodes can share one host)


def _model_id(config: ExtractConfig) -> str:
    from hrsa.store.ids import slugify

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
    """Run (or resume) one extraction.

    Args:
        config: the settings (see :func:`parse_extract_config` to validate a mapping with one-line errors).
        on_progress: called as ``on_progress(tokens, tokens_total)`` with the tokens already done when
            work starts, then with each finished unit's tokens: increments for a progress bar.

    Raises:
        UserError: a model, corpus or setting that cannot work (one line that names the fix).
    """
    import ray

    from hrsa.runtime.connection import connect
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
    # SPREAD: one worker per node first, so a cluster's nodes share the work (and their disks or links to the store)
    workers = [Worker.options(scheduling_strategy="SPREAD").remote(spec.to_dict(), config.store, None,
                                                                  token_budget=config.token_budget, cpu_threads=threads or None)
               for _ in range(n)]
    try:  # the workers hold CPUs or GPUs: give them back however this ends
        # Step 3: the coordinator allocates the arrays from what a loaded worker reports.
        facts = _describe(workers[0])
        store.create_model(mid, corpus=cid, n_hidden_states=facts["n_hidden_states"], hidden_size=facts["hidden_size"],
                           dtype=facts["dtype"], attention=facts["attention"], hidden_states=config.layers,
                           source=facts["source"], shard_tokens=config.shard_tokens, exist_ok=True,
                           extraction={"token_budget": config.token_budget,
                                       "attn_implementation": facts["attn_implementation"],
                                       "max_tokens": config.max_tokens, "max_docs": config.max_docs})
        ray.get([w.bind.remote(mid) for w in workers])
        # Step 4: pending units, two in flight per worker.
        units = store.writer(mid).units()
        pending = [u.index for u in store.writer(mid).pending_units()]
        done_tokens = n_tokens - sum(units[i].n_tokens for i in pending)
        results = _dispatch(workers, mid, pending, lambda r: on_progress and on_progress(r["tokens"], n_tokens),
                            start=lambda: on_progress and on_progress(done_tokens, n_tokens))
    finally:
        for w in workers:
            ray.kill(w)
    # Step 5: report.
    info = store.model_info(mid)
    if not info.complete:
        raise UserError(f"Expected every unit done. Got {info.units_done}/{info.n_units}. Re-run the same command to resume.")
    return ExtractResult(mid, cid, info.n_tokens, info.n_units, sum(r["written"] for r in results),
                         tuple(sorted({r["node"] for r in results})), tuple(sorted({r.get("node_id", "") for r in results})))


def _describe(worker: Any) -> dict[str, Any]:
    """The loaded model's facts; a user's mistake found while loading it is raised as itself (one line)."""
    import ray

    try:
        return ray.get(worker.describe.remote())
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, UserError):
            raise error.cause from None
        raise


def _dispatch(workers: list[Any], mid: str, pending: list[int], on_result: Callable[[dict[str, Any]], Any],
              start: Callable[[], Any]) -> list[dict[str, Any]]:
    """Keep two units in flight per worker (one computing, one writing) until none is left."""
    import ray

    start()
    queue = list(reversed(pending))
    inflight: dict[Any, Any] = {}
    for w in workers:
        for _ in range(2):
            if queue:
                inflight[w.run_unit.remote(mid, queue.pop())] = w
    results = []
    while inflight:
        (ref,), _ = ray.wait(list(inflight), num_returns=1)
        worker = inflight.pop(ref)
        results.append(ray.get(ref))
        on_result(results[-1])
        if queue:
            inflight[worker.run_unit.remote(mid, queue.pop())] = worker
    return results
