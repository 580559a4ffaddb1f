"""Probes on a store: pooled features, labels joined by record id, transfer; and a real model on real spam."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hrsa.analyze.local.probe import document_features, probe_pair, read_labels
from hrsa.store import ActivationStore
from hrsa.store.errors import UserError
from hrsa.store.selection import TokenSelection


def test_read_labels_from_corpus_source(labelled_store) -> None:
    store, _, labels = labelled_store
    assert read_labels(store, store.model_info("a").corpus, label_field="label").tolist() == labels
    with pytest.raises(UserError, match="label field 'nope'"):
        read_labels(store, store.model_info("a").corpus, label_field="nope")


def test_a_record_id_with_two_labels_is_refused_not_joined_to_either(labelled_store, tmp_path: Path) -> None:
    """Labels are joined to documents by record id: an id held by two records with different labels gave every
    document of that id the later record's label, silently. The same label twice is harmless and accepted."""
    store, _, labels = labelled_store
    cid = store.model_info("a").corpus
    rows = [{"id": f"rec-{i}", "label": v} for i, v in enumerate(labels)]
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps(r) + "\n" for r in [*rows, rows[3]]))
    assert read_labels(store, cid, label_field="label", labels_file=str(same)).tolist() == labels
    clash = tmp_path / "clash.jsonl"
    other = "spam" if labels[3] == "ham" else "ham"
    clash.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"id": "rec-3", "label": other}]))
    with pytest.raises(UserError, match=r"^Expected one label per record id in .*clash.jsonl. Got 'rec-3' labelled "
                                        r"'(ham|spam)' and '(ham|spam)' instead. Give each record its own id"):
        read_labels(store, cid, label_field="label", labels_file=str(clash))


def test_document_features_mean_and_last(labelled_store) -> None:
    store, x, _ = labelled_store
    offsets = store.documents(store.model_info("a").corpus)[["start", "stop"]].to_numpy()
    docs, mean = document_features(store, "a", 1, pool="mean", selection=TokenSelection(exclude_special=True))
    assert docs.tolist() == list(range(400))
    expected = np.array([x[s + 1 : e].mean(0) * 2 for s, e in offsets])  # hidden state 1 stores 2 x
    np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-5)
    _, last = document_features(store, "a", 0, pool="last")
    np.testing.assert_allclose(last, x[offsets[:, 1] - 1], rtol=1e-6)
    with pytest.raises(UserError, match="--pool"):
        document_features(store, "a", 0, pool="max")  # type: ignore[arg-type]


def test_probe_pair_self_and_rotated(labelled_store) -> None:
    store, _, _ = labelled_store
    sel = TokenSelection(exclude_special=True)
    same = probe_pair(store, "a", "c", label_field="label", selection=sel)
    assert same.n_docs == 400 and same.classes == ("ham", "spam") and same.hidden_states == (0, 1)
    for res in same.a_to_b.values():
        assert res.source == res.target and res.source.test.accuracy > 0.85
    rotated = probe_pair(store, "a", "b", label_field="label", selection=sel, both_directions=True)
    for k in (0, 1):
        fwd, back = rotated.a_to_b[k], rotated.b_to_a[k]
        assert back.source.test.accuracy > 0.85  # the rotated copy decodes the label as well on its own
        assert fwd.target.test.accuracy < fwd.source.test.accuracy - 0.15


def test_probe_pair_labels_file(labelled_store, tmp_path: Path) -> None:
    store, _, labels = labelled_store
    flipped = tmp_path / "other.jsonl"
    flipped.write_text("".join(json.dumps({"id": f"rec-{i}", "y": "x" if v == "ham" else "z"}) + "\n" for i, v in enumerate(labels)))
    res = probe_pair(store, "a", "c", label_field="y", labels_file=str(flipped), hidden_states=[1])
    assert res.classes == ("x", "z") and tuple(res.a_to_b) == (1,)


