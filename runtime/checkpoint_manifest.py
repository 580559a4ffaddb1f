"""A checkpoint folder's manifest: ``hrsa_train.json`` lists every other file of the folder with its size and digest,
and a folder is complete when every file it lists is there with its listed size (and, on a local or shared
filesystem, its listed digest).

``hrsa train`` writes it (:mod:`hrsa.train.checkpoints` finds a run's checkpoints by it). It lives here, below
extract and train, because ``hrsa extract`` asks it too: a checkpoint its manifest calls incomplete (a copy under
way, weights overwritten in place) is refused there as training, the pipeline and ``hrsa eval`` refuse it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hrsa.runtime.locations import Location, parse_location
from hrsa.store.errors import UserError

__all__ = ["INFO_FILE", "STATE_FILE", "complete_by_manifest", "file_manifest", "is_model_folder",
           "manifest_complete", "refuse_incomplete_checkpoint"]

INFO_FILE = "hrsa_train.json"  # step, loss, settings, recipe, and the manifest of the folder's other files
STATE_FILE = "trainer_state.pt"  # optimizer, schedule and step, for resuming
_WEIGHTS = re.compile(r"[^/]*\.safetensors|pytorch_model[^/]*\.bin")  # what a checkpoint written before manifests holds


def file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file of a local checkpoint folder but ``hrsa_train.json``: its size and content digest, by name."""
    from hrsa.runtime.fingerprint import file_digest, folder_files

    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "xxh3": file_digest(p)}
            for p in folder_files(folder, skip=(INFO_FILE,))}


def manifest_complete(folder: Location | Path | str, *, by_content: bool = False) -> bool | None:
    """Whether a checkpoint folder is complete by its ``hrsa_train.json`` (the rule of :func:`hrsa.train.checkpoints.list_checkpoints`); None
    for a folder without one (a plain model folder: nothing to judge it by). ``hrsa eval`` asks this of every folder
    it would load, so a checkpoint still being copied, or with weights cut short, is never scored.

    Args:
        folder: the checkpoint folder: a path, a URL or a :class:`Location`.
        by_content: for a folder behind a URL that its listing calls complete, judge by digest too the copy this
            machine loads (:meth:`~hrsa.runtime.locations.Location.local_folder`, downloaded here): the listing shows
            sizes alone, and weights overwritten at the same size pass them. For callers that load it here anyway.
    """
    location = folder if isinstance(folder, Location) else parse_location(folder)
    present = location.files()
    if INFO_FILE not in present:
        return None
    complete = complete_by_manifest(location, present, lambda name: name != STATE_FILE)
    if complete and by_content and not location.is_local:  # incomplete by its sizes: nothing worth downloading
        return manifest_complete(location.local_folder())
    return complete


def complete_by_manifest(folder: Location, present: dict[str, int], checked: Callable[[str], bool]) -> bool:
    """Whether a folder holds every file its ``hrsa_train.json`` lists, at its listed size (a partial copy is short or
    missing) and, on a local or shared filesystem, the ``checked`` ones with their listed digests: weights overwritten
    in place at the same size passed on sizes alone, training resumed from them and a pipeline extracted them as the
    step's. A damaged latest checkpoint is then one not written: training recomputes it from the one before. The
    digests are memoised by file signature (:func:`hrsa.runtime.fingerprint.file_digest`: once per process, and on
    disk per machine for files of 16 MB or more), so each file is read once; on object storage, where a digest would
    mean downloading the weights, sizes alone decide.

    Args:
        folder: the checkpoint folder.
        present: its files (relative names) with their sizes, as listed.
        checked: which of them to check by digest.
    """
    try:
        info = json.loads(folder.child(INFO_FILE).read_text())
    except (OSError, ValueError):  # half copied, or gone since the listing
        return False
    if not isinstance(info, dict):  # not a manifest at all (damaged or edited): nothing says the folder is whole
        return False
    files = info.get("files")
    if files is None:  # written before manifests
        return "config.json" in present and any(_WEIGHTS.fullmatch(name) for name in present)
    if not isinstance(files, dict) or not all(isinstance(entry, dict) and type(entry.get("size")) is int
                                              for entry in files.values()):
        return False  # a manifest that does not read as one (edited, damaged): not complete by it, never a traceback
    if not all(present.get(name) == entry["size"] for name, entry in files.items()):
        return False
    return not folder.is_local or all(_same_content(folder.local_path() / name, entry)
                                      for name, entry in files.items() if checked(name))


def _same_content(path: Path, entry: dict[str, Any]) -> bool:
    from hrsa.runtime.fingerprint import file_digest

    try:
        return "xxh3" not in entry or file_digest(path) == entry["xxh3"]
    except OSError:  # gone since the listing
        return False


def is_model_folder(folder: Location) -> bool:
    """Whether a folder is a model's own (a Hugging Face model folder, or a checkpoint by its manifest): its top-level
    files are the model (:func:`hrsa.extract.identity.model_files`), so a tool's output written there (a training
    run, eval.json) would be trained or digested as part of it."""
    return any(folder.child(name).kind() == "file" for name in ("config.json", INFO_FILE))


def refuse_incomplete_checkpoint(spec: Any, *, by_content: bool = False) -> None:
    """Refuse a model spec (``hrsa extract --model``, ``hrsa train --backbone``, ``hrsa eval --model``) naming a
    training checkpoint that its ``hrsa_train.json`` calls incomplete, as training (which never resumes from it), the
    pipeline and ``hrsa eval`` judge it: extracted, trained from or scored, it stood for the step while holding other
    weights.

    Args:
        spec: the model's :class:`~hrsa.extract.model_spec.ModelSpec`.
        by_content: for a folder behind a URL, judge by digest too the copy this machine loads
            (:meth:`~hrsa.runtime.locations.Location.local_folder`, downloaded here): its listing shows sizes alone,
            and weights overwritten at the same size pass them. For callers that load it here anyway (``hrsa eval``).

    Raises:
        UserError: the folder is a checkpoint whose manifest it does not match.
    """
    if spec.kind not in ("local", "remote"):
        return
    if manifest_complete(str(spec.path), by_content=by_content) is not False:
        return
    raise UserError(f"Expected a complete checkpoint at {spec.path}. Got a folder its {INFO_FILE} calls incomplete (a "
                    "file it lists is missing, short or changed: a copy or save still under way, cut short, or edited) "
                    "instead. Wait for the copy to finish, or train again into its run to write it anew (to use "
                    f"edited weights as a model of their own, copy the folder without its {INFO_FILE}).")

