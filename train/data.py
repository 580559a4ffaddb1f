"""Training data: jsonl records of (query, positive, hard negatives), and the deterministic batch of each step.

One record per line, in the pairs format of :mod:`hrsa.train.jsonl` (which checks it) with ``negs`` required::

    {"query": "...", "pos": "...", "negs": ["...", "..."], "instruction": "..."}   # instruction optional

The batch of step ``s`` is a pure function of (records, seed, s): each epoch is a fresh seeded permutation
of the N records cut into ``N // B`` batches of B; the ``N mod B`` records left at its end wait for the next
epoch (another permutation), so no batch ever holds a record twice. A record twice in one batch would be its
own in-batch negative: its positive scored as a wrong answer. Hence also B <= N, checked when the file loads. The
same text can still come twice (a pair repeated in the file, a query with several positives): each batch lists the
documents that are a positive of a query's text but not its own (:attr:`Batch.masked`), and the loss leaves them out.
Each query's ``k`` negatives are drawn without replacement by a generator seeded with (seed, s). So a resumed
run sees exactly the batches an uninterrupted one would, and ``W`` workers taking equal slices of the global
batch see exactly what one process would.

A record with fewer negatives than asked for is an error (naming its line), not padded by
re-sampling: repeating a negative silently reweights it in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hrsa.runtime.settings import SettingNames, flag_name
from hrsa.store.errors import UserError
from hrsa.train.jsonl import check_pair, iter_jsonl
from hrsa.train.pooling import format_query

__all__ = ["Batch", "TrainDataError", "TrainRecord", "batch_indices", "global_batch", "load_training_records"]


class TrainDataError(UserError, ValueError):
    """A training file that cannot be read, or a record without the fields training needs."""


@dataclass(frozen=True)
class TrainRecord:
    query: str
    pos: str
    negs: tuple[str, ...]
    instruction: str | None = None


@dataclass(frozen=True)
class Batch:
    """Texts of one (global or per-worker) batch.

    Attributes:
        queries: B formatted queries.
        docs: B * (k + 1) documents, grouped per query as [pos, neg_1, ..., neg_k].
    """

    queries: tuple[str, ...]
    docs: tuple[str, ...]
    masked: tuple[tuple[int, int], ...] = ()  # (query, document of the global batch): a positive of the query's text

    @property
    def group_size(self) -> int:
        return len(self.docs) // max(1, len(self.queries))

    def shard(self, rank: int, world_size: int) -> Batch:
        """Worker ``rank``'s equal, contiguous slice (its queries and their document groups); its masked pairs keep
        the global batch's document indices, which are the gathered documents' (in rank order)."""
        b, g = len(self.queries) // world_size, self.group_size
        masked = tuple((i - rank * b, j) for i, j in self.masked if rank * b <= i < (rank + 1) * b)
        return Batch(self.queries[rank * b:(rank + 1) * b], self.docs[rank * b * g:(rank + 1) * b * g], masked)


def load_training_records(path: Path, *, negatives: int, batch_size: int = 1,
                          names: SettingNames = flag_name) -> list[TrainRecord]:
    """Read and check every record of a training file: the pairs format of :func:`~hrsa.train.jsonl.check_pair`
    with ``negs`` required, and at least ``negatives`` of them (blank lines skipped); at least ``batch_size``
    records (a batch never holds a record twice). Messages name the settings by ``names`` (`hrsa train`'s flags;
    a pipeline passes its YAML keys).

    Raises:
        TrainDataError: a missing or empty file, a bad record (naming its line number), or fewer records than
            ``batch_size``.
    """
    records, short = [], []  # short: (line, negatives) of the records with fewer than asked
    for number, raw in iter_jsonl(path, error=TrainDataError):
        check_pair(raw, path=path, line=number, negs_required=True, error=TrainDataError)
        negs = raw["negs"]
        if len(negs) < negatives:
            short.append((number, len(negs)))
        records.append(TrainRecord(raw["query"], raw["pos"], tuple(negs), raw.get("instruction")))
    if short:  # all of them at once: mining leaves some queries short, and the count every record has is the fix
        least = min(len(r.negs) for r in records)
        raise TrainDataError(
            f"Expected at least {negatives} negatives per record ({names('negatives')}). Got {short[0][1]} on line "
            f"{short[0][0]} of {path} instead ({len(short)} of {len(records)} records have fewer than {negatives}). "
            f"Lower {names('negatives')} to {least} (every record has that many), or mine more negatives.")
    if not records:
        raise TrainDataError(f"Expected training records in {path}. Got an empty file instead.")
    if len(records) < batch_size:
        raise TrainDataError(f"Expected at least {names('batch_size')} ({batch_size}) training records, as a batch "
                             f"holds each record once. Got {len(records)} in {path} instead. Lower "
                             f"{names('batch_size')} or add records.")
    return records


def batch_indices(step: int, *, n_records: int, batch_size: int, seed: int) -> np.ndarray:
    """Record indices (B,) of the global batch of ``step`` (0-based), all distinct: batch ``step mod (N // B)``
    of epoch ``step // (N // B)``'s seeded permutation.

    Raises:
        ValueError: ``batch_size`` > ``n_records`` (checked for users by :func:`load_training_records`).
    """
    if batch_size > n_records:
        raise ValueError(f"batch of {batch_size} from {n_records} records would repeat a record")
    epoch, batch = divmod(step, n_records // batch_size)
    permutation = np.random.default_rng([seed, epoch]).permutation(n_records)
    return permutation[batch * batch_size:(batch + 1) * batch_size].astype(np.int64)


def global_batch(records: list[TrainRecord], step: int, *, batch_size: int, negatives: int, seed: int,
                 instruction: str | None = None) -> Batch:
    """The texts of step ``step``'s global batch; ``instruction`` applies to records without their own."""
    rng = np.random.default_rng([seed, 1_000_003, step])  # negatives: same draw however the batch is split
    queries, docs, picked_records = [], [], []
    for index in batch_indices(step, n_records=len(records), batch_size=batch_size, seed=seed):
        record = records[int(index)]
        picked_records.append(record)
        queries.append(format_query(record.query, record.instruction or instruction))
        picked = rng.choice(len(record.negs), size=negatives, replace=False) if negatives else []
        docs.extend([record.pos, *(record.negs[int(j)] for j in picked)])
    return Batch(tuple(queries), tuple(docs), _masked(picked_records, docs, _positives_by_query(records)))


def _fold(text: str) -> str:
    return " ".join(text.split())


_POSITIVES: dict[int, tuple[list[TrainRecord], dict[str, set[str]]]] = {}  # id(records) -> (records, map): per run


def _positives_by_query(records: list[TrainRecord]) -> dict[str, set[str]]:
    """Every positive of each query text (whitespace folded) in the training file, built once per list of records."""
    kept = _POSITIVES.get(id(records))
    if kept is None or kept[0] is not records:
        positives: dict[str, set[str]] = {}
        for record in records:
            positives.setdefault(_fold(record.query), set()).add(_fold(record.pos))
        _POSITIVES.clear()  # one run's records at a time
        _POSITIVES[id(records)] = kept = (records, positives)
    return kept[1]


def _masked(batch: list[TrainRecord], docs: list[str], positives: dict[str, set[str]]) -> tuple[tuple[int, int], ...]:
    """(query, document) pairs of the batch where the document is a positive of the query's text but not the query's
    own: scored as a wrong answer, a duplicated pair or a second positive of one query was a false negative (mining
    never picks one; the batch did)."""
    g = len(docs) // max(1, len(batch))
    where: dict[str, list[int]] = {}  # each folded document text -> its places in the batch
    for j, text in enumerate(docs):
        where.setdefault(_fold(text), []).append(j)
    return tuple(sorted((i, j) for i, record in enumerate(batch) for text in positives[_fold(record.query)]
                        for j in where.get(text, ()) if j != i * g))
