"""k-NN overlap: how much two representations agree on each token's nearest neighbours.

For every token i of a shared token set, let A_i be the indices of its k nearest neighbours under
cosine similarity in model A's hidden state (the token itself excluded), and B_i the same in model B's.
The per-token overlap is the Jaccard index

    J_i = |A_i n B_i| / |A_i u B_i| = m_i / (2k - m_i),   m_i = |A_i n B_i|,

and the metric reports its mean (the paper's number), median and standard deviation over tokens.
J_i is in [0, 1]: 1 when both models give token i the same neighbours. For unrelated ones it is not 0: two
independent uniform draws of k of the N - 1 other tokens share m ~ Hypergeometric(N - 1, k, k) of them, so J_i
averages :func:`chance_overlap` (about k / (2N) for k << N, and 1 at k = N - 1, where every token is a neighbour).

Neighbours are ranked by cosine similarity, ties broken by the smaller token index, so results are
deterministic. Invariances (of the neighbour sets, hence of the overlap): any rotation X Q, isotropic
scaling c X (c > 0), and per-token rescaling of either side, exactly in real arithmetic; in floating point up
to rounding, so neighbours whose cosines tie exactly (duplicate or parallel rows) may rank otherwise once
rescaled, and with them the tie rule's pick. *Not* offsets (cosine is measured from the origin, not the mean:
deliberate, as in the paper) nor anisotropic scaling X diag(s).

This module is pure numpy: :func:`cosine_neighbors` is the exact O(N^2) reference, for small N. The
blocked FAISS search for large N lives in :mod:`hrsa.analyze.local.knn` and feeds the same
:func:`knn_overlap_from_neighbors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = [
    "KnnOverlapResult",
    "chance_overlap",
    "check_k",
    "cosine_neighbors",
    "jaccard_rows",
    "knn_overlap",
    "knn_overlap_from_neighbors",
    "rank_candidates",
]


@dataclass(frozen=True, eq=False)  # eq=False: ``per_token`` is an array
class KnnOverlapResult:
    """Summary of the per-token Jaccard overlap of two k-NN graphs.

    Attributes:
        k: neighbours per token.
        mean, median, std: of the per-token Jaccard index J_i over the tokens.
        n_tokens: number of tokens (queries and database are the same tokens).
        per_token: (N,) J_i, when asked for.
    """

    k: int
    mean: float
    median: float
    std: float
    n_tokens: int
    per_token: NDArray[np.float64] | None = None


def jaccard_rows(a: ArrayLike, b: ArrayLike) -> NDArray[np.float64]:
    """Per-row Jaccard index of two integer index sets.

    Args:
        a: (N, k) neighbour indices of each row under A, distinct within a row.
        b: (N, k) neighbour indices under B, distinct within a row.

    Returns:
        (N,) |A_i n B_i| / |A_i u B_i| in [0, 1].

    Example:
        >>> jaccard_rows([[1, 2, 3], [4, 5, 6]], [[3, 2, 1], [6, 7, 8]]).tolist()
        [1.0, 0.2]
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"Expected two (N, k) index arrays of equal shape. Got {a.shape} and {b.shape} instead.")
    k = a.shape[1]
    # Each row holds distinct values on each side, so after sorting the 2k values of a row every value
    # that appears twice is one common neighbour: count equal adjacent pairs.
    both = np.sort(np.concatenate([a, b], axis=1), axis=1)  # (N, 2k)
    common = (both[:, 1:] == both[:, :-1]).sum(axis=1).astype(np.float64)  # (N,)
    return common / (2 * k - common)


def knn_overlap_from_neighbors(a: ArrayLike, b: ArrayLike, *, return_per_token: bool = False) -> KnnOverlapResult:
    """k-NN overlap from the neighbour indices of the same tokens under two models.

    Args:
        a: (N, k) neighbours of each token in model A (self excluded).
        b: (N, k) neighbours in model B, indexing the same N tokens.
        return_per_token: keep the (N,) per-token Jaccard values.

    Returns:
        A KnnOverlapResult.

    Example:
        >>> res = knn_overlap_from_neighbors([[1, 2], [0, 2], [0, 1]], [[1, 2], [0, 3], [3, 4]])
        >>> round(res.mean, 4), res.median, res.k
        (0.4444, 0.3333333333333333, 2)
    """
    j = jaccard_rows(a, b)
    if j.size == 0:
        raise ValueError("Expected at least one token for k-NN overlap. Got 0 instead.")
    return KnnOverlapResult(
        k=int(np.shape(a)[1]), mean=float(j.mean()), median=float(np.median(j)), std=float(j.std()),
        n_tokens=int(j.size), per_token=j if return_per_token else None,
    )


