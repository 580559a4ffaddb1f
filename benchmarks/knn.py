"""k-NN overlap benchmark: exact FAISS search against numpy brute force, bounded memory, approximate recall.

Run (from the repository root):

    .venv/bin/python benchmarks/knn.py            # full: a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/knn.py --quick    # smoke size: seconds

What it measures, side by side in one run:

(a) Exact cosine k-NN (self excluded, ties by index) of one hidden state on the same subsample: the
    blocked FAISS search of :func:`hrsa.analyze.local.knn.exact_neighbors` against numpy brute force (unit
    rows, the full N x N float32 Gram matrix, argpartition + sort): the time ratio, and that both agree.
    Best of ``repeats`` after one burn-in run.
(b) Peak memory of a blocked exact search as the subsample doubles three times at fixed D and blocks,
    each size in a fresh process (peak RSS above the RSS before the search), against the data itself and
    the Gram matrix that brute force would hold.
(c) The approximate option (HNSW): build + search time against exact search, and recall@k.

Synthetic rows are activation-like: Gaussian bulk plus a few large-offset dimensions (so all cosines
sit near a shared direction, as in real hidden states) and a low-rank cluster structure.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BenchConfig:
    k: int = 10
    hidden: int = 256
    # (a) exact search, FAISS vs numpy brute force
    speed_tokens: int = 16_384
    repeats: int = 3
    # (b) memory of a blocked run as N doubles three times
    memory_tokens: int = 8_192  # then x2, x4, x8
    query_block: int = 2_048
    db_block: int = 16_384
    # (c) approximate search
    approx_tokens: int = 50_000


QUICK = BenchConfig(hidden=64, speed_tokens=2_048, repeats=2, memory_tokens=4_096, query_block=1_024, db_block=4_096,
                    approx_tokens=4_096)


def rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32 activation-like rows: clusters on a low-rank subspace, noise, two offset dimensions."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, 16)) @ rng.normal(size=(16, d))  # (64, d)
    x = centers[rng.integers(0, 64, size=n)] + rng.normal(size=(n, d))  # (n, d)
    x[:, :2] += 20.0
    return x.astype(np.float32)


def numpy_neighbors(x: np.ndarray, k: int) -> np.ndarray:
    """Brute force in numpy: the full (N, N) float32 Gram of unit rows, argpartition, then an ordered sort."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    gram = u @ u.T  # (N, N)
    np.fill_diagonal(gram, -np.inf)
    part = np.argpartition(-gram, k, axis=1)[:, :k]  # (N, k) unordered
    order = np.lexsort((part, -np.take_along_axis(gram, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1)


def best_of(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # burn-in (thread pools, page faults)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_speed(cfg: BenchConfig) -> None:
    from hrsa.analyze.local.knn import exact_neighbors

    x = rows(cfg.speed_tokens, cfg.hidden)
    t_faiss = best_of(lambda: exact_neighbors(x, cfg.k), cfg.repeats)
    t_numpy = best_of(lambda: numpy_neighbors(x, cfg.k), cfg.repeats)
    a, b = exact_neighbors(x, cfg.k), numpy_neighbors(x, cfg.k)
    same_sets = float(np.mean(np.sort(a, 1) == np.sort(b, 1)))
    print(f"(a) exact k-NN, N={cfg.speed_tokens}, D={cfg.hidden}, k={cfg.k}:")
    print(f"    FAISS blocked {t_faiss:.3f} s, numpy brute force {t_numpy:.3f} s, "
          f"ratio numpy / FAISS = {t_numpy / t_faiss:.2f}x; neighbour sets agree on {100 * same_sets:.2f}% of entries")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))  # kB


def _memory_child(n: int, cfg: BenchConfig, out: mp.Queue) -> None:
    import faiss  # noqa: F401  (imported before the baseline: its libraries are not the search's memory)

    from hrsa.analyze.local.knn import exact_neighbors

    x = rows(n, cfg.hidden)
    exact_neighbors(x[:64], cfg.k)  # burn-in: thread pools and BLAS buffers
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS, so that making the rows does not count
    base = _status_bytes("VmRSS")
    start = time.perf_counter()
    exact_neighbors(x, cfg.k, query_block=cfg.query_block, db_block=cfg.db_block)
    out.put((time.perf_counter() - start, max(_status_bytes("VmHWM") - base, 0)))


def bench_memory(cfg: BenchConfig) -> None:
    ctx = mp.get_context("spawn")
    print(f"(b) peak memory of a blocked exact search (D={cfg.hidden}, query block {cfg.query_block}, db block {cfg.db_block}):")
    peaks = []
    for n in (cfg.memory_tokens * f for f in (1, 2, 4, 8)):
        queue: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=_memory_child, args=(n, cfg, queue))
        proc.start()
        seconds, peak = queue.get(timeout=1800)
        proc.join()
        peaks.append(peak)
        print(f"    N={n:>8}: {seconds:7.2f} s, peak above baseline {peak / 2**20:8.1f} MiB; data {n * cfg.hidden * 4 / 2**20:8.1f} MiB, "
              f"output {n * cfg.k * 8 / 2**20:6.1f} MiB, N x N Gram would be {n * n * 4 / 2**30:8.2f} GiB")
    print(f"    growth of the peak over 8x the tokens: {peaks[-1] / max(peaks[0], 1):.2f}x (data and output: 8x, Gram: 64x)")


def bench_approximate(cfg: BenchConfig) -> None:
    from hrsa.analyze.local.knn import approximate_neighbors, exact_neighbors, neighbor_recall

    x = rows(cfg.approx_tokens, cfg.hidden, seed=1)
    start = time.perf_counter()
    exact = exact_neighbors(x, cfg.k)
    t_exact = time.perf_counter() - start
    print(f"(c) approximate search (HNSW, M=32), N={cfg.approx_tokens}, D={cfg.hidden}, k={cfg.k}; exact {t_exact:.2f} s:")
    for ef in (32, 64, 128, 256):
        start = time.perf_counter()
        approx = approximate_neighbors(x, cfg.k, ef_search=ef)
        t = time.perf_counter() - start
        print(f"    efSearch={ef:>4}: {t:6.2f} s (build + search), speed-up {t_exact / t:5.2f}x, recall@{cfg.k} = {neighbor_recall(approx, exact):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes (seconds)")
    cfg = QUICK if parser.parse_args().quick else BenchConfig()
    import faiss

    print(f"faiss {faiss.__version__}, GPUs seen by faiss: {faiss.get_num_gpus()}, OpenMP threads: {faiss.omp_get_max_threads()}")
    bench_speed(cfg)
    bench_memory(cfg)
    bench_approximate(cfg)


if __name__ == "__main__":
    main()
