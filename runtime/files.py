"""Files on this machine: atomic writes of small files (results, reports, state, scores) and ``$HRSA_CACHE``."""

from __future__ import annotations

import os
from pathlib import Path

from hrsa.store.local_files import atomic_file, check_output_file

__all__ = ["cache_folder", "write_atomic"]


def write_atomic(path: Path | str, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader (or a crash) never sees half a file
    (:func:`hrsa.store.local_files.atomic_file`). Parent folders are created, once ``path`` passed
    :func:`~hrsa.store.local_files.check_output_file` (no FIFO, device node or folder there, not inside an hrsa
    store): a refused path creates nothing.

    Example:
        >>> import tempfile, pathlib
        >>> p = write_atomic(pathlib.Path(tempfile.mkdtemp()) / "a" / "x.json", '{"ok": true}\\n')
        >>> p.read_text()
        '{"ok": true}\\n'
    """
    path = Path(path)
    check_output_file(path, flag=None, writable=False)  # hrsa's caches write through here too: an OSError may be quiet
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as file:
        file.write(data.encode() if isinstance(data, str) else data)
    return path


def cache_folder(name: str) -> Path:
    """``$HRSA_CACHE/name`` (default ``~/.cache/hrsa/name``): what this machine keeps between processes (copies of
    remote models, digests of weights). Not created here."""
    return Path(os.environ.get("HRSA_CACHE", "~/.cache/hrsa")).expanduser() / name
