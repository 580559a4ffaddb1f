"""The extraction job, :func:`run_extraction`: a corpus and a model in, every hidden state in the store out, on Ray.

``hrsa extract`` and the pipeline's extract stage both call it with an :class:`~hrsa.extract.config.ExtractConfig`.
Recipe: (1) check before touching the store: the model spec, the corpus (tokenised with the model's tokenizer, not
yet written) and, when the store holds the model already, that it is the same extraction
(:mod:`hrsa.extract.rerun`); only then is the store created and the corpus stored once, (2) connect to Ray and
reserve the workers' CPUs/GPUs (refused at once when the cluster can never place them, bounded wait otherwise),
(3) start the workers; the first one's description of the model lets the coordinator allocate the arrays (or check
them on resume), (4) feed pending units to the workers, two in flight each, consecutive units to each worker, (5)
report. Re-running the same extraction resumes: only units not done are computed. A worker's failure reaches the caller as one line naming
the unit (:class:`ExtractionFailedError`).

The workers are actors owned by this process (not detached): if it dies, Ray ends them with it. A pipeline keeps
them from one extraction to the next (:mod:`hrsa.extract.worker_pool`): each extraction loads its model into them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The job's input, re-exported: callers build an ExtractConfig and hand it to run_extraction.
from hrsa.extract.config import ExtractConfig, ExtractConfigError, parse_extract_config
from hrsa.extract.worker_pool import ExtractionWorkers
from hrsa.runtime.checkpoint_manifest import refuse_incomplete_checkpoint
from hrsa.runtime.locations import is_url
from hrsa.runtime.placement import ROOM_TIMEOUT_S, check_every_node_sees, cpus_per_worker
from hrsa.runtime.task_errors import one_line, root_cause
from hrsa.store.errors import CorpusMismatchError, CorruptDataError, HalfCreatedModelError, HrsaError, ModelNotFoundError, UserError

__all__ = ["PLACEMENT_TIMEOUT_S", "ExtractConfig", "ExtractConfigError", "ExtractResult", "ExtractionFailedError",
           "ExtractionWorkers", "UnitRuns", "WorkerPlacementError", "parse_extract_config", "run_extraction",
           "stored_differences"]


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
    units_by_others: int = 0  # pending when this run started, written meanwhile by other extractions of the model


@dataclass(frozen=True)
class _Corpus:
    """The corpus asked for, checked before the store is touched: a stored id, or a table to store."""

    cid: str | None  # set when joining a stored corpus
    table: Any  # CorpusTable to store when cid is None
    digest: str | None  # content hash of the table (None when joining by id)
    n_tokens: int
    tokenizer: dict[str, str]
    file: dict[str, Any] = field(default_factory=dict)  # the corpus_file record (_corpus_file) of a local file read


class ExtractionFailedError(HrsaError, RuntimeError):
    """A worker failed in a way that is not the user's to fix (a crash, a bug, a lost node): exit code 1."""


class WorkerPlacementError(UserError, RuntimeError):
    """More workers than the Ray cluster can place, or no room for them in time."""


PLACEMENT_TIMEOUT_S = ROOM_TIMEOUT_S  # how long the workers may wait for resources other jobs hold
_SHARED_STORE = "Use a URL such as s3://BUCKET/store, or a path on a filesystem mounted on every node (NFS, EFS)."
GPU_WORKER_CPUS = 8  # the most CPUs a GPU worker asks for to write with (each thread holds a shard or two at once)


def _open_existing(url: str) -> Any:
    """The store at ``url`` for writing, or None when nothing is there yet (created only once all checks passed)."""
    from hrsa.store import ActivationStore
    from hrsa.store.errors import StoreNotFoundError

    try:
        return ActivationStore.open(url, mode="r+")
    except StoreNotFoundError:
        return None


