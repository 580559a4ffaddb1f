"""``verify``: is every unit of every model done, and does every stored byte match its checksum?

Reading a chunk through Zarr recomputes its crc32c (and the shard index's), so reading everything
once is the check. Work is per shard, so a report names the shard to re-extract.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hrsa.store.model import hidden_key

if TYPE_CHECKING:
    from hrsa.store.activation_store import ActivationStore

__all__ = ["Problem", "VerifyReport", "verify_store", "count_shards"]

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
    info = store.corpus_info(cid)
    try:
        offsets = group["doc_offsets"][:]
        if offsets[0] != 0 or offsets[-1] != info.n_tokens or np.any(np.diff(offsets) <= 0):
            problems.append(Problem(f"corpora/{cid}/doc_offsets", "document offsets do not cover the tokens in order"))
    except Exception:
        pass  # already reported as unreadable


def verify_store(
    store: ActivationStore,
    *,
    models: Sequence[str] | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check completeness and checksums of ``models`` (default: all) and of the corpora they use.

    Args:
        store: an open store.
        models: ids to check; default every model.
        on_shard: called with the number of shards just read (for a progress bar).
    """
    problems: list[Problem] = []
    mids = list(models) if models is not None else store.models()
    infos = [store.model_info(mid) for mid in mids]
    cids = sorted({i.corpus for i in infos} | (set(store.corpora()) if models is None else set()))
    for cid in cids:
        if cid not in store.corpora():
            problems.append(Problem(f"corpora/{cid}", "missing or incomplete, but a model refers to it"))
            continue
        _verify_corpus(store, cid, problems)
    incomplete: dict[str, list[int]] = {}
    shards = 0
    for info in infos:
        done = store.group(f"models/{info.id}")["units"][:].astype(bool)
        if not done.all():
            incomplete[info.id] = np.flatnonzero(~done).tolist()
            problems.append(Problem(f"models/{info.id}", f"{int((~done).sum())} of {done.size} work units not done; re-run the extraction to finish"))
        for k in info.hidden_states:
            array = store.group(f"models/{info.id}")[hidden_key(k)]
            for u in np.flatnonzero(done):
                start, stop = info.layout.unit_range(int(u), info.n_tokens)
                where = f"models/{info.id}/{hidden_key(k)} shard {u} (tokens {start}:{stop})"
                _read(lambda a=array, s=start, e=stop: a[s:e], where, problems, model=info.id, unit=int(u))
                shards += 1
                if on_shard:
                    on_shard(1)
    return VerifyReport(tuple(problems), tuple(cids), tuple(mids), shards, incomplete)


def count_shards(store: ActivationStore, models: Sequence[str] | None = None) -> int:
    """How many shards :func:`verify_store` will read (the progress bar's total)."""
    total = 0
    for mid in models if models is not None else store.models():
        info = store.model_info(mid)
        total += info.units_done * len(info.hidden_states)
    return total
