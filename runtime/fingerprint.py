"""Content digests of local files and folders: what a training recipe, an eval result and a pipeline stage are
keyed by, so that the same bytes anywhere count as the same input and other bytes at the same path do not.

xxh3-128 (the hash the store already uses for shards): it reads faster than a disk delivers, so hashing a model's
weights costs one read of them. That read happens once per machine, not once per process: the digest of a file of
:data:`KEPT_FROM` bytes or more is kept in ``$HRSA_CACHE/digests`` under the file's path, device, inode, size,
modification time and change time, as git's index and make do. The change time is what makes it safe: no tool can
set it (``cp -p``, rsync and tar restore size and modification time, never the change time), and any write moves
it. File times move in clock ticks, though, so a digest taken within :data:`_TICK_NS` of the file's last change is
kept nowhere, not even for this process (git's "racily clean" entries): a rewrite in the same tick would find it.
Entries another user wrote are not believed. What this cannot see: a writer through a shared mmap, whose later
writes to a page already dirty move no file time (weights are written by write(): safetensors, torch.save).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from hrsa.runtime.files import cache_folder, write_atomic

__all__ = ["KEPT_FROM", "file_digest", "folder_digest", "folder_files", "records_digest"]

KEPT_FROM = 16 << 20  # files this large (weights, not corpora or configs) keep their digest for other processes
_TICK_NS = 2 * 10**9  # the coarsest file-time tick in use (FAT's two seconds; ext4 and NFS are far finer)
_BLOCK = 16 << 20  # bytes read at a time: large enough for full speed, small enough for any memory
_DIGEST = re.compile(r"^[0-9a-f]{32}$")
_memo: dict[tuple[str | int, ...], str] = {}


def file_digest(path: Path | str) -> str:
    """The xxh3-128 hex digest of a file's content.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = p.write_text("hello")
        >>> file_digest(p) == file_digest(p) and len(file_digest(p))
        32
    """
    path = Path(path).resolve()
    stat = path.stat()
    signature = _signature(path, stat)
    digest = _memo.get(signature) or (_kept_digest(signature) if stat.st_size >= KEPT_FROM else None)
    if digest is None:
        started = time.time_ns()
        digest = _read_digest(path)
        if max(stat.st_ctime_ns, stat.st_mtime_ns) > started - _TICK_NS or _signature(path, path.stat()) != signature:
            return digest  # changed within a tick of now, or while read: a rewrite could leave the same signature
        if stat.st_size >= KEPT_FROM:
            _keep_digest(signature, digest)
    _memo[signature] = digest
    return digest


def _signature(path: Path, stat: os.stat_result) -> tuple[str | int, ...]:
    return str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _read_digest(path: Path) -> str:
    import xxhash

    digest = xxhash.xxh3_128()
    with path.open("rb", buffering=0) as f:
        # One buffer, reused: f.read(n) allocates n bytes before it reads, 16 MiB for a 100-byte labels file
        view = memoryview(bytearray(max(1, min(_BLOCK, os.fstat(f.fileno()).st_size))))
        while n := f.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()


def _entry(signature: tuple[str | int, ...]) -> Path:
    return cache_folder("digests") / f"{hashlib.sha256(json.dumps(signature).encode()).hexdigest()[:32]}.json"


def _kept_digest(signature: tuple[str | int, ...]) -> str | None:
    """The digest kept for exactly this signature; None when there is none, the entry is broken or another
    file's, or another user wrote it (a cache in a shared folder is read as no cache)."""
    try:
        path = _entry(signature)
        if path.stat().st_uid != os.getuid():
            return None
        entry = json.loads(path.read_text())
        digest = entry["xxh3_128"]
        return digest if entry["signature"] == list(signature) and _DIGEST.match(digest) else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _keep_digest(signature: tuple[str | int, ...], digest: str) -> None:
    entry = _entry(signature)
    try:
        entry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # this user's alone
        write_atomic(entry, json.dumps({"signature": signature, "xxh3_128": digest}))
    except OSError:  # a read-only or full home: the next process reads the file again, nothing worse
        pass


def folder_files(folder: Path | str, *, recursive: bool = True, skip: Iterable[str] = ()) -> list[Path]:
    """The files of a folder, sorted; hidden names (``.git``, Ray's ``.validate_storage_marker``) and ``skip``
    names left out. ``recursive=False`` takes the top level only (a model folder's own files, not an ``eval/``
    that a tool wrote into it)."""
    folder, skipped = Path(folder), set(skip)
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and listed(p.relative_to(folder).as_posix(), recursive=recursive,
                                                             skip=skipped))


def listed(name: str, *, recursive: bool = True, skip: Iterable[str] = ()) -> bool:
    """Whether :func:`folder_files` takes the file at relative path ``name``: no hidden part, not a ``skip`` name,
    and at the top level unless ``recursive`` (also the rule for names a checkpoint's manifest recorded)."""
    parts = name.split("/")
    return (recursive or len(parts) == 1) and parts[-1] not in set(skip) and not any(p.startswith(".") for p in parts)


def folder_digest(folder: Path | str, *, recursive: bool = True, skip: Iterable[str] = ()) -> str:
    """One digest of a folder's files (those :func:`folder_files` lists): their relative names and contents, so
    the same files anywhere give the same digest."""
    folder = Path(folder)
    return listing_digest({p.relative_to(folder).as_posix(): file_digest(p)
                           for p in folder_files(folder, recursive=recursive, skip=skip)})


def listing_digest(digests: dict[str, str]) -> str:
    """:func:`folder_digest` of files known by their relative names and :func:`file_digest` values (a checkpoint's
    manifest records them), in folder_files' order."""
    listing = [[name, digests[name]] for name in sorted(digests, key=lambda n: Path(n).parts)]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:32]


def records_digest(path: Path | str) -> str | None:
    """The digest of a corpus: a file's content, or a folder's record files (its top level, the files a corpus
    reader reads); None where nothing local is there (a missing path, the hub, object storage)."""
    from hrsa.store.records import RECORD_SUFFIXES

    path = Path(path).expanduser()
    try:
        if path.is_file():
            return file_digest(path)
        if path.is_dir():
            skip = [p.name for p in path.iterdir() if p.suffix not in RECORD_SUFFIXES]
            return folder_digest(path, recursive=False, skip=skip)
    except OSError:
        return None
    return None
