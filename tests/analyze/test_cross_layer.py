"""Cross-layer matrices: against the oracle, tiled under a tiny budget == untiled, diagonal == matched layers."""

from __future__ import annotations

import numpy as np
import pytest

from hrsa.analyze.pair import analyze_pair

CROSS = ("cka", "dimcorr")


def test_cross_layer_matrices_match_the_oracle(pair_store, oracle) -> None:
    res = analyze_pair(pair_store.open(), "a", "b", metrics=CROSS, cross_layer=True, backend="numpy")
    assert res.cka_matrix.shape == res.dimcorr_matrix.shape == (4, 4)
    assert res.hidden_states_a == res.hidden_states_b == (0, 1, 2, 3)
    for i in res.hidden_states_a:
        for j in res.hidden_states_b:
            x, y = pair_store.x[i], pair_store.y[j]
            assert res.cka_matrix[i, j] == pytest.approx(oracle.cka(x, y), abs=1e-6), (i, j)
            assert res.dimcorr_matrix[i, j] == pytest.approx(np.nanmean(oracle.dimcorr(x, y)), abs=1e-6), (i, j)
    # Without Procrustes or debiased CKA there is no matched pass: the diagonal comes from the matrices.
    assert res.plan.count("matched") == 0
    np.testing.assert_allclose([c.value for c in res.cka], np.diag(res.cka_matrix), rtol=0, atol=1e-15)
    np.testing.assert_allclose([d.mean for d in res.dimcorr], np.diag(res.dimcorr_matrix), rtol=0, atol=1e-15)


def test_a_tiny_budget_tiles_the_matrix_and_changes_nothing(pair_store) -> None:
    store = pair_store.open()
    whole = analyze_pair(store, "a", "b", metrics=CROSS, cross_layer=True, backend="numpy", compute_dtype="float64")
    # One pass: every state's self co-moments ride along in the cross tile, which reads every state anyway.
    assert whole.plan.passes == whole.plan.count("cross") == 1 and whole.plan.count("self") == 0
    # One D=16 C_xy is 2 kB, a 128-token block of a state ~41 kB and the reader's one cached shard ~18 kB a state:
    # this budget holds 2 x 2 pairs per tile.
    tiled = analyze_pair(store, "a", "b", metrics=CROSS, cross_layer=True, backend="numpy", memory_budget="300kB",
                         block_tokens=128, workers=1, compute_dtype="float64")
    assert tiled.plan.count("cross") >= 3 and tiled.plan.estimated_peak <= 300_000
    selfs = [p for t in tiled.plan.tiles for p in t.pairs if p[0] == p[1]]  # in cross tiles or tiles of their own
    assert sorted(selfs) == sorted((k, k) for k in [*(("a", i) for i in range(4)), *(("b", j) for j in range(4))])
    assert any(t.kind == "cross" and t.selfs for t in tiled.plan.tiles)
    np.testing.assert_allclose(tiled.cka_matrix, whole.cka_matrix, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(tiled.dimcorr_matrix, whole.dimcorr_matrix, rtol=1e-10, atol=1e-13)


def test_matched_pass_and_matrix_diagonal_agree(pair_store) -> None:
    res = analyze_pair(pair_store.open(), "a", "b", cross_layer=True, debiased=True, backend="numpy", compute_dtype="float64")
    assert res.plan.count("matched") == 1  # Procrustes and debiased CKA need the full Moments
    np.testing.assert_allclose([c.value for c in res.cka], np.diag(res.cka_matrix), rtol=1e-10)
    np.testing.assert_allclose([d.mean for d in res.dimcorr], np.diag(res.dimcorr_matrix), rtol=1e-10)
    assert len(res.procrustes) == len(res.cka_debiased) == 4


def test_models_of_different_widths_compare_by_cka(make_pair_store, store_model, oracle) -> None:
    ps = make_pair_store()
    store = ps.open("r+")
    cid = store.model_info("a").corpus
    rng = np.random.default_rng(3)
    narrow = store_model(store, "c", cid, {k: ps.x[k][:, ::2] @ rng.normal(size=(8, 8)) for k in (1, 2)})  # D = 8
    res = analyze_pair(store, "a", "c", metrics=("cka",), cross_layer=True, backend="numpy")
    assert res.matched == (1, 2) and res.hidden_states_a == (0, 1, 2, 3) and res.hidden_states_b == (1, 2)
    for r, i in enumerate(res.hidden_states_a):
        for c, j in enumerate(res.hidden_states_b):
            assert res.cka_matrix[r, c] == pytest.approx(oracle.cka(ps.x[i], narrow[j]), abs=1e-6)
