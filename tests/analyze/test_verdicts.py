"""Verdicts only where a metric is defined, and warnings that name their real cause.

An identical model whose embedding-like hidden state holds 30 distinct rows has a rank-deficient cross-covariance
even with N >> D: O* is not unique there, its H_inv is arbitrary (it was averaged into the Table 2 verdict and could
flip it), and the warning told the user to "use more tokens than dimensions", which they already had.
"""

from __future__ import annotations

import numpy as np
import pytest

from hrsa.analyze import analyze_pair
from hrsa.analyze.metrics import UnderdeterminedWarning
from hrsa.analyze.report.summary import summarize
from hrsa.analyze.results import save_results
from hrsa.store import ActivationStore
from hrsa.store.testing import make_table

D = 64


def _identical_pair(path: str, distinct_rows_at_0: int, n_tokens: int = 1000) -> ActivationStore:
    store = ActivationStore.open(path, mode="a")
    cid = store.write_corpus(make_table((n_tokens // 2, n_tokens - n_tokens // 2)), tokenizer={"name": "t", "fingerprint": "f"})
    rng = np.random.default_rng(0)
    few = rng.standard_normal((distinct_rows_at_0, D)).astype(np.float32)
    states = {0: few[np.arange(n_tokens) % distinct_rows_at_0], 1: rng.standard_normal((n_tokens, D)).astype(np.float32)}
    for mid in ("a", "b"):
        store.create_model(mid, corpus=cid, n_hidden_states=2, hidden_size=D, dtype="float32", shard_tokens=256)
        writer = store.writer(mid)
        for unit in writer.units():
            writer.write_unit(unit, {k: v[unit.start : unit.stop] for k, v in states.items()})
    return store


# auto: float64 products for the matched tiles of Procrustes; float32 asked for: the rank test resolves no finer than
# float32's epsilon (its rounding fills C_xy's null space)
@pytest.mark.parametrize("compute_dtype", ["float64", "auto", "float32"])
def test_h_inv_verdict_leaves_out_hidden_states_where_the_rotation_is_not_unique(tmp_path, compute_dtype: str) -> None:
    store = _identical_pair(str(tmp_path / "store"), distinct_rows_at_0=30)
    with pytest.warns(UnderdeterminedWarning, match=r"hidden states \[0\].*rank deficient although 1000 tokens exceed D = 64"):
        results = analyze_pair(store, "a", "b", metrics=["procrustes"], backend="numpy", compute_dtype=compute_dtype)
    assert [p.underdetermined for p in results.procrustes] == [True, False]
    assert results.procrustes[0].h_inv < 0.9 and results.procrustes[1].h_inv == pytest.approx(1.0, abs=1e-9)
    doc = save_results(results, tmp_path / "out").doc
    (check,) = [c for lv in summarize(doc).levels for c in lv.checks if c.metric == "Procrustes H_inv"]
    assert check.value == pytest.approx(1.0, abs=1e-9) and check.passed  # the identical pair is preserved
    assert "mean of 1 hidden states" in check.detail and "left out 1 where O* is not unique ([0])" in check.detail


def test_the_warning_says_too_few_tokens_only_when_there_are(tmp_path) -> None:
    store = _identical_pair(str(tmp_path / "store"), distinct_rows_at_0=30, n_tokens=48)
    with pytest.warns(UnderdeterminedWarning, match=r"hidden states \[0, 1\].*48 tokens are no more than D = 64"):
        analyze_pair(store, "a", "b", metrics=["procrustes"], backend="numpy")


def test_a_mean_names_the_hidden_states_where_its_metric_is_undefined() -> None:
    """The README promises undefined hidden states are "left out and named": a null CKA vanished from "mean of 2"."""
    doc = {"a": "a", "b": "b", "matched_hidden_states": [0, 1, 2, 3],
           "metrics": {"cka": {"diagonal": [0.5, 0.95, None, 0.93]},
                       "dimcorr": {"diagonal": [0.9, None, 0.85, None], "n_degenerate": [0, 0, 0, 0]}}}
    checks = {c.metric: c for lv in summarize(doc).levels for c in lv.checks}
    cka = checks["linear CKA"]
    assert cka.value == pytest.approx(0.94) and "mean of 2 hidden states" in cka.detail
    assert "left out 1 where undefined ([2])" in cka.detail and "embedding output (hidden state 0) left out" in cka.detail
    assert "left out 2 where undefined ([1, 3])" in checks["mean dimension-wise correlation"].detail
    defined = {**doc, "metrics": {"cka": {"diagonal": [0.5, 0.95, 0.9, 0.93]}}}
    assert "undefined" not in next(c for lv in summarize(defined).levels for c in lv.checks).detail
