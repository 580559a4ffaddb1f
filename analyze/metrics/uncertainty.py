"""How sure a score is: intervals from groups of documents, and where the score of unrelated tokens would fall.

Interval (delete-a-group jackknife; Quenouille 1956, Tukey 1958; Efron & Stein 1981). With the score
theta computed on all tokens and theta_(g) on all but group g of whole documents (G groups), the standard
error is

    se^2 = (G - 1) / G * sum_g (theta_(g) - mean_g theta_(g))^2

and the interval is theta +- t_{G-1, (1 + level) / 2} * se. It needs nothing but the leave-one-group-out
statistics, which come from per-group accumulators of the one pass
(:class:`hrsa.analyze.accumulators.groups.GroupedMoments`), so no second read of the store. Groups of whole
documents make it honest about tokens of one document being alike; the t quantile with G - 1 degrees of
freedom keeps a small number of groups from claiming too much. Coverage is checked by simulation in the tests.

Null baseline: the score the same statistics would give if the token pairing carried no information, i.e.
under a uniform random permutation of B's tokens against A's. Each metric that has it in closed form
provides it (``linear_cka_null``, ``dimwise_correlation_null``); :class:`NullBaseline` holds its mean and
standard deviation, and :meth:`NullBaseline.within` says whether a score is indistinguishable from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_LEVEL", "Interval", "NullBaseline", "jackknife_interval"]

DEFAULT_LEVEL = 0.95
#: A score counts as within the null when it is less than this many null standard deviations above its mean.
NULL_Z = 3.0


@dataclass(frozen=True)
class Interval:
    """A confidence interval of one score.

    Attributes:
        low, high: the interval's ends (NaN when the score or its spread is undefined).
        se: the standard error it was built from.
        level: its nominal coverage (0.95).
        n_groups: groups of documents the jackknife left out one at a time.
    """

    low: float
    high: float
    se: float
    level: float
    n_groups: int

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class NullBaseline:
    """A score's distribution when B's tokens are shuffled against A's (uniform random permutation).

    Attributes:
        mean, std: its exact mean and standard deviation over all permutations.
    """

    mean: float
    std: float

    def within(self, value: float, z: float = NULL_Z) -> bool:
        """``value`` is less than ``z`` null standard deviations above the null mean: no evidence of a relation."""
        return bool(value < self.mean + z * self.std)


def jackknife_interval(estimate: float, leave_one_out: Sequence[float], level: float = DEFAULT_LEVEL) -> Interval:
    """The delete-a-group jackknife interval around ``estimate`` (see the module docstring).

    Args:
        estimate: the score on all tokens.
        leave_one_out: the score without each group in turn (at least 2 groups).
        level: nominal coverage.

    Example:
        >>> i = jackknife_interval(0.5, [0.49, 0.51, 0.50, 0.50])
        >>> round(i.se, 6), round(i.low, 4), round(i.high, 4)
        (0.012247, 0.461, 0.539)
    """
    from scipy.stats import t as student_t

    values = np.asarray(leave_one_out, dtype=np.float64)
    g = values.size
    if g < 2 or not math.isfinite(estimate) or not np.all(np.isfinite(values)):
        return Interval(math.nan, math.nan, math.nan, level, g)
    se = math.sqrt((g - 1) / g * float(np.sum((values - values.mean()) ** 2)))
    half = float(student_t.ppf((1 + level) / 2, g - 1)) * se
    return Interval(estimate - half, estimate + half, se, level, g)
