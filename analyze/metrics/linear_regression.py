"""Linear regression R^2 between two representations, both directions, from streaming Moments.

How much of Y a linear map of X reproduces on the same tokens (the function level, without labels):

    R^2(Y|X) = 1 - |Yc - Xc B|_F^2 / |Yc|_F^2,   B = argmin_B |Yc - Xc B|_F^2 = C_xx^+ C_xy,

and, the least-squares residual being orthogonal to the fit,

    R^2(Y|X) = tr(C_yx C_xx^+ C_xy) / tr C_yy = |W_x^T C_xy|_F^2 / tr C_yy,

with W_x a whitening basis of C_xx (W_x^T C_xx W_x = I; ``cca.whiten``: constant dimensions dropped,
unit-variance scaling, eigen-directions below ``rtol`` = 1e-10 of the largest dropped, i.e. a pseudo-inverse
with a relative cutoff). R^2(X|Y) swaps the roles. It is the fraction of Y's total variance explained, so
Y's high-variance dimensions weigh most (it is the variance-weighted mean of the per-dimension R^2); it is
asymmetric, and R^2(Y|X) = 1 means Y is a linear function of X. Kornblith et al. (ICML 2019), Table 1, list
it as "linear regression" R^2_LR = |Q_Y^T X|_F^2 / |X|_F^2 (Q_Y an orthonormal basis of Yc's columns, X
centred), which is R^2(X|Y) here.

Ridge (option). With ``ridge`` = lambda > 0, B = (C_xx + mu I)^-1 C_xy with mu = lambda tr(C_xx) / Dx (lambda
relative to the mean eigenvalue, so it does not depend on the scale of X). From the eigendecomposition
C_xx = V diag(l) V^T and G = V^T C_xy, the residual on the fitted tokens is

    |Yc - Xc B|^2 = tr C_yy - sum_i |G_i|^2 (l_i + 2 mu) / (l_i + mu)^2,

and R^2 = 1 - that / tr C_yy. Ridge R^2 is smaller than the least-squares one and is invariant to rotations
and isotropic scaling of X only.

Invariances (ridge = 0): any invertible linear map of the regressor and offsets of either side; rotations
and isotropic scaling of the target (not anisotropic scaling: it reweights the target's dimensions).

Degenerate cases. R^2 is measured on the fitted tokens (no held-out split): with N - 1 <= Dx, centred X of
full rank spans all of token space and R^2(Y|X) = 1 whatever Y (``underdetermined_y_from_x``), and it is
biased up by about Dx / N otherwise (independent X, Y give R^2 ~ Dx / N). Duplicate rows shrink the
effective N without Moments seeing it. NaN when the target is constant (tr C_yy = 0); 0 when the regressor is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hrsa.analyze.accumulators.moments import moments
from hrsa.analyze.metrics.cca import DEFAULT_RTOL, varying_dims, whiten

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

    from hrsa.analyze.accumulators.moments import Moments

    F64 = NDArray[np.float64]

__all__ = ["LinearRegressionResult", "linear_regression", "linear_regression_from_moments"]


@dataclass(frozen=True)
class LinearRegressionResult:
    """Linear regression R^2 of each representation on the other.

    Attributes:
        r2_y_from_x: R^2(Y|X), the fraction of Y's variance a linear map of X explains, in [0, 1]; NaN if Y
            is constant.
        r2_x_from_y: R^2(X|Y), likewise; NaN if X is constant.
        rank_x, rank_y: directions kept by each side's pseudo-inverse.
        ridge: the relative ridge lambda used (0: least squares).
        n_tokens: number of tokens.
        underdetermined_y_from_x: N - 1 <= Dx, so R^2(Y|X) is 1 on the fitted tokens whatever Y.
        underdetermined_x_from_y: N - 1 <= Dy, likewise for R^2(X|Y).
    """

    r2_y_from_x: float
    r2_x_from_y: float
    rank_x: int
    rank_y: int
    ridge: float
    n_tokens: int
    underdetermined_y_from_x: bool
    underdetermined_x_from_y: bool

    @property
    def underdetermined(self) -> bool:
        """Either direction is underdetermined."""
        return self.underdetermined_y_from_x or self.underdetermined_x_from_y


def linear_regression_from_moments(
    m: Moments, *, ridge: float = 0.0, rtol: float = DEFAULT_RTOL
) -> LinearRegressionResult:
    """Linear regression R^2 in both directions from accumulated statistics.

    Args:
        m: Moments of X (N, Dx) and Y (N, Dy); Dx and Dy may differ.
        ridge: relative ridge lambda >= 0 (mu = lambda tr(C) / D); 0 for least squares.
        rtol: relative eigenvalue cutoff of the pseudo-inverse (least squares only).

    Returns:
        A LinearRegressionResult.

    Raises:
        ValueError: if ridge < 0 or rtol is not in [0, 1).

    Example:
        >>> import numpy as np
        >>> from hrsa.analyze.accumulators.moments import moments
        >>> x = np.random.default_rng(0).normal(size=(1000, 3))
        >>> y = x[:, :1] * [1.0, -2.0] + 4.0  # Y is a linear function of X's first dimension
        >>> res = linear_regression_from_moments(moments(x, y))
        >>> round(res.r2_y_from_x, 6), 0.2 < res.r2_x_from_y < 0.5, res.rank_y
        (1.0, True, 1)
    """
    if not ridge >= 0.0:
        raise ValueError(f"Expected a relative ridge lambda >= 0. Got {ridge} instead.")
    wx = whiten(m.c_xx, varying=varying_dims(m.c_xx, m.mean_x, m.n), rtol=rtol)
    wy = whiten(m.c_yy, varying=varying_dims(m.c_yy, m.mean_y, m.n), rtol=rtol)
    if ridge > 0.0:
        r2_yx, r2_xy = _ridge_r2(m.c_xx, m.c_xy, m.c_yy, ridge), _ridge_r2(m.c_yy, m.c_xy.T, m.c_xx, ridge)
    else:
        r2_yx, r2_xy = _least_squares_r2(wx.basis, m.c_xy, m.c_yy), _least_squares_r2(wy.basis, m.c_xy.T, m.c_xx)
    return LinearRegressionResult(
        r2_y_from_x=r2_yx,
        r2_x_from_y=r2_xy,
        rank_x=wx.rank,
        rank_y=wy.rank,
        ridge=float(ridge),
        n_tokens=m.n,
        underdetermined_y_from_x=bool(m.n - 1 <= m.dx),
        underdetermined_x_from_y=bool(m.n - 1 <= m.dy),
    )


def linear_regression(
    x: ArrayLike, y: ArrayLike, *, ridge: float = 0.0, rtol: float = DEFAULT_RTOL
) -> LinearRegressionResult:
    """Linear regression R^2 in both directions of two in-memory representations of the same tokens.

    Args:
        x: (N, Dx) activations of model A.
        y: (N, Dy) activations of model B on the same N tokens.
        ridge: relative ridge lambda >= 0; 0 for least squares.
        rtol: relative eigenvalue cutoff of the pseudo-inverse.

    Returns:
        A LinearRegressionResult.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(20, 30))  # N <= Dx: any Y is fitted exactly
        >>> res = linear_regression(x, np.random.default_rng(1).normal(size=(20, 2)))
        >>> round(res.r2_y_from_x, 6), res.underdetermined_y_from_x, res.underdetermined_x_from_y
        (1.0, True, False)
    """
    return linear_regression_from_moments(moments(x, y), ridge=ridge, rtol=rtol)


def _least_squares_r2(w_reg: F64, c_reg_tgt: F64, c_tgt: F64) -> float:
    """|W^T C_rt|_F^2 / tr C_tt: the regressor's whitened cross co-moment (W: (Dr, k), C_rt: (Dr, Dt))."""
    total = float(np.trace(c_tgt))
    if total <= 0.0:
        return float("nan")
    explained = float(np.sum(np.square(w_reg.T @ c_reg_tgt)))
    return min(explained / total, 1.0)  # rounding can overshoot 1 by a few eps for an exact fit


def _ridge_r2(c_reg: F64, c_reg_tgt: F64, c_tgt: F64, ridge: float) -> float:
    """1 - residual / tr C_tt for B = (C_rr + mu I)^-1 C_rt, mu = ridge tr(C_rr) / Dr (see the module docstring)."""
    total = float(np.trace(c_tgt))
    if total <= 0.0:
        return float("nan")
    mu = ridge * float(np.trace(c_reg)) / c_reg.shape[0]
    if mu <= 0.0:  # a constant regressor explains nothing
        return 0.0
    lam, v = np.linalg.eigh(c_reg)  # (Dr,), (Dr, Dr)
    lam = np.maximum(lam, 0.0)
    g2 = np.sum(np.square(v.T @ c_reg_tgt), axis=1)  # (Dr,) |G_i|^2
    explained = float(np.sum(g2 * (lam + 2.0 * mu) / np.square(lam + mu)))
    return min(max(explained / total, 0.0), 1.0)
