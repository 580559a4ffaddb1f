"""``hrsa report``: one self-contained HTML file from the ``results.json`` of one or more analysed pairs.

Per pair, in the paper's order: provenance; a Table 2 style summary (:mod:`hrsa.analyze.report.summary`); the
cross-layer heatmaps of CKA and dimension-wise correlation (Figure 3; per-layer profiles without
``--cross-layer``); per-layer metrics with Procrustes H_inv (Table 3); k-NN overlap per k and hidden state
(Table 4); cross-model probe accuracies (Figure 4). Then, with a dynamics file, the metrics against the
training step (Figure 5). Figures are PNGs embedded as base64 data URIs: no external file, URL or script.
Every text from the results is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hrsa.analyze.results import SCHEMA
from hrsa.analyze.report.summary import LEVELS, PairSummary, Thresholds, knn_k, probe_transfer, summarize
from hrsa.store.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from hrsa.analyze.report.dynamics import Dynamics

__all__ = ["ReportInputError", "find_results", "read_results", "render_report", "write_report"]

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d232b;
       background: #f6f7f9; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { font-size: 21px; margin-top: 40px; padding-top: 12px;
   border-top: 3px solid #3b6ea8; } h3 { font-size: 17px; margin: 26px 0 8px; color: #2c4f78; }
p.meta, p.note, figcaption { color: #5b6470; font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 13.5px; }
th, td { border: 1px solid #d5dae1; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef2f7; } tbody tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; font-family: ui-monospace, Menlo, Consolas, monospace; }
td.preserved { background: #dcf2e0 !important; color: #17602b; font-weight: 600; }
td.restructured { background: #fde8cf !important; color: #8a4a00; font-weight: 600; }
td.not-measured { color: #7a828c; }
.figs { display: flex; flex-wrap: wrap; gap: 16px; } figure { margin: 4px 0; flex: 0 1 560px; max-width: 100%; }
figure.wide { flex: 1 1 100%; }
figure img { width: 100%; height: auto; border: 1px solid #e3e6ea; }
dl.prov { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; font-size: 13.5px; }
dl.prov dt { color: #5b6470; } dl.prov dd { margin: 0; word-break: break-all; }
nav ul { padding-left: 20px; } code { font-size: 12.5px; }
"""


class ReportInputError(UserError, ValueError):
    """A path given to the report that holds no readable ``hrsa analyze`` results (or a bad dynamics file)."""


# --- inputs ------------------------------------------------------------------------------------------------


