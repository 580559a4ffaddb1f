"""Hard-negative mining (``hrsa mine-negatives``): for each (query, pos), the documents an embedding model ranks
highest that are still clearly worse than the positive.

Positive-aware rule (NV-Retriever's "TopK-PercPos"): a candidate is kept only when its score is under
``max_score_ratio`` times the positive's score, which drops likely false negatives (unlabelled positives).
The margin is taken below the positive whatever its sign: the limit is ``pos - (1 - ratio) * |pos|``, which is
``ratio * pos`` for a positive score; for a score <= 0, ``ratio * pos`` would lie above the positive and keep
candidates that score higher than it (cosine scores of a poorly matched pair can be negative).
No positive of the query (its own, nor that of another record with the same query text) is ever a negative, nor
an exact duplicate of one (whitespace aside); with ``keep_existing``, kept negatives equal to one are dropped. Search is
exact inner product on unit vectors (FAISS ``IndexFlatIP``; on the GPU when FAISS has one), and a query
left short of ``k`` is searched again deeper, so the result equals a brute-force scan of the whole corpus.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import Field

from hrsa.runtime.files import write_atomic
from hrsa.runtime.settings import FilePath
from hrsa.store.errors import UserError
from hrsa.store.local_files import check_output_file
from hrsa.train.encoder_options import BatchSize, EncoderOptions, MaxLength
from hrsa.train.jsonl import read_jsonl, read_pairs
from hrsa.train.pooling import format_query

__all__ = [
    "MineConfig",
    "MineResult",
    "mine_from_embeddings",
    "mine_negatives",
    "search_inner_product",
    "select_negatives",
]


class MineConfig(EncoderOptions):
    """Settings of ``hrsa mine-negatives``; each field is also a flag (``max_score_ratio`` is ``--max-score-ratio``).

    How the embedding model loads and runs (device, dtype, attention, batch size, max length) is
    :class:`~hrsa.train.encoder_options.EncoderOptions`, shared with ``hrsa eval``.
    """

    input: Path = Field(description="JSON lines with query and pos (optional negs, instruction) per line.")
    out: FilePath | None = Field(None, description="Output JSON lines: query, pos, negs (+ instruction) (default: "
                             "<input stem>.mined.jsonl beside the input). An existing file is replaced only with "
                             "--overwrite; anything but a regular file there, or a path inside an hrsa store, is "
                             "refused.")
    corpus: Path | None = Field(None, description="JSON lines of candidate documents (default: every distinct pos "
                                "of --input).")
    corpus_field: str = Field("text", description="The field of --corpus holding each document's text.")
    model: str = Field("packaged:all-minilm-l6-v2", description="Embedding model: hub id, folder, .gguf or packaged:NAME.")
    k: int = Field(7, ge=1, description="Negatives per query.")
    max_score_ratio: float = Field(0.95, gt=0, le=1, description="Positive-aware margin, in (0, 1]: keep candidates "
                                   "scoring under this times the positive's score (below it by (1 - ratio) x |score| "
                                   "when that is <= 0).")
    depth: int = Field(100, ge=1, description="Candidates retrieved per query at first; short queries are searched "
                       "deeper.")
    keep_existing: bool = Field(False, description="Keep the input's negs first and mine the rest up to k, or "
                                "replace them.")
    query_instructions: bool = Field(False, description="Embed queries as 'Instruct: {instruction}\\nQuery: {query}' "
                                     "(instruction-tuned models).")
    batch_size: BatchSize = 64  # mining's own defaults: many short texts
    max_length: MaxLength = 256
    overwrite: bool = Field(False, description="Replace --out when it exists.")

    def out_path(self) -> Path:
        return self.out if self.out is not None else self.input.with_name(self.input.stem + ".mined.jsonl")


@dataclass(frozen=True)
class MineResult:
    """What a mining run wrote: where, how many queries got fewer than ``k`` negatives, and how many kept negatives
    (``keep_existing``) were dropped for equalling a positive of their query."""

    out: Path
    model: str
    n_queries: int
    n_corpus: int
    k: int
    n_short: int
    n_empty: int
    mean_negatives: float
    n_dropped: int = 0

    def summary(self) -> str:
        dropped = f"; dropped {self.n_dropped} kept negatives equal to a positive of their query" if self.n_dropped else ""
        return (f"wrote {self.out}: {self.n_queries} queries, corpus {self.n_corpus}, {self.mean_negatives:.2f} negatives "
                f"a query on average; {self.n_short} got fewer than {self.k} ({self.n_empty} none){dropped}")


class Encoder(Protocol):
    def encode(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray: ...


def _norm(text: str) -> str:
    """Text with whitespace folded: what "an exact duplicate" compares."""
    return " ".join(text.split())


# --- the math ------------------------------------------------------------------------------------------------------


def search_inner_product(queries: np.ndarray, docs: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``depth`` inner products (FAISS ``IndexFlatIP``, on all GPUs when FAISS has any).

    Returns:
        (scores, ids), both (Q, min(depth, N)), best first.
    """
    import faiss

    index = faiss.IndexFlatIP(docs.shape[1])
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(docs, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(depth, docs.shape[0]))


