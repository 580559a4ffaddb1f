"""Run one measurement in a fresh interpreter, so that its peak resident memory is that measurement's alone."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
import time
from collections.abc import Callable
from typing import Any


def run_in_fresh_process(target: Callable[..., None], *args: Any, poll_seconds: float = 2.0,
                         limit_seconds: float | None = None) -> Any:
    """``target(*args, queue)`` in a spawned process; what it puts on the queue. A child that dies (out of memory, a
    budget that does not fit) puts nothing: raise instead of waiting for ever. A child still running after
    ``limit_seconds`` is killed and TimeoutError raised (a lent machine's minutes are few: the other figures go on)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    deadline = None if limit_seconds is None else time.monotonic() + limit_seconds
    while True:
        try:
            out = queue.get(timeout=poll_seconds)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the measured child process died (exit code {proc.exitcode})") from None
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                proc.join()
                raise TimeoutError(f"stopped after {limit_seconds:.0f} s") from None
    proc.join()
    return out
