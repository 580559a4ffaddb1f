"""Canonical correlation analysis (CCA) between two representations, from streaming Moments.

CCA finds directions a_i (Dx,), b_i (Dy,) whose token-space variates Xc a_i and Yc b_i are maximally
correlated, each pair uncorrelated with the previous ones. With whitening bases W_x (Dx, kx), W_y (Dy, ky),
W^T C W = I, the canonical correlations are the singular values of the whitened cross co-moment

    T = W_x^T C_xy W_y = U diag(rho) V^T,   rho_1 >= ... >= rho_r >= 0,   r = min(kx, ky),

with a_i = W_x u_i and b_i = W_y v_i (Hotelling 1936). Two summaries, as in Kornblith et al., "Similarity of
Neural Network Representations Revisited" (ICML 2019), Table 1 (after Raghu et al. 2017):

    R^2_CCA = (1/r) sum_i rho_i^2 = |T|_F^2 / r,      mean rho = (1/r) sum_i rho_i = |T|_* / r.

Whitening (``whiten``), all in float64 from C_xx alone:

1. Constant dimensions are dropped: dimension j counts as constant when its std is <= ``FLAT_RTOL`` (1e-6)
   times its RMS value sqrt(mean_j^2 + std_j^2), the rule of dimension-wise correlation (an all-zero
   dimension is constant too). Such a dimension has no direction to correlate, and its rounding residue
   would otherwise be blown up to unit variance by step 2.
2. The rest is scaled to unit variance (Jacobi scaling, C -> S^-1 C S^-1 with S = sqrt(diag C)): CCA is
   invariant to it, and it takes outlier dimensions (LLM hidden states carry a few 100-1000x the bulk's
   scale) out of the conditioning, so the eigendecomposition sees only the collinearity of the dimensions.
3. eigh of the scaled matrix R = V diag(lambda) V^T. Eigen-directions with lambda <= ``rtol`` * lambda_max
   (default 1e-10) are dropped: they are (numerically) linear combinations of the other dimensions, e.g.
   a duplicated dimension, or the D - N + 1 null directions of N <= D tokens. The cutoff is far above the
   rounding level of an exact null direction (~D eps) and far below any real direction of float32 data;
   it is not a noise floor (bf16 rounding noise sits near 1e-5 relative variance: use SVCCA there).
   W = S^-1 V_k diag(lambda_k)^-1/2; the number of kept directions is the rank reported.

Numerics: from co-moments, a direction's canonical correlation carries an error of about eps times the
condition number of the (scaled) C_xx, i.e. eps cond(Xc)^2, where QR of the data would have eps cond(Xc).
Step 2 removes the part of that due to dimensions of different scales, the common case for LLM hidden
states; ill-conditioning across mixed dimensions remains (a 1e8 spread in variance costs about 8 digits).

Degenerate cases. ``underdetermined`` is set when (a) N - 1 <= max(Dx, Dy): centred data has rank <= N - 1,
so a side spans (nearly) all of token space; (b) rank_x + rank_y > N - 1: the two column spaces then
share at least rank_x + rank_y - (N - 1) directions and that many rho_i are exactly 1 whatever the data;
or (c) a side is rank deficient (rank < D): besides collinear or constant dimensions, this is how few
distinct tokens show (e.g. the embedding layer of a short vocabulary), and Moments cannot tell these
apart; with fewer distinct tokens than dimensions, CCA is trivially 1 again. Even when not underdetermined,
CCA of N tokens is biased up (independent X, Y give mean rho^2 of about D / N): compare with N >> D.
A side with no varying dimension (r = 0) gives NaN summaries and no rhos.

Invariances: any invertible linear map of either side (x -> x A, A invertible) and constant offsets, so in
particular rotations, (an)isotropic scaling and permutations of the dimensions.

Deviation from the paper: Kornblith et al. divide by p1 = Dx (assuming Dx <= Dy and full rank); here the
divisor is r = min(rank_x, rank_y), which is the same for full-rank inputs and stays meaningful otherwise.
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

__all__ = [
    "DEFAULT_RTOL",
    "FLAT_RTOL",
    "CcaResult",
    "CcaSolution",
    "Whitening",
    "cca",
    "cca_from_moments",
    "cca_underdetermined",
    "solve_cca",
    "varying_dims",
    "whiten",
]

#: Eigenvalues of the unit-variance-scaled co-moment below this fraction of the largest are dropped.
DEFAULT_RTOL = 1e-10
#: A dimension whose std is <= this fraction of its RMS value counts as constant (as in dimwise correlation).
FLAT_RTOL = 1e-6


@dataclass(frozen=True, eq=False)  # eq=False: ``rhos`` is an array
class CcaResult:
    """Canonical correlations of X and Y.

    Attributes:
        r2_cca: mean squared canonical correlation (1/r) sum rho_i^2, in [0, 1]; NaN if r = 0.
        mean_rho: mean canonical correlation (1/r) sum rho_i, in [0, 1]; NaN if r = 0.
        rhos: (r,) canonical correlations, descending, r = min(rank_x, rank_y).
        rank_x, rank_y: directions kept by the whitening of each side (see the module docstring).
        n_tokens: number of tokens.
        underdetermined: some rho_i may be 1 whatever the data (few tokens, or a rank-deficient side).
    """

    r2_cca: float
    mean_rho: float
    rhos: F64
    rank_x: int
    rank_y: int
    n_tokens: int
    underdetermined: bool


@dataclass(frozen=True, eq=False)  # eq=False: fields are arrays
class Whitening:
    """A whitening basis of one side's co-moment C (D, D) and what C does to it.

    Attributes:
        basis: (D, k) W with W^T C W = I_k (zero rows on constant dimensions).
        loadings: (D, k) C W = S V_k diag(lambda_k)^1/2, computed without inverting anything: column i
            holds <h, x_j> over the dimensions j for the unit-norm token-space variate h = Xc W e_i.
    """

    basis: F64
    loadings: F64

    @property
    def rank(self) -> int:
        """Number of kept directions k."""
        return int(self.basis.shape[1])


@dataclass(frozen=True, eq=False)  # eq=False: fields are arrays
class CcaSolution:
    """CCA in whitened coordinates: rhos and the left singular vectors of T = W_x^T C_xy W_y.

    Attributes:
        rhos: (r,) canonical correlations, descending, clipped to [0, 1].
        u: (kx, r) left singular vectors of T: X's canonical directions are a_i = W_x u_i.
        wx, wy: the whitenings of X and Y.
    """

    rhos: F64
    u: F64
    wx: Whitening
    wy: Whitening


def cca_from_moments(m: Moments, *, rtol: float = DEFAULT_RTOL) -> CcaResult:
    """CCA from accumulated statistics.

    Args:
        m: Moments of X (N, Dx) and Y (N, Dy); Dx and Dy may differ.
        rtol: relative eigenvalue cutoff of the whitening (see the module docstring).

    Returns:
        A CcaResult.

    Raises:
        ValueError: if rtol is not in [0, 1).

    Example:
        >>> import numpy as np
        >>> from hrsa.analyze.accumulators.moments import moments
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(2000, 4))
        >>> res = cca_from_moments(moments(x, x @ rng.normal(size=(4, 6)) + 5.0))  # Y spans X's space
        >>> round(res.r2_cca, 6), round(res.mean_rho, 6), res.rank_x, res.rank_y, res.underdetermined
        (1.0, 1.0, 4, 4, True)
    """
    sol = solve_cca(
        m.c_xx, m.c_yy, m.c_xy, varying_x=varying_dims(m.c_xx, m.mean_x, m.n),
        varying_y=varying_dims(m.c_yy, m.mean_y, m.n), rtol=rtol,
    )
    rhos = sol.rhos
    r2, mean = (float(np.mean(rhos**2)), float(np.mean(rhos))) if rhos.size else (float("nan"), float("nan"))
    kx, ky = sol.wx.rank, sol.wy.rank
    return CcaResult(
        r2_cca=r2,
        mean_rho=mean,
        rhos=rhos,
        rank_x=kx,
        rank_y=ky,
        n_tokens=m.n,
        underdetermined=cca_underdetermined(m.n, m.dx, m.dy, kx, ky),
    )


def cca(x: ArrayLike, y: ArrayLike, *, rtol: float = DEFAULT_RTOL) -> CcaResult:
    """CCA of two in-memory representations of the same tokens.

    Args:
        x: (N, Dx) activations of model A.
        y: (N, Dy) activations of model B on the same N tokens.
        rtol: relative eigenvalue cutoff of the whitening.

    Returns:
        A CcaResult.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(1)
        >>> x, y = rng.normal(size=(5000, 3)), rng.normal(size=(5000, 3))  # independent
        >>> res = cca(x, y)
        >>> res.rhos.shape, res.r2_cca < 0.01, res.underdetermined
        ((3,), True, False)
    """
    return cca_from_moments(moments(x, y), rtol=rtol)


def cca_underdetermined(n: int, dx: int, dy: int, rank_x: int, rank_y: int) -> bool:
    """Whether some canonical correlations may be 1 whatever the data (cases (a)-(c) of the module docstring)."""
    return bool(n - 1 <= max(dx, dy) or rank_x + rank_y > n - 1 or rank_x < dx or rank_y < dy)


def solve_cca(
    c_xx: F64,
    c_yy: F64,
    c_xy: F64,
    *,
    varying_x: NDArray[np.bool_] | None = None,
    varying_y: NDArray[np.bool_] | None = None,
    rtol: float = DEFAULT_RTOL,
) -> CcaSolution:
    """Canonical correlations from co-moment blocks (shared by CCA, SVCCA and PWCCA).

    Args:
        c_xx, c_yy, c_xy: (Dx, Dx), (Dy, Dy), (Dx, Dy) co-moments of centred X and Y.
        varying_x, varying_y: (Dx,), (Dy,) dimensions that may be used (``varying_dims``); None: all with
            a positive variance.
        rtol: relative eigenvalue cutoff of the whitening.

    Returns:
        A CcaSolution.
    """
    # Step 1: whiten each side (drops constant dimensions and null directions).
    wx, wy = whiten(c_xx, varying=varying_x, rtol=rtol), whiten(c_yy, varying=varying_y, rtol=rtol)
    r = min(wx.rank, wy.rank)
    if r == 0:
        return CcaSolution(np.zeros(0), np.zeros((wx.rank, 0)), wx, wy)
    # Step 2: the whitened cross co-moment and its SVD; its singular values are the rhos.
    t = (wx.basis.T @ c_xy) @ wy.basis  # (kx, ky)
    u, s, _ = np.linalg.svd(t, full_matrices=False)  # (kx, r), (r,)
    # Rounding can push a rho a few eps past 1 (identical sides): clip to the range of a correlation.
    return CcaSolution(np.clip(s[:r], 0.0, 1.0), u[:, :r], wx, wy)


def whiten(c: F64, *, varying: NDArray[np.bool_] | None = None, rtol: float = DEFAULT_RTOL) -> Whitening:
    """Whitening basis of a co-moment matrix with a relative eigenvalue cutoff (steps 1-3 of the module docstring).

    Args:
        c: (D, D) symmetric positive semi-definite co-moment.
        varying: (D,) dimensions that may be used; None: all with a positive diagonal.
        rtol: eigenvalues of the unit-variance-scaled matrix <= rtol * the largest are dropped.

    Returns:
        A Whitening with k <= D kept directions.

    Raises:
        ValueError: if rtol is not in [0, 1).

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(50, 3)) * [1.0, 100.0, 1.0]
        >>> x = np.hstack([x, x[:, :1]])  # a duplicated dimension
        >>> w = whiten((x - x.mean(0)).T @ (x - x.mean(0)))
        >>> w.rank, bool(np.allclose(w.basis.T @ ((x - x.mean(0)).T @ (x - x.mean(0))) @ w.basis, np.eye(3)))
        (3, True)
    """
    if not 0.0 <= rtol < 1.0:
        raise ValueError(f"Expected a relative eigenvalue cutoff rtol in [0, 1). Got {rtol} instead.")
    d = c.shape[0]
    diag = np.diag(c)
    use = diag > 0 if varying is None else np.asarray(varying, dtype=bool) & (diag > 0)
    idx = np.flatnonzero(use)
    basis, loadings = np.zeros((d, 0)), np.zeros((d, 0))
    if idx.size == 0:
        return Whitening(basis, loadings)
    # Step 1: unit-variance scaling of the usable dimensions (a correlation matrix R).
    s = np.sqrt(diag[idx])  # (k0,)
    r = c[np.ix_(idx, idx)] / np.outer(s, s)  # (k0, k0)
    # Step 2: eigendecomposition, dropping (numerically) null directions.
    lam, v = np.linalg.eigh(r)  # ascending
    keep = lam > rtol * lam[-1]
    lam, v = lam[keep][::-1], v[:, keep][:, ::-1]  # descending, (k,), (k0, k)
    # Step 3: W = S^-1 V diag(lam)^-1/2 and C W = S V diag(lam)^1/2 (R V = V diag(lam)), rows of dropped dims 0.
    root = np.sqrt(lam)
    basis, loadings = np.zeros((d, lam.size)), np.zeros((d, lam.size))
    basis[idx] = v / s[:, None] / root
    loadings[idx] = v * s[:, None] * root
    return Whitening(basis, loadings)


def varying_dims(c: F64, mean: F64, n: int, *, rtol: float = FLAT_RTOL) -> NDArray[np.bool_]:
    """(D,) dimensions whose std is > rtol times their RMS value (none when n == 0).

    Args:
        c: (D, D) co-moment (n times the covariance); only its diagonal is read.
        mean: (D,) means.
        n: number of tokens.
        rtol: relative tolerance (``FLAT_RTOL`` by default).

    Example:
        >>> import numpy as np
        >>> x = np.column_stack([np.arange(5.0), np.full(5, 3.0), np.zeros(5)])
        >>> xc = x - x.mean(0)
        >>> varying_dims(xc.T @ xc, x.mean(0), 5).tolist()
        [True, False, False]
    """
    if n == 0:
        return np.zeros(mean.shape, dtype=bool)
    var = np.maximum(np.diag(c) / n, 0.0)  # (D,)
    varying: NDArray[np.bool_] = np.sqrt(var) > rtol * np.sqrt(mean * mean + var)
    return varying
