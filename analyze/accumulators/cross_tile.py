"""Cross co-moments of a whole rectangle of hidden states (r of A against c of B), accumulated in place.

A cross-layer tile holds ``C_ij = Xc_i^T Yc_j`` for every i of its r rows and j of its c columns. Kept as r x c
separate :class:`~hrsa.analyze.accumulators.cross_moments.CrossMoments`, every block costs r c small GEMMs, and
each pair's Chan merge allocates a fresh (Dx, Dy) sum and sweeps it twice. Here the tile is one matrix

    C = [C_ij]  (r Dx, c Dy), Fortran order (column block j, B's state j, is one contiguous matrix),

and a block of n tokens is centred once into A's states side by side, U (n, r Dx), and B's, V (n, c Dy), whose
products go straight into their blocks of C: a GEMM per pair of states, each the same call whatever the tile (one GEMM
of the whole tile was as fast, but OpenBLAS's float32 sums depend on the shape of the product: see
:func:`~hrsa.analyze.accumulators.gemm.multiply_into`). The GEMMs of successive blocks go into one running sum
S = sum_b U_b^T V_b (BLAS ``beta = 1``): into C itself for
float64 products, into a float32 sum for float32 products, folded into C every :data:`FLOAT32_SUM_TOKENS` tokens
(a float32 sum over no more tokens than one GEMM of the former default blocks). No O(D^2) sweep per block: Chan's
corrections for a run of blocks (each block centred on its own mean; float32 products on that mean rounded to
float32, see :func:`stack_centred`) are added when the run is folded in, all at once, as one low-rank GEMM::

    C += S + sum_b n_b [(m_b - m_run)(m_b - m_run)^T - o_b o_b^T] + (n n_run / (n + n_run)) (m_run - m)(m_run - m)^T

with ``m_b`` a block's float64 means, ``o_b`` their float32 rounding (zero for float64 products), ``m_run`` the run's
pooled mean and ``m`` the total's. This is Chan's pairwise formula with the between-block terms of a run collected,
so the numerics are those of :class:`CrossMoments` (float64 means and corrections, float64 totals).

numpy and BLAS (the GEMMs: :mod:`.gemm`; the low-rank corrections: scipy's): no Dask, Zarr or Ray here.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from hrsa.analyze.accumulators._chan import add_outer
from hrsa.analyze.accumulators.centring import NON_FINITE_MESSAGE, check_float32_range
from hrsa.analyze.accumulators.cross_moments import CoMomentSummary, CrossMoments
from hrsa.analyze.accumulators.gemm import multiply_into
from hrsa.analyze.accumulators.spread import spread
from scipy.linalg import blas

if TYPE_CHECKING:
    from numpy.typing import NDArray

    F64 = NDArray[np.float64]

__all__ = ["FLOAT32_SUM_TOKENS", "BlockMeans", "blocks_per_run", "CrossTileMoments", "PendingBlocks", "device_free_bytes", "multiply_into", "stack_centred"]

#: Tokens whose float32 products are summed in float32 before the sum is folded into the float64 total.
FLOAT32_SUM_TOKENS = 8192


def blocks_per_run(block_tokens: int) -> int:
    """Blocks of the ``block_tokens`` grid in one run: a run is blocks ``k r`` to ``(k + 1) r - 1`` of the grid, the
    same runs whatever the segments (cut between runs: :func:`~hrsa.analyze.streaming.stream.split_segments`), so
    float32 sums, and the results, do not depend on the number of workers."""
    return max(1, FLOAT32_SUM_TOKENS // max(1, block_tokens))


@dataclass(frozen=True)
class BlockMeans:
    """What folding one block's product into the total needs besides the product: its tokens, its float64 means of
    the stacked states, and the mean of the rows it multiplied (None where they were centred exactly)."""

    n: int
    mean_x: F64
    mean_y: F64
    offset_x: F64 | None = None
    offset_y: F64 | None = None


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

    def fold_blocks(self, blocks: Sequence[BlockMeans], products: Any = None, into: Any = None) -> None:
        """Fold in a run of blocks whose summed products ``sum_b U_b^T V_b`` are ``products`` (added here), or are
        already in :attr:`c` (``None``: float64 GEMMs write there), with Chan's corrections as one low-rank GEMM.

        ``into``: a float64 torch tensor shaped like :attr:`c` on the products' device, to add the run's terms to there
        instead of to :attr:`c` (every term is additive, so ``c + into`` is the total; :class:`PendingBlocks` moves it
        over once at the end of a segment, or reduces it there to summaries at the end of a whole pass). The means are
        pooled here either way."""
        blocks = [b for b in blocks if b.n]
        target = self.c if into is None else into
        if products is not None:
            _widen_into(target, products)
        if not blocks:
            return
        n_run = sum(b.n for b in blocks)
        first = blocks[0]  # the run's mean as a correction of its first block's: exact for offsets of 1e5
        run_x = first.mean_x + sum(b.n * (b.mean_x - first.mean_x) for b in blocks[1:]) / n_run
        run_y = first.mean_y + sum(b.n * (b.mean_y - first.mean_y) for b in blocks[1:]) / n_run
        terms = [(float(b.n), b.mean_x - run_x, b.mean_y - run_y) for b in blocks if len(blocks) > 1]
        terms += [(-float(b.n), b.offset_x, b.offset_y) for b in blocks if b.offset_x is not None and b.offset_y is not None]
        weight, delta_x, delta_y = self.n * n_run / (self.n + n_run), run_x - self.mean_x, run_y - self.mean_y
        if weight:
            terms.append((weight, delta_x, delta_y))
        _add_low_rank(target, terms)
        self._pool_means(n_run, delta_x, delta_y)

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


@dataclass(eq=False)
class PendingBlocks:
    """A tile's blocks multiplied but not yet folded into its float64 total (see the module docstring).

    Attributes:
        total: the float64 co-moments the runs fold into.
        products: the run's summed products, a float32 numpy array, a torch tensor on its device, or None (float64 on
            the CPU: the GEMMs sum into ``total.c`` itself; float64 on a device after the first run: into
            ``device_sum`` itself).
        device_sum: on a device, the float64 sum the runs fold into (see :meth:`flush`), or None.
        blocks: the run's blocks, in order.
        max_tokens: a run is folded in once it holds this many tokens; None: when the caller flushes.
    """

    total: CrossTileMoments
    max_tokens: int | None = FLOAT32_SUM_TOKENS
    products: Any = None
    blocks: list[BlockMeans] = field(default_factory=list)
    scratch: dict[str, np.ndarray] = field(default_factory=dict)
    device_sum: Any = None
    host_touched: bool = False  # whether total.c holds anything (while not, a crossing copies into it)
    host_sums: bool = True  # whether a run may cross to total.c: False where the plan counted no host memory for it

    def __post_init__(self) -> None:
        self.host_touched = self.host_touched or self.total.n > 0  # a total with tokens holds them: add to it

    def stack_buffer(self, side: str, n: int, width: int, dtype: np.dtype) -> np.ndarray:
        """A (>= n, width) C-ordered ``dtype`` array to stack a block's centred states into, the same one block after
        block: a fresh 20-70 MB array per block cost page faults and the kernel's zeroing of every page (a 16-state
        stack of 1,024 tokens: 28-50 ms fresh, 13-17 ms into a kept array, measured). The stacked block is dead once
        its product is added, so the next block may overwrite it."""
        held = self.scratch.get(side)
        if held is None or held.shape[0] < n or held.shape[1] != width or held.dtype != dtype:
            held = self.scratch[side] = np.empty((n, width), dtype=dtype)
        return held

    @property
    def beta(self) -> float:
        """1 to add to the run's product sum, 0 for a run's first block (BLAS overwrites a used buffer then)."""
        return 1.0 if self.blocks else 0.0

    def add(self, block: BlockMeans) -> None:
        """Record a block whose product the caller has just added; fold the run in once it is long enough."""
        self.blocks.append(block)
        if self.max_tokens is not None and sum(b.n for b in self.blocks) >= self.max_tokens:
            self.flush()

    def multiply(self, u: np.ndarray, v: np.ndarray, block: BlockMeans) -> None:
        """Add a block's product ``u^T v`` (numpy, centred, C order): float64 straight into the total, float32 into the
        run's float32 sum; then record the block."""
        pair = (self.total.dx, self.total.dy)  # a GEMM per pair of states: sums that do not depend on the tile
        if u.dtype == np.float64:
            multiply_into(self.total.c, u, v, block=pair)
        else:
            self.products = multiply_into(self.products, u, v, self.beta, block=pair)
        self.add(block)

    def flush(self) -> None:
        """Fold the run in: into the total, or a device's run into the float64 sum it keeps on the device."""
        if not self.blocks:
            return
        if self.products is None and self.device_sum is not None:  # float64 products added to the device's sum
            self.total.fold_blocks(self.blocks, into=self.device_sum)
        elif self.products is None or isinstance(self.products, np.ndarray):
            self.total.fold_blocks(self.blocks, self.products)
            self.host_touched = True
        elif self.device_sum is None and self.products.element_size() == 8:
            # float64 products on a device: the run's sum becomes the device's sum (no second matrix of the tile's
            # size: 17 GB at 29 x 29 states of D = 1536), and the next runs' products are added to it directly.
            self.device_sum, self.products = self.products, None
            self.total.fold_blocks(self.blocks, into=self.device_sum)
        else:  # a device's float32 products (torch)
            if self.device_sum is None:
                self.device_sum = _device_sum(self.products, max(b.n for b in self.blocks))
            if self.device_sum is not None:
                self.total.fold_blocks(self.blocks, self.products, into=self.device_sum)
            elif not self.host_sums:  # the plan kept the sums on the device: the host has no budget for them
                raise DeviceRoomLost(self.products.numel() * 8, device_free_bytes(self.products.device))
            else:  # no room for it on the device: this run's sum crosses over now
                self._add_to_host(self.products)
                self.total.fold_blocks(self.blocks)  # its corrections, on the host
            self.products = None  # let go: the next run's first product is a new tensor (kept, two would be held)
        self.blocks = []

    def finish(self) -> CrossTileMoments:
        """Fold the last run in and bring a device's float64 sum over to the host's total; returns the total."""
        self.flush()
        if self.device_sum is not None:
            self._sum_to_host()
        return self.total

    def device_summaries(self) -> dict[tuple[Hashable, Hashable], CoMomentSummary] | None:
        """At the end of a pass of one segment (no merge follows): the last run folded, and each pair's
        :class:`CoMomentSummary` (what cross-layer CKA and dimension-wise correlation read: |C|_F^2 and the diagonal)
        reduced from the device's float64 sum on the device, so the (r Dx, c Dy) total never crosses nor is written on
        the host. None where there is no device sum, or the host's total holds part of the sums (a run crossed when
        the device had no room): then :meth:`finish` and the host's summaries."""
        self.flush()
        if self.device_sum is None or self.host_touched:
            return None
        import torch  # only here: a numpy pass asks too, and must not load torch (2.5 s, ~190 MB)
        total, out = self.total, {}
        c, k = len(total.keys_y), min(total.dx, total.dy)
        for i, kx in enumerate(total.keys_x):  # a row state at a time: (Dx, c, Dy), no temporary of its size
            rows = self.device_sum[i * total.dx : (i + 1) * total.dx].view(total.dx, c, total.dy)
            squares = (torch.linalg.vector_norm(rows, dim=(0, 2)) ** 2).cpu().numpy()  # (c,)
            diagonals = torch.diagonal(rows[:k, :, :k], dim1=0, dim2=2).cpu().numpy()  # (c, k)
            for j, ky in enumerate(total.keys_y):
                out[(kx, ky)] = CoMomentSummary(total.n, total.mean_x[i * total.dx : (i + 1) * total.dx].copy(),
                                                total.mean_y[j * total.dy : (j + 1) * total.dy].copy(),
                                                float(squares[j]), diagonals[j].copy())
        self.device_sum = None
        return out

    def _sum_to_host(self) -> None:
        self._add_to_host(self.device_sum)
        self.device_sum = None

    def _add_to_host(self, matrix: Any) -> None:
        """``total.c += matrix`` (a torch tensor, C-ordered): a column state at a time, so the host holds no copy of it
        all. Each panel crosses as its transpose, which is the total's Fortran-ordered panel: straight into the total's
        memory while nothing else is in it (the one crossing of a pass), else into one kept buffer and added from there.
        (A C-ordered copy added into the Fortran-ordered panel ran at a third of the speed, each panel in fresh pages:
        2.1 GB in 4.6 s against 1.5 s copied in place, on CPU tensors.)"""
        import torch

        width = self.total.dy
        buffer = None
        for j in range(len(self.total.keys_y)):
            cols = slice(j * width, (j + 1) * width)
            panel = torch.from_numpy(self.total.c[:, cols].T)  # (Dy, r Dx), C-contiguous: the total's own memory
            if not self.host_touched:
                panel.copy_(matrix[:, cols].T)
                continue
            if buffer is None:
                buffer = torch.empty(panel.shape, dtype=panel.dtype)
            buffer.copy_(matrix[:, cols].T)
            panel.add_(buffer)
        self.host_touched = True


