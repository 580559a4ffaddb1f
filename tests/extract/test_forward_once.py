"""Every document's forward pass happens once: documents straddling two or more units are run by the unit they
start in, and their later rows carried to the next unit, not run again there.

A real tiny Llama through ``run_extraction`` on Ray; the worker class only adds a forward pre-hook on the loaded
model that logs each batch's rows (token ids under the attention mask), so the counts are the model's own calls.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hrsa.extract.unit_documents import Carried, UnitDocuments, unit_documents

pytestmark = pytest.mark.integration

SHARD_TOKENS = 16
# Lengths chosen around 16-token units: documents ending on a unit boundary, straddling one, spanning three units.
TEXTS = {
    "a": "the quick brown fox jumps over the lazy dog",
    "b": "w1 w2 w3 " * 9,
    "c": "hidden states of a tiny model",
    "d": "jumps over " * 4,
    "e": "tiny model " * 3 + "x",
    "f": "the lazy dog " * 5,
}


def counting_worker(log: Path) -> type:
    """The extraction worker, logging the rows of every forward pass its model runs (defined here so Ray pickles
    it by value)."""
    from hrsa.extract.worker import ExtractionWorker

    class CountingWorker(ExtractionWorker):
        def _use(self, spec: Any) -> Any:
            loaded = super()._use(spec)
            if not getattr(loaded.model, "counted", False):  # each model the worker loads, hooked once

                def record(module: Any, args: Any, kwargs: Any) -> None:
                    ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
                    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
                    with open(log, "a") as f:
                        f.write("".join(json.dumps(r) + "\n" for r in rows))

                loaded.model.register_forward_pre_hook(record, with_kwargs=True)
                loaded.model.counted = True
            return loaded

    return CountingWorker


def test_every_document_runs_through_the_model_once(
    ray_local: Any, tiny_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    from hrsa.extract import worker as worker_module
    from hrsa.extract.config import ExtractConfig
    from hrsa.extract.job import run_extraction
    from hrsa.store import ActivationStore

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in TEXTS.items()))
    log = tmp_path / "forward.jsonl"
    monkeypatch.setattr(worker_module, "remote_worker_class",
                        functools.partial(worker_module.remote_worker_class, worker_class=counting_worker(log)))
    config = ExtractConfig(store=str(tmp_path / "store"), model=str(tiny_models.dir("llama")), corpus=str(corpus),
                           name="tiny", shard_tokens=SHARD_TOKENS, workers=1)
    result = run_extraction(config)
    store = ActivationStore.open(config.store)
    offsets = np.asarray(store.corpus_tokens(result.corpus_id).doc_offsets)
    ids = store.tokens(result.corpus_id)["token_id"].to_numpy()
    docs = [ids[a:b].tolist() for a, b in itertools.pairwise(offsets)]
    assert len({tuple(d) for d in docs}) == len(docs)  # distinct documents: a logged row names its document
    straddling = sum(1 for a, b in itertools.pairwise(offsets) if a // SHARD_TOKENS != (b - 1) // SHARD_TOKENS)
    assert straddling >= 3 and max(np.diff(offsets)) > 2 * SHARD_TOKENS  # the corpus tests what it should
    runs = Counter(json.dumps(json.loads(line)) for line in log.read_text().splitlines())
    assert {json.dumps(d): runs[json.dumps(d)] for d in docs} == {json.dumps(d): 1 for d in docs}
    assert sum(runs.values()) == len(docs)  # and nothing else ran


def test_unit_documents_split_by_where_documents_start_and_end() -> None:
    offsets = np.array([0, 10, 16, 40, 44, 48])  # units of 16: [0,16) [16,32) [32,48)
    assert unit_documents(offsets, 0, 16) == UnitDocuments(None, (0, 1), None)
    assert unit_documents(offsets, 16, 32) == UnitDocuments(None, (), 2)  # starts here, spans past the unit
    assert unit_documents(offsets, 32, 48) == UnitDocuments(2, (3, 4), None)  # begun in an earlier unit
    assert unit_documents(np.array([0, 50]), 16, 32) == UnitDocuments(0, (), None)  # a document spanning the whole unit
    assert unit_documents(offsets, 16, 32).run_here() == (2,)


def test_carried_rows_are_taken_once_from_where_the_unit_starts() -> None:
    import torch

    carried = Carried(capacity=2)
    rows = {0: torch.arange(10.0)[:, None]}
    carried.put("m", 7, 20, rows)
    got = carried.take("m", 7, 24)
    assert got is not None and got[0][:, 0].tolist() == [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert carried.take("m", 7, 24) is None  # taken once
    for doc in range(3):
        carried.put("m", doc, 0, rows)
    assert carried.take("m", 0, 0) is None and carried.take("m", 2, 0) is not None  # the oldest dropped


def test_each_worker_is_given_consecutive_units() -> None:
    """Pending units are cut into one run of consecutive units per worker; a worker whose run is used up takes the
    back half of the longest run left, so units stay consecutive on each worker (a straddling document runs once)."""
    from hrsa.extract.job import UnitRuns

    runs = UnitRuns([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], n_workers=2)
    assert [runs.next(0) for _ in range(3)] == [0, 1, 2]
    assert [runs.next(1) for _ in range(5)] == [5, 6, 7, 8, 9]
    assert runs.next(1) == 4  # worker 1 ran out: the back half of worker 0's run [3, 4]
    assert [runs.next(0), runs.next(0), runs.next(1)] == [3, None, None]