def find_results(paths: Iterable[Path | str]) -> list[Path]:
    """The results.json files named by ``paths``: files as given, folders by their results.json (or, failing that,
    their subfolders' ``*/results.json``, sorted).

    Raises:
        ReportInputError: no path, a path that does not exist, or a folder without results.json.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inner = [path / "results.json"] if (path / "results.json").is_file() else sorted(path.glob("*/results.json"))
            if not inner:
                raise ReportInputError(f"Expected a results.json in the folder {path}. Got none instead. "
                                       "Pass the --out folder of `hrsa analyze`.")
            found.extend(inner)
        elif path.is_file():
            found.append(path)
        else:
            raise ReportInputError(f"Expected a results.json file or a folder holding one. Got {path}, which does not exist.")
    if not found:
        raise ReportInputError("Expected at least one results.json. Got none instead. Pass the results of `hrsa analyze`.")
    return found


def read_results(path: Path | str) -> tuple[Path, dict[str, Any]]:
    """Read and check one results.json (or a folder's): its path and the parsed document.

    Raises:
        ReportInputError: missing, not JSON, or not of schema ``hrsa.analyze/1``.
    """
    files = find_results([path])
    if len(files) > 1:
        raise ReportInputError(f"Expected one results.json at {path}. Got {len(files)} in its subfolders instead. Name one.")
    file = files[0]
    try:
        doc = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ReportInputError(f"Expected a readable results.json at {file}. Got an error instead: {error}.") from None
    got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
    if got != SCHEMA:
        raise ReportInputError(f"Expected a results.json of schema {SCHEMA} at {file}. Got {got!r} instead. "
                               "Pass the results.json that `hrsa analyze` writes.")
    missing = [k for k in ("a", "b", "metrics", "matched_hidden_states") if k not in doc]
    if missing:
        raise ReportInputError(f"Expected keys a, b, metrics and matched_hidden_states in {file}. Got no {', '.join(missing)} instead.")
    return file, doc


# --- the report --------------------------------------------------------------------------------------------


def write_report(results: Sequence[Path | str], out: Path | str, *, dynamics: Path | str | None = None,
                 title: str | None = None, thresholds: Thresholds | None = None) -> Path:
    """Write one self-contained HTML report of the analysed pairs ``results``.

    Args:
        results: results.json files, or folders holding one (one per pair; order kept).
        out: the HTML file to write (its folder is created).
        dynamics: a ``hrsa.dynamics/1`` file (:mod:`hrsa.analyze.report.dynamics`) for the training-dynamics section.
        title: the report's title (default: the pairs compared).
        thresholds: the summary's rules (default: :mod:`hrsa.analyze.report.summary`'s constants).

    Returns:
        ``out``.

    Raises:
        ReportInputError: an empty list, a path without results.json, a file of another schema, a bad dynamics file.
    """
    files = find_results(results)
    docs = [read_results(f) for f in files]
    dyn = None
    if dynamics is not None:
        from hrsa.analyze.report.dynamics import load_dynamics

        dyn = load_dynamics(Path(dynamics))
    page = render_report(docs, dynamics=dyn, title=title, thresholds=thresholds)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def render_report(docs: Sequence[tuple[Path, Mapping[str, Any]]], *, dynamics: Dynamics | None = None,
                  title: str | None = None, thresholds: Thresholds | None = None) -> str:
    """The report's HTML for ``(path, document)`` pairs as :func:`read_results` returns them."""
    from hrsa import __version__

    t = thresholds or Thresholds()
    summaries = [summarize(doc, thresholds=t) for _, doc in docs]
    title = title or "HRSA report: " + "; ".join(f"{d['a']} vs {d['b']}" for _, d in docs)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    parts = [f"<h1>{_e(title)}</h1>",
             f'<p class="meta">Generated by hrsa {_e(__version__)} on {_e(now)} from {len(docs)} results file(s).</p>',
             _overview(docs, summaries)]
    for i, ((path, doc), summary) in enumerate(zip(docs, summaries)):
        parts.append(_pair_section(i, path, doc, summary, t))
    if dynamics is not None:
        parts.append(_dynamics_section(dynamics))
    parts.append(_thresholds_section(t))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body><main>\n" + "\n".join(parts)
            + "\n</main></body></html>\n")


def _overview(docs: Sequence[tuple[Path, Mapping[str, Any]]], summaries: Sequence[PairSummary]) -> str:
    rows = [[_Raw(f'<a href="#pair-{i}">{_e(s.a)} vs {_e(s.b)}</a>'), *(_verdict(s.verdict(lv)) for lv in LEVELS)]
            for i, s in enumerate(summaries)]
    return ("<h2>Summary</h2><p class=\"note\">Per pair and level, whether the representations are preserved or "
            "restructured (details and thresholds below).</p>" + _table(["pair", *LEVELS], rows))


def _pair_section(i: int, path: Path, doc: Mapping[str, Any], summary: PairSummary, t: Thresholds) -> str:
    a, b = str(doc["a"]), str(doc["b"])
    m = doc["metrics"]
    parts = [f'<h2 id="pair-{i}">{_e(a)} vs {_e(b)}</h2>', _provenance(path, doc), _summary_table(summary)]
    parts.append(_layers_figures(doc))
    parts.append(_layer_table(doc))
    if "knn" in m:
        parts.append(_knn_section(doc, t))
    if "probe" in m:
        parts.append(_probe_section(doc, t))
    return "\n".join(parts)


