"""``total = beta total + u^T v`` in place, by the BLAS numpy itself ships, with the GIL let go.

The running sums of a cross-layer tile take GEMMs block after block into the same matrix (``beta = 1``), while another
thread reads and decompresses the next block. Three ways to run that product from Python were measured
(benchmark (h), and side by side on an Intel and an AMD machine):

- scipy's ``blas.sgemm``/``dgemm`` accumulate in place but hold the GIL for the whole product: the reading thread runs
  at 1% of its speed meanwhile.
- torch's ``addmm_`` on views of the same memory lets go of the GIL, but runs MKL, which on AMD CPUs takes slower code
  paths (124 GFLOP/s against OpenBLAS's 145-170 on the same 2 cores at (e)'s shapes), and ignores the BLAS thread
  limit the Dask scheduler sets (MKL is linked into torch, out of threadpoolctl's reach).
- numpy's ``matmul`` lets go of the GIL and runs OpenBLAS, but cannot add into a sum (a temporary as large as the sum).

So the OpenBLAS library numpy loaded is called here through ctypes (which releases the GIL for the call), found by
threadpoolctl; torch's ``addmm_`` where numpy was built on another BLAS (no OpenBLAS found).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

__all__ = ["blas_threads", "gemm_library", "multiply_into", "prepare_tile_gemm", "probe_bytes"]

_COL_MAJOR, _NO_TRANS, _TRANS = 102, 111, 112  # CBLAS enums


@dataclass(frozen=True)
class _Cblas:
    """``cblas_sgemm`` and ``cblas_dgemm`` of one library, and the integer type of their sizes (ILP64 or LP64)."""

    path: str
    sgemm: ctypes._CFuncPtr
    dgemm: ctypes._CFuncPtr
    int_type: type

    def gemm(self, total: np.ndarray, u: np.ndarray, v: np.ndarray, beta: float) -> None:
        # Column-major terms: u's (n, Du) rows are u^T (Du x n), v's are v^T (Dv x n), the total is (Du x Dv):
        # total = beta total + (u^T) (v^T)^T. Each may be a part of a larger matrix: its leading dimension is the
        # stride between its rows (u, v: C-ordered rows) or columns (the total: Fortran-ordered columns).
        du, dv, n = u.shape[1], v.shape[1], u.shape[0]
        lda, ldb, ldc = (max(1, a.strides[i] // a.itemsize, a.shape[1 - i]) for a, i in ((u, 0), (v, 0), (total, 1)))
        fn, scalar = (self.sgemm, ctypes.c_float) if u.dtype == np.float32 else (self.dgemm, ctypes.c_double)
        size = self.int_type
        fn(_COL_MAJOR, _NO_TRANS, _TRANS, size(du), size(dv), size(n), scalar(1.0),
           u.ctypes.data_as(ctypes.c_void_p), size(lda), v.ctypes.data_as(ctypes.c_void_p), size(ldb),
           scalar(beta), total.ctypes.data_as(ctypes.c_void_p), size(ldc))


def _bind(path: str) -> _Cblas | None:
    """The CBLAS GEMMs of the OpenBLAS at ``path``: scipy-openblas builds prefix ``scipy_`` and, ILP64, suffix ``64_``."""
    library = ctypes.CDLL(path)  # already loaded by numpy: this only looks its symbols up
    for prefix, suffix, int_type in (("scipy_", "64_", ctypes.c_int64), ("", "64_", ctypes.c_int64),
                                     ("scipy_", "", ctypes.c_int), ("", "", ctypes.c_int)):
        try:
            sgemm, dgemm = (getattr(library, f"{prefix}cblas_{t}gemm{suffix}") for t in "sd")
        except AttributeError:
            continue
        for fn in (sgemm, dgemm):
            fn.restype = None
        bound = _Cblas(path, sgemm, dgemm, int_type)
        if _agrees_with_matmul(bound):
            return bound
    return None


def _agrees_with_matmul(cblas: _Cblas) -> bool:
    """One small product of each dtype against numpy's matmul: a binding whose names promise the wrong integer size
    (an ILP64 build without the suffix) would sum garbage silently."""
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        u, v = rng.normal(size=(5, 3)).astype(dtype), rng.normal(size=(5, 4)).astype(dtype)
        total = np.ones((3, 4), dtype=dtype, order="F")
        cblas.gemm(total, u, v, 1.0)
        if not np.allclose(total, 1.0 + u.T @ v, rtol=1e-5, atol=1e-5):
            return False
    return True


@cache
def _numpy_openblas() -> _Cblas | None:
    """numpy's own OpenBLAS (the one its ``matmul`` uses), or None where numpy was built on another BLAS."""
    from threadpoolctl import threadpool_info

    found = [lib for lib in threadpool_info() if lib.get("internal_api") == "openblas"]
    found.sort(key=lambda lib: "numpy" not in lib["filepath"])  # numpy's first, scipy's only failing that
    for lib in found:
        bound = _bind(lib["filepath"])
        if bound is not None:
            return bound
    return None


