"""Streaming passes as Ray tasks: every tile of a pair at once, each tile's tokens split across the cluster.

Per tile the tasks are

    segment_0 ... segment_{s-1}      one task each (Ray's SPREAD: over the nodes), reading its blocks straight
         \\        /                  from the store and folding them into the tile's accumulators
          merges of two               a tree, each merge a task
               |
            finish                    the tile's small results (metrics of a matched tile, O(D) summaries of a
                                      cross-layer one): only these come back to the driver

and the tiles of a pair run side by side, so different tiles run on different workers at once (pair-parallel) while
the segments of one tile run on several (data-parallel); ``--workers`` caps the segments running at once. Every task asks Ray for one CPU and
for the memory the plan gives one worker (``--memory-budget`` is per worker here: a node runs only as many tasks as
its memory holds), and for one GPU when the backend is CUDA.

Why Ray tasks and not Dask-on-Ray, which the threads path's graph would run on unchanged: Dask-on-Ray submits its
tasks through a thread pool the size of the *driver's* CPU count (a 2-CPU head runs two tasks at a time on any
cluster), and takes Ray options per graph layer, not per task; the graph here is a tree of a few tasks per tile
that needs neither Dask's optimisations nor its scheduler.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hrsa.analyze.accumulators.centring import Float32RangeError
from hrsa.analyze.streaming.backends import GpuWorkers, local_float64_at_full_rate, tf32_matmuls
from hrsa.analyze.streaming.stream import fold_segment, merge_partials, prepare_products
from hrsa.runtime.placement import PlacementError, describe_nodes
from hrsa.runtime.resident import allocations_mapped_from, release_freed_heap
from hrsa.runtime.task_errors import one_line, root_cause
from hrsa.store.errors import HrsaError

if TYPE_CHECKING:
    from hrsa.analyze.streaming.backends import ChunkBackend
    from hrsa.analyze.streaming.plan import Tile
    from hrsa.analyze.streaming.stream import StateReader, TokenBlock

__all__ = ["AnalysisFailedError", "TaskRecord", "TilePass", "probe_gpu_workers", "run_tiles_on_ray", "task_resources"]

#: A tile's accumulators -> its small results (runs in the finish task: must pickle, e.g. a module-level function
#: or a functools.partial of one).
Finish = Callable[["Tile", Any], Any]


#: Tries Ray gives a task whose worker died (an OOM kill, a lost node) after the first: each starts from the task's
#: inputs, so a retried segment counts its blocks once.
RETRIES = 3


class AnalysisFailedError(HrsaError, RuntimeError):
    """An analysis task failed for good: its worker died on every try Ray gave it (killed for memory, a lost node)."""


@dataclass(frozen=True)
class TaskRecord:
    """Where one analysis task ran and the memory it took.

    Attributes:
        node: the Ray node id that ran it.
        kind: ``"fold"`` (a segment's blocks), ``"merge"``, ``"finish"``, or ``"probe"`` (a fold's GEMM probe, run
            before the fold).
        traced_peak: the most bytes Python and numpy held above the task's start (its inputs from Ray's object store
            are mapped, not allocated, and not counted, as Ray's ``memory`` resource does not count them), when
            ``tracemalloc`` traces the worker (``PYTHONTRACEMALLOC=1`` in its environment); None otherwise.
    """

    node: str
    kind: str
    traced_peak: int | None = None


@dataclass(frozen=True)
class TilePass:
    """One tile's pass: what to accumulate, where to read it, and its tokens cut into segments (one task each)."""

    tile: Tile
    reader: StateReader
    segments: tuple[tuple[TokenBlock, ...], ...]
    backend: ChunkBackend
    mmap_threshold: int = 1 << 20  # AnalysisPlan.mmap_threshold: set by each task in its worker