def _provenance(path: Path, doc: Mapping[str, Any]) -> str:
    settings = doc.get("settings", {})
    items = {"model A (rows)": doc["a"], "model B (columns)": doc["b"], "corpus": doc.get("corpus"),
             "tokens compared": doc.get("n_tokens"), "token filter": _compact(doc.get("token_filter")),
             "hidden states": f"A {_states(doc.get('hidden_states_a'))}; B {_states(doc.get('hidden_states_b'))}; "
                              f"matched {_states(doc['matched_hidden_states'])}",
             "metrics": ", ".join(doc["metrics"]), "run id": doc.get("run_id"),
             "analysis": f"hrsa {doc.get('hrsa_version', '?')}, {doc.get('created', '?')}; "
                         f"{settings.get('backend', '?')} backend, {settings.get('compute_dtype', '?')}",
             "results file": str(path)}
    if "probe" in settings:
        p = settings["probe"]
        items["probe"] = (f"label {p.get('label_field')!r} ({', '.join(map(str, p.get('classes', [])))}), "
                          f"{p.get('n_docs')} documents, {p.get('pool')} pooling, seed {p.get('seed')}")
    body = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items.items() if v is not None)
    return f"<h3>Provenance</h3><dl class=\"prov\">{body}</dl>"


def _summary_table(summary: PairSummary) -> str:
    rows = []
    for level in summary.levels:
        if not level.checks:
            rows.append([level.level, _verdict(level.verdict), "-", "", "", "", ""])
        for j, c in enumerate(level.checks):
            rows.append([*([level.level, _verdict(level.verdict)] if j == 0 else [None, None]), c.metric, _num(c.value),
                         f">= {c.threshold:g}", _verdict("preserved" if c.passed else "restructured"), c.detail])
    spans = {lv.level: max(1, len(lv.checks)) for lv in summary.levels}
    return ("<h3>Summary by level (Table 2)</h3>"
            + _table(["level", "verdict", "metric", "value", "preserved when", "metric verdict", "averaged over"], rows,
                     spans=spans))


def _layers_figures(doc: Mapping[str, Any]) -> str:
    from hrsa.analyze.report.figures import heatmap_figure, lines_figure

    m, a, b = doc["metrics"], str(doc["a"]), str(doc["b"])
    sub = f"{a} vs {b}, {doc.get('n_tokens')} tokens"
    maps = [(name, m[name]["matrix"]) for name in ("cka", "dimcorr") if "matrix" in m.get(name, {})]
    if maps:
        figs = [_figure(heatmap_figure(matrix, doc["hidden_states_a"], doc["hidden_states_b"], metric=name, a=a, b=b,
                                       subtitle=sub), f"cross-layer {name}") for name, matrix in maps]
        return "<h3>Cross-layer similarity (Figure 3)</h3><div class=\"figs\">" + "".join(figs) + "</div>"
    states = doc["matched_hidden_states"]
    series = {"linear CKA": m.get("cka", {}).get("diagonal"), "mean dimension-wise r": m.get("dimcorr", {}).get("diagonal"),
              "Procrustes H_inv": m.get("procrustes", {}).get("h_inv")}
    lines = {name: (states, v) for name, v in series.items() if v}
    if not lines:
        return ""
    fig = lines_figure(lines, xlabel="hidden state (0 = embedding output)", ylabel="similarity", title=f"matched hidden states: {sub}")
    return ("<h3>Per-layer similarity (Figure 3 without --cross-layer)</h3><p class=\"note\">No cross-layer matrices in "
            "these results (run <code>hrsa analyze --cross-layer</code> for the heatmaps).</p>"
            f"<div class=\"figs\">{_figure(fig, 'per-layer profile')}</div>")


def _layer_table(doc: Mapping[str, Any]) -> str:
    m = doc["metrics"]
    columns = {"linear CKA": m.get("cka", {}).get("diagonal"), "debiased CKA": m.get("cka", {}).get("debiased_diagonal"),
               "mean dimension-wise r": m.get("dimcorr", {}).get("diagonal"),
               "degenerate dims": m.get("dimcorr", {}).get("n_degenerate"),
               "Procrustes H_inv": m.get("procrustes", {}).get("h_inv"), "Procrustes residual": m.get("procrustes", {}).get("residual")}
    columns = {k: v for k, v in columns.items() if v}
    if not columns:
        return ""
    states = doc["matched_hidden_states"]
    rows = [[str(k), *(_num(v[i]) if i < len(v) else "" for v in columns.values())] for i, k in enumerate(states)]
    note = ""
    if "procrustes" in m and any(m["procrustes"].get("underdetermined", [])):
        note = "<p class=\"note\">Procrustes was underdetermined at some hidden states (no more tokens than dimensions, or a rank-deficient cross-covariance): H_inv means little there.</p>"
    return ("<h3>Per-layer metrics, with Procrustes H_inv (Table 3)</h3><p class=\"note\">H_inv is 1 when O* is a "
            "permutation and about 0.73 / ln D for a random rotation.</p>" + _table(["hidden state", *columns], rows) + note)


