"""Folders that may be local or remote: a training run's output, a pipeline's ``out``.

A :class:`Location` is what the user wrote (a path, or a URL such as ``s3://bucket/runs/a``) resolved to a pyarrow
filesystem and a path on it: the pair Ray Train persists checkpoints through (``RunConfig(storage_path=...,
storage_filesystem=...)``), so hrsa reads a run exactly where Ray Train writes it, on a local disk, a shared
filesystem or an object store alike. Any URL ``pyarrow.fs.FileSystem.from_uri`` knows works (``s3://``, ``gs://``,
``hdfs://``...); S3 takes its endpoint and credentials from the usual AWS variables (``AWS_ENDPOINT_URL``...).

Writes are whole-file: a local file is written beside and renamed (:func:`hrsa.runtime.files.write_atomic`); an
object-store object appears whole when its upload completes. Neither reader ever sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hrsa.runtime.files import cache_folder, write_atomic
from hrsa.store.errors import UserError

if TYPE_CHECKING:
    import pyarrow.fs

__all__ = ["Location", "LocationError", "beside", "is_url", "parse_location", "read_text"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_COPY_ATTEMPTS = 3  # copies of a remote folder whose files keep changing under them, before giving up
# What fsspec's listings call a file's version, most telling first: S3's and Azure's ETag, GCS's generation, then the
# modification time of filesystems without a version.
_VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified", "updated")


class LocationError(UserError, ValueError):
    """A path or URL that names no folder hrsa can use."""


def is_url(text: str | Path) -> bool:
    """Whether ``text`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(text, str) and bool(_SCHEME.match(text))


@dataclass(frozen=True)
class Location:
    """A folder or file on a local or remote filesystem.

    Attributes:
        url: what users see: an absolute local path, or the URL (``s3://bucket/runs/a``).
        filesystem: the pyarrow filesystem it lives on.
        path: its path on ``filesystem`` (``bucket/runs/a`` for S3: the URL less its scheme).
    """

    url: str
    filesystem: pyarrow.fs.FileSystem = field(compare=False, repr=False)
    path: str = field(compare=False)

    @property
    def is_local(self) -> bool:
        """On this machine's filesystem (which may still be a shared one, such as NFS)."""
        import pyarrow.fs

        return isinstance(self.filesystem, pyarrow.fs.LocalFileSystem)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Location:
        return Location(posixpath.dirname(self.url), self.filesystem, posixpath.dirname(self.path))

    def child(self, *parts: str) -> Location:
        """The location ``parts`` below this one (``a/b`` or ``"a", "b"``)."""
        return Location(posixpath.join(self.url, *parts), self.filesystem, posixpath.join(self.path, *parts))

    def as_path_or_url(self) -> Path | str:
        """A Path when local, else the URL: what configs and results hold."""
        return Path(self.path) if self.is_local else self.url

    def local_path(self) -> Path:
        """The local folder or file (for readers that need one, such as a model loader).

        Raises:
            LocationError: the location is remote.
        """
        if not self.is_local:
            raise LocationError(f"Expected a local path. Got {self.url} instead. Copy it to a local folder first.")
        return Path(self.path)

    def kind(self) -> str | None:
        """``"file"``, ``"folder"``, or None when nothing is there."""
        import pyarrow.fs

        found = self.filesystem.get_file_info(self.path).type
        return {pyarrow.fs.FileType.File: "file", pyarrow.fs.FileType.Directory: "folder"}.get(found)

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write(self, data: str | bytes) -> None:
        """Write the whole file (parents created): a reader sees the old content or the new, never half."""
        payload = data.encode() if isinstance(data, str) else data
        if self.is_local:
            write_atomic(self.path, payload)
            return
        self.filesystem.create_dir(posixpath.dirname(self.path), recursive=True)
        with self.filesystem.open_output_stream(self.path) as f:  # the object appears when the upload completes
            f.write(payload)

    def delete(self) -> None:
        """Remove the file here, if any."""
        if self.kind() == "file":
            self.filesystem.delete_file(self.path)

    def files(self) -> dict[str, int]:
        """Every file below this folder (recursively), by path relative to it, with its size; {} when absent.

        One listing (one paginated request on an object store), however many files there are.
        """
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(self.path, recursive=True, allow_not_found=True)
        try:
            infos = self.filesystem.get_file_info(selector)
        except (NotADirectoryError, FileNotFoundError):  # a file here, or a folder gone while listed
            return {}
        root = self.path.rstrip("/") + "/"
        return {i.path.removeprefix(root): i.size for i in infos if i.type == pyarrow.fs.FileType.File}

    def local_folder(self, *, cache: Path | None = None) -> Path:
        """This folder on this machine: itself when local, else a copy in a local cache (``$HRSA_CACHE/remote``,
        default ``~/.cache/hrsa/remote``), downloaded once per machine and listing: the same files at the same sizes
        and versions (:meth:`versions`: a checkpoint re-written with other weights has the same sizes). Each process
        of a node that asks gets the same whole copy (it appears by one rename).

        Raises:
            LocationError: nothing is there.
        """
        if self.is_local:
            return self.local_path()
        root = cache / "remote" if cache else cache_folder("remote")
        for _ in range(_COPY_ATTEMPTS):
            listing = self.versions()
            if not listing:
                raise LocationError(f"Expected files in {self.url}. Got none there instead. Check the URL.")
            final = root / f"{hashlib.sha256(json.dumps([self.url, listing]).encode()).hexdigest()[:16]}-{self.name}"
            if final.is_dir() or _download(self, root, final, listing):
                return final
        raise LocationError(f"Expected the files of {self.url} to stay as listed while they were copied. Got them "
                            f"changed during each of {_COPY_ATTEMPTS} copies instead (a writer still writing there?). "
                            "Try again once it is done.")

    def versions(self) -> list[list[str | int]]:
        """``[name, size, version]`` of every file below this folder, sorted; [] when absent. The version is what
        changes whenever a remote file's bytes do: the object store's ETag (S3, Azure) or generation (GCS), as
        fsspec lists them. Modification times alone would not do: S3 lists them in whole seconds, and a writer that
        re-writes a checkpoint within the second leaves the same time and size. Filesystems without either (and
        local ones) give their modification time."""
        import fsspec
        import pyarrow.fs

        try:
            fs, root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError):  # no fsspec implementation of this scheme installed
            selector = pyarrow.fs.FileSelector(self.path, recursive=True, allow_not_found=True)
            infos = self.filesystem.get_file_info(selector)
            prefix = self.path.rstrip("/") + "/"
            return sorted([i.path.removeprefix(prefix), i.size, str(i.mtime_ns)] for i in infos
                          if i.type == pyarrow.fs.FileType.File)
        fs.invalidate_cache(root)  # fsspec keeps listings per filesystem instance, and instances per process
        try:
            found = fs.find(root, detail=True)
        except Exception as error:
            from hrsa.store.opening import from_storage

            if not from_storage(error):
                raise
            raise LocationError(f"Expected to list {self.url}. Got {type(error).__name__}: "
                                f"{str(error).splitlines()[0] if str(error) else ''} instead. Check the URL and the "
                                "credentials (for S3: AWS_* variables or an instance profile).") from error
        prefix = root.rstrip("/") + "/"
        return sorted([path.removeprefix(prefix), info.get("size"),
                       str(next((info[k] for k in _VERSION_FIELDS if info.get(k) is not None), ""))]
                      for path, info in found.items())

    def folders(self) -> list[Location]:
        """The folders directly in this one, sorted by name; [] when absent."""
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(self.path, recursive=False, allow_not_found=True)
        try:
            infos = self.filesystem.get_file_info(selector)
        except (NotADirectoryError, FileNotFoundError):
            return []
        names = sorted(posixpath.basename(i.path) for i in infos if i.type == pyarrow.fs.FileType.Directory)
        return [self.child(name) for name in names]


def _download(folder: Location, root: Path, final: Path, listing: list[list[str | int]]) -> bool:
    """Copy a remote folder to ``final`` through a temporary sibling and one rename, so a reader sees all of it or
    nothing (another process that finished first keeps its copy). False, with nothing kept, when its files changed
    from ``listing`` while they were copied: the copy could hold another version, or a mix, under this key."""
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        _copy_files(folder, partial)
        if folder.versions() != listing:
            return False
        os.rename(partial, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return True


def _copy_files(folder: Location, to: Path) -> None:
    import pyarrow.fs

    pyarrow.fs.copy_files(folder.path, str(to), source_filesystem=folder.filesystem,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())


def parse_location(text: str | Path) -> Location:
    """A local path (made absolute) or a URL of any filesystem pyarrow knows, as a :class:`Location`.

    Raises:
        LocationError: a URL whose scheme pyarrow does not know, or whose filesystem does not answer (an S3 bucket
            that does not exist, no credentials...).

    Example:
        >>> parse_location("/tmp/runs/a").child("step_000100").url
        '/tmp/runs/a/step_000100'
    """
    import pyarrow
    import pyarrow.fs

    if not is_url(text) or str(text).startswith("file://"):
        path = Path(str(text).removeprefix("file://")).expanduser().resolve()
        return Location(str(path), pyarrow.fs.LocalFileSystem(), str(path))
    url = str(text).rstrip("/")
    if "?" in url:  # the options would be lost on every path derived from it (a checkpoint's, a run's)
        raise LocationError(f"Expected a URL without options. Got {url} instead. Set the endpoint and credentials in "
                            "the environment (for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID...).")
    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(url)
    except (pyarrow.ArrowException, OSError, ValueError) as error:
        raise LocationError(f"Expected a local path or a URL of a filesystem that answers (s3://bucket/path, gs://..., "
                            f"hdfs://...). Got {url} ({type(error).__name__}: {error}) instead. Check the URL, the "
                            "bucket and the credentials (for S3: AWS_* variables or an instance profile).") from None
    return Location(url, filesystem, path.rstrip("/"))


def read_text(where: Path | str) -> str:
    """The text of a local file, or of the file at a URL (a pipeline's remote out: ``s3://bucket/out/...``).

    Raises:
        OSError: nothing readable there (a storage error included); UnicodeDecodeError: not text; LocationError: a
            URL whose filesystem does not answer.
    """
    return parse_location(where).read_text() if is_url(where) else Path(where).read_text()


def beside(file: Path | str, name: str) -> Path | str:
    """``name`` relative to the folder of ``file`` (a path or a URL), as ``Path(file).parent / name`` joins paths. In
    a URL, ``..`` is taken away (an object store has no parent folders to follow); an absolute path stays itself."""
    if not is_url(file) or os.path.isabs(name):
        return Path(file).parent / name
    scheme, _, rest = str(file).partition("://")
    return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), name))}"
