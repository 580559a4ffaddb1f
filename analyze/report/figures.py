"""Figures of one comparison, drawn once, from its ``results.json`` mapping (and of training dynamics).

One function per figure, each taking the results document (as :func:`hrsa.analyze.results.read_results` returns
it, or ``SavedResults.doc``) and returning a matplotlib :class:`~matplotlib.figure.Figure`:

- :func:`heatmap_figure`: a cross-layer matrix, rows A's hidden states, columns B's (the paper's Figure 3);
- :func:`layer_profile_figure`: CKA, dimension-wise r and Procrustes H_inv per matched hidden state;
- :func:`knn_overlap_figure`: mean k-NN Jaccard overlap per hidden state, one line per k (Figure 4, left);
- :func:`probe_figure`: probe test accuracy per hidden state, per direction, as bars (Figure 4);
- :func:`dynamics_figure`: the metrics of one series against the training step (Figure 5), from a :class:`Dynamics`;
- :func:`dynamics_comparison_figure`: several series on one plot, one line each per metric (Figure 5 compares runs).

:func:`plot_figures` writes the PNGs beside results.json; the HTML report embeds the same figures. NaN is
written as null in results.json: null values are blank cells and gaps in lines. Drawn with matplotlib's object
API on the Agg canvas (no pyplot, no display, no global backend change), so it is safe in workers, tests and
headless servers.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hrsa.analyze.report.summary import KNN_K, ScoreUncertainty, floats, knn_k, probe_directions, score_uncertainty
from hrsa.runtime.files import write_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from hrsa.analyze.report.dynamics import Dynamics

__all__ = [
    "dynamics_comparison_figure",
    "dynamics_figure",
    "FIGURE_NAMES",
    "heatmap_figure",
    "knn_overlap_figure",
    "layer_profile_figure",
    "plot_dynamics",
    "plot_dynamics_comparison",
    "plot_figures",
    "png_bytes",
    "probe_figure",
]

FIGURE_NAMES = ("cka_cross_layer.png", "dimcorr_cross_layer.png", "layers.png", "knn_overlap.png", "probe.png")
PNG_DPI = 120  # the PNGs beside results.json; the HTML report embeds at its own resolution
_HIDDEN_STATE = "hidden state (0 = embedding output)"


def plot_figures(doc: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write every figure the results allow into ``out_dir`` (created): ``cka_cross_layer.png``,
    ``dimcorr_cross_layer.png`` (with cross-layer matrices), ``layers.png``, ``knn_overlap.png`` and ``probe.png``.

    Args:
        doc: a results.json mapping.
        out_dir: the folder for the PNGs (beside results.json).

    Returns:
        The PNGs written, in the order above.
    """
    metrics = doc["metrics"]
    figures: dict[str, Figure] = {}
    for metric in ("cka", "dimcorr"):
        if "matrix" in metrics.get(metric, {}):
            figures[f"{metric}_cross_layer.png"] = heatmap_figure(doc, metric)
    if (profile := layer_profile_figure(doc)) is not None:
        figures["layers.png"] = profile
    if "knn" in metrics:
        figures["knn_overlap.png"] = knn_overlap_figure(doc)
    if "probe" in metrics:
        figures["probe.png"] = probe_figure(doc)
    return [write_atomic(Path(out_dir) / name, png_bytes(fig, dpi=PNG_DPI)) for name, fig in figures.items()]