def _read_corpus(config: ExtractConfig, store: Any, spec: Any) -> _Corpus:
    """Tokenise the corpus with the model's own tokenizer (nothing written), or join a stored corpus by id.

    Raises:
        CorpusError, ModelLoadError...: the corpus or the tokenizer cannot be read (one line each).
        CorpusMismatchError: a stored corpus whose token ids this model's tokenizer does not reproduce.
    """
    from hrsa.extract.corpus import check_vocabulary, load_records, tokenize_corpus
    from hrsa.extract.models import load_tokenizer, tokenizer_fingerprint
    from hrsa.store.corpus import content_hash
    from hrsa.store.records import CorpusError

    tokenizer, limits = load_tokenizer(spec)
    info = {"name": spec.name, "fingerprint": tokenizer_fingerprint(tokenizer)}
    if store is not None and config.corpus in store.corpora():
        _refuse_corpus_options(config)
        return _join_stored(store, config.corpus, spec, tokenizer, limits, info)
    corpus_spec = _corpus_spec(config)
    file = _corpus_file(config)  # before the read: what was read is what the model records having been extracted from
    table = tokenize_corpus(list(load_records(corpus_spec)), corpus_spec, tokenizer, context_length=limits.context)
    if _corpus_file(config) != file:
        raise CorpusError(f"Expected corpus {config.corpus} to hold the same records while this extraction read it. Got "
                          "it changed while it was read instead. Run again once it is written.")
    check_vocabulary(table, limits.vocabulary, tokenizer, model=spec.name, names=table.record_ids)
    return _Corpus(None, table, content_hash(table), table.n_tokens, info, file)


def stored_differences(config: ExtractConfig, store: Any) -> list[str]:
    """How the model ``store`` holds under ``config``'s id differs from what ``config`` would write
    (:func:`~hrsa.extract.rerun.stored_mismatch`), its corpus compared by the tokens this model's tokenizer gives
    the corpus file now, not by its path: a file edited in place is another corpus. ``[]``: the same extraction.

    Raises:
        CorpusError, ModelLoadError...: the corpus or the tokenizer cannot be read (one line each).
    """
    from hrsa.extract.rerun import stored_mismatch

    spec = config.model_spec()
    corpus = _read_corpus(config, store, spec)
    return stored_mismatch(store, config, corpus_hash=corpus.digest, table=corpus.table)


#: How a corpus file is read into documents: a stored corpus's documents are what they were stored as.
_CORPUS_OPTIONS = ("text", "template", "id_field", "max_docs", "max_tokens")


def _refuse_corpus_options(config: ExtractConfig) -> None:
    """Refuse corpus options with a stored corpus's id: they were ignored, every stored document extracted whole,
    while the model recorded the ``--max-tokens`` and ``--max-docs`` given as the cut it had made."""
    from hrsa.runtime.settings import flag_name
    from hrsa.store.records import CorpusError

    given = [f"{flag_name(name)} {getattr(config, name)}" for name in _CORPUS_OPTIONS if getattr(config, name) is not None]
    if given:
        raise CorpusError(
            f"Expected no corpus options with a stored corpus (--corpus {config.corpus}): its documents are used as they "
            f"were stored. Got {', '.join(given)} instead. Drop them, or give the corpus file with them (that stores a "
            "corpus of its own)."
        )


def _join_stored(store: Any, cid: str, spec: Any, tokenizer: Any, limits: Any, info: dict[str, str]) -> _Corpus:
    """Join stored corpus ``cid`` when this model's tokenizer, run on the corpus's source text with the corpus's
    settings, gives its token ids on every document (not assumed from a fingerprint: a fine-tuned child's
    tokenizer may differ in added tokens or chat template and still tokenise the text alike), and the model has an
    embedding for each of them."""
    from hrsa.extract.corpus import CorpusSpec, check_vocabulary, load_records, tokenize_corpus

    stored = store.corpus_info(cid)
    written = stored.extra.get("corpus_spec")
    _check_context(store, stored, (written or {}).get("source") or stored.source, spec, limits.context)
    record_ids = list(store.documents(cid)["record_id"])
    check_vocabulary(store.corpus_tokens(cid), limits.vocabulary, tokenizer, model=spec.name, names=record_ids)
    if not written:  # stored through the API, without its source: the tokenizer must be the one that made it
        if stored.tokenizer.get("fingerprint") != info["fingerprint"]:
            raise CorpusMismatchError(
                f"Expected a model whose tokenizer made corpus {cid} ({stored.tokenizer.get('name')}), as its source "
                f"text is not recorded. Got {spec.name}, whose tokenizer differs. Give the corpus file instead."
            )
        return _Corpus(cid, None, None, stored.n_tokens, info)
    corpus_spec = CorpusSpec(**written)
    table = tokenize_corpus(list(load_records(corpus_spec)), corpus_spec, tokenizer, context_length=limits.context)
    differ = store.differing_documents(cid, table)
    if differ:
        raise CorpusMismatchError(
            f"Expected {spec.name}'s tokenizer to give the token ids of corpus {cid} on every document. Got other ids "
            f"in {len(differ)} of {stored.n_docs} documents ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}) "
            f"instead. Give the corpus file (--corpus {corpus_spec.source}) to store this model's own tokens: "
            "`hrsa analyze` then compares the two models on the tokens whose character spans coincide."
        )
    return _Corpus(cid, None, None, stored.n_tokens, info)


