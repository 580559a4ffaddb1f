"""Evaluations in the report: `hrsa eval`'s ``eval.json`` files (schema ``hrsa.eval/1``) as one table of main scores,
a row per checkpoint evaluated, a column per task, so the embedding models' task scores sit beside the HRSA levels
they are read against (the paper's question: does the RLVR backbone's embedding model score differently?).

Read as JSON (analyze/ does not import train/): only what the table shows is checked, and a file that is not an
eval.json, or whose scores are not numbers, is refused in one line rather than drawn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hrsa.analyze.report.html_blocks import escape, number, table
from hrsa.analyze.results import ResultsFile, ResultsFileError
from hrsa.runtime.locations import read_text

__all__ = ["EVAL_SCHEMA", "EvalFileError", "Evaluation", "evaluation_section", "load_evaluation"]

EVAL_SCHEMA = "hrsa.eval/1"  # hrsa.train.evaluate.SCHEMA, which analyze/ may not import (a test keeps them equal)


class EvalFileError(ResultsFileError):
    """A file given as an eval.json that is not one `hrsa eval` would write."""


@dataclass(frozen=True)
class Evaluation:
    """One eval.json: the model evaluated, its tasks (name, main score's name), and per checkpoint (its name, its step
    or None for a lone model) each task's main score (None where the row lacks that task)."""

    file: ResultsFile
    model: str
    tasks: tuple[tuple[str, str], ...]
    rows: tuple[tuple[str, int | None, dict[str, float | None]], ...]


def load_evaluation(path: ResultsFile) -> Evaluation:
    """Read an eval.json (a local path or a URL).

    Raises:
        EvalFileError: unreadable, another schema, or tasks, checkpoints or main scores of the wrong kind.
    """
    try:
        doc = json.loads(read_text(path))
    except (OSError, ValueError) as error:
        raise EvalFileError(f"Expected a readable eval.json at {path}. Got an error instead: "
                            f"{' '.join(str(error).split())}.") from None
    if not isinstance(doc, dict) or doc.get("schema") != EVAL_SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise EvalFileError(f"Expected an eval.json of schema {EVAL_SCHEMA} at {path}. Got {got!r} instead. Pass the "
                            "eval.json that `hrsa eval` (or a pipeline's eval stage) wrote.")
    try:
        tasks = tuple((str(t["name"]), str(t["main_score_name"])) for t in doc["tasks"])
        rows = tuple(_row(c, [name for name, _ in tasks]) for c in doc["checkpoints"])
    except (KeyError, TypeError, ValueError) as error:
        raise EvalFileError(f"Expected tasks and checkpoints as `hrsa eval` writes them in {path}. Got "
                            f"{type(error).__name__}: {error} instead. Evaluate again to rewrite it.") from None
    return Evaluation(path, str(doc.get("model", "")), tasks, rows)


def _name(file: ResultsFile) -> str:
    """What an evaluation is called: its folder's name (a pipeline's ``<out>/eval/<name>/eval.json``, an ``--out``)."""
    return str(file).rstrip("/").rsplit("/", 2)[-2] if "/" in str(file) else str(file)


def _row(checkpoint: dict[str, Any], tasks: list[str]) -> tuple[str, int | None, dict[str, float | None]]:
    step = checkpoint["step"]
    if step is not None and type(step) is not int:
        raise ValueError(f"step {step!r} is not an integer")
    results = checkpoint["results"]
    return str(checkpoint["name"]), step, {task: _score(results[task]) if task in results else None for task in tasks}


def _score(result: dict[str, Any]) -> float:
    value = result["main_score"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"main_score {value!r} is not a number")
    return float(value)


def evaluation_section(evaluations: Sequence[Evaluation]) -> str:
    """The evaluations' main scores: a table per evaluation, a row per checkpoint (in step order)."""
    if not evaluations:
        return ""
    parts = ['<h2 id="evaluations">Task scores of the models</h2><p class="note">Each model (or each checkpoint of a '
             "training run) on its evaluation's tasks, as `hrsa eval` scored them with mteb: the task's main score "
             "(nDCG@10 for retrieval, accuracy for classification).</p>"]
    for ev in evaluations:
        header = ["checkpoint", "step", *(f"{name} ({score})" for name, score in ev.tasks)]
        rows = [[name, "" if step is None else str(step), *(number(row[t]) if row[t] is not None else "" for t, _ in ev.tasks)]
                for name, step, row in sorted(ev.rows, key=lambda r: (r[1] is not None, r[1] or 0))]
        parts.append(f"<h3>{escape(_name(ev.file))}</h3><p class=\"meta\">{escape(ev.model)}, from {escape(str(ev.file))}"
                     f"</p>{table(header, rows)}")
    return "\n".join(parts)
