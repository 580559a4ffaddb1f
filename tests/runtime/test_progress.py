"""Progress in a log: a console that is not a terminal gets plain lines (first, periodic, final), never a bar."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import BarColumn, TextColumn

from hrsa.runtime.progress import LineProgress


def _log(**options: object) -> tuple[io.StringIO, Console]:
    out = io.StringIO()
    return out, Console(file=out, force_terminal=False, width=100, **options)  # type: ignore[arg-type]


def test_a_log_gets_a_line_at_the_start_then_periodically_and_at_the_end() -> None:
    out, console = _log()
    with LineProgress(TextColumn("x"), BarColumn(), console=console, label="tokens", every=3600) as progress:
        task = progress.add_task("stage", total=None)
        progress.update(task, total=4096)
        for _ in range(4):
            progress.advance(task, 1024)  # within `every` of the first line: no line
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("    tokens 0/4,096 (0%)")
    assert lines[-1].startswith("    tokens 4,096/4,096 (100%)") and len(lines) == 2
    assert "\x1b" not in out.getvalue() and "━" not in out.getvalue()  # no control codes, no bar


def test_fields_such_as_the_loss_are_on_the_line() -> None:
    out, console = _log()
    with LineProgress(TextColumn("training"), console=console, label="training", every=0) as bar:
        task = bar.add_task("train", total=16, loss="")
        bar.update(task, completed=8, loss="loss 0.6776")
    assert "    training 8/16 (50%) loss 0.6776 " in out.getvalue()


def test_a_terminal_gets_the_bar_and_no_lines() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with LineProgress(BarColumn(), console=console, label="tokens", every=0, transient=True) as progress:
        task = progress.add_task("stage", total=10)
        progress.advance(task, 10)
    assert "tokens 10/10" not in out.getvalue()


def test_disabled_shows_nothing() -> None:
    out, console = _log()
    with LineProgress(BarColumn(), console=console, label="tokens", disable=True) as progress:
        progress.advance(progress.add_task("stage", total=10), 10)
    assert out.getvalue() == ""


def test_the_last_line_is_not_repeated() -> None:
    out, console = _log()
    with LineProgress(BarColumn(), console=console, label="tokens", every=0) as progress:
        task = progress.add_task("stage", total=10)
        progress.advance(task, 10)  # a line at 10/10 already
    assert out.getvalue().count("tokens 10/10") == 1


def test_gathered_warnings_hold_hrsa_ones_as_lines_and_show_the_others() -> None:
    """Warnings printed through a bar tore it: they are held until the block ends; hrsa's become the caller's lines
    (raised in an hrsa module, here one made for the test), the others are shown as Python shows them."""
    import types
    import warnings

    from hrsa.runtime.progress import gathered_warnings

    ours = types.ModuleType("hrsa.fake_stage")
    exec("class StageWarning(UserWarning):\n    pass", ours.__dict__)
    with warnings.catch_warnings(record=True) as shown:  # what Python shows (warnings.showwarning) lands here
        with gathered_warnings() as warned:
            warnings.warn(ours.StageWarning("3 of 4 messages are markup"), stacklevel=1)
            warnings.warn("a library's own", DeprecationWarning, stacklevel=1)
            assert warned == [] and shown == []  # nothing shown while the block runs
    assert warned == ["3 of 4 messages are markup"]
    assert [(w.category, str(w.message)) for w in shown] == [(DeprecationWarning, "a library's own")]


def test_gathered_warnings_of_a_block_that_raises_are_kept() -> None:
    """A block that warned and then failed lost its warnings (they were sorted only after a clean exit)."""
    import types
    import warnings

    from hrsa.runtime.progress import gathered_warnings

    ours = types.ModuleType("hrsa.fake_stage")
    exec("class StageWarning(UserWarning):\n    pass", ours.__dict__)
    warned: list[str] = []
    try:
        with gathered_warnings() as warned:
            warnings.warn(ours.StageWarning("2 of 9 contents left as markup"), stacklevel=1)
            raise ValueError("the run failed after it")
    except ValueError:
        pass
    assert warned == ["2 of 9 contents left as markup"]
