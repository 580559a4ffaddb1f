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
from collections.abc import Iterable, Sequence
from pathlib import Path

from hrsa.runtime.files import cache_folder, write_atomic

__all__ = ["KEPT_FROM", "file_digest", "folder_digest", "folder_files", "records_digest", "records_fingerprint"]

KEPT_FROM = 16 << 20  # files this large (weights, not corpora or configs) keep their digest for other processes
_TICK_NS = 2 * 10**9  # the coarsest file-time tick in use (FAT's two seconds; ext4 and NFS are far finer)
_BLOCK = 16 << 20  # bytes read at a time: large enough for full speed, small enough for any memory
_DIGEST = re.compile(r"^[0-9a-f]{32}$")
_memo: dict[tuple[str | int, ...], str] = {}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_records_memo: dict[str, str] = {}


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
    digest = _memo.get(signature) or (_kept_entry("digests", json.dumps(signature), "xxh3_128", _DIGEST)
                                       if stat.st_size >= KEPT_FROM else None)
    if digest is None:
        started = time.time_ns()
        digest = _read_digest(path)
        if max(stat.st_ctime_ns, stat.st_mtime_ns) > started - _TICK_NS or _signature(path, path.stat()) != signature:
            return digest  # changed within a tick of now, or while read: a rewrite could leave the same signature
        if stat.st_size >= KEPT_FROM:
            _keep_entry("digests", json.dumps(signature), "xxh3_128", digest)
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


def records_fingerprint(source: str, *, fields: Sequence[str], id_field: str | None = None,
                        max_docs: int | None = None) -> str | None:
    """The sha256 of what extraction reads of a local corpus: each record's id and the values of ``fields`` (those
    its text is made of), in order, up to ``max_docs``. A label edited or a column added leaves it as it was; a text
    or an id edited changes it (a line prepended shifts every ``FILE:LINE`` id). None where :func:`records_digest`
    is None (nothing local there, the hub).

    Parsing every record costs ~23 s a GB of JSON lines (4.1 s for 176 MB, against 0.08 s for the file's digest),
    and a pipeline keys each of its extractions by this, many a run on one corpus: the value is kept in
    ``$HRSA_CACHE/records`` under the corpus's content digest, its name and these arguments, once the content is the same
    after the parse as before it (a file rewritten meanwhile keeps nothing).

    Raises:
        CorpusError: a record that cannot be read (as :func:`hrsa.store.records.read_records`).
    """
    from hrsa.store import records

    before = records_digest(source) if not source.startswith("hf:") else None
    if before is None:
        return None
    # The name too: records without an id are named FILE:LINE, so the same bytes under another name are other ids
    key = json.dumps(["records-v1", before, Path(source).expanduser().name, list(fields), id_field, max_docs])
    found = _records_memo.get(key) or _kept_entry("records", key, "sha256", _SHA256)
    if found is None:
        digest = hashlib.sha256()
        for record in records.read_records(source, id_field=id_field, max_docs=max_docs):
            row = [record["_id"], [record.get(name) for name in fields]]
            digest.update(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode() + b"\n")
        found = digest.hexdigest()
        if records_digest(source) != before:
            return found  # rewritten while parsed: a value of neither content for sure
        _keep_entry("records", key, "sha256", found)
    _records_memo[key] = found
    return found


def _entry_path(kind: str, key: str) -> Path:
    return cache_folder(kind) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _kept_entry(kind: str, key: str, field: str, valid: re.Pattern[str]) -> str | None:
    """The value kept for exactly ``key``; None when there is none, the entry is broken or another key's, or
    another user wrote it (a cache in a shared folder is read as no cache)."""
    try:
        path = _entry_path(kind, key)
        if path.stat().st_uid != os.getuid():
            return None
        entry = json.loads(path.read_text())
        value = entry[field]
        return value if entry["key"] == key and isinstance(value, str) and valid.match(value) else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _keep_entry(kind: str, key: str, field: str, value: str) -> None:
    path = _entry_path(kind, key)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # this user's alone
        write_atomic(path, json.dumps({"key": key, field: value}))
    except OSError:  # a read-only or full home: the next process reads or parses again, nothing worse
        pass
