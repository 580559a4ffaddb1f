"""Linear centred kernel alignment (CKA), biased and debiased, from streaming Moments.

Biased linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019):

    CKA(X, Y) = |Xc^T Yc|_F^2 / (|Xc^T Xc|_F |Yc^T Yc|_F) = |C_xy|_F^2 / (|C_xx|_F |C_yy|_F)

Debiased linear CKA replaces each HSIC by the unbiased estimator of Song et al. ("Feature Selection via
Dependence Maximization", JMLR 2012), as in Kornblith's reference code and Nguyen et al. ("Do Wide and Deep
Networks Learn the Same Things?", ICLR 2021). With K = X X^T, L = Y Y^T and K~, L~ their copies with
zeroed diagonals,

    n(n-3) HSIC_u(K, L) = tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1.

HSIC_u is unchanged when a constant vector is added to every row, so X and Y may be taken centred over
the tokens. Then 1^T K~ 1 = -sum_i a_i, (K~ 1)_i = -a_i and tr(K~ L~) = |Xc^T Yc|_F^2 - sum_i a_i b_i,
with a_i = |x_i - mean_x|^2 and b_i = |y_i - mean_y|^2, so

    n(n-3) HSIC_u = |C_xy|_F^2 - n/(n-2) sum_i a_i b_i + tr(C_xx) tr(C_yy) / ((n-1)(n-2)).

Every term is a sum over tokens around the pooled mean; ``Moments`` carries sum_i a_i b_i (and a_i^2,
b_i^2 for the normalisers) together with the O(D) vectors that re-centre those sums when blocks merge, so
debiased CKA streams exactly (no N x N Gram matrix, no approximation). It needs n >= 4.

Invariances (both variants): orthogonal transforms and isotropic scaling of either side, and constant
offsets. Not invariant to anisotropic scaling or to general invertible linear maps.

Deviation from the paper: none; the paper uses the biased estimator, and the debiased one is an option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hrsa.analyze.metrics._common import check_min_tokens
from hrsa.analyze.accumulators.moments import moments

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from hrsa.analyze.accumulators.cross_moments import CoMomentSummary
    from hrsa.analyze.accumulators.moments import Moments

__all__ = ["CkaResult", "linear_cka", "linear_cka_from_moments", "linear_cka_from_summaries"]


@dataclass(frozen=True)
class CkaResult:
    """Linear CKA of two representations.

    Attributes:
        value: CKA in [0, 1] for the biased estimator (the debiased one may dip below 0); NaN when either
            representation is constant over the tokens.
        n_tokens: number of tokens it was computed on.
        debiased: whether the unbiased HSIC estimator was used.
    """

    value: float
    n_tokens: int
    debiased: bool


def linear_cka_from_moments(m: Moments, *, debiased: bool = False) -> CkaResult:
    """Linear CKA from accumulated statistics.

    Args:
        m: Moments of X (N, Dx) and Y (N, Dy); Dx and Dy may differ.
        debiased: use the unbiased HSIC estimator (Song et al. 2012) instead of the biased one.

    Returns:
        A CkaResult.

    Raises:
        ValueError: if ``debiased`` and fewer than 4 tokens were accumulated.

    Example:
        >>> import numpy as np
        >>> from hrsa.analyze.accumulators.moments import moments
        >>> rs = np.random.RandomState(1337)  # Kornblith's demo data
        >>> x = rs.randn(100, 10)
        >>> m = moments(x, x + rs.randn(100, 10))
        >>> round(linear_cka_from_moments(m).value, 5), round(linear_cka_from_moments(m, debiased=True).value, 5)
        (0.55761, 0.51346)
    """
    if debiased:
        check_min_tokens(m, 4, "debiased CKA")
        hsic_xy = _debiased_hsic(_sq_frobenius(m.c_xy), m.q_xy, np.trace(m.c_xx), np.trace(m.c_yy), m.n)
        hsic_xx = _debiased_hsic(_sq_frobenius(m.c_xx), m.q_xx, np.trace(m.c_xx), np.trace(m.c_xx), m.n)
        hsic_yy = _debiased_hsic(_sq_frobenius(m.c_yy), m.q_yy, np.trace(m.c_yy), np.trace(m.c_yy), m.n)
    else:
        hsic_xy, hsic_xx, hsic_yy = _sq_frobenius(m.c_xy), _sq_frobenius(m.c_xx), _sq_frobenius(m.c_yy)
    return _cka(hsic_xy, hsic_xx, hsic_yy, m.n, debiased)


def linear_cka_from_summaries(xy: CoMomentSummary, xx: CoMomentSummary, yy: CoMomentSummary) -> CkaResult:
    """Biased linear CKA from co-moment summaries, as cross-layer matrices are built.

    Args:
        xy: summary of C_xy of hidden state i of A against hidden state j of B.
        xx: summary of C_xx, hidden state i of A against itself.
        yy: summary of C_yy, hidden state j of B against itself.

    Returns:
        A CkaResult (biased), equal to ``linear_cka_from_moments`` on the same tokens.

    Example:
        >>> import numpy as np
        >>> from hrsa.analyze.accumulators.cross_moments import CrossMoments
        >>> x = np.random.default_rng(0).normal(size=(300, 6))
        >>> s = CrossMoments.from_chunk(x, x).summary()
        >>> linear_cka_from_summaries(s, s, s).value
        1.0
    """
    return _cka(xy.sq_frobenius, xx.sq_frobenius, yy.sq_frobenius, xy.n, False)


def _cka(hsic_xy: float, hsic_xx: float, hsic_yy: float, n: int, debiased: bool) -> CkaResult:
    # A constant representation has no spread to align (and the debiased self-HSIC of a tiny sample can be
    # <= 0): CKA is undefined there, so say NaN instead of dividing by zero.
    if hsic_xx <= 0.0 or hsic_yy <= 0.0:
        return CkaResult(value=float("nan"), n_tokens=n, debiased=debiased)
    return CkaResult(value=float(hsic_xy / np.sqrt(hsic_xx * hsic_yy)), n_tokens=n, debiased=debiased)


def linear_cka(x: ArrayLike, y: ArrayLike, *, debiased: bool = False) -> CkaResult:
    """Linear CKA of two in-memory representations of the same tokens.

    Args:
        x: (N, Dx) activations of model A.
        y: (N, Dy) activations of model B on the same N tokens.
        debiased: use the unbiased HSIC estimator.

    Returns:
        A CkaResult.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(200, 8))
        >>> q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(8, 8)))
        >>> round(linear_cka(x, 3.0 * x @ q + 5.0).value, 6)  # rotation, scale and offset: still identical
        1.0
    """
    return linear_cka_from_moments(moments(x, y), debiased=debiased)


def _sq_frobenius(c: np.ndarray) -> float:
    """|C|_F^2, via a dot product (no (D, D) temporary)."""
    flat = c.ravel()
    return float(flat @ flat)


def _debiased_hsic(sq_cross: float, sum_ab: float, tr_x: float, tr_y: float, n: int) -> float:
    """n(n-3) times the unbiased linear HSIC, from globally centred statistics (see the module docstring)."""
    return float(sq_cross - n / (n - 2) * sum_ab + tr_x * tr_y / ((n - 1) * (n - 2)))
