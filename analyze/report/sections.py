"""The sections of the HTML report, each from results.json mappings (or a dynamics file's curves).

Per pair, in the paper's order: provenance; a Table 2 style summary (:mod:`hrsa.analyze.report.summary`); the
cross-layer heatmaps of CKA and dimension-wise correlation (Figure 3; per-layer profiles without
``--cross-layer``); per-layer metrics with Procrustes H_inv (Table 3); k-NN overlap per k and hidden state
(Table 4); cross-model probe accuracies (Figure 4). Around them: the overview of every pair's verdicts, the
study's Table 2s side by side (one column per comparison of two models), the training dynamics (Figure 5: every
series with its own figure, and all of them on one plot) and the thresholds. Each section is an HTML string built from
:mod:`hrsa.analyze.report.html_blocks`; the figures are :mod:`hrsa.analyze.report.figures`'.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hrsa.analyze.report.dynamics import mean_changes
from hrsa.analyze.report.figures import (
    dynamics_comparison_figure,
    dynamics_figure,
    heatmap_figure,
    knn_overlap_figure,
    layer_profile_figure,
    probe_figure,
)
from hrsa.analyze.report.html_blocks import (
    Html,
    MutedNumberCell,
    NumberCell,
    VerdictCell,
    compact,
    escape,
    figure,
    hidden_states,
    number,
    table,
)
from hrsa.analyze.report.summary import (
    LEVELS,
    MORE_LAYER_SCORES,
    Comparison,
    PairSummary,
    ScoreUncertainty,
    Thresholds,
    knn_k,
    merge_levels,
    probe_directions,
    probe_transfer,
    score_uncertainty,
)
from hrsa.store.model import describe_source

if TYPE_CHECKING:
    from hrsa.analyze.report.dynamics import Dynamics

__all__ = ["dynamics_section", "identity_warnings", "overview_section", "warnings_section", "pair_section", "table_2_section", "thresholds_section"]


def overview_section(summaries: Sequence[PairSummary]) -> str:
    """Every pair's verdict per level, each pair linking to its section."""
    rows = [[Html(f'<a href="#pair-{i}">{escape(s.a)} vs {escape(s.b)}</a>'), *(VerdictCell(s.verdict(lv)) for lv in LEVELS)]
            for i, s in enumerate(summaries)]
    return ("<h2>Summary</h2><p class=\"note\">Per pair and level, whether the representations are preserved or "
            "restructured (details and thresholds below).</p>" + table(["pair", *LEVELS], rows))


def pair_section(i: int, path: Path | str, doc: Mapping[str, Any], summary: PairSummary, t: Thresholds) -> str:
    """Everything about the ``i``-th pair, read from its results.json ``doc`` (found at ``path``)."""
    a, b = str(doc["a"]), str(doc["b"])
    m = doc["metrics"]
    parts = [f'<h2 id="pair-{i}">{escape(a)} vs {escape(b)}</h2>', _provenance(path, doc), _verdicts(summary),
             _similarity_figures(doc), _layer_table(doc)]
    if "knn" in m:
        parts.append(_knn_section(doc, t))
    if "probe" in m:
        parts.append(_probe_section(doc, t))
    return "\n".join(parts)


def table_2_section(docs: Sequence[Mapping[str, Any]], summaries: Sequence[PairSummary],
                    comparisons: Sequence[Comparison], t: Thresholds) -> str:
    """The study's Table 2s side by side: per level its verdict, then each metric's mean, one column per comparison
    (e.g. the backbones, then the embedding models trained from them), each level taken from the first of the
    comparison's results that measured it."""
    merged = [merge_levels([summaries[i] for i in c.results]) for c in comparisons]
    rows: list[list[Any]] = []
    for li, level in enumerate(LEVELS):
        rows.append([level, "verdict", *(VerdictCell(m[li][0].verdict) for m in merged), ""])
        checks = [{c.metric: c for c in m[li][0].checks} for m in merged]
        for metric in dict.fromkeys(name for by_metric in checks for name in by_metric):
            # One threshold, or each column's where they differ (k-NN's is taken above each sample's chance).
            thresholds = [by_metric[metric].threshold for by_metric in checks if metric in by_metric]
            said = (f">= {thresholds[0]:.3g}" if max(thresholds) - min(thresholds) < 5e-4
                    else ">= " + " / ".join(f"{by_metric[metric].threshold:.3g}" if metric in by_metric else "-"
                                            for by_metric in checks))
            rows.append(["", metric, *(number(by_metric[metric].value) if metric in by_metric else "-" for by_metric in checks),
                         said])
    rows.append(["", "measured on", *(_measured_on(docs, c, m) for c, m in zip(comparisons, merged)), ""])
    return ("<h2 id=\"table-2\">Summary by level, side by side (Table 2)</h2><p class=\"note\">One column per comparison "
            "of two models; each level comes from the first of its results that measured it (the last row names them). "
            f"Means over hidden states; {escape(t.describe()['hidden states averaged'])}.</p>"
            + table(["level", "metric", *(c.label for c in comparisons), "preserved when"], rows))


