"""Extraction on Ray, end to end on tiny models: every unit written once, data equal to the one-document
reference, a killed worker, a resumed run, bidirectional attention, a layer subset. (The user's
mistakes are in test_extract_errors.py.)

Runs share the session's local Ray (2 CPUs) and a few module-scoped extractions: a worker process
costs ~10 s to start here (importing torch and transformers), so each run is reused by several tests.

Numerics that these tests pin down (measured on these machines, CPU fp32):
- One document per forward pass (``token_budget=1``) stores exactly the bits of
  :func:`forward_hidden_states` on that document alone, at the same torch thread count.
- Batched documents (right-padded, masked) differ from the lone pass by a few ulps: blocked CPU
  kernels sum in another order for another shape (measured <= 4.8e-7 abs on the tiny models, whose
  states are <= 3.6 in size, i.e. ~2 ulps). ``BATCH_RTOL`` allows 1e-5 of each hidden state's largest
  value, 20x the measured error and far below any real difference (bidirectional changes are ~1e-2).
- The thread count matters too: 1 vs 2 threads change some shapes' results by ~1 ulp. A reference
  that should match bit for bit runs with the worker's thread count (the node's CPUs / workers).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hrsa.extract import worker as worker_module
from hrsa.extract.forward import batched_hidden_states, torch_threads
from hrsa.extract.config import ExtractConfig
from hrsa.extract.job import ExtractionWorkers, ExtractResult, run_extraction
from hrsa.extract.models import forward_hidden_states, load_model, parse_model_spec
from hrsa.runtime.fingerprint import file_digest
from hrsa.store import ActivationStore
from hrsa.store.errors import LayerOutOfRangeError

BATCH_RTOL = 1e-5  # of each hidden state's largest |value|: see the module docstring
SHARD_TOKENS = 32  # ~10 units over the corpus below
PAIR = ("pair-a", "pair-b")  # two documents that differ only in their last token
TEXTS = {
    "pair-a": "the quick brown fox jumps over the lazy dog",
    "pair-b": "the quick brown fox jumps over the lazy fox",
    "short": "w1 w2 w3",
    "one-token": "x",
    "tiny": "hidden states of a tiny model " * 3,
    "dogs": "the lazy dog " * 12,
    "foxes": "the quick brown fox " * 10,
    "mixed": "hidden states of a tiny model the quick brown fox " * 2,
    "words": "w1 w2 w3 " * 8,
    "jumps": "jumps over " * 20,
    "model": "tiny model " * 5,
    "sentences": "the quick brown fox jumps over the lazy dog " * 4,
}

pytestmark = pytest.mark.integration  # nearly every test here reads a store that Ray workers wrote


# -- helpers ---------------------------------------------------------------------------------------
def write_jsonl(path: Path, records: dict[str, str] | Sequence[dict[str, Any]]) -> Path:
    rows = [{"id": k, "text": v} for k, v in records.items()] if isinstance(records, dict) else list(records)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path



def worker_threads(ray_local: Any, workers: int) -> int:
    return max(1, int(ray_local.n_cpus // workers))  # as job._placement gives each CPU worker


def stored_states(store_url: str, mid: str) -> dict[int, np.ndarray]:
    """Every stored hidden state of ``mid``, (N, D) each."""
    store = ActivationStore.open(store_url)
    return {k: store.hidden_state(mid, k).compute() for k in store.model_info(mid).hidden_states}


def documents(store_url: str, cid: str) -> tuple[list[str], list[list[int]], np.ndarray]:
    """(record ids, token ids of each document, document offsets) of a stored corpus."""
    store = ActivationStore.open(store_url)
    table, docs = store.tokens(cid), store.documents(cid)
    ids = table["token_id"].to_numpy()
    offsets = np.concatenate([[0], docs["stop"].to_numpy()])
    return list(docs["record_id"]), [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])], offsets


def reference(model_dir: Path, docs: list[list[int]], *, threads: int, attention: str = "auto") -> list[torch.Tensor]:
    """Each document alone through the model: (L+1, T, D) per document."""
    loaded = load_model(parse_model_spec(str(model_dir), attention=attention), device="cpu")  # type: ignore[arg-type]
    with torch_threads(threads):
        return forward_hidden_states(loaded, docs)


def assert_batched_close(got: np.ndarray, want: torch.Tensor, what: str) -> None:
    """Equal within BATCH_RTOL of the hidden state's largest value (batched kernels sum in another order)."""
    tol = BATCH_RTOL * float(want.abs().max())
    err = float(np.abs(got - want.numpy()).max())
    assert err <= tol, f"{what}: max |stored - reference| = {err:.3g} > {tol:.3g}"


def done_mask(store_url: str, mid: str = "tiny") -> np.ndarray:
    return ActivationStore.open(store_url, mode="r+").writer(mid).done_mask()  # r+ only to get a writer; reads


