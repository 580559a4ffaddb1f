"""Centring a chunk of activations on its own mean, the first step of every accumulator and backend.

Each chunk (n, D) is centred in float64 *before* any product: the products then see values the size of the
spread, not of the offset (LLM hidden states carry 1e3-1e4 in a few dimensions), so float32 products and
float64 sums lose nothing to cancellation. The same step refuses NaN and inf, once, for every path:
:class:`~hrsa.analyze.accumulators.moments.Moments`, :class:`~hrsa.analyze.accumulators.cross_moments.CrossMoments`
and the torch backend (:func:`centre_rows` works on numpy arrays and torch tensors alike).

Pure numpy: no Dask, Zarr, Ray or torch import here.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, DTypeLike, NDArray

    F64 = NDArray[np.float64]

__all__ = ["COMPUTE_DTYPES", "FLOAT32_RANGE", "NON_FINITE_MESSAGE", "SPREAD_RTOL", "Float32RangeError", "centre_chunk",
           "centre_rows", "check_float32_range", "has_no_spread", "parse_compute_dtype"]

#: dtypes the O(n D^2) products may run in; centring and accumulation are float64 either way.
COMPUTE_DTYPES = (np.dtype(np.float64), np.dtype(np.float32))

_FLOAT64_MAX = sys.float_info.max  # a plain float: numpy arrays and torch tensors both compare with it

#: a representation whose spread (RMS distance of its rows from their mean) is within this fraction of its RMS size is
#: constant: centring a constant float64 representation leaves a few ulps (3e-14 seen); a float32 or bf16 one that
#: varies at all varies by >= 6e-8. One token has no spread whatever its co-moments say. (A few tokens left when a
#: group is taken out of pooled sums are merged from the other groups, not subtracted: accumulators/groups.py.)
SPREAD_RTOL = 1e-12

NON_FINITE_MESSAGE = "Expected finite activations. Got NaN or inf in a chunk instead. Check the extraction."

Rows = TypeVar("Rows")  # a float64 numpy array or torch tensor, (n, D)

#: Centred values whose float32 products keep every score within 1e-6: |v| in [2^-56, 2^56], or 0. Below, squares
#: (< 2^-112) near float32's subnormals (2^-126) lose bits or vanish, so C_xx shrinks while C_xy holds (CKA of a side
#: scaled by 1e-23 read 5.87; 1e-21 was 2.3e-6 off); above, a run's sum of 8,192 squares (2^125) nears float32's
#: largest (2^128), and overflowed squares read as constant dimensions. CKA and r do not depend on the scale.
FLOAT32_RANGE = (2.0**-56, 2.0**56)


class Float32RangeError(ValueError):
    """Centred activations outside :data:`FLOAT32_RANGE`: their products need float64. ``magnitude``: the value."""

    def __init__(self, magnitude: float) -> None:
        low, high = FLOAT32_RANGE
        super().__init__(f"Expected centred activations whose squares float32 products hold (|x - mean| between "
                         f"{low:.2g} and {high:.2g}, or 0). Got {magnitude:.3g} instead: use --compute-dtype float64 "
                         "(auto does so by itself).")
        self.magnitude = magnitude

    def __reduce__(self) -> tuple[type, tuple[float]]:  # unpickled in a Ray driver from its magnitude, not its text
        return type(self), (self.magnitude,)


def check_float32_range(cast: Any, source: Any = None) -> None:
    """Refuse centred values ``cast`` (n, D) to float32 (a numpy array or torch tensor) whose squares float32 does not
    hold (:data:`FLOAT32_RANGE`), by each column's largest magnitude. ``source``: what was cast (float64, centred or
    not), read only for columns cast to all zeros: values under 2^-149 flush to zero, and a column that varies would
    pass for a constant one. (On the cast: half the bytes of float64 to read, 2-4% of a matched block's time.)

    Raises:
        Float32RangeError: a column's values are out of the range.
    """
    if cast.shape[0] == 0:
        return
    peak = _column_peak(cast)
    low, high = FLOAT32_RANGE
    out = ((peak > 0) & (peak < low)) | (peak > high)  # inf (an overflowed cast) is above
    if out.any():
        raise Float32RangeError(float(peak[out].max() if (peak[out] > high).any() else peak[out].min()))
    flushed = peak == 0
    if source is not None and flushed.any():
        columns = flushed if isinstance(source, np.ndarray) else _like(source, flushed)
        varies = _column_peak(source[:, columns] - source[:1, columns])
        if (varies > 0).any():
            raise Float32RangeError(float(varies[varies > 0].min()))


def _column_peak(rows: Any) -> np.ndarray:
    """The largest magnitude of each column of ``rows`` (numpy or torch), as a numpy array."""
    if isinstance(rows, np.ndarray):
        return np.maximum(rows.max(axis=0), -rows.min(axis=0))
    return (rows.amax(0).double().maximum(-rows.amin(0).double())).cpu().numpy()


def _like(tensor: Any, mask: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(mask).to(tensor.device)


def centre_rows(x64: Rows) -> tuple[Rows, Rows]:
    """Centre float64 rows (n, D) on their mean; the one centring and finiteness check of hrsa.

    Duck-typed, so numpy arrays and torch tensors (on any device) share it: it uses only ``.mean(0)``,
    ``.sum(0)``, ``abs``, arithmetic, comparison and ``.all()``.

    Args:
        x64: (n, D) float64 activations; n may be 0.

    Returns:
        The centred rows (n, D) and their mean (D,) (zeros when n is 0), both of the input's kind.

    Raises:
        ValueError: if the rows hold NaN or inf.

    Example:
        >>> import numpy as np
        >>> u, mean = centre_rows(np.array([[1.0, 1e4], [3.0, 1e4 + 2]]))
        >>> u.tolist(), mean.tolist()
        ([[-1.0, -1.0], [1.0, 1.0]], [2.0, 10001.0])
    """
    x: Any = x64
    mean = x.mean(0) if x.shape[0] else x.sum(0)  # (D,); the sum of no rows is the zeros of the right kind
    # A NaN or inf anywhere reaches the mean, and fails this comparison (NaN compares false, silently).
    # Unlike np.isfinite, it is spelled the same for numpy arrays and torch tensors.
    if not bool((abs(mean) <= _FLOAT64_MAX).all()):
        raise ValueError(NON_FINITE_MESSAGE)
    return x - mean, mean


def centre_chunk(x: ArrayLike, compute_dtype: DTypeLike = np.float64) -> tuple[np.ndarray, F64]:
    """Centre a chunk (n, D) on its own mean in float64, then cast to ``compute_dtype``.

    Args:
        x: (n, D) activations, any real dtype (bfloat16 included).
        compute_dtype: dtype of the products the centred chunk goes into, float64 or float32.

    Returns:
        The centred chunk (n, D) in ``compute_dtype`` and its float64 mean (D,).

    Raises:
        ValueError: if the chunk is not 2-D, ``compute_dtype`` is neither float64 nor float32, or the
            chunk holds NaN or inf.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"Expected a chunk of shape (n, D). Got shape {x.shape} instead.")
    dtype = parse_compute_dtype(compute_dtype)
    u, mean = centre_rows(x.astype(np.float64, copy=False))
    cast = u.astype(dtype, copy=False)
    if dtype == np.float32:
        check_float32_range(cast, u)
    return cast, mean


def parse_compute_dtype(compute_dtype: DTypeLike) -> np.dtype:
    """``compute_dtype`` as a numpy dtype, checked to be float64 or float32.

    Raises:
        ValueError: any other dtype.
    """
    dtype = np.dtype(compute_dtype)
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"Expected compute_dtype float64 or float32. Got {dtype} instead.")
    return dtype


def has_no_spread(trace: float, n: int, mean: F64) -> bool:
    """Whether a representation of ``n`` tokens, with co-moment trace ``trace`` (n times its total variance) and
    mean ``mean``, is constant: one token, or a spread within :data:`SPREAD_RTOL` of its size. Metrics that divide by
    the spread (CKA, Procrustes) are undefined (NaN) there, not the ratio of two rounding residues.

    Example:
        >>> import numpy as np
        >>> has_no_spread(3e-26, 100, np.full(4, 1e3)), has_no_spread(4.0, 100, np.full(4, 1e5)), has_no_spread(2.5e-10, 1, np.ones(4))
        (True, False, True)
    """
    if n < 2 or not trace > 0:
        return True
    variance = trace / n
    return variance <= SPREAD_RTOL**2 * (variance + float(np.dot(mean, mean)))
