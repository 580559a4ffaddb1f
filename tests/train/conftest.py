"""Fixtures shared by the training-side verbs' tests."""

from __future__ import annotations

from collections.abc import Callable

import click
import pytest


@pytest.fixture()
def verb_cli() -> Callable[[click.Command], click.Group]:
    """A CLI group of hrsa's own class holding one verb: its errors print as `hrsa` prints them, without importing
    every other verb."""
    from hrsa.cli import _Hrsa

    def make(command: click.Command) -> click.Group:
        @click.group(cls=_Hrsa)
        def group() -> None:
            pass

        group.add_command(command)
        return group

    return make


@pytest.fixture()
def eval_cli(verb_cli: Callable[[click.Command], click.Group]) -> click.Group:
    """``hrsa eval`` alone, as :func:`verb_cli` makes it."""
    from hrsa.train.cli import eval_command

    return verb_cli(eval_command)
