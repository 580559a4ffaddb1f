"""Every metric of one matched layer from its Moments, and the scalar scores results.json lists for it.

One table (:data:`_FROM_MOMENTS`) says which function of :mod:`hrsa.analyze.metrics` makes each metric's result,
and :func:`layer_scores` which numbers of that result are the layer's scores, named by where they live in
results.json (``"cka/diagonal"``, ``"procrustes/h_inv"``, ``"regression/r2_b_from_a"``, ...). The jackknife
(:mod:`.uncertainty`) recomputes exactly these scores on each leave-one-group-out statistics.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from hrsa.analyze.accumulators.moments import Moments
from hrsa.analyze.metrics import (
    UnderdeterminedWarning,
    cca_from_moments,
    dimwise_correlation_from_moments,
    effective_rank_from_moments,
    linear_cka_from_moments,
    linear_regression_from_moments,
    procrustes_distance_from_moments,
    procrustes_from_moments,
    pwcca_from_moments,
    svcca_from_moments,
)

__all__ = ["layer_results", "layer_scores"]

_FROM_MOMENTS: dict[str, Callable[[Moments], Any]] = {
    "dimcorr": dimwise_correlation_from_moments,
    "procrustes_distance": procrustes_distance_from_moments,
    "cca": cca_from_moments,
    "svcca": svcca_from_moments,
    "pwcca": pwcca_from_moments,
    "regression": linear_regression_from_moments,
    "effective_rank": effective_rank_from_moments,
}


def layer_results(m: Moments, metrics: tuple[str, ...], *, debiased: bool = False, save_rotation: bool = False,
                  compute_dtype: str = "float64") -> dict[str, Any]:
    """``{metric: result}`` of the metrics asked for that come from Moments (``cka_debiased`` with ``debiased``);
    ``compute_dtype``: the dtype of the products ``m`` was summed from (what Procrustes' rank test resolves)."""
    out: dict[str, Any] = {}
    if "cka" in metrics:
        out["cka"] = linear_cka_from_moments(m)
        if debiased:
            out["cka_debiased"] = linear_cka_from_moments(m, debiased=True)
    if "procrustes" in metrics:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnderdeterminedWarning)  # recorded in the result, warned once per run
            out["procrustes"] = procrustes_from_moments(m, return_rotation=save_rotation,
                                                        product_eps=float(np.finfo(compute_dtype).eps))
    for name, fn in _FROM_MOMENTS.items():
        if name in metrics:
            out[name] = fn(m)
    return out


def layer_scores(results: Mapping[str, Any]) -> dict[str, float]:
    """The scalar scores of :func:`layer_results`' output, by their results.json names."""
    scores: dict[str, float] = {}
    for name, result in results.items():
        for key, attribute in _SCORES[name]:
            scores[f"{_METRIC_OF.get(name, name)}/{key}"] = float(getattr(result, attribute))
    return scores


#: result -> ((results.json key, attribute of the result), ...)
_SCORES: dict[str, tuple[tuple[str, str], ...]] = {
    "cka": (("diagonal", "value"),),
    "cka_debiased": (("debiased_diagonal", "value"),),
    "dimcorr": (("diagonal", "mean"),),
    "procrustes": (("h_inv", "h_inv"), ("similarity", "similarity"), ("residual", "residual")),
    "procrustes_distance": (("distance", "distance"),),
    "cca": (("r2", "r2_cca"), ("mean_rho", "mean_rho")),
    "svcca": (("value", "value"),),
    "pwcca": (("value", "value"),),
    "regression": (("r2_b_from_a", "r2_y_from_x"), ("r2_a_from_b", "r2_x_from_y")),
    "effective_rank": (("a", "effective_rank_x"), ("b", "effective_rank_y")),
}
_METRIC_OF = {"cka_debiased": "cka"}  # results whose scores live under another metric's entry
