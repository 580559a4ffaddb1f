"""Dimension-wise correlation: Pearson r of X[:, j] and Y[:, j] for every hidden dimension j.

    r_j = C_xy[j, j] / sqrt(C_xx[j, j] C_yy[j, j])

read off the diagonals of the streaming co-moments (HRSA paper, representation level). It asks whether
the two models keep the *same coordinates*: it requires Dx == Dy and assumes dimension j of A corresponds
to dimension j of B, as it does for a model and its fine-tuned child.

Degenerate dimensions. A dimension whose standard deviation is ~0 in either model (dead units, a
constant bias channel) has no defined correlation. Dimension j counts as degenerate when

    std_j <= rtol * rms_j,   rms_j = sqrt(mean_j^2 + std_j^2)

in X or in Y, i.e. when its variation is below ``rtol`` of its own magnitude (at the default 1e-6, a few
float32 rounding steps; an all-zero dimension is degenerate too). Degenerate dimensions get r = NaN, are
left out of the summary statistics, and are counted in ``n_degenerate``.

Invariances: any positive affine map per dimension on either side (x_j -> s_j x_j + t_j, s_j > 0);
a negative s_j flips the sign of r_j. Not invariant to rotations or permutations of the dimensions:
Y = X Q with a random rotation Q drops the mean correlation to ~0 while CKA stays 1.

Null baseline (``dimwise_correlation_null``): under a uniform random permutation of B's tokens, for centred
columns a, b, c, d, E[a.Pb] = 0 and Cov(a.Pb, c.Pd) = (a.c)(b.d) / (n - 1) exactly, so the mean r over the
usable dimensions S has mean 0 and variance sum_{j,k in S} R^x_jk R^y_jk / (|S|^2 (n - 1)), with R^x, R^y the
correlation matrices of X and Y (from C_xx, C_yy).

Deviation from the paper: the paper reports the mean; the median, quartiles and extremes are added here
because a few outlier dimensions often behave differently from the bulk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hrsa.analyze.metrics._common import check_same_hidden_size
from hrsa.analyze.metrics.uncertainty import NullBaseline
from hrsa.analyze.accumulators.moments import moments

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

    from hrsa.analyze.accumulators.cross_moments import CoMomentSummary
    from hrsa.analyze.accumulators.moments import Moments

__all__ = [
    "DEFAULT_RTOL",
    "DimwiseCorrelationResult",
    "dimwise_correlation",
    "dimwise_correlation_from_moments",
    "dimwise_correlation_from_summaries",
    "dimwise_correlation_null",
]

#: Relative tolerance under which a dimension's spread counts as zero (about 8 float32 epsilons).
DEFAULT_RTOL = 1e-6


@dataclass(frozen=True, eq=False)  # eq=False: ``per_dim`` is an array
class DimwiseCorrelationResult:
    """Summary of the per-dimension Pearson correlations over the non-degenerate dimensions.

    Attributes:
        mean: mean r (the paper's number); NaN if every dimension is degenerate.
        median, q25, q75, min, max: distribution of r over the same dimensions.
        n_dims: D, all dimensions.
        n_degenerate: dimensions left out because their spread is ~0 in X or Y.
        n_tokens: number of tokens.
        per_dim: (D,) r for every dimension, NaN where degenerate.
    """

    mean: float
    median: float
    q25: float
    q75: float
    min: float
    max: float
    n_dims: int
    n_degenerate: int
    n_tokens: int
    per_dim: NDArray[np.float64]


def dimwise_correlation_from_moments(m: Moments, *, rtol: float = DEFAULT_RTOL) -> DimwiseCorrelationResult:
    """Dimension-wise Pearson correlation from accumulated statistics.

    Args:
        m: Moments of X (N, D) and Y (N, D).
        rtol: a dimension is degenerate when its std is <= rtol times its RMS value (in X or in Y).

    Returns:
        A DimwiseCorrelationResult.

    Raises:
        ValueError: if Dx != Dy or rtol < 0.

    Example:
        >>> import numpy as np
        >>> from hrsa.analyze.accumulators.moments import moments
        >>> x = np.random.default_rng(0).normal(size=(1000, 4))
        >>> x[:, 3] = 7.0  # a constant dimension
        >>> res = dimwise_correlation_from_moments(moments(x, 2 * x + 1))
        >>> round(res.mean, 6), res.n_degenerate
        (1.0, 1)
    """
    check_same_hidden_size(m, "dimension-wise correlation")
    return _from_diagonals(np.diag(m.c_xy), np.diag(m.c_xx), np.diag(m.c_yy), m.mean_x, m.mean_y, m.n, rtol)


def dimwise_correlation_from_summaries(
    xy: CoMomentSummary, xx: CoMomentSummary, yy: CoMomentSummary, *, rtol: float = DEFAULT_RTOL
) -> DimwiseCorrelationResult:
    """Dimension-wise correlation from co-moment summaries, as cross-layer matrices are built.

    Args:
        xy: summary of C_xy of hidden state i of A against hidden state j of B (Dx == Dy).
        xx: summary of C_xx, hidden state i of A against itself.
        yy: summary of C_yy, hidden state j of B against itself.
        rtol: relative tolerance for degenerate dimensions (see the module docstring).

    Returns:
        A DimwiseCorrelationResult, equal to ``dimwise_correlation_from_moments`` on the same tokens.

    Raises:
        ValueError: if the hidden sizes differ or rtol < 0.

    Example:
        >>> import numpy as np
        >>> from hrsa.analyze.accumulators.cross_moments import CrossMoments
        >>> x = np.random.default_rng(0).normal(size=(500, 4))
        >>> s = CrossMoments.from_chunk(x, x).summary()
        >>> round(dimwise_correlation_from_summaries(s, s, s).mean, 6)
        1.0
    """
    d = xy.mean_x.shape[0]
    if xy.mean_y.shape[0] != d:
        raise ValueError(
            f"Expected hidden states of equal size for dimension-wise correlation. Got Dx = {d} and "
            f"Dy = {xy.mean_y.shape[0]} instead. Use linear CKA to compare hidden states of different sizes."
        )
    return _from_diagonals(xy.diagonal, xx.diagonal, yy.diagonal, xx.mean_x, yy.mean_x, xy.n, rtol)


def _from_diagonals(
    c_xy: NDArray[np.float64],
    var_x: NDArray[np.float64],
    var_y: NDArray[np.float64],
    mean_x: NDArray[np.float64],
    mean_y: NDArray[np.float64],
    n: int,
    rtol: float,
) -> DimwiseCorrelationResult:
    """r_j from the diagonals (D,) of C_xy, C_xx, C_yy (n times the covariances) and the means."""
    if rtol < 0:
        raise ValueError(f"Expected rtol >= 0. Got {rtol} instead.")
    # Step 1: per-dimension spreads; a dimension is usable only if it varies in both models.
    ok = ~(_is_flat(var_x, mean_x, n, rtol) | _is_flat(var_y, mean_y, n, rtol))
    # Step 2: r_j on the usable dimensions; clip the rounding overshoot past +-1.
    r = np.full(c_xy.shape[0], np.nan)
    r[ok] = np.clip(c_xy[ok] / np.sqrt(var_x[ok] * var_y[ok]), -1.0, 1.0)
    return _summarise(r, ok, n)


def dimwise_correlation(x: ArrayLike, y: ArrayLike, *, rtol: float = DEFAULT_RTOL) -> DimwiseCorrelationResult:
    """Dimension-wise Pearson correlation of two in-memory representations of the same tokens.

    Args:
        x: (N, D) activations of model A.
        y: (N, D) activations of model B on the same N tokens.
        rtol: relative tolerance for degenerate dimensions (see the module docstring).

    Returns:
        A DimwiseCorrelationResult.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(1000, 6))
        >>> res = dimwise_correlation(x, x[:, ::-1])  # the same features, in the wrong coordinates
        >>> res.n_dims, res.n_degenerate, abs(res.mean) < 0.1
        (6, 0, True)
    """
    return dimwise_correlation_from_moments(moments(x, y), rtol=rtol)


def _is_flat(n_var: NDArray[np.float64], mean: NDArray[np.float64], n: int, rtol: float) -> NDArray[np.bool_]:
    """Dimensions whose std is <= rtol * RMS (all of them when n == 0)."""
    if n == 0:
        return np.ones(mean.shape, dtype=bool)
    var = np.maximum(n_var / n, 0.0)  # (D,)
    flat: NDArray[np.bool_] = np.sqrt(var) <= rtol * np.sqrt(mean * mean + var)
    return flat


def _summarise(r: np.ndarray, ok: np.ndarray, n: int) -> DimwiseCorrelationResult:
    """Distribution summary of r over the usable dimensions (NaN everywhere when there are none)."""
    valid = r[ok]
    if valid.size == 0:
        stats = [float("nan")] * 6
    else:
        q25, median, q75 = np.quantile(valid, [0.25, 0.5, 0.75])
        stats = [float(v) for v in (valid.mean(), median, q25, q75, valid.min(), valid.max())]
    mean, median, q25, q75, lo, hi = stats
    return DimwiseCorrelationResult(
        mean=mean,
        median=median,
        q25=q25,
        q75=q75,
        min=lo,
        max=hi,
        n_dims=int(r.size),
        n_degenerate=int(r.size - valid.size),
        n_tokens=n,
        per_dim=r,
    )


def dimwise_correlation_null(m: Moments, *, rtol: float = DEFAULT_RTOL) -> NullBaseline:
    """Mean and standard deviation of the mean r over all permutations of B's tokens (module docstring).

    Example:
        >>> import numpy as np
        >>> from hrsa.analyze.accumulators.moments import moments
        >>> rng = np.random.default_rng(0)
        >>> null = dimwise_correlation_null(moments(rng.normal(size=(1001, 4)), rng.normal(size=(1001, 4))))
        >>> null.mean, round(null.std, 4)  # ~ 1 / sqrt(D n) for white data
        (0.0, 0.0158)
    """
    check_same_hidden_size(m, "dimension-wise correlation")
    ok = ~(_is_flat(np.diag(m.c_xx), m.mean_x, m.n, rtol) | _is_flat(np.diag(m.c_yy), m.mean_y, m.n, rtol))
    if m.n < 2 or not ok.any():
        return NullBaseline(float("nan"), float("nan"))
    rx, ry = _correlation(m.c_xx[np.ix_(ok, ok)]), _correlation(m.c_yy[np.ix_(ok, ok)])
    var = float(np.einsum("jk,jk->", rx, ry)) / (ok.sum() ** 2 * (m.n - 1))
    return NullBaseline(0.0, float(np.sqrt(max(var, 0.0))))


def _correlation(c: NDArray[np.float64]) -> NDArray[np.float64]:
    s = np.sqrt(np.diag(c))
    return c / s[:, None] / s[None, :]
