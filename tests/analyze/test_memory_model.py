"""The planner's memory model is an upper bound: the measured peak of every real pass stays under its estimate.

Each case resolves a pair as ``analyze_pair`` does, under the smallest budget whose plan needs several passes
(matched, cross-layer and self tiles: ``cross_layer=True`` with Procrustes keeps the matched pass) and keeps the
case's workers, then runs every tile as one real pass through ``run_passes`` (reading the store, Dask's threads
scheduler, finishing the metrics) and asserts

    peak during the tile's pass - memory before it  <=  the model's estimate of that tile  (plan.estimate(tile))
    the plan's estimate (its largest tile's)         <=  the budget.

How it is measured: numpy reports its arrays to ``tracemalloc``, so the numpy backend is measured in this process.
torch's CPU allocator does not, so the torch cases run in one subprocess that measures its resident set: the
kernel's high-water mark (VmHWM), reset before each pass, less the resident set before it, with glibc told to map
every large block on its own (``MALLOC_MMAP_THRESHOLD_``) so that a freed block leaves the resident set.

Each pass gets a fresh reader here, as the model assumes. The store's reader keeps a few verified shard objects
per hidden state (``hrsa.store.reading``); the model counts them when told how many bytes
(``PlanInputs.cache_bytes_a/b``), and these tests tell it; ``test_a_whole_analyze_pair_run_stays_under_its_estimate``
runs ``analyze_pair`` itself, whose plan is told of the cache on its own.

On Ray (per-worker budgets) every task measures its own peak with tracemalloc when the workers trace
(``PYTHONTRACEMALLOC=1``), and a merge is measured here on read-only inputs as Ray hands them out.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import tracemalloc
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import ml_dtypes  # imported before anything is measured: a library's import is baseline, not a pass's memory
import numpy as np
import pytest

from hrsa.analyze.metrics import UnderdeterminedWarning
from hrsa.analyze.pair.passes import run_passes
from hrsa.analyze.pair.resolve import ResolvedPair, resolve_pair
from hrsa.analyze.streaming.backends import NumpyBackend, TorchBackend
from hrsa.analyze.streaming.plan import AnalysisPlan, MemoryBudgetError, Tile, parse_memory_budget, plan_analysis
from hrsa.analyze.streaming.stream import resolve_scheduler
from hrsa.store import ActivationStore
from hrsa.store.selection import TokenSelection

D = 96  # hidden size: accumulators (D^2) and block copies (block x D) both weigh; Python objects little
STATES = 2  # hidden states per model
DOCS = (300, 212, 512)  # 1024 tokens: two blocks, one per worker when there are two
BLOCK, CHUNK, SHARD = 512, 128, 256  # tokens: a block spans two shards, and the reader caches a few shards
METRICS = ("cka", "dimcorr", "procrustes", "cca")  # CCA: the largest finish (plan.py's F)
#: Python objects a worker has in flight, outside the budget like the interpreter (plan.py's docstring): a block
#: read's Dask graph and Zarr's requests, measured at 90-135 kB with four chunks a block, whatever the hidden size.
MACHINERY = 100_000 + 12_000 * (BLOCK // CHUNK)
CASES = [(backend, compute, stored, workers)
         for backend in ("numpy", "torch") for compute in ("float32", "float64")
         for stored in ("float32", "bfloat16") for workers in (1, 2)]


def build_store(url: str, dtype: str, d: int = D, docs: tuple[int, ...] = DOCS) -> None:
    """Models "a" and "b" (B a noisy mix of A, both with offsets of up to 1e3) on one corpus of ``docs``."""
    from hrsa.store.testing import make_table

    store = ActivationStore.open(url, mode="a")
    table = make_table(docs)
    cid = store.write_corpus(table, tokenizer={"name": "test-tok", "fingerprint": "fp-1"}, source="test")
    rng = np.random.default_rng(3)
    n = table.n_tokens
    x = {k: rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, d) + rng.uniform(-1e3, 1e3, d) for k in range(STATES)}
    mix = np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)  # (d, d)
    y = {k: v @ mix + rng.normal(size=(n, d)) for k, v in x.items()}
    logical = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    for mid, states in (("a", x), ("b", y)):
        store.create_model(mid, corpus=cid, n_hidden_states=STATES, hidden_size=d, dtype=dtype,
                           hidden_states=list(range(STATES)), chunk_tokens=CHUNK, shard_tokens=SHARD)
        writer = store.writer(mid)
        for unit in writer.units():
            writer.write_unit(unit, {k: v[unit.start : unit.stop].astype(logical) for k, v in states.items()})


def cache_bytes(url: str, workers: int) -> int:
    """What the store's reader may hold per hidden state: its cached shard objects, and one being fetched per worker."""
    from hrsa.store.reading import CACHED_SHARDS

    sizes = [p.stat().st_size for p in Path(url, "models").glob("*/hidden/*/c/*/0")]
    return min(-(-sum(DOCS) // SHARD), CACHED_SHARDS + workers) * max(sizes)


def planned(store: ActivationStore, url: str, *, compute: str, workers: int) -> ResolvedPair:
    """The pair as ``analyze_pair`` resolves it, under the smallest budget (of a 10% grid) whose plan needs several
    passes and keeps ``workers`` workers, the plan told of the reader's cache."""
    pair = resolve_pair(store, "a", "b", metrics=METRICS, debiased=False, cross_layer=True, selection=TokenSelection(),
                        memory_budget=10**12, block_tokens=BLOCK, workers=workers, save_rotation=False,
                        compute_bytes=np.dtype(compute).itemsize, groups=0)
    cache = cache_bytes(url, workers)
    for budget in (int(10**5 * 1.1**i) for i in range(120)):
        try:
            plan = plan_analysis(replace(pair.plan.inputs, memory_budget=budget, cache_bytes_a=cache, cache_bytes_b=cache))
        except MemoryBudgetError:
            continue
        # One worker: more than one tile of a kind. Two: the planner keeps them only when each kind fits one tile
        # (the self co-moments ride in the cross tile: two passes).
        if plan.workers == workers and plan.passes >= (4 if workers == 1 else 2):
            return replace(pair, plan=plan)
    raise AssertionError("no budget gives the plan this test needs")


def backend_of(name: str, compute: str) -> NumpyBackend | TorchBackend:
    return NumpyBackend(compute_dtype=compute) if name == "numpy" else TorchBackend(device="cpu", compute_dtype=compute)


def shapes(plan: AnalysisPlan) -> list[Tile]:
    """One tile of each shape (kind, pairs, states read): tiles of one shape have one estimate and one peak."""
    seen: dict[tuple[str, int, int], Tile] = {}
    for tile in plan.tiles:
        seen.setdefault((tile.kind, len(tile.pairs), len(tile.streams)), tile)
    return list(seen.values())


_WARM: set[tuple[type, str]] = set()


def measure(store: ActivationStore, pair: ResolvedPair, backend: Any, start: Any, peak: Any) -> list[int]:
    """Each tile of :func:`shapes` run as its own pass (a fresh reader): its peak above the memory before it, by
    ``start()`` (reset the peak, return the memory now) and ``peak()``."""
    scheduler = resolve_scheduler("threads")
    tiles = shapes(pair.plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnderdeterminedWarning)
        # Imports, thread pools, first calls: once per process, backend and compute dtype (a library's first call of
        # a dtype's kernels sets up buffers of its own: torch's first float64 matched pass peaked ~2 MB higher).
        warm = (type(backend), backend.compute_dtype)
        if warm not in _WARM:
            run_passes(store, replace(pair, plan=replace(pair.plan, tiles=tuple(tiles))), backend, scheduler, None)
            _WARM.add(warm)
        peaks = []
        for tile in tiles:
            one = replace(pair, plan=replace(pair.plan, tiles=(tile,)))
            gc.collect()
            before = start()
            outputs = run_passes(store, one, backend, scheduler, None)
            peaks.append(peak() - before)
            del outputs
    return peaks


def measure_traced(store: ActivationStore, pair: ResolvedPair, backend: Any) -> list[int]:
    def start() -> int:
        if not tracemalloc.is_tracing():  # after the warm-up, which then runs at full speed
            tracemalloc.start()
        tracemalloc.reset_peak()
        return tracemalloc.get_traced_memory()[0]

    try:
        return measure(store, pair, backend, start, lambda: tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


def measure_resident(store: ActivationStore, pair: ResolvedPair, backend: Any) -> list[int]:
    from hrsa.runtime.resident import peak_resident_bytes, reset_peak, resident_bytes

    def start() -> int:
        reset_peak()  # glibc's kept heap back to the kernel, then VmHWM restarts at the resident set now
        return resident_bytes()

    return measure(store, pair, backend, start, peak_resident_bytes)


def _subprocess_main(spec: dict[str, Any]) -> None:
    """Run by :func:`torch_peaks` in a fresh interpreter: the torch cases, measured by resident set."""
    results = {}
    for backend, compute, stored, workers in spec["cases"]:
        url = spec["urls"][stored]
        store = ActivationStore.open(url)
        pair = planned(store, url, compute=compute, workers=workers)
        peaks = measure_resident(store, pair, backend_of(backend, compute))
        results[f"{backend}-{compute}-{stored}-{workers}"] = peaks
    print(json.dumps(results))


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("memory-model")
    out = {dtype: str(root / dtype) for dtype in ("float32", "bfloat16")}
    for dtype, url in out.items():
        build_store(url, dtype)
    return out


@pytest.fixture(scope="module")
def torch_peaks(urls: dict[str, str]) -> dict[str, list[int]]:
    """Measured peaks of every torch case, from one subprocess (one torch import)."""
    pytest.importorskip("torch")
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the resident set's high-water mark is reset through Linux's /proc/self/clear_refs")
    spec = {"urls": urls, "cases": [case for case in CASES if case[0] == "torch"]}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("backend", "compute", "stored", "workers"), CASES)
def test_every_pass_stays_under_its_estimate(urls, torch_peaks_of, backend, compute, stored, workers) -> None:
    store = ActivationStore.open(urls[stored])
    pair = planned(store, urls[stored], compute=compute, workers=workers)
    plan = pair.plan
    assert plan.workers == workers and plan.estimated_peak <= plan.inputs.memory_budget
    if backend == "numpy":
        peaks = measure_traced(store, pair, backend_of(backend, compute))
    else:
        peaks = torch_peaks_of(f"{backend}-{compute}-{stored}-{workers}")
    tiles = shapes(plan)
    report = [(tile.kind, len(tile.pairs), peak, plan.estimate(tile)) for tile, peak in zip(tiles, peaks)]
    assert all(peak <= estimate + plan.workers * MACHINERY for _, _, peak, estimate in report), report
    assert max(plan.estimate(tile) for tile in tiles) == plan.estimated_peak


@pytest.mark.parametrize("groups", [0, 10])
def test_a_whole_analyze_pair_run_stays_under_its_estimate(urls, groups: int) -> None:
    from hrsa.analyze.pair import analyze_pair

    store = ActivationStore.open(urls["float32"])
    budget = planned(store, urls["float32"], compute="float64", workers=1).plan.inputs.memory_budget * (3 if groups else 1)
    kw = {"metrics": METRICS, "cross_layer": True, "memory_budget": budget, "block_tokens": BLOCK, "workers": 1}
    production = resolve_pair(store, "a", "b", debiased=False, selection=TokenSelection(), save_rotation=False,
                              compute_bytes=8, groups=groups, **kw).plan
    assert production.passes >= (2 if groups else 4) and production.estimated_peak <= budget
    assert production.inputs.cache_bytes_a > 0 and production.inputs.cache_bytes_b > 0  # told of the reader's cache
    assert production.inputs.groups == min(groups, len(DOCS))  # each group holds its own accumulators, counted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnderdeterminedWarning)
        run = {**kw, "scheduler": "threads", "backend": "numpy", "compute_dtype": "float64", "groups": groups}
        analyze_pair(store, "a", "b", **run)  # warm-up
        res, peak = traced_peak(lambda: analyze_pair(store, "a", "b", **run))
    assert peak <= res.plan.estimated_peak + MACHINERY, (peak, res.plan.estimated_peak)


@pytest.mark.parametrize("selection", [TokenSelection(positions=(0, 4)), TokenSelection(exclude_first=True)],
                         ids=["few-rows-a-block", "all-but-one-row-a-block"])
def test_a_selection_of_rows_counts_the_grid_block_each_read_decodes(urls, selection: TokenSelection) -> None:
    """A selection that is not one run of tokens keeps some rows of each block of the grid, but a read decodes the
    whole grid block before it picks them: at the smallest budget that plans, a run that counted only the rows kept
    went over (--positions 0:2 at D = 2048, 8 rows of a 2,048-token grid: +13% over budget)."""
    res, peak, budget = run_at_the_least_budget(ActivationStore.open(urls["float32"]), selection)
    assert res.plan.estimated_peak <= budget
    assert peak <= res.plan.estimated_peak + MACHINERY, (peak, res.plan.estimated_peak)


def run_at_the_least_budget(store: ActivationStore, selection: TokenSelection) -> tuple[Any, int, int]:
    """(results, traced peak, budget) of a cross-layer CKA and dimcorr run of "a" and "b" under the smallest budget
    that plans it: the one a refusal names."""
    from hrsa.analyze.pair import analyze_pair

    kw = {"metrics": ("cka", "dimcorr"), "cross_layer": True, "block_tokens": BLOCK, "workers": 1, "selection": selection}
    resolved = {"debiased": False, "save_rotation": False, "compute_bytes": 8, "groups": 0}
    with pytest.raises(MemoryBudgetError) as refused:
        resolve_pair(store, "a", "b", memory_budget=1000, **resolved, **kw)
    budget = parse_memory_budget(re.search(r"at least ([0-9.]+ [kMG]?B)", str(refused.value)).group(1).replace(" ", ""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnderdeterminedWarning)
        run = {**kw, "memory_budget": budget, "scheduler": "threads", "backend": "numpy", "compute_dtype": "float64",
               "groups": 0}
        analyze_pair(store, "a", "b", **run)  # warm-up
        res, peak = traced_peak(lambda: analyze_pair(store, "a", "b", **run))
    return res, peak, budget


def aligned_store(url: str, tiny_models: Any) -> ActivationStore:
    """Models "a" and "b" over one text in two tokenizations (B holds "quick" and "lazy" as whole tokens, A splits
    them): the pair compares on the tokens whose content spans coincide, B's rows picked out of the range each
    block of A's rows covers."""
    from hrsa.extract.corpus import CorpusSpec, load_records, tokenize_corpus

    sentences = ["the quick brown fox jumps over the lazy dog", "hidden states of a tiny model", "w1 w2 w3"]
    texts = [" ".join(sentences[(i + j) % 3] for j in range(12 + i % 7)) for i in range(12)]
    corpus = Path(url).parent / "aligned.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = CorpusSpec(source=str(corpus))
    store = ActivationStore.open(url, mode="a")
    rng = np.random.default_rng(5)
    for mid, tokenizer in (("a", tiny_models.tokenizer()), ("b", tiny_models.tokenizer(extra_words=("quick", "lazy")))):
        table = tokenize_corpus(list(load_records(spec)), spec, tokenizer)
        cid = store.write_corpus(table, tokenizer={"name": mid, "fingerprint": mid})
        store.create_model(mid, corpus=cid, n_hidden_states=STATES, hidden_size=D, dtype="float32",
                           hidden_states=list(range(STATES)), chunk_tokens=CHUNK, shard_tokens=SHARD)
        writer = store.writer(mid)
        values = (rng.normal(size=(table.n_tokens, D)) + rng.uniform(-1e3, 1e3, D)).astype(np.float32)
        for unit in writer.units():
            writer.write_unit(unit, {k: (k + 1) * values[unit.start : unit.stop] for k in range(STATES)})
    return store


def test_an_aligned_pair_stays_under_its_estimate(tmp_path: Path, tiny_models: Any) -> None:
    """Two tokenizations of one corpus: B's rows of a block are picked out of the range of B's tokens they span
    (the plan's decoded_tokens_b, the reader's cache of B's shards in any order). At the smallest budget that plans,
    a whole run's measured peak stays under the plan's estimate."""
    store = aligned_store(str(tmp_path / "store"), tiny_models)
    pairs = store.token_pairs("a", "b")
    assert not pairs.identical and 0.5 < min(pairs.share()) < 1 and pairs.n_pairs > 2 * BLOCK  # several blocks
    res, peak, budget = run_at_the_least_budget(store, TokenSelection())
    assert res.n_tokens == pairs.n_pairs and res.plan.passes >= 2
    assert res.plan.estimated_peak <= budget
    assert peak <= res.plan.estimated_peak + MACHINERY, (peak, res.plan.estimated_peak)


def traced_peak(run: Any) -> tuple[Any, int]:
    """``run()``'s value and the most bytes tracemalloc saw allocated above the start meanwhile."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        value = run()
        return value, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def _arrays(value: Any) -> list[np.ndarray]:
    """Every numpy array inside a tile's accumulators (dataclasses, dicts), each memory once."""
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _arrays(v)]
    if hasattr(value, "__dataclass_fields__"):
        return [a for name in value.__dataclass_fields__ for a in _arrays(getattr(value, name))]
    return []


def _read_only(value: Any) -> Any:
    """``value`` as Ray hands it to the next task: every array read-only (mapped from its object store)."""
    for a in _arrays(value):
        a.flags.writeable = False
    return value


def _folded(store: ActivationStore, pair: ResolvedPair, tile: Tile, blocks: Any) -> Any:
    """A tile's accumulators over ``blocks``, folded here (float64 products), as a segment task folds them."""
    from hrsa.analyze.streaming.stream import StateReader, fold_segment

    arrays = {(s, k): store.hidden_state_array(s, k) for s, k in tile.streams}
    return fold_segment(tile, StateReader(arrays, pair.block_tokens), blocks, NumpyBackend(compute_dtype="float64"))


def _accumulator_bytes(value: Any) -> int:
    """The bytes of memory the arrays inside a tile's accumulators use: each view counted as the array it views, once."""
    roots = {}
    for a in _arrays(value):
        while isinstance(a.base, np.ndarray):
            a = a.base
        roots[id(a)] = a.nbytes
    return sum(roots.values())


@pytest.mark.parametrize(("metrics", "cross_layer"), [(("cka", "dimcorr"), True), (METRICS, False)])
def test_a_merge_of_two_read_only_partials_allocates_one_copy_of_the_accumulators(urls, metrics, cross_layer) -> None:
    """A merge task's inputs come out of Ray's object store read-only: the merge writes one fresh copy of the tile's
    accumulators, the plan's ``merged = 1`` and nothing else of their size (a temporary outer product per pair
    would be one more D x D the plan does not count: gigabytes on a 7B tile)."""
    from hrsa.analyze.streaming.stream import merge_partials

    store = ActivationStore.open(urls["float32"])
    pair = resolve_pair(store, "a", "b", metrics=metrics, debiased=False, cross_layer=cross_layer, groups=0,
                        selection=TokenSelection(), memory_budget=10**12, block_tokens=BLOCK, workers=2,
                        save_rotation=False, compute_bytes=8, per_worker_budget=True)
    tile = pair.plan.tiles[0]
    assert tile.kind == ("cross" if cross_layer else "matched") and len(pair.plan.tiles) == 1
    halves = [_read_only(_folded(store, pair, tile, [block])) for block in pair.blocks]
    gc.collect()
    tracemalloc.start()
    try:
        merged = merge_partials(*(dict(h) if isinstance(h, dict) else h for h in halves))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    output = _accumulator_bytes(merged)
    vectors = 16 * 8 * D * len(tile.pairs)  # O(D) temporaries: means, mean differences
    assert peak <= output + vectors, (peak, output, vectors)


def one_pass_on_two_workers(store: ActivationStore, *, compute_bytes: int, **kw: Any) -> tuple[int, ResolvedPair]:
    """The smallest per-worker budget (of a 10% grid) whose plan makes one pass on two workers, and that plan."""

    def per_worker(budget: int) -> ResolvedPair | None:
        try:
            return resolve_pair(store, "a", "b", debiased=False, selection=TokenSelection(), save_rotation=False,
                                compute_bytes=compute_bytes, memory_budget=budget, per_worker_budget=True, **kw)
        except MemoryBudgetError:
            return None

    found = next(((b, p) for b in (int(10**5 * 1.1**i) for i in range(120))
                  if (p := per_worker(b)) is not None and p.plan.passes == 1 and p.plan.workers == 2), None)
    assert found is not None, "no budget of the grid plans one pass on two workers"
    return found


@pytest.mark.integration
@pytest.mark.parametrize(("metrics", "cross_layer", "groups"), [(("cka", "dimcorr"), True, 0), (METRICS, False, 0),
                                                               (METRICS, False, len(DOCS))])
def test_every_ray_task_stays_under_the_per_worker_estimate_it_asked_ray_for(urls, ray_local, monkeypatch, metrics,
                                                                             cross_layer, groups) -> None:
    """On Ray the budget is per worker: every fold, merge and finish task asks Ray for the plan's estimated peak.
    Each task measures itself (tracemalloc, turned on in the workers' environment):
    its peak above its start stays under that estimate, the merge too (it writes into a copy of one input; both
    inputs are mapped from Ray's object store, which Ray's ``memory`` resource does not count either). One pass in
    two segments: a stacked cross-layer tile (with its self co-moments), matched tiles (Moments: the merge runs Chan's
    step), and matched tiles with groups of documents for the jackknife (the merge joins the segments' groups). The
    merge is held to what the plan says it holds: one copy of the tile's accumulators (their bytes measured on a fold
    here), and O(D) vectors."""
    from hrsa.analyze.pair import analyze_pair, passes
    from hrsa.analyze.streaming.ray_passes import task_resources

    store = ActivationStore.open(urls["float32"])
    kw = {"metrics": metrics, "cross_layer": cross_layer, "block_tokens": 64, "workers": 2, "groups": groups}
    budget, pair = one_pass_on_two_workers(store, compute_bytes=8, **kw)
    plan = pair.plan
    traced = {"runtime_env": {"env_vars": {"PYTHONTRACEMALLOC": "1"}}}
    monkeypatch.setattr(passes, "task_resources", lambda *a, **k: {**task_resources(*a, **k), **traced})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnderdeterminedWarning)
        res = analyze_pair(store, "a", "b", scheduler="ray", backend="numpy", compute_dtype="float64",
                           memory_budget=budget, **kw)
    assert res.plan.estimated_peak == plan.estimated_peak <= budget
    peaks = res.settings["task_peak_bytes"]
    assert set(peaks) == {"fold", "merge", "finish"}, peaks  # one tile in two segments, merged, finished
    assert all(0 < peak <= plan.estimated_peak + MACHINERY for peak in peaks.values()), (peaks, plan.estimated_peak)
    accumulators = _accumulator_bytes(_folded(store, pair, plan.tiles[0], pair.blocks[:1]))
    assert peaks["merge"] <= accumulators + 16 * 8 * D * len(plan.tiles[0].pairs), (peaks["merge"], accumulators)


@pytest.mark.parametrize("compute", ["float32", "float64"])
def test_the_gemm_probe_runs_before_the_passes_within_the_plan_s_peak(tmp_path, monkeypatch, compute: str) -> None:
    """From D = 128 a cross-layer pass runs one GEMM of its tile where a probe of the library allows it (see
    accumulators/gemm.py): the probe runs once per process before the accumulators exist, and only where its arrays
    fit the plan's peak, so an analysis whose first pass probes still stays under its estimate."""
    from hrsa.analyze.accumulators import gemm
    from hrsa.analyze.pair import analyze_pair

    url = str(tmp_path / "store")
    build_store(url, "float32", d=128)
    store = ActivationStore.open(url)
    run = {"metrics": ("cka",), "cross_layer": True, "memory_budget": "256MB", "block_tokens": BLOCK, "workers": 1,
           "scheduler": "threads", "backend": "numpy", "compute_dtype": compute}
    analyze_pair(store, "a", "b", **run)  # warm-up: imports, pools, the library's first calls
    monkeypatch.setattr(gemm, "_WHOLE_TILE", {})
    res, peak = traced_peak(lambda: analyze_pair(store, "a", "b", **run))
    assert gemm._WHOLE_TILE  # it probed
    assert gemm.probe_bytes(compute, 128, 128, BLOCK) <= res.plan.estimated_peak
    assert peak <= res.plan.estimated_peak + MACHINERY, (peak, res.plan.estimated_peak)


@pytest.mark.integration
def test_a_ray_fold_that_probes_the_gemm_stays_under_the_per_worker_estimate(tmp_path, ray_local, monkeypatch) -> None:
    """On Ray each worker process probes its library once, in its first fold task of a cross-layer tile (D = 128 here),
    before that fold measures itself: the probe's own peak (a "probe" record) and the fold's each stay under the
    estimate the task asked Ray for, so the worker never holds the probe's arrays beside the accumulators."""
    from hrsa.analyze.accumulators import gemm
    from hrsa.analyze.pair import analyze_pair, passes
    from hrsa.analyze.streaming.ray_passes import task_resources

    url = str(tmp_path / "store")
    build_store(url, "float32", d=128)
    store = ActivationStore.open(url)
    kw = {"metrics": ("cka",), "cross_layer": True, "block_tokens": BLOCK, "workers": 2, "groups": 0}
    budget, pair = one_pass_on_two_workers(store, compute_bytes=8, **kw)
    assert gemm.probe_bytes("float64", 128, 128, BLOCK) <= pair.plan.estimated_peak  # the probe's gate lets it run
    # A runtime_env of this test's own: fresh worker processes, which have probed nothing yet.
    traced = {"runtime_env": {"env_vars": {"PYTHONTRACEMALLOC": "1", "HRSA_TEST_FRESH_WORKERS": "probe"}}}
    monkeypatch.setattr(passes, "task_resources", lambda *a, **k: {**task_resources(*a, **k), **traced})
    res = analyze_pair(store, "a", "b", scheduler="ray", backend="numpy", compute_dtype="float64", memory_budget=budget,
                       **kw)
    peaks = res.settings["task_peak_bytes"]
    assert {"probe", "fold", "finish"} <= set(peaks), peaks
    assert peaks["probe"] >= gemm.probe_bytes("float64", 128, 128, BLOCK)  # it ran in a worker, its arrays counted
    assert all(peak <= res.plan.estimated_peak + MACHINERY for peak in peaks.values()), (peaks, res.plan.estimated_peak)


_AFTER_AN_ANALYSIS = """
import sys
import warnings
from hrsa.analyze.pair import analyze_pair
from hrsa.runtime.resident import freed_blocks_returned
from hrsa.store import ActivationStore

warnings.simplefilter("ignore")
analyze_pair(ActivationStore.open(sys.argv[1]), "a", "b", metrics=("cka",), backend="numpy", scheduler="threads")
print(freed_blocks_returned())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt's mmap threshold is glibc's")
def test_an_analysis_maps_large_blocks_on_their_own_so_freed_ones_leave_the_resident_set(urls) -> None:
    """The plan counts the arrays alive; the resident set follows them only when glibc maps large blocks on their own
    (runtime/resident.map_large_allocations, tested there): an analysis sets it for its process."""
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    done = subprocess.run([sys.executable, "-c", _AFTER_AN_ANALYSIS, urls["float32"]], capture_output=True, text=True,
                          timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip().splitlines()[-1]) > 480 * 2**20  # 512 MB freed, gone from the resident set


def grouped_peaks(url: str) -> dict[str, list[list[int]]]:
    """[peak by resident set, estimate] of each tile of a matched pass with 8 groups of documents, at the smallest
    budget (of a 10% grid) that keeps them in two passes, on numpy and on torch (float32 products): run in a process
    of its own, at the mmap threshold run_passes sets (none from the environment)."""
    from hrsa.store.errors import UserError

    store = ActivationStore.open(url)
    for budget in (int(10**6 * 1.1**i) for i in range(80)):
        try:
            pair = resolve_pair(store, "a", "b", metrics=METRICS, debiased=False, cross_layer=False,
                                selection=TokenSelection(), memory_budget=budget, block_tokens=None, workers=1,
                                save_rotation=False, compute_bytes=4, groups=8)
        except UserError:  # MemoryBudgetError: too small a budget
            continue
        if pair.plan.inputs.groups == 8:
            break
    assert pair.plan.passes == 2 and pair.block_tokens * GROUPED_D * 4 < 1 << 20, (pair.plan.passes, pair.block_tokens)
    return {name: [[peak, pair.plan.estimate(tile)] for tile, peak in
                   zip(shapes(pair.plan), measure_resident(store, pair, backend_of(name, "float32")))]
            for name in ("numpy", "torch")}


GROUPED_D = 384  # a group's Moments (3 D^2 float64) over glibc's 1 MB; a block of 256 tokens (393-786 kB) under it


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the resident set's high-water mark")
def test_a_grouped_matched_pass_stays_under_its_estimate_by_resident_set_at_the_threshold_it_sets(tmp_path) -> None:
    """Measured as a user's process runs it: no MALLOC_MMAP_THRESHOLD_ (the torch cases above set 64 kB). With
    glibc's threshold at 1 MB, blocks smaller than that stayed in the heaps of the reading and folding threads once
    freed: this pass peaked 5-7% over its estimate (and its budget), numpy and torch alike."""
    url = str(tmp_path / "store")
    build_store(url, "float32", d=GROUPED_D, docs=(128,) * 16)
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    script = "import json, sys; from tests.analyze import test_memory_model as m; print(json.dumps(m.grouped_peaks(sys.argv[1])))"
    done = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, timeout=300,
                          check=False, env={**env, "CUDA_VISIBLE_DEVICES": ""}, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    over = {name: [(peak, estimate) for peak, estimate in tiles if peak > estimate] for name, tiles in measured.items()}
    assert not any(over.values()), (over, measured)


@pytest.fixture
def torch_peaks_of(request: pytest.FixtureRequest) -> Any:
    """The torch measurements, fetched only by the torch cases (so that numpy cases never start the subprocess)."""
    return lambda key: request.getfixturevalue("torch_peaks")[key]


if __name__ == "__main__":
    _subprocess_main(json.loads(sys.argv[1]))


def test_several_reading_threads_stay_under_the_estimate_that_counts_their_buffers(urls) -> None:
    """Reads in flight at once hold their own buffers each: the model counts the ``read_threads`` largest, and a real
    pass that reads a block's states three at a time stays under it."""
    store = ActivationStore.open(urls["bfloat16"])
    pair = planned(store, urls["bfloat16"], compute="float32", workers=1)
    plan = plan_analysis(replace(pair.plan.inputs, read_threads=3, memory_budget=2 * pair.plan.inputs.memory_budget))
    one = replace(plan, inputs=replace(plan.inputs, read_threads=1))
    tiles = shapes(plan)
    assert plan.passes > 1 and all(plan.estimate(tile) > one.estimate(tile) for tile in tiles if len(tile.streams) > 1)
    peaks = measure_traced(store, replace(pair, plan=plan), backend_of("numpy", "float32"))
    report = [(tile.kind, len(tile.pairs), peak, plan.estimate(tile)) for tile, peak in zip(tiles, peaks)]
    assert all(peak <= estimate + MACHINERY for _, _, peak, estimate in report), report