def _measured_on(docs: Sequence[Mapping[str, Any]], comparison: Comparison, merged: Sequence[tuple[Any, int | None]]) -> str:
    """The run ids of the results each level of a comparison came from (with their corpus)."""
    used = dict.fromkeys(comparison.results[j] for _, j in merged if j is not None)
    return "; ".join(f"{docs[i].get('run_id')} ({docs[i].get('corpus')})" for i in used) or "-"


def dynamics_section(series: Sequence[Dynamics]) -> str:
    """The metrics against the training step (Figure 5): every series on one plot when there are several, then each
    series with its own figure, what it shows in words, and its numbers."""
    parts = [("<h2 id=\"dynamics\">Training dynamics (Figure 5)</h2><p class=\"note\">Each series compares two training "
              "runs checkpoint by checkpoint; step 0 is their backbones, before any training, so a rising curve means the "
              "two runs grew more alike than their starting points (realignment), a falling one that they drifted apart."
              "</p>")]
    if len(series) > 1:
        parts.append(f"<h3>Several runs compared: every series on one plot</h3><div class=\"figs\">"
                     f"{figure(dynamics_comparison_figure(series), 'training dynamics: every series', wide=True)}</div>")
    parts += [_series_section(dyn) for dyn in series]
    return "\n".join(parts)


def _series_section(dyn: Dynamics) -> str:
    curves = dyn.curves
    rows = [[str(s), f"{pa} vs {pb}", *(number(c.mean[i]) for c in curves.values()), str(dyn.results[i])]
            for i, (s, (pa, pb)) in enumerate(zip(dyn.steps, dyn.pairs))]
    return (f"<h3>Training dynamics: {escape(dyn.name)} ({escape(dyn.runs[0])} vs {escape(dyn.runs[1])})</h3>"
            f"<p class=\"note\">{escape(_what_it_shows(dyn))} Means over matched hidden states at each training step, "
            f"{'the embedding output (hidden state 0) left out' if dyn.exclude_embedding else 'the embedding output (hidden state 0) included'} "
            "as in Table 2 (the table names the pair each step compares); thin lines: each hidden state.</p>"
            f"<div class=\"figs\">{figure(dynamics_figure(dyn), f'training dynamics of {dyn.name}', wide=True)}</div>"
            + table(["step", "pair", *curves, "results file"], rows))


def _what_it_shows(dyn: Dynamics) -> str:
    """How far each mean moved from the first step to the last, in words."""
    changes = mean_changes(dyn)
    if not changes:
        return "One step only: no change to read."
    start = "step 0 (the backbones)" if changes[0].first_step == 0 else f"step {changes[0].first_step}"
    moves = ", ".join(f"{c.label} {c.first:.3f} \u2192 {c.last:.3f} ({c.change:+.3f})" for c in changes)
    return f"From {start} to step {changes[0].last_step}: {moves}."


def thresholds_section(t: Thresholds) -> str:
    """The rules behind the verdicts, in words."""
    rows = [[name, rule] for name, rule in t.describe().items()]
    return ("<h2 id=\"thresholds\">Thresholds</h2><p class=\"note\">Each metric is averaged over the matched hidden "
            "states (and probe directions) and counted as preserved when it reaches its threshold; a level is "
            "preserved when all of its metrics are, restructured when one is not (representation: dimension-wise "
            "correlation and H_inv; geometry: linear CKA and k-NN overlap; function: cross-model probes). The "
            "thresholds are hrsa's defaults, not the paper's (it states none): set them with <code>hrsa report</code>'s "
            "flags (<code>--min-cka</code>, ...) or a pipeline's <code>report:</code> section. Hidden states where a "
            "metric is undefined (H_inv where the rotation is not unique) are left out and named. The function level reads "
            "<em>no signal</em> where the probes ran but no source readout beat chance: nothing carries over to measure.</p>" + table(["metric", "preserved when"], rows))


