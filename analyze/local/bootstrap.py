"""Percentile bootstrap intervals of the local metrics, resampling documents (pure numpy).

Tokens of one document are not independent draws (they share a topic, a style, often near-duplicate
states), so an interval that resamples tokens is too narrow. Both intervals here resample *documents* with
replacement, B = 1000 times with a fixed seed, and report the 2.5th and 97.5th percentiles of the replicated
statistic (Efron & Tibshirani 1993, ch. 13; the cluster bootstrap of Davison & Hinkley 1997, sec. 3.8):

- :func:`document_bootstrap_interval`: the mean of per-token values (k-NN overlap's Jaccard J_i) over the
  sampled tokens, a document's tokens in or out together. With per-document sums s_g and counts n_g, a
  replicate that draws document g w_g times (w ~ Multinomial(G, 1/G)) has mean sum_g w_g s_g / sum_g w_g n_g,
  so a replicate costs a weighted sum, not a new search.
- :func:`accuracy_bootstrap_interval`: a probe's accuracy on its test documents (one prediction each). The
  number right in a resample of the n test documents is Binomial(n, accuracy), exactly the distribution of
  resampling their 0/1 outcomes, so replicates are binomial draws.

Both return an :class:`~hrsa.analyze.metrics.uncertainty.Interval` (the type of the streaming metrics'
jackknife intervals): ``low, high`` the percentiles, ``se`` the replicates' standard deviation, ``level`` 0.95,
``n_groups`` the documents resampled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hrsa.analyze.metrics.uncertainty import Interval

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = ["BOOTSTRAP_LEVEL", "BOOTSTRAP_REPLICATES", "accuracy_bootstrap_interval", "document_bootstrap_interval"]

BOOTSTRAP_REPLICATES = 1000
BOOTSTRAP_LEVEL = 0.95
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
        >>> i = document_bootstrap_interval([0.2, 0.2, 0.9, 0.9, 0.5, 0.5], [0, 0, 1, 1, 2, 2])
        >>> 0.2 <= i.low < 0.5333 < i.high <= 0.9, i.n_groups
        (True, 3)
    """
    v, docs = np.asarray(values, np.float64), np.asarray(documents)
    if v.ndim != 1 or v.shape != docs.shape or v.size == 0:
        raise ValueError(f"Expected (n,) values and (n,) documents, n > 0. Got {v.shape} and {docs.shape} instead.")
    # Step 1: per-document sums and counts.
    _, group = np.unique(docs, return_inverse=True)
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
    """Percentile bootstrap interval of an accuracy over n test documents, resampling the documents.

    Args:
        accuracy: fraction of the n documents predicted right.
        n: test documents (0 gives (nan, nan)).
        replicates, level, seed: as :func:`document_bootstrap_interval`.

    Returns:
        The Interval of the replicated accuracies (``n_groups``: n).

    Example:
        >>> i = accuracy_bootstrap_interval(0.9, 100)
        >>> i.low, i.high
        (0.84, 0.96)
    """
    if n <= 0 or not np.isfinite(accuracy):
        return Interval(float("nan"), float("nan"), float("nan"), level, max(n, 0))
    right = np.random.default_rng(seed).binomial(n, accuracy, size=replicates)  # (B,) documents right per resample
    return _percentile_interval(right / n, level, n)
