"""Procrustes angular distance between two representations, from streaming Moments.

The angle between centred, unit-Frobenius-norm representations after the best rotation (Williams, Kunz,
Kornblith & Linderman, "Generalized Shape Metrics on Neural Representations", NeurIPS 2021: their angular
shape metric with alpha = 1, i.e. no whitening):

    theta(X, Y) = arccos( max_{Q^T Q = I} <Xc / |Xc|_F, Yc Q / |Yc|_F> ) = arccos( |Xc^T Yc|_* / (|Xc|_F |Yc|_F) )

in [0, pi/2]. The argument of arccos is the Procrustes similarity, taken from
``procrustes.procrustes_similarity_from_moments`` (nuclear norm of C_xy over sqrt(tr C_xx tr C_yy)).
Williams et al. show theta is a metric on representations modulo rotations, isotropic scaling and offsets:
symmetric, 0 iff Y is a scaled rotation of X (after centring), and it obeys the triangle inequality (it is
the geodesic distance on the sphere of the quotient space). With Dx != Dy the smaller side is taken as
padded with zero dimensions, which leaves the nuclear norm and the norms unchanged: the same formula holds.

Invariances: rotations (and reflections) and isotropic scaling of either side, and constant offsets.

Numerics: near theta = 0 the arccos of 1 - delta is sqrt(2 delta), so rounding at the level of eps in the
similarity becomes about 1e-8 in theta: identical representations give theta ~ 1e-8, not exactly 0. The
similarity is clipped to [0, 1] before the arccos. NaN if either side is constant. Well defined for N <= D
too (it compares the tokens' Gram matrices, which no rotation can fake); no underdetermined case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hrsa.analyze.accumulators.moments import moments
from hrsa.analyze.metrics.procrustes import procrustes_similarity_from_moments

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from hrsa.analyze.accumulators.moments import Moments

__all__ = ["ProcrustesDistanceResult", "procrustes_distance", "procrustes_distance_from_moments"]


@dataclass(frozen=True)
class ProcrustesDistanceResult:
    """Procrustes angular distance of X and Y.

    Attributes:
        distance: theta in radians, in [0, pi/2]; NaN if either side is constant.
        similarity: cos theta = |Xc^T Yc|_* / (|Xc|_F |Yc|_F), in [0, 1]; NaN likewise.
        n_tokens: number of tokens.
    """

    distance: float
    similarity: float
    n_tokens: int


def procrustes_distance_from_moments(m: Moments) -> ProcrustesDistanceResult:
    """Procrustes angular distance from accumulated statistics; Dx and Dy may differ.

    Args:
        m: Moments of X (N, Dx) and Y (N, Dy).

    Returns:
        A ProcrustesDistanceResult.

    Example:
        >>> import numpy as np
        >>> from hrsa.analyze.accumulators.moments import moments
        >>> rs = np.random.RandomState(1337)  # Kornblith's demo data: similarity 0.73626
        >>> x = rs.randn(100, 10)
        >>> res = procrustes_distance_from_moments(moments(x, x + rs.randn(100, 10)))
        >>> round(res.similarity, 5), round(res.distance, 5)
        (0.73626, 0.74328)
    """
    similarity = procrustes_similarity_from_moments(m)
    if math.isnan(similarity):
        return ProcrustesDistanceResult(distance=float("nan"), similarity=similarity, n_tokens=m.n)
    # Rounding can push the similarity a few eps past 1 (identical sides): clip into arccos's domain.
    clipped = min(max(similarity, 0.0), 1.0)
    return ProcrustesDistanceResult(distance=math.acos(clipped), similarity=clipped, n_tokens=m.n)


def procrustes_distance(x: ArrayLike, y: ArrayLike) -> ProcrustesDistanceResult:
    """Procrustes angular distance of x (N, Dx) and y (N, Dy) on the same tokens.

    Args:
        x: (N, Dx) activations of model A.
        y: (N, Dy) activations of model B on the same N tokens.

    Returns:
        A ProcrustesDistanceResult.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(300, 4))
        >>> q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(4, 4)))
        >>> procrustes_distance(x, 2.0 * x @ q + 1.0).distance < 1e-7  # a scaled rotation, shifted
        True
    """
    return procrustes_distance_from_moments(moments(x, y))
