"""One training at a time per run folder: the driver holds ``OUTPUT/.hrsa_train.lock``
(:class:`hrsa.runtime.folder_lock.FolderLock`: flock on a local or shared folder, a renewed lease on S3).

Two runs of one recipe into one folder at once would both resume from the same checkpoint and write the same
step folders over each other (each save swaps its folder in whole, so the survivor is one run's, but which steps
came from which run nobody could say). The second is refused in one line, with exit code 2: at its start by
:func:`refuse_if_in_use` (before it hashes the backbone or starts Ray; it creates nothing), and for certain when it
takes the lock itself (:func:`exclusive_run`), which closes the race between two starts.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager

from hrsa.runtime.folder_lock import FolderInUseError, FolderLock
from hrsa.runtime.locations import Location

__all__ = ["LOCK_FILE", "RunInUseError", "exclusive_run", "refuse_if_in_use"]

LOCK_FILE = ".hrsa_train.lock"
RunInUseError = FolderInUseError  # another training is running into the same run folder
_TRAINING = FolderLock(LOCK_FILE, "training", "train into another --output")


def refuse_if_in_use(run: Location) -> None:
    """Raise :class:`RunInUseError` when another process holds ``run`` now; creates nothing."""
    _TRAINING.refuse_if_in_use(run)


def exclusive_run(run: Location) -> AbstractContextManager[threading.Event]:
    """Hold ``run`` for this process until the block ends (:meth:`FolderLock.exclusive`): the Event it yields is
    set if the hold is lost meanwhile (an S3 lease taken over), and the trainer stops then."""
    return _TRAINING.exclusive(run)
