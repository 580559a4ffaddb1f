"""What a model is, by content: the weights a stored model was extracted from, the backbone of a training recipe,
the model whose eval scores are reused.

A local model folder counts by its own files (not what tools wrote into it, such as ``hrsa eval``'s ``eval/``
folder, nor a checkpoint's bookkeeping: ``hrsa_train.json`` holds the loss, ``trainer_state.pt`` the optimizer);
a ``.gguf`` file and a packaged model by their bytes; a hub model by its id and revision (its files are not
here to read: pin a revision for an exact record). :func:`model_digest`, which keys ``hrsa eval``'s scores, also
knows a hub model by the snapshot this machine's Hugging Face cache resolves its revision to (what a load reads).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hrsa.extract.model_spec import ModelSpec

__all__ = ["FILES_VERSION", "files_version", "hub_snapshot", "manifest_digest", "model_content", "model_digest",
           "model_files", "model_identity"]

_NOT_THE_MODEL = ("hrsa_train.json", "trainer_state.pt")
# The one rule for which files of a local folder are the model: its top level (what a load reads: config, tokenizer,
# weights), hidden names and the bookkeeping above left out. model_files lists them, model_content digests them.
_MODEL_FILES: dict[str, Any] = {"recursive": False, "skip": _NOT_THE_MODEL}
FILES_VERSION = "files_version"  # the key under which an extraction's spec carries :func:`files_version`


def model_identity(spec: ModelSpec) -> dict[str, Any]:
    """The spec's source (kind, id, revision, .gguf file, remote code; not its path) and ``content``: the digest
    of its files, None for a hub model. dtype and attention are left to the caller's settings."""
    identity = {k: v for k, v in spec.to_dict().items() if k not in ("path", "dtype", "attention")}
    return {**identity, "content": model_content(spec)}


def model_digest(model: str) -> str | None:
    """One digest of :func:`model_identity` of the model ``model`` names (a folder, .gguf, packaged:NAME, hub id),
    and for a hub model of the cached snapshot its revision resolves to (:func:`hub_snapshot`): ``org/name`` (or a
    branch) names other weights whenever the hub moves on, and keyed by its id alone the old weights' earlier
    scores were reused as the new ones'. None for a hub model with no snapshot here yet: nothing is known of it until
    it is downloaded (by the load, after which this names the snapshot it loaded).

    Raises:
        ModelSpecError: ``model`` names nothing usable.
    """
    from hrsa.extract.model_spec import parse_model_spec

    spec = parse_model_spec(model)
    identity = model_identity(spec)
    if spec.kind == "hub":
        identity["snapshot"] = hub_snapshot(spec)
        if identity["snapshot"] is None:
            return None
    return _identity_digest(identity)


def _identity_digest(identity: dict[str, Any]) -> str:
    """The digest of a model identity; a folder behind a URL as a local one (the same files wherever they are: a
    checkpoint copied to or from S3 keeps its scores)."""
    same = {**identity, "kind": "local"} if identity["kind"] == "remote" else identity
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:32]


def manifest_digest(url: str) -> str | None:
    """:func:`model_digest` of a checkpoint behind a URL, from its ``hrsa_train.json`` instead of its files: the
    digests the trainer recorded of the model's files (sizes checked against the listing), nothing downloaded. None
    when it has no manifest, or the listing disagrees with it (a copy under way: nothing known of it)."""
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.runtime.checkpoint_manifest import INFO_FILE, manifest_complete
    from hrsa.runtime.fingerprint import listed, listing_digest
    from hrsa.runtime.locations import parse_location

    location = parse_location(url)
    if manifest_complete(location) is not True:
        return None
    files = json.loads(location.child(INFO_FILE).read_bytes())["files"]
    content = listing_digest({name: entry["xxh3"] for name, entry in files.items() if listed(name, **_MODEL_FILES)})
    spec = parse_model_spec(url)
    identity = {k: v for k, v in spec.to_dict().items() if k not in ("path", "dtype", "attention")}
    return _identity_digest({**identity, "content": content})  # model_identity's, its content from the manifest


def hub_snapshot(spec: ModelSpec) -> str | None:
    """The commit this machine's Hugging Face cache resolves a hub model's revision to (``main`` without one): the
    ``snapshots/<commit>`` folder a load reads, offline or once downloaded; None when the cache holds none. Read from
    the cache alone, never the network: where the hub has moved on since, the next load downloads the new commit (and
    this names it from then on)."""
    from huggingface_hub import try_to_load_from_cache

    filename = spec.gguf_file or "config.json"  # a file every snapshot of such a model holds
    found = try_to_load_from_cache(str(spec.id), filename, revision=spec.revision)
    if not isinstance(found, str):  # None (not cached) or the marker of a file known not to exist there
        return None
    return Path(found).parents[len(Path(filename).parts) - 1].name  # <cache>/models--org--name/snapshots/<commit>/...


def model_files(folder: Path | str) -> list[Path]:
    """The files of a local model folder that are the model, sorted: its top level (config, tokenizer, weights: what
    a load reads), not what tools wrote into it (``hrsa eval``'s ``eval/``), hidden names, nor a checkpoint's
    bookkeeping (``hrsa_train.json``, ``trainer_state.pt``). :func:`model_content` digests these files, and a
    pipeline's stage keys know a model folder by them (:func:`hrsa.cluster.stage_keys.source_fingerprint`)."""
    from hrsa.runtime.fingerprint import folder_files

    return folder_files(folder, **_MODEL_FILES)


def model_content(spec: ModelSpec) -> str | None:
    """The digest of the spec's files (a folder's own files, a .gguf's or a packaged model's bytes); None for a hub
    model, whose files are not here to read. Each file is read once per process (:mod:`hrsa.runtime.fingerprint`)."""
    from hrsa.extract.packaged import packaged_model_path
    from hrsa.runtime.fingerprint import file_digest, folder_digest
    from hrsa.runtime.locations import parse_location

    if spec.kind == "hub":
        return None
    if spec.kind == "remote":  # by its files, as a local folder is (the copy this machine loads)
        path = parse_location(str(spec.path)).local_folder()
        return folder_digest(path, **_MODEL_FILES)  # the digest of model_files(path)
    path = packaged_model_path(spec.id or "") if spec.kind == "packaged" else Path(str(spec.path))
    return file_digest(path) if path.is_file() else folder_digest(path, **_MODEL_FILES)


def files_version(spec: ModelSpec) -> str | None:
    """What changes whenever the files ``spec`` loads do, cheap to ask again: a local model's content digest (its
    weights are read once per machine), a remote folder's listing of names, sizes and ETags (no download); None for
    a hub model. An extraction takes it once, and every worker checks the files it loads against it: a worker kept
    from an earlier extraction, or restarted by Ray, never computes a unit with other weights than the run began
    with."""
    if spec.kind == "hub":
        return None
    if spec.kind == "remote":
        from hrsa.runtime.locations import parse_location

        listing = parse_location(str(spec.path)).versions()
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:32]
    return model_content(spec)