def store_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under a local store: any write at all changes it."""
    files = (p for p in sorted(path.rglob("*")) if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@dataclass(frozen=True)
class Run:
    store: str
    config: ExtractConfig
    result: ExtractResult
    progress: tuple[tuple[int, int], ...]
    seconds: float


def extract(tmp: Path, model_dir: Path, corpus: Path, **options: Any) -> Run:
    config = ExtractConfig(store=str(tmp / "store"), model=str(model_dir), corpus=str(corpus), name="tiny",
                           shard_tokens=SHARD_TOKENS, **options)
    progress: list[tuple[int, int]] = []
    start = time.perf_counter()
    result = run_extraction(config, on_progress=lambda n, total: progress.append((n, total)))
    return Run(config.store, config, result, tuple(progress), time.perf_counter() - start)


def faulty_worker(folder: Path, *, crash: bool = False, fail_after_writes: int | None = None,
                  fail_on_unit: int | None = None, delay_s: float = 0.0) -> type:
    """An ExtractionWorker that logs each unit it writes to ``folder/writes`` and fails on cue.

    crash: two deaths, each claimed once per run by a marker file: (1) on the third unit of a worker's
        life, half-write the unit (garbage in one hidden state, no done flag) and ``os._exit(1)``;
        (2) on the next unit written after that, die once it is written and flagged, before the reply.
    fail_after_writes: raise (an ordinary task error: Ray does not retry it) once that many units
        are written, so run_extraction stops part-way.
    fail_on_unit: raise on that unit at once; every other unit waits ``delay_s`` first (still in flight then).

    Defined in a function so Ray pickles the class by value (the test module is not importable in a
    worker); it uses nothing from this module's globals but imported modules.
    """
    base = worker_module.ExtractionWorker
    log = str(folder / "writes")

    class FaultyWorker(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._nth = iter(range(1, 1 << 30))  # next() is atomic under the GIL: one number per unit
            self._log_lock = threading.Lock()

        @staticmethod
        def _claim(name: str) -> bool:
            try:
                os.close(os.open(os.path.join(str(folder), name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return True
            except FileExistsError:
                return False

        def _claim_death_1(self, mid: str, index: int) -> bool:
            return not self._store.writer(mid).done_mask()[index] and self._claim("death-1")

        def run_unit(self, mid: str, index: int, spec: dict[str, Any], token_budget: int = 8192) -> dict[str, Any]:
            nth = next(self._nth)
            if index == fail_on_unit:
                raise RuntimeError(f"injected fault before unit {index}")
            time.sleep(delay_s)
            if fail_after_writes is not None and os.path.exists(log):
                with open(log) as f:
                    if len(f.readlines()) >= fail_after_writes:
                        raise RuntimeError(f"injected fault before unit {index}")
            # The actor runs two units at once: each death holds the lock that a unit holds from its write to its
            # log line, so that one thread's os._exit cannot fall between the other's and leave a written unit unlogged.
            if crash and nth == 3 and self._claim_death_1(mid, index):
                with self._log_lock:
                    writer = self._store.writer(mid)  # not the worker's own binding: a restart must rebuild that
                    unit = writer.units()[index]
                    k = writer.info.hidden_states[0]
                    array = self._store.group(f"models/{mid}")[f"hidden/{k}"]
                    array[unit.start : unit.stop] = np.full((unit.n_tokens, array.shape[1]), 7, dtype=array.dtype)
                    os._exit(1)  # half a unit on disk, no done flag
            with self._log_lock:
                result = super().run_unit(mid, index, spec, token_budget)
                if result["written"]:
                    with open(log, "a") as f:
                        f.write(f"{index} {os.getpid()}\n")
                    if crash and os.path.exists(os.path.join(str(folder), "death-1")) and self._claim("death-2"):
                        os._exit(1)  # written and flagged, but the reply is lost: the retry must not write again
            return result

    return FaultyWorker


def use_worker_class(monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
    """Make run_extraction start ``cls`` under the product's own actor options (restarts, retries)."""
    monkeypatch.setattr(worker_module, "remote_worker_class",
                        functools.partial(worker_module.remote_worker_class, worker_class=cls))


def logged_writes(folder: Path) -> list[tuple[int, int]]:
    lines = (folder / "writes").read_text().split()
    return [(int(u), int(p)) for u, p in zip(lines[::2], lines[1::2])]


# -- shared runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", TEXTS)


