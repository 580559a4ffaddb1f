"""Cross-model linear probes on a store: pool stored hidden states per document, read labels, fit, score.

Features come from the store (no re-extraction): for each document, the mean of one hidden state over
its tokens (``pool="mean"``) or its last token (``pool="last"``), after the token filters of
``hrsa analyze`` (e.g. ``exclude_special`` drops BOS/EOS before pooling). Documents left without tokens
are dropped.

Labels are joined to the stored documents by record id. By default they are read back from the corpus's
own source file, with the same reader and id rule that extraction used (the corpus keeps
``extra["corpus_spec"]``: file, id field): ``label_field="label"`` on spam-assassin, ``"party"`` on
sotu. ``labels_file`` (a .jsonl/.csv/.parquet with an id column and the label column) overrides this,
e.g. when the corpus file has moved; its ids are matched the same way (``id_field``, else ``"id"``,
else ``<file name>:<line>``). Documents whose record has no label (missing or null) are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_args

import numpy as np

from hrsa.analyze.config import Pool
from hrsa.analyze.metrics.linear_probe import ProbeResult, linear_probe
from hrsa.store.errors import UserError
from hrsa.store.records import read_records

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from hrsa.store import ActivationStore
    from hrsa.store.selection import TokenSelection

__all__ = ["ProbeOptions", "ProbePairResult", "document_features", "probe_pair", "read_labels"]

_BLOCK = 1 << 16  # tokens read at once when pooling


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
class ProbePairResult:
    """Probes of one pair per hidden state.

    Attributes:
        hidden_states: the hidden states probed, in order.
        a_to_b: {hidden state: probe fitted on A, applied to B}.
        b_to_a: the reverse direction, when asked for (else empty).
        n_docs: labelled documents used; classes: the label values; pool, label_field, seed: settings.
    """

    hidden_states: tuple[int, ...]
    a_to_b: dict[int, ProbeResult]
    n_docs: int
    classes: tuple[str, ...]
    pool: str
    label_field: str
    seed: int
    b_to_a: dict[int, ProbeResult] = field(default_factory=dict)


def read_labels(
    store: ActivationStore, cid: str, *, label_field: str, labels_file: str | None = None, id_field: str | None = None
) -> NDArray[np.object_]:
    """The label of each document of corpus ``cid`` (None where its record has none).

    Raises:
        UserError: no source to read labels from, or no document has the label field.
    """
    info = store.corpus_info(cid)
    spec = info.extra.get("corpus_spec") or {}
    source = labels_file or spec.get("source") or info.source
    if not source:
        raise UserError(f"Expected corpus {cid} to record its source file. Got none. Pass --labels FILE.")
    ids_from = id_field or (None if labels_file else spec.get("id_field"))  # the id rule extraction used
    try:
        by_id = {r["_id"]: r.get(label_field) for r in read_records(source, id_field=ids_from)}
    except Exception as error:  # CorpusError and friends: the source moved or cannot be read
        raise UserError(f"Expected readable labels in {source}. Got an error instead: {error}. "
                        "Pass --labels FILE.") from error
    labels = np.array([by_id.get(str(rid)) for rid in store.documents(cid)["record_id"]], dtype=object)
    if all(v is None for v in labels):
        raise UserError(f"Expected a label field {label_field!r} in the records of {source} matching "
                        f"corpus {cid}'s ids. "
                        "Got none. Check --label-field (and --labels / the id field).")
    return labels


def _kept_tokens(store: ActivationStore, mid: str, selection: TokenSelection | None) -> NDArray[np.bool_]:
    info = store.model_info(mid)
    chosen = store.select(mid, selection)
    keep = np.zeros(store.corpus_info(info.corpus).n_tokens, dtype=bool)
    keep[chosen] = True
    return keep


def document_features(
    store: ActivationStore, mid: str, layer: int, *, pool: Pool = "mean", selection: TokenSelection | None = None
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Per-document features pooled from one stored hidden state.

    Args:
        store: an open store.
        mid: model id.
        layer: hidden state.
        pool: "mean" over the document's kept tokens, or its "last" kept token.
        selection: token filters applied before pooling (default all tokens).

    Returns:
        (document indices (M,), features (M, D) float64) for the documents with at least one kept token.
    """
    if pool not in get_args(Pool):
        raise UserError(f"Expected --pool {' or '.join(get_args(Pool))}. Got {pool!r} instead.")
    info = store.model_info(mid)
    doc_index = store.tokens(info.corpus)["doc_index"].to_numpy()  # (N,) sorted: documents are contiguous
    keep = _kept_tokens(store, mid, selection)
    x = store.hidden_state(mid, layer)  # (N, D) lazy
    docs = np.unique(doc_index[keep])
    if pool == "last":
        kept = np.flatnonzero(keep)
        last = kept[np.searchsorted(doc_index[kept], docs, side="right") - 1]  # (M,) last kept token per doc
        return docs.astype(np.int64), np.asarray(x[last].compute(), dtype=np.float64)
    sums = np.zeros((docs.size, info.hidden_size))  # (M, D) float64
    counts = np.zeros(docs.size)
    for start in range(0, keep.size, _BLOCK):
        m = keep[start : start + _BLOCK]
        if not m.any():
            continue
        rows = np.asarray(x[start : start + _BLOCK].compute(), dtype=np.float64)[m]  # (b, D)
        where = np.searchsorted(docs, doc_index[start : start + _BLOCK][m])  # row of each token's document
        firsts = np.flatnonzero(np.r_[True, where[1:] != where[:-1]])
        sums[where[firsts]] += np.add.reduceat(rows, firsts, axis=0)
        counts[where[firsts]] += np.diff(np.r_[firsts, where.size])
    return docs.astype(np.int64), sums / counts[:, None]


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
        seed: seed of the split and the solver.
        fractions: train/dev/test shares.

    Returns:
        A ProbePairResult.

    Raises:
        UserError: labels missing, fewer than two classes, or no shared hidden states.
    """
    info_a, info_b = store.model_info(a), store.model_info(b)
    shared = sorted(set(info_a.hidden_states) & set(info_b.hidden_states))
    states = tuple(shared if hidden_states is None else [k for k in hidden_states if k in shared])
    if not states:
        raise UserError(f"Expected hidden states shared by {a} and {b}. Got {list(hidden_states or [])} instead.")
    # Step 1: labels per document, as strings (mixed types sort badly); unlabelled documents dropped.
    labels = read_labels(store, info_a.corpus, label_field=label_field, labels_file=labels_file, id_field=id_field)
    classes = sorted({str(v) for v in labels if v is not None})
    if len(classes) < 2:
        raise UserError(f"Expected at least two values of {label_field!r}. Got {classes} instead. "
                        "Pick another --label-field.")
    a_to_b: dict[int, ProbeResult] = {}
    b_to_a: dict[int, ProbeResult] = {}
    n_docs = 0
    for layer in states:
        # Step 2: pooled features of both models on the labelled documents they both keep.
        docs_a, fa = document_features(store, a, layer, pool=pool, selection=selection)
        docs_b, fb = document_features(store, b, layer, pool=pool, selection=selection)
        labelled = np.array([labels[d] is not None for d in docs_a], dtype=bool)
        if not np.array_equal(docs_a, docs_b):  # pragma: no cover - same corpus and filters give the same documents
            raise UserError(f"Expected {a} and {b} to keep the same documents. Got {docs_a.size} and {docs_b.size}.")
        y = np.array([str(labels[d]) for d in docs_a[labelled]])
        # Step 3: fit on the source, score both (and the reverse on request).
        a_to_b[layer] = linear_probe(fa[labelled], fb[labelled], y, fractions=fractions, seed=seed)
        if both_directions:
            b_to_a[layer] = linear_probe(fb[labelled], fa[labelled], y, fractions=fractions, seed=seed)
        n_docs = int(y.size)
    return ProbePairResult(states, a_to_b, n_docs, tuple(classes), pool, label_field, seed, b_to_a)
