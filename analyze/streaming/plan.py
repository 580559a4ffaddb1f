"""Which accumulators to hold at once: tiles of layer pairs that fit a memory budget.

Every tile is one streaming pass over the selected tokens. Three kinds:

- ``matched``: hidden state k of A against hidden state k of B, full :class:`Moments` per pair
  (C_xx, C_yy, C_xy: everything dimension-wise correlation, CKA, debiased CKA and Procrustes need).
- ``cross``: a rectangle of the (L+1) x (L+1) grid of A's states against B's, one
  :class:`CrossMoments` (C_xy only) per pair. Square-ish rectangles read the fewest states per pass.
- ``self``: states against themselves (C_xx of A's, C_yy of B's), once per state, for the CKA
  denominators and the variances of dimension-wise correlation in the cross-layer matrices.

Memory model (an estimate, in bytes; ``W`` segment tasks run at once, each holding its own copy)::

    peak = W * (accumulators of the tile + blocks of its states + 3 largest accumulators of one pair)
           + what finishing a pair needs (the SVD of Procrustes: 5 D^2 float64)

where a block of a state is ``block_tokens * D * (2 * read bytes + 8 + compute bytes)`` (the block as read
and the next one being read ahead, its float64 copy, its centred copy). When even one pair does not fit with
``W`` workers, the plan falls back to one worker before it gives up.

Pure Python: the planner runs before any Dask graph exists, and the memory budget parser lives here too.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from hrsa.store.errors import UserError

__all__ = [
    "AnalysisPlan",
    "MemoryBudgetError",
    "PlanInputs",
    "StreamKey",
    "StreamPair",
    "Tile",
    "TileKind",
    "format_bytes",
    "parse_memory_budget",
    "plan_analysis",
]

#: One hidden state to stream: ("a", hidden-state index) or ("b", hidden-state index).
StreamKey = tuple[str, int]
#: Two stream keys whose accumulator a tile holds (not a pair of models: A's state i against B's state j,
#: or a state against itself in a ``self`` tile).
StreamPair = tuple[StreamKey, StreamKey]
TileKind = Literal["matched", "cross", "self"]

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class MemoryBudgetError(UserError, ValueError):
    """The memory budget cannot hold even one pair's accumulators."""


@dataclass(frozen=True)
class Tile:
    """One streaming pass: the stream pairs whose accumulators are held together."""

    kind: TileKind
    pairs: tuple[StreamPair, ...]

    @property
    def streams(self) -> tuple[StreamKey, ...]:
        """The hidden states this pass reads, each once per block."""
        return tuple(sorted({key for pair in self.pairs for key in pair}))


@dataclass(frozen=True)
class PlanInputs:
    """What the planner needs to know about the pair of models and the run.

    Attributes:
        matched: hidden states compared one to one (k of A against k of B); empty for no matched pass.
        rows, cols: A's and B's hidden states of the cross-layer matrices; empty for no cross-layer pass.
        dx, dy: hidden sizes of A and B.
        read_bytes_a, read_bytes_b: bytes per stored value (2 for bf16, 4 for float32).
        compute_bytes: bytes per value of the products (4 for float32, 8 for float64).
        n_tokens: selected tokens; block_tokens: most tokens a block holds; n_blocks: blocks per pass.
        workers: segment tasks run at once.
        memory_budget: bytes.
        groups: groups of documents a matched pair keeps one Moments for (the jackknife's); 0 for none.
    """

    matched: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    dx: int
    dy: int
    read_bytes_a: int
    read_bytes_b: int
    compute_bytes: int
    n_tokens: int
    block_tokens: int
    n_blocks: int
    workers: int
    memory_budget: int
    groups: int = 0


