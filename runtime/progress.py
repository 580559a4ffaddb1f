"""Progress that reads in a log too: rich's bars on a terminal, plain periodic lines anywhere else.

A rich bar on a console that is not a terminal (output piped to a file, a CI log, ``ray job logs``) draws nothing
until it stops, so a stage of ten minutes shows no sign of life. :class:`LineProgress` is rich's ``Progress``
that, on such a console, prints one plain line per task when it starts, then at most every ``every`` seconds, and
once when it stops, e.g. ``    tokens 12,288/40,960 (30%) 0:00:42`` or ``    training 8/16 (50%) loss 0.6776 0:01:10``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import Progress, Task, TaskID

__all__ = ["LineProgress", "gathered_warnings", "progress_line"]


class LineProgress(Progress):
    """rich's ``Progress``; on a console that is not a terminal, plain lines instead of a bar.

    Args:
        columns: the bar's columns (as rich's Progress takes them).
        console: where it draws (default: rich's global console).
        label: the name of what is counted, first on each plain line (e.g. "tokens", "training").
        every: seconds between two plain lines of one task.
        disable: show nothing at all (neither bar nor lines).
    """

    def __init__(self, *columns: Any, console: Console | None = None, label: str = "", every: float = 15.0,
                 disable: bool = False, **options: Any) -> None:
        from rich import get_console

        console = console or get_console()
        self._lines = not disable and (not console.is_terminal or console.is_dumb_terminal)
        super().__init__(*columns, console=console, disable=disable or self._lines, **options)
        self._label, self._every = label, every
        self._last_line: dict[TaskID, tuple[float, float]] = {}  # when each task's last line was printed, at what count

    def update(self, task_id: TaskID, **changes: Any) -> None:
        super().update(task_id, **changes)
        self._line(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._line(task_id)

    def stop(self) -> None:
        for task_id in list(self._last_line):
            self._line(task_id, final=True)
        super().stop()

    def _line(self, task_id: TaskID, *, final: bool = False) -> None:
        """One plain line for the task: the first time, every ``every`` seconds, and at the end (unless the last
        line already said where it ended)."""
        if not self._lines:
            return
        with self._lock:
            task = self._tasks[task_id]
        now, last = time.monotonic(), self._last_line.get(task_id)
        if last is not None and (now - last[0] < self._every if not final else task.completed == last[1]):
            return
        self._last_line[task_id] = (now, task.completed)
        self.console.print(progress_line(task, self._label), markup=False, highlight=False, emoji=False)


def progress_line(task: Task, label: str) -> str:
    """``    LABEL done/total (pct%) FIELDS elapsed``: a task's state as one plain line (no total: no share)."""
    done = f"{task.completed:,.0f}" + (f"/{task.total:,.0f} ({task.percentage:.0f}%)" if task.total else "")
    fields = " ".join(str(v) for v in task.fields.values() if v not in (None, ""))
    elapsed = time.strftime("%H:%M:%S", time.gmtime(task.elapsed or 0.0)).removeprefix("0")
    return "    " + " ".join(part for part in (label, done, fields, elapsed) if part)


@contextmanager
def gathered_warnings() -> Iterator[list[str]]:
    """Hold back the warnings raised while the block runs (a bar is drawn meanwhile, and a warning printed through it
    tears it): when the block ends, hrsa's own are in the yielded list, each message one line for the caller to
    print (``hrsa: warning: ...``), and Python shows the others as it would have. Each is gathered once per place,
    also when the block raises (the caller prints them before the error)."""
    ours: list[str] = []
    held: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                yield ours
            finally:
                held = list(caught)
    finally:  # a block that raised too: what it warned of before failing still holds
        for w in held:
            if w.category.__module__.startswith("hrsa"):
                ours.append(str(w.message))
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
