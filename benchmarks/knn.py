"""k-NN overlap benchmark: exact search against numpy float64 brute force, HNSW speed and recall, memory under a budget.

Run (from the repository root):

    .venv/bin/python benchmarks/knn.py                    # full: 1M tokens of D = 576 in (c); ~15 min on 2 CPU cores
    .venv/bin/python benchmarks/knn.py --quick            # smoke size: about a minute
    .venv/bin/python benchmarks/knn.py --tokens 200000 --budget 1GB --json figures.json

What it measures, side by side in one run:

(a) Exact cosine k-NN (self excluded, ties by index) of one sample: the blocked FAISS search re-ranked in float64
    (:func:`hrsa.analyze.local.knn_search.exact_neighbors`) against numpy brute force in float64 (unit rows, the
    Gram matrix a block of 2,048 queries at a time, argpartition, ordered by (-cosine, index)): the time ratio, and
    the share of tokens whose k neighbours agree in order. Best of ``repeats`` after a burn-in.
(b) The approximate option (HNSW, M = 32): build + search time, its recall@k measured on ``recall_queries``
    sampled queries (exact neighbours of those queries only, not of every token), and the speed-up over exact
    search, whose time on every token is extrapolated from those queries (its cost is linear in the queries).
(c) Memory under ``--budget`` at ``--tokens`` sampled tokens of ``--hidden`` (default 1,000,000 x 576, float32 in
    a store on disk): the memory model's plan for the whole exact pass (blocks, reads of the sample, estimated
    peak), and, in a fresh process, the measured peak RSS (above the RSS before the search) of exact search of
    ``memory_queries`` queries against every sampled token, read from the store block by block with the plan's
    database blocks, beside the model's estimate for that run and the sample's own size. The whole exact pass
    at 1M tokens is O(N^2 D) (hours on 2 cores): its time is extrapolated from the measured queries.

Synthetic rows are activation-like: clusters on a low-rank subspace, Gaussian noise, and two dimensions with a
large offset (so all cosines sit near a shared direction, as in real hidden states).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helper, however this script is started

from fresh_process import run_in_fresh_process  # noqa: E402
from hrsa.runtime.resident import peak_resident_bytes, reset_peak, resident_bytes  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    k: int = 10
    hidden: int = 576  # SmolLM2-135M's width
    # (a) exact search against numpy float64 brute force
    speed_tokens: int = 16_384
    repeats: int = 2
    # (b) HNSW
    hnsw_tokens: int = 100_000
    recall_queries: int = 1_000
    # (c) memory under a budget
    tokens: int = 1_000_000
    budget: str = "2GB"
    memory_queries: int = 1_024
    shard_tokens: int | None = None  # the store's default: ~32 MiB shards (8,192 tokens of D = 576 float32)


QUICK = BenchConfig(hidden=64, speed_tokens=2_048, repeats=1, hnsw_tokens=8_192, recall_queries=500, tokens=50_000,
                    budget="60MB", memory_queries=256, shard_tokens=2_048)


def rows(n: int, d: int, seed: int = 0, offset: float = 20.0) -> np.ndarray:
    """(n, d) float32 activation-like rows: clusters on a low-rank subspace, noise, two offset dimensions."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, 16)) @ rng.normal(size=(16, d))  # (64, d)
    x = centers[rng.integers(0, 64, size=n)] + rng.normal(size=(n, d))  # (n, d)
    x[:, :2] += offset
    return x.astype(np.float32)


def numpy_neighbors(x: np.ndarray, k: int, block: int = 2048) -> np.ndarray:
    """Brute force in float64: unit rows, the Gram matrix a block of queries at a time, ordered by (-cosine, index)."""
    u = x.astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    out = np.empty((len(u), k), dtype=np.int64)
    for i in range(0, len(u), block):
        gram = u[i : i + block] @ u.T  # (b, N) float64
        gram[np.arange(len(gram)), np.arange(i, i + len(gram))] = -np.inf  # self excluded
        part = np.argpartition(-gram, k, axis=1)[:, :k]  # (b, k) unordered
        order = np.lexsort((part, -np.take_along_axis(gram, part, axis=1)), axis=1)
        out[i : i + block] = np.take_along_axis(part, order, axis=1)
    return out


