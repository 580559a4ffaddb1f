"""The peak a measurement reads starts from the memory in use: heap glibc kept after frees goes back first."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from hrsa.runtime.resident import peak_resident_bytes, reset_peak, resident_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmRSS, VmHWM and glibc's malloc_trim are Linux's")
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
