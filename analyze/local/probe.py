"""Cross-model linear probes on a store: pool stored hidden states per document, read labels, fit, score.

Features come from the store (no re-extraction): for each document, the mean of one hidden state over
its tokens (``pool="mean"``) or its last token (``pool="last"``), after the token filters of
``hrsa analyze`` (e.g. ``exclude_special`` drops BOS/EOS before pooling). Documents left without tokens
are dropped.

Labels are joined to the stored documents by record id. By default they are read back from the corpus file
that the models were extracted from, with the same reader and id rule that extraction used (the corpus keeps
``extra["corpus_spec"]``: file, id field): ``label_field="label"`` on spam-assassin, ``"party"`` on
sotu. Each model's extraction records that file's absolute path, content digest and the digest of each record's
id and text fields (``ModelInfo.extraction["corpus_file"]``): a file whose labels were edited since (or a column
added) is read as it is now, its records being the ones extracted; a text or an id changed or a file gone (a line
prepended shifts every ``<file>:<line>`` id), or two models of a pair extracted from files that differ (a relabelled
copy of the same texts is the same stored corpus), is refused rather than read. Models stored by an earlier hrsa record no file:
the corpus's recorded source is read, as written. ``labels_file`` (a .jsonl/.csv/.parquet with an id column and
the label column) overrides this, e.g. when the corpus file has moved; its ids are matched the same way
(``id_field``, else ``"id"``, else ``<file name>:<line>``). Documents whose record has no label (missing or null)
are dropped. The file read and its digest are in :class:`ProbePairResult` (``labels_file``, ``labels_digest``).
A class is a label's value written as text, an integral float as its integer (1 and 1.0 are the class "1"); labels
of different kinds in one file (numbers, strings, booleans: 1, "1" and true) are refused, not made classes apart
(:mod:`hrsa.store.labels`, the rule ``hrsa eval``'s classification tasks follow too).

Memory: the pooled features are (M, D) float64 per model and are held (a probe needs them all); the hidden
states are read a block of tokens at a time, the block sized to ``memory_budget`` by the memory model of
:class:`hrsa.analyze.local.memory.ProbePass`, and a pass that cannot fit is refused before any read.

Uncertainty: each probe's test accuracy (source and target) comes with a 95% interval over its test documents,
the Wilson score interval (:func:`hrsa.analyze.local.bootstrap.accuracy_bootstrap_interval`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import warnings

import numpy as np

from hrsa.analyze.config import Pool
from hrsa.analyze.local.bootstrap import accuracy_bootstrap_interval
from hrsa.analyze.local.hidden_states import shared_hidden_states
from hrsa.analyze.local.memory import ProbePass, bytes_per_value, plan_probe
from hrsa.analyze.local.store_rows import read_rows
from hrsa.analyze.metrics.linear_probe import ProbeResult, linear_probe, stratified_split
from hrsa.analyze.streaming.plan import parse_memory_budget
from hrsa.runtime.fingerprint import records_digest
from hrsa.runtime.settings import SettingNames, flag_name
from hrsa.store.errors import UserError
from hrsa.store.labels import check_one_kind, class_name
from hrsa.store.records import read_records

if TYPE_CHECKING:
    import dask.array as da
    from numpy.typing import NDArray

    from hrsa.analyze.metrics.uncertainty import Interval
    from hrsa.store import ActivationStore
    from hrsa.store.selection import TokenSelection

__all__ = ["ProbeCoverageWarning", "ProbeIntervals", "ProbeOptions", "ProbePairResult", "check_probe",
           "document_features", "probe_pair", "read_labels"]

_BLOCK = 1 << 16  # tokens read at once when pooling, unless the memory budget asks for fewer


@dataclass(frozen=True)
class ProbeOptions:
    """Settings of the ``probe`` metric of ``analyze_pair`` (the keyword arguments of :func:`probe_pair`)."""

    label_field: str
    labels_file: str | None = None
    id_field: str | None = None
    pool: Pool = "mean"
    both_directions: bool = False
    seed: int = 0
    hidden_states: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"label_field": self.label_field, "labels_file": self.labels_file, "id_field": self.id_field,
                "pool": self.pool, "both_directions": self.both_directions, "seed": self.seed,
                "hidden_states": self.hidden_states}


@dataclass(frozen=True)
class ProbeIntervals:
    """95% Wilson score intervals of one probe's test accuracy over its test documents.

    Attributes:
        source: of ``ProbeResult.source.test.accuracy``; target: of ``ProbeResult.target.test.accuracy``.
    """

    source: Interval
    target: Interval

    @classmethod
    def of(cls, res: ProbeResult, seed: int) -> ProbeIntervals:
        return cls(*(accuracy_bootstrap_interval(s.test.accuracy, s.test.n, seed=seed) for s in (res.source, res.target)))


@dataclass(frozen=True)
class ProbePairResult:
    """Probes of one pair per hidden state.

    Attributes:
        hidden_states: the hidden states probed, in order.
        a_to_b: {hidden state: probe fitted on A, applied to B}.
        b_to_a: the reverse direction, when asked for (else empty).
        n_docs: labelled documents used; classes: the label values; pool, label_field, seed: settings.
        a_to_b_interval, b_to_a_interval: {hidden state: ProbeIntervals} of the test accuracies above.
        estimated_peak, memory_budget: bytes of the pass's memory model and of the budget it fits.
        labels_file, labels_digest: the file (or folder) the labels were read from, and its content digest (None
            where it is not a local file: the hub, object storage).
    """

    hidden_states: tuple[int, ...]
    a_to_b: dict[int, ProbeResult]
    n_docs: int
    classes: tuple[str, ...]
    pool: str
    label_field: str
    seed: int
    b_to_a: dict[int, ProbeResult] = field(default_factory=dict)
    a_to_b_interval: dict[int, ProbeIntervals] = field(default_factory=dict)
    b_to_a_interval: dict[int, ProbeIntervals] = field(default_factory=dict)
    estimated_peak: int = 0
    memory_budget: int = 0
    labels_file: str | None = None
    labels_digest: str | None = None


def read_labels(
    store: ActivationStore, cid: str, *, label_field: str, labels_file: str | None = None, id_field: str | None = None,
    models: Sequence[str] = (), names: SettingNames = flag_name,
) -> NDArray[np.object_]:
    """The label of each document of corpus ``cid`` (None where its record has none).

    Without ``labels_file``, from the corpus file that ``models`` (those of ``cid`` or aligned to it) recorded at
    extraction, checked to be unchanged since; else, for models that record none, from the corpus's recorded source.
    Messages name the settings by ``names`` (`hrsa analyze`'s flags; a pipeline passes its YAML keys).

    Raises:
        UserError: no source to read labels from, a recorded corpus file changed or gone since extraction (or two
            models' files that differ), labels of different kinds (1 and "1"), or no document has the label field.
    """
    return _read_labels(store, cid, label_field=label_field, labels_file=labels_file, id_field=id_field,
                        models=models, names=names)[0]


def _read_labels(
    store: ActivationStore, cid: str, *, label_field: str, labels_file: str | None, id_field: str | None,
    models: Sequence[str], names: SettingNames,
) -> tuple[NDArray[np.object_], str, str | None]:
    """(labels as :func:`read_labels` gives them, the file read, its digest)."""
    info = store.corpus_info(cid)
    spec = info.extra.get("corpus_spec") or {}
    source, digest = labels_file, records_digest(labels_file) if labels_file else None
    if not labels_file:
        source, digest = _recorded_corpus_file(store, models, names) or (spec.get("source") or info.source, None)
        digest = digest or (records_digest(source) if source else None)
    if not source:
        raise UserError(f"Expected corpus {cid} to record its source file. Got none. Name a labels file with "
                        f"{names('labels')}.")
    ids_from = id_field or (None if labels_file else spec.get("id_field"))  # the id rule extraction used
    wanted = [str(rid) for rid in store.documents(cid)["record_id"]]
    try:
        by_id = _labels_by_id(read_records(source, id_field=ids_from), label_field, set(wanted), source, names)
    except UserError:
        raise
    except Exception as error:  # CorpusError and friends: the source moved or cannot be read
        raise UserError(f"Expected readable labels in {source}. Got an error instead: {error}. "
                        f"Name a labels file with {names('labels')}.") from error
    labels = np.array([None if _missing(v := by_id.get(rid)) else v for rid in wanted], dtype=object)
    if all(v is None for v in labels):
        first = [r for r, _ in zip(read_records(source, id_field=ids_from), range(2))]
        theirs = [r["_id"] for r in first]
        fields = sorted({k for r in first for k in r if k != "_id"})
        raise UserError(f"Expected a label field {label_field!r} in the records of {source} matching "
                        f"corpus {cid}'s ids (such as {wanted[:2]}). Got none (the file's ids are such as {theirs}). "
                        f"Its records hold the fields {fields}. "
                        f"Check {names('label_field')}, {names('labels')} and {names('id_field')}.")
    read = str(Path(source).expanduser().resolve()) if digest is not None else source  # where it was, not relative
    return labels, read, digest


def _recorded_corpus_file(store: ActivationStore, models: Sequence[str], names: SettingNames) -> tuple[str, str] | None:
    """(path, digest) of the corpus file the models recorded at extraction, checked to hold the same content now;
    None when none of them records one (stored by an earlier hrsa, or extracted from the hub or a stored corpus).

    Raises:
        UserError: two models extracted from files that differ, or the file changed or gone since.
    """
    recorded = {mid: found for mid in dict.fromkeys(models)
                if (found := store.model_info(mid).extraction.get("corpus_file"))}
    if not recorded:
        return None
    (first, file), *others = recorded.items()
    for other, theirs in others:
        if theirs["digest"] != file["digest"] and not (theirs["path"] == file["path"] and _same_records(theirs, file)):
            raise UserError(f"Expected models {first} and {other} to be extracted from the same corpus file, to read "
                            f"the probe's labels from it. Got {file['path']} and {theirs['path']}, whose contents "
                            f"differ, instead. Name the labels file to use with {names('labels')}.")
    now = records_digest(file["path"])
    if now != file["digest"] and (now is None or not _read_as_extracted(file)):
        got = ("nothing there" if now is None else
               "other content (changed since: a text or an id of the records extracted, or their order)")
        raise UserError(f"Expected corpus file {file['path']}, which model {first} was extracted from, to hold what "
                        f"was extracted, to read the probe's labels from it. Got {got} instead. "
                        f"Name a file of the stored documents' labels (by their ids) with {names('labels')}.")
    return file["path"], now  # type: ignore[return-value]  # not None: checked above


def _same_records(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two extractions read the same ids and texts (recorded since hrsa kept them; labels may differ)."""
    return bool(a.get("records")) and a.get("records") == b.get("records")


def _read_as_extracted(file: dict[str, Any]) -> bool:
    """Whether a corpus file changed since extraction still holds each record's id and text as extracted (its
    labels edited, a column added), so labels joined by id land on the documents they belong to."""
    from hrsa.runtime.fingerprint import records_fingerprint

    read = file.get("records")
    if not read:
        return False  # extracted by an earlier hrsa: only the whole content was recorded
    try:
        now = records_fingerprint(file["path"], fields=read["fields"], id_field=read["id_field"],
                                  max_docs=read["max_docs"])
    except UserError:  # a record that no longer parses
        return False
    return now == read["sha256"]


def _labels_by_id(records: Iterable[dict[str, Any]], label_field: str, wanted: set[str], source: str,
                  names: SettingNames) -> dict[str, Any]:
    """``{record id: label}`` of the records whose id a document has; one id with two labels is refused (joining
    either one to every document of that id would be silently wrong)."""
    by_id: dict[str, Any] = {}
    first_of_kind: dict[str, Any] = {}
    for record in records:
        rid, label = record["_id"], record.get(label_field)
        if rid not in wanted:
            continue
        if not _missing(label):  # before the id check: True == 1, so a second record labelled 1 passed as the same
            check_one_kind(first_of_kind, label, label_field, source)
        if rid in by_id and not _same_label(by_id[rid], label):
            raise UserError(f"Expected one label per record id in {source}. Got {rid!r} labelled {by_id[rid]!r} and "
                            f"{label!r} instead. Give each record its own id ({names('id_field')} names a unique "
                            "field).")
        by_id[rid] = label
    return by_id


def _missing(label: Any) -> bool:
    """None, a float NaN (a CSV's empty cell, a Parquet float column's gap) or pandas' NA: no label."""
    if label is None or type(label).__name__ == "NAType":
        return True
    return isinstance(label, (float, np.floating)) and bool(np.isnan(label))


def _same_label(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) or bool(a != a and b != b)  # NaN (a CSV's empty cell) twice is the same missing label
    except (TypeError, ValueError):  # array-valued labels (a Parquet list column): compared as written
        return repr(a) == repr(b)


@dataclass(frozen=True)
class _Documents:
    """Which tokens a model's pooling keeps and whose documents they are (metadata: no hidden state read).

    Attributes:
        keep: (N,) kept tokens; offsets: (G + 1,) document boundaries; docs: (M,) documents with a kept token.
    """

    keep: NDArray[np.bool_]
    offsets: NDArray[np.int64]
    docs: NDArray[np.int64]

    @classmethod
    def of(cls, store: ActivationStore, mid: str, selection: TokenSelection | None) -> _Documents:
        info = store.model_info(mid)
        offsets = store.corpus_tokens(info.corpus).doc_offsets.astype(np.int64)
        keep = np.zeros(int(offsets[-1]), dtype=bool)
        keep[store.select(mid, selection)] = True
        kept_before = np.r_[0, np.cumsum(keep)]  # (N + 1,) kept tokens before each position
        docs = np.flatnonzero(kept_before[offsets[1:]] > kept_before[offsets[:-1]])
        return cls(keep, offsets, docs.astype(np.int64))

    def document_of(self, tokens: NDArray[np.int64]) -> NDArray[np.int64]:
        return np.searchsorted(self.offsets, tokens, side="right") - 1


def document_features(
    store: ActivationStore, mid: str, layer: int, *, pool: Pool = "mean", selection: TokenSelection | None = None,
    block_tokens: int = _BLOCK,
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Per-document features pooled from one stored hidden state, read ``block_tokens`` tokens at a time.

    Args:
        store: an open store.
        mid: model id.
        layer: hidden state.
        pool: "mean" over the document's kept tokens, or its "last" kept token.
        selection: token filters applied before pooling (default all tokens).
        block_tokens: tokens (or, with "last", rows) read at once.

    Returns:
        (document indices (M,), features (M, D) float64) for the documents with at least one kept token.
    """
    if pool not in get_args(Pool):
        raise UserError(f"Expected --pool {' or '.join(get_args(Pool))}. Got {pool!r} instead.")
    found = _Documents.of(store, mid, selection)
    x = store.hidden_state(mid, layer)  # (N, D) lazy
    if pool == "last":
        kept = np.flatnonzero(found.keep)
        last = kept[np.searchsorted(found.document_of(kept), found.docs, side="right") - 1]  # (M,) last kept token
        out = np.empty((found.docs.size, x.shape[1]))  # (M, D) float64
        piece = store.model_info(mid).layout.shard_tokens
        for i in range(0, last.size, block_tokens):
            out[i : i + block_tokens] = read_rows(x, last[i : i + block_tokens], piece=piece)
        return found.docs, out
    return found.docs, _mean_pool(x, found, block_tokens)


def _mean_pool(x: da.Array, found: _Documents, block_tokens: int) -> NDArray[np.float64]:
    """(M, D) float64 mean of each document's kept rows of the lazy (N, D) ``x``, one block of tokens at a time."""
    sums = np.zeros((found.docs.size, x.shape[1]))  # (M, D) float64
    counts = np.zeros(found.docs.size)
    for start in range(0, found.keep.size, block_tokens):
        m = found.keep[start : start + block_tokens]
        if not m.any():
            continue
        rows = np.asarray(x[start : start + block_tokens].compute(scheduler="sync"), dtype=np.float64)[m]  # (b, D)
        tokens = start + np.flatnonzero(m)
        where = np.searchsorted(found.docs, found.document_of(tokens))  # row of each token's document
        firsts = np.flatnonzero(np.r_[True, where[1:] != where[:-1]])
        sums[where[firsts]] += np.add.reduceat(rows, firsts, axis=0)
        counts[where[firsts]] += np.diff(np.r_[firsts, where.size])
    sums /= counts[:, None]  # in place: a second (M, D) array would double the features
    return sums


class ProbeCoverageWarning(UserWarning):
    """A probe fitted and scored on fewer documents than were selected: the others have no label."""


def probe_pair(
    store: ActivationStore,
    a: str,
    b: str,
    *,
    label_field: str,
    labels_file: str | None = None,
    id_field: str | None = None,
    pool: Pool = "mean",
    hidden_states: Sequence[int] | None = None,
    both_directions: bool = False,
    selection: TokenSelection | None = None,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    memory_budget: int | str = "4GB",
    names: SettingNames = flag_name,
) -> ProbePairResult:
    """Cross-model linear probes A -> B (and B -> A) per shared hidden state.

    Args:
        store: an open store; a and b on the same corpus (checked by ``analyze_pair``).
        a, b: model ids; the probe is fitted on ``a`` (source) and applied to ``b`` (target).
        label_field: the record field holding the label.
        labels_file: read labels from this file instead of the corpus's source.
        id_field: the id field of ``labels_file`` (default "id", else file:line).
        pool: "mean" or "last".
        hidden_states: which shared hidden states (default all shared).
        both_directions: also fit on ``b`` and apply to ``a``.
        selection: token filters applied before pooling.
        seed: seed of the split, the solver and the bootstrap of the test accuracies.
        fractions: train/dev/test shares.
        memory_budget: bytes (or text such as "4GB") the pass may hold; pooling blocks are sized to fit it.
        names: how messages name these settings, given their field (`hrsa analyze`'s flags; a pipeline passes its
            YAML keys, ``pairs.0.label_field``).

    Returns:
        A ProbePairResult.

    Raises:
        UserError: as :func:`check_probe`.
        MemoryBudgetError: the features or one pooling block do not fit (raised before any hidden state is read).

    Warns:
        ProbeCoverageWarning: some selected documents have no label (they are left out), with the count.
    """
    # Steps 1-2: the plan, the labels and their checks, before any read of a hidden state.
    inputs = _ProbeInputs.of(store, a, b, label_field=label_field, labels_file=labels_file, id_field=id_field,
                             pool=pool, hidden_states=hidden_states, selection=selection, seed=seed,
                             fractions=fractions, memory_budget=memory_budget, names=names)
    inputs.warn_unlabelled()
    a_to_b: dict[int, ProbeResult] = {}
    b_to_a: dict[int, ProbeResult] = {}
    for layer in inputs.states:
        # Step 3: pooled features of both models on the labelled documents they both keep.
        fa, fb = (_labelled_features(store, m, layer, pool, selection, inputs.block_tokens, inputs.docs,
                                     inputs.labelled) for m in (a, b))
        # Step 4: fit on the source, score both (and the reverse on request).
        a_to_b[layer] = linear_probe(fa, fb, inputs.y, fractions=fractions, seed=seed)
        if both_directions:
            b_to_a[layer] = linear_probe(fb, fa, inputs.y, fractions=fractions, seed=seed)
        del fa, fb
    return ProbePairResult(inputs.states, a_to_b, int(inputs.y.size), inputs.classes, pool, label_field, seed, b_to_a,
                           {k: ProbeIntervals.of(r, seed) for k, r in a_to_b.items()},
                           {k: ProbeIntervals.of(r, seed) for k, r in b_to_a.items()}, inputs.estimated_peak,
                           inputs.budget, inputs.labels_read, inputs.labels_digest)


def check_probe(store: ActivationStore, a: str, b: str, *, selection: TokenSelection | None, memory_budget: int | str,
                label_field: str, labels_file: str | None = None, id_field: str | None = None, pool: Pool = "mean",
                hidden_states: Sequence[int] | None = None, seed: int = 0,
                fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), names: SettingNames = flag_name,
                **_: Any) -> int:
    """Refuse now what :func:`probe_pair` would refuse, reading the labels but no hidden state (``analyze_pair`` asks
    before its streaming passes); returns the pass's estimated peak. Messages name the settings by ``names``.

    Raises:
        UserError: a hidden state not shared, labels missing, fewer than two classes among the selected labelled
            documents, or too few of them for a test split.
        MemoryBudgetError: the pass cannot fit.
    """
    return _ProbeInputs.of(store, a, b, label_field=label_field, labels_file=labels_file, id_field=id_field, pool=pool,
                           hidden_states=hidden_states, selection=selection, seed=seed, fractions=fractions,
                           memory_budget=memory_budget, names=names).estimated_peak


@dataclass(frozen=True)
class _ProbeInputs:
    """What a probe pass reads and fits on, checked (no hidden state read).

    Attributes:
        states: hidden states probed; docs: (M,) documents with a kept token; labelled: (M,) which have a label;
        y: (labelled M,) their classes (:func:`~hrsa.store.labels.class_name`: strings sort, mixed types do not);
        classes: the values of ``y``;
        block_tokens, estimated_peak, budget: the pooling block, the pass's memory model, the budget;
        labels_read, labels_digest: the labels' file and its digest; names: how messages name the settings.
    """

    states: tuple[int, ...]
    docs: NDArray[np.int64]
    labelled: NDArray[np.bool_]
    y: NDArray[np.str_]
    classes: tuple[str, ...]
    block_tokens: int
    estimated_peak: int
    budget: int
    labels_read: str
    labels_digest: str | None
    names: SettingNames

    @classmethod
    def of(cls, store: ActivationStore, a: str, b: str, *, label_field: str, labels_file: str | None,
           id_field: str | None, pool: Pool, hidden_states: Sequence[int] | None, selection: TokenSelection | None,
           seed: int, fractions: tuple[float, float, float], memory_budget: int | str,
           names: SettingNames) -> _ProbeInputs:
        states = shared_hidden_states(store, a, b, hidden_states, names=names)
        budget = parse_memory_budget(memory_budget)
        docs, block_tokens, estimated_peak = _plan(store, a, b, selection, pool, budget)
        labels, read, digest = _read_labels(store, store.model_info(a).corpus, label_field=label_field,
                                            labels_file=labels_file, id_field=id_field, models=(a, b), names=names)
        labelled = np.array([labels[d] is not None for d in docs], dtype=bool)
        y = np.array([class_name(labels[d]) for d in docs[labelled]])
        _check_classes(labels, y, label_field, names)
        _check_split(y, fractions, seed)
        return cls(states, docs, labelled, y, tuple(sorted(set(y.tolist()))), block_tokens, estimated_peak, budget,
                   read, digest, names)

    def warn_unlabelled(self) -> None:
        left_out = int(self.docs.size - self.y.size)
        if left_out:
            warnings.warn(f"Probe: labels for {self.y.size} of the {self.docs.size} documents selected (read from "
                          f"{self.labels_read}); the other {left_out} are left out. Check {self.names('labels')} "
                          f"and {self.names('id_field')} if they should have one.", ProbeCoverageWarning, stacklevel=3)


def _check_classes(labels: NDArray[np.object_], y: NDArray[np.str_], label_field: str, names: SettingNames) -> None:
    everywhere = sorted({class_name(v) for v in labels if v is not None})
    if len(everywhere) < 2:
        raise UserError(f"Expected at least two values of {label_field!r}. Got {everywhere} instead. "
                        f"Pick another {names('label_field')}.")
    selected = sorted(set(y.tolist()))
    if len(selected) < 2:
        raise UserError(f"Expected at least two values of {label_field!r} among the {y.size} labelled documents "
                        f"selected. Got {selected} instead. Select documents of two classes ({names('docs')}, the "
                        "token filters).")


def _check_split(y: NDArray[np.str_], fractions: tuple[float, float, float], seed: int) -> None:
    """A probe with no test document scores nothing (nan) and gets no verdict: refused, saying why."""
    train, dev, test = stratified_split(y, fractions=fractions, seed=seed)
    if not test.size:
        raise UserError(f"Expected enough labelled documents for a test split. Got {y.size} (train {train.size}, "
                        f"dev {dev.size}, test {test.size}) instead. Select more documents (about 10 of each class "
                        "give each class a test document).")


def _plan(
    store: ActivationStore, a: str, b: str, selection: TokenSelection | None, pool: Pool, budget: int
) -> tuple[NDArray[np.int64], int, int]:
    """(documents with a kept token, tokens pooled per block, estimated peak bytes) of the pass; raises
    MemoryBudgetError when it cannot fit."""
    infos = (store.model_info(a), store.model_info(b))
    docs = _Documents.of(store, a, selection).docs
    size = ProbePass(n_docs=int(docs.size), n_tokens=max(store.corpus_info(i.corpus).n_tokens for i in infos),
                     d=max(i.hidden_size for i in infos), read_bytes=max(bytes_per_value(i.dtype) for i in infos),
                     shard_tokens=max(min(i.layout.shard_tokens, i.n_tokens) for i in infos), pool=pool)
    block_tokens, estimated_peak = plan_probe(size, budget)
    return docs, block_tokens, estimated_peak


def _labelled_features(
    store: ActivationStore, mid: str, layer: int, pool: Pool, selection: TokenSelection | None, block_tokens: int,
    expected: NDArray[np.int64], labelled: NDArray[np.bool_],
) -> NDArray[np.float64]:
    """(labelled M, D) float64 pooled features of one model (the unlabelled rows dropped, not copied when none)."""
    docs, features = document_features(store, mid, layer, pool=pool, selection=selection, block_tokens=block_tokens)
    if not np.array_equal(docs, expected):  # pragma: no cover - the same documents and filters keep the same ones
        raise UserError(f"Expected the models of a pair to keep the same documents. Got {docs.size} and {expected.size}.")
    return features if labelled.all() else features[labelled]