@dataclass(frozen=True)
class AnalysisPlan:
    """The tiles, in the order they run, with the memory estimate that chose them."""

    tiles: tuple[Tile, ...]
    inputs: PlanInputs
    workers: int
    estimated_peak: int

    @property
    def passes(self) -> int:
        """Streaming passes over the tokens (one per tile)."""
        return len(self.tiles)

    def count(self, kind: TileKind) -> int:
        return sum(t.kind == kind for t in self.tiles)

    def describe(self) -> str:
        """A few human lines: tiles per kind, passes, memory."""
        p = self.inputs
        lines = [f"plan: {self.passes} pass(es) over {p.n_tokens} tokens in blocks of {p.block_tokens}, {self.workers} worker(s)"]
        if self.count("matched"):
            lines.append(f"  matched layers: {len(p.matched)} pair(s) of D={p.dx}x{p.dy} in {self.count('matched')} tile(s)")
        if self.count("cross"):
            largest = max(len(t.pairs) for t in self.tiles if t.kind == "cross")
            lines.append(
                f"  cross-layer: {len(p.rows)} x {len(p.cols)} pairs in {self.count('cross')} tile(s) of up to {largest} pair(s); "
                f"self co-moments of {len(p.rows) + len(p.cols)} states in {self.count('self')} tile(s)"
            )
        lines.append(f"  memory: ~{format_bytes(self.estimated_peak)} estimated peak of {format_bytes(p.memory_budget)} budget")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "tiles": {kind: self.count(kind) for kind in get_args(TileKind)},
            "workers": self.workers,
            "block_tokens": self.inputs.block_tokens,
            "memory_budget": self.inputs.memory_budget,
            "estimated_peak": self.estimated_peak,
        }


def plan_analysis(inputs: PlanInputs) -> AnalysisPlan:
    """Cut the work into tiles whose estimated peak memory fits the budget.

    Raises:
        MemoryBudgetError: if one pair does not fit even with one worker.
    """
    # Each worker holds its own copy of a tile's accumulators, so parallelism over tokens costs passes
    # (and every pass re-reads the tokens), while BLAS threads inside one worker cost nothing. Take the
    # fewest passes, then the most workers among those.
    candidates = []
    for w in range(max(1, min(inputs.workers, inputs.n_blocks)), 0, -1):
        memory = _MemoryModel(inputs, w)
        if memory.fits_one_pair():
            tiles = _matched_tiles(inputs.matched, memory) + _cross_tiles(inputs.rows, inputs.cols, memory)
            tiles += _self_tiles(inputs.rows, inputs.cols, memory) if inputs.rows else ()
            peak = max((memory.peak(t) for t in tiles), default=0)
            candidates.append(AnalysisPlan(tiles=tiles, inputs=inputs, workers=w, estimated_peak=peak))
    if candidates:
        return min(candidates, key=lambda plan: (plan.passes, -plan.workers))
    need = _MemoryModel(inputs, 1).smallest_peak()
    raise MemoryBudgetError(
        f"Expected a memory budget of at least {format_bytes(need)} (one pair of hidden states of D={inputs.dx}x{inputs.dy} "
        f"in blocks of {inputs.block_tokens} tokens). Got {format_bytes(inputs.memory_budget)} instead. "
        "Raise --memory-budget, or lower --block-tokens."
    )


class _MemoryModel:
    """Byte counts of the memory model in the module docstring, for ``workers`` segment tasks."""

    def __init__(self, p: PlanInputs, workers: int) -> None:
        self.p, self.workers = p, workers
        self.dim = {"a": p.dx, "b": p.dy}
        self.read = {"a": p.read_bytes_a, "b": p.read_bytes_b}

    def item(self, kind: TileKind, pair: StreamPair) -> int:
        da, db = self.dim[pair[0][0]], self.dim[pair[1][0]]
        if kind == "matched":  # Moments: C_xx, C_yy, C_xy and O(D) vectors
            return 8 * (da * da + db * db + da * db + 6 * (da + db))
        return 8 * (da * db + da + db)

    def peak(self, tile: Tile) -> int:
        items = [self.item(tile.kind, pair) for pair in tile.pairs]
        blocks = sum(self.p.block_tokens * self.dim[s] * (2 * self.read[s] + 8 + self.p.compute_bytes) for s, _ in tile.streams)
        finish = 5 * 8 * max(self.p.dx, self.p.dy) ** 2 if tile.kind == "matched" else 0
        return self.workers * (sum(items) + blocks + 3 * max(items)) + finish

    def fits(self, tile: Tile) -> bool:
        return self.peak(tile) <= self.p.memory_budget

    def fits_one_pair(self) -> bool:
        return self.smallest_peak() <= self.p.memory_budget

    def smallest_peak(self) -> int:
        p = self.p
        probes = [Tile("matched", ((("a", k), ("b", k)),)) for k in p.matched[:1]]
        probes += [Tile("cross", ((("a", i), ("b", j)),)) for i in p.rows[:1] for j in p.cols[:1]]
        return max((self.peak(t) for t in probes), default=0)


