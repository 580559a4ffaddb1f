"""Transitional: ``hrsa mine-negatives`` and ``hrsa eval`` now live in :mod:`hrsa.train.cli`.

Kept only so that hrsa/cli.py imports while the restructuring lands; delete this file once cli.py imports
``from hrsa.train.cli import eval_command, mine_negatives_command, train``.
"""

from __future__ import annotations

from hrsa.train.cli import eval_command, mine_negatives_command

__all__ = ["eval_command", "mine_negatives_command"]
