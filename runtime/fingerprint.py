"""Content digests of local files and folders: what a training recipe, an eval result and a pipeline stage are
keyed by, so that the same bytes anywhere count as the same input and other bytes at the same path do not.

xxh3-128 (the hash the store already uses for shards): it reads faster than a disk delivers, so hashing a model's
weights costs one read of them. A file is hashed once per process while its size, modification time and inode
stay the same (a pipeline asks for the same backbone's digest several times).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

__all__ = ["file_digest", "folder_digest", "folder_files"]

_BLOCK = 16 << 20  # bytes read at a time: large enough for full speed, small enough for any memory
_memo: dict[tuple[str, int, int, int], str] = {}


def file_digest(path: Path | str) -> str:
    """The xxh3-128 hex digest of a file's content.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = p.write_text("hello")
        >>> file_digest(p) == file_digest(p) and len(file_digest(p))
        32
    """
    import xxhash

    path = Path(path).resolve()
    stat = path.stat()
    memo_key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if memo_key not in _memo:
        digest = xxhash.xxh3_128()
        with path.open("rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
        _memo[memo_key] = digest.hexdigest()
    return _memo[memo_key]


def folder_files(folder: Path | str, *, recursive: bool = True, skip: Iterable[str] = ()) -> list[Path]:
    """The files of a folder, sorted; hidden names (``.git``, Ray's ``.validate_storage_marker``) and ``skip``
    names left out. ``recursive=False`` takes the top level only (a model folder's own files, not an ``eval/``
    that a tool wrote into it)."""
    folder, skipped = Path(folder), set(skip)
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.name not in skipped
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def folder_digest(folder: Path | str, *, recursive: bool = True, skip: Iterable[str] = ()) -> str:
    """One digest of a folder's files (those :func:`folder_files` lists): their relative names and contents, so
    the same files anywhere give the same digest."""
    folder = Path(folder)
    listing = [[p.relative_to(folder).as_posix(), file_digest(p)]
               for p in folder_files(folder, recursive=recursive, skip=skip)]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:32]