def stack_centred(blocks: Sequence[np.ndarray], compute_dtype: np.dtype,
                  scratch: np.ndarray | None = None) -> tuple[np.ndarray, F64, F64 | None]:
    """The blocks (n, D_i) side by side in ``compute_dtype``, each centred on its own mean: ``(stacked, means, offsets)``,
    stacked (n, sum D_i), the float64 means (sum D_i,), and the mean of the stacked rows (None when it is zero).
    ``stacked`` is the first n rows of ``scratch`` when given (C order, ``compute_dtype``, as wide as the blocks).

    Each block is centred by one subtraction into its slot, with no float64 copy of the block. For float64 products,
    on its float64 mean (exact: float32 activations are exact in float64). For float32 products, on that mean rounded
    to float32: where a dimension's offset dwarfs its spread (1e4 against 1), a value minus a nearby float32 is exact
    (Sterbenz), so the rows keep every significant bit of the spread, as casting float64-centred rows would; the
    rounding of the mean, ``offsets`` (<= 6e-8 of the mean), is taken out of the product exactly, in float64
    (:meth:`CrossTileMoments.fold_blocks`).

    Raises:
        ValueError: a block holds NaN or inf.
    """
    n, widths = blocks[0].shape[0], [b.shape[1] for b in blocks]
    if scratch is None:
        scratch = np.empty((n, sum(widths)), dtype=compute_dtype)  # C order: its transpose is what BLAS reads as-is
    stacked = scratch[:n]  # the first rows of a C-ordered array: contiguous
    starts = np.concatenate([[0], np.cumsum(widths)]).tolist()
    means: list[Any] = [None] * len(blocks)
    shifts: list[Any] = [None] * len(blocks)

    def centre(i: int) -> None:  # state i into its slot (the states are independent: spread over the fold's cores)
        block, width, slot = blocks[i], widths[i], stacked[:, starts[i] : starts[i + 1]]
        x = block
        if block.dtype not in (np.float32, np.float64):  # bf16, fp16: widened into the slot (exact), centred there
            np.copyto(slot, block, casting="unsafe")  # no float32 copy of the block: a new one faulted its pages in
            x = slot
        mean = x.mean(axis=0, dtype=np.float64) if n else np.zeros(width)  # (D_i,), summed in float64
        if not np.isfinite(mean).all():  # a NaN or inf anywhere reaches the mean
            raise ValueError(NON_FINITE_MESSAGE)
        shift = mean.astype(compute_dtype)
        np.subtract(x, shift, out=slot, casting="unsafe")
        if slot.dtype == np.float32:
            check_float32_range(slot, block)
        means[i], shifts[i] = mean, shift

    spread(centre, len(blocks))
    mean_all = np.concatenate(means)
    offsets = mean_all - np.concatenate(shifts).astype(np.float64)
    return stacked, mean_all, (offsets if offsets.any() else None)