@pytest.mark.real_model
@pytest.mark.data
@pytest.mark.integration
def test_real_model_on_spam_far_above_chance(ray_local, shared_data: Path, tmp_path: Path) -> None:
    from hrsa.extract.job import ExtractConfig, run_extraction

    corpus = shared_data / "spam-assassin" / "spam-assassin.jsonl"
    # The file is sorted by group (ham first): take an evenly spread subset so that both classes appear.
    lines = corpus.read_text().splitlines()
    subset = tmp_path / "spam.jsonl"
    subset.write_text("\n".join(lines[:: max(1, len(lines) // 240)][:240]) + "\n")
    store_url = str(tmp_path / "store")
    run_extraction(ExtractConfig(store=store_url, model="packaged:all-minilm-l6-v2", corpus=str(subset), text="text",
                                 max_tokens=64, workers=1))
    store = ActivationStore.open(store_url)
    (mid,) = store.models()
    res = probe_pair(store, mid, mid, label_field="label")  # every hidden state, 0 (embeddings) to 6
    accuracy = np.array([p.source.test.accuracy for p in res.a_to_b.values()])
    chance = next(iter(res.a_to_b.values())).chance  # ~0.71: the majority class (ham) of the test split
    assert set(res.classes) == {"ham", "spam"} and res.n_docs == 240
    # 24 test documents: one document is 0.04 of accuracy, so the bounds leave room for a few.
    assert accuracy.min() > chance + 0.1 and accuracy.mean() > max(chance + 0.15, 0.85), accuracy
    assert all(p.target == p.source for p in res.a_to_b.values())


def test_probe_pair_test_accuracy_intervals(labelled_store) -> None:
    store, _, _ = labelled_store
    res = probe_pair(store, "a", "b", label_field="label", selection=TokenSelection(exclude_special=True),
                     both_directions=True, hidden_states=[1])
    for probes, intervals in ((res.a_to_b, res.a_to_b_interval), (res.b_to_a, res.b_to_a_interval)):
        for side in ("source", "target"):
            scores, interval = getattr(probes[1], side).test, getattr(intervals[1], side)
            assert interval.low <= scores.accuracy <= interval.high and interval.high - interval.low > 0
            assert interval.level == 0.95 and interval.n_groups == scores.n == 40  # the 40 test documents


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_probe_pair_peak_under_estimate_under_budget(labelled_store, pool: str) -> None:
    import tracemalloc

    store, _, _ = labelled_store
    probe_pair(store, "a", "b", label_field="label", hidden_states=[0])  # burn-in: sklearn's imports
    budget = 3_600_000  # below the whole corpus in one block: pooling goes by blocks of tokens
    tracemalloc.start()
    try:
        res = probe_pair(store, "a", "b", label_field="label", pool=pool, both_directions=True, memory_budget=budget,
                         selection=TokenSelection(exclude_special=True))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= res.estimated_peak <= budget == res.memory_budget, (peak, res.estimated_peak)
    assert res.a_to_b[1].source.test.accuracy >= 0.75  # a working probe (one token a document with "last")


def test_probe_pair_too_small_a_budget_is_refused_before_any_read(labelled_store, monkeypatch: pytest.MonkeyPatch) -> None:
    from hrsa.analyze.streaming.plan import MemoryBudgetError

    store, _, _ = labelled_store
    reads = []
    original = ActivationStore.hidden_state
    monkeypatch.setattr(ActivationStore, "hidden_state", lambda self, *a, **kw: reads.append(a) or original(self, *a, **kw))
    with pytest.raises(MemoryBudgetError, match=r"400 documents of D=16.*--memory-budget [0-9.]+MB"):
        probe_pair(store, "a", "b", label_field="label", memory_budget="1MB")
    assert reads == []


def test_document_features_by_small_blocks_equal_one_block(labelled_store) -> None:
    store, _, _ = labelled_store
    for pool in ("mean", "last"):
        _, whole = document_features(store, "b", 1, pool=pool)
        _, blocked = document_features(store, "b", 1, pool=pool, block_tokens=37)  # cuts documents and shards
        np.testing.assert_allclose(blocked, whole, rtol=1e-12)
