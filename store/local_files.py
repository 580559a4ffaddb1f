"""The one atomic writer of local files (results, reports, state, arrays a verb writes): whole or not at all.

At the bottom of the house so that every layer can use it (``hrsa store get`` writes its .npy here; the rest
through :func:`hrsa.runtime.files.write_atomic`). :func:`check_output_file` is the one check of a file a user names
for a verb to write (``--out``): run by the verbs before any work (and by :func:`atomic_file` before each write),
it refuses what the write would damage: a path that is not a regular file (a FIFO, a device node, a folder), or
a path inside an hrsa store (its metadata, records and shards). An existing regular file is replaced.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from hrsa.store.errors import UserError

__all__ = ["OutputPathError", "atomic_file", "check_output_file", "check_outside_stores", "check_writable"]

# Reading the umask means setting it; done once, at import, rather than racing other threads on each write.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class OutputPathError(UserError, ValueError):
    """An output file path whose writing would damage something: not a regular file, or inside an hrsa store.

    A ``ValueError`` too, so a settings validator that calls :func:`check_output_file` reports it with the other
    problems."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_output_file(path: Path | str, *, flag: str | None = "--out", writable: bool = True) -> None:
    """Refuse ``path`` as a file to write (:func:`atomic_file` replaces whatever stands there) when something other
    than a regular file stands there (followed through symlinks: a FIFO, a device node, a folder, a socket), or
    when it lies inside a local hrsa store (:func:`hrsa.store.opening.local_store_holding`, symlinks resolved).
    Nothing at ``path``, or a regular file, passes (the file is replaced whole). ``flag`` names the setting in the
    message (None: "the output path"). ``writable``: its folder must be writable too (:func:`check_writable`: for a
    path the user named; not for hrsa's own caches, whose writes may fail quietly).

    Raises:
        OutputPathError: one line naming the path, what stands there or the store, and the fix.

    Example:
        >>> import tempfile, pathlib
        >>> check_output_file(pathlib.Path(tempfile.mkdtemp()) / "new.npy")  # nothing there: fine
    """
    name = flag or "the output path"
    text = os.fspath(path)
    try:
        mode = os.stat(text).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (or a dangling symlink, which is replaced)
        mode = None
    except OSError:  # unreadable: the write itself says why
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputPathError(f"Expected {name} to be a regular file or a new path. Got {text}, {_kind(mode)}, "
                              f"instead; writing would replace it. Choose another {flag or 'path'}.")
    check_outside_stores(path, flag=flag)
    if writable:
        check_writable(os.path.dirname(os.path.abspath(os.path.expanduser(text))), flag=flag, named=text)


def check_writable(folder: Path | str, *, flag: str | None = "--out", named: str | None = None) -> None:
    """Refuse ``folder`` (to write in, created with its missing parents) when the nearest of it and its parents that
    exists cannot be written: a read-only filesystem, or no write permission. Found before the work, not when the
    job's results are ready (an analysis computed, then failed on its folder in a traceback). ``named``: the path
    the user gave, for the message (default ``folder``).

    Raises:
        OutputPathError: one line naming the path, the folder that cannot be written and the fix.
    """
    from hrsa.store.opening import unwritable_folder

    text = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    existing = unwritable_folder(text)
    if existing is not None:
        raise OutputPathError(f"Expected {flag or 'the output path'} where hrsa can write. Got {named or text}, whose "
                              f"folder {existing} cannot be written (a read-only filesystem, or no write permission), "
                              f"instead. Choose {'another ' + flag if flag else 'another path'}.")


def check_outside_stores(path: Path | str, *, flag: str | None = "--out") -> None:
    """Refuse ``path`` (a file or folder to write) when it lies inside a local hrsa store, or is one's root
    (:func:`hrsa.store.opening.local_store_holding`, symlinks resolved, ``path`` itself or a missing tail).

    Raises:
        OutputPathError: one line naming the path, the store and the fix.
    """
    from hrsa.store.opening import local_store_holding

    name = flag or "the output path"
    text = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(text)))
    for where in (text, os.path.join(os.path.realpath(folder), os.path.basename(text))):
        root = local_store_holding(where)
        if root is not None:
            raise OutputPathError(f"Expected {name} outside any hrsa store. Got {text}, inside the hrsa store {root}, "
                                  f"instead; writing there would overwrite or litter the store's data. Choose "
                                  f"{'another ' + flag if flag else 'another path'}, apart from the store.")


@contextmanager
def atomic_file(path: Path | str) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s bytes into; ``path`` appears (or is replaced) only when the block ends
    without an error, so a reader, a kill or a full disk never sees half a file nor spoils an earlier one.

    The bytes go to a unique temporary file in ``path``'s folder (same filesystem, so the rename is atomic; unique,
    so two writers never share one; a short name, so any name the filesystem takes for ``path`` works). The folder
    must exist. A symlink at ``path`` is replaced, not written through: resolve it first to write its target.
    ``path`` is checked first (:func:`check_output_file`): a FIFO, a device node or a path inside an hrsa store is
    refused, not replaced; an existing regular file is replaced.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> with atomic_file(p) as f:
        ...     _ = f.write(b"ok")
        >>> p.read_bytes()
        b'ok'
    """
    check_output_file(path, flag=None, writable=False)  # the write itself says why it cannot (an OSError)
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=".hrsa-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file is as readable as any other the user writes
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
