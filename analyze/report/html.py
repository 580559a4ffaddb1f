"""``hrsa report``'s page: one self-contained HTML file from the ``results.json`` of one or more analysed pairs.

This module owns the page (:func:`render_report`: title, sections in order, style) and writing it
(:func:`write_report`). The sections are :mod:`hrsa.analyze.report.sections`; their building blocks
:mod:`hrsa.analyze.report.html_blocks`. Figures are PNGs embedded as base64 data URIs: no external file, URL or
script. Every text from the results is escaped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hrsa.analyze.report.dynamics import Dynamics, load_dynamics
from hrsa.analyze.report.evals import Evaluation, evaluation_section, load_evaluation
from hrsa.analyze.report.html_blocks import CSS, escape
from hrsa.analyze.report.sections import (
    dynamics_section,
    identity_warnings,
    overview_section,
    pair_section,
    table_2_section,
    thresholds_section,
    warnings_section,
)
from hrsa.analyze.report.summary import Comparison, Thresholds, check_comparisons, summarize
from hrsa.analyze.results import ResultsFile, find_results, read_results
from hrsa.runtime.files import write_atomic
from hrsa.runtime.locations import is_url
from hrsa.store.errors import UserError

__all__ = ["ReportInputs", "ReportOutError", "read_report_inputs", "render_report", "report_warnings", "write_report"]


class ReportOutError(UserError, ValueError):
    """The report's output path is one of the files it reads: writing it would destroy an input."""


@dataclass(frozen=True)
class ReportInputs:
    """Everything a report is drawn from, read once.

    Attributes:
        docs: (results.json, document) per analysed pair, in order; dynamics: one series per dynamics file;
        dynamics_files: those files; evaluations: one per eval.json (`hrsa eval`'s task scores).
    """

    docs: tuple[tuple[ResultsFile, dict[str, Any]], ...]
    dynamics: tuple[Dynamics, ...] = ()
    dynamics_files: tuple[ResultsFile, ...] = ()
    evaluations: tuple[Evaluation, ...] = ()

    def files(self) -> list[tuple[str, ResultsFile]]:
        """(what, path or URL) of every file read: results.json files, dynamics files, and each series' steps."""
        return ([("results file", f) for f, _ in self.docs] + [("dynamics file", f) for f in self.dynamics_files]
                + [("results file of a dynamics step", f) for d in self.dynamics for f in d.results]
                + [("eval file", e.file) for e in self.evaluations])

    def named(self, name: Callable[[ResultsFile], ResultsFile]) -> ReportInputs:
        """These inputs with every file named as ``name`` says, for the page: a pipeline's remote out names its
        files by their URLs, not by its local copy (a temporary folder, gone once the run ends)."""
        return ReportInputs(tuple((name(f), doc) for f, doc in self.docs),
                            tuple(replace(d, results=tuple(name(f) for f in d.results)) for d in self.dynamics),
                            tuple(name(f) for f in self.dynamics_files),
                            tuple(replace(e, file=name(e.file)) for e in self.evaluations))


def read_report_inputs(results: Sequence[Path | str], *,
                       dynamics: Path | str | Sequence[Path | str] | None = None,
                       evals: Sequence[Path | str] = ()) -> ReportInputs:
    """Read and check the results.json files (or folders holding one), dynamics files and eval.json files of a
    report, on this machine or at URLs (``s3://bucket/out/pairs``: a pipeline's remote out), each named as given.

    Raises:
        ResultsFileError: an empty list, a path without results.json, an invalid results, dynamics or eval file.
    """
    docs = tuple(read_results(f) for f in find_results(results))
    given = [dynamics] if isinstance(dynamics, (str, Path)) else list(dynamics or ())
    files = tuple(f if is_url(f) else Path(f) for f in given)  # a URL read where it is (Path() would mangle it)
    evaluations = tuple(load_evaluation(f if is_url(f) else Path(f)) for f in evals)
    return ReportInputs(docs, tuple(load_dynamics(f) for f in files), files, evaluations)


def report_warnings(inputs: ReportInputs) -> list[str]:
    """What the report warns of, one line each (the page shows them under its title; ``hrsa report`` prints them on
    stderr): model ids that name different models across the results."""
    return identity_warnings(inputs.docs)


