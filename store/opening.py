"""Opening a store: the root group at a local path or fsspec URL, created on demand, its format checked.

:meth:`ActivationStore.open <hrsa.store.activation_store.ActivationStore.open>` calls :func:`open_root`; a new
store gets its format attribute and its three top groups here, and nowhere else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hrsa.store.errors import StoreFormatError, StoreNotFoundError, StoreReadOnlyError, UserError
from hrsa.store.format import ATTRS_KEY, FORMAT_VERSION

if TYPE_CHECKING:
    import zarr

__all__ = ["GROUPS", "StoreUnreachableError", "format_in", "from_storage", "local_store_holding", "open_root",
           "stored_format", "unwritable_folder"]

GROUPS = ("corpora", "models", "results")


class StoreUnreachableError(UserError, ConnectionError):
    """A store URL whose storage could not be reached or read: no such bucket, no credentials, no endpoint, no
    filesystem package for its scheme."""


def open_root(url: str, mode: str, storage_options: Mapping[str, Any] | None, *, upgrading: bool = False) -> zarr.Group:
    """The store's root group (see ``ActivationStore.open`` for the modes and errors); ``upgrading`` opens an older
    format too (for :func:`hrsa.store.upgrade.upgrade_store` only).

    Raises:
        StoreUnreachableError: a URL whose storage answers with an error (one line naming it), not a traceback
            from deep inside its client.
    """
    if not _is_url(url):
        return _open_root(url, mode, storage_options, upgrading)
    try:
        return _open_root(url, mode, storage_options, upgrading)
    except UserError:
        raise
    except Exception as error:
        if not from_storage(error):
            raise
        cause = str(error).splitlines()[0] if str(error) else ""
        raise StoreUnreachableError(
            f"Expected a store URL whose storage answers. Got {type(error).__name__}: {cause} at {url} instead. Check "
            "the URL (s3://BUCKET/PATH), the credentials and endpoint (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL...), and "
            "that the filesystem package for its scheme is installed (s3fs, gcsfs...)."
        ) from error


def from_storage(error: BaseException) -> bool:
    """An error of the storage or its client (OSError, a missing fsspec backend, botocore's own), not of hrsa."""
    clients = ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "fsspec", "aiohttp")
    return isinstance(error, (OSError, ImportError)) or type(error).__module__.split(".")[0] in clients


def _open_root(url: str, mode: str, storage_options: Mapping[str, Any] | None, upgrading: bool) -> zarr.Group:
    if mode not in ("r", "r+", "a", "w-"):
        raise UserError(f"Expected mode 'r', 'r+', 'a' or 'w-'. Got {mode!r} instead.")
    # Never list from a cache: other processes create and delete claims and done records, and a stale listing
    # would take a deleted record for a done unit (s3fs caches listings per filesystem instance by default).
    options = {"use_listings_cache": False, **(storage_options or {})} if _is_url(url) else None
    if url.startswith("s3://"):
        # s3fs asks for an object's size (a HEAD) before each whole read, to fetch objects over its block size (50 MB)
        # in concurrent ranges: metadata, records and shards at the default shard size are smaller, so that HEAD doubled the
        # round trips of every read. One stream a read; a user's own setting wins.
        options = {"max_concurrency": 1, **(options or {})}
    if not _is_url(url) and Path(url).expanduser().is_file():
        raise StoreFormatError(f"Expected a folder for the store at {url}. Got a file there instead. Point at an hrsa "
                               "store, or at a new path.")
    if not _is_url(url) and mode != "r":
        _check_writable_store(url)
    root = _open_existing(url, mode, options)
    if root is None:
        if mode in ("a", "w-") and (not _exists_nonempty(url, options) or _holds_only_a_new_skeleton(url, options)):
            _create_root(url, options)
        root = _open_existing(url, mode, options)  # also what another process created meanwhile
        if root is None and _exists_nonempty(url, options):
            inner = f"{url.rstrip('/')}/store"  # a pipeline's or the demo's out holds its store there
            hint = (f" ({inner} is one: the store of a pipeline or demo out)"
                    if not _is_url(url) and (Path(inner).expanduser() / "zarr.json").is_file() else "")
            raise StoreFormatError(
                f"Expected {'an hrsa store' if mode in ('r', 'r+') else 'an empty location or an hrsa store'} "
                f"at {url}. Got other files there instead. Point at an hrsa store{hint}, or choose a new path."
            )
        if root is None:
            raise StoreNotFoundError(
                f"Expected an hrsa store at {url}. Got nothing there instead. "
                "Check the path, or create one by extracting into it (`hrsa extract --store ...`)."
            ) from None
    elif mode == "w-":
        raise StoreFormatError(f"Expected nothing at {url}. Got a Zarr group there instead. Open it with mode 'a'.")
    _check_format(root, url, upgrading)
    return root


