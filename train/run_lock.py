"""One training at a time per run folder: the driver holds an exclusive lock on ``OUTPUT/.hrsa_train.lock``.

Two runs of one recipe into one folder at once would both resume from the same checkpoint and write the same
step folders over each other (each save swaps its folder in whole, so the survivor is one run's, but which steps
came from which run nobody could say). The second is refused in one line, with exit code 2: at its start by
:func:`refuse_if_in_use` (before it hashes the backbone or starts Ray; it creates nothing), and for certain when it
takes the lock itself (:func:`exclusive_run`), which closes the race between two starts.

The lock is ``flock`` on a file in the run folder: the kernel drops it when the holder exits, however it ends
(a SIGKILLed driver leaves no stale lock to clear by hand). Linux's NFS client maps it onto NFS locks where the
mount has locking on (not ``nolock`` nor ``local_lock=flock``), so drivers on different nodes exclude each other
there; a driver whose whole node died holds an NFS lock until the server's lease expires (NFSv4: ~90 s). A
filesystem that refuses flock (Lustre without ``-o flock``) and runs on object storage (``s3://...``) are not
guarded: run one training per folder there.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from hrsa.runtime.locations import Location
from hrsa.store.errors import UserError

__all__ = ["LOCK_FILE", "RunInUseError", "exclusive_run", "refuse_if_in_use"]

LOCK_FILE = ".hrsa_train.lock"
_UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}  # a filesystem without flock

log = logging.getLogger(__name__)


class RunInUseError(UserError, RuntimeError):
    """Another training is running into the same run folder."""


def refuse_if_in_use(run: Location) -> None:
    """Raise :class:`RunInUseError` when another process holds ``run`` now; creates nothing (a folder or lock file
    that is not there is not held)."""
    if not run.is_local:
        return
    try:
        lock = open(run.local_path() / LOCK_FILE, "r+")  # for writing: NFS grants an exclusive lock to writers only
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    with lock:
        _take(lock, run, warn=False)


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
    try:
        lock = open(folder / LOCK_FILE, "a+")
    except PermissionError:  # another user's lock file in a shared folder: that user's run is not ours to judge
        log.warning("cannot open %s: this training is not guarded against another into the same folder",
                    folder / LOCK_FILE)
        yield
        return
    with lock:
        if _take(lock, run):
            lock.truncate(0)  # who holds it, for the message of a refused run; the lock itself is the kernel's
            lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
            lock.flush()
        yield


def _take(lock: IO[str], run: Location, *, warn: bool = True) -> bool:
    """flock ``lock`` exclusively without waiting: True once held, False where the filesystem has no flock (warned).

    Raises:
        RunInUseError: another process holds it.
    """
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        raise RunInUseError(f"Expected no other training running into {run.url}. Got one ({holder}) instead. Wait "
                            f"for it to end, or train into another --output (if its host is gone for good, delete "
                            f"{run.local_path() / LOCK_FILE}).") from None
    except OSError as error:
        if error.errno not in _UNSUPPORTED:
            raise
        if warn:
            log.warning("the filesystem of %s has no flock (%s): this training is not guarded against another into "
                        "the same folder", run.url, error.strerror)
        return False
