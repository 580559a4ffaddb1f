"""Pieces shared by the metric modules: the warning class and the checks on Moments."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hrsa.analyze.accumulators.moments import Moments

__all__ = ["PrecisionWarning", "UnderdeterminedWarning", "check_min_tokens", "check_same_hidden_size"]


class UnderdeterminedWarning(UserWarning):
    """A metric was asked of fewer tokens than it needs to be well defined.

    Raised as a warning (not an error) because the number is still computed: e.g. with N <= D tokens the
    Procrustes rotation O* is not unique, so its inverse row entropy means little, while the residual and
    the similarity remain well defined.
    """


class PrecisionWarning(UserWarning):
    """A score computed from float32 products may be off by more than 1e-6: the data are too ill-conditioned for
    them (e.g. Procrustes' rotation where C_xy has tiny singular values). float64 products fix it."""


def check_same_hidden_size(m: Moments, metric: str) -> int:
    """Return D for a metric defined only for Dx == Dy; raise ValueError otherwise."""
    if m.dx != m.dy:
        raise ValueError(
            f"Expected hidden states of equal size for {metric}. Got Dx = {m.dx} and Dy = {m.dy} instead. "
            "Use linear CKA (or procrustes_similarity) to compare hidden states of different sizes."
        )
    return m.dx


def check_min_tokens(m: Moments, needed: int, metric: str) -> None:
    """Raise ValueError when a metric needs at least ``needed`` tokens and ``m`` has fewer."""
    if m.n < needed:
        raise ValueError(f"Expected at least {needed} tokens for {metric}. Got {m.n} instead. Add tokens.")