def _provenance(path: Path | str, doc: Mapping[str, Any]) -> str:
    settings = doc.get("settings", {})
    models = doc.get("models") or {}
    items = {"model A (rows)": _model_line(doc["a"], models.get("a")), "model B (columns)": _model_line(doc["b"], models.get("b")),
             "corpus": doc.get("corpus"),
             "tokens compared": doc.get("n_tokens"), "token filter": compact(doc.get("token_filter")),
             "hidden states": f"A {hidden_states(doc.get('hidden_states_a'))}; B {hidden_states(doc.get('hidden_states_b'))}; "
                              f"matched {hidden_states(doc['matched_hidden_states'])}",
             "metrics": ", ".join(doc["metrics"]), "run id": doc.get("run_id"),
             "analysis": f"hrsa {doc.get('hrsa_version', '?')}, {doc.get('created', '?')}; "
                         f"{settings.get('backend', '?')} backend, {settings.get('compute_dtype', '?')}",
             "results file": str(path)}
    if "probe" in settings:
        p = settings["probe"]
        items["probe"] = (f"label {p.get('label_field')!r} ({', '.join(map(str, p.get('classes', [])))}), "
                          f"{p.get('n_docs')} documents, {p.get('pool')} pooling, seed {p.get('seed')}")
    body = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items.items() if v is not None)
    return f"<h3>Provenance</h3><dl class=\"prov\">{body}</dl>"


def _model_line(mid: str, record: Mapping[str, Any] | None) -> str:
    """A compared model: its id, source, a short digest of its weights files and of its identity, its dtype."""
    if record is None:
        return f"{mid} (source and digest not recorded: results of an earlier hrsa)"
    source = record.get("source") or {}
    content = source.get("content")
    weights = f"weights {str(content)[:12]}" if content else "weights not digested (a hub model: its revision names it)"
    return (f"{mid}: {describe_source(source)}; {weights}; {record.get('dtype', '?')}; "
            f"identity {str(record.get('identity'))[:12]}")


def _store_key(store: Any) -> str | None:
    """A store as results name it, for grouping: a local path normalised (``s/``, ``./s`` and ``s`` are one store;
    hrsa records a local store by its absolute path, an earlier hrsa as it was given)."""
    if store is None:
        return None
    text = str(store)
    if "://" in text and not text.startswith("file://"):
        return text.rstrip("/")
    return os.path.normpath(text.removeprefix("file://"))


def identity_warnings(docs: Sequence[tuple[Path | str, Mapping[str, Any]]]) -> list[str]:
    """One line per model id that names different models (different identities) across the results: a model
    deleted from the store and another extracted under its id between two analyses. Results without identities
    (an earlier hrsa) say nothing either way."""
    # An id names one model within one store: the same id in two stores (the same weights over two corpora, one
    # study's datasets) is not a deletion. Results that do not name their store are taken as one store's.
    seen: dict[tuple[str | None, str], dict[str, tuple[Mapping[str, Any], list[str]]]] = {}
    for path, doc in docs:
        config = doc.get("config")
        store = _store_key(config.get("store")) if isinstance(config, Mapping) else None
        for side, record in (doc.get("models") or {}).items():
            mid = str(doc.get(side, record.get("id")))
            found = seen.setdefault((None if store is None else str(store), mid), {}).setdefault(
                str(record.get("identity")), (record, []))
            found[1].append(str(doc.get("run_id") or path))
    lines = []
    for (_, mid), identities in seen.items():
        if len(identities) > 1:
            each = "; ".join(f"{describe_source(r.get('source') or {})} (identity {ident[:12]}) in {', '.join(dict.fromkeys(runs))}"
                             for ident, (r, runs) in identities.items())
            lines.append(f"model {mid} names {len(identities)} different models across these results: {each}. "
                         "It was deleted and extracted again between the analyses: their numbers do not compare one model.")
    return lines


def warnings_section(lines: Sequence[str]) -> str:
    """The report's warnings, one paragraph each, under the title."""
    return "".join(f'<p class="warning">warning: {escape(line)}</p>' for line in lines)


