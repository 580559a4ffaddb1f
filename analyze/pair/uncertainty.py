"""The uncertainty of each matched layer's scores: jackknife intervals over groups of documents, and null baselines.

A matched pass that keeps its statistics per group of documents (:class:`GroupedMoments`) is finished here into

- its scores on all tokens (:func:`.layer_metrics.layer_scores` of the total: the numbers the results report),
- a delete-a-group jackknife interval for each score (the same scores on each leave-one-group-out statistics),
- the permutation null of biased CKA and of the mean dimension-wise correlation (closed forms, same statistics).

Scores are named by where they live in results.json (``"cka/diagonal"``, ``"procrustes/h_inv"``, ...), so the
writer and the report find them without a table of their own.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from hrsa.analyze.pair.layer_metrics import layer_results, layer_scores
from hrsa.analyze.metrics.dimwise_correlation import dimwise_correlation_null
from hrsa.analyze.metrics.linear_cka import DEBIASED_MIN_TOKENS, linear_cka_null
from hrsa.analyze.metrics.uncertainty import Interval, NullBaseline, jackknife_interval

if TYPE_CHECKING:
    from collections.abc import Mapping

    from hrsa.analyze.accumulators.groups import GroupedMoments
    from hrsa.analyze.accumulators.moments import Moments

__all__ = ["layer_intervals", "layer_nulls"]


def layer_intervals(
    grouped: GroupedMoments, total: Moments, estimates: Mapping[str, float], metrics: tuple[str, ...], debiased: bool
) -> dict[str, Interval]:
    """A jackknife interval for each score in ``estimates``, from one ``without`` per group (module docstring)."""
    left_out: dict[str, list[float]] = {name: [] for name in estimates}
    for _, rest in grouped.leave_one_out(total):
        # Without a big group, a small selection may keep under 4 tokens: no score of so few means anything (CKA
        # and correlations are ~1 for any two models, debiased CKA undefined), so no interval is given (NaN).
        scores = layer_scores(layer_results(rest, metrics, debiased=debiased)) if rest.n >= DEBIASED_MIN_TOKENS else {}
        for name in left_out:
            left_out[name].append(scores.get(name, math.nan))
    return {name: jackknife_interval(estimates[name], values) for name, values in left_out.items()}


def layer_nulls(m: Moments, metrics: tuple[str, ...]) -> dict[str, NullBaseline]:
    """The permutation null of the scores that have one in closed form."""
    nulls: dict[str, NullBaseline] = {}
    if "cka" in metrics:
        nulls["cka/diagonal"] = linear_cka_null(m)
    if "dimcorr" in metrics and m.dx == m.dy:
        nulls["dimcorr/diagonal"] = dimwise_correlation_null(m)
    return nulls
