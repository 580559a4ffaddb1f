"""Mergeable first- and second-order statistics of two representations on the same tokens.

One pass over the tokens gives every representation-level and global metric of HRSA
(dimension-wise correlation, orthogonal Procrustes, linear CKA, debiased CKA): they are all functions of

- ``n``, the token count, and the means ``mean_x`` (Dx,) and ``mean_y`` (Dy,);
- the co-moment matrices ``c_xx = Xc^T Xc`` (Dx, Dx), ``c_yy = Yc^T Yc`` (Dy, Dy), ``c_xy = Xc^T Yc``
  (Dx, Dy), i.e. ``n`` times the (biased) covariances, with ``Xc``, ``Yc`` centred over the tokens;
- for debiased CKA only, a few norm moments (scalars and vectors, O(D) memory) of the centred rows
  ``u_i = x_i - mean_x``, ``v_i = y_i - mean_y`` with squared norms ``a_i = |u_i|^2``, ``b_i = |v_i|^2``:
  ``q_xx = sum a_i^2``, ``q_yy = sum b_i^2``, ``q_xy = sum a_i b_i``,
  ``g_xx = sum a_i u_i``, ``g_xy = sum a_i v_i``, ``g_yx = sum b_i u_i``, ``g_yy = sum b_i v_i``.

Numerics: each chunk is centred on its own mean *before* its matrix products, and everything is kept in
float64. Raw-moment sums (``X^T Y - n mu_x mu_y^T``) cancel catastrophically once activations carry large
offsets (LLM hidden states do, 1e3-1e4 in a few dimensions). Two blocks are combined with the pairwise
update of Chan, Golub & LeVeque (1979): for the co-moments

    c_xy = c_xy_a + c_xy_b + (n_a n_b / n) outer(delta_x, delta_y),   delta = mean_b - mean_a,

(the one combine, :class:`~hrsa.analyze.accumulators._chan.ChanStep`, shared with ``CrossMoments``) and, for
the norm moments, by shifting each block's sums from its own mean to the pooled mean (the closed forms are
in ``_shift_norm_moments``). Centring and the NaN/inf check are ``centring.centre_rows``, shared likewise.
``merge`` is pure, commutative and associative up to rounding, and ``Moments.empty`` is its identity, so Dask
can tree-reduce it and a cluster can split tokens (``hrsa.analyze.accumulators.testing`` checks all of that).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from hrsa.analyze.accumulators._chan import ChanStep, add_outer
from hrsa.analyze.accumulators.centring import centre_rows, check_float32_range, parse_compute_dtype

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, DTypeLike, NDArray

    F64 = NDArray[np.float64]

__all__ = ["DEFAULT_CHUNK_ROWS", "Moments", "moments"]

#: Rows per chunk when ``moments`` builds statistics from whole arrays: bounds the float64 copy.
DEFAULT_CHUNK_ROWS = 16_384


@dataclass(frozen=True, eq=False)  # eq=False: fields are arrays, and == on arrays is elementwise
class Moments:
    """Co-moments of X (N, Dx) and Y (N, Dy) over N tokens, in float64; see the module docstring.

    Build with ``Moments.from_chunk(x, y)`` or ``moments(x, y)``; combine with ``merge``. Frozen and
    picklable, so Dask and Ray can ship it; treat the arrays as read-only.

    Attributes:
        n: number of tokens.
        mean_x, mean_y: (Dx,), (Dy,) means over the tokens.
        c_xx, c_yy, c_xy: (Dx, Dx), (Dy, Dy), (Dx, Dy) co-moments Xc^T Xc, Yc^T Yc, Xc^T Yc.
        q_xx, q_yy, q_xy: sum_i a_i^2, sum_i b_i^2, sum_i a_i b_i, with a_i = |x_i - mean_x|^2 and
            b_i = |y_i - mean_y|^2 (for debiased CKA).
        g_xx, g_xy, g_yx, g_yy: (Dx,), (Dy,), (Dx,), (Dy,) sums sum_i a_i u_i, sum_i a_i v_i,
            sum_i b_i u_i, sum_i b_i v_i (u_i, v_i the centred rows); they re-centre the q sums on merge.
    """

    n: int
    mean_x: F64  # (Dx,)
    mean_y: F64  # (Dy,)
    c_xx: F64  # (Dx, Dx)
    c_yy: F64  # (Dy, Dy)
    c_xy: F64  # (Dx, Dy)
    q_xx: float  # sum_i a_i^2
    q_yy: float  # sum_i b_i^2
    q_xy: float  # sum_i a_i b_i
    g_xx: F64  # (Dx,) sum_i a_i u_i
    g_xy: F64  # (Dy,) sum_i a_i v_i
    g_yx: F64  # (Dx,) sum_i b_i u_i
    g_yy: F64  # (Dy,) sum_i b_i v_i

    def __post_init__(self) -> None:
        # Cheap shape checks: a Moments built by hand (or unpickled from elsewhere) must be consistent.
        dx, dy = np.shape(self.mean_x)[0], np.shape(self.mean_y)[0]
        expected = {
            "c_xx": (dx, dx),
            "c_yy": (dy, dy),
            "c_xy": (dx, dy),
            "g_xx": (dx,),
            "g_xy": (dy,),
            "g_yx": (dx,),
            "g_yy": (dy,),
        }
        for name, shape in expected.items():
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"Expected {name} of shape {shape}. Got {np.shape(getattr(self, name))} instead.")
        if self.n < 0:
            raise ValueError(f"Expected a token count n >= 0. Got {self.n} instead.")

    @property
    def dx(self) -> int:
        """Hidden size of X."""
        return int(self.mean_x.shape[0])

    @property
    def dy(self) -> int:
        """Hidden size of Y."""
        return int(self.mean_y.shape[0])

    @classmethod
    def empty(cls, dx: int, dy: int) -> Moments:
        """The statistics of zero tokens: the identity of ``merge``."""
        z = np.zeros  # fresh arrays for every field: no aliasing between fields
        return cls(0, z(dx), z(dy), z((dx, dx)), z((dy, dy)), z((dx, dy)), 0.0, 0.0, 0.0, z(dx), z(dy), z(dx), z(dy))

    @classmethod
    def from_chunk(cls, x: ArrayLike, y: ArrayLike, *, compute_dtype: DTypeLike = np.float64) -> Moments:
        """Statistics of one chunk of tokens.

        Args:
            x: (n, Dx) activations of model A, any real dtype (float32, bfloat16, float64, ...).
            y: (n, Dy) activations of model B on the same n tokens.
            compute_dtype: dtype of the three O(n D^2) matrix products, float64 (default) or float32.
                Means, centring, the O(n D) sums and accumulation are float64 either way. float32
                products of *centred* chunks kept CKA within 4e-7 relative on activation-like data
                (offsets 1e4, D up to 512; see the tests); they pay off where float32 GEMMs are much
                faster than float64 ones (GPUs; about 1.4x on the 2-core CPU test machine).

        Returns:
            The chunk's Moments (n = number of rows).

        Raises:
            ValueError: if the arrays are not 2-D, differ in rows, are not real numbers, or hold NaN/inf.
        """
        x, y = _parse_pair(x, y)
        # The chunk's statistics themselves (``empty().update()`` returned the same, but held a zero accumulator of
        # 3 D^2 float64 beside the block's copies meanwhile).
        return _chunk_moments(x, y, parse_compute_dtype(compute_dtype))

    def update(self, x: ArrayLike, y: ArrayLike, *, compute_dtype: DTypeLike = np.float64) -> Moments:
        """These statistics with one more chunk of tokens (``self.merge(Moments.from_chunk(x, y))``)."""
        x, y = _parse_pair(x, y)
        return self.merge(_chunk_moments(x, y, parse_compute_dtype(compute_dtype)))

    def merge(self, other: Moments) -> Moments:
        """The statistics of the union of both token sets (pure; associative; ``empty`` is the identity).

        Raises:
            ValueError: if the hidden sizes differ.
        """
        if (self.dx, self.dy) != (other.dx, other.dy):
            raise ValueError(
                f"Expected Moments with hidden sizes (Dx, Dy) = {(self.dx, self.dy)}. "
                f"Got {(other.dx, other.dy)} instead. Merge only statistics of the same pair of hidden states."
            )
        return _combine(self, other)

    def without(self, part: Moments) -> Moments:
        """The statistics of these tokens less ``part``'s, a subset of them: the inverse of ``merge``.

        ``a.merge(b).without(b)`` equals ``a`` up to rounding. It turns per-group statistics and their total into
        the leave-one-group-out statistics of the jackknife in O(D^2) per group, instead of merging the G - 1
        other groups again. The subtraction costs no precision that matters here: every term is a co-moment about
        a mean (no raw sums), and the rest holds most of the tokens.

        Raises:
            ValueError: if the hidden sizes differ or ``part`` holds at least as many tokens as these.
        """
        if (self.dx, self.dy) != (part.dx, part.dy) or part.n >= self.n:
            raise ValueError(
                f"Expected a part of these statistics: sizes {(self.dx, self.dy)} and fewer than {self.n} tokens. "
                f"Got sizes {(part.dx, part.dy)} and {part.n} tokens instead."
            )
        return self if part.n == 0 else _remove(self, part)


def moments(
    x: ArrayLike,
    y: ArrayLike,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    compute_dtype: DTypeLike = np.float64,
) -> Moments:
    """Moments of two whole in-memory arrays, built chunk by chunk to bound the float64 copies.

    Args:
        x: (N, Dx) activations of model A.
        y: (N, Dy) activations of model B on the same tokens.
        chunk_rows: tokens per chunk (positive).
        compute_dtype: dtype of the matrix products; see ``Moments.from_chunk``.

    Returns:
        The Moments of all N tokens.

    Example:
        >>> import numpy as np
        >>> x = np.arange(12.0).reshape(4, 3)
        >>> m = moments(x, 2 * x + 1)
        >>> m.n, m.mean_y.tolist(), float(m.c_xy[0, 0])
        (4, [10.0, 12.0, 14.0], 90.0)
    """
    x, y = _parse_pair(x, y)
    if chunk_rows < 1:
        raise ValueError(f"Expected chunk_rows >= 1. Got {chunk_rows} instead.")
    dtype = parse_compute_dtype(compute_dtype)
    acc = Moments.empty(x.shape[1], y.shape[1])
    for start in range(0, x.shape[0], chunk_rows):
        stop = start + chunk_rows
        acc = _combine(acc, _chunk_moments(x[start:stop], y[start:stop], dtype))
    return acc


# --- validation (public entry points only) -------------------------------------------------------------


def _parse_pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    for name, a in (("x", x), ("y", y)):
        if a.ndim != 2:
            raise ValueError(f"Expected {name} of shape (N, D). Got an array of shape {a.shape} instead.")
        # ml_dtypes' bfloat16 has kind 'V'; anything that is not a real number is rejected here.
        if a.dtype.kind not in "fiu" and a.dtype.name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            raise ValueError(f"Expected real-valued {name}. Got dtype {a.dtype} instead.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"Expected x and y on the same tokens (same number of rows). Got {x.shape[0]} and {y.shape[0]} "
            "instead. Compare models only on the same corpus."
        )
    return x, y


# --- the math: one chunk, one combine --------------------------------------------------------------------


def _chunk_moments(x: np.ndarray, y: np.ndarray, compute_dtype: np.dtype) -> Moments:
    """Statistics of one chunk, centred on the chunk's own mean before any product."""
    dx, dy = x.shape[1], y.shape[1]
    if x.shape[0] == 0:
        return Moments.empty(dx, dy)
    # Step 1: centre in float64 (see ``centring``): the products below then lose nothing to the offsets.
    u, mean_x = centre_rows(x.astype(np.float64, copy=False))  # (n, Dx), (Dx,)
    v, mean_y = centre_rows(y.astype(np.float64, copy=False))  # (n, Dy), (Dy,)
    # Step 2: the O(n D^2) products, optionally in float32 (centred data keeps that accurate).
    uc, vc = u.astype(compute_dtype, copy=False), v.astype(compute_dtype, copy=False)
    if uc.dtype == np.float32:
        check_float32_range(uc, u)
        check_float32_range(vc, v)
    c_xx = (uc.T @ uc).astype(np.float64, copy=False)  # (Dx, Dx)
    c_yy = (vc.T @ vc).astype(np.float64, copy=False)  # (Dy, Dy)
    c_xy = (uc.T @ vc).astype(np.float64, copy=False)  # (Dx, Dy)
    # Step 3: the O(n D) norm moments for debiased CKA, always in float64.
    a, b = np.einsum("ij,ij->i", u, u), np.einsum("ij,ij->i", v, v)  # (n,), (n,)
    return Moments(
        n=int(x.shape[0]),
        mean_x=mean_x,
        mean_y=mean_y,
        c_xx=c_xx,
        c_yy=c_yy,
        c_xy=c_xy,
        q_xx=float(a @ a),
        q_yy=float(b @ b),
        q_xy=float(a @ b),
        g_xx=u.T @ a,
        g_xy=v.T @ a,
        g_yx=u.T @ b,
        g_yy=v.T @ b,
    )


