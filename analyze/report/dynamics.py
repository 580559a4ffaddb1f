"""Training dynamics files: one ``results.json`` per training step of a pair of runs, and their curves (Figure 5).

This module owns the dynamics file (its schema, :func:`write_dynamics`, :func:`load_dynamics`) and the curves read
from it; :func:`hrsa.analyze.report.figures.dynamics_figure` draws them.

A dynamics file (``"schema": "hrsa.dynamics/1"``) lists the two training runs compared and, per step, the
``results.json`` of that step's comparison. Step 0 is the runs' backbones, before any training: a series starts
where the two models started, so the curves show how far training moved them apart or together. Paths are stored
relative to the dynamics file's folder when they lie under it (so the folder can move), absolute otherwise::

    {
      "schema": "hrsa.dynamics/1",
      "runs": [str, str],                         # e.g. the base- and the RLVR-initialised embedding training runs
      "name": str,                                # optional: the series' name in figures (default "A vs B")
      "steps": [{"step": int, "results": str}],   # sorted by step, each step once; step 0: the backbones
      "hrsa_version": str, "created": str         # ISO 8601, UTC
    }

:func:`load_dynamics` reads every step's results back and keeps, per metric, the mean over the matched hidden
states at each step and the value of each hidden state (NaN where a step lacks one); :func:`mean_changes` says
how far each mean moved from the first step to the last. The means follow the verdicts' rule
(:func:`hrsa.analyze.report.summary.left_out_of_means`): the embedding output (hidden state 0) is left out unless
asked for (:meth:`Dynamics.averaged`), so a step's mean is its Table 2 value. Every step must have compared the same
tokens (corpus, token filter, token count, matched hidden states): a curve through other token sets is refused.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from hrsa.analyze.report.summary import KNN_K, embedding_skip, floats, knn_k, layer_values
from hrsa.analyze.results import ResultsFile, ResultsFileError, read_results
from hrsa.runtime.files import write_atomic
from hrsa.runtime.locations import beside, is_url, parse_location, read_text

__all__ = ["SCHEMA", "Curve", "Dynamics", "DynamicsError", "MeanChange", "load_dynamics", "mean_changes",
           "write_dynamics"]

SCHEMA = "hrsa.dynamics/1"


class DynamicsError(ResultsFileError):
    """Bad input to :func:`write_dynamics`, or a dynamics file that cannot be read (a dynamics file is a results
    file of a training run's steps, so it is a :class:`ResultsFileError` too)."""


@dataclass(frozen=True)
class Curve:
    """One metric against the training step.

    Attributes:
        label: the metric's name in figures.
        mean: per step, the mean over the hidden states that step has (NaN when it has none), the embedding output
            left out as the verdicts leave it out (unless ``exclude_embedding`` is False).
        layers: {hidden state: per step value (NaN where that step lacks it)}.
        states: per step, the hidden states it has values of (what ``mean`` averages, before the rule).
        exclude_embedding: whether ``mean`` leaves out the embedding output (hidden state 0) where others remain.
    """

    label: str
    mean: tuple[float, ...]
    layers: Mapping[int, tuple[float, ...]]
    states: tuple[tuple[int, ...], ...] = ()
    exclude_embedding: bool = True

    def averaged(self, exclude_embedding: bool) -> Curve:
        """This curve with its means taken by the verdicts' rule for ``exclude_embedding``."""
        if exclude_embedding == self.exclude_embedding or not self.states:
            return self
        return replace(self, mean=_means(self.layers, self.states, exclude_embedding), exclude_embedding=exclude_embedding)


@dataclass(frozen=True)
class Dynamics:
    """A pair of training runs compared step by step.

    Attributes:
        runs: the two runs; steps: training steps, increasing (0: the backbones); results: each step's results.json.
        pairs: each step's (A, B) model ids as its results.json names them.
        cka: matched-layer linear CKA; dimcorr: mean dimension-wise correlation (None when no step has it).
        knn: {k: k-NN overlap} for every k of any step.
        name: the series' name in figures and the report ("A vs B" unless the file names it).
    """

    runs: tuple[str, str]
    steps: tuple[int, ...]
    results: tuple[ResultsFile, ...]
    pairs: tuple[tuple[str, str], ...]
    cka: Curve | None
    dimcorr: Curve | None
    knn: Mapping[int, Curve]
    name: str = ""

    def averaged(self, exclude_embedding: bool) -> Dynamics:
        """Every curve with its means taken by the verdicts' rule for ``exclude_embedding`` (a report's
        ``--include-embedding-output`` counts hidden state 0 in the curves as in Table 2)."""
        return replace(self, cka=self.cka.averaged(exclude_embedding) if self.cka else None,
                       dimcorr=self.dimcorr.averaged(exclude_embedding) if self.dimcorr else None,
                       knn={k: c.averaged(exclude_embedding) for k, c in self.knn.items()})

    @property
    def exclude_embedding(self) -> bool:
        """Whether the curves' means leave out the embedding output (hidden state 0), as the verdicts do by default."""
        return all(c.exclude_embedding for c in self.curves.values())

    @property
    def curves(self) -> dict[str, Curve]:
        """Every curve by its label: CKA, dimension-wise r, then k-NN overlap per k."""
        single = {c.label: c for c in (self.cka, self.dimcorr) if c is not None}
        return single | {c.label: c for c in self.knn.values()}


@dataclass(frozen=True)
class MeanChange:
    """How far one metric's mean over hidden states moved along a series.

    Attributes:
        label: the metric; first_step, last_step: the first and last steps where it is defined;
        first, last: its mean there; change: last - first (> 0: the two runs grew more alike).
    """

    label: str
    first_step: int
    last_step: int
    first: float
    last: float

    @property
    def change(self) -> float:
        return self.last - self.first


def write_dynamics(path: Path, *, runs: tuple[str, str], steps: Sequence[int], results: Sequence[Path],
                   name: str | None = None) -> Path:
    """Write a dynamics file listing ``results[i]`` as the comparison at training step ``steps[i]``.

    Args:
        path: the JSON file to write (its folder is created).
        runs: the two training runs compared.
        steps: one training step per results file, each once.
        results: results.json files (or folders holding one), checked to be ``hrsa analyze`` results.
        name: the series' name in figures and the report (default "A vs B").

    Returns:
        ``path``.

    Raises:
        DynamicsError: not two runs, steps and results of different lengths, a repeated or negative step,
            or a results path that holds no valid results.json.
    """
    path = Path(path)
    if len(runs) != 2 or not all(isinstance(r, str) and r for r in runs):
        raise DynamicsError(f"Expected two training run names. Got {list(runs)!r} instead.")
    if len(steps) != len(results) or not steps:
        raise DynamicsError(f"Expected one results.json per step. Got {len(steps)} steps and {len(results)} results "
                            "instead. Pass as many of each.")
    clean = _check_steps(list(steps))
    loaded = [read_results(r) for r in results]  # validates each; (file, document)
    files = [f for f, _ in loaded]
    _check_same_tokens(sorted(zip(clean, (d for _, d in loaded)), key=lambda e: e[0]), path)
    entries = [{"step": s, "results": _relative(f, path.parent)} for s, f in sorted(zip(clean, files))]
    from hrsa import __version__

    doc = {"schema": SCHEMA, "runs": list(runs), **({"name": name} if name else {}), "steps": entries,
           "hrsa_version": __version__, "created": datetime.now(UTC).isoformat(timespec="seconds")}
    return write_atomic(path, json.dumps(doc, indent=1) + "\n")


def load_dynamics(path: Path | str, *, exclude_embedding: bool = True) -> Dynamics:
    """Read a dynamics file and every step's results.json into curves.

    Args:
        path: the dynamics file, or the folder holding it as ``dynamics.json``; a URL (``s3://...``) too, whose
            steps' results are then read at URLs beside it.
        exclude_embedding: leave the embedding output (hidden state 0) out of each step's means where others remain,
            as the verdicts do by default (:meth:`Dynamics.averaged` switches afterwards).

    Raises:
        DynamicsError: not a readable ``hrsa.dynamics/1`` file, one that :func:`write_dynamics` would not write (not
            two run names, a step repeated, negative or not an integer, a name that is not text), a step's
            results.json missing or invalid, or steps that compared other tokens (:func:`_check_same_tokens`).
    """
    path = _dynamics_file(path)
    doc = _read_json(path)
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise DynamicsError(f"Expected a dynamics file of schema {SCHEMA} at {path}. Got {got!r} instead. "
                            "Pass a pipeline's <out>/dynamics/<series>/dynamics.json (a results.json goes among "
                            "RESULTS), or write one with hrsa.analyze.report.dynamics.write_dynamics.")
    runs, entries = _parse_dynamics(doc, path)
    loaded = [read_results(p) for _, p in entries]
    docs = [d for _, d in loaded]
    _check_same_tokens([(s, d) for (s, _), d in zip(entries, docs)], path)
    return Dynamics(
        runs=runs, steps=tuple(s for s, _ in entries), results=tuple(f for f, _ in loaded),
        pairs=tuple((str(d["a"]), str(d["b"])) for d in docs),
        cka=_curve("linear CKA", docs, lambda d: _matched(d, "cka"), exclude_embedding),
        dimcorr=_curve("mean dimension-wise r", docs, lambda d: _matched(d, "dimcorr"), exclude_embedding),
        knn=_knn_curves(docs, exclude_embedding),
        name=doc.get("name") or f"{runs[0]} vs {runs[1]}",
    )


def _dynamics_file(path: Path | str) -> ResultsFile:
    """The file ``path`` names: itself, or a series' folder's dynamics.json (as a pair's folder stands for its
    results.json), on this machine or at a URL (a pipeline's remote out)."""
    if is_url(path):
        where = parse_location(path)
        try:
            folder = where.kind() == "folder"
        except OSError:  # reading it says what went wrong, naming the URL
            folder = False
        return where.child("dynamics.json").url if folder else where.url
    path = Path(path)
    return path / "dynamics.json" if path.is_dir() else path


#: What makes two steps' numbers points of one curve: the same tokens compared, at the same hidden states.
_SAME_TOKENS = ("corpus", "token_filter", "n_tokens", "matched_hidden_states")
#: And of k-NN curves: the same seeded subsample of those tokens, at the same hidden states.
_SAME_KNN_SAMPLE = ("n_tokens", "seed", "hidden_states")


def _check_same_tokens(steps: Sequence[tuple[int, Mapping[str, Any]]], path: ResultsFile) -> None:
    """Refuse steps whose results compared other tokens than the first step's (another corpus, token filter or token
    count) or other hidden states: a curve through them would join numbers that measure different things.

    Raises:
        DynamicsError: the first field that differs, naming both steps and ``path``.
    """
    if not steps:
        return
    first_step, first = steps[0]
    # k-NN against the first step that has it: a step analysed without k-NN (a gap the curve allows) at the start
    # left every later step's sample unchecked
    knn_step, first_knn = next(((s, d["metrics"]["knn"]) for s, d in steps if d["metrics"].get("knn")), (None, {}))
    for step, doc in steps[1:]:
        for name in _SAME_TOKENS:
            if doc.get(name) != first.get(name):
                raise DynamicsError(
                    f"Expected every step of {path} to compare the same tokens and hidden states. Got {name} "
                    f"{_short(doc.get(name))} at step {step} but {_short(first.get(name))} at step {first_step} instead: "
                    "a curve across different token sets is not comparable. Analyse every step with the same corpus, "
                    "token selection and hidden states.")
        knn = doc["metrics"].get("knn") or {}
        for name in _SAME_KNN_SAMPLE if knn and first_knn else ():  # k-NN's own sample of those tokens
            if knn.get(name) != first_knn.get(name):
                raise DynamicsError(
                    f"Expected every step of {path} to measure k-NN overlap on the same token sample and hidden states. "
                    f"Got k-NN {name} {_short(knn.get(name))} at step {step} but {_short(first_knn.get(name))} at step "
                    f"{knn_step} instead: overlaps of other samples are not comparable. Analyse every step with the "
                    "same --knn-sample, --seed and --hidden-states.")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


def _check_steps(steps: list[Any]) -> list[int]:
    """The steps as ints: each an integer (a bool is not) >= 0, each once.

    Raises:
        DynamicsError: otherwise.
    """
    ok = all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in steps)
    if not ok or len(set(steps)) != len(steps):
        raise DynamicsError(f"Expected distinct integer training steps >= 0. Got {steps!r} instead.")
    return [int(s) for s in steps]