def png_bytes(fig: Figure, *, dpi: int) -> bytes:
    """``fig`` encoded as PNG (the one encoder of the PNG files and of the report's embedded images)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def heatmap_figure(doc: Mapping[str, Any], metric: str) -> Figure:
    """Heatmap of a cross-layer matrix: rows are A's hidden states, columns B's, with a colorbar.

    Args:
        doc: a results.json mapping with ``metrics.<metric>.matrix``.
        metric: ``"cka"`` (scale 0..1) or ``"dimcorr"`` (mean r, scale -1..1, diverging).

    Raises:
        ValueError: the results hold no such matrix.
    """
    from matplotlib.figure import Figure

    matrix = doc["metrics"].get(metric, {}).get("matrix")
    if matrix is None:
        raise ValueError(f"Expected a {metric} cross-layer matrix in the results. Got none (run with cross_layer=True).")
    values = np.array([floats(row) for row in matrix], dtype=np.float64)  # (I, J), null -> NaN
    if metric == "cka":
        label, cmap, (lo, hi) = "linear CKA", "viridis", (0.0, 1.0)
    else:  # a correlation: diverging around 0
        label, cmap, (lo, hi) = "mean dimension-wise r", "RdBu_r", (-1.0, 1.0)
    a, b = _pair(doc)
    fig = Figure(figsize=(7.0, 6.0), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), origin="lower", cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
    _index_ticks(ax, doc["hidden_states_b"], axis="x")
    _index_ticks(ax, doc["hidden_states_a"], axis="y")
    ax.set_xlabel(f"hidden state of B = {b}")
    ax.set_ylabel(f"hidden state of A = {a}")
    ax.set_title(f"{label}: {a} vs {b}\n{doc.get('n_tokens')} tokens, cross-layer", fontsize=10)
    fig.colorbar(image, ax=ax, label=label)
    return fig


def layer_profile_figure(doc: Mapping[str, Any]) -> Figure | None:
    """Per matched hidden state: linear (and debiased) CKA, mean dimension-wise r and Procrustes H_inv, as lines.

    Returns:
        The figure, or None when the results hold none of these metrics (or no matched hidden state).
    """
    m, states = doc["metrics"], doc["matched_hidden_states"]
    keys = {"linear CKA": ("cka", "diagonal"), "debiased CKA": ("cka", "debiased_diagonal"),
            "mean dimension-wise r": ("dimcorr", "diagonal"), "Procrustes H_inv": ("procrustes", "h_inv")}
    lines = {name: (states, m[metric][key]) for name, (metric, key) in keys.items() if m.get(metric, {}).get(key)}
    if not states or not lines:
        return None
    a, b = _pair(doc)
    title = f"{a} vs {b}, matched hidden states ({doc.get('n_tokens')} tokens)"
    fig = _lines_figure(lines, ylabel="similarity", title=title,
                        errors={name: score_uncertainty(doc, *keys[name]) for name in lines})
    unc = doc.get("uncertainty") or {}
    if unc.get("method"):
        ax = fig.axes[0]
        ax.set_title(f"{title}\nbars: {unc['level']:.0%} jackknife intervals over {unc['groups']} groups of documents; "
                     "dotted: what shuffled tokens reach", fontsize=9)
    return fig


def knn_overlap_figure(doc: Mapping[str, Any]) -> Figure:
    """Mean k-NN Jaccard overlap per hidden state, one line per k (the paper's Figure 4, left).

    Raises:
        ValueError: the results hold no k-NN overlap.
    """
    knn = doc["metrics"].get("knn")
    if knn is None:
        raise ValueError("Expected k-NN results. Got none (run with the knn metric).")
    states = knn.get("hidden_states", [])
    lines = {f"k = {k}": (states, knn["k"][k]) for k in sorted(knn.get("k", {}), key=int)}
    ends = knn.get("intervals") or {}
    errors = {f"k = {k}": ScoreUncertainty([(floats([lo])[0], floats([hi])[0]) for lo, hi in ends[k]], None, None)
              for k in ends}
    a, b = _pair(doc)
    title = f"k-NN overlap: {a} vs {b} ({knn.get('n_tokens')} sampled tokens, {knn.get('search')})"
    # up to 1.02: an overlap of exactly 1 (a copy) stays visible above the frame
    return _lines_figure(lines, ylabel="mean Jaccard of k-NN sets", title=title, ylim=(0.0, 1.02), errors=errors)


def probe_figure(doc: Mapping[str, Any]) -> Figure:
    """Test accuracy of the probes per hidden state, one bar per direction (fitted on X, tested on Y), with the
    majority-class line (the paper's Figure 4).

    Raises:
        ValueError: the results hold no probes.
    """
    from matplotlib.figure import Figure

    probe = doc["metrics"].get("probe")
    if not probe:
        raise ValueError("Expected probe results. Got none (run with the probe metric).")
    a, b = _pair(doc)
    states = sorted(probe, key=int)
    bars = {d.label: floats([d.scores(probe[k])["test"]["accuracy"] for k in states]) for d in probe_directions(probe, a, b)}
    pos = np.arange(len(states))
    width = 0.8 / len(bars)
    fig = Figure(figsize=(max(6.4, 0.45 * len(states) * len(bars)), 4.4), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, values) in enumerate(bars.items()):
        ax.bar(pos + (i - (len(bars) - 1) / 2) * width, values, width, label=name)
    chance = max(float(probe[k].get("chance") or 0.0) for k in states)
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="majority class")
    step = max(1, -(-len(states) // 15))  # about 15 labels at most
    ax.set_xticks(pos[::step], states[::step])
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("hidden state")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"cross-model linear probes: {a} vs {b}" + _probe_setting(doc), fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncols=2)  # below: bars reach 1
    return fig


def _probe_setting(doc: Mapping[str, Any]) -> str:
    """A second title line: label, documents and pooling, as the run's settings record them."""
    p = doc.get("settings", {}).get("probe")
    if not p:
        return ""
    return f"\nlabel {p.get('label_field')!r}, {p.get('n_docs')} documents, {p.get('pool')} pooling"


def _lines_figure(lines: Mapping[str, tuple[Sequence[int], Sequence[Any]]], *, ylabel: str, title: str,
                  ylim: tuple[float, float] | None = None, errors: Mapping[str, ScoreUncertainty] | None = None) -> Figure:
    """One line per series ``{name: (hidden states, values)}`` (null values leave gaps), labelled; a series with an
    entry in ``errors`` gets its intervals as error bars and its null bound as a dotted line of its colour."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for name, (xs, ys) in lines.items():
        (line,) = ax.plot(list(xs), floats(ys), marker="o", markersize=3, label=name)
        unc = (errors or {}).get(name)
        if unc is not None and unc.intervals is not None:
            values = floats(ys)
            ends = np.array(unc.intervals)  # (L, 2)
            # (2, L) below and above; a percentile bootstrap interval may leave its estimate out: no bar that side
            bars = np.maximum(np.vstack([values - ends[:, 0], ends[:, 1] - values]), 0.0)
            ax.errorbar(list(xs), values, yerr=bars, fmt="none", ecolor=line.get_color(), capsize=2, linewidth=1)
        if unc is not None and unc.null_high is not None:
            ax.plot(list(xs), unc.null_high, linestyle=":", linewidth=1, color=line.get_color())
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # hidden states are whole numbers
    ax.set_xlabel(_HIDDEN_STATE)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _pair(doc: Mapping[str, Any]) -> tuple[str, str]:
    return str(doc["a"]), str(doc["b"])


def _index_ticks(ax: Axes, states: Sequence[int], *, axis: str) -> None:
    """Label positions with hidden-state indices; about 15 ticks at most, so 29 states stay legible."""
    step = max(1, -(-len(states) // 15))
    positions = list(range(0, len(states), step))
    labels = [str(states[i]) for i in positions]
    if axis == "x":
        ax.set_xticks(positions, labels)
    else:
        ax.set_yticks(positions, labels)


# --- training dynamics -------------------------------------------------------------------------------------


def dynamics_figure(dynamics: Dynamics) -> Figure:
    """The paper's Figure 5 for one series: CKA, mean dimension-wise r and k-NN overlap against the training step.

    One panel per metric: the mean over matched hidden states as a thick line, each hidden state as a thin line
    coloured by depth (CKA and dimension-wise r); one line per k for k-NN overlap.
    """
    from matplotlib.figure import Figure

    panels = [(c.label, {c.label: c}) for c in (dynamics.cka, dynamics.dimcorr) if c is not None]
    if dynamics.knn:
        panels.append(("k-NN overlap", {f"k = {k}": c for k, c in dynamics.knn.items()}))
    fig = Figure(figsize=(4.2 * max(1, len(panels)), 3.8), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    steps = list(dynamics.steps)
    for ax, (label, curves) in zip(axes, panels):
        _dynamics_panel(ax, steps, curves)
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"training dynamics of {dynamics.name}: {dynamics.runs[0]} vs {dynamics.runs[1]}", fontsize=11)
    return fig


def dynamics_comparison_figure(series: Sequence[Dynamics], *, k: int = KNN_K) -> Figure:
    """Several series on one plot: per metric (CKA, dimension-wise r, k-NN overlap at the k closest to ``k``), one
    line per series, its mean over matched hidden states, labelled by the series' name.

    Raises:
        ValueError: no series.
    """
    from matplotlib.figure import Figure

    if not series:
        raise ValueError("Expected at least one dynamics series. Got none.")
    labels = list(dict.fromkeys(label for dyn in series for label in _compared_curves(dyn, k)))
    fig = Figure(figsize=(4.2 * max(1, len(labels)), 3.8), layout="constrained")
    axes = fig.subplots(1, max(1, len(labels)), squeeze=False)[0]
    steps = sorted({s for dyn in series for s in dyn.steps})
    for ax, label in zip(axes, labels):
        for dyn in series:
            curve = _compared_curves(dyn, k).get(label)
            if curve is not None:
                ax.plot(list(dyn.steps), curve.mean, linewidth=2.0, marker="o", markersize=4, label=dyn.name)
        _step_axis(ax, steps)
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("training dynamics: every series, mean over hidden states", fontsize=11)
    return fig


def _compared_curves(dyn: Dynamics, k: int) -> dict[str, Any]:
    """The curves one series contributes to the comparison: CKA, dimension-wise r, k-NN overlap at one k."""
    curves = {c.label: c for c in (dyn.cka, dyn.dimcorr) if c is not None}
    if dyn.knn:
        chosen = dyn.knn[knn_k(list(dyn.knn), k)]  # type: ignore[index]
        curves[chosen.label] = chosen
    return curves


def _dynamics_panel(ax: Axes, steps: list[int], curves: Mapping[str, Any]) -> None:
    """One metric's curves (one: its hidden states too; several: one mean line each) against the step."""
    from matplotlib import colormaps

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
    _step_axis(ax, steps)
    ax.legend(fontsize=7)


def _step_axis(ax: Axes, steps: list[int]) -> None:
    """The training-step axis; step 0 is the backbones (no checkpoint), and the label says so."""
    from matplotlib.ticker import MaxNLocator

    if len(steps) <= 12:
        ax.set_xticks(steps)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step (0 = the backbones)" if steps and steps[0] == 0 else "training step")
    ax.grid(alpha=0.3)


def plot_dynamics(dynamics: Dynamics, path: Path) -> Path:
    """Write :func:`dynamics_figure` as a PNG at ``path``."""
    return write_atomic(path, png_bytes(dynamics_figure(dynamics), dpi=PNG_DPI))


def plot_dynamics_comparison(series: Sequence[Dynamics], path: Path) -> Path:
    """Write :func:`dynamics_comparison_figure` as a PNG at ``path``."""
    return write_atomic(path, png_bytes(dynamics_comparison_figure(series), dpi=PNG_DPI))