def chance_overlap(k: int, n_tokens: int) -> float:
    """E[J] of two unrelated k-NN graphs: each token's neighbours two independent uniform draws of k of the others.

    The shared count m is Hypergeometric(N - 1, k, k); E[J] = sum_m P(m) m / (2k - m) (exact, not E[m] / (2k - E[m])).

    Example:
        >>> chance_overlap(1, 3), chance_overlap(2, 3), round(chance_overlap(10, 100_001), 6)
        (0.5, 1.0, 5.3e-05)
    """
    from scipy.stats import hypergeom

    k = check_k(k, n_tokens)
    if k == n_tokens - 1:
        return 1.0  # exactly, not a sum of rounded probabilities
    m = np.arange(max(0, 2 * k - (n_tokens - 1)), k + 1)  # the possible shared counts
    return float(np.sum(hypergeom.pmf(m, n_tokens - 1, k, k) * m / (2 * k - m)))


def check_k(k: int, n_tokens: int) -> int:
    """Return k when 1 <= k < N (self is excluded, so at most N - 1 neighbours); raise ValueError otherwise."""
    if not 1 <= int(k) < n_tokens:
        raise ValueError(f"Expected 1 <= k < N = {n_tokens} (self is excluded). Got k = {k} instead. "
                         "Use a smaller k or more tokens.")
    return int(k)


def rank_candidates(scores: NDArray, ids: NDArray, k: int) -> NDArray[np.int64]:
    """The k best candidates of each row by (-score, id): the shared deterministic tie rule.

    Args:
        scores: (N, c) similarities of candidates; -inf marks an empty slot.
        ids: (N, c) their token indices (-1 for an empty slot).
        k: how many to keep (k <= c).

    Returns:
        (N, k) int64 indices, best first.
    """
    order = np.lexsort((ids, -scores), axis=1)[:, :k]  # last key is primary: score desc, then id asc
    return np.take_along_axis(ids, order, axis=1).astype(np.int64)


def cosine_neighbors(x: ArrayLike, k: int) -> NDArray[np.int64]:
    """Exact k nearest neighbours by cosine similarity, self excluded, ties by smaller index (O(N^2) memory).

    Args:
        x: (N, D) rows; all-zero rows have similarity 0 to everything.
        k: neighbours per row, 1 <= k < N.

    Returns:
        (N, k) int64 indices, most similar first.

    Example:
        >>> cosine_neighbors([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], 1).ravel().tolist()
        [1, 0, 1]
    """
    x = np.asarray(x, dtype=np.float64)
    k = check_k(k, x.shape[0])
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    u = x / np.where(norms > 0, norms, 1.0)  # (N, D) unit rows
    scores = u @ u.T  # (N, N)
    np.fill_diagonal(scores, -np.inf)  # self excluded
    ids = np.broadcast_to(np.arange(x.shape[0]), scores.shape)
    return rank_candidates(scores, ids, k)


def knn_overlap(x: ArrayLike, y: ArrayLike, *, k: int = 10, return_per_token: bool = False) -> KnnOverlapResult:
    """k-NN overlap of two in-memory representations of the same tokens (exact, O(N^2) memory).

    Args:
        x: (N, Dx) activations of model A.
        y: (N, Dy) activations of model B on the same N tokens (Dx may differ from Dy).
        k: neighbours per token, 1 <= k < N.
        return_per_token: keep the (N,) per-token Jaccard values.

    Returns:
        A KnnOverlapResult.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(300, 8))
        >>> q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(8, 8)))
        >>> knn_overlap(x, 3.0 * x @ q, k=5).mean  # a scaled rotation keeps every neighbour
        1.0
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"Expected (N, Dx) and (N, Dy) arrays on the same tokens. Got {x.shape} and {y.shape} "
                         "instead.")
    return knn_overlap_from_neighbors(cosine_neighbors(x, k), cosine_neighbors(y, k), return_per_token=return_per_token)
