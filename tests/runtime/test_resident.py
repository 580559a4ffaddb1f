"""The peak a measurement reads starts from the memory in use: heap glibc kept after frees goes back first."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from hrsa.runtime.resident import peak_resident_bytes, reset_peak, resident_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmRSS, VmHWM and glibc's malloc_trim are Linux's")
@pytest.mark.skipif("MALLOC_MMAP_THRESHOLD_" in os.environ, reason="the environment maps 64 kB blocks on their own")
def test_heap_kept_after_frees_goes_back_before_the_peak_restarts() -> None:
    # 64 kB arrays come from the heap (below glibc's mmap threshold); keeping every 16th pins the heap's top, so glibc
    # keeps the pages of the other 15 for reuse instead of giving them back on free.
    arrays = [np.ones(8192) for _ in range(16 * 1024)]  # 64 kB each, 1 GiB
    kept = arrays[::16]
    del arrays  # 15 of every 16 freed: ~0.94 GiB the heap keeps
    before = resident_bytes()
    reset_peak()
    after = resident_bytes()
    assert before - after > 512 * 2**20  # most of it went back to the kernel
    assert peak_resident_bytes() <= after + 16 * 2**20  # and the peak restarts at what is in use now
    del kept


_FRAGMENT = """
import sys
from hrsa.runtime.resident import freed_blocks_returned, map_large_allocations

if sys.argv[1] == "mapped":
    assert map_large_allocations()
print(freed_blocks_returned())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt's mmap threshold is glibc's")
@pytest.mark.parametrize(("mode", "returned"), [("default", False), ("mapped", True)])
def test_large_blocks_go_back_to_the_kernel_when_freed_once_mapped_on_their_own(mode: str, returned: bool) -> None:
    """What the memory plan counts is the arrays alive: once large allocations are mapped on their own, 512 MB of
    freed 2 MB blocks leave the resident set at once, which glibc's default keeps (its threshold had risen)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    done = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True, timeout=120,
                          check=True, env=env)
    freed = int(done.stdout.strip())
    assert (freed > 480 * 2**20) is returned, freed / 2**20


_WITHIN = """
from hrsa.runtime.resident import allocations_mapped_from, freed_blocks_returned, map_large_allocations

assert map_large_allocations()  # as an earlier analysis left the process: 1 MB
with allocations_mapped_from(256 << 10):
    inside = freed_blocks_returned(n_blocks=1024, block_bytes=512 << 10)
after = freed_blocks_returned(n_blocks=1024, block_bytes=512 << 10)
print(inside, after)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt's mmap threshold is glibc's")
def test_an_analysis_maps_its_blocks_from_its_own_threshold_and_leaves_1_mb_after() -> None:
    """An analysis of small blocks (AnalysisPlan.mmap_threshold) maps 512 kB blocks on their own while it runs; after,
    the process is back at 1 MB, where a training's or an evaluation's 512 kB tensors come from the heap again (mapped,
    each would be faulted in anew)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    done = subprocess.run([sys.executable, "-c", _WITHIN], capture_output=True, text=True, timeout=120, check=True,
                          env=env)
    inside, after = (int(x) for x in done.stdout.split())
    assert inside > 480 * 2**20 and after < 64 * 2**20, (inside / 2**20, after / 2**20)
