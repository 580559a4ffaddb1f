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

Null baseline (``linear_cka_null``): biased linear CKA is Escoufier's RV coefficient of the centred data, and its
distribution when B's tokens are randomly permuted against A's has closed-form moments (Kazi-Aoual et al. 1995;
Josse, Pagès & Husson 2008). With K = Xc Xc^T, L = Yc Yc^T (doubly centred: rows sum to 0) the numerator is
S = sum_ij K_ij L_p(i)p(j). Grouping the index tuples of E[S] and E[S^2] by which indices coincide, a permutation
maps a tuple to a uniform one of the same pattern, so E[S^2] = sum_pi F_K(pi) F_L(pi) / (n)_|pi| over the 15 set
partitions pi of the four indices, where F(pi) sums over tuples of exactly that pattern. By Möbius inversion
over coarser patterns F comes from the unrestricted sums, and since K's rows sum to 0 those vanish unless no
index stands alone; the rest are tr K = tr C_xx, |K|_F^2 = |C_xx|_F^2 and sum_i K_ii^2 = q_xx, all in Moments:

    E[CKA] = tr(C_xx) tr(C_yy) / ((n - 1) |C_xx|_F |C_yy|_F),    Var[CKA] = Var[S] / (|C_xx|_F^2 |C_yy|_F^2).

Both are exact (tested against every permutation of small samples, and against permuted activations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hrsa.analyze.metrics._common import check_min_tokens
from hrsa.analyze.metrics.uncertainty import NullBaseline
from hrsa.analyze.accumulators.centring import has_no_spread
from hrsa.analyze.accumulators.moments import moments

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from hrsa.analyze.accumulators.cross_moments import CoMomentSummary
    from hrsa.analyze.accumulators.moments import Moments

__all__ = ["DEBIASED_MIN_TOKENS", "CkaResult", "linear_cka", "linear_cka_from_moments", "linear_cka_from_summaries", "linear_cka_null"]

#: Debiased HSIC divides by (n - 1)(n - 2)(n - 3).
DEBIASED_MIN_TOKENS = 4


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
    if has_no_spread(float(np.trace(m.c_xx)), m.n, m.mean_x) or has_no_spread(float(np.trace(m.c_yy)), m.n, m.mean_y):
        return CkaResult(value=float("nan"), n_tokens=m.n, debiased=debiased)  # rounding residue is not a spread
    if debiased:
        check_min_tokens(m, DEBIASED_MIN_TOKENS, "debiased CKA")
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
    if has_no_spread(float(xx.diagonal.sum()), xx.n, xx.mean_x) or has_no_spread(float(yy.diagonal.sum()), yy.n,
                                                                                     yy.mean_x):
        return CkaResult(value=float("nan"), n_tokens=xy.n, debiased=False)
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
    """|C|_F^2 without a (D, D) temporary. einsum, not a BLAS dot (``ravel() @ ravel()`` or ``vdot``): right after the
    GEMMs OpenBLAS's dot waits on its threads, ~6 ms a call on the loaded 2-core machine against ~0.15 ms (D = 256)."""
    return float(np.einsum("ij,ij->", c, c))


def _debiased_hsic(sq_cross: float, sum_ab: float, tr_x: float, tr_y: float, n: int) -> float:
    """n(n-3) times the unbiased linear HSIC, from globally centred statistics (see the module docstring)."""
    return float(sq_cross - n / (n - 2) * sum_ab + tr_x * tr_y / ((n - 1) * (n - 2)))


def linear_cka_null(m: Moments) -> NullBaseline:
    """Mean and standard deviation of biased linear CKA over all permutations of B's tokens (module docstring).

    Example:
        >>> import numpy as np
        >>> from hrsa.analyze.accumulators.moments import moments
        >>> rng = np.random.default_rng(0)
        >>> null = linear_cka_null(moments(rng.normal(size=(1000, 4)), rng.normal(size=(1000, 4))))
        >>> round(null.mean, 4), round(null.std, 4)  # ~ D / n and ~ sqrt(2) / n for white data
        (0.004, 0.0014)
    """
    x, y = _permutation_invariants(m.c_xx, m.q_xx), _permutation_invariants(m.c_yy, m.q_yy)
    norm = np.sqrt(x[1] * y[1])  # |C_xx|_F |C_yy|_F
    if m.n < 4 or norm <= 0.0:
        return NullBaseline(float("nan"), float("nan"))
    first = sum(_exact_pattern_sum(p, x) * _exact_pattern_sum(p, y) / _falling(m.n, len(p)) for p in _PAIRS)
    second = sum(_exact_pattern_sum(p, x) * _exact_pattern_sum(p, y) / _falling(m.n, len(p)) for p in _QUADS)
    return NullBaseline(float(first / norm), float(np.sqrt(max(second - first * first, 0.0)) / norm))


def _permutation_invariants(c: np.ndarray, q: float) -> tuple[float, float, float]:
    """(tr K, |K|_F^2, sum_i K_ii^2) of the Gram matrix K = Xc Xc^T, from C = Xc^T Xc and q = sum_i |x_i|^4."""
    return float(np.trace(c)), _sq_frobenius(c), float(q)


def _set_partitions(items: tuple[int, ...]) -> list[tuple[frozenset[int], ...]]:
    if not items:
        return [()]
    first, rest = items[0], items[1:]
    out = []
    for p in _set_partitions(rest):
        out.append((frozenset([first]), *p))
        for i in range(len(p)):
            out.append((*p[:i], p[i] | {first}, *p[i + 1 :]))
    return out


_PAIRS = _set_partitions((0, 1))  # index patterns of K_ij in E[S]
_QUADS = _set_partitions((0, 1, 2, 3))  # index patterns of K_ij K_kl in E[S^2]


def _unrestricted_sum(p: tuple[frozenset[int], ...], inv: tuple[float, float, float]) -> float:
    """sum over indices equal within each block of ``p`` of K_ij (two slots) or K_ij K_kl (four slots).

    An index in one slot only sums a row of K, which is 0 (K is doubly centred); what is left: tr K (i = j),
    tr K tr K (i = j, k = l), |K|_F^2 (i = k, j = l or i = l, j = k) and sum_i K_ii^2 (all four equal).
    """
    trace, sq_frobenius, sq_diagonal = inv
    if any(len(block) == 1 for block in p):
        return 0.0
    blocks = sorted(tuple(sorted(block)) for block in p)
    if len(blocks) == 1:
        return trace if blocks[0] == (0, 1) else sq_diagonal
    return trace * trace if blocks == [(0, 1), (2, 3)] else sq_frobenius


def _exact_pattern_sum(p: tuple[frozenset[int], ...], inv: tuple[float, float, float]) -> float:
    """The sum over index tuples whose equalities are exactly ``p``: Möbius inversion over coarser patterns."""
    slots = tuple(sorted(set().union(*p)))
    total = 0.0
    for coarse in _set_partitions(slots):
        merged = [[b for b in p if b <= block] for block in coarse]
        if sum(len(m) for m in merged) != len(p):  # ``coarse`` does not coarsen ``p``
            continue
        mobius = math.prod((-1) ** (len(m) - 1) * math.factorial(len(m) - 1) for m in merged)
        total += mobius * _unrestricted_sum(coarse, inv)
    return total


def _falling(n: int, k: int) -> float:
    """n (n - 1) ... (n - k + 1): the number of index tuples with k distinct values."""
    return float(math.prod(range(n - k + 1, n + 1)))