def _combine(a: Moments, b: Moments) -> Moments:
    """Pairwise (Chan et al.) combination of two blocks; shared by ``update``/``from_chunk`` and ``merge``."""
    # Step 1: the identity. Returning the other block unchanged makes ``empty`` an exact identity.
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    # Step 2: pooled count and means, and the co-moments by the one Chan combine.
    step = ChanStep.of(a, b)
    n, mean_x, mean_y = step.n, step.mean_x, step.mean_y
    c_xx = step.comoment(a.c_xx, b.c_xx, step.delta_x, step.delta_x)  # (Dx, Dx)
    c_yy = step.comoment(a.c_yy, b.c_yy, step.delta_y, step.delta_y)  # (Dy, Dy)
    c_xy = step.comoment(a.c_xy, b.c_xy, step.delta_x, step.delta_y)  # (Dx, Dy)
    # Step 3: norm moments. Shift each block from its own mean to the pooled mean, then add.
    sa = _shift_norm_moments(a, mean_x - a.mean_x, mean_y - a.mean_y)
    sb = _shift_norm_moments(b, mean_x - b.mean_x, mean_y - b.mean_y)
    return Moments(
        n,
        mean_x,
        mean_y,
        c_xx,
        c_yy,
        c_xy,
        q_xx=sa.q_xx + sb.q_xx,
        q_yy=sa.q_yy + sb.q_yy,
        q_xy=sa.q_xy + sb.q_xy,
        g_xx=sa.g_xx + sb.g_xx,
        g_xy=sa.g_xy + sb.g_xy,
        g_yx=sa.g_yx + sb.g_yx,
        g_yy=sa.g_yy + sb.g_yy,
    )


