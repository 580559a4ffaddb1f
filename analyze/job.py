"""``run_analysis``: one ``hrsa analyze`` job from its config, called alike by the CLI and the pipeline runner.

A recipe in three steps: open the store (writable when the results go into it) and check the run id is free before
any pass; compare the pair (:func:`hrsa.analyze.pair.analyze_pair`), gathering hrsa's own warnings as lines; write
``results.json``, its rotations and the figures drawn from that document, and the store's ``results/<run_id>``.

An earlier run's outputs in the out folder (and, when this run replaces it, its store record) stay as they were until
this run's results are computed and written beside them: a run that is refused or fails, in its checks, its passes or
its figures, leaves them untouched; only then are the new files moved in (:func:`_write_outputs` says what a kill
leaves at each step). Progress and printing stay with the caller (``on_plan``, ``on_block``,
:attr:`AnalysisRun.warnings`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hrsa.analyze.local.knn import KnnOptions
from hrsa.analyze.local.probe import ProbeOptions
from hrsa.analyze.pair import analyze_pair
from hrsa.analyze.report.figures import FIGURE_NAMES, plot_figures
from hrsa.analyze.results import (
    SavedResults,
    check_run_id_free,
    pick_run_id,
    reserve_record,
    results_dict,
    write_files,
    write_to_store,
)
from hrsa.runtime.progress import gathered_warnings
from hrsa.runtime.settings import SettingNames, flag_name, renamed_flags
from hrsa.store import ActivationStore
from hrsa.store.errors import HrsaError, UserError
from hrsa.store.local_files import check_output_file
from hrsa.store.selection import TokenSelection

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from hrsa.analyze.config import AnalyzeConfig
    from hrsa.analyze.pair import PairResults
    from hrsa.analyze.streaming.plan import AnalysisPlan
    from hrsa.analyze.streaming.stream import OnBlock

__all__ = ["AnalysisRun", "STAGING_PREFIX", "run_analysis"]

#: A run's files are written into a folder of this prefix inside out, then moved out of it into out.
STAGING_PREFIX = ".hrsa-writing-"


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
    before_writing: Callable[[], None] | None = None,
    names: SettingNames = flag_name,
) -> AnalysisRun:
    """Run the analysis ``config`` describes and write its results and figures into ``config.out``.

    Args:
        config: the validated settings (:func:`hrsa.analyze.config.load_config`).
        replace: re-run over an earlier run of this config, whose outputs go once this run's results are computed and
            written: the store's record named ``config.run_id`` (if any; no other record is touched) and every other
            file of ``config.out``, so that no figure of an earlier setting stays beside the new results. For a
            caller that owns both (the pipeline runner).
        on_plan: called with the plan before the first pass (to print it, or size a progress bar).
        on_block: called with the token count of each block done.
        before_writing: called once the results are computed, before anything is written or removed (the pipeline
            records its stage as started there: a run refused or failed before it leaves the stage's record as it was).
        names: how messages name the settings, given their field (`hrsa analyze`'s flags; the pipeline passes its YAML
            keys, which its users wrote).

    Returns:
        An AnalysisRun.

    Raises:
        UserError: a missing store, a taken run id, or anything :func:`~hrsa.analyze.pair.analyze_pair` refuses; the
            earlier run's outputs are then as they were.
    """
    fields = type(config).model_fields
    warned: list[str] = []
    try:
        # Step 1: the store, writable when the results go into it; a taken run id fails now, not after the passes
        # (with replace, the earlier run's record may hold it: it is replaced in step 3). Nothing written or removed.
        store = ActivationStore.open(config.store, mode="r+" if config.store_results else "r")
        if config.store_results and config.run_id and not (replace and config.run_id in store.results_ids()):
            check_run_id_free(store, config.run_id)
        if not replace:  # the out folder is the user's: what stands at an output's name is refused, not replaced
            _check_output_names(config.out)
        # Step 2: the comparison; each warning once, gathered so that it prints below a progress bar, not through it.
        with gathered_warnings() as warned:
            results = _compare(store, config, on_plan, on_block, names)
        # Step 3: results.json, rotations and figures (drawn from that document), and results/<run_id>; what the
        # earlier run left that this one did not write goes, so nothing in the folder describes another run.
        if before_writing is not None:
            before_writing()
        saved, figures = _write_outputs(results, config, store if config.store_results else None, replace=replace)
    except HrsaError as error:
        # The plan and the passes name settings by `hrsa analyze`'s flags; the caller's names (the pipeline's keys).
        error.args = (renamed_flags(str(error), fields, names),)
        error.warnings = tuple(renamed_flags(message, fields, names) for message in warned)  # printed before it
        raise
    ours = tuple(renamed_flags(message, fields, names) for message in warned)
    return AnalysisRun(results=results, saved=saved, figures=figures, warnings=ours)


def _write_outputs(results: PairResults, config: AnalyzeConfig, store: ActivationStore | None, *,
                   replace: bool) -> tuple[SavedResults, tuple[Path, ...]]:
    """Write one run's outputs over an earlier run's, in three steps, and return them as (saved, figures).

    (1) results.json, the rotations and the figures go into a staging folder inside out (:data:`STAGING_PREFIX`);
    (2) the store's record (with ``replace``, the earlier record of the run id goes first: a record cannot be renamed);
    (3) the earlier results.json goes, then the staged files move into out, results.json last, each by an atomic
        rename; staging folders go (a killed run's too), and what the earlier run left that this one did not write
        (with ``replace``, all else in out).

    All three hold out's lock: a second run into the same out folder waits for this one's writing to end.

    A failure in (1) or (2) leaves out as it was (the staging folder is removed, and out itself when this run created
    it); one in (1) leaves the store as it was too. A kill in (1) leaves out's files whole, beside a staging folder; in
    (2) the earlier record of a replaced run id may be gone; in (3) out may hold files of both runs but no results.json
    until the last rename. The pipeline, the caller that replaces, has recorded its stage as started
    before (1) (``before_writing``), so it runs the analysis again, and that run's (3) leaves nothing of either.
    """
    out = Path(config.out)
    created = _first_missing(out)
    out.mkdir(parents=True, exist_ok=True)
    with _writing_into(out):
        earlier = (out / "results.json").is_file()
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
        record = None
        try:
            if store is not None and config.run_id is None:  # a default id is taken by creating its record, now
                run_id, record = reserve_record(store, results)
            else:
                run_id = pick_run_id(results, config.run_id)
            doc = results_dict(results, run_id=run_id, config=_recorded_config(config))
            _, rotations = write_files(results, doc, staging)
            figures = plot_figures(doc, staging)
            if store is not None and record is None:  # a given id: the earlier record goes (replace), then it is taken
                _, record = _take_given_id(store, results, run_id, replace=replace)
            store_path = write_to_store(store, results, doc, record) if store is not None else None
        except BaseException:
            shutil.rmtree(created or staging, ignore_errors=True)
            if record is not None:  # the id this run reserved, and what it wrote of the record
                _let_go(store, run_id)
            raise
        written = [*(p.name for p in (*rotations, *figures)), "results.json"]  # results.json last
        # The earlier results.json goes first: a stop between the renames leaves a folder without one (unfinished),
        # not one whose results.json describes another run than the files beside it.
        _clear(out / "results.json", replace)
        for name in written:
            _clear(out / name, replace)  # a folder at an output's name: the pipeline's own folder holds none it keeps
            os.replace(staging / name, out / name)
        for folder in out.glob(f"{STAGING_PREFIX}*"):  # this run's, now empty, and any a killed run left
            shutil.rmtree(folder, ignore_errors=True)
        if replace:
            _remove_all_but(out, set(written))
        elif earlier:
            _remove_stale_outputs(out, set(written))
    saved = SavedResults(run_id, out / "results.json", tuple(out / p.name for p in rotations), store_path, doc)
    return saved, tuple(out / p.name for p in figures)


def _recorded_config(config: AnalyzeConfig) -> dict[str, Any]:
    """The config as the results record it, a local store by its absolute path: the report tells models apart by
    store and id, and `--store store` from the project folder and the same store named absolute (as the pipeline
    names it) are one store."""
    from hrsa.runtime.locations import is_url

    recorded = config.model_dump(mode="json")
    if not is_url(config.store):
        recorded["store"] = os.path.abspath(os.path.expanduser(config.store.removeprefix("file://")))
    return recorded


@contextmanager
def _writing_into(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock (flock on the folder itself: a lock file in it would be cleared with its other files) while
    writing: two runs into one out folder write one after the other, as each clears the staging folders it finds."""
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _take_given_id(store: ActivationStore, results: PairResults, run_id: str, *, replace: bool) -> tuple[str, Any]:
    """The record of a given run id, created for this run (so a failure lets it go); with ``replace``, an earlier
    record of that id (a run of this config's) goes first."""
    if replace and run_id in store.results_ids():
        store.delete_results(run_id)
    return reserve_record(store, results, run_id)


def _let_go(store: ActivationStore, run_id: str) -> None:
    """Delete the record a failed run reserved (gone already where the user deleted it meanwhile)."""
    try:
        store.delete_results(run_id)
    except UserError:
        pass


def _check_output_names(out: Path) -> None:
    """Refuse, before any pass, an --out whose output names (results.json, the figures, rotations) something other
    than a regular file holds: a folder there failed the renames once every pass had run."""
    for path in (out / "results.json", *(out / name for name in FIGURE_NAMES), *out.glob("procrustes_rotation_*.npy")):
        check_output_file(path, flag="--out")


def _clear(path: Path, folders_too: bool) -> None:
    """Remove the file at ``path`` (and, in a folder the caller owns, a folder there) before a rename onto it."""
    if folders_too and path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _first_missing(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist: what making ``folder`` creates (None: none)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    return missing[-1] if missing else None


def _remove_all_but(out: Path, written: set[str]) -> None:
    """Delete everything in ``out`` but ``written``: the folder is the caller's own (the pipeline's pair folder)."""
    for path in out.iterdir():
        if path.name in written:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _remove_stale_outputs(out: Path, written: set[str]) -> None:
    """Delete the figures and rotations an earlier run wrote into ``out`` that are not among ``written``."""
    stale = [*(out / name for name in FIGURE_NAMES), *out.glob("procrustes_rotation_*.npy")]
    for path in stale:
        if path.name not in written:
            path.unlink(missing_ok=True)


def _compare(store: ActivationStore, config: AnalyzeConfig, on_plan: Callable[[AnalysisPlan], None] | None,
             on_block: OnBlock | None, names: SettingNames) -> PairResults:
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
        on_plan=on_plan, on_block=on_block, names=names,
    )

