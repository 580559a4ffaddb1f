"""The progress of one pipeline stage: a bar below the stage's line on a terminal, removed when it ends; plain
periodic lines in a log (:class:`hrsa.runtime.progress.LineProgress`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from hrsa.runtime.progress import LineProgress

__all__ = ["stage_progress"]


@contextmanager
def stage_progress(console: Console, unit: str) -> Iterator[tuple[Progress, TaskID]]:
    """A transient bar counting ``unit`` (e.g. "tokens"): ``with stage_progress(console, unit) as (progress, task)``.

    The total starts unknown; the stage sets it (``progress.update(task, total=...)``) once it knows.
    """
    progress = LineProgress(TextColumn("    "), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(),
                            console=console, label=unit, transient=True)
    with progress:
        yield progress, progress.add_task("stage", total=None)
