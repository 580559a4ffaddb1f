"""The extraction worker: one per GPU (or N on CPU). It loads a model, then turns work units into hidden
states written straight into the store; activations never leave the worker except to the store.

A worker may serve several extractions in turn (a pipeline keeps its workers: :mod:`hrsa.extract.worker_pool`),
loading each one's model when first asked for it. Every unit names its model's spec, so whatever the worker ran
before, and however often Ray restarted it, a unit is computed by the model it belongs to.

The class is plain Python; :func:`remote_worker_class` wraps it as a Ray actor that Ray restarts if
it dies, retrying its in-flight unit. A retried unit is safe: each unit is claimed, then written exactly once
(:mod:`hrsa.store.units`).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from hrsa.extract.identity import FILES_VERSION, files_version, model_content
from hrsa.extract.unit_documents import Carried, unit_documents
from hrsa.store.errors import UserError

if TYPE_CHECKING:
    import torch

    from hrsa.store import ActivationStore, WorkUnit
    from hrsa.store.corpus import CorpusTokens
    from hrsa.store.units import ModelWriter

__all__ = ["ExtractionWorker", "remote_worker_class"]


class ExtractionWorker:
    """Holds one loaded model at a time and writes the units it is given.

    Args:
        spec: :meth:`ModelSpec.to_dict` of a model to load now, or None to load one when a call names it.
        store_url, storage_options: where the store is (every node must reach it).
        device: "cpu", "cuda" or None (CUDA when this worker was given a GPU).
        cpu_threads: torch threads for a CPU worker (its share of the node's cores).
        write_threads: hidden states of a unit encoded, hashed and written at once (a GPU worker's CPUs; default 1);
            the bytes written do not depend on it.
    """

    def __init__(self, spec: Mapping[str, Any] | None, store_url: str,
                 storage_options: Mapping[str, Any] | None = None, *, device: str | None = None,
                 cpu_threads: int | None = None, write_threads: int | None = None) -> None:
        import torch

        from hrsa.store import ActivationStore
        from hrsa.store.errors import StoreNotFoundError

        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self._device = device
        self._write_threads = max(1, write_threads or 1)
        self._model_lock = threading.Lock()  # a threaded actor overlaps one unit's compute with another's write
        self._bind_lock = threading.Lock()
        self._writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hrsa-write")
        self._carried = Carried()  # rows of documents straddling units, computed once, for the next unit
        self._buffers = UnitBuffers()
        self._forwards = _Forwards()
        self._writer: ModelWriter | None = None
        self._corpus: CorpusTokens | None = None
        self._spec: dict[str, Any] | None = None  # the spec of the model loaded (None: none)
        self._loaded: Any = None
        # A user's mistake found while starting (a store it cannot open, a model that cannot load) is kept and
        # raised by describe(): Ray reports an exception raised in __init__ only as text, losing its type.
        self._error: UserError | None = None
        self._store_at = (store_url, storage_options)
        self._store: ActivationStore | None = None
        try:
            try:
                self._store = ActivationStore.open(store_url, mode="r+", storage_options=storage_options)
            except StoreNotFoundError:  # made by the coordinator once the model loaded and its layers fit: opened at bind
                pass
            if spec is not None:
                self._use(spec)
        except UserError as error:
            self._error = error

    def _use(self, spec: Mapping[str, Any]) -> Any:
        """The loaded model of ``spec``: loaded now unless it is the one held (the one held is freed first).

        ``spec`` may carry the version of the files its extraction began with (:func:`files_version`): the model
        held is then the same only if its files were, and what is loaded is checked against it.

        Callers compute with the model returned, never ``self._loaded`` read later: a unit is computed by the model
        its own call named, whatever another call loads meanwhile.
        """
        with self._model_lock:  # never swapped under a forward pass
            if self._spec != dict(spec):
                if self._loaded is not None:  # another model held: dropped, with the rows carried from its batches
                    self._spec, self._loaded = None, None
                    self._carried.clear()
                    self._buffers.clear()
                    _free_memory()
                self._loaded = _load_as_found(spec, self._device)
                self._spec = dict(spec)
            return self._loaded

    def describe(self, spec: Mapping[str, Any] | None = None, *, digest: bool = False) -> dict[str, Any]:
        """What the coordinator records about model ``spec`` (verified by loading it; None: the one loaded); with
        ``digest``, its source holds ``content``, the digest of the files this worker loaded (one read of them:
        asked of one worker only).

        Raises:
            UserError: the store could not be opened, or the model could not be loaded as asked.
        """
        if self._error is not None:
            raise self._error
        if spec is None and self._loaded is None:
            raise RuntimeError("describe() needs the model's spec: this worker holds no model")
        m = self._loaded if spec is None else self._use(spec)
        source = dict(m.source)
        if digest and (content := model_content(m.spec)) is not None:
            source["content"] = content  # weights changed in place at the same path are another model
        return {"n_hidden_states": m.n_hidden_states, "hidden_size": m.hidden_size, "dtype": m.dtype,
                "attention": m.attention, "source": source, "attn_implementation": m.attn_implementation,
                "tokenizer_fingerprint": m.tokenizer_fingerprint, "node": os.uname().nodename, "pid": os.getpid(),
                "device": str(m.device)}

    def pid(self) -> int:
        """This worker's process id: a kept worker whose id changed was restarted by Ray (see :mod:`.worker_pool`)."""
        return os.getpid()

    def bind(self, mid: str, spec: Mapping[str, Any]) -> None:
        """Write model ``spec`` into model ``mid`` (created by the coordinator) from now on: the model loaded, the
        store's record of ``mid`` and its corpus's tokens read afresh (a model of the same id may have been deleted
        and created again since this worker last wrote it), the rows carried from earlier units dropped."""
        if self._error is not None:
            raise self._error
        self._use(spec)
        self._carried.clear()
        self._bound(mid, fresh=True)

    def _bound(self, mid: str, *, fresh: bool = False) -> ModelWriter:
        with self._bind_lock:
            if fresh or self._writer is None or self._writer.info.id != mid:
                if self._store is None:
                    from hrsa.store import ActivationStore

                    url, options = self._store_at
                    self._store = ActivationStore.open(url, mode="r+", storage_options=options)
                writer = self._store.writer(mid)
                self._corpus = self._store.corpus_tokens(writer.info.corpus, checked=False)  # run_extraction checked it
                self._writer = writer
            return self._writer

    def run_unit(self, mid: str, index: int, spec: Mapping[str, Any], token_budget: int = 8192) -> dict[str, Any]:
        """Compute unit ``index`` of model ``mid`` with model ``spec``, at most ``token_budget`` padded tokens a
        forward pass, and write it; returns what happened (for progress and checks).

        The model id, spec and budget come with every unit, not only with :meth:`bind`: an actor that Ray restarts
        runs ``__init__`` again (with no model) but no ``bind``, and its retried units must still know where to go
        and which model computes them. Kept workers then serve extractions of any token budget.
        """
        if self._error is not None:
            raise self._error
        model = self._use(spec)
        writer = self._bound(mid)
        unit = writer.units()[index]
        report = {"unit": index, "tokens": unit.n_tokens, "written": False, "node": os.uname().nodename,
                  "node_id": _ray_node_id(), "pid": os.getpid()}
        self._forwards.begin(mid, index)
        try:
            # The claim comes before the forward pass: a unit another writer holds or finished costs no compute here.
            with writer.claimed(unit) as claim:
                if claim is None:
                    return report
                states = self._unit_states(model, mid, unit, writer.info.hidden_states, token_budget)
                self._forwards.end(mid, index)
                # One writer thread: this unit's shards are encoded, hashed and written while the actor's other
                # thread runs the next unit's forward passes, and no more than one unit is being written at once.
                # Its error is raised here, as this unit's failure; the done record is written before it returns.
                try:
                    written = self._writes.submit(writer.write_unit, unit, states, claim=claim,
                                                   threads=self._write_threads).result()
                finally:
                    self._buffers.give(states)  # write_unit returns (or raises) once no thread reads them
                return {**report, "written": written}
        finally:
            self._forwards.end(mid, index)

    def _unit_states(self, model: Any, mid: str, unit: WorkUnit, layers: tuple[int, ...],
                     token_budget: int) -> dict[int, torch.Tensor]:
        """(unit.n_tokens, D) per stored hidden state of loaded ``model``: each document run once (see
        :mod:`.unit_documents`)."""
        offsets = self._corpus.doc_offsets  # type: ignore[union-attr]  # set by _bound, which run_unit calls first
        plan = unit_documents(offsets, unit.start, unit.stop)
        out = self._buffers.take(layers, (unit.n_tokens, model.hidden_size), model.model.dtype)

        def place(doc: int, first: int, states: dict[int, torch.Tensor]) -> None:
            """Put a document's rows from corpus token ``first`` on into the unit (from the device straight into the
            unit's buffers); carry those past its end (on the host)."""
            lo, hi = max(unit.start, first), min(unit.stop, int(offsets[doc + 1]))
            for k in layers:
                out[k][lo - unit.start : hi - unit.start] = states[k][lo - first : hi - first]
            if offsets[doc + 1] > unit.stop:
                self._carried.put(mid, doc, unit.stop, {k: v[unit.stop - first :].to("cpu") for k, v in states.items()})

        # Step 1: the documents that start in this unit: those inside it batched, the one running past its end alone.
        with self._model_lock:
            for doc, states in self._forward(model, plan.inside, layers, token_budget):
                place(doc, int(offsets[doc]), states)
            if plan.tail is not None:
                place(plan.tail, int(offsets[plan.tail]), self._forward_alone(model, plan.tail, layers))
        # Step 2: the document begun before this unit: its rows as the unit before carried them when this worker
        # ran that unit (waiting for its forward passes if they are under way here), else the document run alone.
        if plan.head is not None:
            self._forwards.wait_for(mid, unit.index - 1)
            states = self._carried.take(mid, plan.head, unit.start)
            if states is None:
                with self._model_lock:
                    states = {k: v[unit.start - int(offsets[plan.head]) :]
                              for k, v in self._forward_alone(model, plan.head, layers).items()}
            place(plan.head, unit.start, states)
        return out

    def _forward(self, model: Any, docs: tuple[int, ...], layers: tuple[int, ...],
                 token_budget: int) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
        """(document, {layer: (T, D)}) of each document, batched under the token budget."""
        from hrsa.extract.forward import batched_hidden_states

        texts = [self._corpus.document(d).tolist() for d in docs]  # type: ignore[union-attr]
        for j, states in batched_hidden_states(model, texts, layers, token_budget=token_budget, on_host=False):
            yield docs[j], states

    def _forward_alone(self, model: Any, doc: int, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """A document in a batch of its own: bits that do not depend on which unit runs it."""
        from hrsa.extract.forward import batched_hidden_states

        ((_, states),) = batched_hidden_states(model, [self._corpus.document(doc).tolist()], layers,  # type: ignore[union-attr]
                                               token_budget=1, on_host=False)
        return states


class UnitBuffers:
    """Host buffers of a unit's hidden states, kept for the next unit of the same shape. A unit's states are 730 MB
    for a 1.5B model (8,192 tokens x 29 x 1536 x bf16): fresh memory is faulted in page by page as it is first
    written (~4 GB/s on a 2-core VM against ~16 GB/s into memory used before), and on a GPU worker the device's rows
    went to fresh host tensors first and were then copied into fresh unit tensors (an H200 extracted at 17.5x its
    bare forward passes, 12.3x with kept buffers). Two units are in flight, so two sets are kept at most, and none of
    another shape or of a model let go (:meth:`clear`). Not pinned: pinned memory cannot be swapped, and torch keeps
    freed pinned blocks cached, rounded up to a power of two; the copy from the device into pageable memory used
    before is not what bounds a GPU worker (its write path is: README, GPU figures)."""

    KEPT = 2

    def __init__(self) -> None:
        self._free: list[dict[int, torch.Tensor]] = []
        self._lock = threading.Lock()

    def take(self, layers: tuple[int, ...], shape: tuple[int, int], dtype: torch.dtype) -> dict[int, torch.Tensor]:
        """A set of ``layers`` buffers of ``shape`` and ``dtype``: one kept, else new (the kept ones of another shape
        are let go: the last unit of a model, or another model)."""
        import torch

        with self._lock:
            for i, held in enumerate(self._free):
                first = next(iter(held.values()), None)
                if tuple(held) == tuple(layers) and first is not None and tuple(first.shape) == shape and first.dtype == dtype:
                    return self._free.pop(i)
            self._free = []
        return {k: torch.empty(shape, dtype=dtype) for k in layers}

    def give(self, buffers: dict[int, torch.Tensor]) -> None:
        """Keep a set whose unit is written (nothing reads it any more)."""
        with self._lock:
            self._free = [buffers, *self._free][: self.KEPT]

    def clear(self) -> None:
        with self._lock:
            self._free = []


class _Forwards:
    """Units whose forward passes are under way in this worker, so a unit can wait for the one before it (whose
    carried rows it needs) instead of running that unit's last document again."""

    def __init__(self) -> None:
        self._running: set[tuple[str, int]] = set()
        self._changed = threading.Condition()

    def begin(self, mid: str, index: int) -> None:
        with self._changed:
            self._running.add((mid, index))

    def end(self, mid: str, index: int) -> None:
        with self._changed:
            self._running.discard((mid, index))
            self._changed.notify_all()

    def wait_for(self, mid: str, index: int) -> None:
        """Return once unit ``index`` is not running here (its forward passes done, or it never ran here)."""
        with self._changed:
            self._changed.wait_for(lambda: (mid, index) not in self._running)


def _load_as_found(spec: Mapping[str, Any], device: str | None) -> Any:
    """Load ``spec``'s model, checking before and after that its files are those its extraction began with.

    Raises:
        UserError: the files changed since (weights saved into the folder while the extraction ran).
    """
    from hrsa.extract.model_spec import ModelSpec
    from hrsa.extract.models import load_model

    model_spec = ModelSpec.from_dict({k: v for k, v in spec.items() if k != FILES_VERSION})
    _check_files(model_spec, spec.get(FILES_VERSION))
    loaded = load_model(model_spec, device=device)
    _check_files(model_spec, spec.get(FILES_VERSION))  # not written while they loaded
    return loaded


def _check_files(spec: Any, expected: str | None) -> None:
    if expected is not None and files_version(spec) != expected:
        raise UserError(f"Expected the files of model {spec.path} as this extraction found them when it began. Got "
                        "other files there now (written since). Re-run once they are complete: the re-run compares "
                        "them with what the store holds.")


def _free_memory() -> None:
    """Return a dropped model's memory before the next one loads (its GPU memory too: torch caches freed blocks)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ray_node_id() -> str:
    """The Ray node this worker runs on ("" outside Ray): several nodes of one machine share a host name."""
    ray = sys.modules.get("ray")  # never imported here: a worker run in-process (benchmarks/gpu.py) may have no Ray
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""


def remote_worker_class(*, num_gpus: float, num_cpus: float, max_restarts: int = 3,
                        worker_class: type[ExtractionWorker] | None = None) -> Any:
    """:class:`ExtractionWorker` as a Ray actor: restarted when it dies, its in-flight units retried.

    ``max_concurrency=2`` lets a second unit's forward passes run while the first one's shards are encoded,
    hashed and written (by the worker's one writer thread), so at most two units of activations are in memory
    per worker (and, while one is written, up to ``write_threads`` of its shards encoded at once: ~2 shard sizes each
    with compression). The coordinator gives a worker consecutive units, so a document straddling two of them runs
    once.
    ``worker_class`` swaps in a subclass (the tests inject faults this way) under the same options.
    """
    import ray

    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=max_restarts,
                      max_concurrency=2)(worker_class or ExtractionWorker)
