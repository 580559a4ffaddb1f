"""The one pairwise combine of Chan, Golub & LeVeque (1979), shared by every accumulator's ``merge``.

Two blocks a and b of n_a and n_b tokens, each with its means and co-moments about its *own* means, give
the union's by

    n      = n_a + n_b,            delta = mean_b - mean_a,
    mean   = mean_a + (n_b / n) delta,
    C_uv   = C_uv_a + C_uv_b + (n_a n_b / n) outer(delta_u, delta_v).

:class:`ChanStep` holds the first three lines for a pair of blocks (of X and Y), and
:meth:`ChanStep.comoment` is the last one, used for every co-moment matrix of
:class:`~hrsa.analyze.accumulators.moments.Moments` and :class:`~hrsa.analyze.accumulators.cross_moments.CrossMoments`.
Neither block may be empty: an empty block is the identity, and the accumulators return the other block
unchanged before they get here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import NDArray

    F64 = NDArray[np.float64]

__all__ = ["Block", "ChanStep", "add_outer"]


class Block(Protocol):
    """What the combine reads of a block: its token count and its means."""

    @property
    def n(self) -> int: ...

    @property
    def mean_x(self) -> F64: ...

    @property
    def mean_y(self) -> F64: ...


@dataclass(frozen=True, eq=False)  # eq=False: fields are arrays
class ChanStep:
    """The pooled count and means of two non-empty blocks, and what their co-moments need to combine.

    Attributes:
        n: pooled token count n_a + n_b.
        mean_x, mean_y: (Dx,), (Dy,) pooled means.
        delta_x, delta_y: (Dx,), (Dy,) mean_b - mean_a.
        weight: n_a n_b / n, the weight of the rank-one correction.
    """

    n: int
    mean_x: F64
    mean_y: F64
    delta_x: F64
    delta_y: F64
    weight: float

    @classmethod
    def of(cls, a: Block, b: Block) -> ChanStep:
        """The step that combines block ``a`` with block ``b`` (both non-empty)."""
        n = a.n + b.n
        delta_x, delta_y = b.mean_x - a.mean_x, b.mean_y - a.mean_y  # (Dx,), (Dy,)
        # The pooled mean as a correction of a's: stable when the blocks differ much in size.
        mean_x, mean_y = a.mean_x + (b.n / n) * delta_x, a.mean_y + (b.n / n) * delta_y
        return cls(n, mean_x, mean_y, delta_x, delta_y, a.n * b.n / n)

    def comoment(self, c_a: F64, c_b: F64, delta_u: F64, delta_v: F64) -> F64:
        """``c_a + c_b + weight * outer(delta_u, delta_v)``: the pooled co-moment of U and V (Du, Dv).

        Args:
            c_a, c_b: (Du, Dv) co-moments of the two blocks, each about its own means.
            delta_u, delta_v: (Du,), (Dv,) the blocks' mean differences of U and V (``delta_x`` or ``delta_y``).
        """
        c = c_a + c_b  # (Du, Dv), the one fresh array
        add_outer(c, self.weight, delta_u, delta_v)
        return c


def add_outer(c: F64, weight: float, u: F64, v: F64) -> None:
    """``c += weight * outer(u, v)`` in place with BLAS's rank-one update (ger): no (Du, Dv) temporary, which on a
    merge of a 7B tile's accumulators would be gigabytes the memory plan does not count.

    ``c`` is a writable float64 matrix, C- or Fortran-contiguous (a C-ordered ``c`` is updated as its Fortran-ordered
    transpose), that neither ``u`` nor ``v`` is part of. Writable is checked here: f2py's ``overwrite_a`` writes
    through a read-only array (one mapped from Ray's object store would change for every reader).
    """
    from scipy.linalg import blas

    a, x, y = (c, u, v) if c.flags.f_contiguous else (c.T, v, u)
    if not a.flags.f_contiguous or a.dtype != np.float64 or not a.flags.writeable:
        raise ValueError(f"Expected a writable contiguous float64 matrix. Got {a.dtype}, strides {a.strides}, "
                         f"writable {a.flags.writeable} instead.")
    out = blas.dger(weight, x, y, a=a, overwrite_a=True)
    if not np.shares_memory(out, a):  # f2py copies a misaligned ``a``: then write the result back
        a[...] = out
