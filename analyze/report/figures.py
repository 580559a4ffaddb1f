"""Figures of one comparison: cross-layer heatmaps (as the paper's Figure 3) and per-layer profiles.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global backend change),
so it is safe in workers, tests and headless servers.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from matplotlib.figure import Figure

    from hrsa.analyze.report.dynamics import Dynamics
    from hrsa.analyze.pair import PairResults

__all__ = [
    "dynamics_figure",
    "heatmap_figure",
    "lines_figure",
    "plot_dynamics",
    "plot_figures",
    "plot_heatmap",
    "plot_knn_overlap",
    "plot_layer_profile",
    "plot_probe",
    "probe_figure",
]


def plot_figures(results: PairResults, out_dir: Path) -> list[Path]:
    """Every figure the results allow: ``cka_cross_layer.png``, ``dimcorr_cross_layer.png``, ``layers.png``,
    ``knn_overlap.png`` and ``probe.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if results.cka_matrix is not None:
        paths.append(plot_heatmap(results, "cka", out_dir / "cka_cross_layer.png"))
    if results.dimcorr_matrix is not None:
        paths.append(plot_heatmap(results, "dimcorr", out_dir / "dimcorr_cross_layer.png"))
    if results.matched and (results.cka or results.dimcorr or results.procrustes):
        paths.append(plot_layer_profile(results, out_dir / "layers.png"))
    if results.knn is not None:
        paths.append(plot_knn_overlap(results, out_dir / "knn_overlap.png"))
    if results.probe is not None:
        paths.append(plot_probe(results, out_dir / "probe.png"))
    return paths


def plot_heatmap(results: PairResults, metric: str, path: Path) -> Path:
    """Heatmap of a cross-layer matrix: rows are A's hidden states, columns B's, with a colorbar.

    Args:
        results: results with ``cka_matrix`` or ``dimcorr_matrix``.
        metric: ``"cka"`` (scale 0..1) or ``"dimcorr"`` (scale -1..1, diverging).
        path: the PNG to write.
    """
    from matplotlib.figure import Figure

    matrix = results.cka_matrix if metric == "cka" else results.dimcorr_matrix
    if matrix is None:
        raise ValueError(f"Expected a {metric} cross-layer matrix in the results. Got none (run with cross_layer=True).")
    label, cmap, (lo, hi) = ("linear CKA", "viridis", (0.0, 1.0)) if metric == "cka" else ("mean dimension-wise r", "RdBu_r", (-1.0, 1.0))
    fig = Figure(figsize=(7.0, 6.0), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), origin="lower", cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
    _index_ticks(ax, results.hidden_states_b, axis="x")
    _index_ticks(ax, results.hidden_states_a, axis="y")
    ax.set_xlabel(f"hidden state of B = {results.b}")
    ax.set_ylabel(f"hidden state of A = {results.a}")
    ax.set_title(f"{label}: {results.a} vs {results.b}\n{results.n_tokens} tokens, cross-layer", fontsize=10)
    fig.colorbar(image, ax=ax, label=label)
    fig.savefig(path, dpi=120)
    return path


