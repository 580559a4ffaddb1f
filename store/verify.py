"""``verify``: is every unit of every model done, and is every stored byte the one its writer wrote?

A done unit's record (store format 2, :mod:`hrsa.store.unit_records`) lists each shard object's byte count
and xxh3 as written (earlier records: sha256); verify checks the record's own hash and settings, then hashes every shard object against
it. So a missing, empty, truncated, bit-flipped, substituted (another unit's intact shard) or stale shard is
caught without trusting Zarr's fill values, and a forged or flipped done record too. Corpora are read through
Zarr, whose crc32c per chunk checks them. A half-created model (no valid attributes) and attributes that do not
describe the arrays are findings as well. Work is per shard, so a report names the unit to re-extract.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hrsa.store.alignment import alignment_damage
from hrsa.store.corpus import corpus_damage
from hrsa.store.errors import CorruptDataError, HalfCreatedModelError
from hrsa.store.model import ModelInfo, array_mismatches, hidden_key
from hrsa.store.units import ModelWriter, checked_record, shard_problem

if TYPE_CHECKING:
    from hrsa.store.activation_store import ActivationStore

__all__ = ["Problem", "VerifyReport", "ResetOutcome", "verify_store", "count_shards", "reset_damaged"]

_READERS = 16  # units verified at once, each reading one shard at a time

_CORPUS_ARRAYS = ("token_ids", "doc_index", "position", "is_special", "doc_offsets", "doc_truncated", "doc_original_length", "doc_record_id")


@dataclass(frozen=True)
class Problem:
    """One thing wrong: ``where`` names the node (and shard), ``what`` says what."""

    where: str
    what: str
    model: str | None = None
    unit: int | None = None


@dataclass(frozen=True)
class VerifyReport:
    problems: tuple[Problem, ...] = ()
    corpora_checked: tuple[str, ...] = ()
    models_checked: tuple[str, ...] = ()
    shards_read: int = 0
    incomplete_units: dict[str, list[int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def damaged_units(self) -> dict[str, list[int]]:
        """Model id -> units whose shards failed to read (to reset, so extraction rewrites them)."""
        damaged: dict[str, set[int]] = {}
        for p in self.problems:
            if p.model is not None and p.unit is not None:
                damaged.setdefault(p.model, set()).add(p.unit)
        return {m: sorted(u) for m, u in damaged.items()}


def _read(read: Callable[[], object], where: str, problems: list[Problem], **ids: Any) -> None:
    try:
        read()
    except Exception as error:  # any decode failure is a finding, not a crash of verify
        problems.append(Problem(where, f"unreadable: {type(error).__name__}: {error}", **ids))


def _verify_corpus(store: ActivationStore, cid: str, problems: list[Problem]) -> None:
    group = store.group(f"corpora/{cid}")
    for name in _CORPUS_ARRAYS:
        _read(lambda name=name: group[name][:], f"corpora/{cid}/{name}", problems)
    if any(p.where.startswith(f"corpora/{cid}/") for p in problems):
        return  # an unreadable array is the finding already
    damage = corpus_damage(group, store.corpus_info(cid))
    if damage:
        problems.append(Problem(f"corpora/{cid}", f"{damage}; extract any model on it again, which writes it again"))


def _verify_alignments(store: ActivationStore, problems: list[Problem]) -> None:
    """Stored alignments whose rows do not hash to their digest (reads compute them again rather than use them)."""
    try:
        alignments = store.group("alignments")
    except KeyError:
        return
    for key, group in alignments.groups():
        damage = alignment_damage(group)
        if damage:
            problems.append(Problem(f"alignments/{key}", f"{damage}; the next analysis of the pair computes it again"))


def _model_infos(store: ActivationStore, mids: Sequence[str], problems: list[Problem]) -> list[ModelInfo]:
    """The models that can be checked; a half-created or unreadable one is one problem line instead."""
    infos = []
    for mid in mids:
        try:
            infos.append(store.model_info(mid))
        except HalfCreatedModelError:
            problems.append(Problem(f"models/{mid}", "creation interrupted (no valid model attributes); "
                                    f"`hrsa store rm {store.url} {mid}` it or re-run the extraction", model=mid))
        except CorruptDataError as error:
            problems.append(Problem(f"models/{mid}", str(error), model=mid))
    return infos


def _done_units(store: ActivationStore, info: ModelInfo, problems: list[Problem]) -> tuple[ModelWriter, np.ndarray]:
    writer = ModelWriter(store.group(f"models/{info.id}"), info)
    done = writer.done_mask()
    if not done.all():
        problems.append(Problem(f"models/{info.id}", f"{int((~done).sum())} of {done.size} work units not done; re-run the extraction to finish",
                                model=info.id))
    return writer, done


def _verify_model(store: ActivationStore, info: ModelInfo, problems: list[Problem], on_shard: Callable[[int], None] | None) -> tuple[list[int], int]:
    """Check one model: attributes against arrays, then each done unit's record and shard objects; (not done units, shards read)."""
    group = store.group(f"models/{info.id}")
    mismatched = array_mismatches(group, info)
    problems.extend(Problem(f"models/{info.id}/{path}", what, model=info.id) for path, what in mismatched)
    corpus_tokens = store.corpus_info(info.corpus).n_tokens if info.corpus in store.corpora() else info.n_tokens
    if corpus_tokens != info.n_tokens:
        problems.append(Problem(f"models/{info.id}", f"n_tokens {info.n_tokens} differs from its corpus's {corpus_tokens}", model=info.id))
    writer, done = _done_units(store, info, problems)
    arrays = _checkable_arrays(group, info, mismatched)
    units = np.flatnonzero(done).tolist()
    # Units in threads (reads and hashes let go of the GIL): on S3 one stream after another took an hour per 7B model
    # over a million tokens. At most _READERS shards are in memory at once; findings keep the units' order.
    shards = 0
    with ThreadPoolExecutor(_READERS, thread_name_prefix="hrsa-verify") as pool:
        for found, read in pool.map(lambda u: _unit_problems(group, info, writer, u, arrays, on_shard), units):
            problems.extend(found)
            shards += read
    return np.flatnonzero(~done).tolist(), shards