def _knn_section(doc: Mapping[str, Any], t: Thresholds) -> str:
    from hrsa.analyze.report.figures import lines_figure

    knn = doc["metrics"]["knn"]
    states, ks = knn.get("hidden_states", []), sorted(knn.get("k", {}), key=int)
    rows = [[str(s), *(_num(knn["k"][k][i]) for k in ks)] for i, s in enumerate(states)]
    if "recall" in knn:
        note = "; recall@k against exact search (A, B): " + ", ".join(
            f"k = {k}: {min(min(p) for p in knn['recall'][k]):.3f} at worst" for k in sorted(knn["recall"], key=int))
    else:
        note = ""
    fig = lines_figure({f"k = {k}": (states, knn["k"][k]) for k in ks}, xlabel="hidden state (0 = embedding output)",
                       ylabel="mean Jaccard of k-NN sets", title=f"k-NN overlap: {doc['a']} vs {doc['b']}", ylim=(0.0, 1.02))
    return (f"<h3>k-NN overlap (Table 4)</h3><p class=\"note\">Mean per-token Jaccard of cosine neighbour sets (self "
            f"excluded) on {_e(knn.get('n_tokens'))} sampled tokens (seed {_e(knn.get('seed'))}, {_e(knn.get('search'))} "
            f"search{_e(note)}); the summary reads k = {_e(knn_k(ks, t.knn_k))}.</p>"
            + _table(["hidden state", *(f"k = {k}" for k in ks)], rows)
            + f"<div class=\"figs\">{_figure(fig, 'k-NN overlap per hidden state')}</div>")


def _probe_section(doc: Mapping[str, Any], t: Thresholds) -> str:
    from hrsa.analyze.report.figures import probe_figure

    probe, a, b = doc["metrics"]["probe"], str(doc["a"]), str(doc["b"])
    states = sorted(probe, key=int)
    both = all("reverse" in probe[k] for k in states)
    directions = [(a, a, lambda e: e["source"]), (a, b, lambda e: e["target"])]
    if both:
        directions += [(b, b, lambda e: e["reverse"]["source"]), (b, a, lambda e: e["reverse"]["target"])]
    cols = [f"{x} \u2192 {y}" for x, y, _ in directions]
    acc = [[get(probe[k])["test"]["accuracy"] for k in states] for _, _, get in directions]
    f1 = [[get(probe[k])["test"]["macro_f1"] for k in states] for _, _, get in directions]
    rows = [[k, *(_num(v[i]) for v in acc), *(_num(v[i]) for v in f1), _num(probe[k].get("chance")),
             _num(probe_transfer([probe[k]], min_signal=t.probe_min_signal))] for i, k in enumerate(states)]
    header = ["hidden state", *(f"accuracy {c}" for c in cols), *(f"F1 {c}" for c in cols), "majority class", "transfer"]
    bars = {f"fitted on {x}, tested on {y}": v for (x, y, _), v in zip(directions, acc)}
    fig = probe_figure([int(k) for k in states], bars, chance=max(float(probe[k].get("chance") or 0.0) for k in states),
                       title=f"cross-model linear probes: {a} vs {b}")
    n = probe[states[0]]["source"]["test"].get("n") if states else None
    return ("<h3>Cross-model linear probes (Figure 4)</h3><p class=\"note\">Test-split accuracy and macro-F1 "
            f"({_e(n)} documents); X \u2192 Y: fitted on X's hidden state, applied to Y's. Transfer = (target - chance) / "
            "(source - chance), pooled over the directions whose source beats chance by "
            f"{t.probe_min_signal:g} or more.</p>" + _table(header, rows)
            + f"<div class=\"figs\">{_figure(fig, 'probe accuracy per hidden state')}</div>")