def _matched_tiles(matched: Sequence[int], memory: _MemoryModel) -> tuple[Tile, ...]:
    return _pack([(("a", k), ("b", k)) for k in matched], "matched", memory)


def _self_tiles(rows: Sequence[int], cols: Sequence[int], memory: _MemoryModel) -> tuple[Tile, ...]:
    keys: list[StreamKey] = [("a", i) for i in rows] + [("b", j) for j in cols]
    return _pack([(k, k) for k in keys], "self", memory)


def _pack(pairs: list[StreamPair], kind: TileKind, memory: _MemoryModel) -> tuple[Tile, ...]:
    """Greedy: consecutive pairs into a tile while it fits (each pair alone fits, by the caller's check)."""
    tiles: list[Tile] = []
    current: list[StreamPair] = []
    for pair in pairs:
        if current and not memory.fits(Tile(kind, (*current, pair))):
            tiles.append(Tile(kind, tuple(current)))
            current = []
        current.append(pair)
    if current:
        tiles.append(Tile(kind, tuple(current)))
    return tuple(tiles)


def _cross_tiles(rows: Sequence[int], cols: Sequence[int], memory: _MemoryModel) -> tuple[Tile, ...]:
    """Rectangles of r x c pairs: the largest square-ish shape that fits, then the grid it tiles."""
    if not rows or not cols:
        return ()
    r, c = _rectangle(len(rows), len(cols), memory)
    tiles = []
    for i0 in range(0, len(rows), r):
        for j0 in range(0, len(cols), c):
            pairs = tuple((("a", i), ("b", j)) for i in rows[i0 : i0 + r] for j in cols[j0 : j0 + c])
            tiles.append(Tile("cross", pairs))
    return tuple(tiles)


def _rectangle(n_rows: int, n_cols: int, memory: _MemoryModel) -> tuple[int, int]:
    """(r, c) minimising the passes ceil(I/r) ceil(J/c), then the states read per pass (r + c)."""
    best = (1, 1)
    best_key = (n_rows * n_cols, 2)
    for r in range(1, n_rows + 1):
        c = _largest(n_cols, functools.partial(_fits_rectangle, memory, r))
        if c == 0:
            break  # taller rectangles fit even less
        key = (math.ceil(n_rows / r) * math.ceil(n_cols / c), r + c)
        if key < best_key:
            best, best_key = (r, c), key
    return best


def _fits_rectangle(memory: _MemoryModel, r: int, c: int) -> bool:
    return memory.fits(_rectangle_tile(r, c))


def _rectangle_tile(r: int, c: int) -> Tile:
    return Tile("cross", tuple((("a", i), ("b", j)) for i in range(r) for j in range(c)))


def _largest(limit: int, ok: Callable[[int], bool]) -> int:
    """The largest c in 1..limit with ok(c) (ok is monotone: true, then false), 0 if none."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def parse_memory_budget(value: str | int) -> int:
    """``"4GB"``, ``"512MiB"``, ``"1.5G"`` or a number of bytes -> bytes (kB/MB/GB decimal, KiB/MiB/GiB binary).

    Example:
        >>> parse_memory_budget("4GB"), parse_memory_budget("512MiB"), parse_memory_budget(1000)
        (4000000000, 536870912, 1000)
    """
    if isinstance(value, int) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?)?b?\s*", str(value).lower())
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"Expected a memory budget such as 4GB, 512MiB or 2e9. Got {value!r} instead.")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def format_bytes(n: float) -> str:
    """Bytes for people: ``format_bytes(3.2e9) == '3.2 GB'``."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"