def _parse_dynamics(doc: Mapping[str, Any], path: ResultsFile) -> tuple[tuple[str, str], list[tuple[int, ResultsFile]]]:
    """The runs and the (step, results path) entries, sorted by step, of a dynamics document, checked as
    :func:`write_dynamics` checks its arguments.

    Raises:
        DynamicsError: the problem, naming ``path``.
    """
    runs, steps, name = doc.get("runs"), doc.get("steps"), doc.get("name")
    if not (isinstance(runs, list) and len(runs) == 2 and all(isinstance(r, str) and r for r in runs)):
        raise DynamicsError(f"Expected runs to be a list of two training run names in {path}. Got {runs!r} instead.")
    if name is not None and not isinstance(name, str):
        raise DynamicsError(f"Expected name to be text in {path}. Got {name!r} instead.")
    if not isinstance(steps, list) or not steps:
        raise DynamicsError(f"Expected steps to be a non-empty list of {{step, results}} in {path}. Got {steps!r} instead.")
    for entry in steps:
        if not (isinstance(entry, dict) and isinstance(entry.get("results"), str) and entry["results"] and "step" in entry):
            raise DynamicsError(f"Expected each entry of steps to be {{\"step\": int, \"results\": str}} in {path}. "
                                f"Got {entry!r} instead.")
    try:
        numbers_ = _check_steps([e["step"] for e in steps])
    except DynamicsError as error:
        raise DynamicsError(f"{error} In {path}: each training step once, with one results.json.") from None
    # Beside a remote dynamics file, its steps' results are at URLs too.
    return (runs[0], runs[1]), sorted((s, beside(path, e["results"])) for s, e in zip(numbers_, steps))


