"""Which model to run: a :class:`ModelSpec`, parsed once from what the user typed.

Accepted forms of the text (see :func:`parse_model_spec`):

- a local Hugging Face model folder (holding ``config.json``): ``./checkpoints/step-1000``
- a ``.gguf`` file: ``/models/SmolLM2-135M-Instruct.Q4_1.gguf``
- a model shipped in a pip package: ``packaged:smollm2-135m-instruct`` (see :mod:`hrsa.extract.packaged`)
- a hub id, optionally pinned to a revision: ``Qwen/Qwen3-0.6B@c1899de``
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from hrsa.extract.packaged import packaged_model
from hrsa.runtime.locations import is_url, parse_location
from hrsa.store.errors import UserError

__all__ = ["ModelSpec", "ModelSpecError", "SourceKind", "DTypeName", "AttentionMode", "parse_model_spec"]

SourceKind = Literal["hub", "local", "gguf", "packaged", "remote"]
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
# "auto" is the architecture's own attention: causal for decoders, bidirectional for encoders.
AttentionMode = Literal["auto", "causal", "bidirectional"]

PACKAGED_PREFIX = "packaged:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")


class ModelSpecError(UserError, ValueError):
    """A model the user named that cannot be resolved, or options that do not fit it."""


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ModelSpecError(f"Expected {name} in {list(choices)}. Got {value!r} instead.")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's weights come from and how to run it.

    Attributes:
        kind: "hub", "local" (a model folder), "gguf" (a .gguf file), "packaged" (a pip package) or "remote" (a
            model folder behind a URL, such as a training checkpoint on S3: each machine loads a cached copy).
        id: the hub id (kind "hub") or the packaged model's name (kind "packaged").
        path: absolute path of the folder (kind "local") or the .gguf file (kind "gguf"); the URL of the folder
            (kind "remote").
        revision: hub branch, tag or commit (kind "hub" only).
        gguf_file: a .gguf file inside a hub repository (kind "hub" only).
        dtype: compute dtype; "auto" is bfloat16 on CUDA and float32 on CPU.
        attention: "causal", "bidirectional", or "auto" for the architecture's own.
        trust_remote_code: run code shipped with a hub model (off unless asked for).
    """

    kind: SourceKind
    id: str | None = None
    path: str | None = None
    revision: str | None = None
    gguf_file: str | None = None
    dtype: DTypeName = "auto"
    attention: AttentionMode = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check_choice("a model source kind", self.kind, get_args(SourceKind))
        _check_choice("dtype", self.dtype, get_args(DTypeName))
        _check_choice("attention", self.attention, get_args(AttentionMode))
        needs_id = self.kind in ("hub", "packaged")
        if needs_id != (self.id is not None) or needs_id == (self.path is not None):
            raise ModelSpecError(
                f"Expected {'an id' if needs_id else 'a path'} (and not the other) for a {self.kind} model. "
                f"Got id={self.id!r}, path={self.path!r} instead."
            )
        if self.kind != "hub" and (self.revision or self.gguf_file):
            raise ModelSpecError(
                f"Expected revision and gguf_file only for hub models. Got a {self.kind} model with "
                f"revision={self.revision!r}, gguf_file={self.gguf_file!r} instead. Drop those options."
            )

    @property
    def name(self) -> str:
        """A short human name: the hub id, the packaged name, or the folder / file name."""
        return self.id if self.id is not None else Path(str(self.path)).name

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields, for the store's model attributes."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**data)


def _local_spec(path: Path, *, gguf_file: str | None, options: dict[str, Any]) -> ModelSpec:
    """A spec for an existing path: a .gguf file, a folder with a .gguf file in it, or a model folder."""
    path = path.resolve()
    if gguf_file is not None:
        path = path / gguf_file if path.is_dir() else path
        if not path.is_file():
            raise ModelSpecError(f"Expected the GGUF file {path}. Got no such file instead. Check --gguf-file.")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSpecError(
                f"Expected a model folder or a .gguf file. Got the file {path} instead. "
                "Point at the folder that holds config.json, or at a .gguf file."
            )
        return ModelSpec(kind="gguf", path=str(path), **options)
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = (
            f"Pick one of its GGUF files with --gguf-file ({', '.join(ggufs)})."
            if ggufs
            else "Point at a Hugging Face model folder."
        )
        raise ModelSpecError(f"Expected a model folder holding config.json. Got {path} without one instead. {hint}")
    return ModelSpec(kind="local", path=str(path), **options)