def plot_layer_profile(results: PairResults, path: Path) -> Path:
    """Per matched hidden state: CKA, mean dimension-wise r and Procrustes H_inv, as lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    k = np.asarray(results.matched)
    series = {
        "linear CKA": [c.value for c in results.cka or ()],
        "debiased CKA": [c.value for c in results.cka_debiased or ()],
        "mean dimension-wise r": [d.mean for d in results.dimcorr or ()],
        "Procrustes H_inv": [p.h_inv for p in results.procrustes or ()],
    }
    lines = {name: (k, values) for name, values in series.items() if values}
    title = f"{results.a} vs {results.b}, matched hidden states ({results.n_tokens} tokens)"
    return _save_lines(fig, ax, lines, ylabel="similarity", title=title, path=path)


def plot_knn_overlap(results: PairResults, path: Path) -> Path:
    """Mean k-NN Jaccard overlap per hidden state, one line per k (the paper's Figure 4, left)."""
    from matplotlib.figure import Figure

    if results.knn is None:
        raise ValueError("Expected k-NN results. Got none (run with the knn metric).")
    knn = results.knn
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.set_ylim(0.0, 1.0)
    lines = {f"k = {k}": (knn.hidden_states, [v.mean for v in values]) for k, values in knn.overlap.items()}
    title = f"k-NN overlap: {results.a} vs {results.b} ({knn.n_tokens} sampled tokens, {knn.search})"
    return _save_lines(fig, ax, lines, ylabel="mean Jaccard of k-NN sets", title=title, path=path)


def _save_lines(fig: Any, ax: Any, lines: Mapping[str, tuple[Sequence[int], Sequence[float]]], *, ylabel: str,
                title: str, path: Path) -> Path:
    """One line per series against the hidden-state index, labelled, saved as PNG."""
    for name, (xs, ys) in lines.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=3, label=name)
    ax.set_xlabel("hidden state (0 = embedding output)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def plot_probe(results: PairResults, path: Path) -> Path:
    """Test accuracy of the probe per hidden state: on the source model and transferred to the target, as bars."""
    from matplotlib.figure import Figure

    if results.probe is None:
        raise ValueError("Expected probe results. Got none (run with the probe metric).")
    probe = results.probe
    states = list(probe.a_to_b)
    pos = np.arange(len(states))
    bars = {f"fitted and tested on {results.a}": [r.source.test.accuracy for r in probe.a_to_b.values()],
            f"fitted on {results.a}, tested on {results.b}": [r.target.test.accuracy for r in probe.a_to_b.values()]}
    if probe.b_to_a:
        bars[f"fitted and tested on {results.b}"] = [probe.b_to_a[k].source.test.accuracy for k in states]
        bars[f"fitted on {results.b}, tested on {results.a}"] = [probe.b_to_a[k].target.test.accuracy for k in states]
    width = 0.8 / len(bars)
    fig = Figure(figsize=(max(6.0, 0.5 * len(states) * len(bars)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, values) in enumerate(bars.items()):
        ax.bar(pos + (i - (len(bars) - 1) / 2) * width, values, width, label=name)
    ax.axhline(max(r.chance for r in probe.a_to_b.values()), color="grey", linestyle="--", linewidth=1, label="majority class")
    ax.set_xticks(pos, [str(k) for k in states])
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("hidden state")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"linear probe on {probe.label_field!r} ({probe.n_docs} documents, {probe.pool} pooling)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=120)
    return path


def _index_ticks(ax: Axes, states: tuple[int, ...], *, axis: str) -> None:
    """Label positions with hidden-state indices; about 15 ticks at most, so 29 states stay legible."""
    step = max(1, -(-len(states) // 15))
    positions = list(range(0, len(states), step))
    labels = [str(states[i]) for i in positions]
    if axis == "x":
        ax.set_xticks(positions, labels)
    else:
        ax.set_yticks(positions, labels)


# --- figures from arrays (results.json as read back), for the report --------------------------------------


def heatmap_figure(matrix: Any, rows: Sequence[int], cols: Sequence[int], *, metric: str, a: str, b: str,
                   subtitle: str = "") -> Figure:
    """As :func:`plot_heatmap`, from a (len(rows), len(cols)) matrix (None or NaN cells left blank).

    Args:
        matrix: rows are A's hidden states ``rows``, columns B's ``cols``.
        metric: ``"cka"`` (scale 0..1) or ``"dimcorr"`` (scale -1..1, diverging).
        a, b: model ids, for the labels; subtitle: a second title line.
    """
    from matplotlib.figure import Figure

    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=np.float64)  # (I, J)
    label, cmap, (lo, hi) = ("linear CKA", "viridis", (0.0, 1.0)) if metric == "cka" else ("mean dimension-wise r", "RdBu_r", (-1.0, 1.0))
    fig = Figure(figsize=(5.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), origin="lower", cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
    _index_ticks(ax, tuple(cols), axis="x")
    _index_ticks(ax, tuple(rows), axis="y")
    ax.set_xlabel(f"hidden state of B = {b}")
    ax.set_ylabel(f"hidden state of A = {a}")
    ax.set_title(f"{label}, cross-layer" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    fig.colorbar(image, ax=ax, label=label)
    return fig


def lines_figure(lines: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str, title: str,
                 ylim: tuple[float, float] | None = None) -> Figure:
    """One line per series ``{name: (xs, ys)}`` (None or NaN values leave gaps), labelled."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for name, (xs, ys) in lines.items():
        ax.plot(list(xs), [np.nan if y is None else y for y in ys], marker="o", markersize=3, label=name)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # hidden states and steps are whole numbers
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def probe_figure(states: Sequence[int], bars: Mapping[str, Sequence[float]], *, chance: float, title: str) -> Figure:
    """Grouped bars of probe test accuracy per hidden state (the paper's Figure 4), with the majority-class line."""
    from matplotlib.figure import Figure

    pos = np.arange(len(states))
    width = 0.8 / max(1, len(bars))
    fig = Figure(figsize=(max(6.4, 0.45 * len(states) * len(bars)), 4.4), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, values) in enumerate(bars.items()):
        ax.bar(pos + (i - (len(bars) - 1) / 2) * width, [np.nan if v is None else v for v in values], width, label=name)
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="majority class")
    step = max(1, -(-len(states) // 15))
    ax.set_xticks(pos[::step], [str(k) for k in states][::step])
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("hidden state")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncols=2)  # below: bars reach 1
    return fig


def dynamics_figure(dynamics: Dynamics) -> Figure:
    """The paper's Figure 5: CKA, mean dimension-wise r and k-NN overlap against the training step.

    One panel per metric: the mean over matched hidden states as a thick line, each hidden state as a thin line
    coloured by depth (CKA and dimension-wise r); one line per k for k-NN overlap.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [(c.label, {c.label: c}) for c in (dynamics.cka, dynamics.dimcorr) if c is not None]
    if dynamics.knn:
        panels.append(("k-NN overlap", {f"k = {k}": c for k, c in dynamics.knn.items()}))
    fig = Figure(figsize=(4.2 * max(1, len(panels)), 3.8), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    steps = list(dynamics.steps)
    for ax, (label, curves) in zip(axes, panels):
        if len(curves) == 1:  # one metric: show its hidden states too
            curve = next(iter(curves.values()))
            cmap = colormaps["viridis"]
            for i, (k, values) in enumerate(curve.layers.items()):
                ax.plot(steps, values, color=cmap(i / max(1, len(curve.layers) - 1)), linewidth=0.8, alpha=0.6,
                        label=f"hidden state {k}" if i in (0, len(curve.layers) - 1) else None)
            ax.plot(steps, curve.mean, color="black", linewidth=2.2, marker="o", markersize=4, label="mean over hidden states")
        else:
            for name, curve in curves.items():
                ax.plot(steps, curve.mean, linewidth=2.0, marker="o", markersize=4, label=name)
        if len(steps) <= 12:
            ax.set_xticks(steps)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"training dynamics: {dynamics.runs[0]} vs {dynamics.runs[1]}", fontsize=11)
    return fig


def plot_dynamics(dynamics: Dynamics, path: Path) -> Path:
    """Write :func:`dynamics_figure` as a PNG at ``path``."""
    dynamics_figure(dynamics).savefig(path, dpi=120)
    return path
