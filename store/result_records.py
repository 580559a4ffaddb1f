"""The store's result records (``results/<run_id>``, one per ``hrsa analyze`` run): list, create, read, delete.

:class:`ResultRecords` is a part of :class:`~hrsa.store.activation_store.ActivationStore` (it inherits it), kept
apart because records are the analysis' output, not activations; it relies on the store's ``_top`` (the
``results`` group, read without trusting it), ``_check_writable`` and ``url``.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING

from hrsa.store.errors import CorruptDataError, RunIdTakenError, UserError
from hrsa.store.format import ATTRS_KEY
from hrsa.store.ids import parse_id
from hrsa.store.objects import (create_if_absent, delete_key, delete_prefix, folders_holding, get_bytes, list_keys,
                                object_size)

if TYPE_CHECKING:
    import zarr

__all__ = ["ResultRecords"]

#: The attribute a new record's metadata holds beside the document: its writer's token (see create_results).
WRITER_KEY = "hrsa_writer"


class ResultRecords:
    """Result records of a store: each a Zarr group whose attributes hold the results document."""

    url: str

    def _top(self, name: str) -> zarr.Group:  # provided by ActivationStore
        raise NotImplementedError

    def _check_writable(self) -> None:  # provided by ActivationStore
        raise NotImplementedError

    def results_ids(self) -> list[str]:
        """Ids of the result records (``hrsa analyze`` runs) in the store, sorted; a record still being written
        (or left by a run that stopped), or whose metadata is damaged, counts too: its id is taken. Found by listing
        the folders holding a ``zarr.json`` (Zarr's listing read each one: one record's cut short made ``store ls``,
        ``store rm`` and analyses tracebacks); what a deletion cut short left (no metadata) is no record."""
        top = self._top("results")
        return folders_holding(top.store, top.store_path.path, "zarr.json")

    def damaged_results(self) -> list[str]:
        """Ids of the records whose metadata does not read as a group's (cut short, overwritten), sorted."""
        top = self._top("results")
        path = top.store_path.path
        return [run_id for run_id in self.results_ids()
                if not _reads_as_group(get_bytes(top.store, f"{path}/{run_id}/zarr.json"))]

    def results_documents(self) -> dict[str, dict | None]:
        """Each result record's document (its attributes), by id, sorted; None for a record whose document is not
        there (being written, or left by a run that stopped before it) or does not read."""
        top = self._top("results")
        documents: dict[str, dict | None] = {}
        for run_id in self.results_ids():
            try:
                doc = top[run_id].attrs.get(ATTRS_KEY)
            except Exception:  # damaged metadata: `hrsa store verify` and `store ls` name it (damaged_results)
                doc = None
            documents[run_id] = doc if isinstance(doc, dict) else None
        return documents

    def results_naming(self, mid: str) -> list[str]:
        """Ids of the complete result records whose document names model ``mid`` as A or B, sorted (a record still
        being written, or unreadable, names nothing)."""
        return [run_id for run_id, doc in self.results_documents().items()
                if doc is not None and mid in (doc.get("a"), doc.get("b"))]

    def create_results(self, run_id: str) -> zarr.Group:
        """A new, empty result record ``run_id`` for the caller to fill (arrays, then its attributes).

        Raises:
            StoreReadOnlyError: the store is open read-only.
            InvalidIdError: ``run_id`` is not a safe slug.
            UserError: the store already holds a record of that id.
        """
        import zarr

        self._check_writable()
        parse_id(run_id, kind="run id")
        top = self._top("results")
        self._clear_leftovers(top, run_id)
        # Created if absent, in one step (Zarr's create_group checks, then writes: racing writers all "created" it and
        # wrote into one group); the writer's token makes its metadata its own, so the winner is known exactly.
        path = f"{top.store_path.path}/{run_id}"
        metadata = {"zarr_format": 3, "node_type": "group", "attributes": {WRITER_KEY: uuid.uuid4().hex}}
        if not create_if_absent(top.store, f"{path}/zarr.json", json.dumps(metadata).encode()):
            raise RunIdTakenError(
                f"Expected a new run id. Got {run_id!r}, which {self.url} already holds in its results. "
                f"Choose another run id, or delete that record first (`hrsa store rm {self.url} {run_id} --results`).")
        return zarr.open_group(top.store, path=path, mode="r+")

    @staticmethod
    def _clear_leftovers(top: zarr.Group, run_id: str) -> None:
        """Delete what a deletion cut short left of record ``run_id`` (its metadata goes first: arrays without it are
        no record, and a new record of that id must not take them in). Only the objects listed here go: a record
        another writer creates meanwhile starts with its metadata, which is never among them."""
        prefix = f"{top.store_path.path}/{run_id}"
        # Not a racing writer's metadata in flight: Zarr's local store writes zarr.<uuid>.partial, then links it to
        # zarr.json; deleted as a leftover, that writer's link failed (FileNotFoundError, its record never made)
        keys = [key for key in list_keys(top.store, prefix) if not key.endswith(".partial")]
        if keys and "zarr.json" not in keys:
            for key in keys:
                delete_key(top.store, f"{prefix}/{key}")

    def results_record(self, run_id: str) -> zarr.Group:
        """The result record ``run_id``: its attributes hold the results document, its arrays the numbers.

        Raises:
            UserError: no record of that id.
        """
        run_id = self.known_results(run_id)
        try:
            record = self._top("results")[run_id]
        except Exception:  # JSONDecodeError, Zarr's own: metadata that does not read
            record = None
        if record is None or not hasattr(record, "attrs") or not hasattr(record, "groups"):
            raise CorruptDataError(
                f"Expected the result record {run_id}'s metadata in {self.url}/results/{run_id}/zarr.json. Got it "
                f"unreadable instead. Delete the record (`hrsa store rm {self.url} {run_id} --results`) and run its "
                "analysis again.")
        return record

    def delete_results(self, run_id: str) -> None:
        """Remove the result record ``run_id``; models, corpora and other records are untouched.

        Raises:
            StoreReadOnlyError: the store is open read-only.
            UserError: no record of that id.
        """
        self._check_writable()
        top = self._top("results")
        prefix = f"{top.store_path.path}/{self.known_results(run_id)}"
        delete_key(top.store, f"{prefix}/zarr.json")  # first: a deletion cut short leaves no record that reads
        delete_prefix(top.store, prefix)

    def known_results(self, run_id: str) -> str:
        """``run_id``, checked to be a record of this store (its metadata there, readable or not).

        Raises:
            UserError: no record of that id (the message names those there are).
        """
        parse_id(run_id, kind="run id")
        top = self._top("results")
        if object_size(top.store, f"{top.store_path.path}/{run_id}/zarr.json") is None:
            known = ", ".join(self.results_ids()) or "none"
            raise UserError(f"Expected a result record of this store ({known}). Got {run_id!r} instead.")
        return run_id


def _reads_as_group(metadata: bytes | None) -> bool:
    """Whether a record's ``zarr.json`` reads as a Zarr v3 group's metadata."""
    try:
        doc = json.loads(metadata or b"")
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("zarr_format") == 3 and doc.get("node_type") == "group"