def _open_existing(url: str, mode: str, options: Mapping[str, Any] | None) -> zarr.Group | None:
    import zarr

    try:
        # A local store by its absolute path: zarr's LocalStore lists keys with str.replace of "<root>/" anywhere in
        # a key, so a relative root ("s", "models") mangled every key holding that text (0 units done, no claims seen).
        where = url if _is_url(url) else os.path.abspath(url.removeprefix("file://"))
        return zarr.open_group(where, mode="r" if mode == "r" else "r+", storage_options=options)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        return None
    except (ValueError, TypeError) as error:  # a zarr.json that is not Zarr metadata (torn or edited)
        raise StoreFormatError(
            f"Expected Zarr metadata (JSON) in {url}/zarr.json. Got unreadable metadata instead ({type(error).__name__}: "
            f"{error}). Point at an hrsa store, or restore that file."
        ) from None


def stored_format(root: zarr.Group) -> int | None:
    return format_in(root.attrs)


def format_in(attributes: Mapping[str, Any]) -> int | None:
    """The store format version a root group's attributes hold (the mark of an hrsa store's root), or None."""
    meta = attributes.get(ATTRS_KEY)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    return version if isinstance(version, int) else None


_ROOT_METADATA_LIMIT = 1 << 20  # a store's root zarr.json is a few dozen bytes; a larger one is not read


def local_store_holding(path: str | os.PathLike[str]) -> Path | None:
    """The root folder of the local hrsa store that holds ``path`` (``path`` itself or one of its folders, symlinks
    resolved), or None: a folder whose ``zarr.json`` is Zarr group metadata marked with a store format version
    (:func:`format_in`, as :func:`open_root` recognises a store). Only regular files named ``zarr.json`` are read.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (root / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"hrsa": {"format_version": 3}}}')
        >>> local_store_holding(root / "models" / "m" / "zarr.json") == root.resolve(), local_store_holding(root.parent)
        (True, None)
    """
    import json
    import stat

    here = Path(os.path.realpath(os.path.expanduser(os.fspath(path))))
    for folder in (here, *here.parents):
        meta = folder / "zarr.json"
        try:
            found = meta.stat()
            if not stat.S_ISREG(found.st_mode) or found.st_size > _ROOT_METADATA_LIMIT:
                continue
            doc = json.loads(meta.read_bytes())
        except (OSError, ValueError):
            continue
        attributes = doc.get("attributes") if isinstance(doc, dict) else None
        if isinstance(attributes, dict) and format_in(attributes) is not None:
            return folder
    return None