def _check_context(store: Any, stored: Any, source: str | None, spec: Any, context: int | None) -> None:
    """Refuse a stored corpus with documents longer than the model's context (stored for a model with a longer one):
    their rows past its positions went to the workers, and a BERT-like model failed there with a model half-written.
    The stored documents are what the model would be given, whatever the settings they were cut with."""
    from hrsa.store.records import CorpusError

    if context is None:
        return
    lengths = store.documents(stored.id)[["record_id", "n_tokens"]]
    longest = int(lengths["n_tokens"].values.argmax())
    if int(lengths["n_tokens"].iloc[longest]) > context:
        raise CorpusError(
            f"Expected documents of at most {context} tokens (the model's context) in corpus {stored.id} to extract "
            f"{spec.name} on it. Got {int(lengths['n_tokens'].iloc[longest])} in {lengths['record_id'].iloc[longest]} "
            f"instead. Give the corpus file cut to fit (--corpus {source or 'FILE'} --max-tokens {context}): that "
            "stores a corpus of its own."
        )


def _corpus_spec(config: ExtractConfig) -> Any:
    from hrsa.extract.corpus import CorpusSpec

    return CorpusSpec(source=config.corpus, text=config.text, template=config.template, id_field=config.id_field,
                      max_docs=config.max_docs, max_tokens=config.max_tokens)


def _store_corpus(config: ExtractConfig, store: Any, corpus: _Corpus) -> str:
    """Store the corpus once (a no-op when the same tokens are there); returns its id."""
    if corpus.cid is not None:
        return corpus.cid
    fields = (config.text or "text",) if config.template is None else ()
    return store.write_corpus(corpus.table, tokenizer=corpus.tokenizer, source=config.corpus, fields=fields,
                              template=config.template, extra={"corpus_spec": _corpus_spec(config).to_dict()})


def _node_cpus(conn: Any) -> list[float]:
    return [node.cpus for node in conn.nodes] or [conn.n_cpus]


def _placement(conn: Any, workers: int | None) -> tuple[int, float, float, int]:
    """(workers, GPUs each, CPUs each, torch threads each): one per GPU, else CPU workers sharing the cores, each
    with the most CPUs that still fit on one node (the cluster's CPUs divided by the workers may exceed every node).

    A GPU worker also takes a share of its node's CPUs (:func:`_gpu_worker_cpus`) to write with: its threads encode,
    hash and write a unit's shards while the GPU runs the next unit's forward passes. Its torch threads stay 1."""
    if conn.n_gpus >= 1:
        return int(workers or conn.n_gpus), 1.0, _gpu_worker_cpus(conn), 1
    n = int(workers or 1)
    node_cpus = _node_cpus(conn)
    threads = cpus_per_worker(node_cpus, n) if sum(int(c) for c in node_cpus) >= n else 1  # else refused next
    return n, 0.0, float(threads), threads