def _unsound_arrays(mismatched: Sequence[tuple[str, str]]) -> set[str]:
    """The paths whose metadata is the finding, of :func:`array_mismatches`' (a changed codec aside: its shards still
    hash alike)."""
    return {path for path, what in mismatched if not what.startswith("codecs ")}


def _checkable_arrays(group: Any, info: ModelInfo, mismatched: Sequence[tuple[str, str]]) -> dict[int, Any]:
    """The model's hidden-state arrays whose shards can be checked: all but the unsound ones."""
    bad = _unsound_arrays(mismatched)
    return {k: group[hidden_key(k)] for k in info.hidden_states if hidden_key(k) not in bad and "hidden" not in bad}


def _unit_problems(group: Any, info: ModelInfo, writer: ModelWriter, u: int, arrays: dict[int, Any],
                   on_shard: Callable[[int], None] | None = None) -> tuple[list[Problem], int]:
    """What is wrong with done unit ``u``: its done record, then its shard object in each of ``arrays``; and how many
    shards were read (none when the record is the finding)."""
    start, stop = info.layout.unit_range(u, info.n_tokens)
    prefix = group.store_path.path
    try:
        record = checked_record(group.store, prefix, u, writer.settings)
    except ValueError as error:
        return [Problem(f"models/{info.id}/done/{u} (tokens {start}:{stop})", str(error), model=info.id, unit=u)], 0
    problems = []
    for k, array in arrays.items():
        problem = shard_problem(array, prefix, k, record)
        if problem:
            where = f"models/{info.id}/{hidden_key(k)} shard {u} (tokens {start}:{stop})"
            problems.append(Problem(where, problem, model=info.id, unit=u))
        if on_shard:
            on_shard(1)
    return problems, len(arrays)