def _remove(total: Moments, part: Moments) -> Moments:
    """``rest`` such that ``_combine(rest, part) == total``: Chan's combine solved for one of its blocks."""
    n = total.n - part.n
    # Step 1: the rest's means and co-moments. total = rest + part + w outer(delta) with delta = mean_p - mean_r.
    mean_x = total.mean_x + (part.n / n) * (total.mean_x - part.mean_x)
    mean_y = total.mean_y + (part.n / n) * (total.mean_y - part.mean_y)
    dx, dy = part.mean_x - mean_x, part.mean_y - mean_y
    weight = n * part.n / total.n

    def comoment(c_t: F64, c_p: F64, du: F64, dv: F64) -> F64:
        c = c_t - c_p
        add_outer(c, -weight, du, dv)
        return c

    c_xx, c_yy, c_xy = comoment(total.c_xx, part.c_xx, dx, dx), comoment(total.c_yy, part.c_yy, dy, dy), comoment(total.c_xy, part.c_xy, dx, dy)
    # Step 2: norm moments. The total's are the sum of both blocks' shifted to the pooled mean; subtract the
    # part's, then undo the rest's shift (its co-moments are known from step 1).
    sp = _shift_norm_moments(part, total.mean_x - part.mean_x, total.mean_y - part.mean_y)
    shifted = _NormMoments(*(t - p for t, p in zip(_norm_moments(total), sp, strict=True)))
    rest = replace(Moments.empty(total.dx, total.dy), n=n, c_xx=c_xx, c_yy=c_yy, c_xy=c_xy)  # what the unshift reads
    norm = _unshift_norm_moments(rest, shifted, total.mean_x - mean_x, total.mean_y - mean_y)
    return Moments(n, mean_x, mean_y, c_xx, c_yy, c_xy, *norm)