def _verdicts(summary: PairSummary) -> str:
    """Table 2: each level's verdict and the metric checks behind it."""
    rows = []
    for level in summary.levels:
        if not level.checks:
            rows.append([level.level, VerdictCell(level.verdict), "-", "", "", "", ""])
        for j, c in enumerate(level.checks):
            rows.append([*([level.level, VerdictCell(level.verdict)] if j == 0 else [None, None]), c.metric,
                         number(c.value), f">= {c.threshold:g}", VerdictCell("preserved" if c.passed else "restructured"),
                         c.detail])
    spans = {lv.level: max(1, len(lv.checks)) for lv in summary.levels}
    return ("<h3>Summary by level (Table 2)</h3>"
            + table(["level", "verdict", "metric", "value", "preserved when", "metric verdict", "averaged over"], rows,
                    spans=spans))


def _similarity_figures(doc: Mapping[str, Any]) -> str:
    """Figure 3: the cross-layer heatmaps, or without them the per-layer profile."""
    maps = [name for name in ("cka", "dimcorr") if "matrix" in doc["metrics"].get(name, {})]
    if maps:
        figs = [figure(heatmap_figure(doc, name), f"cross-layer {name}") for name in maps]
        return "<h3>Cross-layer similarity (Figure 3)</h3><div class=\"figs\">" + "".join(figs) + "</div>"
    profile = layer_profile_figure(doc)
    if profile is None:
        return ""
    return ("<h3>Per-layer similarity (Figure 3 without --cross-layer)</h3><p class=\"note\">No cross-layer matrices in "
            "these results (run <code>hrsa analyze --cross-layer</code> for the heatmaps).</p>"
            f"<div class=\"figs\">{figure(profile, 'per-layer profile')}</div>")


def _layer_table(doc: Mapping[str, Any]) -> str:
    """Table 3: the per-layer numbers, Procrustes H_inv among them."""
    m = doc["metrics"]
    columns = {"linear CKA": m.get("cka", {}).get("diagonal"), "debiased CKA": m.get("cka", {}).get("debiased_diagonal"),
               "mean dimension-wise r": m.get("dimcorr", {}).get("diagonal"),
               "degenerate dims": m.get("dimcorr", {}).get("n_degenerate"),
               "Procrustes H_inv": m.get("procrustes", {}).get("h_inv"), "Procrustes residual": m.get("procrustes", {}).get("residual")}
    keys = {"linear CKA": ("cka", "diagonal"), "debiased CKA": ("cka", "debiased_diagonal"),
            "mean dimension-wise r": ("dimcorr", "diagonal"), "Procrustes H_inv": ("procrustes", "h_inv"),
            "Procrustes residual": ("procrustes", "residual"),
            **{label: (metric, key) for label, metric, key in MORE_LAYER_SCORES}}
    columns.update({label: m.get(metric, {}).get(key) for label, metric, key in MORE_LAYER_SCORES})
    columns = {k: v for k, v in columns.items() if v}
    if not columns:
        return ""
    unc = {name: score_uncertainty(doc, *keys[name]) for name in columns if name in keys}
    states = doc["matched_hidden_states"]
    rows = [[str(k), *(_cell(v, i, unc.get(name)) for name, v in columns.items())] for i, k in enumerate(states)]
    note = _uncertainty_note(doc)
    if "procrustes" in m and any(m["procrustes"].get("underdetermined", [])):
        note += ("<p class=\"note\">Procrustes was underdetermined at some hidden states (no more tokens than dimensions, "
                "or a rank-deficient cross-covariance): H_inv means little there.</p>")
    return ("<h3>Per-layer metrics, with Procrustes H_inv (Table 3)</h3><p class=\"note\">H_inv is 1 when O* is a "
            "permutation and about 0.73 / ln D for a random rotation.</p>" + table(["hidden state", *columns], rows) + note)


def _cell(values: Sequence[Any], i: int, unc: ScoreUncertainty | None) -> Any:
    """A per-layer number with ``± half-width`` of its interval, greyed out when within its null."""
    if i >= len(values):
        return ""
    cell = number(values[i])
    half = unc.plus_minus(i) if unc is not None else None
    if half is not None and cell != "n/a":
        cell = NumberCell(f"{cell} ± {half:.3f}")
    return MutedNumberCell(cell) if unc is not None and unc.within_null and unc.within_null[i] else cell


def _plus_minus(value: Any, interval: Sequence[Any] | None) -> NumberCell:
    """A number with ``± half-width`` of its interval when there is one."""
    cell = number(value)
    if interval is None or None in interval or cell == "n/a":
        return cell
    return NumberCell(f"{cell} ± {(float(interval[1]) - float(interval[0])) / 2:.3f}")