#: Rounding of a float32 inner product of unit vectors (D up to ~10^4): below the margin nothing is mined as scoring
#: under the positive that a float64 product would not.
_FLOAT32_SCORE_ERROR = 1e-5


def select_negatives(
    scores: np.ndarray, ids: np.ndarray, pos_scores: np.ndarray, exclude: Sequence[set[int]], *, k: int, max_score_ratio: float
) -> list[list[int]]:
    """For each query, the first ``k`` candidates (in the order given) not excluded and scoring under the positive
    by the margin: ``pos - (1 - max_score_ratio) * |pos|`` (``ratio * pos`` for a positive score)."""
    chosen = []
    for row_scores, row_ids, pos, banned in zip(scores, ids, pos_scores, exclude):
        # FAISS scores in float32: a text scoring as the positive (its very embedding) may round just under it
        limit = float(pos) - (1.0 - max_score_ratio) * abs(float(pos)) - _FLOAT32_SCORE_ERROR
        keep = [int(i) for s, i in zip(row_scores, row_ids) if i >= 0 and i not in banned and s < limit]
        chosen.append(keep[:k])
    return chosen


def mine_from_embeddings(
    queries: np.ndarray,
    docs: np.ndarray,
    pos_scores: np.ndarray,
    exclude: Sequence[set[int]],
    *,
    k: int,
    max_score_ratio: float = 0.95,
    depth: int = 100,
) -> list[list[int]]:
    """Indices into ``docs`` of each query's negatives, best first; queries left short are searched deeper.

    Args:
        queries: (Q, D) unit vectors. docs: (N, D) unit vectors.
        pos_scores: (Q,) each query's score with its positive.
        exclude: per query, document indices that may never be its negatives (its positive, duplicates).
        k, max_score_ratio, depth: see :class:`MineConfig`.
    """
    n_docs = docs.shape[0]
    result: list[list[int]] = [[] for _ in range(len(queries))]
    todo = np.arange(len(queries))
    depth = max(depth, k)
    while len(todo):
        scores, ids = search_inner_product(queries[todo], docs, depth)
        picked = select_negatives(scores, ids, pos_scores[todo], [exclude[i] for i in todo], k=k,
                                  max_score_ratio=max_score_ratio)
        for q, negs in zip(todo, picked):
            result[q] = negs
        if depth >= n_docs:
            break
        todo = np.array([q for q, negs in zip(todo, picked) if len(negs) < k], dtype=np.int64)
        depth = min(n_docs, depth * 4)
    return result


# --- the job -------------------------------------------------------------------------------------------------------


def _corpus_texts(config: MineConfig, records: list[dict[str, Any]]) -> list[str]:
    if config.corpus is None:
        texts = [r["pos"] for r in records]
    else:
        hint = f" or name the text field with --corpus-field (now {config.corpus_field!r})"
        texts = [r[config.corpus_field] for r in read_jsonl(config.corpus, required=(config.corpus_field,), hint=hint)]
    return _distinct(texts)


def _distinct(texts: Sequence[str]) -> list[str]:
    """The texts once each, whitespace folded (one document to the tokenizer: two would be one negative twice, which
    reweights it in the loss), the first of each kept, in order."""
    first: dict[str, str] = {}
    for text in texts:
        first.setdefault(_norm(text), text)
    return list(first.values())


