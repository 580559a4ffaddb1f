"""This process's resident memory, as the kernel counts it: what the CLI prints beside a plan and what the
benchmarks' peak-memory figures are made of.

Linux's /proc/self/status has the resident set now (VmRSS) and its high-water mark (VmHWM), which writing "5" to
/proc/self/clear_refs resets to the resident set now. Elsewhere, ``getrusage``'s ru_maxrss (a peak that a spawned
child inherits from its parent, hence /proc first).
"""

from __future__ import annotations

import ctypes
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["allocations_mapped_from", "freed_blocks_returned", "map_large_allocations", "peak_resident_bytes",
           "release_freed_heap", "reset_peak", "resident_bytes"]

#: mallopt's parameter number for the mmap threshold (glibc's malloc.h: M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD = -3

_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in bytes; None where there is no /proc."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def resident_bytes() -> int:
    """The resident set now (its peak so far where /proc is missing)."""
    return _status_bytes("VmRSS") or _max_rss()


def peak_resident_bytes() -> int:
    """The resident set's peak since the process started or since :func:`reset_peak`."""
    return _status_bytes("VmHWM") or _max_rss()


def reset_peak() -> None:
    """Restart the peak at the resident set now (Linux >= 4.0); nothing where that is not possible.

    Memory freed before but kept by glibc for reuse goes back to the kernel first: else what runs after the reset
    reuses it without the resident set growing, and its peak reads low (a warm-up analysis that left 2.7 GB kept made
    (e)'s 1.5 GB plan look like 1.26 GB).
    """
    release_freed_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def release_freed_heap() -> None:
    """Give the kernel back the heap glibc keeps after frees (``malloc_trim``); nothing with another C library."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Have glibc map every allocation of ``threshold`` bytes or more on its own, so that freeing it gives it back to
    the kernel at once: the resident set then follows the arrays alive, which is what a memory plan counts.

    By default glibc raises its mmap threshold (up to 32 MB) as large blocks are freed, after which a pass's blocks
    come from heaps it keeps and fragments between the reading thread and the folding one: (e)'s 1.50 GB plan then
    peaked anywhere in 1.38-1.60 GB; mapped, at 1.48 GB every run, for ~5% more time in page faults (benchmark (e),
    README). Process-wide and lasting (``mallopt``); returns False, changing nothing, where the C library is not glibc
    or where the environment has set the threshold already (``MALLOC_MMAP_THRESHOLD_``, or ``mmap_threshold`` in
    ``GLIBC_TUNABLES``: a choice made on purpose).
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


@contextmanager
def allocations_mapped_from(threshold: int) -> Iterator[None]:
    """:func:`map_large_allocations` at ``threshold`` while the block runs, then at its default, 1 MB, again: the
    threshold the rest of the process (training, evaluation, the next analysis) runs at, as every analysis left it
    before it chose its own (below 1 MB, each of their tensors of that size and more would be mapped anew)."""
    changed = map_large_allocations(threshold)
    try:
        yield
    finally:
        if changed:
            map_large_allocations()


def freed_blocks_returned(n_blocks: int = 256, block_bytes: int = 2 << 20) -> int:
    """Bytes that leave the resident set when ``n_blocks`` arrays of ``block_bytes`` are freed, each followed by a
    small allocation that outlives it (what a pass's blocks and its bookkeeping do): the check that the allocator
    gives freed blocks back. A 4 MB array is allocated and freed first, which raises glibc's default mmap threshold
    past the blocks, so that by default they come from (and stay in) the heap."""
    import numpy as np

    np.ones(1 << 19)
    blocks, pins = [], []
    for _ in range(n_blocks):
        blocks.append(np.ones(block_bytes // 8))
        pins.append(np.ones(8192))
    before = resident_bytes()
    del blocks
    return before - resident_bytes()
