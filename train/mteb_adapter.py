"""hrsa's adapter to mteb: a :class:`~hrsa.train.encode.TextEncoder` as an mteb encoder, and mteb tasks read
from local files. Everything ``hrsa eval`` hands to mteb is built here; nothing else subclasses mteb.

Local tasks are real mteb tasks (``AbsTaskRetrieval`` / ``AbsTaskClassification`` with ``load_data``
overridden), so mteb computes its standard metrics (nDCG@10, MAP, recall...; accuracy, F1...):

- retrieval from pairs (JSON lines with query, pos, optional negs and instruction): the corpus is every
  distinct pos and neg text, and each distinct query's relevant documents are the pos of every line it is on.
- classification from labelled texts (a text field and a label field): a seeded stratified split into
  train and test halves; mteb fits a logistic regression on the train embeddings. Labels are classes by the
  probes' rule (:mod:`hrsa.store.labels`: 1.0 is the class of 1; labels of mixed kinds, 1 and "1", are refused).

Importing mteb creates its result cache folder (``~/.cache/mteb`` unless ``MTEB_CACHE`` is set), so this
module imports it with ``MTEB_CACHE`` pointed at a temporary folder when the user has not set one.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _import_mteb_quietly() -> None:
    """Import mteb without it creating ~/.cache/mteb (its default result cache is built at import time)."""
    import sys

    if "mteb" in sys.modules or os.environ.get("MTEB_CACHE"):
        import mteb  # noqa: F401

        return
    scratch = tempfile.mkdtemp(prefix="hrsa-mteb-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    os.environ["MTEB_CACHE"] = scratch
    try:
        import mteb  # noqa: F401
    finally:
        os.environ.pop("MTEB_CACHE", None)


_import_mteb_quietly()

import numpy as np  # noqa: E402
from datasets import Dataset, DatasetDict  # noqa: E402
from mteb.abstasks.classification import AbsTaskClassification  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.models.abs_encoder import AbsEncoder  # noqa: E402
from mteb.models.model_meta import ModelMeta, ScoringFunction  # noqa: E402
from mteb.types import PromptType  # noqa: E402

from hrsa.store.errors import UserError  # noqa: E402
from hrsa.store.labels import check_one_kind, class_name  # noqa: E402
from hrsa.train.jsonl import JsonlError, read_jsonl, read_pairs  # noqa: E402
from hrsa.train.pooling import format_query  # noqa: E402

__all__ = ["HrsaMtebEncoder", "LocalClassificationTask", "LocalRetrievalTask", "LocalTaskError", "local_metadata",
           "model_meta"]


def local_metadata(name: str, kind: str, path: Path, *, prompt: str | None = None) -> TaskMetadata:
    """Valid mteb metadata for a task read from a local file (one "test" split, subset "default")."""
    return TaskMetadata(
        name=name,
        type="Retrieval" if kind == "retrieval" else "Classification",
        main_score="ndcg_at_10" if kind == "retrieval" else "accuracy",
        description=f"hrsa local {kind} task from {path}.",
        reference=None,
        dataset={"path": str(path), "revision": "local"},
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        date=None,
        domains=None,
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=None,
        sample_creation=None,
        bibtex_citation=None,
        prompt=prompt,
    )


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted seeded sample of ``limit`` of ``n`` indices (all when ``limit`` is None or not smaller)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


class LocalTaskError(UserError, ValueError):
    """A local task file whose records cannot make the task (e.g. a label with a single record)."""


class LocalRetrievalTask(AbsTaskRetrieval):
    """Retrieval over a pairs file: each query's relevant document is its pos; the corpus is every pos and neg."""

    metadata = local_metadata("HrsaLocalRetrieval", "retrieval", Path("pairs.jsonl"))

    def __init__(self, path: Path, *, name: str, instruction: str | None = None, limit: int | None = None,
                 seed: int = 0) -> None:
        self.metadata = local_metadata(name, "retrieval", Path(path), prompt=instruction)
        self.path, self.limit = Path(path), limit
        super().__init__(seed=seed)

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        records = read_pairs(self.path)
        records = [records[i] for i in _subsample(len(records), self.limit, self.seed)]
        doc_ids: dict[str, str] = {}
        for r in records:
            for text in [r["pos"], *r.get("negs", [])]:
                doc_ids.setdefault(text, f"d{len(doc_ids)}")
        # One query per distinct (query, instruction): the lines of a query with several positives (a pairs file
        # holds one line a positive) are one query whose relevant documents are all of them. Taken one query a line,
        # each line's other positives counted as irrelevant, and a perfect model scored 0.82 nDCG@10, not 1.
        relevant: dict[tuple[str, str], dict[str, int]] = {}
        for r in records:
            relevant.setdefault((r["query"], r.get("instruction") or ""), {})[doc_ids[r["pos"]]] = 1
        keys = list(relevant)
        queries = [{"id": f"q{i}", "text": query} for i, (query, _) in enumerate(keys)]
        if any(instruction for _, instruction in keys):
            for q, (_, instruction) in zip(queries, keys):
                q["instruction"] = instruction
        split = RetrievalSplitData(
            queries=Dataset.from_list(queries),
            corpus=Dataset.from_list([{"id": i, "text": t, "title": ""} for t, i in doc_ids.items()]),
            relevant_docs={f"q{i}": relevant[key] for i, key in enumerate(keys)},
            top_ranked=None,
        )
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


