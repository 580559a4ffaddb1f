"""Singular vector canonical correlation analysis (SVCCA) between two representations, from streaming Moments.

SVCCA (Raghu et al., "SVCCA: Singular Vector Canonical Correlation Analysis for Deep Learning Dynamics and
Interpretability", NeurIPS 2017) first reduces each side to its top singular directions, then runs CCA:

1. SVD step. The right singular vectors of centred X are the eigenvectors of C_xx = V diag(lambda) V^T
   (lambda = squared singular values, descending). Keep the smallest k_x such that the top k_x eigenvalues
   hold ``variance_kept`` (default 0.99) of tr C_xx; likewise k_y for Y.
2. CCA step on X' = Xc V_kx (N, k_x) and Y' = Yc V_ky: its co-moments are projections of the accumulated
   ones, C_x'x' = diag(lambda_kx), C_y'y' = diag(lambda_ky), C_x'y' = V_kx^T C_xy V_ky, so nothing is read
   twice. CCA is then ``cca.solve_cca`` on these blocks.

Null directions (lambda <= ``rtol`` * lambda_1, default 1e-10, the cutoff of ``cca``) are never kept, so
``variance_kept=1`` keeps every direction of the rank (a duplicated dimension or N <= D leaves exact null
directions that would otherwise enter the CCA step as noise).

The SVCCA number is the mean canonical correlation (1/r) sum rho_i, r = min(k_x, k_y); R^2 (the mean of
rho_i^2) is reported too.

Invariances: rotations and isotropic scaling of either side, and constant offsets. Unlike CCA, *not*
invariant to anisotropic scaling or general invertible linear maps: they change which directions carry
the variance (that is the point of the SVD step: it discards low-variance directions that CCA would
otherwise match on noise).

Degenerate cases. ``underdetermined`` is set when k_x + k_y > N - 1: the kept subspaces then share at
least k_x + k_y - (N - 1) directions of the (N - 1)-dimensional centred token space, so that many rho_i are
1 whatever the data. With N <= D this is the usual outcome at 0.99 (each side keeps nearly N - 1
directions); lower ``variance_kept`` to reduce it. As for CCA, few *distinct* tokens (duplicate rows) shrink
the token space without Moments seeing it. A constant side (tr C = 0) keeps nothing and gives NaN.

Numerics: the SVD step is an eigendecomposition of C_xx (squared singular values), so a kept direction
with eigenvalue lambda_k carries an error of about eps * lambda_1 / lambda_k (and the kept subspace one of
eps * lambda_1 / (lambda_k - lambda_k+1)), where an SVD of the data would have the square root of that. At
0.99 that is harmless; keeping directions 1e8 below the top one in variance costs about 8 digits.

Deviation from the paper: Raghu et al. take the SVD of the activation matrix; the eigendecomposition of
C_xx gives the same directions (and squared singular values) from the streamed statistics. "Variance" is
the sum of squared singular values, as in the paper's "directions explaining 99% of the variance".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hrsa.analyze.accumulators.moments import moments
from hrsa.analyze.metrics.cca import DEFAULT_RTOL, solve_cca

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

    from hrsa.analyze.accumulators.moments import Moments

    F64 = NDArray[np.float64]

__all__ = ["DEFAULT_VARIANCE_KEPT", "SvccaResult", "svcca", "svcca_from_moments"]

#: Fraction of each side's variance kept by the SVD step (Raghu et al. 2017).
DEFAULT_VARIANCE_KEPT = 0.99


@dataclass(frozen=True, eq=False)  # eq=False: ``rhos`` is an array
class SvccaResult:
    """SVCCA of X and Y.

    Attributes:
        value: mean canonical correlation of the reduced representations (the SVCCA number), in [0, 1];
            NaN if a side keeps no direction.
        r2: mean squared canonical correlation of the same, in [0, 1]; NaN likewise.
        rhos: (r,) canonical correlations, descending.
        kept_x, kept_y: singular directions kept by the SVD step on each side.
        variance_kept: the fraction of variance asked for.
        n_tokens: number of tokens.
        underdetermined: kept_x + kept_y > N - 1, so some rho_i are 1 whatever the data.
    """

    value: float
    r2: float
    rhos: F64
    kept_x: int
    kept_y: int
    variance_kept: float
    n_tokens: int
    underdetermined: bool


def svcca_from_moments(
    m: Moments, *, variance_kept: float = DEFAULT_VARIANCE_KEPT, rtol: float = DEFAULT_RTOL
) -> SvccaResult:
    """SVCCA from accumulated statistics.

    Args:
        m: Moments of X (N, Dx) and Y (N, Dy); Dx and Dy may differ.
        variance_kept: fraction of each side's variance its kept singular directions must hold, in (0, 1].
        rtol: eigenvalues <= rtol times the largest count as null directions and are never kept.

    Returns:
        An SvccaResult.

    Raises:
        ValueError: if variance_kept is not in (0, 1] or rtol not in [0, 1).

    Example:
        >>> import numpy as np
        >>> from hrsa.analyze.accumulators.moments import moments
        >>> rng = np.random.default_rng(0)
        >>> signal = rng.normal(size=(3000, 2)) * 10.0
        >>> x = np.hstack([signal, rng.normal(size=(3000, 6)) * 0.01])  # 2 loud directions + faint noise
        >>> y = np.hstack([signal @ rng.normal(size=(2, 2)), rng.normal(size=(3000, 6)) * 0.01])
        >>> res = svcca_from_moments(moments(x, y))
        >>> res.kept_x, res.kept_y, round(res.value, 4)
        (2, 2, 1.0)
    """
    if not 0.0 < variance_kept <= 1.0:
        raise ValueError(f"Expected variance_kept in (0, 1]. Got {variance_kept} instead.")
    # Step 1: the SVD step, as eigendecompositions of the co-moments.
    lam_x, vx = _top_directions(m.c_xx, variance_kept, rtol)  # (kx,), (Dx, kx)
    lam_y, vy = _top_directions(m.c_yy, variance_kept, rtol)  # (ky,), (Dy, ky)
    # Step 2: CCA of the reduced representations from the projected co-moments.
    sol = solve_cca(np.diag(lam_x), np.diag(lam_y), (vx.T @ m.c_xy) @ vy, rtol=rtol)
    rhos = sol.rhos
    value, r2 = (float(np.mean(rhos)), float(np.mean(rhos**2))) if rhos.size else (float("nan"), float("nan"))
    kx, ky = lam_x.size, lam_y.size
    return SvccaResult(
        value=value,
        r2=r2,
        rhos=rhos,
        kept_x=kx,
        kept_y=ky,
        variance_kept=float(variance_kept),
        n_tokens=m.n,
        underdetermined=bool(kx + ky > m.n - 1),
    )


def svcca(
    x: ArrayLike, y: ArrayLike, *, variance_kept: float = DEFAULT_VARIANCE_KEPT, rtol: float = DEFAULT_RTOL
) -> SvccaResult:
    """SVCCA of two in-memory representations of the same tokens.

    Args:
        x: (N, Dx) activations of model A.
        y: (N, Dy) activations of model B on the same N tokens.
        variance_kept: fraction of each side's variance kept by the SVD step, in (0, 1].
        rtol: relative eigenvalue cutoff for null directions.

    Returns:
        An SvccaResult.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(1000, 8)) * np.geomspace(1.0, 0.01, 8)
        >>> res = svcca(x, 3.0 * x[:, ::-1] + 7.0, variance_kept=0.9)
        >>> res.kept_x, res.kept_y, round(res.value, 6)
        (2, 2, 1.0)
    """
    return svcca_from_moments(moments(x, y), variance_kept=variance_kept, rtol=rtol)


def _top_directions(c: F64, variance_kept: float, rtol: float) -> tuple[F64, F64]:
    """Eigenvalues (k,) and eigenvectors (D, k) of the fewest top directions holding variance_kept of tr c.

    Null directions (eigenvalue <= rtol * the largest) are never kept, so variance_kept = 1 keeps the rank.
    """
    if not 0.0 <= rtol < 1.0:
        raise ValueError(f"Expected a relative eigenvalue cutoff rtol in [0, 1). Got {rtol} instead.")
    lam, v = np.linalg.eigh(c)  # ascending
    lam, v = np.maximum(lam[::-1], 0.0), v[:, ::-1]  # descending; rounding can leave tiny negatives
    if lam.size == 0 or lam[0] <= 0.0:  # a constant side: no direction to keep
        return lam[:0], v[:, :0]
    cumulative = np.cumsum(lam)  # (D,)
    # The first index whose running sum reaches the target, but no null direction.
    k = int(np.searchsorted(cumulative, variance_kept * cumulative[-1], side="left")) + 1
    k = min(k, int(np.count_nonzero(lam > rtol * lam[0])))
    return lam[:k], v[:, :k]