@cache
def _threads_of_library() -> Any:
    """threadpoolctl's controller of :func:`multiply_into`'s library (none where it is torch's). Kept: a fresh one
    scans every loaded library (~200 kB of Python objects with torch loaded)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(filepath=gemm_library())


def blas_threads() -> int:
    """The threads :func:`multiply_into`'s library runs a GEMM on now (1 where it is torch's)."""
    return next((int(lib["num_threads"]) for lib in _threads_of_library().info()), 1)


def gemm_library() -> str:
    """Which GEMM :func:`multiply_into` runs here (for benchmarks and plans): a library's path, or "torch"."""
    found = _numpy_openblas()
    return "torch" if found is None else found.path


def multiply_into(total: np.ndarray | None, u: np.ndarray, v: np.ndarray, beta: float = 1.0,
                  block: tuple[int, int] | None = None) -> np.ndarray:
    """``total = beta total + u^T v`` in place (float64 or float32, as u and v are), no temporary; ``total`` None (or
    ``beta`` 0, when the GEMM ignores what it holds) starts a new sum. Returns the sum.

    With ``block = (du, dv)`` every (du, dv) block of the total gets the sums a GEMM of that block alone gives, so a
    pair's sums are the same whatever the tile, the plan and the workers. OpenBLAS's kernels for AVX2 (an AMD EPYC)
    sum an element differently with the shape of the product it is part of (2.4e-4 apart at D = 576 between 576 rows
    and 1,152; 3e-5 between a block of 16 columns at the end of 32 and inside 64); its kernels for AVX-512 (SkylakeX)
    did not. So: one GEMM of the whole total where :func:`prepare_tile_gemm` found it bit for bit equal to a GEMM per
    block for this library, dtype, block size, rows and thread count (at (e)'s 8 x 8 tiles one GEMM ran at 177-214
    GFLOP/s against 133-144 per block on SkylakeX, benchmark (h)), else a GEMM per block. This function never probes:
    the probe's arrays would fall inside a pass's memory, so the passes settle it before they start.

    Args:
        total: (Du, Dv) of u's dtype, writable, Fortran-ordered (the layout the GEMM writes without a copy); or None.
        u: (n, Du) centred rows; v: (n, Dv) centred rows, of the same dtype: each row contiguous, the rows at any
            stride (a slot of columns of a wider C-ordered block is read in place, with the stride as its leading
            dimension: no copy).
    """
    if total is None:
        total, beta = np.empty((u.shape[1], v.shape[1]), dtype=u.dtype, order="F"), 0.0
    if not (total.flags.f_contiguous and total.flags.writeable and _rows_contiguous(u) and _rows_contiguous(v)
            and total.dtype == u.dtype == v.dtype and u.dtype in (np.float32, np.float64)):
        raise ValueError("multiply_into takes u, v of contiguous rows and a writable Fortran-ordered total of one float dtype")
    du, dv = block or (max(1, u.shape[1]), max(1, v.shape[1]))
    if (block is not None and _WHOLE_TILE
            and _WHOLE_TILE.get((gemm_library(), u.dtype.char, du, dv, u.shape[0], blas_threads()), False)):
        du, dv = max(1, u.shape[1]), max(1, v.shape[1])
    _per_block(total, u, v, beta, du, dv)
    return total


def _rows_contiguous(a: np.ndarray) -> bool:
    """Whether ``a`` (n, D) is rows of D contiguous values at one stride of whole items, no shorter than a row: what
    BLAS reads as a column-major (D x n) matrix with that stride as its leading dimension (an empty one: any strides)."""
    if a.ndim != 2:
        return False
    if a.size == 0:
        return True
    item = a.itemsize
    columns = a.shape[1] == 1 or a.strides[1] == item
    rows = a.shape[0] == 1 or (a.strides[0] % item == 0 and a.strides[0] >= a.shape[1] * item)
    return columns and rows


def _per_block(total: np.ndarray, u: np.ndarray, v: np.ndarray, beta: float, du: int, dv: int) -> None:
    """A GEMM per (du, dv) block of ``total``: u's columns du at a time against v's dv at a time."""
    for i in range(0, u.shape[1], du):
        for j in range(0, v.shape[1], dv):
            _gemm(total[i : i + du, j : j + dv], u[:, i : i + du], v[:, j : j + dv], beta)


#: The probe's verdicts, per (library, dtype char, du, dv, rows, BLAS threads): set by prepare_tile_gemm, read by
#: multiply_into for products of exactly that shape at that thread count.
_WHOLE_TILE: dict[tuple[str, str, int, int, int, int], bool] = {}
#: Blocks the probe runs at: above, a GEMM per block already runs near the library's rate, and the probe would cost
#: more memory than it saves time.
_PROBE_BLOCKS = (128, 1024)
#: Products smaller than this (rows x du x dv) are not probed: OpenBLAS multiplies products of up to 100^3 by other
#: kernels ("small matrix" paths) and runs small ones on fewer threads.
_SMALL_PRODUCT = 4 * 100**3


