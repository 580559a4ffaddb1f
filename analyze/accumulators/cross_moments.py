"""Mergeable cross co-moments of one hidden state of A against one of B, for cross-layer matrices.

A cross-layer matrix (every hidden state of A against every hidden state of B) needs, per pair (i, j),
only ``C_xy = Xc_i^T Yc_j`` (Dx, Dy) and the means; the self co-moments ``C_xx`` are shared by every
pair of row i (and ``C_yy`` by every pair of column j), so they are accumulated once per hidden state,
as the cross co-moments of a state with itself. :class:`CrossMoments` is that slimmer accumulator:
``n``, ``mean_x``, ``mean_y``, ``c_xy``, with the same numerics as :class:`hrsa.analyze.accumulators.moments.Moments`
(each chunk centred on its own mean before its product by ``centring.centre_chunk``, float64 accumulation,
and the one Chan combine of ``_chan``: ``c_xy = c_xy_a + c_xy_b + (n_a n_b / n) outer(delta_x, delta_y)``).

Once the tokens are all seen, a (Dx, Dy) matrix is more than the metrics need: linear CKA needs
``|C|_F^2`` and dimension-wise correlation the diagonal. :meth:`CrossMoments.summary` keeps just those
(:class:`CoMomentSummary`, O(D)), so the (Dx, Dy) matrix can be freed before the next tile.

Pure numpy: no Dask, Zarr or Ray here.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hrsa.analyze.accumulators._chan import ChanStep
from hrsa.analyze.accumulators.centring import centre_chunk

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, DTypeLike, NDArray

    F64 = NDArray[np.float64]

__all__ = ["CoMomentSummary", "CrossMoments", "cross_moments_of_block", "iter_cross_moments"]


@dataclass(frozen=True, eq=False)  # eq=False: fields are arrays
class CrossMoments:
    """Cross co-moments of X (N, Dx) and Y (N, Dy) over N tokens, in float64.

    Attributes:
        n: number of tokens.
        mean_x, mean_y: (Dx,), (Dy,) means over the tokens.
        c_xy: (Dx, Dy) co-moment Xc^T Yc (``n`` times the biased cross-covariance).
    """

    n: int
    mean_x: F64  # (Dx,)
    mean_y: F64  # (Dy,)
    c_xy: F64  # (Dx, Dy)

    def __post_init__(self) -> None:
        shape = (np.shape(self.mean_x)[0], np.shape(self.mean_y)[0])
        if np.shape(self.c_xy) != shape:
            raise ValueError(f"Expected c_xy of shape {shape}. Got {np.shape(self.c_xy)} instead.")
        if self.n < 0:
            raise ValueError(f"Expected a token count n >= 0. Got {self.n} instead.")

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (what a memory plan counts)."""
        return int(self.c_xy.nbytes + self.mean_x.nbytes + self.mean_y.nbytes)

    @classmethod
    def empty(cls, dx: int, dy: int) -> CrossMoments:
        """The statistics of zero tokens: the identity of ``merge``."""
        return cls(0, np.zeros(dx), np.zeros(dy), np.zeros((dx, dy)))

    @classmethod
    def from_chunk(cls, x: ArrayLike, y: ArrayLike, *, compute_dtype: DTypeLike = np.float64) -> CrossMoments:
        """Statistics of one chunk: x (n, Dx) and y (n, Dy) on the same n tokens.

        Args:
            x: (n, Dx) activations, any real dtype (bfloat16 included).
            y: (n, Dy) activations on the same tokens.
            compute_dtype: dtype of the (Dx, Dy) product, float64 or float32 (centring stays float64).

        Example:
            >>> import numpy as np
            >>> x = np.arange(8.0).reshape(4, 2)
            >>> m = CrossMoments.from_chunk(x, x + 1e4)
            >>> m.n, m.c_xy.tolist()
            (4, [[20.0, 20.0], [20.0, 20.0]])
        """
        (u, mx), (v, my) = centre_chunk(x, compute_dtype), centre_chunk(y, compute_dtype)
        if u.shape[0] != v.shape[0]:
            raise ValueError(f"Expected x and y on the same tokens. Got {u.shape[0]} and {v.shape[0]} rows instead.")
        return _from_centred(u, mx, v, my)

    def merge(self, other: CrossMoments) -> CrossMoments:
        """Statistics of the union of both token sets (pure, associative; ``empty`` is the identity)."""
        if self.c_xy.shape != other.c_xy.shape:
            raise ValueError(
                f"Expected CrossMoments of shape {self.c_xy.shape}. Got {other.c_xy.shape} instead. "
                "Merge only statistics of the same pair of hidden states."
            )
        if self.n == 0:
            return other
        if other.n == 0:
            return self
        step = ChanStep.of(self, other)
        c_xy = step.comoment(self.c_xy, other.c_xy, step.delta_x, step.delta_y)  # (Dx, Dy)
        return CrossMoments(step.n, step.mean_x, step.mean_y, c_xy)

    def summary(self) -> CoMomentSummary:
        """What cross-layer CKA and dimension-wise correlation need of these statistics (O(D))."""
        k = min(self.c_xy.shape)
        return CoMomentSummary(
            n=self.n,
            mean_x=self.mean_x,
            mean_y=self.mean_y,
            # einsum, not a BLAS dot: right after the GEMMs OpenBLAS's dot waits on its threads (~6 ms a call on the
            # loaded 2-core machine, against ~0.15 ms for D = 256).
            sq_frobenius=float(np.einsum("ij,ij->", self.c_xy, self.c_xy)),
            diagonal=np.diagonal(self.c_xy)[:k].copy(),  # a copy, so the (Dx, Dy) matrix can be freed
        )