def task_resources(memory: int, gpu: bool) -> dict[str, Any]:
    """Ray options of every analysis task: one CPU, ``memory`` bytes, a GPU for a CUDA backend.

    Raises:
        PlacementError: no alive node has that much memory (and a GPU when asked): Ray would wait for one forever.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = [r for r in nodes if r.get("CPU", 0) >= 1 and r.get("memory", 0) >= memory and (not gpu or r.get("GPU", 0) >= 1)]
    if not fits:
        largest = sorted(r.get("memory", 0) / 1e9 for r in nodes)
        raise PlacementError(
            f"Expected a Ray node with {memory / 1e9:.3g} GB of memory{' and a GPU' if gpu else ''} for one analysis "
            f"task (the plan's peak per worker). Got {describe_nodes(largest, 'GB of Ray memory')} instead. "
            "Lower --memory-budget (it is per worker), or add a larger node."
        )
    return {"num_cpus": 1, "memory": int(memory), "num_gpus": 1 if gpu else 0}


#: Seconds the probe of the GPU nodes waits for a GPU on each: an analysis would wait as long for GPUs held by others.
GPU_PROBE_TIMEOUT_S = 120.0


def measure_gpu() -> tuple[int, bool, bool] | None:
    """On a GPU node, in the probe actor holding its GPUs: the least free bytes of one (:func:`device_free_bytes`), whether
    every one runs float64 at full rate (:func:`local_float64_at_full_rate`), and whether float32 GEMMs are float32
    there (:func:`tf32_matmuls`); None where torch there sees no CUDA device."""
    import torch

    from hrsa.analyze.accumulators.cross_tile import device_free_bytes

    if not torch.cuda.is_available():
        return None
    measured = []
    for index in range(torch.cuda.device_count()):
        with torch.cuda.device(index):
            full_rate = local_float64_at_full_rate()  # first: its context and matrices are held while free is read
            measured.append((device_free_bytes(torch.device("cuda", index)), full_rate))
        local_float64_at_full_rate.cache_clear()  # cached per process, measured per device
    return min(free for free, _ in measured), all(full_rate for _, full_rate in measured), not tf32_matmuls()


def probe_gpu_workers(measure: Callable[[], tuple[int, bool, bool] | None] = measure_gpu,
                      timeout_s: float = GPU_PROBE_TIMEOUT_S) -> GpuWorkers:
    """What the plan needs of the cluster's GPUs, which Ray does not know: ``measure`` run on every alive node that
    declares GPUs, by an actor pinned to the node holding all of them (one holding one would measure whichever GPU Ray
    hands it, and an analysis task may get any). Where some of a node's GPUs stay held by others (another job's
    actors), an actor holding one GPU measures one that comes free, as an analysis task would get one. Waits are for
    the GPUs to be placed; the measuring itself (a CUDA context and timed GEMMs per GPU) has ``timeout_s`` of its own.

    Raises:
        PlacementError: no alive node declares a GPU, a node's GPUs are ones torch there cannot use (or its probe
            failed: the error's last line), no GPU of some node came free within ``timeout_s`` (the analysis's tasks
            would wait for one without end), or a probe did not answer within ``timeout_s``.
    """
    import ray

    nodes = {n["NodeID"]: int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")}
    nodes = {node: gpus for node, gpus in nodes.items() if gpus >= 1}
    if not nodes:
        raise PlacementError("Expected an alive Ray node with a GPU for the products. Got none (a GPU node left the "
                             "cluster?). Add a GPU node, or pass --backend numpy.")
    whole = min(ALL_GPUS_WAIT_S, timeout_s / 2)
    placed, held = _place_probes(nodes, whole)
    if held:  # some GPUs there held by others: one that comes free
        more, held = _place_probes(dict.fromkeys(held, 1), timeout_s - whole)
        placed = {**placed, **more}
    try:
        if held:
            raise PlacementError(
                f"Expected a GPU to come free within {timeout_s:.0f} s on every Ray node that declares them. Got all "
                f"held on {len(held)} node(s) ({', '.join(node[:8] for node in held)}): another job's actors or tasks. "
                "Wait for them to finish, or pass --backend numpy."
            )
        found, failed = _measure_on(placed, measure, timeout_s)
    finally:
        for actor in placed.values():
            ray.kill(actor)  # its GPUs free again at once
    if failed:
        why = "; ".join(dict.fromkeys(failed.values()))
        raise PlacementError(
            f"Expected the GPU probe to run on every Ray node that declares a GPU. Got it failing on {len(failed)} "
            f"node(s) ({', '.join(node[:8] for node in failed)}): {why}. Check that hrsa, torch and CUDA work there, "
            "or pass --backend numpy."
        )
    blind = [node for node, measured in found.items() if measured is None]
    if blind:
        raise PlacementError(
            "Expected a CUDA device torch can use on every Ray node that declares a GPU. Got none on "
            f"{len(blind)} node(s) ({', '.join(node[:8] for node in blind)}). Start them with --num-gpus 0, install "
            "torch with CUDA there, or pass --backend numpy."
        )
    measured = [m for m in found.values() if m is not None]
    return GpuWorkers(free_bytes=min(m[0] for m in measured), float64_at_full_rate=all(m[1] for m in measured),
                      float32_exact=all(m[2] for m in measured))


#: Seconds the probe waits for all of a node's GPUs before it measures one that comes free: placed means the actor's
#: worker has started too (a cold one, importing hrsa and setting up its runtime env, takes seconds), so generous.
ALL_GPUS_WAIT_S = 60.0


class _GpuProbe:
    """Holds a node's GPUs while ``measure`` runs there (an actor: placed, then asked)."""

    def ready(self) -> bool:
        return True

    def measure(self, measure: Callable[[], Any]) -> Any:
        return measure()