def _norm_moments(m: Moments) -> _NormMoments:
    return _NormMoments(m.q_xx, m.q_yy, m.q_xy, m.g_xx, m.g_xy, m.g_yx, m.g_yy)


class _NormMoments(NamedTuple):
    """The debiased-CKA sums of one block, re-centred (see ``_shift_norm_moments``)."""

    q_xx: float
    q_yy: float
    q_xy: float
    g_xx: F64
    g_xy: F64
    g_yx: F64
    g_yy: F64


def _shift_norm_moments(m: Moments, d: F64, e: F64) -> _NormMoments:
    """Norm moments of block ``m`` re-centred at ``mean_x + d``, ``mean_y + e`` (u' = u - d, v' = v - e).

    Expanding a'_i = a_i - 2 u_i.d + |d|^2 and summing with sum_i u_i = 0 (the block is centred) gives

        g_wz' = g_wz - (tr C_ww + n |d_w|^2) d_z - 2 C_zw d_w
        q_wz' = q_wz - 2 d_z.g_wz - 2 d_w.g_zw + |d_z|^2 tr C_ww + |d_w|^2 tr C_zz
                + 4 d_w^T C_wz d_z + n |d_w|^2 |d_z|^2

    for w, z in {x, y} (g_wz = sum_i |w_i|^2 z_i, with C_yx = C_xy^T).
    """
    g_xx, g_xy, g_yx, g_yy = m.g_xx, m.g_xy, m.g_yx, m.g_yy
    dd, ee = float(d @ d), float(e @ e)
    tr_x, tr_y = float(np.trace(m.c_xx)), float(np.trace(m.c_yy))
    cxx_d, cyy_e = m.c_xx @ d, m.c_yy @ e  # (Dx,), (Dy,)
    cxy_e, cyx_d = m.c_xy @ e, m.c_xy.T @ d  # (Dx,), (Dy,)
    return _NormMoments(
        q_xx=float(m.q_xx - 4 * d @ g_xx + 2 * dd * tr_x + 4 * d @ cxx_d + m.n * dd * dd),
        q_yy=float(m.q_yy - 4 * e @ g_yy + 2 * ee * tr_y + 4 * e @ cyy_e + m.n * ee * ee),
        q_xy=float(m.q_xy - 2 * e @ g_xy - 2 * d @ g_yx + ee * tr_x + dd * tr_y + 4 * d @ cxy_e + m.n * dd * ee),
        g_xx=g_xx - (tr_x + m.n * dd) * d - 2 * cxx_d,
        g_xy=g_xy - (tr_x + m.n * dd) * e - 2 * cyx_d,
        g_yx=g_yx - (tr_y + m.n * ee) * d - 2 * cxy_e,
        g_yy=g_yy - (tr_y + m.n * ee) * e - 2 * cyy_e,
    )


