"""The memory-bound steps of a fold (centring a block's states into the stacked block, widening a run's float32 sum
into the float64 total) on every core the fold's GEMMs run on.

Between two GEMMs those cores wait for the fold's one Python thread: benchmark (e)'s 1.1 GB plan spent 10.8 s of
105 s centring blocks and 4.4 s widening sums on one of its two cores while its GEMMs ran at the machine's measured
rate. numpy lets go of the GIL in these loops, so threads split them. The thread count is the fold's BLAS thread count
(:func:`~hrsa.analyze.accumulators.gemm.blas_threads`: its share of the cores, as the scheduler limited it), so a
pass's segments never run more threads than cores.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache

from hrsa.analyze.accumulators.gemm import blas_threads

__all__ = ["spread"]


def spread(work: Callable[[int], None], count: int) -> None:
    """Run ``work(0)`` ... ``work(count - 1)``, independent steps, on the fold's cores: the calling thread and up to
    ``blas_threads() - 1`` more, each taking every t-th step. Returns once every step has ended; the first error
    raised, after the others ended (they may write into the same arrays)."""
    threads = max(1, min(count, blas_threads()))
    if threads == 1:
        for i in range(count):
            work(i)
        return

    def share(first: int) -> None:
        for i in range(first, count, threads):
            work(i)

    futures: list[Future[None]] = []
    try:  # a failed submit (interpreter shutdown) also waits for the shares already handed out
        futures += [_pool().submit(share, t) for t in range(1, threads)]
        share(0)
    finally:
        errors = [f.exception() for f in futures]  # waits for each
    for error in errors:
        if error is not None:
            raise error


@cache
def _pool() -> ThreadPoolExecutor:
    """One pool for the process: threads are kept between blocks (a block's steps take milliseconds). Never more busy
    than spread asks (its BLAS threads, at most the cores, less the caller); idle threads cost nothing."""
    import os

    return ThreadPoolExecutor(max_workers=max(4, os.cpu_count() or 1), thread_name_prefix="hrsa-spread")
