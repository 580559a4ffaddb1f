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
from dataclasses import dataclass
from functools import cache

import numpy as np

__all__ = ["gemm_library", "multiply_into"]

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


def gemm_library() -> str:
    """Which GEMM :func:`multiply_into` runs here (for benchmarks and plans): a library's path, or "torch"."""
    found = _numpy_openblas()
    return "torch" if found is None else found.path


def multiply_into(total: np.ndarray | None, u: np.ndarray, v: np.ndarray, beta: float = 1.0,
                  block: tuple[int, int] | None = None) -> np.ndarray:
    """``total = beta total + u^T v`` in place (float64 or float32, as u and v are), no temporary; ``total`` None (or
    ``beta`` 0, when the GEMM ignores what it holds) starts a new sum. Returns the sum.

    One GEMM, or with ``block = (du, dv)`` one GEMM per (du, dv) block of the total (u's columns du at a time against
    v's dv at a time). OpenBLAS's float32 sums depend on the shape of the product they are part of (2.4e-4 apart at
    D = 576 between 576 rows and 1,152; 3e-5 between a block of 16 columns at the end of 32 and inside 64), MKL's did
    not: a tile multiplies each state of A by each state of B on its own, so every pair's sums are the same whatever
    the tile, the plan and the workers (10% of the GEMM rate at (e)'s tiles on an AMD EPYC, measured).

    Args:
        total: (Du, Dv) of u's dtype, writable, Fortran-ordered (the layout the GEMM writes without a copy); or None.
        u: (n, Du) C-ordered centred rows; v: (n, Dv) C-ordered centred rows, of the same dtype.
    """
    if total is None:
        total, beta = np.empty((u.shape[1], v.shape[1]), dtype=u.dtype, order="F"), 0.0
    if not (total.flags.f_contiguous and total.flags.writeable and u.flags.c_contiguous and v.flags.c_contiguous
            and total.dtype == u.dtype == v.dtype and u.dtype in (np.float32, np.float64)):
        raise ValueError("multiply_into takes C-ordered u, v and a writable Fortran-ordered total of one float dtype")
    du, dv = block or (max(1, u.shape[1]), max(1, v.shape[1]))
    for i in range(0, u.shape[1], du):
        for j in range(0, v.shape[1], dv):
            _gemm(total[i : i + du, j : j + dv], u[:, i : i + du], v[:, j : j + dv], beta)
    return total


def _gemm(total: np.ndarray, u: np.ndarray, v: np.ndarray, beta: float) -> None:
    cblas = _numpy_openblas()
    if cblas is not None:
        cblas.gemm(total, u, v, beta)
        return
    import torch

    # total.T is rows of a C-ordered array: from_numpy shares it, and .T is (Du, Dv) again, column-major for BLAS.
    torch.from_numpy(total.T).T.addmm_(torch.from_numpy(u).T, torch.from_numpy(v), beta=beta)