@pytest.fixture(scope="module")
def llama_run(ray_local: Any, tiny_models: Any, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The uninterrupted run: tiny Llama, 2 CPU workers, default (batching) token budget."""
    return extract(tmp_path_factory.mktemp("llama"), tiny_models.dir("llama"), corpus_file, workers=2)


@pytest.fixture(scope="module")
def qwen2_run(ray_local: Any, tiny_models: Any, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Tiny Qwen2, 2 CPU workers, one document per forward pass."""
    return extract(tmp_path_factory.mktemp("qwen2"), tiny_models.dir("qwen2"), corpus_file, workers=2, token_budget=1)


# -- mechanics -------------------------------------------------------------------------------------
def check_every_unit_written(run: Run) -> None:
    info = ActivationStore.open(run.store).model_info("tiny")
    assert info.complete and info.n_units == run.result.n_units >= 8
    assert run.result.units_written == info.n_units  # a fresh run writes each unit, once
    assert done_mask(run.store).all()
    assert run.progress[0] == (0, info.n_tokens)  # start: nothing done yet
    assert sum(n for n, _ in run.progress) == info.n_tokens  # then each unit's tokens, once


def test_two_workers_write_every_unit(llama_run: Run, qwen2_run: Run) -> None:
    check_every_unit_written(llama_run)
    check_every_unit_written(qwen2_run)
    assert llama_run.result.nodes == (os.uname().nodename,)


def test_batched_llama_equals_each_document_alone(llama_run: Run, tiny_models: Any, ray_local: Any) -> None:
    """Default budget: a unit's documents share forward passes; equal to the lone pass within BATCH_RTOL."""
    stored = stored_states(llama_run.store, "tiny")
    _, docs, offsets = documents(llama_run.store, llama_run.result.corpus_id)
    want = reference(tiny_models.dir("llama"), docs, threads=worker_threads(ray_local, 2))
    for d, ref in enumerate(want):
        for k in stored:
            assert_batched_close(stored[k][offsets[d] : offsets[d + 1]], ref[k], f"doc {d} hidden state {k}")


def test_one_document_per_pass_is_bit_exact(qwen2_run: Run, tiny_models: Any, ray_local: Any) -> None:
    """token_budget=1: every document runs alone, as the reference does; the store keeps every bit."""
    stored = stored_states(qwen2_run.store, "tiny")
    _, docs, offsets = documents(qwen2_run.store, qwen2_run.result.corpus_id)
    want = reference(tiny_models.dir("qwen2"), docs, threads=worker_threads(ray_local, 2))
    for d, ref in enumerate(want):
        for k in stored:
            got = stored[k][offsets[d] : offsets[d + 1]]
            np.testing.assert_array_equal(got, ref[k].numpy(), err_msg=f"doc {d} state {k}")


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_batched_forward_in_process(tiny_models: Any, kind: str) -> None:
    """The same claims without Ray, for both models: budget 1 exact, batched within BATCH_RTOL."""
    loaded = load_model(parse_model_spec(str(tiny_models.dir(kind))), device="cpu")
    docs = [loaded.tokenizer(text).input_ids for text in TEXTS.values()]
    want = forward_hidden_states(loaded, docs)
    layers = list(range(loaded.n_hidden_states))
    for budget in (1, 8192):
        got = dict(batched_hidden_states(loaded, docs, layers, token_budget=budget))
        for d, ref in enumerate(want):
            for k in layers:
                if budget == 1:
                    assert torch.equal(got[d][k], ref[k])
                else:
                    assert_batched_close(got[d][k].numpy(), ref[k], f"doc {d} state {k}")


def test_model_attributes_record_the_extraction(llama_run: Run, tiny_models: Any) -> None:
    info = ActivationStore.open(llama_run.store).model_info("tiny")
    assert (info.n_hidden_states, info.hidden_states, info.hidden_size) == (3, (0, 1, 2), tiny_models.hidden)
    assert (info.dtype, info.attention, info.corpus) == ("float32", "causal", llama_run.result.corpus_id)
    assert info.source["kind"] == "local" and info.source["path"] == str(tiny_models.dir("llama").resolve())
    assert info.source["transformers_version"] and info.source["attention"] == "auto"
    tokenizer = info.extraction.pop("tokenizer")  # each model records its own tokenizer: corpora do not
    assert tokenizer["name"]
    assert tokenizer["fingerprint"].startswith("sha256:")
    corpus = Path(llama_run.config.corpus).resolve()  # what `hrsa analyze` reads the probes' labels back from
    from hrsa.runtime.fingerprint import records_fingerprint

    assert info.extraction.pop("corpus_file") == {  # what extraction read of it: each record's id and text
        "path": str(corpus), "digest": file_digest(corpus), "records": {
            "sha256": records_fingerprint(str(corpus), fields=("text",)), "fields": ["text"], "id_field": None,
            "max_docs": None}}
    assert info.extraction == {"token_budget": 8192, "attn_implementation": "sdpa", "max_tokens": None,
                               "max_docs": None}
    assert info.layout.shard_tokens == SHARD_TOKENS


def test_rerunning_a_complete_extraction_writes_nothing(llama_run: Run) -> None:
    before = store_digest(Path(llama_run.store))
    again = run_extraction(llama_run.config)
    first = llama_run.result
    assert (again.units_written, again.n_units, again.corpus_id) == (0, first.n_units, first.corpus_id)
    assert store_digest(Path(llama_run.store)) == before


# -- a killed worker -------------------------------------------------------------------------------
def test_killed_worker_is_restarted_and_no_unit_is_lost_or_written_twice(
    llama_run: Run, tiny_models: Any, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_worker_class(monkeypatch, faulty_worker(tmp_path, crash=True))
    run = extract(tmp_path, tiny_models.dir("llama"), corpus_file, workers=2)
    # Both deaths happened, and Ray restarted the worker each time (new processes wrote units).
    assert (tmp_path / "death-1").exists() and (tmp_path / "death-2").exists()
    writes = logged_writes(tmp_path)
    assert len({pid for _, pid in writes}) >= 3
    # Exactly once: every unit written by one writer, one time; the unit whose reply was lost counted
    # by its retry as not written (so the coordinator's count is short, never over).
    n = run.result.n_units
    assert Counter(u for u, _ in writes) == Counter(range(n))
    assert run.result.units_written < n and done_mask(run.store).all()
    # The final data is the uninterrupted run's, bit for bit (the half-written unit was redone).
    want = stored_states(llama_run.store, "tiny")
    for k, got in stored_states(run.store, "tiny").items():
        np.testing.assert_array_equal(got, want[k], err_msg=f"hidden state {k}")


def test_a_failed_run_finishes_the_units_in_flight_before_it_raises(
    tiny_models: Any, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_local: Any
) -> None:
    """Worker 2's first unit (6) fails at once while worker 1's two units (0, 1) and worker 2's second (7) are still
    computing (2 s each): run_extraction raises only once those are written. Killing the workers at once threw them
    away, or, as Ray's kill returns before a worker is gone, let one be written after the failure was reported."""
    with monkeypatch.context() as patch, ExtractionWorkers() as kept:
        use_worker_class(patch, faulty_worker(tmp_path, fail_on_unit=6, delay_s=2.0))
        with pytest.raises(RuntimeError, match="injected fault before unit 6"):
            run_extraction(ExtractConfig(store=str(tmp_path / "store"), model=str(tiny_models.dir("llama")),
                                         corpus=str(corpus_file), name="tiny", shard_tokens=SHARD_TOKENS, workers=2),
                           workers=kept)
        assert kept.actors == []  # a failed run closes kept workers too: the next one starts afresh
    assert np.flatnonzero(done_mask(str(tmp_path / "store"))).tolist() == [0, 1, 7]


# -- workers kept across extractions (a pipeline's) ------------------------------------------------
def pooled(kept: ExtractionWorkers, store: Path, model_dir: Path, corpus: Path, name: str, **options: Any) -> str:
    """Extract into ``store`` with the ``kept`` workers, one document per pass by default (bit-exact against the
    reference)."""
    config = ExtractConfig(store=str(store), model=str(model_dir), corpus=str(corpus), name=name,
                           shard_tokens=SHARD_TOKENS, **{"token_budget": 1, **options})
    assert run_extraction(config, workers=kept).units_written > 0
    return name


def assert_exact(store: Path, mid: str, model_dir: Path, threads: int) -> None:
    """Model ``mid`` of ``store`` holds the bits of ``model_dir`` run on each of its documents alone."""
    info = ActivationStore.open(str(store)).model_info(mid)
    stored = stored_states(str(store), mid)
    _, docs, offsets = documents(str(store), info.corpus)
    for d, ref in enumerate(reference(model_dir, docs, threads=threads)):
        for k, got in stored.items():
            np.testing.assert_array_equal(got[offsets[d] : offsets[d + 1]], ref[k].numpy(), err_msg=f"{mid} doc {d} state {k}")


def worker_pids(workers: ExtractionWorkers) -> list[int]:
    import ray

    return sorted(ray.get([a.pid.remote() for a in workers.actors]))


def test_kept_workers_start_once_and_run_each_extraction_with_its_own_model(
    tiny_models: Any, corpus_file: Path, tmp_path: Path, ray_local: Any
) -> None:
    """Three extractions through one set of workers: Qwen2, then Llama, then Llama over another corpus under the id
    just written (deleted first: the workers must read the new record and corpus, not the ones they hold) and with
    another token budget (each unit names its budget, so the workers serve any)."""
    store = tmp_path / "store"
    few = write_jsonl(tmp_path / "few.jsonl", {k: TEXTS[k] for k in ("dogs", "foxes", "short", "jumps")})
    with ExtractionWorkers() as workers:
        pooled(workers, store, tiny_models.dir("qwen2"), corpus_file, "first", workers=2)
        pids = worker_pids(workers)
        pooled(workers, store, tiny_models.dir("llama"), corpus_file, "second", workers=2)
        assert worker_pids(workers) == pids  # the same processes: started once
        ActivationStore.open(str(store), mode="r+").delete_model("second")
        pooled(workers, store, tiny_models.dir("llama"), few, "second", workers=2, token_budget=2)  # still one doc a pass
        assert worker_pids(workers) == pids
        # A model whose own code runs in the worker gets workers of its own, ended after it.
        pooled(workers, store, tiny_models.dir("llama"), few, "remote-code", workers=2, trust_remote_code=True)
        assert workers.actors == []
    assert workers.actors == [] and wait_for_free_cpus(ray_local) == ray_local.n_cpus  # closed: resources given back
    threads = worker_threads(ray_local, 2)
    assert_exact(store, "first", tiny_models.dir("qwen2"), threads)
    assert_exact(store, "second", tiny_models.dir("llama"), threads)
    info = ActivationStore.open(str(store)).model_info
    assert info("second").n_tokens < info("first").n_tokens and info("second").extraction["token_budget"] == 2


def test_kept_workers_load_weights_changed_at_the_same_path_anew(
    tiny_models: Any, corpus_file: Path, tmp_path: Path, ray_local: Any
) -> None:
    """The workers held the model loaded by its path and options: after other weights were saved into the folder, the
    next extraction through them wrote the old weights' states and recorded the new files' digest."""
    import shutil

    from hrsa.extract.identity import model_content
    from tests.conftest import save_tiny_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_models.dir("llama"), folder)
    store = tmp_path / "store"
    with ExtractionWorkers() as workers:
        pooled(workers, store, folder, corpus_file, "before", workers=1)
        save_tiny_model(folder, "llama", seed=5)  # other weights, the same path and options
        pooled(workers, store, folder, corpus_file, "after", workers=1)
    threads = worker_threads(ray_local, 1)
    assert_exact(store, "after", folder, threads)
    source = ActivationStore.open(str(store)).model_info("after").source
    assert source["content"] == model_content(parse_model_spec(str(folder)))


def test_a_worker_refuses_files_other_than_those_its_extraction_began_with(tiny_models: Any, tmp_path: Path) -> None:
    """A worker Ray restarts mid-run (or one kept) loads the path anew: weights saved there since would compute
    the rest of the units."""
    import shutil

    from hrsa.extract.identity import FILES_VERSION, files_version
    from hrsa.store.errors import UserError
    from tests.conftest import save_tiny_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_models.dir("llama"), folder)
    spec = parse_model_spec(str(folder))
    began = {**spec.to_dict(), FILES_VERSION: files_version(spec)}
    ActivationStore.open(str(tmp_path / "store"), mode="a")
    save_tiny_model(folder, "llama", seed=5)
    worker = worker_module.ExtractionWorker(None, str(tmp_path / "store"))
    with pytest.raises(UserError, match=r"Expected the files of model .*model as this extraction found them"):
        worker.describe(began)
    assert worker.describe({**spec.to_dict(), FILES_VERSION: files_version(spec)})["hidden_size"] > 0