def _with_interval(value: Any, interval: Sequence[Any] | None) -> NumberCell:
    """A number with its interval as [low, high] (an accuracy's Wilson interval is not symmetric about it)."""
    cell = number(value)
    if interval is None or None in interval or cell == "n/a":
        return cell
    return NumberCell(f"{cell} [{float(interval[0]):.3f}, {float(interval[1]):.3f}]")


def _uncertainty_note(doc: Mapping[str, Any]) -> str:
    u = doc.get("uncertainty") or {}
    if not u.get("method"):
        return ""
    return (f"<p class=\"note\">± is half the {u['level']:.0%} delete-a-group {u['method']} interval over {u['groups']} "
            "groups of whole documents. Greyed-out scores are no higher than tokens shuffled between the two models give "
            f"(below the permutation null's mean + {u['null_z']:g} standard deviations).</p>")


def _knn_section(doc: Mapping[str, Any], t: Thresholds) -> str:
    """Table 4: mean k-NN overlap per k and hidden state, with its figure."""
    knn = doc["metrics"]["knn"]
    states, ks = knn.get("hidden_states", []), sorted(knn.get("k", {}), key=int)
    ends = knn.get("intervals") or {}
    rows = [[str(s), *(_plus_minus(knn["k"][k][i], ends[k][i] if k in ends else None) for k in ks)]
            for i, s in enumerate(states)]
    if "recall" in knn:
        note = "; recall@k against exact search (A, B): " + ", ".join(
            f"k = {k}: {min(min(p) for p in knn['recall'][k]):.3f} at worst" for k in sorted(knn["recall"], key=int))
    else:
        note = ""
    chance = knn.get("chance") or {}
    if chance:  # what unrelated models score on this sample: the verdict's threshold is taken above it
        note += "; chance (unrelated models on this sample): " + ", ".join(
            f"k = {k}: {float(chance[k]):.4f}" for k in sorted(chance, key=int))
    return (f"<h3>k-NN overlap (Table 4)</h3><p class=\"note\">Mean per-token Jaccard of cosine neighbour sets (self "
            f"excluded) on {escape(knn.get('n_tokens'))} sampled tokens (seed {escape(knn.get('seed'))}, "
            f"{escape(knn.get('search'))} search{escape(note)}); the summary reads k = {escape(knn_k(ks, t.knn_k))}"
            + (f"; ± half the 95% bootstrap interval over the sample's {escape(knn.get('n_docs'))} documents" if ends else "")
            + ".</p>"
            + table(["hidden state", *(f"k = {k}" for k in ks)], rows)
            + f"<div class=\"figs\">{figure(knn_overlap_figure(doc), 'k-NN overlap per hidden state')}</div>")


def _probe_section(doc: Mapping[str, Any], t: Thresholds) -> str:
    """Figure 4: probe accuracy and macro-F1 per hidden state and direction, with the transfer ratio."""
    probe = doc["metrics"]["probe"]
    states = sorted(probe, key=int)
    directions = probe_directions(probe, str(doc["a"]), str(doc["b"]))
    cols = [f"{d.fitted_on} \u2192 {d.tested_on}" for d in directions]
    acc = [[_with_interval(d.scores(probe[k])["test"]["accuracy"], d.accuracy_interval(probe[k])) for k in states]
           for d in directions]
    f1 = [[d.scores(probe[k])["test"]["macro_f1"] for k in states] for d in directions]
    rows = [[k, *(v[i] for v in acc), *(number(v[i]) for v in f1), number(probe[k].get("chance")),
             number(probe_transfer([probe[k]], min_signal=t.probe_min_signal))] for i, k in enumerate(states)]
    header = ["hidden state", *(f"accuracy {c}" for c in cols), *(f"F1 {c}" for c in cols), "majority class", "transfer"]
    n = probe[states[0]]["source"]["test"].get("n") if states else None
    return ("<h3>Cross-model linear probes (Figure 4)</h3><p class=\"note\">Test-split accuracy and macro-F1 "
            f"({escape(n)} documents; in brackets the 95% Wilson score interval over them); X \u2192 Y: fitted on X's hidden state, applied to Y's. Transfer = (target - chance) / "
            "(source - chance), pooled over the directions whose source beats chance by "
            f"{t.probe_min_signal:g} or more.</p>" + table(header, rows)
            + f"<div class=\"figs\">{figure(probe_figure(doc), 'probe accuracy per hidden state')}</div>")
