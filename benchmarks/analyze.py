"""Streaming HRSA benchmark: speed against in-memory numpy, flat memory in N, a 7B-shaped cross-layer run.

Run (from the repository root):

    .venv/bin/python benchmarks/analyze.py            # full: about 8 minutes on 2 CPU cores
    .venv/bin/python benchmarks/analyze.py --quick    # smoke size: about a minute
    ... --dir /mnt/nvme/tmp                           # put the synthetic stores on another disk

What it measures, each figure side by side in one run:

(a) Streaming all three metrics (dimension-wise correlation, linear CKA, orthogonal Procrustes) for one
    layer pair from a store, against in-memory numpy on the same arrays already loaded (float64 centring
    of the whole arrays, three GEMMs, SVD): the time ratio. Both use float64 products; best of
    ``repeats`` after one burn-in run.
(b) Peak memory of the streaming analysis as N doubles three times at fixed D, each run in a fresh
    process (peak RSS above the process's RSS just before the analysis). It must stay flat, where holding
    the arrays would grow with N.
(d) The per-group accumulators behind the jackknife intervals (``--groups``, default 10) against a pass without
    them, on (a)'s store: time of CKA + dimension-wise correlation (the pass's cost and cheap finishing), time
    with Procrustes as well (each group adds one SVD per layer), and peak memory of each in a fresh process.
(c) A 7B-shaped cross-layer CKA (D = 3584, 29 hidden states per model, as Qwen2-7B; bf16 in the store,
    float32 products of centred blocks) under a memory budget: passes, time, peak memory, against the RAM
    that holding both models' float32 activations would take (the reference implementation's approach).

(e) Against the official approach (restated from the paper's description: every hidden state of both models in RAM
    as float32, centred copies, one GEMM per layer pair), cross-layer CKA of a SmolLM2-shaped pair (31 x 31 states,
    D = 576, N = 20,000 float32 tokens), each in a fresh process: the speed ratio, the ratio of peak memories, and
    hrsa's time against the roofline of the products it ran (its plan's flops at this machine's GEMM rate for the
    same shapes, measured in the same run); then hrsa again at a budget whose plan takes 2 passes (the cost of a pass).
(h) One cross-layer tile folded stacked (each block centred once, its GEMMs into one running sum, Chan's
    corrections once per run) against a product and a Chan merge per pair; and one block's products five ways (hrsa's:
    one GEMM of the tile where its probe finds the library's sums those of a GEMM per pair, else a GEMM per pair, by
    numpy's OpenBLAS through ctypes; a GEMM per pair; one GEMM of the whole tile; torch's addmm_, MKL; scipy's BLAS
    wrapper): the rate, and how fast a Python thread (the one reading the next block) runs meanwhile.
(g) Plans of a 7B pair (29 x 29, D = 3584, bf16, N = 1M) as Ray tasks for 1, 8 and 32 workers of 16 and 64 GB:
    tiles, segments per tile, reads of the store, bytes read, each worker's peak, and a time projected from (e)'s
    measured throughput per worker (products only).
(f) (e)'s analysis on half its tokens as Ray tasks on a local cluster of two nodes (two ``ray start``, one CPU
    each): 2 workers against 1 (``--workers`` caps the tasks running at once), and the segments each node ran.
(i) Every block of a bf16 pair (16 states of D = 1536) read as a pass reads it, by 1 thread and by several (half the
    cores, at least 2: what an analysis with products on a GPU takes): GB/s and the ratio.

Synthetic activations are shaped like real ones: a few dimensions with offsets of 1e3-1e4, a residual
stream drifting across layers, and model B a noisy copy of model A.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helper, however this script is started

from fresh_process import run_in_fresh_process  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    # (a) one layer pair, streaming vs in-memory
    speed_tokens: int = 32_768
    speed_hidden: int = 896  # Qwen2-0.5B's width
    repeats: int = 3
    # (b) memory as N doubles three times
    memory_tokens: int = 8_192  # then x2, x4, x8
    memory_hidden: int = 512
    # (c) 7B-shaped cross-layer CKA
    big_tokens: int = 1_024  # 899 D x D products of 1,024 tokens: ~5 minutes of float32 GEMM on 2 cores
    big_hidden: int = 3_584
    big_states: int = 29
    big_budget: str = "4GB"
    # (e) against the official approach: a SmolLM2-shaped pair
    official_tokens: int = 20_000
    official_hidden: int = 576
    official_states: int = 31
    official_budget: str = "1.1GB"  # a quarter of the official approach's measured peak (4.4-4.5 GB)
    official_fit_budget: str = "4GB"  # (e) again where the accumulators fit in 2 passes: the passes' own cost
    backend: str = "numpy"  # hrsa's products in (e): "cuda" on a GPU machine (the roofline is then the GPU's)
    # (i) a block's states read by several threads
    reads_tokens: int = 16_384
    reads_hidden: int = 1_536  # Qwen2.5-1.5B's width
    reads_states: int = 8


QUICK = BenchConfig(speed_tokens=4_096, speed_hidden=256, repeats=2, memory_tokens=2_048, memory_hidden=128,
                    big_tokens=512, big_hidden=512, big_states=9, big_budget="64MB", official_tokens=2_048,
                    official_hidden=128, official_states=6, official_budget="256MB", official_fit_budget="1GB",
                    reads_tokens=4_096, reads_hidden=256, reads_states=4)


# --- synthetic stores ----------------------------------------------------------------------------------------


def make_store(path: Path, n: int, d: int, n_states: int, dtype: str, seed: int = 0) -> None:
    """Models "a" and "b" with ``n_states`` hidden states of (n, d) on one corpus of 512-token documents."""
    import ml_dtypes

    from hrsa.store import ActivationStore
    from hrsa.store.testing import make_table

    store = ActivationStore.open(path, mode="w-")
    docs = tuple([512] * (n // 512) + ([n % 512] if n % 512 else []))
    cid = store.write_corpus(make_table(docs), tokenizer={"name": "bench", "fingerprint": "bench"})
    for mid in ("a", "b"):
        store.create_model(mid, corpus=cid, n_hidden_states=n_states, hidden_size=d, dtype=dtype)
    writers = {mid: store.writer(mid) for mid in ("a", "b")}
    logical = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    for unit in writers["a"].units():  # one unit (shard) at a time: memory stays at one unit's states
        rng = np.random.default_rng([seed, unit.index])
        x = rng.standard_normal((unit.n_tokens, d), dtype=np.float32)
        x[:, :3] += np.array([1e3, 3e3, 1e4], dtype=np.float32)  # massive-activation channels
        states_a, states_b = {}, {}
        for k in range(n_states):
            x = x + 0.5 * rng.standard_normal(x.shape, dtype=np.float32)  # the residual stream drifts
            states_a[k] = x.astype(logical)
            states_b[k] = (x + (0.3 + 0.05 * k) * rng.standard_normal(x.shape, dtype=np.float32)).astype(logical)
        writers["a"].write_unit(unit, states_a)
        writers["b"].write_unit(unit, states_b)


from hrsa.runtime.resident import peak_resident_bytes as peak_rss_bytes  # noqa: E402
from hrsa.runtime.resident import reset_peak as reset_peak_rss  # noqa: E402
from hrsa.runtime.resident import resident_bytes as current_rss_bytes  # noqa: E402


# --- (a) streaming vs in-memory ------------------------------------------------------------------------------


def in_memory(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The three metrics the way an in-memory implementation computes them: whole arrays, float64."""
    xc, yc = x.astype(np.float64), y.astype(np.float64)
    xc -= xc.mean(0)
    yc -= yc.mean(0)
    c_xx, c_yy, c_xy = xc.T @ xc, yc.T @ yc, xc.T @ yc
    cka = float(np.sum(c_xy * c_xy) / (np.linalg.norm(c_xx) * np.linalg.norm(c_yy)))
    r = np.diag(c_xy) / np.sqrt(np.diag(c_xx) * np.diag(c_yy))
    u, _, vt = np.linalg.svd(c_xy)
    p = (u @ vt) ** 2
    h_inv = 1.0 + float(np.sum(p * np.log(np.where(p > 0, p, 1.0)))) / (p.shape[0] * np.log(p.shape[0]))
    return {"cka": cka, "dimcorr": float(r.mean()), "h_inv": h_inv}