def mean_changes(dyn: Dynamics, *, k: int = KNN_K) -> list[MeanChange]:
    """Per metric (CKA, dimension-wise r, and k-NN overlap at the k closest to ``k``), its mean over hidden
    states at the first and at the last step where it is defined; metrics defined at fewer than two steps are left
    out."""
    curves = [c for c in (dyn.cka, dyn.dimcorr) if c is not None]
    if dyn.knn:
        curves.append(dyn.knn[knn_k(list(dyn.knn), k)])  # type: ignore[index]
    changes = []
    for curve in curves:
        defined = [i for i, v in enumerate(curve.mean) if np.isfinite(v)]
        if len(defined) >= 2:
            i, j = defined[0], defined[-1]
            changes.append(MeanChange(curve.label, dyn.steps[i], dyn.steps[j], curve.mean[i], curve.mean[j]))
    return changes


# Takes one metric out of a step's results document: (its hidden states, its values there, or None without it).
MetricReader = Callable[[Mapping[str, Any]], tuple[Sequence[int], Sequence[Any] | None]]


def _matched(doc: Mapping[str, Any], metric: str) -> tuple[Sequence[int], Sequence[Any] | None]:
    return doc.get("matched_hidden_states", []), doc["metrics"].get(metric, {}).get("diagonal")


