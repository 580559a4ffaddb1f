"""Run one measurement in a fresh interpreter, so that its peak resident memory is that measurement's alone."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
from collections.abc import Callable
from typing import Any


def run_in_fresh_process(target: Callable[..., None], *args: Any, poll_seconds: float = 2.0) -> Any:
    """``target(*args, queue)`` in a spawned process; what it puts on the queue. A child that dies (out of memory, a
    budget that does not fit) puts nothing: raise instead of waiting for ever."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:
        try:
            out = queue.get(timeout=poll_seconds)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the measured child process died (exit code {proc.exitcode})") from None
    proc.join()
    return out