def dying_on_model(folder: Path, mid: str) -> type:
    """An ExtractionWorker that dies (``os._exit``) on the first unit of model ``mid`` it is given, once per test."""
    base = worker_module.ExtractionWorker

    class DyingWorker(base):  # type: ignore[misc, valid-type]
        def run_unit(self, unit_mid: str, index: int, spec: dict[str, Any], token_budget: int = 8192) -> dict[str, Any]:
            if unit_mid == mid:
                try:
                    os.close(os.open(os.path.join(str(folder), "died"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    os._exit(1)
                except FileExistsError:
                    pass
            return {**super().run_unit(unit_mid, index, spec, token_budget), "pid": os.getpid()}

    return DyingWorker


def test_a_kept_worker_restarted_by_ray_runs_the_model_of_the_unit_it_is_given(
    tiny_models: Any, corpus_file: Path, tmp_path: Path, ray_local: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker ran Llama, then dies on its first Qwen2 unit; Ray restarts it and retries the unit. The restarted
    process must compute Qwen2's units with Qwen2 (not the first model it was started for, nor none)."""
    store = tmp_path / "store"
    use_worker_class(monkeypatch, dying_on_model(tmp_path, "second"))
    with ExtractionWorkers() as workers:
        pooled(workers, store, tiny_models.dir("llama"), corpus_file, "first", workers=1)
        (pid,) = worker_pids(workers)
        pooled(workers, store, tiny_models.dir("qwen2"), corpus_file, "second", workers=1)
        (restarted,) = worker_pids(workers)
        assert not workers._as_started()  # the next extraction replaces it: Ray's restart budget counts over a life
    assert (tmp_path / "died").exists() and restarted != pid
    threads = worker_threads(ray_local, 1)
    assert_exact(store, "first", tiny_models.dir("llama"), threads)
    assert_exact(store, "second", tiny_models.dir("qwen2"), threads)


# -- a resumed run ---------------------------------------------------------------------------------
def unit_files(store: str, n_units: int) -> dict[int, dict[str, tuple[int, str]]]:
    """(mtime, sha256) of every shard file of each unit, per unit: the unit's bytes on disk."""
    root = Path(store) / "models" / "tiny" / "hidden"
    files: dict[int, dict[str, tuple[int, str]]] = {u: {} for u in range(n_units)}
    for shard in root.glob("*/c/*/0"):  # hidden/<k>/c/<unit>/0: one shard per unit and hidden state
        digest = hashlib.sha256(shard.read_bytes()).hexdigest()
        files[int(shard.parent.name)][str(shard)] = (shard.stat().st_mtime_ns, digest)
    return files


def wait_for_free_cpus(ray_local: Any, timeout: float = 20.0) -> float:
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < ray_local.n_cpus:
        time.sleep(0.2)
    return float(ray.available_resources().get("CPU", 0))


def test_interrupted_run_resumes_only_the_units_not_done(
    llama_run: Run, tiny_models: Any, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_local: Any
) -> None:
    # Step 1: a run that fails part-way (a task error after 3 units).
    with monkeypatch.context() as patch:
        use_worker_class(patch, faulty_worker(tmp_path, fail_after_writes=3))
        with pytest.raises(RuntimeError, match="injected fault"):
            extract(tmp_path, tiny_models.dir("llama"), corpus_file, workers=2)
    store = ActivationStore.open(str(tmp_path / "store"), mode="r+")
    done = store.writer("tiny").done_mask()
    assert wait_for_free_cpus(ray_local) == ray_local.n_cpus  # the failed run's workers were given back
    time.sleep(1.0)  # room for a unit its workers would still be writing: the units in flight settled before it raised
    assert np.array_equal(store.writer("tiny").done_mask(), done)
    n = len(done)
    assert 3 <= done.sum() < n
    before = unit_files(str(tmp_path / "store"), n)
    # Step 2: the same extraction again computes and writes only the units not done.
    run = extract(tmp_path, tiny_models.dir("llama"), corpus_file, workers=2)
    assert run.result.units_written == n - done.sum()
    done_tokens = sum(u.n_tokens for u in store.writer("tiny").units() if done[u.index])
    assert run.progress[0] == (done_tokens, run.result.n_tokens)
    after = unit_files(run.store, n)
    assert all(after[u] == before[u] for u in range(n) if done[u])  # done units' files untouched
    # Step 3: identical to the uninterrupted run, bit for bit.
    want = stored_states(llama_run.store, "tiny")
    for k, got in stored_states(run.store, "tiny").items():
        np.testing.assert_array_equal(got, want[k], err_msg=f"hidden state {k}")


def poisoned_buffers_worker(folder: Path) -> type:
    """An ExtractionWorker whose unit buffers, once given back, are filled with NaN (a row a later unit failed to
    overwrite would be stored as NaN), and which logs the address of every unit buffer it takes."""
    base = worker_module.ExtractionWorker
    log = str(folder / "buffers")

    class Poisoned(worker_module.UnitBuffers):  # type: ignore[misc, name-defined]
        def take(self, *args: Any, **kwargs: Any) -> dict[int, Any]:
            taken = super().take(*args, **kwargs)
            with open(log, "a") as f:
                f.write(f"{next(iter(taken.values())).data_ptr()}\n")
            return taken

        def give(self, buffers: dict[int, Any]) -> None:
            for tensor in buffers.values():
                tensor.fill_(float("nan"))
            super().give(buffers)

    class PoisonedWorker(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._buffers = Poisoned()

    return PoisonedWorker


def test_a_worker_reuses_its_unit_buffers_and_no_row_of_an_earlier_unit_is_stored(
        llama_run: Run, tiny_models: Any, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit's host buffers are kept for the next unit (fresh memory is faulted in page by page: on the H200 the
    extraction wrote at 38% of its write path's own rate), so every row of a unit must be written again: buffers
    given back hold NaN here, and the store equals the run of fresh buffers bit for bit."""
    use_worker_class(monkeypatch, poisoned_buffers_worker(tmp_path))
    run = extract(tmp_path, tiny_models.dir("llama"), corpus_file, workers=1)
    want = stored_states(llama_run.store, "tiny")
    for k, got in stored_states(run.store, "tiny").items():
        np.testing.assert_array_equal(got, want[k], err_msg=f"hidden state {k}")
    taken = (tmp_path / "buffers").read_text().split()
    assert len(taken) == run.result.n_units >= 8
    assert len(set(taken)) <= 3  # two units in flight, and the last unit's shorter shape


def _cut_short_rm(store: str) -> None:
    """What `hrsa store rm` left when a worker's files came in while it deleted (before it deleted a model's zarr.json
    first): hidden state 2's metadata and every other shard of it gone, the model's own metadata and records kept."""
    hidden = Path(store) / "models" / "tiny" / "hidden" / "2"
    (hidden / "zarr.json").unlink()
    for shard in sorted((hidden / "c").glob("*/0"))[::2]:
        shard.unlink()


def _rm(store: str) -> None:
    """A whole deletion (one that did not see a live claim: between two units of a worker)."""
    ActivationStore.open(store, mode="r+")._delete_model_node("tiny")


@pytest.mark.parametrize(("deletion", "fix"), [(_cut_short_rm, "hrsa store rm"), (_rm, "Run the same command again")])
def test_a_model_deleted_while_it_is_extracted_fails_the_extraction_instead_of_reporting_it_complete(
    tiny_models: Any, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_local: Any,
    deletion: Any, fix: str,
) -> None:
    """`hrsa store rm` while `hrsa extract` wrote the model: the extraction printed "N of N units written" and exited 0,
    and `store ls` showed the model complete with a hidden state's metadata and shards gone. The deletion comes here
    once every unit is written, before the extraction reports (where a real race lands it last); the extraction must
    fail in one line naming what is gone and the fix."""
    from hrsa.extract import job
    from hrsa.extract.job import ExtractionFailedError

    finish = job._finish_held_units

    def deleted_first(store: Any, target: Any) -> Any:
        deletion(store.url)
        return finish(store, target)

    monkeypatch.setattr(job, "_finish_held_units", deleted_first)
    with pytest.raises(ExtractionFailedError, match=r"Expected model tiny whole in .* once its units were written\. "
                                                    r"Got .* instead: it was deleted .*" + fix) as failure:
        extract(tmp_path, tiny_models.dir("llama"), corpus_file, workers=1)
    assert "\n" not in str(failure.value)


@pytest.mark.parametrize("damage", ["hidden/1/zarr.json", "hidden/1/c"])
def test_a_rerun_over_a_complete_model_whose_metadata_is_damaged_fails_instead_of_reporting_it_complete(
    llama_run: Run, tiny_models: Any, corpus_file: Path, tmp_path: Path, damage: str,
) -> None:
    """A re-run of a finished extraction returned before any check: with a hidden state's metadata gone (what a
    `hrsa store rm` cut short, or an edit, leaves) `hrsa extract` printed "0 of N units written" and exited 0, though
    reads of that model fail. Before it reports the model complete it must be whole (model_damage), as a run that
    wrote units checks it: one line naming the damage and `hrsa store rm`, exit 1, the store left as it was."""
    import shutil

    from hrsa.cli import cli

    store = tmp_path / "store"
    shutil.copytree(llama_run.store, store)
    target = store / "models" / "tiny" / damage
    if target.is_dir():
        shutil.rmtree(target.parent)  # the whole hidden state: its metadata and shards
    else:
        target.unlink()
    result = CliRunner().invoke(cli, ["extract", "--store", str(store), "--model", str(tiny_models.dir("llama")),
                                      "--corpus", str(corpus_file), "--name", "tiny",
                                      "--shard-tokens", str(SHARD_TOKENS)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hrsa: error:"), result.stderr
    assert re.search(r"hidden/1: unreadable|hidden states \[0, 2\], but the attributes list \[0, 1, 2\]", lines[0])
    assert f"hrsa store rm {store} tiny" in lines[0]


# -- bidirectional attention, a layer subset, through the CLI --------------------------------------
@pytest.fixture(scope="module")
def bidirectional_run(
    ray_local: Any, tiny_models: Any, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    import yaml

    from hrsa.cli import cli

    folder = tmp_path_factory.mktemp("bidirectional")
    store = str(folder / "store")
    # What to extract from --config (required fields included), how it runs from flags: the two merge.
    config = folder / "extract.yaml"
    config.write_text(yaml.safe_dump({"store": store, "model": str(tiny_models.dir("llama")), "corpus": str(corpus_file),
                                      "name": "tiny-bidir", "attention": "causal", "layers": [1]}))
    result = CliRunner().invoke(cli, ["extract", "--config", str(config), "--attention", "bidirectional",
                                      "--layers", "0,2", "--workers", "1", "--shard-tokens", str(SHARD_TOKENS)])
    assert result.exit_code == 0, result.output
    assert "tiny-bidir: " in result.stdout and "units written this run" in result.stdout
    return store


def pair_states(store: str, mid: str, layer: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Hidden state ``layer`` of the two pair documents, and how many leading tokens they share."""
    s = ActivationStore.open(store)
    cid = s.model_info(mid).corpus
    records, docs, _ = documents(store, cid)
    a, b = (records.index(r) for r in PAIR)
    shared = next(i for i, (x, y) in enumerate(zip(docs[a], docs[b])) if x != y)
    assert len(docs[a]) == len(docs[b]) == shared + 1 >= 5  # only the last token differs
    return s.hidden_state(mid, layer, docs=[a]).compute(), s.hidden_state(mid, layer, docs=[b]).compute(), shared


def test_bidirectional_is_really_bidirectional(bidirectional_run: str, llama_run: Run) -> None:
    """Changing the last token moves earlier tokens' last hidden state under bidirectional attention only.

    Causal: earlier tokens equal within the batching tolerance (the two documents may sit in different
    batches, so not necessarily bit for bit); bidirectional: they move by far more than that.
    """
    bi_a, bi_b, shared = pair_states(bidirectional_run, "tiny-bidir", 2)
    ca_a, ca_b, _ = pair_states(llama_run.store, "tiny", 2)
    scale = float(np.abs(ca_a).max())
    assert np.abs(ca_a[:shared] - ca_b[:shared]).max() <= BATCH_RTOL * scale
    moved = np.abs(bi_a[:shared] - bi_b[:shared]).max(axis=1)  # (shared,): per earlier token
    assert (moved > 1e3 * BATCH_RTOL * scale).all()  # every earlier token, token 0 included, sees the change
    # The embedding output does not depend on attention at all.
    emb_bi, _, _ = pair_states(bidirectional_run, "tiny-bidir", 0)
    emb_ca, _, _ = pair_states(llama_run.store, "tiny", 0)
    np.testing.assert_array_equal(emb_bi, emb_ca)


def test_bidirectional_store_equals_the_bidirectional_reference(
    bidirectional_run: str, tiny_models: Any, ray_local: Any
) -> None:
    store = ActivationStore.open(bidirectional_run)
    _, docs, offsets = documents(bidirectional_run, store.model_info("tiny-bidir").corpus)
    want = reference(tiny_models.dir("llama"), docs, threads=worker_threads(ray_local, 1), attention="bidirectional")
    for k, got in stored_states(bidirectional_run, "tiny-bidir").items():
        for d, ref in enumerate(want):
            assert_batched_close(got[offsets[d] : offsets[d + 1]], ref[k], f"doc {d} state {k}")


def test_layer_subset_and_attributes(bidirectional_run: str, llama_run: Run) -> None:
    store = ActivationStore.open(bidirectional_run)
    info = store.model_info("tiny-bidir")
    assert (info.hidden_states, info.n_hidden_states, info.attention) == ((0, 2), 3, "bidirectional")
    assert info.source["attention"] == "bidirectional"
    assert sorted(store.group("models/tiny-bidir/hidden").array_keys()) == ["0", "2"]  # nothing else allocated
    with pytest.raises(LayerOutOfRangeError, match=r"in \[0, 2\]"):
        store.hidden_state("tiny-bidir", 1)
    assert info.corpus == llama_run.result.corpus_id  # same text, same tokenizer: one corpus


# -- the edges of a run: more workers than the cluster has, a worker's failure, a killed driver -----------------------
def assert_cli_error(result: Any, code: int, *fragments: str) -> str:
    """Exit ``code``, one "hrsa: error: Expected" line on stderr, no traceback; returns the line."""
    assert result.exit_code == code, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hrsa: error: Expected"), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_more_workers_than_the_cluster_can_place_is_refused_at_once(
    ray_local: Any, tiny_models: Any, corpus_file: Path, tmp_path: Path
) -> None:
    """3 CPU workers on a 2-CPU cluster: one line naming the most it can take, before any actor or store exists."""
    from hrsa.cli import cli

    n = int(ray_local.n_cpus) + 1
    start = time.monotonic()
    result = CliRunner().invoke(cli, ["extract", "--store", str(tmp_path / "store"), "--model", str(tiny_models.dir("llama")),
                                      "--corpus", str(corpus_file), "--workers", str(n)])
    assert time.monotonic() - start < 60  # never a hang
    assert_cli_error(result, 2, f"at most {int(ray_local.n_cpus)}", f"Got {n} instead", f"--workers {int(ray_local.n_cpus)}")
    assert not (tmp_path / "store").exists()
    assert wait_for_free_cpus(ray_local) == ray_local.n_cpus


def test_a_worker_failure_is_one_line_naming_the_unit(
    ray_local: Any, tiny_models: Any, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task error in a worker (not the user's to fix): exit 1, one line with the unit and the worker's error."""
    from hrsa.cli import cli

    (tmp_path / "writes").write_text("")  # fail_after_writes=0: every unit fails before it is computed
    use_worker_class(monkeypatch, faulty_worker(tmp_path, fail_after_writes=0))
    result = CliRunner().invoke(cli, ["extract", "--store", str(tmp_path / "store"), "--model", str(tiny_models.dir("llama")),
                                      "--corpus", str(corpus_file), "--name", "tiny", "--workers", "1",
                                      "--shard-tokens", str(SHARD_TOKENS)])
    line = assert_cli_error(result, 1, "of model tiny", "RuntimeError: injected fault before unit", "Re-run the same command")
    assert re.search(r"Expected unit (\d+) of model tiny to succeed\. Got RuntimeError: injected fault before unit \1 ", line)
    assert wait_for_free_cpus(ray_local) == ray_local.n_cpus


def test_worker_actors_are_owned_by_the_driver(ray_local: Any) -> None:
    """Not detached: when the driver dies, Ray ends its workers (test_killed_driver... shows it happening)."""
    import inspect

    from hrsa.extract import job

    source = inspect.getsource(job)
    assert "detached" not in source.replace("not detached", "")


def units_done(store: str) -> int:
    try:
        return ActivationStore.open(store).model_info("tiny").units_done
    except Exception:  # noqa: BLE001  (not created yet)
        return -1


@pytest.mark.slow  # ~140 s on 2 cores: a real driver process killed mid-run, then a resume
def test_killed_driver_stops_its_workers_and_an_immediate_resume_is_exact(
    ray_local: Any, tiny_models: Any, tmp_path: Path
) -> None:
    """SIGKILL the `hrsa extract` driver mid-run: its workers (owned actors) stop writing within a bounded time,
    and a resume started right after gives the bytes of an uninterrupted run."""
    import signal
    import subprocess
    import sys

    import ray

    texts = {f"d{i}": f"w{i % 7} the quick brown fox jumps over the lazy dog {i}" for i in range(300)}
    corpus = write_jsonl(tmp_path / "big.jsonl", texts)
    store = str(tmp_path / "store")
    exe = Path(sys.executable).parent / "hrsa"
    cmd = [str(exe), "extract", "--store", store, "--model", str(tiny_models.dir("llama")), "--corpus", str(corpus),
           "--name", "tiny", "--workers", "2", "--shard-tokens", "16", "--address", ray.get_runtime_context().gcs_address]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Step 1: kill the driver once its workers are writing.
        deadline = time.monotonic() + 180
        while units_done(store) < 5 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.1)
        assert driver.poll() is None, "the driver ended before it could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    # Step 2: within a bounded time, no more unit is written (the count holds still for 3 s).
    deadline, last, still_since = time.monotonic() + 30, units_done(store), time.monotonic()
    while time.monotonic() - still_since < 3:
        assert time.monotonic() < deadline, "workers of the killed driver kept writing"
        time.sleep(0.25)
        now = units_done(store)
        if now != last:
            last, still_since = now, time.monotonic()
    n_units = ActivationStore.open(store).model_info("tiny").n_units
    assert 5 <= last < n_units
    assert wait_for_free_cpus(ray_local) == ray_local.n_cpus  # the killed driver's workers are gone
    # Step 3: resume at once; the result equals an uninterrupted run, bit for bit.
    config = ExtractConfig(store=store, model=str(tiny_models.dir("llama")), corpus=str(corpus), name="tiny",
                           workers=2, shard_tokens=16)
    resumed = run_extraction(config)
    assert resumed.units_written == n_units - last
    fresh = run_extraction(config.model_copy(update={"store": str(tmp_path / "fresh")}))
    assert fresh.units_written == n_units
    want = stored_states(str(tmp_path / "fresh"), "tiny")
    for k, got in stored_states(store, "tiny").items():
        np.testing.assert_array_equal(got, want[k], err_msg=f"hidden state {k}")


def test_weights_changed_in_place_are_another_model_for_a_resume_and_a_rerun(
        tiny_models: Any, corpus_file: Path, tmp_path: Path, ray_local: Any) -> None:
    """A model retrained into the same folder: resuming the stored extraction would mix units of both weights, and
    a complete one would be reported as up to date. Both are refused, naming the weights, before anything is
    written; the stored model records its files' digest, and a worker that loads other files says so too."""
    import shutil

    from hrsa.extract.rerun import RerunMismatchError, loaded_mismatch
    from tests.conftest import save_tiny_model

    model = tmp_path / "model"
    shutil.copytree(tiny_models.dir("llama"), model)
    first = extract(tmp_path, model, corpus_file)
    store = ActivationStore.open(first.store, mode="r+")
    info = store.model_info("tiny")
    assert info.source["content"]
    save_tiny_model(model, "llama", seed=1)  # retrained in place
    with pytest.raises(RerunMismatchError, match=f"weights at local:{model}"):
        run_extraction(first.config)  # complete: not "nothing to do"
    writer = store.writer("tiny")
    for unit in writer.units()[-2:]:
        writer.reset_unit(unit)  # as a kill leaves them
    before = store_digest(Path(first.store))
    with pytest.raises(RerunMismatchError, match="weights at"):
        run_extraction(first.config)  # part-done: no unit of the new weights beside the old
    assert store_digest(Path(first.store)) == before
    from hrsa.extract.worker import ExtractionWorker

    worker = ExtractionWorker(parse_model_spec(str(model)).to_dict(), first.store, device="cpu")
    assert "content" not in worker.describe()["source"]  # a worker reads the files again only when asked
    assert loaded_mismatch(info, worker.describe(digest=True)) == [
        "weights whose files differ from those the stored model was extracted from"]


def test_a_relative_store_is_opened_by_the_workers_where_the_driver_is(ray_local: Any, tiny_models: Any,
                                                                        corpus_file: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers opened a relative --store in their own working folder (here the repository root, whose store/
    package they took for a store), not the driver's."""
    monkeypatch.chdir(tmp_path)
    run_extraction(ExtractConfig(store="store", model=str(tiny_models.dir("llama")), corpus=str(corpus_file),
                                 name="tiny", shard_tokens=SHARD_TOKENS))
    assert ActivationStore.open(str(tmp_path / "store")).model_info("tiny").complete