def verify_store(
    store: ActivationStore,
    *,
    models: Sequence[str] | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check completeness, metadata, shard objects and checksums of ``models`` (default: all) and of their corpora.

    Args:
        store: an open store.
        models: ids to check; default every model, half-created ones included.
        on_shard: called with the number of shards just read (for a progress bar).
    """
    problems: list[Problem] = []
    mids = list(models) if models is not None else sorted(store.models() + store.half_created_models())
    infos = _model_infos(store, mids, problems)
    cids = sorted({i.corpus for i in infos} | (set(store.corpora()) if models is None else set()))
    for cid in cids:
        if cid not in store.corpora():
            problems.append(Problem(f"corpora/{cid}", "missing or incomplete, but a model refers to it"))
            continue
        _verify_corpus(store, cid, problems)
    if models is None:
        _verify_alignments(store, problems)
        problems.extend(Problem(f"results/{run_id}", f"metadata does not read; `hrsa store rm {store.url} {run_id} "
                                "--results` deletes the record") for run_id in store.damaged_results())
    incomplete: dict[str, list[int]] = {}
    shards = 0
    for info in infos:
        pending, read = _verify_model(store, info, problems, on_shard)
        shards += read
        if pending:
            incomplete[info.id] = pending
    return VerifyReport(tuple(problems), tuple(cids), tuple(i.id for i in infos), shards, incomplete)


def count_shards(store: ActivationStore, models: Sequence[str] | None = None) -> int:
    """How many shards :func:`verify_store` will read (the progress bar's total)."""
    total = 0
    for mid in models if models is not None else store.models():
        try:
            info = store.model_info(mid)
        except (HalfCreatedModelError, CorruptDataError):
            continue  # verify reports it; nothing of it is read
        total += info.units_done * len(info.hidden_states)
    return total


@dataclass(frozen=True)
class ResetOutcome:
    """What a reset of one model's damaged units did: ``reset`` the units made not done; ``whole`` those whole when
    checked again (rewritten since verify read them); ``not_done`` those no longer done (reset, or the model replaced,
    since); ``skipped`` why nothing was reset (array metadata damaged: resetting units cannot repair that), or None."""

    model: str
    reset: tuple[int, ...] = ()
    whole: tuple[int, ...] = ()
    not_done: tuple[int, ...] = ()
    skipped: str | None = None


def reset_damaged(store: ActivationStore, mid: str, units: Sequence[int]) -> ResetOutcome:
    """Reset model ``mid``'s ``units`` that verify found damaged (:meth:`VerifyReport.damaged_units`): not done again,
    so re-running the extraction rewrites exactly them.

    The model is held meanwhile (:meth:`ActivationStore.resetting`: refused while an extraction, or a deletion, holds
    it), and each unit checked again under that hold and reset only while still damaged: what verify read may be
    stale by then (an extraction that replaced the model since, a shard restored).
    """
    with store.resetting(mid) as writer:
        info, group = writer.info, store.group(f"models/{mid}")
        mismatched = array_mismatches(group, info)
        unsound = _unsound_arrays(mismatched)
        if unsound:  # a hidden state's metadata is the damage: the model is extracted again, not unit by unit
            return ResetOutcome(mid, skipped=f"the metadata of {', '.join(sorted(unsound))} is damaged")
        arrays = _checkable_arrays(group, info, mismatched)
        done = writer.done_mask()
        not_done = tuple(u for u in units if u >= done.size or not done[u])
        checked = [u for u in units if u not in not_done]
        still = tuple(u for u in checked if _unit_problems(group, info, writer, u, arrays)[0])
        for u in still:
            writer.reset_unit(writer.units()[u])
    return ResetOutcome(mid, still, tuple(u for u in checked if u not in still), not_done)