def _gpu_worker_cpus(conn: Any) -> float:
    """CPUs each GPU worker asks for: of every GPU node, its CPUs but one shared among its GPUs, at most
    GPU_WORKER_CPUS (a fraction where a node has fewer CPUs than GPUs); the smallest share of any GPU node, so a
    worker fits wherever a GPU is. One CPU stays free per node for other jobs' tasks; one core writes ~0.15-0.4
    GB/s of activations (benchmarks/extract.py, (f)), where a 1.5B model in bf16 makes ~89 KB a token."""
    shares = [min(float(GPU_WORKER_CPUS), max(1.0, (node.cpus - 1) // node.gpus)) if node.cpus > node.gpus
              else node.cpus / node.gpus for node in conn.nodes if node.gpus >= 1]
    return min(shares, default=1.0)


def _check_placement(conn: Any, n: int, gpus: float, cpus: float) -> None:
    """Refuse at once what the cluster can never place (it would wait forever), naming the most it can take."""
    if gpus:  # a node holds as many GPU workers as both its GPUs and its CPUs allow
        nodes = [(node.gpus, node.cpus) for node in conn.nodes] or [(conn.n_gpus, conn.n_cpus)]
        most = sum(min(int(g // gpus), int(c / cpus + 1e-9)) for g, c in nodes)
    else:
        most = sum(int(c // cpus) for c in _node_cpus(conn))
    if n > most:
        each = f"{cpus:g} CPU" + (f" and {gpus:g} GPU" if gpus else "")
        raise WorkerPlacementError(
            f"Expected --workers the Ray cluster can place: at most {most} (it has {conn.n_cpus:g} CPUs and "
            f"{conn.n_gpus:g} GPUs; a worker takes {each}). Got {n} instead. Pass --workers {max(most, 1)} or "
            "fewer, or add nodes to the cluster."
        )


def _write_threads(gpus: float, cpus: float) -> int:
    """Threads writing a unit's states at once: a GPU worker's CPUs, which its forward passes leave free; 1 on a CPU
    worker, whose forward passes keep its cores busy (more threads there were not measured to help end to end)."""
    return max(1, int(cpus)) if gpus else 1


def _reserve(n: int, gpus: float, cpus: float) -> Any:
    """A placement group holding every worker's CPUs/GPUs, ready within PLACEMENT_TIMEOUT_S, else an error.

    SPREAD: one worker per node first, so a cluster's nodes share the work (and their disks or links to the store).
    """
    from hrsa.runtime.placement import PlacementError, reserve_room

    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    try:
        return reserve_room([dict(bundle) for _ in range(n)], strategy="SPREAD", timeout_s=PLACEMENT_TIMEOUT_S)
    except PlacementError as error:
        raise WorkerPlacementError(str(error)) from None


def _start_workers(n: int, gpus: float, cpus: float, threads: int,
                   config: ExtractConfig) -> tuple[Any, list[Any], list[int]]:
    """Reserve the resources of ``n`` workers, then start them with no model loaded: (placement group, actors,
    their process ids)."""
    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from hrsa.extract.worker import remote_worker_class

    group = _reserve(n, gpus, cpus)
    actors: list[Any] = []
    try:
        Worker = remote_worker_class(num_gpus=gpus, num_cpus=cpus)
        for i in range(n):
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
            actors.append(Worker.options(scheduling_strategy=strategy).remote(
                None, config.store, None, cpu_threads=threads or None, write_threads=_write_threads(gpus, cpus)))
        pids = _call([actor.pid.remote() for actor in actors], "starting the extraction workers")
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(group)
        raise
    return group, actors, pids


def _check_layers(config: ExtractConfig, facts: Mapping[str, Any]) -> None:
    """--layers against the hidden states the loaded model has (known only once it is loaded)."""
    n = int(facts["n_hidden_states"])
    layers = list(config.layers or ())
    if any(not 0 <= k < n for k in layers) or len(set(layers)) != len(layers):
        raise UserError(f"Expected --layers to be distinct hidden states in 0..{n - 1} (model {config.model} has {n}: "
                        f"the embeddings and {n - 1} layers). Got {layers} instead.")


def _corpus_file(config: ExtractConfig) -> dict[str, dict[str, Any]]:
    """``{"corpus_file": {"path": absolute path, "digest": content digest, "records": what extraction read}}`` of
    the local corpus file or folder the records were read from (what ``hrsa analyze`` checks before it reads the
    probes' labels back from it: the whole content, else each record's id and text, so that labels edited since are
    read as edited); ``{}`` for a stored corpus id, the hub, object storage, or nothing there."""

    from hrsa.runtime.fingerprint import records_digest, records_fingerprint

    if config.corpus.startswith("hf:") or not Path(config.corpus).expanduser().exists():
        return {}
    # Absolute, links kept: records without an id are named FILE:LINE by the name read (a link's, not its target's)
    path = Path(os.path.abspath(Path(config.corpus).expanduser()))
    digest = records_digest(path)
    fields = list(_corpus_spec(config).source_fields())
    read = records_fingerprint(str(path), fields=fields, id_field=config.id_field, max_docs=config.max_docs)
    if digest is None or read is None:
        return {}
    return {"corpus_file": {"path": str(path), "digest": digest, "records": {
        "sha256": read, "fields": fields, "id_field": config.id_field, "max_docs": config.max_docs}}}


def run_extraction(config: ExtractConfig, *, on_progress: Callable[[int, int], None] | None = None,
                   workers: ExtractionWorkers | None = None, replace: bool = False) -> ExtractResult:
    """Run (or resume) one extraction.

    Args:
        config: the settings (see :func:`parse_extract_config` to validate a mapping with one-line errors).
        on_progress: called as ``on_progress(tokens, tokens_total)`` with the tokens already done when
            work starts, then with each finished unit's tokens: increments for a progress bar.
        workers: workers kept across extractions (a pipeline's; one coordinator at a time): they stay after a
            run that succeeds, and are closed when a run fails once it has taken them. None, or a model with
            ``trust_remote_code`` (its code could change state the next model sees): this run starts its own and
            ends them.
        replace: a stored model of this id is extracted again from scratch (a pipeline's own, whose inputs
            changed), not resumed; it is deleted only once the new one is known to run (its model loaded by the
            workers, its layers checked), so a bad setting leaves it as it was.

    Raises:
        UserError: a model, corpus or setting that cannot work, or a re-run whose settings differ from the
            stored model's (:class:`~hrsa.extract.rerun.RerunMismatchError`); one line that names the fix.
            Nothing is created or changed in the store when it is raised before the workers start.
        ExtractionFailedError: a worker crashed or failed on a unit (one line naming the unit and the error).
    """
    from hrsa.extract.identity import FILES_VERSION, files_version
    from hrsa.extract.rerun import RerunMismatchError, check_rerun, loaded_mismatch
    from hrsa.runtime.connection import connect
    from hrsa.store import ActivationStore

    if not is_url(config.store):  # the workers open it where they run, not in this process's folder
        config = config.model_copy(update={"store": str(Path(config.store).expanduser().resolve())})
    # Step 1: check the model, the corpus and a stored model's settings before the store is created or changed.
    mid = config.model_id()
    spec = config.model_spec()
    refuse_incomplete_checkpoint(spec)
    store = _open_existing(config.store)
    corpus = _read_corpus(config, store, spec)
    existing = store.model_info(mid) if store is not None and mid in store.models() else None
    replaced, existing = (existing, None) if replace else (None, existing)
    if existing is not None:
        check_rerun(store, config, corpus_hash=corpus.digest, table=corpus.table)
        if existing.complete:  # nothing to write: complete only if whole, as a run that wrote units checks it
            damage = store.model_damage(mid)
            if damage is not None:
                raise CorruptDataError(
                    f"Expected model {mid} of {store.url} whole to report it complete. Got {damage} instead: its "
                    f"metadata was damaged or edited, and its hidden states do not read. Delete it (`hrsa store rm "
                    f"{store.url} {mid} --yes`), then run the same command again to extract it anew."
                )
            return ExtractResult(mid, existing.corpus, existing.n_tokens, existing.n_units, 0, ())
    # Step 2: Ray, and one worker per GPU (or CPU workers) that the cluster can place.
    conn = connect(config.address)
    n, gpus, cpus, threads = _placement(conn, config.workers)
    _check_placement(conn, n, gpus, cpus)
    check_every_node_sees(config.store, conn.nodes, flag="--store", use_instead=_SHARED_STORE)  # nothing created yet
    # Step 3: the workers in reserved resources (a pipeline's, kept from its last extraction), each loading the model.
    if workers is not None and config.trust_remote_code:
        workers.close()  # the model's own code runs in the worker: fresh processes, ended after, whatever came before
        workers = None
    pool = workers if workers is not None else ExtractionWorkers()
    # Every worker loads the files found now, or fails: kept workers holding this path's earlier weights reload.
    model = {**spec.to_dict(), FILES_VERSION: files_version(spec)}
    # The lease on the model (taken below, once the store is open) is released last, when this run has ended.
    with ExitStack() as holding:
        try:  # the workers hold CPUs or GPUs: give them back however this ends (a pipeline's stay after a success)
            actors = pool.take((n, gpus, cpus, threads, config.store),
                               lambda: _start_workers(n, gpus, cpus, threads, config))
            # Step 4: the coordinator allocates the arrays from what a loaded worker reports (or checks them on resume).
            # Every worker loads at once (bind later finds the model loaded); the first one's facts are recorded.
            facts = _call([a.describe.remote(model, digest=i == 0) for i, a in enumerate(actors)],
                          f"loading model {mid}")[0]
            _check_layers(config, facts)
            # The store and the corpus, only now that the model loads and its layers fit: a mistake creates nothing.
            store = store or ActivationStore.open(config.store, mode="a")
            cid = existing.corpus if existing is not None else _store_corpus(config, store, corpus)  # resuming: its own
            store.check_corpus(cid)  # the workers read its tokens unchecked: a lost chunk would be token 0 for them
            # The model held from here until this run ends: `hrsa store rm` refuses it meanwhile (between units, when
            # no unit claim is live, too), and a deletion under way refuses this run.
            lease = holding.enter_context(store.extracting(mid))
            if existing is not None and mid not in store.models():
                raise UserError(
                    f"Expected model {mid} of {store.url}, found when this extraction began, still there to resume. "
                    f"Got it deleted meanwhile (`hrsa store rm`) instead. Run the same command again to extract it anew."
                )
            if replaced is not None:  # the new extraction runs: only now is the old one let go
                store.delete_model(mid, held=lease)
            if existing is None:
                store.create_model(mid, corpus=cid, n_hidden_states=facts["n_hidden_states"], hidden_size=facts["hidden_size"],
                                   dtype=facts["dtype"], attention=facts["attention"], hidden_states=config.layers,
                                   source=facts["source"], shard_tokens=config.shard_tokens, exist_ok=True,
                                   extraction={"token_budget": config.token_budget,
                                               "attn_implementation": facts["attn_implementation"],
                                               "tokenizer": corpus.tokenizer,
                                               "max_tokens": config.max_tokens, "max_docs": config.max_docs,
                                               **corpus.file})
            else:  # resuming: the settings matched; what loading tells (dtype "auto" on other hardware...) must too
                found = loaded_mismatch(existing, facts)
                if found:
                    raise RerunMismatchError(
                        f"Expected the model loaded to match model {mid} stored in {store.url}. Got {'; '.join(found)} "
                        f"instead. Pass --name NEW to keep both, or `hrsa store rm {store.url} {mid}` to replace it."
                    )
            _call([w.bind.remote(mid, model) for w in actors], f"opening model {mid}")
            # Step 5: pending units, two in flight per worker; then the units other extractions held, once they are free.
            pending_units = store.writer(mid).pending_units()
            done_tokens = corpus.n_tokens - sum(u.n_tokens for u in pending_units)
            target = _Target(actors, mid, model, config.token_budget)
            results = _dispatch(target, [u.index for u in pending_units],
                                lambda r: on_progress and on_progress(r["tokens"], corpus.n_tokens),
                                start=lambda: on_progress and on_progress(done_tokens, corpus.n_tokens))
            try:
                results += _finish_held_units(store, target)
            except (ModelNotFoundError, HalfCreatedModelError) as error:  # the model went while its units were written
                raise _deleted_under(store, mid) or error from None
        except BaseException:
            pool.close()
            raise
        finally:
            if workers is None:
                pool.close()
        # Step 6: report, once the model is known to be still there, its metadata whole: a `hrsa store rm` while the units
        # were written leaves done records (written after it) that count the model complete while its objects are gone.
        deleted = _deleted_under(store, mid)
        if deleted is not None:
            raise deleted
        info = store.model_info(mid)
        if not info.complete:
            raise UserError(f"Expected every unit done. Got {info.units_done}/{info.n_units}. Re-run the same command to resume.")
        written = sum(r["written"] for r in results)
        return ExtractResult(mid, cid, info.n_tokens, info.n_units, written, tuple(sorted({r["node"] for r in results})),
                             tuple(sorted({r.get("node_id", "") for r in results})), len(pending_units) - written)


HELD_POLL_S = 1.0


def _deleted_under(store: Any, mid: str) -> ExtractionFailedError | None:
    """The failure to report when model ``mid`` was deleted or damaged while this extraction wrote it, else None."""
    damage = store.model_damage(mid)
    if damage is None:
        return None
    fix = ("Run the same command again to extract it anew" if damage.endswith(" absent") else
           f"Delete what is left (`hrsa store rm {store.url} {mid} --yes`), then run the same command again")
    return ExtractionFailedError(
        f"Expected model {mid} whole in {store.url} once its units were written. Got {damage} instead: it was deleted "
        f"(`hrsa store rm`) or damaged while this extraction wrote it, so it is not complete. {fix}."
    )


@dataclass(frozen=True)
class _Target:
    """Where units go: the workers, and the model id, spec and token budget that every unit names (see
    :mod:`.worker_pool`)."""

    workers: list[Any]
    mid: str
    spec: dict[str, Any]
    token_budget: int


def _finish_held_units(store: Any, target: _Target) -> list[dict[str, Any]]:
    """Wait for the units that another extraction of the same model holds, and take over those its writers abandon.

    Another coordinator's live claim is left alone (its unit is written once, by it); a claim whose writer died
    expires (or, on its own machine, ends with its process) and is then claimed here. Every claim is renewed by a
    live writer only, so this wait ends: when the other writers finish, or when their claims lapse.
    """
    import time

    results: list[dict[str, Any]] = []
    writer = store.writer(target.mid)
    while pending := writer.pending_units():
        free = [u.index for u in pending if writer.holder(u) is None]
        if free:
            results += _dispatch(target, free, lambda r: None, start=lambda: None)
        else:
            time.sleep(HELD_POLL_S)
    return results


def _failure(error: Exception, what: str) -> Exception:
    """A worker's failure as one line: the user's own mistake as itself, anything else as ExtractionFailedError."""
    cause = root_cause(error)  # the worker process died (ActorDiedError, a lost node): the error itself
    if isinstance(cause, UserError):
        return cause
    return ExtractionFailedError(
        f"Expected {what} to succeed. Got {one_line(cause)} from a worker instead. Re-run the same command to "
        "resume (units already written are kept); if it fails again, the worker logs under "
        "/tmp/ray/session_latest/logs hold its traceback."
    )


def _call(refs: Any, what: str) -> Any:
    """``ray.get(refs)``, with a worker's failure raised as one line (see :func:`_failure`)."""
    import ray

    try:
        return ray.get(refs)
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as error:
        raise _failure(error, what) from error


class UnitRuns:
    """Which unit each worker computes next: one run of consecutive pending units per worker, in order.

    A worker given consecutive units runs a document straddling two of them once (it carries the rows); a worker
    whose run is used up takes the back half of the longest run left, so runs stay consecutive while no worker idles.
    """

    def __init__(self, pending: list[int], n_workers: int) -> None:
        size, extra = divmod(len(pending), n_workers)
        bounds = [w * size + min(w, extra) for w in range(n_workers + 1)]
        self._runs = [list(reversed(pending[a:b])) for a, b in itertools.pairwise(bounds)]  # popped from the end

    def next(self, worker: int) -> int | None:
        """The next unit for ``worker``, or None when every unit has been handed out."""
        if not self._runs[worker]:
            longest = max(range(len(self._runs)), key=lambda w: len(self._runs[w]))
            run = self._runs[longest]
            self._runs[worker], self._runs[longest] = run[: (len(run) + 1) // 2], run[(len(run) + 1) // 2 :]
        return self._runs[worker].pop() if self._runs[worker] else None


def _dispatch(target: _Target, pending: list[int], on_result: Callable[[dict[str, Any]], Any],
              start: Callable[[], Any]) -> list[dict[str, Any]]:
    """Keep two units in flight per worker (one computing, one writing) until none is left, each worker's units
    consecutive (:class:`UnitRuns`)."""
    import ray

    start()
    workers, mid = target.workers, target.mid
    runs = UnitRuns(pending, len(workers))
    inflight: dict[Any, tuple[int, int]] = {}

    def submit(w: int) -> None:
        index = runs.next(w)
        if index is not None:
            inflight[workers[w].run_unit.remote(mid, index, target.spec, target.token_budget)] = (w, index)

    for w in range(len(workers)):
        for _ in range(2):
            submit(w)
    results = []
    while inflight:
        (ref,), _ = ray.wait(list(inflight), num_returns=1)
        w, index = inflight.pop(ref)
        try:
            results.append(_call(ref, f"unit {index} of model {mid}"))
        except Exception:
            _settle(list(inflight))
            raise
        on_result(results[-1])
        submit(w)
    return results


SETTLE_S = 60.0


def _settle(refs: list[Any]) -> None:
    """Let the units still in flight finish (or fail) before a failure is raised, up to SETTLE_S.

    Killing the workers at once would leave a unit half-written by one of them racing the caller: Ray's kill returns
    before the worker process is gone, so a re-run started right after could find a unit done that the failed run
    reported as not done. A unit is written in seconds; a worker stuck longer is killed with its unit pending.
    """
    import ray

    try:
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=SETTLE_S)
    except Exception:  # noqa: BLE001 -- the failure being raised is the one to report, not this wait's
        pass
