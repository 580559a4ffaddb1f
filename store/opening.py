"""Opening a store: the root group at a local path or fsspec URL, created on demand, its format checked.

:meth:`ActivationStore.open <hrsa.store.activation_store.ActivationStore.open>` calls :func:`open_root`; a new
store gets its format attribute and its three top groups here, and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hrsa.store.errors import StoreFormatError, StoreNotFoundError, UserError
from hrsa.store.format import ATTRS_KEY, FORMAT_VERSION

if TYPE_CHECKING:
    import zarr

__all__ = ["GROUPS", "open_root"]

GROUPS = ("corpora", "models", "results")


def open_root(url: str, mode: str, storage_options: Mapping[str, Any] | None) -> zarr.Group:
    """The store's root group (see ``ActivationStore.open`` for the modes and errors)."""
    import zarr

    if mode not in ("r", "r+", "a", "w-"):
        raise UserError(f"Expected mode 'r', 'r+', 'a' or 'w-'. Got {mode!r} instead.")
    options = dict(storage_options) if storage_options and _is_url(url) else None
    try:
        root = zarr.open_group(url, mode="r" if mode == "r" else "r+", storage_options=options)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        root = None
    except (ValueError, TypeError) as error:  # a zarr.json that is not Zarr metadata (torn or edited)
        raise StoreFormatError(
            f"Expected Zarr metadata (JSON) in {url}/zarr.json. Got unreadable metadata instead ({type(error).__name__}: "
            f"{error}). Point at an hrsa store, or restore that file."
        ) from None
    if root is None:
        if _exists_nonempty(url, options):
            raise StoreFormatError(
                f"Expected {'an hrsa store' if mode in ('r', 'r+') else 'an empty location or an hrsa store'} "
                f"at {url}. Got other files there instead. Point at an hrsa store, or choose a new path."
            )
        if mode in ("r", "r+"):
            raise StoreNotFoundError(
                f"Expected an hrsa store at {url}. Got nothing there instead. "
                "Check the path, or create one by extracting into it (`hrsa extract --store ...`)."
            ) from None
        root = zarr.open_group(url, mode="w-", storage_options=options)
        root.attrs[ATTRS_KEY] = {"format_version": FORMAT_VERSION}
        for name in GROUPS:
            root.create_group(name)
    elif mode == "w-":
        raise StoreFormatError(f"Expected nothing at {url}. Got a Zarr group there instead. Open it with mode 'a'.")
    _check_format(root, url)
    return root


def _check_format(root: zarr.Group, url: str) -> None:
    meta = root.attrs.get(ATTRS_KEY)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int):
        raise StoreFormatError(
            f"Expected an hrsa store at {url}. Got a Zarr group without hrsa attributes instead. "
            "Point --store at an hrsa store, or at a new path."
        )
    if version > FORMAT_VERSION:
        raise StoreFormatError(
            f"Expected store format version {FORMAT_VERSION} or older. Got version {version} at {url} instead. "
            "Upgrade hrsa (`pip install -U hrsa`) to read it."
        )


def _is_url(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _exists_nonempty(url: str, storage_options: Mapping[str, Any] | None) -> bool:
    if not _is_url(url):
        path = url.removeprefix("file://")
        return os.path.isfile(path) or (os.path.isdir(path) and bool(os.listdir(path)))
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return bool(fs.exists(path) and (fs.isfile(path) or fs.ls(path)))