def interleaved_best(fns: dict[str, Any], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Best time of each function, runs interleaved (A, B, A, B...) so that load from other processes on a
    shared machine hits both sides alike; one burn-in run each first (imports, page cache, BLAS threads)."""
    results = {name: fn() for name, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def bench_speed(cfg: BenchConfig, root: Path) -> None:
    from hrsa.analyze import analyze_pair
    from hrsa.store import ActivationStore

    n, d = cfg.speed_tokens, cfg.speed_hidden
    print(f"\n(a) one layer pair, all three metrics: N = {n:,} tokens, D = {d}, float32 store, float64 products")
    make_store(root / "speed", n, d, 1, "float32")
    store = ActivationStore.open(root / "speed", mode="r")
    x = store.hidden_state("a", 0).compute()  # loaded before timing: the in-memory side gets them for free
    y = store.hidden_state("b", 0).compute()
    best, out = interleaved_best({
        "stream": lambda: analyze_pair(store, "a", "b", backend="numpy", compute_dtype="float64", groups=0),
        "memory": lambda: in_memory(x, y),
    }, cfg.repeats)
    (t_stream, res), (t_memory, ref) = (best["stream"], out["stream"]), (best["memory"], out["memory"])
    print("    (no per-group accumulators here: (d) measures their cost)")
    print(f"    streaming from the store : {t_stream:7.3f} s  ({n / t_stream / 1e3:,.0f}k tokens/s, "
          f"{res.settings['workers']} worker(s), blocks of {res.settings['block_tokens']})")
    print(f"    in-memory numpy          : {t_memory:7.3f} s")
    print(f"    ratio streaming / in-memory: {t_stream / t_memory:.2f}x  (aim: within 1.3x)")
    got = {"cka": res.cka[0].value, "dimcorr": res.dimcorr[0].mean, "h_inv": res.procrustes[0].h_inv}
    print("    agreement: " + ", ".join(f"{k} |diff| = {abs(got[k] - ref[k]):.1e}" for k in got))


# --- (b) memory as N doubles -----------------------------------------------------------------------------------


def _memory_child(path: str, n: int, budget: str, cross_layer: bool, metrics: tuple[str, ...],
                  compute_dtype: str, block_tokens: int | None, groups: int, queue: Any) -> None:
    """In a fresh process: one analysis of the first n tokens; report its peak RSS above the start."""
    from hrsa.analyze import analyze_pair
    from hrsa.store import ActivationStore
    from hrsa.store.selection import TokenSelection

    store = ActivationStore.open(path, mode="r")
    analyze_pair(store, "a", "b", metrics=("cka",), backend="numpy", selection=TokenSelection(tokens=(0, 64)))  # warm
    reset_peak_rss()
    before = current_rss_bytes()
    start = time.perf_counter()
    res = analyze_pair(store, "a", "b", metrics=metrics, cross_layer=cross_layer, memory_budget=budget,
                       backend="numpy", compute_dtype=compute_dtype, selection=TokenSelection(tokens=(0, n)),
                       block_tokens=block_tokens, groups=groups)
    queue.put({"seconds": time.perf_counter() - start, "peak": peak_rss_bytes(), "before": before,
               "passes": res.plan.passes, "estimated": res.plan.estimated_peak, "workers": res.plan.workers,
               "block_tokens": res.settings["block_tokens"],
               "cka_diag": [c.value for c in res.cka] if res.cka else []})


def run_child(*args: Any) -> dict[str, Any]:
    return run_in_fresh_process(_memory_child, *args)


def bench_memory(cfg: BenchConfig, root: Path) -> None:
    from hrsa.analyze.streaming.plan import format_bytes

    d, sizes = cfg.memory_hidden, [cfg.memory_tokens * 2**i for i in range(4)]
    # Every N spans 8+ blocks, so each worker reaches its steady state (a block in use, the next being read
    # ahead, the accumulators and one merge): from there the memory is the blocks', not N's.
    block = cfg.memory_tokens // 8
    print(f"\n(b) peak memory as N doubles, D = {d}, all three metrics, one layer pair, blocks of {block} tokens "
          "(fresh process per run)")
    make_store(root / "memory", sizes[-1], d, 1, "float32")
    print(f"    {'N':>8}  {'peak RSS above start':>20}  {'arrays of both models':>21}  {'time':>7}")
    peaks = []
    for n in sizes:
        out = run_child(str(root / "memory"), n, "4GB", False, ("dimcorr", "cka", "procrustes"), "float64", block, 0)
        peaks.append(out["peak"] - out["before"])
        print(f"    {n:>8,}  {format_bytes(peaks[-1]):>20}  {format_bytes(2 * n * d * 4):>21}  {out['seconds']:6.2f}s")
    print(f"    growth of the peak from N = {sizes[0]:,} to {sizes[-1]:,} (x8 tokens): x{peaks[-1] / max(peaks[0], 1):.2f}")


# --- (d) per-group accumulators ----------------------------------------------------------------------------------


def bench_groups(cfg: BenchConfig, root: Path) -> None:
    from hrsa.analyze import analyze_pair
    from hrsa.analyze.streaming.plan import format_bytes
    from hrsa.store import ActivationStore

    n, d, groups = cfg.speed_tokens, cfg.speed_hidden, 10
    print(f"\n(d) per-group accumulators ({groups} groups of documents) against none: N = {n:,}, D = {d}, one layer pair")
    if not (root / "speed").exists():
        make_store(root / "speed", n, d, 1, "float32")
    store = ActivationStore.open(root / "speed", mode="r")
    for metrics in (("dimcorr", "cka"), ("dimcorr", "cka", "procrustes")):
        best, out = interleaved_best({
            g: (lambda g=g: analyze_pair(store, "a", "b", metrics=metrics, backend="numpy", compute_dtype="float64", groups=g))
            for g in (0, groups)}, cfg.repeats)
        same = abs(out[0].cka[0].value - out[groups].cka[0].value)
        print(f"    {'+'.join(metrics):24}: {best[0]:6.3f} s without, {best[groups]:6.3f} s with groups: "
              f"ratio {best[groups] / best[0]:.2f}x (aim for the accumulators: <= 1.15x); CKA |diff| {same:.1e}")
    for g in (0, groups):
        out = run_child(str(root / "speed"), n, "4GB", False, ("dimcorr", "cka", "procrustes"), "float64", None, g)
        print(f"    peak RSS above start, {g:2} groups: {format_bytes(out['peak'] - out['before']):>9} "
              f"(plan's estimate {format_bytes(out['estimated'])}; one pair's Moments {format_bytes(3 * d * d * 8)})")


# --- (c) 7B-shaped cross-layer CKA -------------------------------------------------------------------------------


def bench_cross_layer(cfg: BenchConfig, root: Path) -> None:
    from hrsa.analyze.streaming.plan import format_bytes, parse_memory_budget

    n, d, states = cfg.big_tokens, cfg.big_hidden, cfg.big_states
    print(f"\n(c) cross-layer linear CKA, {states} x {states} hidden states of D = {d} (bf16 store), N = {n:,} tokens, "
          f"budget {cfg.big_budget}, float32 products")
    start = time.perf_counter()
    make_store(root / "big", n, d, states, "bfloat16")
    print(f"    synthetic store written in {time.perf_counter() - start:.0f} s")
    out = run_child(str(root / "big"), n, cfg.big_budget, True, ("cka",), "float32", None, 0)
    held = 2 * states * n * d * 4
    pairs = states * states + 2 * states  # cross pairs, plus each state against itself
    flops = pairs * 2.0 * n * d * d  # one (D, n) x (n, D) product per pair
    print(f"    passes: {out['passes']} ({out['workers']} worker(s), blocks of {out['block_tokens']}); time {out['seconds']:.1f} s "
          f"({out['seconds'] / pairs:.2f} s per D x D pair; {flops / out['seconds'] / 1e9:.0f} GFLOP/s of products)")
    print(f"    peak RSS above start: {format_bytes(out['peak'] - out['before'])} (plan's estimate "
          f"{format_bytes(out['estimated'])}, budget {format_bytes(parse_memory_budget(cfg.big_budget))})")
    print(f"    holding both models' float32 activations instead: {format_bytes(held)} at N = {n:,}, "
          f"{format_bytes(held / n * 1e6)} at 1M tokens, {format_bytes(held / n * 1e8)} at 100M tokens")
    diag = out["cka_diag"]
    print(f"    CKA of matched states: first {diag[0]:.4f}, middle {diag[len(diag) // 2]:.4f}, last {diag[-1]:.4f}")


# --- (e) against the official approach, and the roofline ----------------------------------------------------------


def _official_child(path: str, n_states: int, queue: Any) -> None:
    """The paper's approach, restated from its code (HKUST-KnowComp/Reasoning-Embedding, hrsa/metrics/cka.py,
    ``compute_layerwise_cka``: torch float32 on the CPU there, numpy's float32 GEMMs here): every hidden state of both
    models in RAM as float32, centred copies, the Gram norms once per state, one GEMM per layer pair (|X^T Y|_F^2),
    ``gc.collect()`` after each pair as its ``clear_memory`` does."""
    import gc

    from hrsa.store import ActivationStore

    store = ActivationStore.open(path, mode="r")
    reset_peak_rss()
    before, start = current_rss_bytes(), time.perf_counter()
    xs = [np.asarray(store.hidden_state("a", k).compute(), dtype=np.float32) for k in range(n_states)]
    ys = [np.asarray(store.hidden_state("b", k).compute(), dtype=np.float32) for k in range(n_states)]
    xs = [x - x.mean(0) for x in xs]  # centred copies
    ys = [y - y.mean(0) for y in ys]
    norm_x = [float(np.linalg.norm(x.T @ x)) for x in xs]
    norm_y = [float(np.linalg.norm(y.T @ y)) for y in ys]
    cka = np.zeros((n_states, n_states))
    for i, (x, nx) in enumerate(zip(xs, norm_x)):
        for j, (y, ny) in enumerate(zip(ys, norm_y)):
            cka[i, j] = float(np.sum(np.square(x.T @ y))) / (nx * ny)
            gc.collect()
    queue.put({"seconds": time.perf_counter() - start, "peak": peak_rss_bytes(), "before": before, "cka": cka.tolist()})


def _hrsa_child(path: str, budget: str, workers: int, backend: str, queue: Any) -> None:
    """hrsa's cross-layer CKA with its defaults (float32 products summed in float64, stacked GEMMs), in a fresh process."""
    from hrsa.analyze import analyze_pair
    from hrsa.store import ActivationStore

    store = ActivationStore.open(path, mode="r")
    analyze_pair(store, "a", "b", metrics=("cka",), backend="numpy", groups=0, scheduler="threads")  # warm: imports
    reset_peak_rss()
    before, start = current_rss_bytes(), time.perf_counter()
    res = analyze_pair(store, "a", "b", metrics=("cka",), cross_layer=True, memory_budget=budget, backend=backend,
                       groups=0, workers=workers, scheduler="threads")
    queue.put({"seconds": time.perf_counter() - start, "peak": peak_rss_bytes(), "before": before,
               "passes": res.plan.passes, "estimated": res.plan.estimated_peak, "workers": res.plan.workers,
               "block_tokens": res.settings["block_tokens"], "dtype": res.settings["compute_dtype"],
               "flops": res.plan.product_flops(), "read": res.plan.bytes_read(), "cka": res.cka_matrix.tolist(),
               "tile": max((len(t.rectangle[0]), len(t.rectangle[1])) for t in res.plan.tiles if t.rectangle)})


def gemm_rate(dtype: str, shape: tuple[int, int, int], seconds: float = 3.0, backend: str = "numpy") -> float:
    """This machine's GEMM rate (flop/s) for (m, k) x (k, n) products of ``dtype``, best of repeated runs (on the
    GPU with ``backend="cuda"``)."""
    m, k, n = shape
    if backend == "cuda":
        import torch

        a = torch.randn(m, k, device="cuda", dtype=getattr(torch, dtype))
        b = torch.randn(k, n, device="cuda", dtype=getattr(torch, dtype))
        a @ b
        torch.cuda.synchronize()
        start, reps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            a @ b
            reps += 1
        torch.cuda.synchronize()
        return 2.0 * m * k * n * reps / (time.perf_counter() - start)
    a = np.random.default_rng(0).standard_normal((k, m)).astype(dtype).T  # as hrsa reads it: a transposed C array
    b = np.random.default_rng(1).standard_normal((k, n)).astype(dtype)
    a @ b  # warm the BLAS threads
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * m * k * n / best


def bench_official(cfg: BenchConfig, root: Path) -> float:
    from hrsa.analyze.streaming.plan import format_bytes

    n, d, states = cfg.official_tokens, cfg.official_hidden, cfg.official_states
    print(f"\n(e) cross-layer CKA of a SmolLM2-shaped pair ({states} x {states} states, D = {d}, N = {n:,} float32 tokens "
          f"with offsets), hrsa (budget {cfg.official_budget}) against the official approach, each in a fresh process")
    if not (root / "official").exists():
        make_store(root / "official", n, d, states, "float32")
    official = run_in_fresh_process(_official_child, str(root / "official"), states)
    ours = run_in_fresh_process(_hrsa_child, str(root / "official"), cfg.official_budget, 2, cfg.backend)
    # The roofline: the products hrsa ran at this machine's GEMM rate for its shapes (a block of A's stacked states
    # of its largest tile against B's), measured beside the runs: the best of a measurement after hrsa's run and one
    # after the run at the larger budget (one 3 s window on a shared machine read as low as 0.7 of the other).
    rows, cols = ours["tile"]
    shape = (rows * d, ours["block_tokens"], cols * d)
    dtype = "float32" if ours["dtype"] == "float32" else "float64"
    rate = gemm_rate(dtype, shape, backend=cfg.backend)
    fit = run_in_fresh_process(_hrsa_child, str(root / "official"), cfg.official_fit_budget, 2, cfg.backend)
    rate = max(rate, gemm_rate(dtype, shape, backend=cfg.backend))
    roofline = ours["flops"] / rate
    diff = float(np.abs(np.array(ours["cka"]) - np.array(official["cka"])).max())
    print(f"    official: {official['seconds']:7.1f} s, peak RSS {format_bytes(official['peak'] - official['before'])}")
    print(f"    hrsa    : {ours['seconds']:7.1f} s, peak RSS {format_bytes(ours['peak'] - ours['before'])} "
          f"(estimate {format_bytes(ours['estimated'])}); {ours['passes']} passes, {ours['workers']} worker(s), blocks of "
          f"{ours['block_tokens']}, {ours['dtype']} products; read {format_bytes(ours['read'])}")
    print(f"    hrsa is {official['seconds'] / ours['seconds']:.2f}x faster (aim >= 3x) with "
          f"{(ours['peak'] - ours['before']) / (official['peak'] - official['before']):.2f} of its peak memory (aim <= 0.25)")
    print(f"    roofline: {ours['flops'] / 1e12:.2f} Tflop of products at {rate / 1e9:.0f} GFLOP/s ({ours['dtype']} GEMM "
          f"measured now) = {roofline:.1f} s; hrsa at {ours['seconds'] / roofline:.2f}x of it (aim <= 1.25x)")
    print(f"    CKA matrices agree to {diff:.1e} (max |diff|)")
    # The same analysis where the accumulators fit in fewer passes (run above): what each pass's reading, decoding and
    # centring of its states costs beside the GEMMs on the same cores (the roofline is the same products' at the same
    # rate).
    print(f"    hrsa at {cfg.official_fit_budget}: {fit['seconds']:7.1f} s, peak RSS {format_bytes(fit['peak'] - fit['before'])}; "
          f"{fit['passes']} passes, blocks of {fit['block_tokens']}: {official['seconds'] / fit['seconds']:.2f}x faster than "
          f"the official approach, at {fit['seconds'] / roofline:.2f}x the roofline"
          + (f"; {ours['passes'] - fit['passes']} more passes cost {(ours['seconds'] - fit['seconds']) / (ours['passes'] - fit['passes']):.1f} s "
             "each" if ours["passes"] > fit["passes"] else ""))
    return ours["flops"] / ours["seconds"] / ours["workers"]  # one worker's throughput, for the plans of (g)


def bench_stacked(cfg: BenchConfig) -> None:
    """One cross-layer tile folded both ways over the same blocks: stacked (centred once, its GEMMs into one running
    sum, Chan's corrections once per run) against a product and a Chan merge per pair."""
    from scipy.linalg import blas

    from hrsa.analyze.accumulators import gemm
    from hrsa.analyze.accumulators.cross_tile import CrossTileMoments, PendingBlocks, multiply_into
    from hrsa.analyze.streaming.backends import NumpyBackend

    d, r, n, blocks = cfg.official_hidden, 8, 4096, 3
    rng = np.random.default_rng(0)
    xs = {(s, k): (rng.standard_normal((n, d), dtype=np.float32) + 1e3) for s in "ab" for k in range(r)}
    pairs = [(("a", i), ("b", j)) for i in range(r) for j in range(r)]
    print(f"\n(h) one {r} x {r} cross-layer tile, D = {d}, {blocks} blocks of {n} tokens: stacked GEMMs against per-pair")
    for dtype in ("float32", "float64"):
        backend = NumpyBackend(compute_dtype=dtype)
        gemm.prepare_tile_gemm(dtype, d, d, n, threads=[gemm.blas_threads()])  # as a pass does before it starts

        def stacked() -> CrossTileMoments:
            pending = PendingBlocks(CrossTileMoments.empty([p[0] for p in pairs[::r]], [p[1] for p in pairs[:r]], d, d))
            for _ in range(blocks):
                backend.fold_cross_tile(pending, xs)
            return pending.finish()

        def per_pair() -> dict:
            totals: dict = {}
            for _ in range(blocks):
                for pair, part in backend.cross_moments(xs, pairs):
                    totals[pair] = totals[pair].merge(part) if pair in totals else part
            return totals

        best, _ = interleaved_best({"stacked": stacked, "per_pair": per_pair}, cfg.repeats)
        flops = blocks * len(pairs) * 2.0 * n * d * d
        print(f"    {dtype}: stacked {best['stacked']:.2f} s ({flops / best['stacked'] / 1e9:.0f} GFLOP/s), per pair "
              f"{best['per_pair']:.2f} s ({flops / best['per_pair'] / 1e9:.0f} GFLOP/s): {best['per_pair'] / best['stacked']:.2f}x")
    # The thread reading the next block runs beside each product only if the GEMM lets go of the GIL; and the BLAS
    # behind it decides the rate (MKL, in torch, takes slow paths on AMD CPUs).
    import torch

    u = np.concatenate([xs[("a", k)] for k in range(r)], axis=1)  # (n, r D) float32
    total = np.zeros((u.shape[1], u.shape[1]), dtype=np.float32, order="F")
    whole = gemm.prepare_tile_gemm("float32", d, d, n, threads=[gemm.blas_threads()])
    hrsa = f"hrsa ({'one GEMM: the probe passed' if whole else 'a GEMM per pair: the probe refused'})"
    ways = {hrsa: lambda: multiply_into(total, u, u, block=(d, d)),
            f"a GEMM per pair ({Path(gemm.gemm_library()).name})": lambda: gemm._per_block(total, u, u, 1.0, d, d),
            "one GEMM of the tile (the same library)": lambda: multiply_into(total, u, u),
            "torch addmm_": lambda: torch.from_numpy(total.T).T.addmm_(torch.from_numpy(u).T, torch.from_numpy(u)),
            "scipy sgemm": lambda: blas.sgemm(1.0, u.T, u.T, beta=1.0, c=total, trans_b=True, overwrite_c=True)}
    best, _ = interleaved_best(ways, cfg.repeats)
    flops = 2.0 * n * u.shape[1] ** 2
    print("    one block's float32 products into a sum, and a Python thread's progress meanwhile (against alone):")
    for name, product in ways.items():
        print(f"      {name:<52} {flops / best[name] / 1e9:5.0f} GFLOP/s, thread at {python_thread_share(product):.0%}")


def python_thread_share(product: Any, repeats: int = 3) -> float:
    """How fast a Python thread counts while ``product`` runs, as a share of how fast it counts alone (median of
    ``repeats``): near 0 when the product holds the GIL."""
    import statistics
    import threading

    count, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    def rate(during: Any) -> float:
        before, start = count[0], time.perf_counter()
        during()
        return (count[0] - before) / (time.perf_counter() - start)

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        return statistics.median(rate(product) / rate(lambda: time.sleep(0.2)) for _ in range(repeats))
    finally:
        stop.set()
        thread.join()


# --- (f) two workers over one, on a two-node local cluster ------------------------------------------------------


def bench_two_nodes(cfg: BenchConfig, root: Path) -> None:
    from local_cluster import two_node_cluster

    n, d, states = cfg.official_tokens // 2, cfg.official_hidden, cfg.official_states
    print(f"\n(f) (e)'s analysis on half its tokens (N = {n:,}) as Ray tasks on a local cluster of two nodes (one CPU "
          "each): 2 workers against 1")
    make_store(root / "nodes", n, d, states, "float32")
    times = {}
    with two_node_cluster() as (address, env):
        env = {**env, "RAY_ADDRESS": address}
        for workers in (1, 2):
            start = time.perf_counter()
            out = root / f"out-{workers}"
            done = subprocess.run([sys.executable, "-m", "hrsa", "analyze", "--store", str(root / "nodes"), "--pair",
                                   "a", "b", "--metrics", "cka", "--cross-layer", "--workers", str(workers), "--groups", "0",
                                   "--memory-budget", cfg.official_budget, "--out", str(out), "--no-store-results"],
                                  env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(done.stderr[-2000:])
            times[workers] = min(times.get(workers, float("inf")), time.perf_counter() - start)
            nodes = json.loads((out / "results.json").read_text())["settings"].get("segments_per_node", {})
            print(f"    {workers} worker(s): {time.perf_counter() - start:6.1f} s, segments per node {sorted(nodes.values())}")
    print(f"    speed-up of 2 workers over 1: {times[1] / times[2]:.2f}x (driver start included)")


# --- (g) 7B-shaped plans on clusters ----------------------------------------------------------------------------


def bench_cluster_plans(cfg: BenchConfig, throughput: float) -> None:
    """Plans of a 7B pair at 1M tokens for 1, 8 and 32 Ray workers of 16 and 64 GB, and a projected time from
    ``throughput`` (flop/s of one worker's products, measured in (e))."""
    from hrsa.analyze.streaming.plan import PlanInputs, format_bytes, plan_analysis

    d, states, n = 3584, 29, 1_000_000
    print(f"\n(g) plans: cross-layer CKA of a 7B pair ({states} x {states}, D = {d}, bf16 store, float32 products asked for: "
          f"the default for a bf16 store is float64), N = {n:,}, as Ray tasks; "
          f"time projected at {throughput / 1e9:.0f} GFLOP/s per worker (measured in (e))")
    print(f"    {'workers':>7} {'budget':>7} {'tiles':>5} {'segments/tile':>13} {'store reads':>11} {'bytes read':>10} "
          f"{'per worker':>10} {'projected':>10}")
    for workers in (1, 8, 32):
        for budget in (16e9, 64e9):
            inputs = PlanInputs(matched=(), rows=tuple(range(states)), cols=tuple(range(states)), dx=d, dy=d,
                                read_bytes_a=2, read_bytes_b=2, compute_bytes=4, n_tokens=n, block_tokens=4096,
                                n_blocks=n // 4096, workers=workers, memory_budget=int(budget), per_worker=True)
            plan = plan_analysis(inputs)
            per_tile = max(1, workers // plan.passes)
            busy = min(workers, plan.passes * per_tile)  # tasks running at once
            hours = plan.product_flops() / (throughput * busy) / 3600
            print(f"    {workers:>7} {format_bytes(budget):>7} {plan.passes:>5} {per_tile:>13} "
                  f"{plan.bytes_read() / plan.selection_bytes():>11.2f} {format_bytes(plan.bytes_read()):>10} "
                  f"{format_bytes(plan.estimated_peak):>10} {hours:>9.1f}h")


# --- (i) a block's states read by several threads ------------------------------------------------------------------


def bench_reads(cfg: BenchConfig, root: Path) -> None:
    """(i): every block of a bf16 pair's states read as a pass reads them (forward through the shards, one block
    ahead), with 1 thread and with ``read_threads`` (what ``analyze_pair`` takes on a GPU, where the host only reads),
    alternating, best of ``repeats``: GB/s of stored values and the ratio."""
    from hrsa.analyze.streaming.stream import StateReader, _read_ahead, token_blocks
    from hrsa.store import ActivationStore

    n, d, states = cfg.reads_tokens, cfg.reads_hidden, cfg.reads_states
    threads = max(2, min(8, (os.cpu_count() or 1) // 2))
    make_store(root / "reads", n, d, states, "bfloat16")
    store = ActivationStore.open(str(root / "reads"), mode="r")
    keys = [(m, k) for m in "ab" for k in range(states)]
    stored = 2 * n * d * states * 2

    def read_all(read_threads: int) -> Any:
        def run() -> None:
            arrays = {key: store.hidden_state_array(*key) for key in keys}
            with StateReader(arrays, 4096, read_threads).streamed() as segment:
                for _ in _read_ahead(segment, keys, token_blocks(slice(0, n), 4096)):
                    pass
        return run

    best, _ = interleaved_best({"1": read_all(1), str(threads): read_all(threads)}, cfg.repeats)
    print(f"\n(i) reading {2 * states} bf16 states of D = {d} over {n:,} tokens ({stored / 1e9:.2f} GB), blocks of 4,096:")
    print(f"    1 thread {stored / best['1'] / 1e9:.2f} GB/s, {threads} threads {stored / best[str(threads)] / 1e9:.2f} GB/s: "
          f"{best['1'] / best[str(threads)]:.2f}x")
    shutil.rmtree(root / "reads", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes (about a minute)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the synthetic stores (default: a temp dir)")
    parser.add_argument("--only", choices=["speed", "memory", "cross", "groups", "official", "stacked", "nodes", "plans", "reads"], default=None,
                        help="run one part")
    parser.add_argument("--backend", choices=["numpy", "cuda"], default="numpy", help="hrsa's products in (e)")
    args = parser.parse_args()
    cfg = replace(QUICK if args.quick else BenchConfig(), backend=args.backend)
    root = Path(tempfile.mkdtemp(prefix="hrsa-bench-", dir=args.dir))
    print(f"hrsa analyze benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} CPU core(s), stores in {root}")
    try:
        start = time.perf_counter()
        if args.only in (None, "speed"):
            bench_speed(cfg, root)
        if args.only in (None, "memory"):
            bench_memory(cfg, root)
        if args.only in (None, "groups"):
            bench_groups(cfg, root)
        if args.only in (None, "cross"):
            bench_cross_layer(cfg, root)
        if args.only in (None, "official", "stacked"):
            bench_stacked(cfg)
        if args.only in (None, "official", "plans"):
            throughput = bench_official(cfg, root) if args.only != "plans" else 100e9
            bench_cluster_plans(cfg, throughput)
        if args.only in (None, "nodes"):
            bench_two_nodes(cfg, root)
        if args.only in (None, "reads"):
            bench_reads(cfg, root)
        print(f"\ntotal {time.perf_counter() - start:.0f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