def _positives(records: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Every positive (whitespace folded) of each query text (whitespace folded): records may share a query."""
    out: dict[str, set[str]] = {}
    for r in records:
        out.setdefault(_norm(r["query"]), set()).add(_norm(r["pos"]))
    return out


def _kept_negatives(records: list[dict[str, Any]], positives: dict[str, set[str]]) -> tuple[list[list[str]], int]:
    """Per record, its input negs (distinct, in order) less any equal to a positive of its query; and how many went."""
    kept, dropped = [], 0
    for r in records:
        negs = _distinct(r.get("negs", []))
        clean = [n for n in negs if _norm(n) not in positives[_norm(r["query"])]]
        kept.append(clean)
        dropped += len(negs) - len(clean)
    return kept, dropped


def _exclusions(records: list[dict[str, Any]], corpus: list[str], positives: dict[str, set[str]],
                kept: list[list[str]]) -> list[set[int]]:
    """Per query: the corpus indices equal (whitespace aside) to any positive of its query text, or to its kept
    negatives."""
    where: dict[str, set[int]] = {}
    for i, text in enumerate(corpus):
        where.setdefault(_norm(text), set()).add(i)
    out = []
    for r, old in zip(records, kept):
        texts = positives[_norm(r["query"])] | {_norm(t) for t in old}
        out.append(set().union(*(where.get(t, set()) for t in texts)))
    return out


def mine_negatives(
    config: MineConfig, *, encoder: Encoder | None = None, on_stage: Callable[[str], None] | None = None
) -> MineResult:
    """Mine hard negatives for every record of ``config.input`` and write them to ``config.out_path()``.

    Args:
        config: the settings.
        encoder: an already loaded embedder (a :class:`~hrsa.train.encode.TextEncoder`, or anything with its
            ``encode``); default: load ``config.model``.
        on_stage: called with a short description as each stage starts.

    Raises:
        UserError: missing input, missing fields (the line is named), an existing output without ``overwrite``.
    """
    say = on_stage or (lambda _: None)
    out = config.out_path()
    if out.is_dir():
        raise UserError(f"Expected --out to be a file. Got the folder {out} instead. Pick another path.")
    check_output_file(out, flag="--out")  # the default beside --input too: no FIFO, device node, or store there
    if out.exists() and not config.overwrite:
        raise UserError(f"Expected a new output file. Got an existing {out} instead. Pass --overwrite or another --out.")
    for flag, source in (("--input", config.input), ("--corpus", config.corpus)):  # --overwrite would replace it
        if source is not None and out.exists() and out.resolve() == Path(source).resolve():
            raise UserError(f"Expected --out other than {flag}. Got {out} for both instead. Pick another --out.")
    records = read_pairs(config.input)
    corpus = _corpus_texts(config, records)
    if encoder is None:
        from hrsa.train.encode import TextEncoder

        say(f"loading {config.model}")
        encoder = TextEncoder.load(config.model, device=config.device, dtype=config.dtype, attention=config.attention)
    options = {"batch_size": config.batch_size, "max_length": config.max_length, "show_progress": on_stage is not None}
    say(f"embedding {len(corpus)} documents")
    docs = encoder.encode(corpus, **options)
    say(f"embedding {len(records)} queries and positives")
    queries = encoder.encode([format_query(r["query"], r.get("instruction") if config.query_instructions else None)
                              for r in records], **options)
    pos_emb = _positive_embeddings([r["pos"] for r in records], corpus, docs, encoder, options)
    pos_scores = np.einsum("qd,qd->q", queries.astype(np.float64), pos_emb.astype(np.float64))
    say("searching")
    positives = _positives(records)
    kept, dropped = _kept_negatives(records, positives) if config.keep_existing else ([[] for _ in records], 0)
    exclude = _exclusions(records, corpus, positives, kept)
    mined = mine_from_embeddings(queries, docs, pos_scores, exclude, k=config.k, max_score_ratio=config.max_score_ratio,
                                 depth=config.depth)
    negs = [(old + [corpus[i] for i in new])[:config.k] for old, new in zip(kept, mined)]
    _write_jsonl(out, [_output_record(r, n) for r, n in zip(records, negs)])
    counts = np.array([len(n) for n in negs])
    return MineResult(out=out, model=config.model, n_queries=len(records), n_corpus=len(corpus), k=config.k,
                      n_short=int((counts < config.k).sum()), n_empty=int((counts == 0).sum()),
                      mean_negatives=float(counts.mean()), n_dropped=dropped)


def _positive_embeddings(positives: list[str], corpus: list[str], docs: np.ndarray, encoder: Encoder,
                         options: dict[str, Any]) -> np.ndarray:
    """Each record's positive embedding: its corpus row when the corpus holds the text, else embedded now."""
    row = {t: i for i, t in enumerate(corpus)}
    missing = list(dict.fromkeys(t for t in positives if t not in row))
    extra = encoder.encode(missing, **options) if missing else np.zeros((0, docs.shape[1]), dtype=docs.dtype)
    table = np.concatenate([docs, extra])
    row.update({t: len(corpus) + i for i, t in enumerate(missing)})
    return table[[row[t] for t in positives]]


def _output_record(record: dict[str, Any], negs: list[str]) -> dict[str, Any]:
    out = {"query": record["query"], "pos": record["pos"], "negs": negs}
    if record.get("instruction") is not None:
        out["instruction"] = record["instruction"]
    return out


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write whole or not at all (a reader never sees half the negatives)."""
    write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
