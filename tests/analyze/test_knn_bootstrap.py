"""Bootstrap intervals of the local metrics resample documents: they hold the estimate, shrink as 1/sqrt(documents),
and a document of identical tokens counts once (a token bootstrap would be too narrow)."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest

from hrsa.analyze.local.bootstrap import accuracy_bootstrap_interval, document_bootstrap_interval
from hrsa.analyze.local.knn import knn_pair


def _documents(rng: np.random.Generator, n_docs: int, tokens: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(values, documents): a document effect (sd 0.1) around 0.5 plus token noise (sd 0.1), ``tokens`` a document."""
    effect = 0.5 + 0.1 * rng.standard_normal(n_docs)
    docs = np.repeat(np.arange(n_docs), tokens)
    return effect[docs] + 0.1 * rng.standard_normal(docs.size), docs


def _width(interval) -> float:
    return interval.high - interval.low


def test_interval_holds_the_estimate_at_its_level(rng: np.random.Generator) -> None:
    values, docs = _documents(rng, 60)
    interval = document_bootstrap_interval(values, docs, seed=3)
    assert interval.low < values.mean() < interval.high
    assert interval.level == 0.95 and interval.n_groups == 60
    assert interval == document_bootstrap_interval(values, docs, seed=3)  # a fixed seed: the same interval
    # The replicates' spread is the standard error of a mean of document means: sd / sqrt(G).
    per_doc = np.bincount(docs, weights=values) / np.bincount(docs)
    assert interval.se == pytest.approx(per_doc.std() / np.sqrt(60), rel=0.15)


def test_width_shrinks_as_one_over_root_documents(rng: np.random.Generator) -> None:
    ratios = []
    for _ in range(5):  # average a few data sets: one width carries ~5% Monte Carlo and sampling noise
        few, many = (_width(document_bootstrap_interval(*_documents(rng, g))) for g in (50, 200))
        ratios.append(many / few)
    assert np.mean(ratios) == pytest.approx(0.5, abs=0.08)


def test_resampling_is_by_document(rng: np.random.Generator) -> None:
    """Documents of 16 identical tokens: 40 documents of information, not 640 tokens. Resampling documents gives
    an interval ~sqrt(16) = 4 times wider than resampling tokens as if they were independent."""
    effect = rng.uniform(0.0, 1.0, size=40)
    docs = np.repeat(np.arange(40), 16)
    values = effect[docs]  # every token of a document is a duplicate
    by_document = _width(document_bootstrap_interval(values, docs))
    by_token = _width(document_bootstrap_interval(values, np.arange(values.size)))  # each token its own document
    assert by_document / by_token == pytest.approx(4.0, rel=0.2)
    # ...and the document interval is the interval of the 40 document values alone.
    alone = _width(document_bootstrap_interval(effect, np.arange(40)))
    assert by_document == pytest.approx(alone, rel=0.1)


def test_accuracy_interval_is_wilsons_at_the_published_values() -> None:
    """Wilson score intervals at 95% (Newcombe 1998, Table I: 0/10 -> [0, 0.2775], 8/10 -> [0.4902, 0.9433]); at an
    accuracy of 1 over two documents the bootstrap of their outcomes read [1, 1]."""
    for right, n, low, high in ((0, 10, 0.0, 0.2775), (8, 10, 0.4902, 0.9433), (29, 29, 0.8830, 1.0)):
        got = accuracy_bootstrap_interval(right / n, n)
        assert (got.low, got.high) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))
    assert accuracy_bootstrap_interval(1.0, 2).low < 0.35


def test_fewer_than_four_documents_give_no_interval() -> None:
    """One document resampled is itself every time: a zero-width interval (the k-NN table showed "+-0.0000")."""
    values = np.linspace(0, 1, 30)
    for g in (1, 2, 3):
        assert np.isnan(document_bootstrap_interval(values, np.arange(30) % g).low)
    four = document_bootstrap_interval(values, np.arange(30) % 4)
    assert four.low < four.high and four.n_groups == 4


def test_accuracy_interval_is_close_to_the_bootstrap_of_test_documents(rng: np.random.Generator) -> None:
    right = rng.random(200) < 0.8  # one 0/1 outcome per test document
    closed = accuracy_bootstrap_interval(right.mean(), right.size)
    resampled = document_bootstrap_interval(right.astype(float), np.arange(right.size))
    assert closed.low == pytest.approx(resampled.low, abs=0.015) and closed.high == pytest.approx(resampled.high, abs=0.015)
    assert closed.low < right.mean() < closed.high and closed.n_groups == 200
    quarter = accuracy_bootstrap_interval(right.mean(), right.size * 4)
    assert _width(quarter) / _width(closed) == pytest.approx(0.5, abs=0.1)
    assert np.isnan(accuracy_bootstrap_interval(float("nan"), 0).low)


def test_knn_pair_gives_an_interval_per_k_and_hidden_state(pair_store) -> None:
    res = knn_pair(pair_store.open(), "a", "b", ks=(5, 10), n_sample=400, seed=2, hidden_states=[0, 3])
    assert 4 <= res.n_docs <= 5  # 400 of the 1000 tokens of 5 documents: all but perhaps the one-token document
    for k in (5, 10):
        assert len(res.overlap_interval[k]) == 2
        for summary, interval in zip(res.overlap[k], res.overlap_interval[k]):
            assert interval.low <= summary.mean <= interval.high and interval.n_groups == res.n_docs


@pytest.mark.parametrize("name", ["hrsa.analyze.local.bootstrap", "hrsa.analyze.local.knn_search"])
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0