#: Device memory a float64 device sum leaves free at least, beside the next run's product (see device_sum_headroom).
DEVICE_HEADROOM = 1 << 30
#: One admission at a time: a process's segments (Dask threads) each see the others' device sums once allocated.
_ADMISSION = threading.Lock()


def device_sum_headroom(rows: int, width: int, item: int) -> int:
    """Device memory a pass needs beside a float64 sum once the run is folded: the next run's product (the run's own
    is let go: :meth:`PendingBlocks.flush`), and a block's stacked states with room for their float64 centring (twice
    the stacks: ``rows`` tokens of ``width`` values, the product's rows and columns, ``item`` bytes each), at least
    :data:`DEVICE_HEADROOM`. The plan counts the same (``_MemoryModel.device_peak``): one rule."""
    return max(DEVICE_HEADROOM, 2 * rows * width * item)


class DeviceRoomLost(MemoryError):
    """A device refused the float64 sum of a pass whose plan kept it there (so counted none of it on the host): its
    free memory fell after the plan. ``needed``: the sum's bytes; ``free``: what the device has free now."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(needed, free)
        self.needed, self.free = needed, free


def _device_sum(products: Any, rows: int) -> Any:
    """A float64 zero matrix shaped like ``products`` (a torch tensor, the run's product, still held) on its device,
    where it fits with :func:`device_sum_headroom` beside it for blocks of ``rows`` tokens; None where it does not. Free
    counts what torch's allocator holds unused (it is the driver's "used", and torch reuses it).

    Why on the device: a run folded on the host sent the whole tile over PCIe and swept it in host memory every
    :data:`FLOAT32_SUM_TOKENS` tokens (an H200 ran a 29 x 29 tile of D = 1536 at 74x its products' roofline)."""
    import torch

    with _ADMISSION:
        headroom = device_sum_headroom(rows, products.shape[0] + products.shape[1], products.element_size())
        if products.device.type == "cuda" and device_free_bytes(products.device) < products.numel() * 8 + headroom:
            return None
        return torch.zeros(products.shape, dtype=torch.float64, device=products.device)


def device_free_bytes(device: Any) -> int:
    """Bytes a CUDA device has free for this process: the driver's free memory and what torch's allocator holds
    unused (the driver counts it as used; torch reuses it)."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _widen_into(total: Any, products: Any) -> None:
    """``total += products``, a float32 sum widened element by element (no float64 copy of it), in column panels spread
    over the fold's cores (both Fortran-ordered: a panel of columns is contiguous in each); torch tensors on their
    device, in one add."""
    if not isinstance(total, np.ndarray):
        total.add_(products)
        return
    columns = total.shape[1]
    panels = max(1, min(columns, 8))
    cuts = [columns * p // panels for p in range(panels + 1)]

    def add(p: int) -> None:
        panel = slice(cuts[p], cuts[p + 1])
        np.add(total[:, panel], products[:, panel], out=total[:, panel])

    spread(add, panels)


def _add_low_rank(matrix: F64, terms: Sequence[tuple[float, F64, F64]]) -> None:
    """``matrix += sum of weight outer(x, y)`` in place (Fortran order): BLAS ger for one term, a GEMM of rank k for
    k terms (one sweep of the matrix either way)."""
    if not terms:
        return
    if not isinstance(matrix, np.ndarray):  # a torch tensor: one rank-k GEMM on its device
        import torch

        left, right = (torch.from_numpy(np.stack(side, axis=1)).to(matrix.device)
                       for side in ([w * x for w, x, _ in terms], [y for _, _, y in terms]))
        matrix.addmm_(left, right.T)
        return
    if len(terms) == 1:
        add_outer(matrix, *terms[0])
        return
    if not matrix.flags.writeable:  # f2py's overwrite_c would write through it (see add_outer)
        raise ValueError("Expected a writable matrix. Got a read-only one instead: merge into a copy.")
    left = np.stack([w * x for w, x, _ in terms], axis=1)  # (Du, k)
    right = np.stack([y for _, _, y in terms], axis=1)  # (Dv, k)
    out = blas.dgemm(1.0, left, right, beta=1.0, c=matrix, trans_b=True, overwrite_c=True)
    if not np.shares_memory(out, matrix):
        matrix[...] = out
