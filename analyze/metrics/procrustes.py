"""Orthogonal Procrustes between two representations, from streaming Moments.

The rotation that best maps centred X onto centred Y (Schönemann 1966),

    O* = argmin_{O^T O = I} |Xc O - Yc|_F = U V^T,   where C_xy = Xc^T Yc = U S V^T (SVD),

and three numbers derived from it (HRSA paper, representation level):

- inverse row entropy  H_inv = 1 - H / ln D,  H = -(1/D) sum_ij O*_ij^2 ln O*_ij^2  (0 ln 0 = 0).
  Each row of O*^2 sums to 1, so H is the mean row entropy; H_inv is 1 for a (signed) permutation (the
  models use the same coordinates up to relabelling) and about (2 - gamma - ln 2) / ln D ~ 0.73 / ln D
  for a Haar-random rotation. DESIGN.md writes the sum without the entropy's minus sign; the intended
  convention is the one here (1 for a permutation, near 0 for a random rotation).
- residual on the fitted tokens |Xc O* - Yc|_F^2 / |Yc|_F^2 = (tr C_xx + tr C_yy - 2 sum(S)) / tr C_yy,
  since |Xc O|_F = |Xc|_F and tr(O*^T C_xy) = sum(S). In [0, 1 + tr C_xx / tr C_yy]; 0 iff Y is a
  rotation of X.
- Procrustes similarity  sum(S) / sqrt(tr C_xx tr C_yy) = |Xc^T Yc|_* / (|Xc|_F |Yc|_F), in [0, 1]: 1 iff
  Y is a scaled rotation of X. Defined for Dx != Dy too (``procrustes_similarity``).

Invariances: H_inv and the similarity are invariant to isotropic scaling and offsets of either side, and
the similarity to rotations of either side. The residual is not scale invariant (it is not symmetric in X
and Y either). H_inv is invariant to permutations of X's or Y's dimensions but *not* to rotations.

Underdetermined case: centred data has rank <= N - 1, so with N <= D tokens (or any rank-deficient C_xy)
O* is not unique; the SVD picks one of many optimal rotations and H_inv means little. The result then has
``underdetermined=True`` and an ``UnderdeterminedWarning`` is issued; residual and similarity stay exact.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hrsa.analyze.metrics._common import UnderdeterminedWarning, check_same_hidden_size
from hrsa.analyze.accumulators.centring import has_no_spread
from hrsa.analyze.accumulators.moments import moments

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

    from hrsa.analyze.accumulators.moments import Moments

__all__ = [
    "ProcrustesResult",
    "inverse_row_entropy",
    "procrustes",
    "procrustes_from_moments",
    "procrustes_similarity",
    "procrustes_similarity_from_moments",
]


@dataclass(frozen=True, eq=False)  # eq=False: ``rotation`` is an array
class ProcrustesResult:
    """Orthogonal Procrustes fit of Y on X.

    Attributes:
        h_inv: inverse row entropy of O*, in [0, 1].
        residual: |Xc O* - Yc|_F^2 / |Yc|_F^2 on the fitted tokens; NaN if Y is constant.
        similarity: |Xc^T Yc|_* / (|Xc|_F |Yc|_F), in [0, 1]; NaN if X or Y is constant.
        n_tokens: number of tokens.
        underdetermined: O* is not unique (N <= D or C_xy rank deficient); h_inv means little then.
        rotation: (D, D) O*, only when asked for (``return_rotation=True``).
        imprecise: O* is unique, but the products' rounding (float32's) may move it, and h_inv, by more than 1e-6.
    """

    h_inv: float
    residual: float
    similarity: float
    n_tokens: int
    underdetermined: bool
    rotation: NDArray[np.float64] | None = None
    imprecise: bool = False


def procrustes_from_moments(m: Moments, *, return_rotation: bool = False,
                            product_eps: float = float(np.finfo(np.float64).eps)) -> ProcrustesResult:
    """Orthogonal Procrustes from accumulated statistics.

    Args:
        m: Moments of X (N, D) and Y (N, D).
        return_rotation: also return O* (D, D).
        product_eps: the machine epsilon of the products ``m`` was summed from (float32's for float32 products):
            singular values of C_xy below ``s_max * D * product_eps`` are rounding, not signal, so O* is not unique.

    Returns:
        A ProcrustesResult.

    Raises:
        ValueError: if Dx != Dy.

    Warns:
        UnderdeterminedWarning: if O* is not unique (see the module docstring).

    Example:
        >>> import numpy as np
        >>> from hrsa.analyze.accumulators.moments import moments
        >>> x = np.random.default_rng(0).normal(size=(500, 5))
        >>> res = procrustes_from_moments(moments(x, x[:, [2, 0, 1, 4, 3]]))  # a permutation
        >>> round(res.h_inv, 6), round(res.residual, 6), round(res.similarity, 6)
        (1.0, 0.0, 1.0)
    """
    d = check_same_hidden_size(m, "orthogonal Procrustes")
    # Step 1: SVD of the cross co-moment; O* = U V^T is the optimal rotation.
    u, s, vt = np.linalg.svd(m.c_xy)  # (D, D), (D,), (D, D)
    rotation = u @ vt  # (D, D)
    # Step 2: uniqueness. Centred data has rank <= n - 1, and O* is unique iff C_xy has full rank.
    underdetermined = bool(m.n <= d or s[-1] <= s[0] * d * product_eps)
    if underdetermined:
        cause = (f"{m.n} tokens are no more than D = {d} dimensions" if m.n <= d else
                 f"the cross-covariance of {m.n} tokens is rank deficient, e.g. few distinct tokens at the embedding layer")
        warnings.warn(
            f"Orthogonal Procrustes: the optimal rotation is not unique ({cause}), so h_inv means little there. "
            "Use more, and more varied, tokens.",
            UnderdeterminedWarning,
            stacklevel=2,
        )
    # Step 2b: precision. O* = polar factor of C_xy moves by ~|dC| / (s_D-1 + s_D) (Kenney and Laub 1991): float32
    # products' rounding (|dC| ~ eps32 s_1) moves it, and h_inv, by ~1e-5 where those two are ~1e-5 s_1 (measured);
    # below sqrt(eps32) s_1 float32 products are not enough. float64 products' rounding is 1e-9 times smaller.
    imprecise = bool(not underdetermined and d >= 2 and product_eps > np.finfo(np.float64).eps
                     and s[-1] + s[-2] < 2.0 * s[0] * np.sqrt(product_eps))
    # Step 3: residual and similarity from traces and singular values (no pass over the tokens).
    tr_x, tr_y, nuclear = float(np.trace(m.c_xx)), float(np.trace(m.c_yy)), float(s.sum())
    if _constant(m):  # no spread on a side: no rotation aligns anything (an all-zero C_xy would give U = V = I)
        nan = float("nan")
        return ProcrustesResult(h_inv=nan, residual=nan, similarity=nan, n_tokens=m.n, underdetermined=True,
                                rotation=rotation if return_rotation else None)
    # The residual is a difference of nearly equal terms for near-rotations: clip rounding below 0.
    residual = max(tr_x + tr_y - 2.0 * nuclear, 0.0) / tr_y if tr_y > 0 else float("nan")
    return ProcrustesResult(
        h_inv=inverse_row_entropy(rotation),
        residual=residual,
        similarity=_similarity(nuclear, tr_x, tr_y),
        n_tokens=m.n,
        underdetermined=underdetermined,
        rotation=rotation if return_rotation else None,
        imprecise=imprecise,
    )


def procrustes(x: ArrayLike, y: ArrayLike, *, return_rotation: bool = False) -> ProcrustesResult:
    """Orthogonal Procrustes of two in-memory representations of the same tokens.

    Args:
        x: (N, D) activations of model A.
        y: (N, D) activations of model B on the same N tokens.
        return_rotation: also return O* (D, D).

    Returns:
        A ProcrustesResult.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(2000, 64))
        >>> q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(64, 64)))
        >>> res = procrustes(x, x @ q)  # a random rotation: perfect fit, but spread over all coordinates
        >>> round(res.residual, 6), 0.1 < res.h_inv < 0.3
        (0.0, True)
    """
    return procrustes_from_moments(moments(x, y), return_rotation=return_rotation)


def procrustes_similarity_from_moments(m: Moments) -> float:
    """|Xc^T Yc|_* / (|Xc|_F |Yc|_F) from accumulated statistics; Dx and Dy may differ.

    Example:
        >>> import numpy as np
        >>> from hrsa.analyze.accumulators.moments import moments
        >>> rs = np.random.RandomState(1337)  # Kornblith's demo data
        >>> x = rs.randn(100, 10)
        >>> round(procrustes_similarity_from_moments(moments(x, x + rs.randn(100, 10))), 5)
        0.73626
    """
    if _constant(m):
        return float("nan")
    nuclear = float(np.linalg.svd(m.c_xy, compute_uv=False).sum())
    return _similarity(nuclear, float(np.trace(m.c_xx)), float(np.trace(m.c_yy)))


def _constant(m: Moments) -> bool:
    """Either side without spread (see :func:`hrsa.analyze.accumulators.centring.has_no_spread`)."""
    return (has_no_spread(float(np.trace(m.c_xx)), m.n, m.mean_x)
            or has_no_spread(float(np.trace(m.c_yy)), m.n, m.mean_y))


def procrustes_similarity(x: ArrayLike, y: ArrayLike) -> float:
    """|Xc^T Yc|_* / (|Xc|_F |Yc|_F) of x (N, Dx) and y (N, Dy); see ``procrustes_similarity_from_moments``.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(300, 4))
        >>> round(procrustes_similarity(x, -2.0 * x + 3.0), 6)
        1.0
    """
    return procrustes_similarity_from_moments(moments(x, y))


def inverse_row_entropy(rotation: ArrayLike) -> float:
    """H_inv = 1 + (1 / (D ln D)) sum_ij p_ij ln p_ij with p = O^2 (0 ln 0 = 0); 1.0 when D == 1.

    Args:
        rotation: (D, D) orthogonal matrix (rows of O^2 sum to 1).

    Example:
        >>> import numpy as np
        >>> inverse_row_entropy(np.eye(3)[[1, 2, 0]]), round(inverse_row_entropy(np.full((4, 4), 0.5)), 6)
        (1.0, 0.0)
    """
    p = np.square(np.asarray(rotation, dtype=np.float64))  # (D, D)
    d = p.shape[0]
    if d == 1:  # ln 1 = 0: the only 1 x 1 rotations are +-1, i.e. permutations
        return 1.0
    # log only where p > 0 (0 ln 0 = 0), so no divide-by-zero warning is raised for exact zeros.
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    return float(1.0 + (p * logp).sum() / (d * np.log(d)))


def _similarity(nuclear: float, tr_x: float, tr_y: float) -> float:
    """sum(S) / sqrt(tr C_xx tr C_yy), NaN if either side is constant."""
    return nuclear / float(np.sqrt(tr_x * tr_y)) if tr_x > 0 and tr_y > 0 else float("nan")
