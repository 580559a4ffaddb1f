"""The conformance suite every mergeable accumulator passes: :class:`AccumulatorTests`.

An accumulator (``Moments``, ``CrossMoments``, or a new one) is a frozen set of float64 statistics of some
tokens with ``n`` and a pure ``merge``. Dask tree-reduces it and a cluster splits the tokens, so what makes
it correct is the algebra of ``merge``, checked here under hypothesis on adversarial activations (offsets
up to 1e5, rows with 1e3 times the norm of the rest, duplicate rows, N < D, float32 or float64):

- identity: ``x.merge(empty) == x == empty.merge(x)`` exactly, and a chunk of no rows is ``empty``;
- associativity: ``(a.merge(b)).merge(c) == a.merge(b.merge(c))`` up to rounding;
- order independence: any split points, any permutation of the chunks and any merge tree give the same;
- equality with the one-shot float64 computation on the whole arrays (the oracle, written in the test).

"Up to rounding" is tight and per entry: each value is compared against the size of the terms it sums
(:class:`Expected`'s ``scale``, e.g. the Cauchy-Schwarz bound ``sqrt(sum u_i^2 sum v_j^2)`` of a co-moment
``sum u_i v_j``), not against the largest entry of its matrix, so a small entry beside a large one is checked
as tightly as the large one.

Use it as zarr's ``StoreTests``: subclass it in a test file, in a few lines::

    class TestMoments(AccumulatorTests[Moments]):
        def from_chunk(self, x, y): return Moments.from_chunk(x, y)
        def empty(self, dx, dy): return Moments.empty(dx, dy)
        def oracle(self, x, y): return {"mean_x": expected_mean(x), "c_xy": expected_products(u, v), ...}

This module imports pytest and hypothesis at the top: only tests import it, and both are in hrsa's
``test`` extra only (``pip install hrsa[test]``), not in its runtime dependencies.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, NamedTuple, Protocol, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

__all__ = [
    "Accumulator",
    "AccumulatorTests",
    "ChunkedPair",
    "Expected",
    "chunked_pairs",
    "expected_mean",
    "expected_products",
    "merge_tree",
]

#: Examples per property: enough to find a wrong formula, few enough for the default test run.
MAX_EXAMPLES = 25

# Every subclass runs the same @given methods: that is the point of a conformance suite, not a mistake.
_SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.differing_executors])


class Accumulator(Protocol):
    """What the suite needs of an accumulator: its token count and a pure ``merge``."""

    @property
    def n(self) -> int: ...

    def merge(self, other: Any) -> Any: ...


A = TypeVar("A", bound=Accumulator)


class Expected(NamedTuple):
    """One field's one-shot float64 value and, per entry, the size of the terms it sums.

    Attributes:
        value: the field computed on the whole arrays at once, in float64.
        scale: same shape (or broadcastable): what rounding errors are measured against, entry by entry.
    """

    value: np.ndarray
    scale: np.ndarray


def expected_mean(x: np.ndarray) -> Expected:
    """The column means of x (N, D), each against the largest magnitude of its column.

    Example:
        >>> expected_mean(np.array([[1.0, -4.0], [3.0, 2.0]]))
        Expected(value=array([ 2., -1.]), scale=array([3., 4.]))
    """
    return Expected(x.mean(0), np.abs(x).max(0))


def expected_products(u: np.ndarray, v: np.ndarray) -> Expected:
    """``u^T v`` for u (N,) or (N, Du) and v (N,) or (N, Dv), each entry against its Cauchy-Schwarz bound.

    Entry (i, j) sums u_ni v_nj over the tokens, so ``sqrt(sum_n u_ni^2 * sum_n v_nj^2)`` bounds it and
    every partial sum a merge adds up; rounding is a small multiple of float64's epsilon times that bound.
    A 1-D argument is one column and drops its axis from the result: ``u^T a`` of u (N, D) and a (N,) is (D,).

    Example:
        >>> u = np.array([[1.0, 0.0], [-1.0, 0.0]])
        >>> expected_products(u, u)
        Expected(value=array([[2., 0.],
               [0., 0.]]), scale=array([[2., 0.],
               [0., 0.]]))
    """
    n = u.shape[0]
    uu, vv = u.reshape(n, -1), v.reshape(n, -1)  # (N, Du), (N, Dv)
    shape = u.shape[1:] + v.shape[1:]
    scale = np.sqrt(np.outer((uu * uu).sum(0), (vv * vv).sum(0)))  # (Du, Dv)
    return Expected((uu.T @ vv).reshape(shape), scale.reshape(shape))


@dataclass(frozen=True, eq=False)
class ChunkedPair:
    """Activations of two models on the same tokens, cut into chunks.

    Attributes:
        x, y: (N, Dx), (N, Dy) activations in the dtype a store would hold (float32 or float64).
        bounds: 0 = b_0 <= b_1 <= ... <= b_k = N; chunk i is rows b_i to b_{i+1} (possibly empty).
    """

    x: np.ndarray
    y: np.ndarray
    bounds: tuple[int, ...]

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def chunks(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.x[a:b], self.y[a:b]) for a, b in itertools.pairwise(self.bounds)]


def _activations(rng: np.random.Generator, n: int, d: int, offset: float, loud: list[int]) -> np.ndarray:
    """(n, d) float64: spreads of 0.1 to 10, 1e3 times more on ``loud`` rows, ``offset`` on about half the columns."""
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10.0, size=d)  # (n, d)
    x[loud] *= 1e3  # the attention-sink tokens of real models
    return x + offset * (rng.random(d) < 0.5)  # the massive dimensions


@st.composite
def chunked_pairs(draw: st.DrawFn, *, max_tokens: int = 40, max_dim: int = 6) -> ChunkedPair:
    """Adversarial activation pairs (offsets, outlier rows, duplicate rows, N < D) and any split points."""
    n = draw(st.integers(1, max_tokens), label="n")
    dx, dy = draw(st.integers(1, max_dim), label="dx"), draw(st.integers(1, max_dim), label="dy")
    offset = draw(st.sampled_from([0.0, 1e3, -5e3, 1e5]), label="offset")
    dtype = draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    loud = draw(st.lists(st.integers(0, n - 1), max_size=2, unique=True), label="loud rows")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    x = _activations(rng, n, dx, offset, loud)
    y = _activations(rng, n, dy, -offset, loud) + x[:, :1]  # (n, dy): related to x through its first column
    # Duplicate rows: copies of up to half the rows, from rows that stay themselves.
    copies = draw(st.integers(0, n // 2), label="duplicates")
    x[n - copies :], y[n - copies :] = x[:copies], y[:copies]
    cuts = draw(st.lists(st.integers(0, n), max_size=6), label="cuts")  # repeats make empty chunks
    return ChunkedPair(x.astype(dtype), y.astype(dtype), (0, *sorted(cuts), n))


class AccumulatorTests(Generic[A]):
    """Base class of an accumulator's conformance tests; pytest collects the ``Test*`` subclasses.

    A subclass provides :meth:`from_chunk`, :meth:`empty` and :meth:`oracle`; it may override :meth:`value`
    (how a field is read) and ``rtol`` (rounding allowed, in units of each entry's :class:`Expected` scale).
    """

    #: Allowed error of every entry, relative to its scale (rounding alone is ~1e-15 of it).
    rtol: ClassVar[float] = 1e-9

    # --- what a subclass provides -------------------------------------------------------------------

    def from_chunk(self, x: np.ndarray, y: np.ndarray) -> A:
        """The accumulator of one chunk, x (n, Dx) and y (n, Dy), as stored (float32 or float64)."""
        raise NotImplementedError

    def empty(self, dx: int, dy: int) -> A:
        """The accumulator of no tokens."""
        raise NotImplementedError

    def oracle(self, x: np.ndarray, y: np.ndarray) -> Mapping[str, Expected]:
        """Every field computed at once on the whole float64 arrays x (N, Dx), y (N, Dy), independently of hrsa."""
        raise NotImplementedError

    def value(self, acc: A, name: str) -> Any:
        """Field ``name`` of ``acc`` (an attribute by default)."""
        return getattr(acc, name)

    # --- the properties ------------------------------------------------------------------------------

    @pytest.mark.property
    @_SETTINGS
    @given(data=chunked_pairs())
    def test_empty_is_the_identity_of_merge(self, data: ChunkedPair) -> None:
        names = list(self.expect(data))
        acc = self.from_chunk(data.x, data.y)
        empty = self.empty(data.x.shape[1], data.y.shape[1])
        self.assert_identical(acc.merge(empty), acc, names)
        self.assert_identical(empty.merge(acc), acc, names)
        self.assert_identical(empty.merge(self.empty(data.x.shape[1], data.y.shape[1])), empty, names)
        self.assert_identical(self.from_chunk(data.x[:0], data.y[:0]), empty, names)

    @pytest.mark.property
    @_SETTINGS
    @given(data=chunked_pairs(), at=st.tuples(st.floats(0, 1), st.floats(0, 1)))
    def test_merge_is_associative(self, data: ChunkedPair, at: tuple[float, float]) -> None:
        i, j = sorted(round(t * data.n) for t in at)
        a, b, c = (self.from_chunk(data.x[s], data.y[s]) for s in (slice(0, i), slice(i, j), slice(j, None)))
        self.assert_close(a.merge(b).merge(c), self.expect(data), data.n, like=a.merge(b.merge(c)))

    @pytest.mark.property
    @_SETTINGS
    @given(data=chunked_pairs(), st_data=st.data())
    def test_merge_order_does_not_matter(self, data: ChunkedPair, st_data: st.DataObject) -> None:
        parts = [self.from_chunk(x, y) for x, y in data.chunks()]
        parts = st_data.draw(st.permutations(parts), label="order")
        merged = merge_tree(
            parts,
            lambda hi: st_data.draw(st.integers(0, hi), label="merge at"),
            lambda: st_data.draw(st.booleans(), label="swap"),
        )
        self.assert_close(merged, self.expect(data), data.n)

    @pytest.mark.property
    @_SETTINGS
    @given(data=chunked_pairs())
    def test_merged_chunks_equal_the_one_shot_float64_computation(self, data: ChunkedPair) -> None:
        acc = self.empty(data.x.shape[1], data.y.shape[1])
        for x, y in data.chunks():
            acc = acc.merge(self.from_chunk(x, y))
        self.assert_close(acc, self.expect(data), data.n)

    # --- comparisons ---------------------------------------------------------------------------------

    def expect(self, data: ChunkedPair) -> Mapping[str, Expected]:
        """The oracle on the whole float64 arrays."""
        return self.oracle(data.x.astype(np.float64), data.y.astype(np.float64))

    def assert_close(self, acc: A, expected: Mapping[str, Expected], n: int, *, like: A | None = None) -> None:
        """Each field of ``acc`` within ``rtol`` of its scale from the oracle's value (or from ``like``'s)."""
        assert acc.n == n, f"n: expected {n}, got {acc.n}"
        for name, (value, scale) in expected.items():
            want = np.asarray(self.value(like, name) if like is not None else value, dtype=np.float64)
            got = np.asarray(self.value(acc, name), dtype=np.float64)
            assert got.shape == want.shape, f"{name}: expected shape {want.shape}, got {got.shape}"
            err = np.abs(got - want)
            bad = err > self.rtol * scale
            assert not bad.any(), (
                f"{name}: {int(bad.sum())} of {bad.size} entries off by more than {self.rtol:g} of their scale; "
                f"worst relative error {float(np.max(err / np.maximum(scale, 1e-300))):.3g}"
            )

    def assert_identical(self, got: A, want: A, names: Iterable[str]) -> None:
        """Fields ``names`` equal bit for bit, and ``n`` too (an identity must not even round)."""
        assert got.n == want.n, f"n: expected {want.n}, got {got.n}"
        for name in names:
            np.testing.assert_array_equal(self.value(got, name), self.value(want, name), err_msg=name)


def merge_tree(parts: list[A], draw_index: Callable[[int], int], draw_swap: Callable[[], bool]) -> A:
    """Merge adjacent accumulators in the order the draws dictate (any binary tree), swapping operands at will."""
    parts = list(parts)
    while len(parts) > 1:
        i = draw_index(len(parts) - 2)
        a, b = parts[i], parts[i + 1]
        parts[i : i + 2] = [b.merge(a) if draw_swap() else a.merge(b)]
    return parts[0]