def _curve(label: str, docs: Sequence[Mapping[str, Any]], read: MetricReader, exclude_embedding: bool = True) -> Curve | None:
    """Per step, the (hidden states, values) that ``read`` takes from the step's document."""
    per_step: list[dict[int, float]] = []
    for doc in docs:
        states, values = read(doc)
        per_step.append(dict(zip((int(k) for k in states), floats(values))) if values is not None else {})
    if not any(per_step):
        return None
    hidden = sorted({k for step in per_step for k in step})
    layers = {k: tuple(step.get(k, np.nan) for step in per_step) for k in hidden}
    states = tuple(tuple(step) for step in per_step)
    return Curve(label, _means(layers, states, exclude_embedding), layers, states, exclude_embedding)


def _means(layers: Mapping[int, Sequence[float]], states: Sequence[Sequence[int]], exclude_embedding: bool) -> tuple[float, ...]:
    """Per step, the mean over its hidden states by the verdicts' rule (:func:`layer_values`), NaN when none is
    defined."""
    skip = embedding_skip(exclude_embedding)
    out = []
    for i, step in enumerate(states):
        values, _ = layer_values([layers[k][i] for k in step], list(step), skip)
        out.append(_nanmean(list(values)))
    return tuple(out)


def _knn_curves(docs: Sequence[Mapping[str, Any]], exclude_embedding: bool = True) -> dict[int, Curve]:
    def overlap_at(k: int) -> MetricReader:
        def get(doc: Mapping[str, Any]) -> tuple[Sequence[int], Sequence[Any] | None]:
            knn = doc["metrics"].get("knn", {})
            return knn.get("hidden_states", []), knn.get("k", {}).get(str(k))
        return get

    ks = sorted({int(k) for d in docs for k in d["metrics"].get("knn", {}).get("k", {})})
    curves = {k: _curve(f"k-NN overlap, k = {k}", docs, overlap_at(k), exclude_embedding) for k in ks}
    return {k: c for k, c in curves.items() if c is not None}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _relative(file: Path, folder: Path) -> str:
    """``file`` relative to ``folder`` when it lies under it, else absolute."""
    file, folder = file.resolve(), folder.resolve()
    return os.path.relpath(file, folder) if file.is_relative_to(folder) else str(file)


def _read_json(path: ResultsFile) -> Any:
    try:
        return json.loads(read_text(path))
    except (OSError, ValueError) as error:  # a storage's error may span lines: the message stays one
        raise DynamicsError(f"Expected a readable JSON file at {path}. Got an error instead: "
                            f"{' '.join(str(error).split())}.") from None
