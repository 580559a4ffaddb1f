"""Presentation from a results.json mapping alone: the figures (PNGs and the report's) and the terminal table.

The mapping is written by hand here, with nulls where a metric was undefined (NaN is written as null), so the
figures are checked against values known in advance rather than against another computation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hrsa.analyze.report.figures import (
    heatmap_figure,
    knn_overlap_figure,
    layer_profile_figure,
    plot_figures,
    probe_figure,
)
from hrsa.analyze.report.summary import summary_table
from hrsa.analyze.results import SCHEMA

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STATES = [0, 1, 2]


def _scores(accuracy: float | None) -> dict[str, Any]:
    split = {"accuracy": accuracy, "macro_f1": accuracy, "n": 40}
    return {"train": split, "dev": split, "test": split}


def results_doc(*, reverse: bool = True) -> dict[str, Any]:
    """A results.json mapping of three matched hidden states, every metric, as read back from the file."""
    probe = {str(k): {"source": _scores(0.9), "target": _scores(0.6 + 0.1 * k), "chance": 0.5 + 0.05 * k,
                      **({"reverse": {"source": _scores(0.8), "target": _scores(0.7)}} if reverse else {})}
             for k in STATES}
    doc = {
        "schema": SCHEMA, "run_id": "r", "a": "base", "b": "tuned", "corpus": "c", "n_tokens": 500,
        "hidden_states_a": STATES, "hidden_states_b": STATES, "matched_hidden_states": STATES,
        "metrics": {
            "cka": {"estimator": "biased", "diagonal": [0.9, None, 0.7], "debiased_diagonal": [0.88, 0.79, 0.69],
                    "matrix": [[0.9, None, 0.5], [0.6, 0.8, 0.4], [0.5, 0.4, 0.7]]},
            "dimcorr": {"diagonal": [0.5, 0.4, 0.3], "n_degenerate": [0, 1, 2], "n_dims": 8,
                        "matrix": [[0.5, 0.1, -0.2], [0.0, 0.4, 0.1], [-0.1, 0.2, 0.3]]},
            "procrustes": {"h_inv": [0.95, 0.9, 0.85], "residual": [0.1, 0.2, 0.3], "similarity": [0.9, 0.8, 0.7],
                           "underdetermined": [False, False, False]},
            "knn": {"k": {"10": [0.6, 0.5, 0.4], "5": [0.7, 0.6, None]}, "hidden_states": STATES, "n_tokens": 200,
                    "seed": 0, "search": "exact"},
            "probe": probe,
        },
        "settings": {"probe": {"label_field": "label", "n_docs": 120, "pool": "mean"}},
    }
    return json.loads(json.dumps(doc))


def without(doc: dict[str, Any], *metrics: str) -> dict[str, Any]:
    return {**doc, "metrics": {k: v for k, v in doc["metrics"].items() if k not in metrics}}


def test_plot_figures_writes_every_figure_the_results_allow(tmp_path: Path) -> None:
    paths = plot_figures(results_doc(), tmp_path / "out")
    assert [p.name for p in paths] == ["cka_cross_layer.png", "dimcorr_cross_layer.png", "layers.png",
                                       "knn_overlap.png", "probe.png"]
    for path in paths:
        assert path.parent == tmp_path / "out" and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5_000
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == sorted(p.name for p in paths)  # no temporary file left behind


@pytest.mark.parametrize(("dropped", "expected"), [
    (("knn", "probe"), ["cka_cross_layer.png", "dimcorr_cross_layer.png", "layers.png"]),
    (("cka", "dimcorr", "procrustes", "probe"), ["knn_overlap.png"]),  # no per-layer metric: no profile
])
def test_plot_figures_draws_only_what_the_results_hold(tmp_path: Path, dropped: tuple[str, ...],
                                                       expected: list[str]) -> None:
    assert [p.name for p in plot_figures(without(results_doc(), *dropped), tmp_path)] == expected


def test_plain_results_draw_the_profile_without_heatmaps(tmp_path: Path) -> None:
    doc = results_doc()
    for metric in ("cka", "dimcorr"):
        del doc["metrics"][metric]["matrix"]
    assert [p.name for p in plot_figures(without(doc, "knn", "probe"), tmp_path)] == ["layers.png"]


def test_null_cells_and_values_are_masked() -> None:
    doc = results_doc()
    image = heatmap_figure(doc, "cka").axes[0].images[0].get_array()  # (3, 3) masked array
    assert image.shape == (3, 3) and image.mask[0, 1] and image.mask.sum() == 1
    assert image[2, 2] == pytest.approx(0.7)
    lines = {line.get_label(): line for line in layer_profile_figure(doc).axes[0].get_lines()}
    assert set(lines) == {"linear CKA", "debiased CKA", "mean dimension-wise r", "Procrustes H_inv"}
    cka = np.asarray(lines["linear CKA"].get_ydata(), dtype=float)
    assert np.isnan(cka[1]) and cka[[0, 2]] == pytest.approx([0.9, 0.7])  # a gap, not a zero
    assert list(lines["linear CKA"].get_xdata()) == STATES


def test_dimcorr_heatmap_is_diverging() -> None:
    image = heatmap_figure(results_doc(), "dimcorr").axes[0].images[0]
    assert image.get_clim() == (-1.0, 1.0) and image.get_cmap().name == "RdBu_r"


def test_knn_overlap_has_a_line_per_k_in_order() -> None:
    ax = knn_overlap_figure(results_doc()).axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["k = 5", "k = 10"]
    assert np.isnan(lines[0].get_ydata()[2]) and ax.get_ylim() == (0.0, 1.02)
    assert "200 sampled tokens, exact" in ax.get_title()


@pytest.mark.parametrize("reverse", [True, False])
def test_probe_bars_per_direction_and_hidden_state(reverse: bool) -> None:
    fig = probe_figure(results_doc(reverse=reverse))
    ax = fig.axes[0]
    names = ["fitted and tested on base", "fitted on base, tested on tuned"]
    if reverse:
        names += ["fitted and tested on tuned", "fitted on tuned, tested on base"]
    handles, labels = ax.get_legend_handles_labels()
    assert labels == ["majority class", *names]
    heights = [[bar.get_height() for bar in container] for container in ax.containers]
    assert heights[1] == pytest.approx([0.6, 0.7, 0.8])  # A's probe on B, per hidden state
    chance = next(line for line in ax.get_lines() if line.get_label() == "majority class")
    assert chance.get_ydata()[0] == pytest.approx(0.6)  # the highest majority-class share
    assert "'label', 120 documents, mean pooling" in ax.get_title()


@pytest.mark.parametrize(("draw", "metric"), [(lambda d: heatmap_figure(d, "cka"), "cka"),
                                              (knn_overlap_figure, "knn"), (probe_figure, "probe")])
def test_a_figure_of_a_missing_metric_is_an_error(draw: Any, metric: str) -> None:
    with pytest.raises(ValueError, match="^Expected"):
        draw(without(results_doc(), metric))


def test_figures_never_touch_pyplot(tmp_path: Path) -> None:
    # A fresh interpreter: pyplot would switch the process's global backend (unsafe in workers and servers).
    doc = tmp_path / "results.json"
    doc.write_text(json.dumps(results_doc()))
    code = ("import json, sys, pathlib; from hrsa.analyze.report.figures import plot_figures; "
            f"plot_figures(json.loads(pathlib.Path({str(doc)!r}).read_text()), pathlib.Path({str(tmp_path)!r})); "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_summary_table_from_the_mapping() -> None:
    table = summary_table(results_doc())
    headers = [c.header for c in table.columns]
    assert headers == ["hidden state", "CKA", "debiased CKA", "dimcorr mean r", "degenerate dims", "H_inv", "residual",
                       "kNN@10", "kNN@5", "probe test acc A / A->B"]
    cells = {c.header: list(c.cells) for c in table.columns}
    assert cells["hidden state"] == ["0", "1", "2"] and table.row_count == 3
    assert cells["CKA"] == ["0.9000", "nan", "0.7000"]  # null (NaN) prints as nan
    assert cells["degenerate dims"] == ["0", "1", "2"] and cells["kNN@5"][2] == "nan"
    assert cells["probe test acc A / A->B"] == ["0.900 / 0.600", "0.900 / 0.700", "0.900 / 0.800"]
    assert table.title == "base vs tuned on 500 tokens"


def test_summary_table_leaves_out_local_metrics_at_other_hidden_states() -> None:
    doc = results_doc()
    doc["metrics"]["knn"]["hidden_states"] = [0, 2]
    doc["metrics"]["probe"] = {k: v for k, v in doc["metrics"]["probe"].items() if k != "1"}
    headers = [c.header for c in summary_table(doc).columns]
    assert not any(h.startswith(("kNN", "probe")) for h in headers) and len(headers) == 7


def test_an_interval_that_leaves_its_estimate_out_draws_no_bar_on_that_side() -> None:
    # A percentile bootstrap interval need not contain its estimate (few documents): the figure must still draw.
    from hrsa.analyze.report.figures import knn_overlap_figure

    doc = {"a": "a", "b": "b", "metrics": {"knn": {"hidden_states": [0, 1], "k": {"5": [0.5, 0.6]}, "n_tokens": 10,
                                                    "search": "exact", "intervals": {"5": [[0.52, 0.7], [0.4, 0.65]]}}}}
    fig = knn_overlap_figure(doc)
    assert len(fig.axes[0].containers) == 1