def best_of(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_speed(cfg: BenchConfig) -> dict[str, float]:
    from hrsa.analyze.local.knn import exact_neighbors

    x = rows(cfg.speed_tokens, cfg.hidden)
    exact_neighbors(x[:512], cfg.k), numpy_neighbors(x[:512], cfg.k)  # burn-in: thread pools, BLAS buffers
    t_faiss = best_of(lambda: exact_neighbors(x, cfg.k), cfg.repeats)
    t_numpy = best_of(lambda: numpy_neighbors(x, cfg.k), cfg.repeats)
    agree = float(np.mean(np.all(exact_neighbors(x, cfg.k) == numpy_neighbors(x, cfg.k), axis=1)))
    print(f"(a) exact k-NN, N={cfg.speed_tokens}, D={cfg.hidden}, k={cfg.k}:")
    print(f"    FAISS blocked + float64 re-ranking {t_faiss:.2f} s, numpy float64 brute force {t_numpy:.2f} s, "
          f"ratio numpy / FAISS = {t_numpy / t_faiss:.2f}x; the same k neighbours in order for {100 * agree:.2f}% of tokens")
    # The same rows with massive-activation offsets (1e4 in two dimensions): every cosine within ~1e-8 of the others,
    # where float32 candidates must still resolve the rows' differences rather than re-rank whole blocks in float64.
    far = rows(cfg.speed_tokens, cfg.hidden, offset=1e4)
    t_far = best_of(lambda: exact_neighbors(far, cfg.k), cfg.repeats)
    t_far_numpy = best_of(lambda: numpy_neighbors(far, cfg.k), cfg.repeats)
    agree_far = float(np.mean(np.all(exact_neighbors(far, cfg.k) == numpy_neighbors(far, cfg.k), axis=1)))
    print(f"    at a 1e4 offset: {t_far:.2f} s against {t_far_numpy:.2f} s, ratio {t_far_numpy / t_far:.2f}x; the same "
          f"neighbours in order for {100 * agree_far:.2f}% of tokens")
    return {"exact_seconds": t_faiss, "numpy_float64_seconds": t_numpy, "ratio": t_numpy / t_faiss, "agreement": agree,
            "offset_1e4_ratio": t_far_numpy / t_far, "offset_1e4_agreement": agree_far}


def bench_hnsw(cfg: BenchConfig) -> dict[str, float]:
    from hrsa.analyze.local.knn import approximate_neighbors, exact_neighbors, neighbor_recall, sample_tokens

    x = rows(cfg.hnsw_tokens, cfg.hidden, seed=1)
    queries = sample_tokens(slice(0, len(x)), cfg.recall_queries, seed=0)
    start = time.perf_counter()
    approx = approximate_neighbors(x, cfg.k)
    t_hnsw = time.perf_counter() - start
    start = time.perf_counter()
    exact = exact_neighbors(x, cfg.k, queries=queries)
    t_queries = time.perf_counter() - start
    t_exact = t_queries * len(x) / len(queries)  # exact search costs the same per query: linear in the queries
    recall = neighbor_recall(approx[queries], exact)
    print(f"(b) approximate search (HNSW, M=32), N={cfg.hnsw_tokens}, D={cfg.hidden}, k={cfg.k}:")
    print(f"    build + search {t_hnsw:.2f} s; exact search of {len(queries)} sampled queries {t_queries:.2f} s, "
          f"so ~{t_exact:.1f} s for all {len(x)}; speed-up {t_exact / t_hnsw:.2f}x, recall@{cfg.k} = {recall:.4f} "
          f"(on the {len(queries)} queries)")
    return {"hnsw_seconds": t_hnsw, "exact_seconds_extrapolated": t_exact, "speedup": t_exact / t_hnsw, "recall": recall}


def write_store(path: Path, cfg: BenchConfig) -> None:
    """One model, one hidden state of ``cfg.tokens`` activation-like float32 rows, in documents of 1,000 tokens."""
    from hrsa.store import ActivationStore
    from hrsa.store.testing import make_table

    store = ActivationStore.open(str(path), mode="a")
    lengths = (1000,) * (cfg.tokens // 1000) + ((cfg.tokens % 1000,) if cfg.tokens % 1000 else ())
    cid = store.write_corpus(make_table(lengths), tokenizer={"name": "bench", "fingerprint": "bench"})
    store.create_model("m", corpus=cid, n_hidden_states=1, hidden_size=cfg.hidden, dtype="float32",
                       shard_tokens=cfg.shard_tokens)
    writer = store.writer("m")
    for unit in writer.units():
        writer.write_unit(unit, {0: rows(unit.stop - unit.start, cfg.hidden, seed=unit.start)})


def _memory_child(path: str, cfg: BenchConfig, out: Any) -> None:
    import faiss  # noqa: F401  (imported before the baseline: its libraries are not the search's memory)

    from hrsa.analyze.local.knn_search import search_neighbors
    from hrsa.analyze.local.memory import KnnPass, plan_knn
    from hrsa.analyze.local.store_rows import SampleRows
    from hrsa.analyze.streaming.plan import parse_memory_budget
    from hrsa.store import ActivationStore

    store = ActivationStore.open(path)
    info = store.model_info("m")
    ids = np.arange(cfg.tokens, dtype=np.int64)  # the sample: every token of the store
    size = KnnPass(n=cfg.tokens, d=cfg.hidden, read_bytes=4, k=cfg.k, shard_tokens=min(info.layout.shard_tokens, cfg.tokens),
                   n_docs=math.ceil(cfg.tokens / 1000))
    plan = plan_knn(size, parse_memory_budget(cfg.budget))  # the whole pass: both models, every token a query
    queries = np.sort(np.random.default_rng(0).choice(cfg.tokens, cfg.memory_queries, replace=False))
    source = SampleRows(store.hidden_state("m", 0), ids, info.layout.shard_tokens)
    search_neighbors(SampleRows(store.hidden_state("m", 0), ids[:2048], 2048), cfg.k)  # burn-in
    reset_peak()  # the peak restarts at the resident set now
    base = resident_bytes()
    start = time.perf_counter()
    search_neighbors(source, cfg.k, queries=queries, query_block=plan.query_block, db_block=plan.db_block)
    seconds, peak = time.perf_counter() - start, max(peak_resident_bytes() - base, 0)
    # The model for this run: one query block of the sampled queries against every database block, the queries'
    # positions and neighbours, the sample's ids, and the slack of Python objects.
    estimate = size.search_bytes(len(queries), plan.db_block) + 8 * cfg.tokens + 16 * len(queries) * (cfg.k + 1) + (2 << 20)
    out.put({"seconds": seconds, "peak": peak, "estimate": estimate, "plan": asdict(plan)})


def bench_memory(cfg: BenchConfig, workdir: Path) -> dict[str, Any]:
    from hrsa.analyze.streaming.plan import format_bytes, parse_memory_budget

    path = workdir / "knn-store"
    start = time.perf_counter()
    write_store(path, cfg)
    written = time.perf_counter() - start
    try:
        res = run_in_fresh_process(_memory_child, str(path), cfg, poll_seconds=5)
    except RuntimeError as error:
        raise SystemExit(f"(c) failed: {error} (see above)") from None
    plan, sample = res["plan"], cfg.tokens * cfg.hidden * 4
    budget = parse_memory_budget(cfg.budget)
    full_pass = 2 * res["seconds"] * cfg.tokens / cfg.memory_queries  # both models, every token a query
    print(f"(c) memory under a budget of {format_bytes(budget)}, {cfg.tokens} sampled tokens of D={cfg.hidden} "
          f"(float32 store written in {written:.0f} s; the sample alone is {format_bytes(sample)}):")
    print(f"    plan of the whole exact pass: blocks of {plan['query_block']} queries x {plan['db_block']} rows, the sample "
          f"read {plan['sample_reads']} time(s) per model, estimated peak {format_bytes(plan['estimated_peak'])}")
    print(f"    measured: exact search of {cfg.memory_queries} queries against all {cfg.tokens} tokens read block by block: "
          f"{res['seconds']:.1f} s, peak RSS above baseline {format_bytes(res['peak'])} (model: {format_bytes(res['estimate'])}, "
          f"budget {format_bytes(budget)}); the whole pass would take ~{full_pass / 3600:.1f} h here")
    return {"budget": budget, "sample_bytes": sample, "plan": plan, "measured_peak": res["peak"],
            "estimate": res["estimate"], "seconds": res["seconds"], "full_pass_seconds_extrapolated": full_pass,
            "store_write_seconds": written}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes (about a minute)")
    parser.add_argument("--tokens", type=int, help="sampled tokens of (c) (default 1,000,000; 50,000 with --quick)")
    parser.add_argument("--budget", help="memory budget of (c), e.g. 2GB (default 2GB; 60MB with --quick)")
    parser.add_argument("--hidden", type=int, help="hidden size D of every section (default 576; 64 with --quick)")
    parser.add_argument("--dir", help="folder for (c)'s synthetic store (default: a temporary folder)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    cfg = QUICK if args.quick else BenchConfig()
    overrides = {"tokens": args.tokens, "budget": args.budget, "hidden": args.hidden}
    cfg = BenchConfig(**{**asdict(cfg), **{k: v for k, v in overrides.items() if v is not None}})
    import faiss

    print(f"faiss {faiss.__version__}, GPUs seen by faiss: {faiss.get_num_gpus()}, OpenMP threads: {faiss.omp_get_max_threads()}")
    figures: dict[str, Any] = {"config": asdict(cfg), "speed": bench_speed(cfg), "hnsw": bench_hnsw(cfg)}
    workdir = Path(tempfile.mkdtemp(prefix="hrsa-knn-bench-", dir=args.dir))
    try:
        figures["memory"] = bench_memory(cfg, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
