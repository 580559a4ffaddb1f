"""k-NN overlap's chance level: unrelated models are not at 0, and at a large k / n far from it (k = 10 of 15 sampled
tokens: 0.56). The report counted such pairs as "geometry preserved" at its 0.5 threshold, without a word."""

from __future__ import annotations

import numpy as np
import pytest

from hrsa.analyze.local.knn import KnnChanceWarning, knn_pair
from hrsa.analyze.metrics.knn_overlap import chance_overlap
from hrsa.analyze.report.summary import Thresholds, summarize


@pytest.mark.parametrize(("k", "n"), [(1, 3), (5, 20), (10, 15), (3, 100), (9, 11)])
def test_chance_overlap_equals_a_simulation_of_independent_draws(k: int, n: int) -> None:
    """Oracle: draw each side's k neighbours of one token uniformly from the n - 1 others, many times."""
    rng = np.random.default_rng(k * 1000 + n)
    draws = 40_000
    a = np.argsort(rng.random((draws, n - 1)), axis=1)[:, :k]
    b = np.argsort(rng.random((draws, n - 1)), axis=1)[:, :k]
    common = np.array([np.intersect1d(x, y).size for x, y in zip(a, b)])
    j = common / (2 * k - common)
    assert abs(chance_overlap(k, n) - j.mean()) < 4 * j.std() / np.sqrt(draws) + 1e-12


def test_every_other_token_as_neighbour_is_an_overlap_of_one() -> None:
    assert chance_overlap(9, 10) == 1.0 and chance_overlap(10, 100_001) == pytest.approx(10 * 10 / (19 * 100_000), rel=1e-3)  # E[m] = k^2 / (n - 1), J = m / (2k - m)


def test_a_small_sample_warns_and_records_its_chance(pair_store) -> None:
    with pytest.warns(KnnChanceWarning, match=r"^k-NN overlap: on 15 sampled tokens, unrelated models would overlap "
                                              r"0\.099 at k = 2, 0\.562 at k = 10 by chance alone .*Sample more tokens \(--knn-sample\)"):
        res = knn_pair(pair_store.open(), "a", "b", ks=(2, 10), n_sample=15, hidden_states=[1])
    assert res.chance == {2: pytest.approx(chance_overlap(2, 15)), 10: pytest.approx(0.5616, abs=1e-4)}


def _doc(overlap: float, n_tokens: int, k: int = 10, chance: bool = True) -> dict:
    knn = {"k": {str(k): [overlap, overlap]}, "hidden_states": [1, 2], "n_tokens": n_tokens}
    if chance:
        knn["chance"] = {str(k): chance_overlap(k, n_tokens)}
    return {"a": "x", "b": "y", "matched_hidden_states": [1, 2], "metrics": {"knn": knn}}


@pytest.mark.parametrize("recorded", [True, False])  # records of an earlier hrsa hold no chance: from n_tokens
def test_the_verdict_takes_chance_out(recorded: bool) -> None:
    unrelated = summarize(_doc(0.57, 15, chance=recorded))
    check = unrelated.levels[1].checks[0]
    assert unrelated.verdict("geometry") == "restructured" and not check.passed
    assert check.threshold == pytest.approx(0.5616 + 0.5 * (1 - 0.5616), abs=1e-4)
    assert "0.562 by chance alone on 15 sampled tokens" in check.detail
    assert summarize(_doc(0.99, 15, chance=recorded)).verdict("geometry") == "preserved"
    big = summarize(_doc(0.6, 50_000, chance=recorded)).levels[1].checks[0]  # chance 1e-4: the threshold as set
    assert big.passed and big.threshold == pytest.approx(0.5, abs=1e-4) and "chance" not in big.detail


def test_k_of_every_other_token_is_not_measured() -> None:
    assert summarize(_doc(1.0, 11), thresholds=Thresholds()).verdict("geometry") == "not measured"


def _tie_store(tmp_path, x, y):
    from hrsa.store import ActivationStore
    from hrsa.store.testing import make_table
    from tests.analyze.conftest import write_model

    store = ActivationStore.open(str(tmp_path / "store"), mode="a")
    table = make_table((20,) * (len(x) // 20))
    cid = store.write_corpus(table, tokenizer={"name": "tok", "fingerprint": "fp"})
    for mid, values in (("a", x), ("b", y)):
        write_model(store, mid, cid, {0: values.astype(np.float32)})
    return store


def test_ties_across_the_kth_place_in_both_models_are_counted_and_warned(tmp_path) -> None:
    """Two constant hidden states scored a perfect 1.0 k-NN overlap (every cosine ties, the shared tie rule picks the
    same neighbours in both) while CKA and dimcorr said degenerate; now the share of such tokens is recorded and warned.
    Oracle: with every row equal, every token ties at every place."""
    from hrsa.analyze.local.knn import KnnTiesWarning

    rng = np.random.default_rng(3)
    constant = np.ones((200, 8))
    store = _tie_store(tmp_path, constant, 3 * constant)
    with pytest.warns(KnnTiesWarning, match=r"^k-NN overlap: at hidden states \[0\], more than 5% of the sampled tokens "
                                            r"have neighbours tied across the k-th place in both models \(100% at"):
        res = knn_pair(store, "a", "b", ks=(5,), n_sample=None)
    assert res.overlap[5][0].mean == 1.0 and res.ties == {5: (1.0,)}
    # Distinct rows: no ties, no warning.
    store = _tie_store(tmp_path / "distinct", rng.normal(size=(200, 8)), rng.normal(size=(200, 8)))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert knn_pair(store, "a", "b", ks=(5,), n_sample=None).ties == {5: (0.0,)}
