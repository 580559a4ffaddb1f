"""Cross co-moments of a whole rectangle of hidden states (r of A against c of B), accumulated in place.

A cross-layer tile holds ``C_ij = Xc_i^T Yc_j`` for every i of its r rows and j of its c columns. Kept as r x c
separate :class:`~hrsa.analyze.accumulators.cross_moments.CrossMoments`, every block costs r c small GEMMs, and
each pair's Chan merge allocates a fresh (Dx, Dy) sum and sweeps it twice. Here the tile is one matrix

    C = [C_ij]  (r Dx, c Dy), Fortran order, so that column block j (B's state j) is one contiguous matrix,

and a block of n tokens folds in with, per column block j, one GEMM of A's centred states side by side
(n, r Dx) against B's centred state j (n, Dy), written straight into the total (BLAS ``beta = 1``: no temporary
in float64), and the rank-one Chan correction as one BLAS ``ger`` on the same column block. The numerics are those
of ``CrossMoments`` (each block centred on its own mean in float64, float64 accumulation, the same pooled
means), so both give the same matrices to rounding; ``benchmarks/analyze.py`` measures which is faster.

Pure numpy and scipy's BLAS wrappers: no Dask, Zarr or Ray here.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from hrsa.analyze.accumulators.centring import NON_FINITE_MESSAGE
from hrsa.analyze.accumulators.cross_moments import CrossMoments
from scipy.linalg import blas

if TYPE_CHECKING:
    from numpy.typing import NDArray

    F64 = NDArray[np.float64]

__all__ = ["ColumnProducts", "CrossTileMoments", "add_product", "stack_centred"]

#: ``products(j, column)`` adds the block's centred product ``U^T v_j`` (r Dx, Dy) into ``column`` in place.
ColumnProducts = Callable[[int, "F64"], None]


@dataclass(eq=False)  # mutable on purpose: blocks and merges fold into the one (r Dx, c Dy) matrix in place
class CrossTileMoments:
    """Cross co-moments of A's states ``keys_x`` against B's states ``keys_y`` over n tokens, in float64.

    Attributes:
        keys_x, keys_y: the r row states and the c column states, in the order they are stacked.
        dx, dy: hidden sizes of A and B.
        n: tokens folded in so far.
        mean_x, mean_y: (r Dx,), (c Dy,) the states' means, stacked.
        c: (r Dx, c Dy) Fortran-ordered co-moments; rows ``i Dx:(i+1) Dx``, columns ``j Dy:(j+1) Dy`` are ``C_ij``.
    """

    keys_x: tuple[Hashable, ...]
    keys_y: tuple[Hashable, ...]
    dx: int
    dy: int
    n: int
    mean_x: F64
    mean_y: F64
    c: F64

    @classmethod
    def empty(cls, keys_x: Sequence[Hashable], keys_y: Sequence[Hashable], dx: int, dy: int) -> CrossTileMoments:
        r, c = len(keys_x), len(keys_y)
        return cls(tuple(keys_x), tuple(keys_y), dx, dy, 0, np.zeros(r * dx), np.zeros(c * dy),
                   np.zeros((r * dx, c * dy), order="F"))

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (what a memory plan counts)."""
        return int(self.c.nbytes + self.mean_x.nbytes + self.mean_y.nbytes)

    def add_block(self, n: int, mean_x: F64, mean_y: F64, products: ColumnProducts,
                  offset_x: F64 | None = None, offset_y: F64 | None = None) -> None:
        """Fold in one block of ``n`` tokens, in place.

        Args:
            n: the block's tokens.
            mean_x, mean_y: (r Dx,), (c Dy,) the block's own means of the stacked states.
            products: adds the block's product ``U^T V`` column block by column block.
            offset_x, offset_y: the mean of U's and of V's rows when they are centred on a rounded mean (float32
                products: :func:`stack_centred`); None for rows centred on their own mean.
        """
        if n == 0:
            return
        # Chan: C = C_old + C_block + (n_old n / n_new) outer(delta_x, delta_y), delta the block's means minus the old;
        # the block's co-moment about its own means is U^T V - n outer(offset_x, offset_y).
        weight, delta_x, delta_y = self.n * n / (self.n + n), mean_x - self.mean_x, mean_y - self.mean_y
        for j in range(len(self.keys_y)):
            cols = slice(j * self.dy, (j + 1) * self.dy)
            column = self.c[:, cols]  # Fortran order: a contiguous (r Dx, Dy) view
            products(j, column)
            terms = [(weight, delta_x, delta_y[cols])] if weight else []
            if offset_x is not None and offset_y is not None:
                terms.append((-float(n), offset_x, offset_y[cols]))
            _add_low_rank(column, terms)
        self._pool_means(n, delta_x, delta_y)

    def merge(self, other: CrossTileMoments) -> CrossTileMoments:
        """Fold ``other`` (the same states over other tokens) into these statistics, in place; returns self."""
        if (self.keys_x, self.keys_y) != (other.keys_x, other.keys_y):
            raise ValueError("Expected the statistics of the same states. Merge only tiles of one pass.")
        if other.n == 0:
            return self
        weight, delta_x, delta_y = self.n * other.n / (self.n + other.n), other.mean_x - self.mean_x, other.mean_y - self.mean_y
        self.c += other.c
        if weight:
            _add_low_rank(self.c, [(weight, delta_x, delta_y)])
        self._pool_means(other.n, delta_x, delta_y)
        return self

    def writable(self) -> CrossTileMoments:
        """These statistics, or a writable copy when they are read-only (as Ray's object store hands arrays out)."""
        if self.c.flags.writeable and self.mean_x.flags.writeable and self.mean_y.flags.writeable:
            return self
        return CrossTileMoments(self.keys_x, self.keys_y, self.dx, self.dy, self.n, self.mean_x.copy(),
                                self.mean_y.copy(), self.c.copy(order="F"))

    def items(self) -> Iterator[tuple[tuple[Hashable, Hashable], CrossMoments]]:
        """Each pair ``(key_x, key_y)`` with its :class:`CrossMoments` (views into ``c``, not copies)."""
        for i, kx in enumerate(self.keys_x):
            rows = slice(i * self.dx, (i + 1) * self.dx)
            for j, ky in enumerate(self.keys_y):
                cols = slice(j * self.dy, (j + 1) * self.dy)
                yield (kx, ky), CrossMoments(self.n, self.mean_x[rows], self.mean_y[cols], self.c[rows, cols])

    def _pool_means(self, n: int, delta_x: F64, delta_y: F64) -> None:
        share = n / (self.n + n)  # the pooled mean as a correction of the old one: stable for unequal sizes
        self.mean_x += share * delta_x
        self.mean_y += share * delta_y
        self.n += n