def _unshift_norm_moments(m: Moments, shifted: _NormMoments, d: F64, e: F64) -> _NormMoments:
    """The inverse of ``_shift_norm_moments``: block ``m``'s own norm moments from ``shifted``, its sums re-centred
    at ``mean_x + d``, ``mean_y + e`` (``m``'s n, means and co-moments are used; its norm moments are not)."""
    dd, ee = float(d @ d), float(e @ e)
    tr_x, tr_y = float(np.trace(m.c_xx)), float(np.trace(m.c_yy))
    cxx_d, cyy_e = m.c_xx @ d, m.c_yy @ e  # (Dx,), (Dy,)
    cxy_e, cyx_d = m.c_xy @ e, m.c_xy.T @ d  # (Dx,), (Dy,)
    g_xx = shifted.g_xx + (tr_x + m.n * dd) * d + 2 * cxx_d
    g_xy = shifted.g_xy + (tr_x + m.n * dd) * e + 2 * cyx_d
    g_yx = shifted.g_yx + (tr_y + m.n * ee) * d + 2 * cxy_e
    g_yy = shifted.g_yy + (tr_y + m.n * ee) * e + 2 * cyy_e
    return _NormMoments(
        q_xx=float(shifted.q_xx + 4 * d @ g_xx - 2 * dd * tr_x - 4 * d @ cxx_d - m.n * dd * dd),
        q_yy=float(shifted.q_yy + 4 * e @ g_yy - 2 * ee * tr_y - 4 * e @ cyy_e - m.n * ee * ee),
        q_xy=float(shifted.q_xy + 2 * e @ g_xy + 2 * d @ g_yx - ee * tr_x - dd * tr_y - 4 * d @ cxy_e - m.n * dd * ee),
        g_xx=g_xx, g_xy=g_xy, g_yx=g_yx, g_yy=g_yy,
    )
