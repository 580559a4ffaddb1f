"""One training at a time per run folder: the driver holds an exclusive lock on ``OUTPUT/.hrsa_train.lock``.

Two runs of one recipe into one folder at once would both resume from the same checkpoint and write the same
step folders over each other (each save swaps its folder in whole, so the survivor is one run's, but which steps
came from which run nobody could say). The second is refused at its start, in one line, with exit code 2.

The lock is ``flock`` on a file in the run folder: the kernel drops it when the holder exits, however it ends
(a SIGKILLed driver leaves no stale lock to clear by hand), and Linux's NFS client maps it onto NFS byte-range
locks, so drivers on different nodes of a shared filesystem exclude each other too. A run on object storage
(``s3://...``) has no such lock to take and is not guarded: run one training per folder there.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from hrsa.runtime.locations import Location
from hrsa.store.errors import UserError

__all__ = ["LOCK_FILE", "RunInUseError", "exclusive_run"]

LOCK_FILE = ".hrsa_train.lock"


class RunInUseError(UserError, RuntimeError):
    """Another training is running into the same run folder."""


@contextmanager
def exclusive_run(run: Location) -> Iterator[None]:
    """Hold ``run`` (a local or shared folder, created if absent) for this process until the block ends.

    Raises:
        RunInUseError: another process holds it (the message names its pid and host).
    """
    if not run.is_local:
        yield
        return
    folder = run.local_path()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise RunInUseError(f"Expected no other training running into {run.url}. Got one ({holder}) instead. "
                                "Wait for it to end, or train into another --output.") from None
        lock.truncate(0)  # who holds it, for the message above; the lock itself is the kernel's
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        yield