def probe_bytes(dtype: np.dtype | str, du: int, dv: int, rows: int) -> int:
    """Bytes the probe of (du, dv) blocks of ``rows`` rows allocates (freed before it returns): a 3 x 3 tile's inputs
    and total, one block's total, and the booleans of one block's comparison."""
    return np.dtype(dtype).itemsize * (rows * 3 * (du + dv) + 10 * du * dv) + du * dv


def prepare_tile_gemm(dtype: np.dtype | str, du: int, dv: int, rows: int, *, threads: Iterable[int],
                      limit_bytes: int | None = None) -> bool:
    """Whether :func:`multiply_into` may run one GEMM of a total made of (du, dv) blocks for products of ``rows`` rows
    (a pass's full blocks) at every one of ``threads`` BLAS threads: probed once per process, library, dtype and shape;
    the passes call it before their memory is counted.

    The probe multiplies tiles of 3 x 3, 1 x 3 and 3 x 1 blocks of random data with offsets both ways (one GEMM; a GEMM
    per block), beta 0 then 1 as the passes do, at each thread count: each block must come out bit for bit the same.
    Exactly the pass's products: OpenBLAS splits k differently on one thread and on several once k passes its k-block,
    so a verdict holds for its rows and thread count only; multiply_into runs a GEMM per block for any other product.

    No probe, and a GEMM per block, where the GEMM is torch's (MKL's sums may follow the thread count and alignment,
    which no thread limit here reaches), for blocks outside :data:`_PROBE_BLOCKS` or products under
    :data:`_SMALL_PRODUCT`, or where the probe's arrays (:func:`probe_bytes`) would exceed ``limit_bytes`` (the plan's
    peak: the probe runs before the accumulators exist, so it never raises the process's peak above the plan's).
    """
    library, char = gemm_library(), np.dtype(dtype).char
    low, high = _PROBE_BLOCKS
    if (library == "torch" or not low <= min(du, dv) <= max(du, dv) <= high or rows * du * dv < _SMALL_PRODUCT
            or (limit_bytes is not None and probe_bytes(dtype, du, dv, rows) > limit_bytes)):
        return False
    verdicts = []
    for count in sorted({max(1, t) for t in threads}):
        key = (library, char, du, dv, rows, count)
        if key not in _WHOLE_TILE:
            _WHOLE_TILE[key] = all(_same_sums(char, du, dv, rows, tile, count) for tile in ((3, 3), (1, 3), (3, 1)))
        verdicts.append(_WHOLE_TILE[key])
    return all(verdicts)


def probed(dtype: np.dtype | str, du: int, dv: int, rows: int, *, threads: Iterable[int]) -> bool:
    """Whether this process holds :func:`prepare_tile_gemm`'s verdicts for these products at every one of ``threads``."""
    library, char = gemm_library(), np.dtype(dtype).char
    return all((library, char, du, dv, rows, max(1, t)) in _WHOLE_TILE for t in threads)


def _same_sums(dtype: str, du: int, dv: int, rows: int, tile: tuple[int, int], threads: int) -> bool:
    """Whether a tile of (du, dv) blocks sums each block bit for bit alike as one GEMM and as a GEMM per block."""
    rng = np.random.default_rng(0)
    u = rng.standard_normal((rows, tile[0] * du), dtype=dtype)
    v = rng.standard_normal((rows, tile[1] * dv), dtype=dtype)
    u += 3.0  # offsets, as activations have: in place (the probe's memory is counted)
    v -= 2.0
    with _threads_of_library().limit(limits=threads):
        whole = np.empty((u.shape[1], v.shape[1]), dtype=dtype, order="F")
        for beta in (0.0, 1.0):
            _gemm(whole, u, v, beta)
        one = np.empty((du, dv), dtype=dtype, order="F")
        for i in range(tile[0]):
            for j in range(tile[1]):
                for beta in (0.0, 1.0):
                    _gemm(one, u[:, i * du : (i + 1) * du], v[:, j * dv : (j + 1) * dv], beta)
                if not np.array_equal(one, whole[i * du : (i + 1) * du, j * dv : (j + 1) * dv]):
                    return False
    return True


def _gemm(total: np.ndarray, u: np.ndarray, v: np.ndarray, beta: float) -> None:
    cblas = _numpy_openblas()
    if cblas is not None:
        cblas.gemm(total, u, v, beta)
        return
    import torch

    # total.T is rows of a C-ordered array: from_numpy shares it, and .T is (Du, Dv) again, column-major for BLAS.
    torch.from_numpy(total.T).T.addmm_(torch.from_numpy(u).T, torch.from_numpy(v), beta=beta)
