"""Compare two models of a store: ``analyze_pair`` (the Python API behind ``hrsa analyze``).

A recipe in four phases:

1. ``_setup``: check the pair (both complete, same corpus, shared hidden states, sizes the metrics
   need), resolve the token selection, cut it into blocks, and plan tiles under the memory budget;
2. ``_run``: one streaming pass per tile (:mod:`hrsa.analyze.streaming.stream`), each tile finished into small
   results right away so that its D x D accumulators are freed before the next pass;
3. ``_assemble``: per-layer results and cross-layer matrices into a frozen :class:`PairResults`.

Matched layers (k of A against k of B) get every requested metric from full ``Moments``. With
``cross_layer``, every hidden state of A is compared with every hidden state of B for linear CKA
(biased) and dimension-wise correlation (its mean), from ``CrossMoments`` of each pair and the self
co-moments of each state; the matched pass then runs only if Procrustes or debiased CKA is asked for.
The local metrics (``knn``: :mod:`hrsa.analyze.local.knn`; ``probe``: :mod:`hrsa.analyze.local.probe`) run after the
passes on the same checked pair, on their own reads of the store.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from hrsa.analyze.streaming.backends import BackendName, resolve_backend
from hrsa.analyze.local.knn import KnnOptions, KnnPairResult, knn_pair
from hrsa.analyze.metrics import (
    CkaResult,
    DimwiseCorrelationResult,
    ProcrustesResult,
    UnderdeterminedWarning,
    dimwise_correlation_from_moments,
    dimwise_correlation_from_summaries,
    linear_cka_from_moments,
    linear_cka_from_summaries,
    procrustes_from_moments,
)
from hrsa.analyze.local.probe import ProbeOptions, ProbePairResult, probe_pair
from hrsa.analyze.streaming.plan import AnalysisPlan, MemoryBudgetError, PlanInputs, parse_memory_budget, plan_analysis
from hrsa.analyze.streaming.stream import OnBlock, Scheduler, StateReader, resolve_scheduler, run_tile, split_segments, token_blocks
from hrsa.store.errors import CorpusMismatchError, IncompleteModelError, UserError
from hrsa.store.selection import TokenFilter

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from hrsa.analyze.accumulators.cross_moments import CoMomentSummary
    from hrsa.analyze.streaming.plan import Tile
    from hrsa.store import ActivationStore, ModelInfo

__all__ = ["LOCAL_METRICS", "METRICS", "PairResults", "TokenSelection", "analyze_pair"]

METRICS = ("dimcorr", "cka", "procrustes")  # streaming metrics, from co-moments
LOCAL_METRICS = ("knn", "probe")  # local geometry and function, from their own reads
_BLOCK_BYTES = 32 << 20  # float64 bytes of one state's block: big enough for fast GEMMs, small next to D^2


@dataclass(frozen=True)
class TokenSelection:
    """Which tokens of the corpus to compare on (all by default).

    Attributes:
        exclude_special: drop special tokens (BOS, chat-template markers).
        exclude_first: drop position 0 of every document (attention sinks carry huge norms).
        positions: keep positions ``a <= p < b`` inside each document.
        docs: keep only these documents (indices into the corpus's document table).
        tokens: keep only the global token range ``(start, stop)``.
    """

    exclude_special: bool = False
    exclude_first: bool = False
    positions: tuple[int, int] | None = None
    docs: tuple[int, ...] | None = None
    tokens: tuple[int, int] | None = None

    def token_filter(self) -> TokenFilter:
        return TokenFilter(exclude_special=self.exclude_special, exclude_first=self.exclude_first, positions=self.positions)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.token_filter().to_dict(),
            "docs": list(self.docs) if self.docs is not None else None,
            "tokens": list(self.tokens) if self.tokens is not None else None,
        }


@dataclass(frozen=True, eq=False)  # eq=False: holds arrays
class PairResults:
    """Everything one comparison of model A with model B computed.

    Attributes:
        a, b: model ids; corpus: their corpus id (A's); n_tokens: tokens compared on.
        selection: the token selection; metrics: the metrics asked for.
        matched: hidden states compared one to one (k of A with k of B); the per-layer tuples below
            follow this order.
        hidden_states_a, hidden_states_b: rows and columns of the cross-layer matrices (both equal
            to ``matched`` without ``cross_layer``).
        cka, cka_debiased, dimcorr, procrustes: per matched layer, or None when not computed.
        cka_matrix, dimcorr_matrix: (len(hidden_states_a), len(hidden_states_b)) biased CKA and mean
            dimension-wise correlation, or None without ``cross_layer``.
        knn, probe: k-NN overlap and cross-model probes, or None when not asked for.
        plan: the tiles that ran; settings: scheduler, backend, compute dtype, block size, workers.
    """

    a: str
    b: str
    corpus: str
    n_tokens: int
    selection: TokenSelection
    metrics: tuple[str, ...]
    matched: tuple[int, ...]
    hidden_states_a: tuple[int, ...]
    hidden_states_b: tuple[int, ...]
    plan: AnalysisPlan
    settings: Mapping[str, Any] = field(default_factory=dict)
    cka: tuple[CkaResult, ...] | None = None
    cka_debiased: tuple[CkaResult, ...] | None = None
    dimcorr: tuple[DimwiseCorrelationResult, ...] | None = None
    procrustes: tuple[ProcrustesResult, ...] | None = None
    cka_matrix: NDArray[np.float64] | None = None
    dimcorr_matrix: NDArray[np.float64] | None = None
    knn: KnnPairResult | None = None
    probe: ProbePairResult | None = None

    @property
    def cross_layer(self) -> bool:
        return self.cka_matrix is not None or self.dimcorr_matrix is not None


@dataclass(frozen=True)
class _Job:
    """What ``_setup`` resolved: the inputs of the passes."""

    info_a: ModelInfo
    info_b: ModelInfo
    metrics: tuple[str, ...]
    debiased: bool
    save_rotation: bool
    matched: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    n_tokens: int
    block_tokens: int
    blocks: tuple[Any, ...]
    plan: AnalysisPlan


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
    compute_dtype: str = "auto",
    save_rotation: bool = False,
    knn_options: KnnOptions | None = None,
    probe_options: ProbeOptions | None = None,
    on_plan: Callable[[AnalysisPlan], None] | None = None,
    on_block: OnBlock | None = None,
) -> PairResults:
    """Compare hidden states of models ``a`` and ``b`` of ``store`` on the same tokens.

    Args:
        store: an open store holding both models.
        a, b: model ids (A is the reference: Procrustes fits A onto B, rows of matrices are A's).
        metrics: any of ``"dimcorr"``, ``"cka"``, ``"procrustes"``, ``"knn"``, ``"probe"``.
        debiased: also debiased CKA on the matched layers.
        cross_layer: also every hidden state of A against every one of B (CKA and dimcorr matrices).
        selection: which tokens (default all).
        memory_budget: bytes, or text such as ``"4GB"``, for the accumulators held at once.
        block_tokens: tokens per block read and multiplied (default: ~32 MB of float64 per state).
        workers: at most this many segment tasks at once (default: one per core, up to 4); the plan takes
            fewer when each one's copy of the accumulators would cost extra passes.
        scheduler: ``"auto"``, ``"threads"``, ``"sync"`` or ``"ray"`` (see :func:`resolve_scheduler`).
        backend: ``"auto"``, ``"numpy"``, ``"cuda"`` or ``"torch"`` (see :func:`resolve_backend`).
        compute_dtype: dtype of the products: ``"auto"``, ``"float32"`` or ``"float64"``.
        save_rotation: keep Procrustes' O* (D x D) of every matched layer in the results.
        knn_options: k, sample size, seed and search of ``"knn"`` (default :class:`KnnOptions`).
        probe_options: label field, pooling, directions of ``"probe"`` (required with it).
        on_plan: called with the plan before the first pass (to print it).
        on_block: called with the token count of each block done (to show progress).

    Returns:
        A PairResults.

    Raises:
        CorpusMismatchError: the models were extracted on different corpora.
        UserError: unknown model or metric, incomplete extraction, no hidden states in common, sizes
            the metrics cannot compare, an empty selection, or a budget too small for one pair.

    Warns:
        UnderdeterminedWarning: O* is not unique (no more tokens than dimensions, or rank-deficient C_xy).
    """
    engine = resolve_backend(backend, compute_dtype)
    job = _setup(store, a, b, list(metrics), debiased, cross_layer, selection or TokenSelection(),
                 parse_memory_budget(memory_budget), block_tokens, workers or min(4, os.cpu_count() or 1), save_rotation,
                 np.dtype(engine.compute_dtype).itemsize)
    if on_plan is not None:
        on_plan(job.plan)
    execution = resolve_scheduler(scheduler)
    matched, summaries = _run(store, job, engine, execution, on_block)
    settings = {"scheduler": execution.name, "backend": engine.name, "compute_dtype": engine.compute_dtype,
                "block_tokens": job.block_tokens, "workers": job.plan.workers}
    local: dict[str, Any] = {}
    if "knn" in job.metrics:
        knn_options = knn_options or KnnOptions()
        local["knn"] = knn_pair(store, a, b, selection=selection, **knn_options.to_dict())
        settings["knn"] = knn_options.to_dict()
    if "probe" in job.metrics:
        if probe_options is None:
            raise UserError("Expected a label field for the probe metric. Got none. Pass --label-field FIELD.")
        local["probe"] = probe_pair(store, a, b, selection=selection, **probe_options.to_dict())
        settings["probe"] = {**probe_options.to_dict(), "n_docs": local["probe"].n_docs, "classes": list(local["probe"].classes)}
    return replace(_assemble(job, selection or TokenSelection(), matched, summaries, settings), **local)


# --- phase 1: setup ---------------------------------------------------------------------------------------


def _setup(
    store: ActivationStore, a: str, b: str, metrics: list[str], debiased: bool, cross_layer: bool,
    selection: TokenSelection, budget: int, block_tokens: int | None, workers: int, save_rotation: bool, compute_bytes: int,
) -> _Job:
    # Step 1: the pair itself.
    bad = [m for m in metrics if m not in METRICS + LOCAL_METRICS]
    if bad or not metrics:
        raise UserError(f"Expected metrics among {', '.join(METRICS + LOCAL_METRICS)}. Got {', '.join(bad) or 'none'} instead.")
    metrics_t = tuple(m for m in METRICS + LOCAL_METRICS if m in metrics)
    streaming = bool(set(metrics_t) & set(METRICS))
    info_a, info_b = _check_pair(store, a, b, metrics_t)
    # Step 2: the tokens.
    sel = store.select(a, tokens=selection.tokens, docs=selection.docs, token_filter=selection.token_filter())
    n_tokens = sel.stop - sel.start if isinstance(sel, slice) else int(np.unique(sel).size)
    if debiased and n_tokens < 4:
        raise UserError(f"Expected at least 4 tokens for debiased CKA. Got {n_tokens} instead. Loosen the selection.")
    if block_tokens is not None and block_tokens < 1:
        raise UserError(f"Expected a positive block size. Got {block_tokens} instead.")
    # Step 3: what to accumulate.
    matched = tuple(sorted(set(info_a.hidden_states) & set(info_b.hidden_states)))
    needs_matched = streaming and (not cross_layer or "procrustes" in metrics_t or debiased)
    crossed = cross_layer and bool({"cka", "dimcorr"} & set(metrics_t))
    rows, cols = (tuple(info_a.hidden_states), tuple(info_b.hidden_states)) if crossed else ((), ())
    base = PlanInputs(
        matched=matched if needs_matched else (), rows=rows, cols=cols, dx=info_a.hidden_size, dy=info_b.hidden_size,
        read_bytes_a=_itemsize(info_a), read_bytes_b=_itemsize(info_b), compute_bytes=compute_bytes, n_tokens=n_tokens,
        block_tokens=0, n_blocks=0, workers=workers, memory_budget=budget,
    )
    # Step 4: blocks and tiles; a default block size shrinks (down to 64 tokens) until one pair fits the budget.
    size = block_tokens or _default_block_tokens(info_a, info_b)
    while True:
        blocks = tuple(token_blocks(sel, size))
        try:
            held = max(b.n_rows for b in blocks)  # what a block holds: less than the grid's size for few tokens
            plan = plan_analysis(replace(base, block_tokens=held, n_blocks=len(blocks)))
            break
        except MemoryBudgetError:
            if block_tokens is not None or size <= 64:
                raise
            size = max(64, size // 2)
    return _Job(info_a, info_b, metrics_t, debiased, save_rotation, matched, rows, cols, n_tokens, size, blocks, plan)


def _check_pair(store: ActivationStore, a: str, b: str, metrics: tuple[str, ...]) -> tuple[ModelInfo, ModelInfo]:
    info_a, info_b = store.model_info(a), store.model_info(b)
    for info in (info_a, info_b):
        if not info.complete:
            raise IncompleteModelError(
                f"Expected a complete extraction of {info.id}. Got {info.units_done}/{info.n_units} work units done instead. "
                "Re-run the same `hrsa extract` to finish it (it resumes)."
            )
    if info_a.corpus != info_b.corpus and not _same_tokens(store, info_a.corpus, info_b.corpus):
        raise CorpusMismatchError(
            f"Expected {a} and {b} extracted on the same corpus (identical token ids). Got {a} on {info_a.corpus} "
            f"({info_a.n_tokens} tokens) and {b} on {info_b.corpus} ({info_b.n_tokens} tokens) instead. "
            f"Extract {b} on {a}'s corpus (`hrsa store info` shows each model's corpus)."
        )
    if not set(info_a.hidden_states) & set(info_b.hidden_states):
        raise UserError(
            f"Expected hidden states in common. Got {list(info_a.hidden_states)} for {a} and "
            f"{list(info_b.hidden_states)} for {b} instead. Extract the same hidden states of both models."
        )
    needs_equal = [m for m in metrics if m in ("dimcorr", "procrustes")]
    if needs_equal and info_a.hidden_size != info_b.hidden_size:
        raise UserError(
            f"Expected equal hidden sizes for {', '.join(needs_equal)}. Got D={info_a.hidden_size} for {a} and "
            f"D={info_b.hidden_size} for {b} instead. Use --metrics cka to compare models of different widths."
        )
    return info_a, info_b


def _same_tokens(store: ActivationStore, cid_a: str, cid_b: str) -> bool:
    """Two corpus ids with identical token ids and documents (e.g. tokenizers with different fingerprints)."""
    ta, tb = store.tokens(cid_a), store.tokens(cid_b)
    return len(ta) == len(tb) and all(np.array_equal(ta[c].to_numpy(), tb[c].to_numpy()) for c in ("token_id", "doc_index"))


def _default_block_tokens(info_a: ModelInfo, info_b: ModelInfo) -> int:
    """A whole number of both stores' chunks, ~32 MB of float64 per state, at most one shard."""
    chunk = max(info_a.layout.chunk_tokens, info_b.layout.chunk_tokens)
    shard = max(info_a.layout.shard_tokens, info_b.layout.shard_tokens)
    target = _BLOCK_BYTES // (8 * max(info_a.hidden_size, info_b.hidden_size))
    return max(chunk, min(shard, target) // chunk * chunk)


def _itemsize(info: ModelInfo) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(info.dtype, 4)


# --- phase 2: the passes ----------------------------------------------------------------------------------


def _run(store: ActivationStore, job: _Job, engine: Any, execution: Any, on_block: OnBlock | None) -> tuple[dict, dict]:
    """Every tile in turn; returns finished matched results by layer, and co-moment summaries by pair."""
    mids = {"a": job.info_a.id, "b": job.info_b.id}
    keys = {key for tile in job.plan.tiles for key in tile.streams}
    reader = StateReader({(s, k): store.hidden_state(mids[s], k, chunk_tokens=job.block_tokens) for s, k in keys})
    segments = split_segments(job.blocks, job.plan.workers)
    matched: dict[int, dict[str, Any]] = {}
    summaries: dict[Any, CoMomentSummary] = {}
    underdetermined = False
    for tile in job.plan.tiles:
        acc = run_tile(tile, reader, segments, engine, execution, on_block)
        underdetermined |= _finish_tile(tile, acc, job, matched, summaries)
        del acc  # free the tile's D x D accumulators before the next pass
    if underdetermined:  # one warning for the run, not one per layer
        warnings.warn(
            f"Orthogonal Procrustes on {job.n_tokens} tokens in D = {job.info_a.hidden_size} dimensions: the optimal "
            "rotation is not unique, so h_inv means little. Use more tokens than dimensions.",
            UnderdeterminedWarning,
            stacklevel=3,
        )
    return matched, summaries


def _finish_tile(tile: Tile, acc: dict, job: _Job, matched: dict, summaries: dict) -> bool:
    """Reduce each pair's accumulator to what the results keep (numbers and O(D) vectors).

    Returns:
        Whether a Procrustes fit was underdetermined (its per-layer warning is folded into one).
    """
    underdetermined = False
    for pair, value in acc.items():
        if tile.kind != "matched":
            summaries[pair] = value.summary()
            continue
        out: dict[str, Any] = {}
        if "cka" in job.metrics:
            out["cka"] = linear_cka_from_moments(value)
            if job.debiased:
                out["cka_debiased"] = linear_cka_from_moments(value, debiased=True)
        if "dimcorr" in job.metrics:
            out["dimcorr"] = dimwise_correlation_from_moments(value)
        if "procrustes" in job.metrics:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnderdeterminedWarning)  # recorded in the result, warned once
                out["procrustes"] = procrustes_from_moments(value, return_rotation=job.save_rotation)
            underdetermined |= out["procrustes"].underdetermined
        matched[pair[0][1]] = out
    return underdetermined


# --- phase 3: results -------------------------------------------------------------------------------------


def _assemble(job: _Job, selection: TokenSelection, matched: dict, summaries: dict, settings: dict) -> PairResults:
    per_layer: dict[str, Any] = {}
    for name in ("cka", "cka_debiased", "dimcorr", "procrustes"):
        values = [matched[k].get(name) for k in job.matched] if matched else []
        per_layer[name] = tuple(values) if values and all(v is not None for v in values) else None
    matrices = _cross_layer(job, summaries, per_layer) if job.rows else {}
    return PairResults(
        a=job.info_a.id, b=job.info_b.id, corpus=job.info_a.corpus, n_tokens=job.n_tokens, selection=selection,
        metrics=job.metrics, matched=job.matched,
        hidden_states_a=job.rows or job.matched, hidden_states_b=job.cols or job.matched,
        plan=job.plan, settings=settings, **per_layer, **matrices,
    )


def _cross_layer(job: _Job, summaries: dict, per_layer: dict[str, Any]) -> dict[str, Any]:
    """The (I, J) matrices from the summaries; fills the per-layer CKA/dimcorr when no matched pass ran."""
    self_a = {i: summaries[("a", i), ("a", i)] for i in job.rows}
    self_b = {j: summaries[("b", j), ("b", j)] for j in job.cols}
    cross = {(i, j): summaries[("a", i), ("b", j)] for i in job.rows for j in job.cols}

    def cka(i: int, j: int) -> CkaResult:
        return linear_cka_from_summaries(cross[i, j], self_a[i], self_b[j])

    def dimcorr(i: int, j: int) -> DimwiseCorrelationResult:
        return dimwise_correlation_from_summaries(cross[i, j], self_a[i], self_b[j])

    out: dict[str, Any] = {}
    if "cka" in job.metrics:
        out["cka_matrix"] = _matrix(job, lambda i, j: cka(i, j).value)
        per_layer["cka"] = per_layer["cka"] or tuple(cka(k, k) for k in job.matched)
    if "dimcorr" in job.metrics:
        out["dimcorr_matrix"] = _matrix(job, lambda i, j: dimcorr(i, j).mean)
        per_layer["dimcorr"] = per_layer["dimcorr"] or tuple(dimcorr(k, k) for k in job.matched)
    return out


def _matrix(job: _Job, value: Callable[[int, int], float]) -> NDArray[np.float64]:
    return np.array([[value(i, j) for j in job.cols] for i in job.rows], dtype=np.float64)  # (I, J)
