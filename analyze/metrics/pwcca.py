"""Projection-weighted CCA (PWCCA) between two representations, from streaming Moments.

PWCCA (Morcos, Raghu & Bengio, "Insights on representational similarity in neural networks with canonical
correlation", NeurIPS 2018) weights each canonical correlation by how much of X's neurons its canonical
variate accounts for:

    PWCCA = sum_i alpha_i rho_i,   alpha_i = alpha~_i / sum_k alpha~_k,   alpha~_i = sum_j |<h_i, x_j>|,

with rho_i the canonical correlations (``cca``), h_i (N,) the canonical variates of X in token space and
x_j (N,) the activity of neuron (dimension) j of X over the tokens.

From Moments. h_i = Xc a_i for X's canonical direction a_i = W_x u_i (whitening W_x, u_i the i-th left
singular vector of T = W_x^T C_xy W_y; see ``cca``). Then

- |h_i|^2 = a_i^T C_xx a_i = u_i^T (W_x^T C_xx W_x) u_i = |u_i|^2 = 1: the variates are unit vectors (and
  mutually orthogonal), the normalisation Morcos et al.'s code gets from a QR decomposition of them;
- <h_i, x_j> = <h_i, x_j - mean_j> because h_i sums to 0 over the tokens (it is a combination of centred
  columns), so centring the neurons or not changes nothing;
- <h_i, xc_j> = (Xc^T Xc a_i)_j = (C_xx a_i)_j = (C_xx W_x u_i)_j, and C_xx W_x is the whitening's
  ``loadings`` S V_k diag(lambda_k)^1/2, formed without inverting any eigenvalue.

So alpha~ is the column-wise L1 norm of the (Dx, r) matrix C_xx W_x U, from the accumulated statistics only.
Constant dimensions of X have <h_i, x_j> = 0 and add nothing.

Invariances: constant offsets, isotropic scaling of either side, signed permutations of X's dimensions, and
any invertible linear map of Y (it changes neither the rhos nor X's canonical variates). *Not* invariant to
rotations or anisotropic scaling of X: the weights sum |<h_i, x_j>| over X's own coordinates.

Degenerate cases: as ``cca`` (same ``underdetermined`` rule); where rhos repeat, the variates within the
tied block are not unique and the weights can move within it (the PWCCA value cannot, for exactly tied rhos).
NaN when a side has no varying dimension.

Deviations from the reference code (google/svcca, ``pwcca.compute_pwcca``): that code weights the side with
fewer neurons, and adds each neuron's mean back to the canonical variates before orthonormalising them;
here the weights always come from X, the first argument (swap the arguments for Y's), with the centred
variates of the paper's definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hrsa.analyze.accumulators.moments import moments
from hrsa.analyze.metrics.cca import DEFAULT_RTOL, cca_underdetermined, solve_cca, varying_dims

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

    from hrsa.analyze.accumulators.moments import Moments

    F64 = NDArray[np.float64]

__all__ = ["PwccaResult", "pwcca", "pwcca_from_moments"]


@dataclass(frozen=True, eq=False)  # eq=False: fields are arrays
class PwccaResult:
    """Projection-weighted CCA of X and Y (weights from X).

    Attributes:
        value: sum_i alpha_i rho_i, in [0, 1]; NaN if a side has no varying dimension.
        rhos: (r,) canonical correlations, descending.
        weights: (r,) alpha_i, non-negative, summing to 1.
        rank_x, rank_y: directions kept by the whitening of each side.
        n_tokens: number of tokens.
        underdetermined: as in CcaResult: some rho_i may be 1 whatever the data.
    """

    value: float
    rhos: F64
    weights: F64
    rank_x: int
    rank_y: int
    n_tokens: int
    underdetermined: bool


def pwcca_from_moments(m: Moments, *, rtol: float = DEFAULT_RTOL) -> PwccaResult:
    """PWCCA from accumulated statistics, weights from X's neurons.

    Args:
        m: Moments of X (N, Dx) and Y (N, Dy); Dx and Dy may differ.
        rtol: relative eigenvalue cutoff of the whitening (see ``cca``).

    Returns:
        A PwccaResult.

    Raises:
        ValueError: if rtol is not in [0, 1).

    Example:
        >>> import numpy as np
        >>> from hrsa.analyze.accumulators.moments import moments
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(4000, 2)) * [10.0, 1.0]  # neuron 0 is loud
        >>> y = np.column_stack([x[:, 0], rng.normal(size=4000)])  # Y copies only the loud neuron
        >>> res = pwcca_from_moments(moments(x, y))
        >>> round(float(res.rhos[0]), 6), float(res.rhos[1]) < 0.05, round(res.value, 2)
        (1.0, True, 0.91)
    """
    sol = solve_cca(
        m.c_xx, m.c_yy, m.c_xy, varying_x=varying_dims(m.c_xx, m.mean_x, m.n),
        varying_y=varying_dims(m.c_yy, m.mean_y, m.n), rtol=rtol,
    )
    kx, ky = sol.wx.rank, sol.wy.rank
    underdetermined = cca_underdetermined(m.n, m.dx, m.dy, kx, ky)
    if sol.rhos.size == 0:
        return PwccaResult(float("nan"), sol.rhos, np.zeros(0), kx, ky, m.n, underdetermined)
    # Step 1: <h_i, x_j> = (C_xx a_i)_j for every neuron j and canonical variate i.
    projections = sol.wx.loadings @ sol.u  # (Dx, r)
    # Step 2: alpha~_i = sum_j |<h_i, x_j>|, normalised to sum to 1 (positive: each h_i lies in X's span).
    raw = np.abs(projections).sum(axis=0)  # (r,)
    weights = raw / raw.sum()
    return PwccaResult(
        value=float(min(weights @ sol.rhos, 1.0)),
        rhos=sol.rhos,
        weights=weights,
        rank_x=kx,
        rank_y=ky,
        n_tokens=m.n,
        underdetermined=underdetermined,
    )


def pwcca(x: ArrayLike, y: ArrayLike, *, rtol: float = DEFAULT_RTOL) -> PwccaResult:
    """PWCCA of two in-memory representations of the same tokens, weights from x's neurons.

    Args:
        x: (N, Dx) activations of model A (the weighted side).
        y: (N, Dy) activations of model B on the same N tokens.
        rtol: relative eigenvalue cutoff of the whitening.

    Returns:
        A PwccaResult.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(500, 5))
        >>> res = pwcca(x, x @ np.random.default_rng(1).normal(size=(5, 5)) - 3.0)  # an invertible map
        >>> round(res.value, 6), round(float(res.weights.sum()), 6)
        (1.0, 1.0)
    """
    return pwcca_from_moments(moments(x, y), rtol=rtol)