def add_product(column: F64, u: np.ndarray, v: np.ndarray) -> None:
    """``column += u^T v`` in place: float64 by BLAS dgemm with beta = 1 (no temporary), float32 by sgemm into a
    float32 temporary then a float64 add (the sum stays float64).

    Args:
        column: (Du, Dv) float64, Fortran order (a column block of :attr:`CrossTileMoments.c`).
        u: (n, Du) C-ordered centred rows; v: (n, Dv) C-ordered centred rows, of the same dtype.
    """
    if u.dtype == np.float64:
        # u.T and v.T are Fortran-ordered views of C-ordered arrays: BLAS reads them without a copy.
        out = blas.dgemm(1.0, u.T, v.T, beta=1.0, c=column, trans_b=True, overwrite_c=True)
        if not np.shares_memory(out, column):  # scipy copied a non-Fortran ``column``: keep the result anyway
            column[...] = out
        return
    column += blas.sgemm(1.0, u.T, v.T, trans_b=True)


def stack_centred(blocks: Sequence[np.ndarray], compute_dtype: np.dtype) -> tuple[np.ndarray, F64, F64 | None]:
    """The blocks (n, D_i) side by side in ``compute_dtype``, each centred on its own mean: ``(stacked, means, offsets)``,
    stacked (n, sum D_i), the float64 means (sum D_i,), and the mean of the stacked rows (None when it is zero).

    Each block is centred by one subtraction into its slot, with no float64 copy of the block. For float64 products,
    on its float64 mean (exact: float32 activations are exact in float64). For float32 products, on that mean rounded
    to float32: where a dimension's offset dwarfs its spread (1e4 against 1), a value minus a nearby float32 is exact
    (Sterbenz), so the rows keep every significant bit of the spread, as casting float64-centred rows would; the
    rounding of the mean, ``offsets`` (<= 6e-8 of the mean), is taken out of the product exactly, in float64
    (:meth:`CrossTileMoments.add_block`).

    Raises:
        ValueError: a block holds NaN or inf.
    """
    n, widths = blocks[0].shape[0], [b.shape[1] for b in blocks]
    stacked = np.empty((n, sum(widths)), dtype=compute_dtype)  # C order: its transpose is what BLAS reads as-is
    means, shifts, start = [], [], 0
    for block, width in zip(blocks, widths):
        x = block if block.dtype in (np.float32, np.float64) else block.astype(np.float32)  # bf16, fp16: exact
        mean = x.mean(axis=0, dtype=np.float64) if n else np.zeros(width)  # (D_i,), summed in float64
        if not np.isfinite(mean).all():  # a NaN or inf anywhere reaches the mean
            raise ValueError(NON_FINITE_MESSAGE)
        shift = mean.astype(compute_dtype)
        np.subtract(x, shift, out=stacked[:, start : start + width], casting="unsafe")
        means.append(mean)
        shifts.append(shift)
        start += width
    mean_all = np.concatenate(means)
    offsets = mean_all - np.concatenate(shifts).astype(np.float64)
    return stacked, mean_all, (offsets if offsets.any() else None)


def _add_low_rank(matrix: F64, terms: Sequence[tuple[float, F64, F64]]) -> None:
    """``matrix += sum of weight outer(x, y)`` in place (Fortran order): BLAS ger for one term, a GEMM of rank k for
    k terms (one sweep of the matrix either way)."""
    if not terms:
        return
    if len(terms) == 1:
        weight, x, y = terms[0]
        out = blas.dger(weight, x, y, a=matrix, overwrite_a=True)
    else:
        left = np.stack([w * x for w, x, _ in terms], axis=1)  # (Du, k)
        right = np.stack([y for _, _, y in terms], axis=1)  # (Dv, k)
        out = blas.dgemm(1.0, left, right, beta=1.0, c=matrix, trans_b=True, overwrite_c=True)
    if not np.shares_memory(out, matrix):
        matrix[...] = out
