"""Intervals of the local metrics over their documents (pure numpy).

Tokens of one document are not independent draws (they share a topic, a style, often near-duplicate
states), so an interval that resamples tokens is too narrow. Both intervals here count *documents*:

- :func:`document_bootstrap_interval`: the mean of per-token values (k-NN overlap's Jaccard J_i) over the
  sampled tokens, a 95% percentile bootstrap resampling documents with replacement, B = 1000 times with a fixed seed
  (Efron & Tibshirani 1993, ch. 13; the cluster bootstrap of Davison & Hinkley 1997, sec. 3.8), a document's tokens
  in or out together. With per-document sums s_g and counts n_g, a replicate that draws document g w_g times
  (w ~ Multinomial(G, 1/G)) has mean sum_g w_g s_g / sum_g w_g n_g, so a replicate costs a weighted sum, not a new
  search. Fewer than :data:`MIN_BOOTSTRAP_DOCUMENTS` documents give no interval (NaN): one document resampled is
  itself every time, a zero-width interval that claimed certainty.
- :func:`accuracy_bootstrap_interval`: a probe's accuracy on its n test documents (one prediction each), the 95%
  Wilson score interval of a binomial proportion (Wilson 1927). Resampling the 0/1 outcomes (what the name says it
  once did) draws Binomial(n, accuracy): at an accuracy of 0 or 1 every replicate is the same, and a test split of
  two documents, both right, read [1, 1].

Both return an :class:`~hrsa.analyze.metrics.uncertainty.Interval` (the type of the streaming metrics'
jackknife intervals): ``low, high`` the interval, ``se`` the replicates' standard deviation (the binomial standard
error for accuracies), ``level`` 0.95, ``n_groups`` the documents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hrsa.analyze.metrics.uncertainty import Interval

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = ["BOOTSTRAP_LEVEL", "BOOTSTRAP_REPLICATES", "MIN_BOOTSTRAP_DOCUMENTS", "accuracy_bootstrap_interval",
           "document_bootstrap_interval"]

BOOTSTRAP_REPLICATES = 1000
BOOTSTRAP_LEVEL = 0.95
MIN_BOOTSTRAP_DOCUMENTS = 4  # fewer: no interval (3 documents have 10 distinct resamples, 1 has one)
_CHUNK_BYTES = 4 << 20  # replicate weights drawn at once: (replicates, G) int64


def _percentile_interval(replicates: np.ndarray, level: float, n_documents: int) -> Interval:
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(low), float(high), float(np.std(replicates, ddof=1)), level, n_documents)


def document_bootstrap_interval(
    values: ArrayLike, documents: ArrayLike, *, replicates: int = BOOTSTRAP_REPLICATES, level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of the mean of ``values``, resampling their documents with replacement.

    Args:
        values: (n,) per-token values (e.g. per-token Jaccard of k-NN overlap).
        documents: (n,) the document of each token (any integer labels).
        replicates: bootstrap replicates B.
        level: coverage of the interval.
        seed: seed of the resampling.

    Returns:
        The Interval of the replicated means (``n_groups``: the documents).

    Example:
        >>> i = document_bootstrap_interval([0.2, 0.2, 0.9, 0.9, 0.5, 0.5, 0.4, 0.6], [0, 0, 1, 1, 2, 2, 3, 3])
        >>> 0.2 <= i.low < 0.5125 < i.high <= 0.9, i.n_groups
        (True, 4)
    """
    v, docs = np.asarray(values, np.float64), np.asarray(documents)
    if v.ndim != 1 or v.shape != docs.shape or v.size == 0:
        raise ValueError(f"Expected (n,) values and (n,) documents, n > 0. Got {v.shape} and {docs.shape} instead.")
    # Step 1: per-document sums and counts.
    _, group = np.unique(docs, return_inverse=True)
    if group.max() + 1 < MIN_BOOTSTRAP_DOCUMENTS:
        return Interval(float("nan"), float("nan"), float("nan"), level, int(group.max()) + 1)
    sums, counts = np.bincount(group, weights=v), np.bincount(group).astype(np.float64)  # (G,), (G,)
    # Step 2: replicate weights w ~ Multinomial(G, 1/G), drawn in chunks; each replicate's mean is a weighted sum.
    rng, g = np.random.default_rng(seed), sums.size
    means = np.empty(replicates)
    step = max(1, _CHUNK_BYTES // (8 * g))
    for i in range(0, replicates, step):
        w = rng.multinomial(g, np.full(g, 1.0 / g), size=min(step, replicates - i))  # (b, G) documents drawn
        means[i : i + len(w)] = (w @ sums) / (w @ counts)
    return _percentile_interval(means, level, g)


def accuracy_bootstrap_interval(
    accuracy: float, n: int, *, replicates: int = BOOTSTRAP_REPLICATES, level: float = BOOTSTRAP_LEVEL, seed: int = 0
) -> Interval:
    """The Wilson score interval of an accuracy over n test documents (``replicates`` and ``seed`` are unused: it is
    exact arithmetic; kept so both intervals are called alike).

    Args:
        accuracy: fraction of the n documents predicted right.
        n: test documents (0 gives (nan, nan)).
        level: coverage of the interval.

    Returns:
        The Interval (``se``: the binomial standard error; ``n_groups``: n).

    Example:
        >>> i = accuracy_bootstrap_interval(0.9, 100)
        >>> round(i.low, 3), round(i.high, 3)
        (0.826, 0.945)
        >>> round(accuracy_bootstrap_interval(1.0, 2).low, 3)  # two right of two: far from certain
        0.342
    """
    from scipy.stats import norm

    del replicates, seed
    if n <= 0 or not np.isfinite(accuracy):
        return Interval(float("nan"), float("nan"), float("nan"), level, max(n, 0))
    z2 = float(norm.ppf((1 + level) / 2)) ** 2
    centre = (accuracy + z2 / (2 * n)) / (1 + z2 / n)
    half = np.sqrt(z2 * accuracy * (1 - accuracy) / n + z2 * z2 / (4 * n * n)) / (1 + z2 / n)
    return Interval(float(max(0.0, centre - half)), float(min(1.0, centre + half)),
                    float(np.sqrt(accuracy * (1 - accuracy) / n)), level, n)
