"""Effective rank and participation ratio of each representation, from streaming Moments.

How many dimensions a model's hidden states really use, from the eigenvalues lambda_1..lambda_D >= 0 of
its covariance (C_xx / N; the 1/N cancels in both measures, so C_xx itself is used):

- effective rank (Roy & Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO
  2007): with p_i = lambda_i / sum_k lambda_k,

      erank = exp(H(p)),   H(p) = -sum_i p_i ln p_i   (0 ln 0 = 0),

  in [1, rank]; it equals k for k equal non-zero eigenvalues. (Roy & Vetterli define it on singular values
  of a matrix; here the matrix is the covariance, i.e. the squared singular values of the centred data,
  as is usual for representations.)
- participation ratio (e.g. Gao et al. 2017; Recanatesi et al. 2019):

      PR = (sum_i lambda_i)^2 / sum_i lambda_i^2 = tr(C)^2 / |C|_F^2,

  also in [1, rank] and k for k equal eigenvalues; it weighs the top eigenvalues more than erank does.

Both are computed for X from c_xx and for Y from c_yy (the two models separately; C_xy is not used).

Invariances: rotations (any orthogonal map) and isotropic scaling of the representation, and constant
offsets. Not invariant to anisotropic scaling (an outlier dimension with a large scale pulls both towards 1).

Degenerate cases. Eigenvalues below 0 from rounding are set to 0; those at rounding level (~1e-16 of the
total) add ~1e-14 to H, nothing visible. A constant representation has no spectrum: NaN. With N - 1 < D
the centred data has rank <= N - 1, so both measures are capped by the tokens, not by the model
(``underdetermined_x`` / ``underdetermined_y``); they grow with N until N >> D.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hrsa.analyze.accumulators.moments import moments

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

    from hrsa.analyze.accumulators.moments import Moments

    F64 = NDArray[np.float64]

__all__ = ["EffectiveRankResult", "effective_rank", "effective_rank_from_moments"]


@dataclass(frozen=True)
class EffectiveRankResult:
    """Effective dimensionality of X and of Y.

    Attributes:
        effective_rank_x, effective_rank_y: exp of the entropy of the normalised eigenvalues, in [1, D];
            NaN for a constant representation.
        participation_ratio_x, participation_ratio_y: (sum lambda)^2 / sum lambda^2, in [1, D]; NaN likewise.
        n_tokens: number of tokens.
        underdetermined_x, underdetermined_y: N - 1 < D for that side, so both measures are capped by N - 1.
    """

    effective_rank_x: float
    effective_rank_y: float
    participation_ratio_x: float
    participation_ratio_y: float
    n_tokens: int
    underdetermined_x: bool
    underdetermined_y: bool


def effective_rank_from_moments(m: Moments) -> EffectiveRankResult:
    """Effective rank and participation ratio of X and Y from accumulated statistics.

    Args:
        m: Moments of X (N, Dx) and Y (N, Dy); Dx and Dy may differ.

    Returns:
        An EffectiveRankResult.

    Example:
        >>> import numpy as np
        >>> from hrsa.analyze.accumulators.moments import moments
        >>> x = np.random.default_rng(0).normal(size=(20000, 4))  # 4 equal directions
        >>> y = np.hstack([x[:, :1], 1e-3 * x[:, 1:]])  # one direction dominates
        >>> res = effective_rank_from_moments(moments(x, y))
        >>> round(res.effective_rank_x, 1), round(res.participation_ratio_x, 1), round(res.participation_ratio_y, 3)
        (4.0, 4.0, 1.0)
    """
    erank_x, pr_x = _spectrum_measures(m.c_xx)
    erank_y, pr_y = _spectrum_measures(m.c_yy)
    return EffectiveRankResult(
        effective_rank_x=erank_x,
        effective_rank_y=erank_y,
        participation_ratio_x=pr_x,
        participation_ratio_y=pr_y,
        n_tokens=m.n,
        underdetermined_x=bool(m.n - 1 < m.dx),
        underdetermined_y=bool(m.n - 1 < m.dy),
    )


def effective_rank(x: ArrayLike, y: ArrayLike) -> EffectiveRankResult:
    """Effective rank and participation ratio of two in-memory representations of the same tokens.

    Args:
        x: (N, Dx) activations of model A.
        y: (N, Dy) activations of model B on the same N tokens.

    Returns:
        An EffectiveRankResult.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(10, 50))  # N - 1 = 9 < D: capped by the tokens
        >>> res = effective_rank(x, x)
        >>> res.effective_rank_x < 9.0, res.underdetermined_x
        (True, True)
    """
    return effective_rank_from_moments(moments(x, y))


def _spectrum_measures(c: F64) -> tuple[float, float]:
    """(effective rank, participation ratio) of a co-moment's eigenvalues; NaN for a zero spectrum."""
    lam = np.maximum(np.linalg.eigvalsh(c), 0.0)  # (D,); rounding can leave tiny negatives
    total = float(lam.sum())
    if total <= 0.0:
        return float("nan"), float("nan")
    p = lam / total  # (D,)
    # 0 ln 0 = 0: log only where p > 0, so no divide-by-zero warning for exact zeros.
    entropy = -float(np.sum(p * np.log(p, out=np.zeros_like(p), where=p > 0)))
    return float(np.exp(entropy)), float(1.0 / np.sum(p * p))
