"""The one atomic file writer: every small file hrsa rewrites (results, reports, state, scores) goes through it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["cache_folder", "write_atomic"]

# Reading the umask means setting it; done once, at import, rather than racing other threads on each write.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomic(path: Path | str, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader (or a crash) never sees half a file.

    The bytes go to a unique temporary file in the same folder (same filesystem, so the rename is atomic;
    unique, so two writers never share one), then replace ``path``. Parent folders are created.

    Example:
        >>> import tempfile, pathlib
        >>> p = write_atomic(pathlib.Path(tempfile.mkdtemp()) / "a" / "x.json", '{"ok": true}\\n')
        >>> p.read_text()
        '{"ok": true}\\n'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a results file is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cache_folder(name: str) -> Path:
    """``$HRSA_CACHE/name`` (default ``~/.cache/hrsa/name``): what this machine keeps between processes (copies of
    remote models, digests of weights). Not created here."""
    return Path(os.environ.get("HRSA_CACHE", "~/.cache/hrsa")).expanduser() / name