def _remote_spec(url: str, *, options: dict[str, Any]) -> ModelSpec:
    """A spec for a model folder behind a URL (``s3://bucket/runs/a/step_000100``), checked to hold config.json."""
    folder = parse_location(url)
    if folder.child("config.json").kind() != "file":
        raise ModelSpecError(f"Expected a model folder holding config.json at {folder.url}. Got none there instead. "
                             "Check the URL (a training checkpoint is <run>/step_N).")
    return ModelSpec(kind="remote", path=folder.url, **options)


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or text.lower().endswith(".gguf")


def _hub_spec(text: str, *, revision: str | None, gguf_file: str | None, options: dict[str, Any]) -> ModelSpec:
    hub_id, _, pinned = text.partition("@")
    if not _HUB_ID.match(hub_id):
        raise ModelSpecError(
            f"Expected a local path, a .gguf file, 'packaged:<name>' or a hub id 'org/name[@revision]'. "
            f"Got {text!r} instead. Check the spelling, or that the path exists."
        )
    if pinned and revision and pinned != revision:
        raise ModelSpecError(
            f"Expected one revision. Got {pinned!r} in the id and {revision!r} as an option. Keep one."
        )
    revision = pinned or revision
    if revision is not None and not _REVISION.match(revision):
        raise ModelSpecError(f"Expected a revision (branch, tag or commit). Got {revision!r} instead.")
    return ModelSpec(kind="hub", id=hub_id, revision=revision, gguf_file=gguf_file, **options)


def parse_model_spec(
    text: str,
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
    dtype: DTypeName = "auto",
    attention: AttentionMode = "auto",
    trust_remote_code: bool = False,
) -> ModelSpec:
    """Turn what the user typed into a :class:`ModelSpec`, checking everything that can be checked offline.

    Args:
        text: a local folder, a .gguf file, ``packaged:<name>`` or ``org/name[@revision]``.
        revision: hub revision (alternative to ``@revision``).
        gguf_file: a .gguf file inside the folder or hub repository ``text`` names.
        dtype, attention, trust_remote_code: see :class:`ModelSpec`.

    Raises:
        ModelSpecError: the text names nothing usable, or the options do not fit the source.
        PackagedModelNotFoundError: ``packaged:<name>`` with an unknown name.

    Example:
        >>> parse_model_spec("Qwen/Qwen3-0.6B@main").revision
        'main'
    """
    options: dict[str, Any] = {"dtype": dtype, "attention": attention, "trust_remote_code": trust_remote_code}
    text = str(text).strip()
    if text.startswith(PACKAGED_PREFIX):
        if revision or gguf_file:
            raise ModelSpecError(f"Expected no revision or gguf_file for {text}. Got some instead. Drop those options.")
        return ModelSpec(kind="packaged", id=packaged_model(text.removeprefix(PACKAGED_PREFIX)).name, **options)
    if is_url(text):
        if revision or gguf_file:
            raise ModelSpecError(f"Expected no revision or gguf_file for the URL {text}. Got some instead. Drop them.")
        return _remote_spec(text, options=options)
    path = Path(text).expanduser()
    if text and path.exists():
        if revision:
            raise ModelSpecError(f"Expected no revision for the local path {text}. Got {revision!r} instead. Drop it.")
        return _local_spec(path, gguf_file=gguf_file, options=options)
    if _looks_like_path(text):
        raise ModelSpecError(
            f"Expected a model folder or .gguf file at {text}. Got nothing there instead. Check the path."
        )
    return _hub_spec(text, revision=revision, gguf_file=gguf_file, options=options)
