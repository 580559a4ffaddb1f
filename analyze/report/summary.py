"""Summaries of one pair from its ``results.json`` mapping: Table 2 verdicts and the terminal table.

Verdicts in the style of the paper's Table 2: is each level of a pair's representations preserved or restructured?

HRSA reads a comparison at three levels (DESIGN.md, Metrics):

- representation: are the coordinates kept? mean dimension-wise correlation, and Procrustes H_inv (does O* map
  each axis to about one axis?);
- geometry: is the shape kept, whatever the basis? linear CKA (global) and k-NN overlap (local);
- function: does a linear readout carry over? cross-model probes, as the share of the source model's
  above-chance test accuracy that the other model keeps ("transfer", pooled over hidden states and directions).

Each metric is averaged over the pair's matched hidden states (the embedding output, hidden state 0, left out
unless :attr:`Thresholds.exclude_embedding` is off; hidden states where the metric is undefined left out and named
in the check's detail) and compared with its threshold; a level is "preserved" when every metric it has passes, "restructured" when one
fails, "not measured" when results.json has none of its metrics, and for the function level "no signal" when the probes
ran but no source readout beat chance (there is nothing to carry over, so transfer is undefined). The thresholds are the named constants below,
overridable through :class:`Thresholds`.

A study reads several Table 2s side by side (the paper's: the backbones, then the embedding models trained from
them): a :class:`Comparison` is one such column, whose levels may come from several results of the same two
models (representation and geometry on CoT traces, function from probes on a labelled corpus);
:func:`merge_levels` takes each level from the first of them that measured it.

:func:`summary_table` is the per-layer table ``hrsa analyze`` prints. Also here: the small readers of the
document that the figures and the report share (:func:`floats`, :func:`knn_k`, :func:`probe_directions`,
:func:`probe_transfer`, :func:`score_uncertainty`). Pure: works on the parsed ``results.json`` document, reads no files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hrsa.analyze.metrics.knn_overlap import chance_overlap
from hrsa.store.errors import UserError

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "CKA_PRESERVED",
    "DIMCORR_PRESERVED",
    "H_INV_PRESERVED",
    "KNN_K",
    "KNN_PRESERVED",
    "LEVELS",
    "MORE_LAYER_SCORES",
    "PROBE_MIN_SIGNAL",
    "PROBE_TRANSFER_PRESERVED",
    "Comparison",
    "ComparisonError",
    "LevelVerdict",
    "MetricCheck",
    "PairSummary",
    "ProbeDirection",
    "ScoreUncertainty",
    "Thresholds",
    "Verdict",
    "check_comparisons",
    "embedding_skip",
    "floats",
    "knn_k",
    "layer_values",
    "left_out_of_means",
    "merge_levels",
    "probe_directions",
    "probe_transfer",
    "score_uncertainty",
    "summarize",
    "summary_table",
]

# Linear CKA of independently trained networks at matching layers is typically 0.6-0.9 (Kornblith et al. 2019);
# 0.9 and above leaves little beyond a rotation and an isotropic scale between the two spaces.
CKA_PRESERVED = 0.9
# Mean Jaccard of the k-NN sets: 0.5 means two thirds of each token's neighbours are shared
# (|A n B| = 2k/3 for |A| = |B| = k); unrelated spaces give about k / N.
KNN_PRESERVED = 0.5
# The k whose overlap the verdict reads (the middle of the paper's 5/10/50); the closest k present otherwise.
KNN_K = 10
# r = 0.8: each coordinate shares 64% of its variance with the same coordinate of the other model, so the
# basis is kept; a rotated copy of a space scores about 0 however similar its geometry is.
DIMCORR_PRESERVED = 0.8
# H_inv = 1 - mean row entropy of O*^2 / ln D, so 0.9 means each row spreads over about D^0.1 axes (under two
# for D = 576): O* is close to a permutation. A random rotation gives about 0.73 / ln D (0.11 at D = 576).
H_INV_PRESERVED = 0.9
# A probe moved to the other model keeps at least 90% of its above-chance test accuracy.
PROBE_TRANSFER_PRESERVED = 0.9
# A source probe less than 5 points above chance has almost nothing to transfer: its ratio would be noise
# (e.g. 0.15 - 0.55 over 0.60 - 0.55 = -8), so such a direction is left out of the transfer.
PROBE_MIN_SIGNAL = 0.05

Verdict = Literal["preserved", "restructured", "not measured", "no signal"]
LEVELS = ("representation", "geometry", "function")


@dataclass(frozen=True)
class Thresholds:
    """The lowest values counted as "preserved" (defaults: this module's constants)."""

    cka: float = CKA_PRESERVED
    knn: float = KNN_PRESERVED
    knn_k: int = KNN_K
    dimcorr: float = DIMCORR_PRESERVED
    h_inv: float = H_INV_PRESERVED
    probe_transfer: float = PROBE_TRANSFER_PRESERVED
    probe_min_signal: float = PROBE_MIN_SIGNAL
    exclude_embedding: bool = True  # hidden state 0 is the token embedding, not a layer's output

    def describe(self) -> dict[str, str]:
        """Each rule in words, for the report."""
        return {
            "hidden states averaged": "every matched one but the embedding output (hidden state 0)"
            if self.exclude_embedding else "every matched one, the embedding output (hidden state 0) included",
            "mean dimension-wise correlation": f">= {self.dimcorr:g}",
            "Procrustes H_inv": f">= {self.h_inv:g}",
            "linear CKA": f">= {self.cka:g}",
            f"k-NN overlap (k = {self.knn_k}, or the closest k analysed)": f">= c + {self.knn:g} (1 - c), c the overlap "
                                                                           "of unrelated models on the sample",
            "probe transfer: sum(target - chance) / sum(source - chance) over hidden states and directions whose "
            f"source is >= {self.probe_min_signal:g} above chance": f">= {self.probe_transfer:g}",
        }


@dataclass(frozen=True)
class MetricCheck:
    """One metric of a level against its threshold.

    Attributes:
        metric: its name in the report; value: the mean over hidden states (and probe directions);
        threshold: the lowest value counted as preserved; passed: value >= threshold;
        detail: what was averaged (e.g. "mean of 4 hidden states; lowest 0.812 at 3").
    """

    metric: str
    value: float
    threshold: float
    passed: bool
    detail: str


@dataclass(frozen=True)
class LevelVerdict:
    """One level (representation, geometry or function): its verdict and the checks behind it."""

    level: str
    verdict: Verdict
    checks: tuple[MetricCheck, ...]


@dataclass(frozen=True)
class PairSummary:
    """The three levels of one pair, A against B."""

    a: str
    b: str
    levels: tuple[LevelVerdict, ...]

    def verdict(self, level: str) -> Verdict:
        return next(lv.verdict for lv in self.levels if lv.level == level)


def summarize(doc: Mapping[str, Any], *, thresholds: Thresholds | None = None) -> PairSummary:
    """Verdicts per level of one ``results.json`` document (schema ``hrsa.analyze/1``).

    Args:
        doc: the parsed document.
        thresholds: the rules (default: the module's constants).

    Returns:
        A PairSummary with the levels in the order of :data:`LEVELS`.
    """
    t = thresholds or Thresholds()
    m = doc.get("metrics", {})
    states = doc.get("matched_hidden_states", [])
    skip = embedding_skip(t.exclude_embedding)
    checks: dict[str, list[MetricCheck | None]] = {
        "representation": [
            _check("mean dimension-wise correlation", m.get("dimcorr", {}).get("diagonal"), states, t.dimcorr, skip),
            _h_inv_check(m.get("procrustes"), states, t.h_inv, skip),
        ],
        "geometry": [_check("linear CKA", m.get("cka", {}).get("diagonal"), states, t.cka, skip),
                     _knn_check(m.get("knn"), t, skip)],
        "function": [_probe_check(m.get("probe"), t, skip)],
    }
    # Probes that ran but found nothing above chance to carry over (no hidden state's source readout beat chance by
    # the minimum signal): measured, and said so, not "not measured" (the probe table below shows them).
    unreadable = {"function": bool(m.get("probe")) and checks["function"] == [None]}
    levels = []
    for level in LEVELS:
        done = tuple(c for c in checks[level] if c is not None)
        verdict: Verdict = ("preserved" if all(c.passed for c in done) else "restructured") if done else (
            "no signal" if unreadable.get(level) else "not measured")
        levels.append(LevelVerdict(level, verdict, done))
    return PairSummary(str(doc.get("a", "A")), str(doc.get("b", "B")), tuple(levels))


class ComparisonError(UserError, ValueError):
    """A comparison that names results the report was not given."""


@dataclass(frozen=True)
class Comparison:
    """One column of the side-by-side Table 2: two models, and the results (positions in the report's list) that
    measure their levels, in the order they are read."""

    label: str
    results: tuple[int, ...]


def merge_levels(summaries: Sequence[PairSummary]) -> tuple[tuple[LevelVerdict, int | None], ...]:
    """Each level of :data:`LEVELS` from the first of ``summaries`` that measured it, with that summary's position
    (None and "not measured" when none did)."""
    merged = []
    for i, level in enumerate(LEVELS):
        found = next(((s.levels[i], j) for j, s in enumerate(summaries) if s.levels[i].verdict != "not measured"), None)
        merged.append(found or (LevelVerdict(level, "not measured", ()), None))
    return tuple(merged)


def check_comparisons(comparisons: Sequence[Comparison], n_results: int) -> None:
    """Raise :class:`ComparisonError` when a comparison names no results or a position outside ``0..n_results-1``."""
    bad = sorted({i for c in comparisons for i in c.results if not 0 <= i < n_results})
    empty = [c.label for c in comparisons if not c.results]
    if bad or empty:
        got = ", ".join(map(str, bad)) if bad else f"no results in {empty}"
        raise ComparisonError(f"Expected comparisons of results 0-{n_results - 1}. Got {got} instead. "
                              "Name positions in the list of results given to the report.")


def floats(values: Sequence[Any] | None) -> np.ndarray:
    """A JSON list of numbers as float64, null (an undefined metric) as NaN."""
    return np.array([np.nan if v is None else float(v) for v in values or ()], dtype=np.float64)


def knn_k(available: Sequence[int | str], wanted: int = KNN_K) -> int | None:
    """The k of ``available`` closest to ``wanted`` (the smaller on a tie), or None when there is none."""
    ks = sorted(int(k) for k in available)
    return min(ks, key=lambda k: (abs(k - wanted), k)) if ks else None


@dataclass(frozen=True)
class ProbeDirection:
    """One direction of a cross-model probe: fitted on one model's hidden state, tested on a model's.

    Attributes:
        fitted_on, tested_on: model ids; keys: where its scores sit in a results.json probe entry
            (``("source",)``, ``("target",)``, ``("reverse", "source")``, ``("reverse", "target")``).
    """

    fitted_on: str
    tested_on: str
    keys: tuple[str, ...]

    @property
    def label(self) -> str:
        """In words, for legends: "fitted and tested on A", "fitted on A, tested on B"."""
        if self.fitted_on == self.tested_on:
            return f"fitted and tested on {self.fitted_on}"
        return f"fitted on {self.fitted_on}, tested on {self.tested_on}"

    def accuracy_interval(self, entry: Mapping[str, Any]) -> tuple[float, float] | None:
        """The Wilson interval of this direction's test accuracy in one hidden state's probe entry, if recorded."""
        for key in self.keys[:-1]:
            entry = entry[key]
        found = (entry.get("test_accuracy_interval") or {}).get(self.keys[-1])
        return None if found is None or None in found else (float(found[0]), float(found[1]))

    def scores(self, entry: Mapping[str, Any]) -> Mapping[str, Any]:
        """This direction's ``{"train": ..., "dev": ..., "test": ...}`` in one hidden state's probe entry."""
        for key in self.keys:
            entry = entry[key]
        return entry


def probe_directions(probe: Mapping[str, Any], a: str, b: str) -> list[ProbeDirection]:
    """The directions a results.json ``probe`` mapping holds: A -> A and A -> B, then B -> B and B -> A when every
    hidden state has its reverse."""
    directions = [ProbeDirection(a, a, ("source",)), ProbeDirection(a, b, ("target",))]
    if probe and all("reverse" in entry for entry in probe.values()):
        directions += [ProbeDirection(b, b, ("reverse", "source")), ProbeDirection(b, a, ("reverse", "target"))]
    return directions


def probe_transfer(entries: Sequence[Mapping[str, Any]], *, min_signal: float = PROBE_MIN_SIGNAL) -> float:
    """Share of the source probes' above-chance test accuracy that the target keeps, pooled over ``entries``.

    ``entries`` are results.json probe entries (one per hidden state); each direction (A -> B, and B -> A when
    present) adds ``target - chance`` and ``source - chance``; directions whose source is less than ``min_signal``
    above chance are left out. NaN when none is left.
    """
    kept = gained = 0.0
    for entry in entries:
        chance = float(entry.get("chance") or 0.0)
        for direction in (entry, entry.get("reverse")):
            if not direction:
                continue
            source, target = direction["source"]["test"]["accuracy"], direction["target"]["test"]["accuracy"]
            if source is not None and target is not None and source - chance >= min_signal:
                kept += target - chance
                gained += source - chance
    return kept / gained if gained > 0 else float("nan")


def embedding_skip(exclude_embedding: bool) -> tuple[int, ...]:
    """The hidden states that means over hidden states leave out by rule: the embedding output (hidden state 0, the
    token embedding, not a layer), unless asked to count it (``--include-embedding-output``)."""
    return (0,) if exclude_embedding else ()


def left_out_of_means(states: Sequence[int], n_values: int, skip: Sequence[int]) -> list[int]:
    """The hidden states of ``skip`` (the embedding output, unless asked to count it) that a mean over ``states``
    leaves out: those among ``states`` when others remain (and the values follow ``states`` one to one). The one rule
    of every mean over hidden states: the verdicts' and the training-dynamics curves'."""
    return [k for k in skip if k in states and len(states) == n_values and len(states) > 1]


def layer_values(values: Sequence[Any] | None, states: Sequence[int], skip: Sequence[int] = ()) -> tuple[np.ndarray, list[int]]:
    """``values`` (one per hidden state of ``states``) as float64 with the hidden states :func:`left_out_of_means`
    names set to NaN, and those hidden states: a mean over hidden states is ``np.nanmean`` of the first."""
    v = floats(values)
    left_out = left_out_of_means(states, len(v), skip)
    if left_out:
        v = np.where(np.isin(states, left_out), np.nan, v)
    return v, left_out


def _check(name: str, values: Sequence[Any] | None, states: Sequence[int], threshold: float,
           skip: Sequence[int] = (), *, set_aside: Sequence[bool] | None = None) -> MetricCheck | None:
    """The mean of ``values`` (one per hidden state of ``states``) against ``threshold``; hidden states in ``skip``
    are left out when others remain. Hidden states where the metric is undefined (null, NaN) are left out too, and
    named; those of ``set_aside`` (left out for a reason the caller names) are not named again."""
    raw = floats(values)
    v, left_out = layer_values(values, states, skip)
    aside = np.zeros(len(v), dtype=bool) if set_aside is None else np.asarray(set_aside, dtype=bool)
    if aside.any():
        v = np.where(aside, np.nan, v)
    if not np.isfinite(v).any():
        return None
    mean = float(np.nanmean(v))
    low = int(np.nanargmin(v))
    where = f" at {states[low]}" if len(states) == len(v) else ""
    detail = f"mean of {int(np.isfinite(v).sum())} hidden states; lowest {v[low]:.3f}{where}"
    if left_out:
        detail += "; embedding output (hidden state 0) left out"
    undefined = [i for i in range(len(raw)) if not np.isfinite(raw[i]) and not aside[i]
                 and not (len(states) == len(raw) and states[i] in left_out)]
    if undefined:
        named = f" ({[states[i] for i in undefined]})" if len(states) == len(raw) else ""
        detail += f"; left out {len(undefined)} where undefined{named}"
    return MetricCheck(name, mean, threshold, mean >= threshold, detail)


def _h_inv_check(procrustes: Mapping[str, Any] | None, states: Sequence[int], threshold: float,
                 skip: Sequence[int] = ()) -> MetricCheck | None:
    """H_inv over the hidden states where O* is unique: elsewhere any rotation fits as well, and its row entropy
    says nothing of the pair (an identical model on 30 distinct tokens gave 0.29). The detail names those left out."""
    if not procrustes:
        return None
    values = floats(procrustes.get("h_inv"))
    undetermined = np.asarray(procrustes.get("underdetermined") or [False] * len(values), dtype=bool)
    check = _check("Procrustes H_inv", list(values), states, threshold, skip,
                   set_aside=undetermined if len(undetermined) == len(values) else None)
    if not undetermined.any():
        return check
    left_out = [k for k, bad in zip(states, undetermined) if bad] if len(states) == len(values) else []
    why = f"left out {len(left_out) or int(undetermined.sum())} where O* is not unique{f' ({left_out})' if left_out else ''}"
    if check is None:
        return None
    return MetricCheck(check.metric, check.value, check.threshold, check.passed, f"{check.detail}; {why}")


def _knn_check(knn: Mapping[str, Any] | None, t: Thresholds, skip: Sequence[int] = ()) -> MetricCheck | None:
    """The overlap against the threshold taken above chance: c + t (1 - c), c the mean overlap of unrelated models on
    the same sample (at k = 10 of 15 tokens 0.56: a 0.5 threshold alone counted unrelated models as preserved)."""
    k = knn_k(knn.get("k", {}), t.knn_k) if knn else None
    if k is None:
        return None
    chance = _knn_chance(knn, k)  # type: ignore[arg-type]
    if chance >= 1.0:
        return None  # k = n - 1: every token is every token's neighbour in both models
    threshold = chance + t.knn * (1.0 - chance)
    check = _check(f"k-NN overlap at k = {k}", knn["k"][str(k)], knn.get("hidden_states", []), threshold, skip)  # type: ignore[index]
    if check is None or chance < 1e-3:
        return check
    return replace(check, detail=f"{check.detail}; {chance:.3f} by chance alone on {knn.get('n_tokens')} sampled "  # type: ignore[union-attr]
                                 f"tokens: threshold {t.knn:g} of the way from it to 1")


def _knn_chance(knn: Mapping[str, Any], k: int) -> float:
    """The recorded chance overlap at k; for records without one (older hrsa), from the sample size."""
    recorded = (knn.get("chance") or {}).get(str(k))
    if recorded is not None:
        return float(recorded)
    n = knn.get("n_tokens")
    return chance_overlap(k, int(n)) if isinstance(n, int) and n > k else 0.0


def _probe_check(probe: Mapping[str, Any] | None, t: Thresholds, skip: Sequence[int] = ()) -> MetricCheck | None:
    if not probe:
        return None
    kept = {k: e for k, e in probe.items() if int(k) not in skip}
    probe = kept or probe  # the embedding output alone: kept
    value = probe_transfer(list(probe.values()), min_signal=t.probe_min_signal)
    if not math.isfinite(value):
        return None
    directions = "both directions" if all("reverse" in e for e in probe.values()) else "A \u2192 B"
    detail = f"test accuracy, pooled over {len(probe)} hidden states, {directions}"
    return MetricCheck("probe transfer", value, t.probe_transfer, value >= t.probe_transfer, detail)


#: Per-layer scores of the measures beyond the paper's, as the tables show them: (label, metric, results.json key).
MORE_LAYER_SCORES = (
    ("Procrustes distance", "procrustes_distance", "distance"),
    ("CCA R²", "cca", "r2"),
    ("SVCCA", "svcca", "value"),
    ("PWCCA", "pwcca", "value"),
    ("R² of B from A", "regression", "r2_b_from_a"),
    ("R² of A from B", "regression", "r2_a_from_b"),
    ("effective rank of A", "effective_rank", "a"),
    ("effective rank of B", "effective_rank", "b"),
)


@dataclass(frozen=True)
class ScoreUncertainty:
    """What results.json says of one per-layer score's uncertainty (``score_uncertainty``).

    Attributes:
        intervals: (low, high) per hidden state (NaN where undefined), or None without intervals.
        within_null: per hidden state, whether the score is indistinguishable from that of shuffled tokens (below the
            null mean + ``null_z`` null standard deviations), or None without a null.
        null_high: that bound per hidden state, or None.
    """

    intervals: list[tuple[float, float]] | None
    within_null: list[bool] | None
    null_high: list[float] | None

    def plus_minus(self, i: int) -> float | None:
        """Half the interval's width at hidden state number ``i``, or None."""
        if self.intervals is None or not all(map(math.isfinite, self.intervals[i])):
            return None
        return (self.intervals[i][1] - self.intervals[i][0]) / 2


def score_uncertainty(doc: Mapping[str, Any], metric: str, key: str) -> ScoreUncertainty:
    """The interval and null of ``doc["metrics"][metric][key]`` (e.g. ``"cka"``, ``"diagonal"``), where recorded."""
    m = doc["metrics"].get(metric, {})
    raw = (m.get("intervals") or {}).get(key)
    ends = floats([v for pair in raw or () for v in pair]).reshape(-1, 2)  # null ends (undefined) as NaN
    intervals = [(float(lo), float(hi)) for lo, hi in ends] if raw else None
    null = m.get("null", {}).get(key)
    if not null:
        return ScoreUncertainty(intervals, None, None)
    z = float(doc.get("uncertainty", {}).get("null_z", 3.0))
    high = floats(null["mean"]) + z * floats(null["std"])
    values = floats(m.get(key))
    within = [bool(v < h) for v, h in zip(values, high, strict=True)]
    return ScoreUncertainty(intervals, within, [float(h) for h in high])


def alignment_line(doc: dict[str, Any]) -> str | None:
    """How many tokens of each model were aligned, when B ran over another token sequence (None otherwise)."""
    aligned = doc.get("alignment")
    if not aligned:
        return None
    n, a, b = aligned["aligned"], aligned["tokens_a"], aligned["tokens_b"]
    return (f"aligned by content span: {n} tokens, {n / max(a, 1):.1%} of {doc['a']}'s {a} and {n / max(b, 1):.1%} of "
            f"{doc['b']}'s {b} (B on corpus {aligned['corpus_b']})")


def summary_table(doc: Mapping[str, Any]) -> Table:
    """The per-layer numbers of one results.json mapping as a rich table, for the terminal (``hrsa analyze``).

    One row per matched hidden state; a column per number the results hold (k-NN and probe columns only when they
    were measured at exactly the matched hidden states). Null (NaN) shows as ``nan``.
    """
    from rich.table import Table

    m, states = doc["metrics"], list(doc["matched_hidden_states"])
    columns: dict[str, list[str]] = {}
    if "cka" in m:
        columns["CKA"] = _with_uncertainty(doc, "cka", "diagonal")
        if "debiased_diagonal" in m["cka"]:
            columns["debiased CKA"] = _with_uncertainty(doc, "cka", "debiased_diagonal")
    if "dimcorr" in m:
        columns["dimcorr mean r"] = _with_uncertainty(doc, "dimcorr", "diagonal")
        columns["degenerate dims"] = [str(n) for n in m["dimcorr"]["n_degenerate"]]
    if "procrustes" in m:
        columns["H_inv"] = _with_uncertainty(doc, "procrustes", "h_inv")
        columns["residual"] = _with_uncertainty(doc, "procrustes", "residual")
    for label, metric, key in MORE_LAYER_SCORES:
        if key in m.get(metric, {}):
            columns[label] = _with_uncertainty(doc, metric, key)
    knn, probe = m.get("knn"), m.get("probe")
    if knn is not None and list(knn["hidden_states"]) == states:
        ends = knn.get("intervals") or {}
        columns.update({f"kNN@{k}": _cells(values, ends.get(k), None) for k, values in knn["k"].items()})
    if probe is not None and [int(k) for k in probe] == states:
        source, target = ([e[side]["test"]["accuracy"] for e in probe.values()] for side in ("source", "target"))
        columns["probe test acc A / A->B"] = [f"{s} / {t}" for s, t in zip(_fixed(source, 3), _fixed(target, 3))]
    title = f"{doc['a']} vs {doc['b']} on {doc['n_tokens']} tokens"
    if doc.get("alignment"):
        title += " aligned by content span"
    unc = doc.get("uncertainty") or {}
    if unc.get("method"):
        title += (f"\n± half the {unc['level']:.0%} {unc['method']} interval over {unc['groups']} groups of documents; "
                  "dim: no more than shuffled tokens give")
    table = Table("hidden state", *columns, title=title, title_justify="left")
    for column in table.columns:
        column.overflow = "fold"  # a narrow terminal wraps a number, never cuts it to "0.81…"
    for i, k in enumerate(states):
        table.add_row(str(k), *(values[i] for values in columns.values()))
    return table


def _with_uncertainty(doc: Mapping[str, Any], metric: str, key: str) -> list[str]:
    """A per-layer score's cells (``_cells``) from results.json's intervals and null."""
    unc = score_uncertainty(doc, metric, key)
    return _cells(doc["metrics"][metric][key], unc.intervals, unc.within_null)


def _cells(values: Sequence[Any], intervals: Sequence[Sequence[Any]] | None, within_null: Sequence[bool] | None) -> list[str]:
    """4 decimals, ``± half-width`` below where there is an interval (two lines keep columns narrow), dimmed where
    the score is within its null (rich markup)."""
    cells = _fixed(values, 4)
    for i, cell in enumerate(cells):
        ends = floats(intervals[i]) if intervals is not None else None
        if ends is not None and cell != "nan" and np.all(np.isfinite(ends)):
            cell = f"{cell}\n±{(ends[1] - ends[0]) / 2:.4f}"
        cells[i] = f"[dim]{cell}[/dim]" if within_null and within_null[i] else cell
    return cells


def _fixed(values: Sequence[Any], decimals: int) -> list[str]:
    """Each value with ``decimals`` decimals; null as ``nan`` (as the metric's NaN printed before it was written)."""
    return [f"{v:.{decimals}f}" for v in floats(values)]