@dataclass(frozen=True, eq=False)
class CoMomentSummary:
    """The parts of one co-moment matrix C that the cross-layer metrics use.

    Attributes:
        n: number of tokens.
        mean_x, mean_y: (Dx,), (Dy,) means.
        sq_frobenius: |C|_F^2 (linear CKA: HSIC up to the 1/n^2 that cancels).
        diagonal: (min(Dx, Dy),) C[j, j] (dimension-wise correlation; n times the variances for a
            state against itself).
    """

    n: int
    mean_x: F64
    mean_y: F64
    sq_frobenius: float
    diagonal: F64


def cross_moments_of_block(
    xs: Mapping[Hashable, ArrayLike],
    pairs: Iterable[tuple[Hashable, Hashable]],
    *,
    compute_dtype: DTypeLike = np.float64,
) -> dict[tuple[Hashable, Hashable], CrossMoments]:
    """CrossMoments of many pairs of hidden states over one block of tokens, centring each state once.

    Args:
        xs: hidden states over the same n tokens, by key (e.g. ``("a", 3)``), each (n, D_key).
        pairs: (key_x, key_y) pairs to compute; a key against itself gives its self co-moments.
        compute_dtype: dtype of the products, float64 or float32.

    Returns:
        One CrossMoments per pair.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(50, 3))
        >>> out = cross_moments_of_block({"x": x, "y": 2 * x}, [("x", "y"), ("x", "x")])
        >>> bool(np.allclose(out["x", "y"].c_xy, 2 * out["x", "x"].c_xy))
        True
    """
    return dict(iter_cross_moments(xs, pairs, compute_dtype=compute_dtype))


def iter_cross_moments(
    xs: Mapping[Hashable, ArrayLike],
    pairs: Iterable[tuple[Hashable, Hashable]],
    *,
    compute_dtype: DTypeLike = np.float64,
) -> Iterator[tuple[tuple[Hashable, Hashable], CrossMoments]]:
    """Like :func:`cross_moments_of_block`, one pair at a time.

    A caller that merges each pair's block statistics into its running total before asking for the next
    holds one (Dx, Dy) temporary, not one per pair: that is what keeps a cross-layer tile within budget.
    """
    pairs = list(pairs)
    needed = {k for pair in pairs for k in pair}
    centred = {k: centre_chunk(xs[k], compute_dtype) for k in needed}  # each state centred once per block
    for kx, ky in pairs:
        yield (kx, ky), _from_centred(*centred[kx], *centred[ky])


def _from_centred(u: np.ndarray, mean_x: F64, v: np.ndarray, mean_y: F64) -> CrossMoments:
    if u.shape[0] == 0:
        return CrossMoments.empty(u.shape[1], v.shape[1])
    c_xy = (u.T @ v).astype(np.float64, copy=False)  # (Dx, Dy)
    return CrossMoments(int(u.shape[0]), mean_x, mean_y, c_xy)
