"""Chan's rank-one correction in place (``add_outer``): equal to numpy's float64 outer product, and refused where
writing in place would be wrong."""

from __future__ import annotations

import numpy as np
import pytest

from hrsa.analyze.accumulators._chan import add_outer


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize(("du", "dv"), [(5, 5), (5, 7), (7, 5), (1, 6), (6, 1)])
def test_add_outer_equals_numpy_s_outer_product(order: str, du: int, dv: int) -> None:
    rng = np.random.default_rng(du * 10 + dv)
    c = np.asarray(rng.standard_normal((du, dv)) * 1e3, order=order)
    u, v = rng.standard_normal(du) + 1e4, rng.standard_normal(dv)
    expected = c + (-2.5) * np.outer(u, v)
    add_outer(c, -2.5, u, v)
    np.testing.assert_allclose(c, expected, rtol=1e-14, atol=1e-9)
    assert c.flags.c_contiguous if order == "C" else c.flags.f_contiguous  # in place, its layout kept


def test_add_outer_refuses_a_read_only_matrix_instead_of_writing_through_it() -> None:
    c = np.zeros((4, 3))
    c.flags.writeable = False  # as Ray maps an accumulator out of its object store
    with pytest.raises(ValueError, match="writable"):
        add_outer(c, 1.0, np.ones(4), np.ones(3))
    assert not c.any()


def test_add_outer_refuses_a_strided_or_float32_matrix() -> None:
    with pytest.raises(ValueError, match="contiguous float64"):
        add_outer(np.zeros((4, 6))[:, ::2], 1.0, np.ones(4), np.ones(3))
    with pytest.raises(ValueError, match="contiguous float64"):
        add_outer(np.zeros((4, 3), dtype=np.float32), 1.0, np.ones(4), np.ones(3))


@pytest.mark.parametrize("order", ["C", "F"])
def test_add_outer_writes_into_a_misaligned_matrix(order: str) -> None:
    """f2py copies a matrix that is not aligned for float64 (one unpickled from a byte buffer at an odd offset)
    before BLAS updates it: the update must still land in the caller's matrix, not in the copy."""
    rng = np.random.default_rng(3)
    du, dv = 4, 3
    buffer = np.zeros(8 * du * dv + 1, dtype=np.uint8)
    c = np.ndarray((du, dv), dtype=np.float64, buffer=buffer[1:].data, order=order)  # offset by one byte
    assert not c.flags.aligned and c.flags.writeable
    c[...] = rng.standard_normal((du, dv))
    u, v = rng.standard_normal(du), rng.standard_normal(dv)
    expected = c + 0.75 * np.outer(u, v)
    add_outer(c, 0.75, u, v)
    np.testing.assert_allclose(c, expected, rtol=1e-14, atol=1e-14)
