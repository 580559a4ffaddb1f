"""``analyze_pair``: compare two models of a store, the Python API behind ``hrsa analyze``.

A recipe in four phases: resolve the pair (:mod:`.resolve`: checks, tokens, blocks, plan), run the streaming
passes (:mod:`.passes`), run the local metrics on the same checked pair (k-NN overlap, probes: each on its own
reads of the store), and assemble the results (:mod:`.assembly`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from hrsa.analyze.accumulators.centring import FLOAT32_RANGE, Float32RangeError
from hrsa.analyze.accumulators.cross_tile import device_free_bytes
from hrsa.analyze.config import DEFAULT_GROUPS, METRICS, MOMENT_METRICS
from hrsa.analyze.local.hidden_states import shared_hidden_states
from hrsa.analyze.local.knn import KnnOptions, check_knn_budget, knn_pair
from hrsa.analyze.local.probe import ProbeOptions, check_probe, probe_pair
from hrsa.analyze.pair.assembly import assemble
from hrsa.analyze.pair.checks import check_metrics, check_pair
from hrsa.analyze.pair.passes import run_passes
from hrsa.analyze.pair.resolve import ResolvedPair, resolve_pair
from hrsa.analyze.metrics._common import PrecisionWarning
from hrsa.analyze.streaming.backends import (
    FEW_LEVEL_DTYPES, ChunkBackend, GpuWorkers, matched_backend, products_on_gpu, resolve_backend,
)
from hrsa.analyze.streaming.plan import DEVICE_MARGIN, parse_memory_budget
from hrsa.analyze.streaming.ray_passes import probe_gpu_workers
from hrsa.analyze.streaming.stream import resolve_scheduler
from hrsa.runtime.settings import SettingNames, flag_name
from hrsa.store.errors import UserError
from hrsa.store.selection import TokenSelection

if TYPE_CHECKING:
    from hrsa.analyze.pair.pair_results import PairResults
    from hrsa.analyze.streaming.backends import BackendName, ComputeDtype
    from hrsa.analyze.streaming.plan import AnalysisPlan
    from hrsa.analyze.streaming.stream import OnBlock, Scheduler
    from hrsa.store import ActivationStore

__all__ = ["analyze_pair"]


def analyze_pair(
    store: ActivationStore,
    a: str,
    b: str,
    *,
    metrics: Iterable[str] = METRICS,
    debiased: bool = False,
    cross_layer: bool = False,
    selection: TokenSelection | None = None,
    memory_budget: int | str = "4GB",
    block_tokens: int | None = None,
    workers: int | None = None,
    scheduler: Scheduler = "auto",
    backend: BackendName = "auto",
    compute_dtype: ComputeDtype = "auto",
    save_rotation: bool = False,
    groups: int = DEFAULT_GROUPS,
    knn_options: KnnOptions | None = None,
    probe_options: ProbeOptions | None = None,
    on_plan: Callable[[AnalysisPlan], None] | None = None,
    on_block: OnBlock | None = None,
    names: SettingNames = flag_name,
    read_threads: int | None = None,
) -> PairResults:
    """Compare hidden states of models ``a`` and ``b`` of ``store`` on the same tokens.

    Matched layers (k of A against k of B) get every requested metric from full ``Moments``. With
    ``cross_layer``, every hidden state of A is compared with every hidden state of B for linear CKA (biased)
    and dimension-wise correlation (its mean), from ``CrossMoments`` of each pair and the self co-moments of
    each state; the matched pass then runs only if Procrustes or debiased CKA is asked for.

    Args:
        store: an open store holding both models.
        a, b: model ids (A is the reference: Procrustes fits A onto B, rows of matrices are A's).
        metrics: any of ``"dimcorr"``, ``"cka"``, ``"procrustes"``, ``"knn"``, ``"probe"``.
        debiased: also debiased CKA on the matched layers.
        cross_layer: also every hidden state of A against every one of B (CKA and dimcorr matrices).
        selection: which tokens (default all).
        memory_budget: bytes, or text such as ``"4GB"``: on Ray, each worker's (every task's own peak); here, the
            process's, shared by its worker threads. So that the resident set follows the plan, the passes have glibc
            map blocks of 1 MB or more (of a block's size where that is less) on their own, and 1 MB after
            (:meth:`~hrsa.analyze.streaming.plan.AnalysisPlan.mmap_threshold`; a threshold in the environment wins).
        block_tokens: tokens per block read and multiplied (default: ~32 MB of float64 per state).
        workers: at most this many tasks at once (default: on Ray every CPU of the cluster, here one per core up
            to 4); here the plan takes fewer when each one's copy of the accumulators would cost extra passes.
        scheduler: ``"auto"``, ``"threads"``, ``"sync"`` or ``"ray"`` (see :func:`resolve_scheduler`).
        backend: ``"auto"``, ``"numpy"``, ``"cuda"`` or ``"torch"`` (see :func:`resolve_backend`).
        compute_dtype: dtype of the products: ``"auto"`` (float32, or float64 for the measures that invert C_xx and
            for bf16/fp16 stores: see :func:`resolve_backend`), ``"float32"`` or ``"float64"``.
        save_rotation: keep Procrustes' O* (D x D) of every matched layer in the results.
        groups: groups of whole documents whose statistics the matched passes keep apart, for a jackknife interval
            of every matched score (0: none; fewer when there are fewer documents or the budget asks).
        knn_options: k, sample size, seed and search of ``"knn"`` (default :class:`KnnOptions`).
        probe_options: label field, pooling, directions of ``"probe"`` (required with it).
        on_plan: called with the plan before the first pass (to print it).
        on_block: called with the token count of each block done (to show progress).
        names: how the messages of the local metrics' checks name their settings, given the field (`hrsa analyze`'s
            flags, ``--hidden-states``; a pipeline passes its YAML keys, ``pairs.0.hidden_states``).
        read_threads: threads reading each segment's states of a block at once (the plan counts each one's buffers).
            Default: with products on a local GPU, half the cores up to 8 (the host only reads there: one thread
            decoding every state kept an H200's analysis waiting); else 1 (CPU products keep the cores busy, and a
            Ray task holds one CPU).

    Returns:
        A PairResults.

    Raises:
        CorpusMismatchError: the models were extracted on different corpora.
        UserError: unknown model or metric, incomplete extraction, no hidden states in common, sizes
            the metrics cannot compare, an empty selection, or a budget too small for one pair.

    Warns:
        UnderdeterminedWarning: O* is not unique (no more tokens than dimensions, or rank-deficient C_xy).
        PrecisionWarning: float32 products where they may be off by more than 1e-6 (see :func:`warn_float32_on_few_levels`).
    """
    selection = selection or TokenSelection()
    # Phase 1: check the pair and plan its passes.
    metrics = list(metrics)  # read twice below
    budget = parse_memory_budget(memory_budget)
    dask_scheduler = resolve_scheduler(scheduler)  # before the plan: on Ray the budget is each worker's
    on_ray = dask_scheduler.name == "ray"
    # On a cluster with GPU workers the products run there (torch, CUDA), whatever the driver's node has.
    products = bool(set(metrics) & set(MOMENT_METRICS))  # k-NN and probes alone multiply no co-moments
    gpu_workers = None
    if on_ray and products and backend != "numpy" and _cluster_gpus():
        check_pair(store, a, b, check_metrics(metrics))  # bad input named at once, not after the probe's wait
        gpu_workers = probe_gpu_workers()
    dtypes = stored_dtypes(store, (a, b))
    chunk_backend = resolve_backend(backend, compute_dtype, metrics=metrics, cluster_gpus=gpu_workers,
                                    stored_dtypes=dtypes, multiplies=products)

    def planned(chunk_backend: ChunkBackend) -> ResolvedPair:
        return resolve_pair(
            store, a, b, metrics=metrics, debiased=debiased, cross_layer=cross_layer, selection=selection,
            memory_budget=budget, block_tokens=block_tokens, workers=workers or _default_workers(on_ray),
            save_rotation=save_rotation, compute_bytes=np.dtype(chunk_backend.compute_dtype).itemsize, groups=groups,
            per_worker_budget=on_ray, read_threads=read_threads or _default_read_threads(chunk_backend, on_ray),
            device_budget=device_budget(chunk_backend, gpu_workers if on_ray else None),
        )

    pair = planned(chunk_backend)
    knn_options = _states_resolved(store, pair, "knn", knn_options, names)
    probe_options = _states_resolved(store, pair, "probe", probe_options, names)
    _check_local_metrics(store, pair, selection, knn_options, probe_options, names)  # before the passes, not after
    if on_plan is not None:
        on_plan(pair.plan)
    # Phase 2: the streaming passes.
    for_matched = matched_backend(chunk_backend, compute_dtype, metrics)
    running = [for_matched] * bool(pair.plan.count("matched")) + [chunk_backend] * bool(
        pair.plan.count("cross") or pair.plan.count("self"))
    warn_float32_on_few_levels(compute_dtype, dtypes, running)
    try:
        outputs = run_passes(store, pair, chunk_backend, dask_scheduler, on_block, matched=for_matched)
    except Float32RangeError as error:  # activations whose squares float32 does not hold: float64 products
        if compute_dtype != "auto":  # (on Ray too the error is the task's own: ray_passes._failure unwraps it)
            raise UserError(str(error)) from None
        low, high = FLOAT32_RANGE
        warnings.warn(f"Centred activations of magnitude {error.magnitude:.3g} in {a} or {b}, "
                      f"whose squares float32 does not hold (it holds {low:.2g} to {high:.2g}): float64 products instead "
                      "(the passes ran again, planned for them).", PrecisionWarning, stacklevel=2)
        chunk_backend = replace(chunk_backend, compute_dtype="float64")  # type: ignore[type-var]
        for_matched = replace(for_matched, compute_dtype="float64")  # type: ignore[type-var]
        pair = planned(chunk_backend)
        if on_plan is not None:
            on_plan(pair.plan)
        outputs = run_passes(store, pair, chunk_backend, dask_scheduler, on_block, matched=for_matched)
    settings: dict[str, Any] = {"scheduler": dask_scheduler.name, "backend": chunk_backend.name,
                                "compute_dtype": chunk_backend.compute_dtype, "block_tokens": pair.block_tokens,
                                "workers": pair.plan.workers}
    if pair.plan.count("matched") and for_matched.compute_dtype != chunk_backend.compute_dtype:
        settings["matched_compute_dtype"] = for_matched.compute_dtype
    if outputs.segments_per_node:
        settings["segments_per_node"] = outputs.segments_per_node
    if outputs.task_peaks:  # measured, against the plan's estimated_peak per worker
        settings["task_peak_bytes"] = outputs.task_peaks
    # Phase 3: the local metrics, on their own reads; phase 4: the results.
    local = _local_metrics(store, pair, selection, knn_options, probe_options, settings, names)
    return replace(assemble(pair, selection, outputs, settings), **local)


def _cluster_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def device_budget(backend: ChunkBackend, gpu_workers: GpuWorkers | None = None) -> int | None:
    """Bytes the GPU the products run on has free for a pass (what torch's allocator holds unused counts as free), less
    a margin for the library's workspaces: the local GPU's, or on a Ray cluster the least a GPU worker has (its probe,
    ``gpu_workers``); None for products on the CPU. A tile's sums must fit there: a 7B pair's 29 x 29 float64 tile is
    86 GB, more than an 80 GB GPU holds."""
    if not products_on_gpu(backend):
        return None
    if gpu_workers is not None:
        return max(0, gpu_workers.free_bytes - DEVICE_MARGIN)
    import torch

    return max(0, device_free_bytes(torch.device(getattr(backend, "device", "cuda"))) - DEVICE_MARGIN)


def warn_float32_on_few_levels(asked: str, dtypes: Iterable[str], running: Iterable[ChunkBackend]) -> None:
    """The one case where ``auto`` keeps float32 products although the store holds few levels (GPUs whose float64 is
    slow: :data:`~hrsa.analyze.streaming.backends.FEW_LEVEL_DTYPES`): said, not silent. ``running``: the backends
    of the passes that run (none for k-NN or probes alone; float64 ones for Procrustes' matched tiles)."""
    float32 = any(backend.compute_dtype == "float32" for backend in running)
    if asked == "auto" and float32 and FEW_LEVEL_DTYPES & set(dtypes):
        warnings.warn(
            "float32 products on a bf16/fp16 store: the GPU(s) run float64 at 1/32-1/64 of their float32 rate, so "
            "--compute-dtype auto keeps float32. Where a channel holds few bf16 levels (a massive activation), CKA and "
            "dimension-wise correlation may be 5e-6 to 1e-5 off float64 sums; --compute-dtype float64 sums exactly.",
            PrecisionWarning,
            stacklevel=3,  # the caller of analyze_pair
        )


def stored_dtypes(store: ActivationStore, models: tuple[str, str]) -> list[str]:
    """The dtypes the models are stored in, for the products' dtype; one that cannot be read is left to
    :func:`resolve_pair`, which reports it."""
    dtypes = []
    for mid in models:
        try:
            dtypes.append(store.model_info(mid).dtype)
        except (UserError, ValueError, KeyError, FileNotFoundError):
            continue
    return dtypes


def _default_read_threads(backend: ChunkBackend, on_ray: bool) -> int:
    """See ``analyze_pair``'s ``read_threads``."""
    if on_ray or not products_on_gpu(backend):
        return 1
    return min(8, max(1, (os.cpu_count() or 1) // 2))


def _default_workers(on_ray: bool) -> int:
    """On Ray, every CPU of the cluster (each task takes one); here, one per core, up to 4 (each thread's copy of the
    accumulators shares the process's budget)."""
    if on_ray:
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return min(4, os.cpu_count() or 1)


_Options = TypeVar("_Options", KnnOptions, ProbeOptions)


def _states_resolved(store: ActivationStore, pair: ResolvedPair, metric: str, options: _Options | None,
                     names: SettingNames) -> _Options | None:
    """``options`` of ``metric`` with its hidden states resolved (-1: the last of each model), so that the results'
    settings name the hidden states read, as their metrics do; as given where the metric is not asked for."""
    if options is None or options.hidden_states is None or metric not in pair.metrics:
        return options
    return replace(options, hidden_states=shared_hidden_states(store, pair.info_a.id, pair.info_b.id,
                                                               options.hidden_states, names=names))


def _check_local_metrics(
    store: ActivationStore, pair: ResolvedPair, selection: TokenSelection, knn_options: KnnOptions | None,
    probe_options: ProbeOptions | None, names: SettingNames,
) -> None:
    """Refuse now what the local metrics would refuse after the streaming passes: a hidden state not shared, no label
    field, labels of one class or too few, or a pass that cannot fit the budget (no hidden state read)."""
    a, b, budget = pair.info_a.id, pair.info_b.id, pair.plan.inputs.memory_budget
    if "knn" in pair.metrics:
        check_knn_budget(store, a, b, selection=selection, pairs=pair.pairs, memory_budget=budget,
                         **(knn_options or KnnOptions()).to_dict())
    if "probe" in pair.metrics:
        if probe_options is None:
            raise UserError("Expected a label field for the probe metric. Got none. Name it with "
                            f"{names('label_field')}.")
        check_probe(store, a, b, selection=selection, memory_budget=budget, names=names, **probe_options.to_dict())


def _local_metrics(
    store: ActivationStore, pair: ResolvedPair, selection: TokenSelection, knn_options: KnnOptions | None,
    probe_options: ProbeOptions | None, settings: dict[str, Any], names: SettingNames,
) -> dict[str, Any]:
    """``{"knn": ..., "probe": ...}`` as asked for; their settings are added to ``settings``. Each runs after the
    streaming passes, so each may hold the whole memory budget (and refuses before reading when it cannot fit)."""
    a, b = pair.info_a.id, pair.info_b.id
    budget = pair.plan.inputs.memory_budget
    local: dict[str, Any] = {}
    if "knn" in pair.metrics:
        knn_options = knn_options or KnnOptions()
        local["knn"] = knn_pair(store, a, b, selection=selection, pairs=pair.pairs, memory_budget=budget,
                                **knn_options.to_dict())
        settings["knn"] = knn_options.to_dict()
    if "probe" in pair.metrics:
        if probe_options is None:
            raise UserError("Expected a label field for the probe metric. Got none. Name it with "
                            f"{names('label_field')}.")
        local["probe"] = probe_pair(store, a, b, selection=selection, memory_budget=budget, names=names,
                                    **probe_options.to_dict())
        settings["probe"] = {**probe_options.to_dict(), "n_docs": local["probe"].n_docs,
                             "classes": list(local["probe"].classes),
                             "labels_file": local["probe"].labels_file,  # the file read, not only the one asked for
                             "labels_digest": local["probe"].labels_digest}
    return local
