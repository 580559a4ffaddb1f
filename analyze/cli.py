"""``hrsa analyze``: every flag is a field of :class:`~hrsa.analyze.config.AnalyzeConfig` (flag > YAML > default);
the job is :func:`hrsa.analyze.job.run_analysis`. Thin: parse, run with a progress bar, print."""

from __future__ import annotations

import sys

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hrsa.analyze.config import AnalyzeConfig
from hrsa.analyze.streaming.plan import format_bytes
from hrsa.runtime.resident import resident_bytes
from hrsa.runtime.cli_options import config_file_option, config_options, field_help

if TYPE_CHECKING:
    from hrsa.analyze.streaming.plan import AnalysisPlan

__all__ = ["analyze"]

_METAVARS = {"metrics": "LIST", "docs": "0,3,5-9", "positions": "A:B", "k": "5,10,50", "hidden_states": "0,6,12", "fields": "LIST"}


def _load_libraries() -> None:
    """Import what the passes, the metrics and the figures import on first use (Dask, SciPy, matplotlib: ~100 MB
    resident), so that the resident set printed beside the plan holds them: the budget bounds the peak above it."""
    import dask.delayed  # noqa: F401
    import dask.threaded  # noqa: F401
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import scipy.linalg  # noqa: F401
    import scipy.stats  # noqa: F401
    import threadpoolctl  # noqa: F401


@click.command("analyze")
@config_file_option
@click.option("--pair", nargs=2, default=None, metavar="A B", help=field_help(AnalyzeConfig, "pair"))
@config_options(AnalyzeConfig, exclude=("pair",), metavars=_METAVARS)
def analyze(config_file: Path | None, **flags: Any) -> None:
    """Compare hidden states of models A and B of a store with HRSA (CKA, dimension-wise correlation, Procrustes,
    k-NN overlap, cross-model linear probes).

    Flags left out take their value from --config, else their default (flags default to None for that).
    """
    from rich.console import Console
    from rich.progress import Progress

    from hrsa.analyze.config import load_config
    from hrsa.analyze.job import run_analysis
    from hrsa.analyze.report.summary import alignment_line, summary_table

    config = load_config(config_file, flags)
    console = Console(stderr=True)
    progress = Progress(console=console, transient=True)
    task = progress.add_task("tokens x passes", total=None)

    def on_plan(plan: AnalysisPlan) -> None:  # the bar shows from the plan on: an error before it stays one line
        console.print(plan.describe())
        _load_libraries()  # before the resident set is read: it is the part outside the budget
        console.print(f"  this process: {format_bytes(resident_bytes())} resident before the passes (interpreter, "
                      "libraries and the corpus table: outside the budget)")
        progress.update(task, total=plan.passes * plan.inputs.n_tokens)
        progress.start()

    try:
        run = run_analysis(config, on_plan=on_plan, on_block=lambda n: progress.advance(task, n))
    finally:
        if progress.live.is_started:  # stopping a bar never shown still prints a line
            progress.stop()
    for line in run.warnings:
        click.echo(f"hrsa: warning: {line}", err=True)
    # A log (stdout not a terminal) gets the whole table at any width; a terminal folds cells, never cuts them.
    Console(width=None if sys.stdout.isatty() else 240).print(summary_table(run.saved.doc))
    if alignment_line(run.saved.doc):
        click.echo(alignment_line(run.saved.doc))
    metrics, rows = run.saved.doc["metrics"], list(run.saved.doc["matched_hidden_states"])
    for name, label, states in (("knn", "k-NN overlap", (metrics.get("knn") or {}).get("hidden_states")),
                                ("probe", "probes", [int(k) for k in metrics.get("probe") or {}] or None)):
        if states is not None and list(states) != rows:  # the table above has no column for them
            click.echo(f"{label} at hidden states {list(states)}: not in the table above (its rows are the matched "
                       f"hidden states); see results.json (metrics.{name}) and the figures")
    click.echo(f"wrote {run.saved.json_path}" + "".join(f", {p.name}" for p in run.figures)
               + (f"; store: {run.saved.store_path}" if run.saved.store_path else ""))