def _check_out(out: Path, inputs: ReportInputs) -> None:
    """Refuse an output path that is one of the inputs (the report would overwrite it)."""
    target = out.resolve()
    for what, path in inputs.files():
        if isinstance(path, str):  # a URL: never the local file written
            continue
        if path.resolve() == target or (out.exists() and path.exists() and os.path.samefile(out, path)):
            raise ReportOutError(f"Expected --out to be a file apart from the report's inputs. Got {out}, the {what} "
                                 f"{path} it reads, instead. Pick another --out.")


def write_report(results: Sequence[Path | str] | ReportInputs, out: Path | str, *,
                 dynamics: Path | str | Sequence[Path | str] | None = None, title: str | None = None,
                 thresholds: Thresholds | None = None, comparisons: Sequence[Comparison] | None = None,
                 description: str | None = None) -> Path:
    """Write one self-contained HTML report of the analysed pairs ``results``.

    Args:
        results: results.json files, or folders holding one (one per pair; order kept); or the inputs already read
            by :func:`read_report_inputs` (then ``dynamics`` must be None: they hold theirs).
        out: the HTML file to write (its folder is created); never one of the files read.
        dynamics: ``hrsa.dynamics/1`` files (:mod:`hrsa.analyze.report.dynamics`), one per series, for the
            training-dynamics section (one file alone is fine).
        title: the report's title (default: the pairs compared).
        thresholds: the summary's rules (default: :mod:`hrsa.analyze.report.summary`'s constants).
        comparisons: the columns of the side-by-side Table 2, each naming positions in ``results`` (default: each
            results file its own column).
        description: a paragraph under the title (what the study asks, how to read it).

    Returns:
        ``out``.

    Raises:
        ResultsFileError: an empty list, a path without results.json, a file of another schema, a bad dynamics file.
        ComparisonError: a comparison naming a position outside ``results``.
        ReportOutError: ``out`` is one of the files read (a results.json, a dynamics file or one of its steps).
    """
    if isinstance(results, ReportInputs):
        if dynamics is not None:
            raise TypeError("write_report: pass dynamics to read_report_inputs, not beside the inputs it read")
        inputs = results
    else:
        inputs = read_report_inputs(results, dynamics=dynamics)
    out = Path(out)
    _check_out(out, inputs)
    if comparisons is not None:
        check_comparisons(comparisons, len(inputs.docs))
    page = render_report(inputs.docs, dynamics=inputs.dynamics, title=title, thresholds=thresholds,
                         comparisons=comparisons, description=description, evaluations=inputs.evaluations)
    return write_atomic(out, page)


def render_report(docs: Sequence[tuple[ResultsFile, Mapping[str, Any]]], *,
                  dynamics: Dynamics | Sequence[Dynamics] | None = None, title: str | None = None,
                  thresholds: Thresholds | None = None, comparisons: Sequence[Comparison] | None = None,
                  description: str | None = None, evaluations: Sequence[Evaluation] = ()) -> str:
    """The report's HTML for ``(path, document)`` pairs as :func:`hrsa.analyze.results.read_results` returns them."""
    from hrsa import __version__

    t = thresholds or Thresholds()
    summaries = [summarize(doc, thresholds=t) for _, doc in docs]
    series = [] if dynamics is None else [dynamics] if isinstance(dynamics, Dynamics) else list(dynamics)
    series = [dyn.averaged(t.exclude_embedding) for dyn in series]  # the curves' means by Table 2's rule
    columns = comparisons or [Comparison(f"{d['a']} vs {d['b']}", (i,)) for i, (_, d) in enumerate(docs)]
    title = title or "HRSA report: " + "; ".join(f"{d['a']} vs {d['b']}" for _, d in docs)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    parts = [f"<h1>{escape(title)}</h1>",
             f'<p class="meta">Generated by hrsa {escape(__version__)} on {escape(now)} from {len(docs)} results file(s).</p>',
             warnings_section(identity_warnings(docs)),
             f"<p>{escape(description)}</p>" if description else "", overview_section(summaries), table_2_section([d for _, d in docs], summaries, columns, t)]
    for i, ((path, doc), summary) in enumerate(zip(docs, summaries)):
        parts.append(pair_section(i, path, doc, summary, t))
    if series:
        parts.append(dynamics_section(series))
    parts.append(evaluation_section(evaluations))
    parts.append(thresholds_section(t))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body><main>\n" + "\n".join(parts)
            + "\n</main></body></html>\n")
