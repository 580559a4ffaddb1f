"""The measures beyond the paper's (--metrics procrustes_distance,cca,svcca,pwcca,regression,effective_rank) through
analyze_pair, results.json and the tables: streamed from the store, they equal the metrics on the stored arrays."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from hrsa.analyze.metrics import cca, effective_rank, procrustes_distance, pwcca, svcca
from hrsa.analyze.pair.analysis import analyze_pair
from hrsa.analyze.results import save_results

MORE = ["procrustes_distance", "cca", "svcca", "pwcca", "regression", "effective_rank"]


def _r2(x: np.ndarray, y: np.ndarray) -> float:
    """R^2 of y from x by least squares on the centred arrays (numpy's lstsq, not hrsa's moments)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    coef, *_ = np.linalg.lstsq(xc, yc, rcond=None)
    return 1.0 - float(np.sum((yc - xc @ coef) ** 2) / np.sum(yc**2))


def test_streamed_measures_equal_the_metrics_on_the_stored_arrays(pair_store) -> None:
    res = analyze_pair(pair_store.open(), "a", "b", metrics=MORE, groups=10, memory_budget="64MB", block_tokens=128)
    for i, k in enumerate(res.matched):
        x, y = pair_store.x[k], pair_store.y[k]
        assert res.cca[i].r2_cca == pytest.approx(cca(x, y).r2_cca, rel=1e-9)
        assert res.svcca[i].value == pytest.approx(svcca(x, y).value, rel=1e-9)
        assert res.pwcca[i].value == pytest.approx(pwcca(x, y).value, rel=1e-9)
        assert res.procrustes_distance[i].distance == pytest.approx(procrustes_distance(x, y).distance, rel=1e-9)
        assert res.effective_rank[i].effective_rank_x == pytest.approx(effective_rank(x, y).effective_rank_x, rel=1e-9)
        assert res.regression[i].r2_y_from_x == pytest.approx(_r2(x, y), rel=1e-9)
        assert res.regression[i].r2_x_from_y == pytest.approx(_r2(y, x), rel=1e-9)
    for name in ("cca/r2", "svcca/value", "pwcca/value", "regression/r2_b_from_a", "effective_rank/a",
                 "procrustes_distance/distance"):
        assert len(res.intervals[name]) == len(res.matched), name


def test_cross_layer_runs_the_matched_pass_for_them(pair_store) -> None:
    res = analyze_pair(pair_store.open(), "a", "b", metrics=["cka", "cca"], cross_layer=True, memory_budget="64MB")
    assert res.cka_matrix is not None and res.cca is not None and len(res.cca) == len(res.matched)


def test_results_json_and_the_table_show_them(pair_store, tmp_path) -> None:
    from rich.console import Console

    from hrsa.analyze.report.summary import summary_table

    res = analyze_pair(pair_store.open(), "a", "b", metrics=["cka", *MORE], memory_budget="64MB")
    doc = json.loads(save_results(res, tmp_path / "out").json_path.read_text())
    m = doc["metrics"]
    assert set(m) == {"cka", *MORE}
    assert m["regression"]["r2_b_from_a"] == [r.r2_y_from_x for r in res.regression]
    assert len(m["cca"]["intervals"]["r2"]) == len(res.matched) and m["svcca"]["variance_kept"] == 0.99
    console = Console(file=io.StringIO(), width=400, record=True)
    console.print(summary_table(doc))
    header = console.export_text()
    for label in ("CCA R²", "SVCCA", "PWCCA", "R² of B from A", "effective rank of A", "Procrustes distance"):
        assert label in header
