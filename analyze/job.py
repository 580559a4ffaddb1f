"""``run_analysis``: one ``hrsa analyze`` job from its config, called alike by the CLI and the pipeline runner.

A recipe in three steps: open the store (writable when the results go into it), clear an earlier run's outputs
when asked to replace them, and check the run id is free before any pass; compare the pair
(:func:`hrsa.analyze.pair.analyze_pair`), gathering hrsa's own warnings as lines; write ``results.json`` (and the
store's ``results/<run_id>``) and draw the figures from that document.
Progress and printing stay with the caller (``on_plan``, ``on_block``, :attr:`AnalysisRun.warnings`).
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hrsa.analyze.local.knn import KnnOptions
from hrsa.analyze.local.probe import ProbeOptions
from hrsa.analyze.pair import analyze_pair
from hrsa.analyze.report.figures import FIGURE_NAMES, plot_figures
from hrsa.analyze.results import check_run_id_free, save_results
from hrsa.store import ActivationStore
from hrsa.store.errors import UserError
from hrsa.store.selection import TokenSelection

if TYPE_CHECKING:
    from collections.abc import Callable

    from hrsa.analyze.config import AnalyzeConfig
    from hrsa.analyze.pair import PairResults
    from hrsa.analyze.results import SavedResults
    from hrsa.analyze.streaming.plan import AnalysisPlan
    from hrsa.analyze.streaming.stream import OnBlock

__all__ = ["AnalysisRun", "run_analysis"]


@dataclass(frozen=True, eq=False)  # eq=False: the results hold arrays
class AnalysisRun:
    """What one analysis job computed and wrote.

    Attributes:
        results: what :func:`~hrsa.analyze.pair.analyze_pair` returned.
        saved: where results.json, the rotations and the store's record went (``saved.doc`` is results.json).
        figures: the PNG files drawn from results.json, beside it.
        warnings: hrsa's own warnings of the comparison, one line each, already caught (for the caller to print).
    """

    results: PairResults
    saved: SavedResults
    figures: tuple[Path, ...]
    warnings: tuple[str, ...]


def run_analysis(
    config: AnalyzeConfig,
    *,
    replace: bool = False,
    on_plan: Callable[[AnalysisPlan], None] | None = None,
    on_block: OnBlock | None = None,
) -> AnalysisRun:
    """Run the analysis ``config`` describes and write its results and figures into ``config.out``.

    Args:
        config: the validated settings (:func:`hrsa.analyze.config.load_config`).
        replace: re-run over an earlier run of this config: first delete the store's record named ``config.run_id``
            (if any; no other record is touched) and the whole ``config.out`` folder, so that no figure of an
            earlier setting stays beside the new results. For a caller that owns both (the pipeline runner).
        on_plan: called with the plan before the first pass (to print it, or size a progress bar).
        on_block: called with the token count of each block done.

    Returns:
        An AnalysisRun.

    Raises:
        UserError: a missing store, a taken run id, or anything :func:`~hrsa.analyze.pair.analyze_pair` refuses.
    """
    # Step 1: the store, writable when the results go into it; with replace, an earlier run's record and out folder
    # go; a taken run id fails now, not after the passes.
    _check_out_apart_from_store(config)
    store = ActivationStore.open(config.store, mode="r+" if config.store_results else "r")
    if replace:
        _clear_earlier_run(store, config)
    if config.store_results and config.run_id:
        check_run_id_free(store, config.run_id)
    # Step 2: the comparison; each warning once, gathered so that it prints below a progress bar, not through it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        results = _compare(store, config, on_plan, on_block)
    ours = tuple(str(w.message) for w in caught if _is_hrsa(w))
    for w in caught:  # others as Python shows them
        if not _is_hrsa(w):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    # Step 3: results.json (and results/<run_id>), then the figures drawn from that document; an earlier run's
    # figures and rotations that this one did not draw go, so nothing in the folder describes another run.
    earlier = (Path(config.out) / "results.json").is_file()
    saved = save_results(results, config.out, store=store if config.store_results else None, run_id=config.run_id,
                         config=config.model_dump(mode="json"))
    figures = tuple(plot_figures(saved.doc, config.out))
    if earlier:
        _remove_stale_outputs(Path(config.out), {p.name for p in (*figures, *saved.rotations)})
    return AnalysisRun(results=results, saved=saved, figures=figures, warnings=ours)


def _check_out_apart_from_store(config: AnalyzeConfig) -> None:
    """Refuse an out folder in a local store: results and figures would land among its arrays (and a re-run's
    clearing of its out folder would delete them)."""
    if "://" in str(config.store):
        return
    store, out = Path(config.store).expanduser().resolve(), Path(config.out).expanduser().resolve()
    if out == store or out.is_relative_to(store):
        raise UserError(f"Expected --out outside the store {store}. Got {out} instead. Pick a folder apart from it.")


def _remove_stale_outputs(out: Path, written: set[str]) -> None:
    """Delete the figures and rotations an earlier run wrote into ``out`` that are not among ``written``."""
    stale = [*(out / name for name in FIGURE_NAMES), *out.glob("procrustes_rotation_*.npy")]
    for path in stale:
        if path.name not in written:
            path.unlink(missing_ok=True)


def _compare(store: ActivationStore, config: AnalyzeConfig, on_plan: Callable[[AnalysisPlan], None] | None,
             on_block: OnBlock | None) -> PairResults:
    """:func:`analyze_pair` called with the config's settings."""
    selection = TokenSelection(exclude_special=config.exclude_special, exclude_first=config.exclude_first,
                               positions=config.positions, docs=config.docs, fields=config.fields)
    knn_options = KnnOptions(ks=config.k, n_sample=config.knn_sample, seed=config.seed, search=config.knn_search,
                             hidden_states=config.hidden_states)
    probe_options = ProbeOptions(
        label_field=config.label_field, labels_file=config.labels, id_field=config.id_field, pool=config.pool,
        both_directions=config.probe_both_directions, seed=config.seed, hidden_states=config.hidden_states,
    ) if config.label_field else None
    return analyze_pair(
        store, *config.pair, metrics=config.metrics, debiased=config.debiased, cross_layer=config.cross_layer,
        selection=selection, memory_budget=config.memory_budget, block_tokens=config.block_tokens,
        workers=config.workers, scheduler=config.scheduler, backend=config.backend, compute_dtype=config.compute_dtype,
        save_rotation=config.save_rotation, groups=config.groups, knn_options=knn_options, probe_options=probe_options,
        on_plan=on_plan, on_block=on_block,
    )


def _clear_earlier_run(store: ActivationStore, config: AnalyzeConfig) -> None:
    """Delete what an earlier (maybe interrupted) run of ``config`` left: its store record and its out folder."""
    if config.store_results and config.run_id and config.run_id in store.results_ids():
        store.delete_results(config.run_id)
    shutil.rmtree(config.out, ignore_errors=True)


def _is_hrsa(w: warnings.WarningMessage) -> bool:
    return w.category.__module__.startswith("hrsa")
