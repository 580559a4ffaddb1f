"""The one atomic writer of local files (results, reports, state, arrays a verb writes): whole or not at all.

At the bottom of the house so that every layer can use it (``hrsa store get`` writes its .npy here; the rest
through :func:`hrsa.runtime.files.write_atomic`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_file"]

# Reading the umask means setting it; done once, at import, rather than racing other threads on each write.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_file(path: Path | str) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s bytes into; ``path`` appears (or is replaced) only when the block ends
    without an error, so a reader, a kill or a full disk never sees half a file nor spoils an earlier one.

    The bytes go to a unique temporary file in ``path``'s folder (same filesystem, so the rename is atomic; unique,
    so two writers never share one; a short name, so any name the filesystem takes for ``path`` works). The folder
    must exist. A symlink at ``path`` is replaced, not written through: resolve it first to write its target.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> with atomic_file(p) as f:
        ...     _ = f.write(b"ok")
        >>> p.read_bytes()
        b'ok'
    """
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=".hrsa-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file is as readable as any other the user writes
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