def _dynamics_section(dyn: Dynamics) -> str:
    from hrsa.analyze.report.figures import dynamics_figure

    curves = {c.label: c for c in (dyn.cka, dyn.dimcorr) if c is not None} | {c.label: c for c in dyn.knn.values()}
    rows = [[str(s), f"{pa} vs {pb}", *(_num(c.mean[i]) for c in curves.values()), str(dyn.results[i])]
            for i, (s, (pa, pb)) in enumerate(zip(dyn.steps, dyn.pairs))]
    return (f"<h2 id=\"dynamics\">Training dynamics (Figure 5): {_e(dyn.runs[0])} vs {_e(dyn.runs[1])}</h2>"
            "<p class=\"note\">Means over matched hidden states at each training step; thin lines: each hidden state.</p>"
            f"<div class=\"figs\">{_figure(dynamics_figure(dyn), 'training dynamics', wide=True)}</div>"
            + _table(["step", "pair", *curves, "results file"], rows))


def _thresholds_section(t: Thresholds) -> str:
    rows = [[name, rule] for name, rule in t.describe().items()]
    return ("<h2 id=\"thresholds\">Thresholds</h2><p class=\"note\">Each metric is averaged over the matched hidden "
            "states (and probe directions) and counted as preserved when it reaches its threshold; a level is "
            "preserved when all of its metrics are, restructured when one is not (representation: dimension-wise "
            "correlation and H_inv; geometry: linear CKA and k-NN overlap; function: cross-model probes). Defaults "
            "are the constants of <code>hrsa.analyze.report.summary</code>.</p>" + _table(["metric", "preserved when"], rows))


# --- HTML pieces -------------------------------------------------------------------------------------------


class _Raw(str):
    """HTML already built (and escaped) here: :func:`_table` inserts it as is."""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, spans: Mapping[str, int] | None = None) -> str:
    """An HTML table; numbers (as :func:`_num` formats them) right-aligned; None cells are covered by a rowspan.

    ``spans`` gives the rowspan of a row's first two cells, keyed by the first cell's text.
    """
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        span = (spans or {}).get(str(row[0]), 1) if row and row[0] is not None else 1
        cells = []
        for j, cell in enumerate(row):
            if cell is None:
                continue
            attrs = f' rowspan="{span}"' if span > 1 and j < 2 else ""
            if isinstance(cell, _Verdict):
                attrs += f' class="{cell.replace(" ", "-")}"'
            elif isinstance(cell, _Num):
                attrs += ' class="num"'
            cells.append(f"<td{attrs}>{cell if isinstance(cell, _Raw) else _e(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Num(str):
    """A formatted number (right-aligned in tables)."""


class _Verdict(str):
    """A verdict ("preserved", ...): its cell is coloured by it."""


def _num(value: Any) -> _Num:
    """3 decimals; integers as they are; None or NaN (an undefined metric) as "n/a"."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return _Num("n/a")
    if isinstance(value, int) and not isinstance(value, bool):
        return _Num(str(value))
    text = f"{float(value):.3f}"
    return _Num("0.000" if text == "-0.000" else text)


def _verdict(verdict: str) -> _Verdict:
    return _Verdict(verdict)


def _figure(fig: Figure, caption: str, *, wide: bool = False) -> str:
    """A matplotlib figure as an embedded PNG (base64 data URI) with its caption; ``wide`` takes the page's width."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    cls = ' class="wide"' if wide else ""
    return f'<figure{cls}><img src="data:image/png;base64,{data}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _states(states: Sequence[int] | None) -> str:
    s = list(states or [])
    if len(s) > 2 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return ", ".join(map(str, s)) or "none"


def _compact(value: Any) -> str | None:
    if not isinstance(value, Mapping):
        return None if value is None else str(value)
    return ", ".join(f"{k}={v}" for k, v in value.items() if v not in (None, False)) or "all tokens"