class LocalClassificationTask(AbsTaskClassification):
    """Classification of a labelled file: a seeded stratified half for the logistic regression, half for the test."""

    metadata = local_metadata("HrsaLocalClassification", "classification", Path("labels.jsonl"))
    n_experiments = 1  # every train text is used, so more experiments would repeat the same fit

    def __init__(self, path: Path, *, name: str, text_field: str = "text", label_field: str = "label",
                 instruction: str | None = None, limit: int | None = None, seed: int = 0) -> None:
        self.metadata = local_metadata(name, "classification", Path(path), prompt=instruction)
        self.path, self.text_field, self.label_field, self.limit = Path(path), text_field, label_field, limit
        super().__init__(seed=seed)

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        hint = " or name the fields as classification:FILE:TEXT_FIELD:LABEL_FIELD"
        records = read_jsonl(self.path, required=(self.text_field,), hint=hint)
        first_of_kind: dict[str, Any] = {}
        for number, r in enumerate(records, 1):
            if r.get(self.label_field) is None or isinstance(r[self.label_field], (list, dict)):
                raise JsonlError(f"Expected a label field {self.label_field!r} on every record of {self.path}. Got "
                                 f"none on record {number} instead. Fix that record{hint}.")
            check_one_kind(first_of_kind, r[self.label_field], self.label_field, self.path)  # the probes' rule
        records = [records[i] for i in _subsample(len(records), self.limit, self.seed)]
        names = sorted({class_name(r[self.label_field]) for r in records})  # 1.0 is the class of 1, as in the probes
        if len(names) < 2:
            raise UserError(f"Expected at least two labels in {self.path} ({self.label_field!r}). Got {names} instead.")
        texts = [str(r[self.text_field]) for r in records]
        labels = np.array([names.index(class_name(r[self.label_field])) for r in records])
        self._check_two_per_label(labels, names)
        train, test = _stratified_halves(labels, self.seed)
        self.samples_per_label = len(train)  # use every train text
        self.dataset = DatasetDict({
            "train": Dataset.from_dict({"text": [texts[i] for i in train], "label": labels[train].tolist()}),
            "test": Dataset.from_dict({"text": [texts[i] for i in test], "label": labels[test].tolist()}),
        })
        self.data_loaded = True

    def _check_two_per_label(self, labels: np.ndarray, names: list[str]) -> None:
        """Each label needs a record in the train half and one in the test half."""
        counts = np.bincount(labels, minlength=len(names))
        short = [names[i] for i in np.flatnonzero(counts < 2)]
        if short:
            sample = f" of the {len(labels)} records --limit kept" if self.limit is not None else ""
            raise LocalTaskError(f"Expected at least 2 records of each label{sample} in {self.path} ({self.label_field!r}): "
                            f"one for the train half, one for the test half. Got one for {short[:5]}"
                            f"{f' and {len(short) - 5} more' if len(short) > 5 else ''} instead. Add records of those "
                            "labels or leave them out.")


def _stratified_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of each label's items into halves (train gets the extra one)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        items = rng.permutation(np.flatnonzero(labels == label))
        cut = (len(items) + 1) // 2
        train.extend(items[:cut])
        test.extend(items[cut:])
    return np.sort(train), np.sort(test)


def model_meta(name: str, dim: int, revision: str = "local") -> ModelMeta:
    """Minimal mteb metadata for a local model: cosine similarity, its name and width."""
    return ModelMeta.create_empty(overwrites={
        "name": name, "revision": revision, "embed_dim": dim, "similarity_fn_name": ScoringFunction.COSINE, "framework": ["PyTorch"],
    })


class HrsaMtebEncoder(AbsEncoder):
    """A :class:`~hrsa.train.encode.TextEncoder` as an mteb encoder.

    Queries (retrieval queries, and the inputs of tasks without a query/document distinction such as
    classification) get ``format_query(text, instruction)`` with the task's instruction (or the query's own,
    for instruction retrieval); documents are embedded as they are. ``use_instructions=False`` embeds
    every text bare (models trained without instructions, such as all-MiniLM-L6-v2).
    """

    def __init__(self, encoder: Any, *, name: str, use_instructions: bool = True, batch_size: int = 32,
                 max_length: int = 512, on_batch: Callable[[int], None] | None = None) -> None:
        self.model = encoder
        self.mteb_model_meta = model_meta(name, int(encoder.dim))
        self.use_instructions = use_instructions
        self.batch_size, self.max_length, self.on_batch = batch_size, max_length, on_batch

    def _query_texts(self, batch: dict[str, Any], instruction: str | None) -> list[str]:
        texts = batch["text"]
        if "instruction" in batch and "query" in batch:  # mteb appended the query's own instruction to "text"
            return [format_query(q, i or instruction) for q, i in zip(batch["query"], batch["instruction"])]
        return [format_query(t, instruction) for t in texts]

    def encode(self, inputs: Any, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        """Embed every text of ``inputs`` (an mteb DataLoader of batches with a "text" list)."""
        is_document = prompt_type == PromptType.document
        instruction = None
        if self.use_instructions and not is_document:
            instruction = self.get_instruction(task_metadata, prompt_type) or None
        texts: list[str] = []
        for batch in inputs:
            texts.extend(batch["text"] if is_document or not self.use_instructions
                         else self._query_texts(batch, instruction))
        return self.model.encode(texts, batch_size=self.batch_size, max_length=self.max_length, on_batch=self.on_batch)