def _check_format(root: zarr.Group, url: str, upgrading: bool) -> None:
    version = stored_format(root)
    if version is None:
        raise StoreFormatError(
            f"Expected an hrsa store at {url}. Got a Zarr group without hrsa attributes instead. "
            "Point --store at an hrsa store, or at a new path."
        )
    if version > FORMAT_VERSION:
        raise StoreFormatError(
            f"Expected store format version {FORMAT_VERSION} or older. Got version {version} at {url} instead. "
            "Upgrade hrsa (`pip install -U hrsa`) to read it."
        )
    if version < FORMAT_VERSION and not upgrading:
        raise StoreFormatError(
            f"Expected store format version {FORMAT_VERSION}. Got version {version} at {url} instead. Run "
            f"`hrsa store upgrade {url}` once (it checks every done unit and writes its record; nothing is re-extracted)."
        )


_GROUP = b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'


def _check_writable_store(url: str) -> None:
    """Refuse to open a local store for writing where it cannot be written (a read-only filesystem, no permission):
    an analysis computed its results, then failed writing its record in a traceback; an extraction failed creating
    the folder."""
    existing = unwritable_folder(os.path.abspath(os.path.expanduser(url.removeprefix("file://"))))
    if existing is not None:
        raise StoreReadOnlyError(
            f"Expected a store hrsa can write at {url}. Got {existing}, which cannot be written (a read-only filesystem, "
            "or no write permission), instead. Choose a writable location (or a writable copy of the store); `hrsa analyze "
            "--no-store-results` reads a store without writing to it.")


def unwritable_folder(path: str) -> str | None:
    """The nearest of ``path`` (absolute) and its parents that exists, where it is a folder this process cannot write
    in (a read-only filesystem answers so for root too); None where it can, or where that is not a folder."""
    existing = next((p for p in (path, *map(str, Path(path).parents)) if os.path.exists(p)), None)
    if existing is not None and os.path.isdir(existing) and not os.access(existing, os.W_OK | os.X_OK):
        return existing
    return None


def _raw_store(url: str, options: Mapping[str, Any] | None) -> Any:
    from zarr.storage import FsspecStore, LocalStore

    if _is_url(url):
        return FsspecStore.from_url(url, storage_options=dict(options or {}))
    path = os.path.abspath(url.removeprefix("file://"))  # absolute: see _open_existing
    os.makedirs(path, exist_ok=True)
    return LocalStore(path)


def _create_root(url: str, options: Mapping[str, Any] | None) -> None:
    """A new store: its three groups, then the root's metadata with the format version, one create-if-absent object.

    Any number of processes may create one store at once (four ``hrsa extract`` into a new path): the groups are
    the same bytes whoever writes them, and the root appears whole, attributes included, exactly once.
    """
    import json

    from hrsa.store.objects import create_if_absent, put_bytes

    store = _raw_store(url, options)
    for name in GROUPS:
        put_bytes(store, f"{name}/zarr.json", _GROUP)
    root = {"zarr_format": 3, "node_type": "group", "attributes": {ATTRS_KEY: {"format_version": FORMAT_VERSION}}}
    create_if_absent(store, "zarr.json", json.dumps(root).encode())


def _holds_only_a_new_skeleton(url: str, options: Mapping[str, Any] | None) -> bool:
    """Whether the location holds just the groups that :func:`_create_root` writes first (another process creating it)."""
    from hrsa.store.objects import list_keys

    store = _raw_store(url, options)
    return all(_IN_SKELETON.fullmatch(key) for key in list_keys(store, ""))


# The keys `_create_root` writes, and the temporary file Zarr's local store writes each through
# (`zarr.<uuid hex>.partial` beside the key, linked into place): a racing creator's in-flight writes.
_IN_SKELETON = re.compile(rf"(({'|'.join(GROUPS)})/)?zarr\.(json|[0-9a-f]{{32}}\.partial)")


def _is_url(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _exists_nonempty(url: str, storage_options: Mapping[str, Any] | None) -> bool:
    if not _is_url(url):
        path = url.removeprefix("file://")
        return os.path.isfile(path) or (os.path.isdir(path) and bool(os.listdir(path)))
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return bool(fs.exists(path) and (fs.isfile(path) or fs.ls(path)))