def _place_probes(gpus: dict[str, int], wait_s: float) -> tuple[dict[str, Any], list[str]]:
    """A probe actor on each node holding ``gpus[node]`` GPUs there: those placed within ``wait_s``, and the nodes
    whose GPUs were not free (their actors killed: nothing left pending)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(_GpuProbe)
    actors = {node: probe.options(num_cpus=0, num_gpus=count, max_restarts=0,
                                  scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
              for node, count in gpus.items()}
    ready = {actors[node].ready.remote(): node for node in actors}
    done, waiting = ray.wait(list(ready), num_returns=len(ready), timeout=wait_s)
    held = [ready[r] for r in waiting]
    for node in held:
        ray.kill(actors[node])
    return {ready[r]: actors[ready[r]] for r in done}, held


def _measure_on(placed: dict[str, Any], measure: Callable[[], Any],
                timeout_s: float) -> tuple[dict[str, Any], dict[str, str]]:
    """``measure`` on each placed probe: what each returned, and each failure's one line (a probe that does not answer
    within ``timeout_s`` is one)."""
    import ray

    calls = {placed[node].measure.remote(measure): node for node in placed}
    done, slow = ray.wait(list(calls), num_returns=len(calls), timeout=timeout_s)
    found, failed = {}, {calls[c]: f"no answer within {timeout_s:.0f} s" for c in slow}
    for call in done:
        try:
            found[calls[call]] = ray.get(call)
        except ray.exceptions.RayError as error:
            failed[calls[call]] = _probe_failure(error)
    return found, failed


def _probe_failure(error: Exception) -> str:
    """A failed probe in one line: a task error's root cause, or where the probe's worker died (its creation failed:
    hrsa or torch not importable there; a node lost) the last line of Ray's account, without its colour codes."""
    import ray

    if isinstance(error, ray.exceptions.RayTaskError):
        return one_line(root_cause(error))
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def run_tiles_on_ray(passes: Sequence[TilePass], finish: Finish, options: dict[str, Any],
                     workers: int) -> Iterator[tuple[Tile, Any, list[TaskRecord]]]:
    """Submit the tiles' tasks, as many tiles at once as keep at most ``workers`` segments running; yield ``(tile,
    finished, records)`` as tiles finish, ``records`` one per task the tile ran."""
    import ray

    options = {**options, "max_retries": RETRIES}  # a task whose worker dies starts again: its partial state died too
    fold = ray.remote(_fold_task).options(**options, scheduling_strategy="SPREAD")
    merge = ray.remote(_merge_task).options(**options)
    done = ray.remote(_finish_task).options(**options)

    def submit(job: TilePass) -> Any:
        whole = len(job.segments) == 1  # nothing merges into it: a GPU's sums may leave as summaries (fold_segment)
        threshold = job.mmap_threshold
        parts = [fold.remote(job.tile, job.reader, segment, job.backend, options["memory"], whole, threshold)
                 for segment in job.segments]
        while len(parts) > 1:  # a tree of merges of two: each holds one output beside its inputs
            parts = [merge.remote(*parts[i : i + 2], mmap_threshold=threshold) if i + 1 < len(parts) else parts[i]
                     for i in range(0, len(parts), 2)]
        return done.remote(job.tile, parts[0], finish, threshold)

    at_once = max(1, workers // max(1, max((len(job.segments) for job in passes), default=1)))
    queue, pending = list(enumerate(passes)), {}
    while queue or pending:
        while queue and len(pending) < at_once:
            index, job = queue.pop(0)
            pending[submit(job)] = index
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        try:
            finished, records = ray.get(ready)
        except ray.exceptions.RayError as error:
            raise _failure(error) from error
        yield passes[pending.pop(ready)].tile, finished, records


def _failure(error: Exception) -> Exception:
    """A task's failure as one line: hrsa's own error (a forged shard, a user's mistake) as itself, unwrapped from
    Ray's chain of tasks (fold -> merge -> finish), anything else (the worker died on every retry) as
    AnalysisFailedError."""
    cause = root_cause(error)
    if isinstance(cause, (HrsaError, Float32RangeError)):  # the latter: auto runs the passes again in float64
        return cause
    return AnalysisFailedError(
        f"Expected every analysis task to finish. Got {one_line(cause)} instead (after {RETRIES} retries). A worker "
        "killed for memory: lower --memory-budget (it is per worker); otherwise the worker logs under "
        "/tmp/ray/session_latest/logs hold its traceback."
    )


def _fold_task(tile: Tile, reader: StateReader, blocks: tuple[TokenBlock, ...], backend: ChunkBackend,
               limit_bytes: int, whole: bool = False, mmap_threshold: int = 1 << 20) -> tuple[Any, list[TaskRecord]]:
    # Once per worker process, before the fold's memory counts; measured apart (a "probe" record) when it ran. The
    # threshold is set before the probe, whose freed arrays must not stay in the worker's heap.
    probed, probe = _measured("probe", [], lambda: prepare_products(tile, reader, backend, limit_bytes), mmap_threshold)
    return _measured("fold", probe if probed else [], lambda: fold_segment(tile, reader, blocks, backend, whole=whole),
                     mmap_threshold)


def _merge_task(*parts: tuple[Any, list[TaskRecord]], mmap_threshold: int = 1 << 20) -> tuple[Any, list[TaskRecord]]:
    # Ray hands each part's arrays out of its object store, read-only: merge_partials writes into copies.
    before = [record for _, records in parts for record in records]
    return _measured("merge", before, lambda: merge_partials(*(dict(acc) if isinstance(acc, dict) else acc
                                                               for acc, _ in parts)), mmap_threshold)


def _finish_task(tile: Tile, part: tuple[Any, list[TaskRecord]], finish: Finish,
                 mmap_threshold: int = 1 << 20) -> tuple[Any, list[TaskRecord]]:
    acc, before = part
    return _measured("finish", before, lambda: finish(tile, dict(acc) if isinstance(acc, dict) else acc), mmap_threshold)


def _measured(kind: str, before: list[TaskRecord], run: Callable[[], Any],
              mmap_threshold: int = 1 << 20) -> tuple[Any, list[TaskRecord]]:
    """``run()``'s value and the records of the tasks before it with this task's own appended."""
    # As in one process: the worker's resident set follows the arrays alive (its threshold back to 1 MB after)
    with allocations_mapped_from(mmap_threshold):
        return _run_measured(kind, before, run)


def _run_measured(kind: str, before: list[TaskRecord], run: Callable[[], Any]) -> tuple[Any, list[TaskRecord]]:
    import tracemalloc

    import ray

    tracing = tracemalloc.is_tracing()
    if tracing:
        # Libraries are outside the budget, as the interpreter is: what the tasks import on first use is imported
        # before the measurement starts (the jackknife's scipy.stats: 26 MB of Python objects).
        import scipy.stats  # noqa: F401

        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
    try:
        value = run()
        peak = tracemalloc.get_traced_memory()[1] - start if tracing else None
    finally:
        # Ray reuses workers: what glibc keeps of this task's freed heap would count against the next task's budget.
        release_freed_heap()
    return value, [*before, TaskRecord(ray.get_runtime_context().get_node_id(), kind, peak)]
