"""The checkpoint folders of a training run: their names, which ones are complete, and their steps.

A run lives wherever ``hrsa train`` was told (a local or shared path, or a URL such as ``s3://bucket/runs/a``): it
is read through the same pyarrow filesystem Ray Train writes it with (:mod:`hrsa.runtime.locations`).

``hrsa train`` writes each checkpoint as ``<run>/step_000100``: a Hugging Face model folder plus
``trainer_state.pt`` (for resuming) and ``hrsa_train.json``, whose ``files`` lists every other file of the folder
with its size and digest. Ray Train copies the folder into the run file by file, in no set order, so
``hrsa_train.json`` may land before the weights: a checkpoint is complete when every file it lists is there with
its listed size (and, on a local or shared filesystem, its listed digest). The trainer, ``hrsa eval`` and the
pipeline runner all find checkpoints here, with one rule.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from hrsa.runtime.checkpoint_manifest import (
    INFO_FILE, STATE_FILE, complete_by_manifest, file_manifest, manifest_complete,
)
from hrsa.runtime.locations import Location, parse_location

__all__ = ["INFO_FILE", "STATE_FILE", "Checkpoint", "checkpoint_step", "file_manifest", "list_checkpoints",
           "manifest_complete", "named_step", "resume_folder", "resume_point", "step_folder_name", "step_folders"]

_STEP_FOLDER = re.compile(r"step_([0-9]+)")


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint folder of a run and the optimizer step it was saved at.

    Attributes:
        url: the folder: an absolute local path, or a URL (``s3://bucket/runs/a/step_000100``).
        step: the N of its name ``step_N``.
    """

    url: str
    step: int

    @property
    def path(self) -> Path:
        """The local folder (a run on a local or shared filesystem).

        Raises:
            LocationError: the checkpoint is remote.
        """
        return parse_location(self.url).local_path()


def step_folder_name(step: int) -> str:
    """The folder name of the checkpoint saved after ``step`` optimizer steps: ``step_000100``."""
    return f"step_{step:06d}"


def _run_location(run_dir: Location | Path | str) -> Location:
    return run_dir if isinstance(run_dir, Location) else parse_location(run_dir)


def step_folders(run_dir: Location | Path | str) -> list[str]:
    """Every folder named ``step_N`` directly in ``run_dir``, complete or not (a run that has trained), as
    absolute paths or URLs."""
    return [f.url for f in _run_location(run_dir).folders() if named_step(f.name) is not None]


def list_checkpoints(run_dir: Location | Path | str, *, marker: str = INFO_FILE, contents: bool = True) -> list[Checkpoint]:
    """The complete checkpoints directly in ``run_dir``, sorted by step.

    A checkpoint is a folder named ``step_N`` that holds ``marker``. With the default marker, the trainer's
    ``hrsa_train.json``, every file its manifest lists must be there with its size too (one written before
    manifests: some weights), and with ``contents`` its model files (all but ``trainer_state.pt``, which only a
    resume reads: :func:`resume_folder` checks it) with their digests on a local or shared filesystem.
    ``hrsa eval`` passes ``"config.json"`` to take any Hugging Face model folder named by step. The run's files are
    listed once (one request on an object store), and each candidate's ``hrsa_train.json`` read.

    Args:
        run_dir: a training output folder: a path, a URL (``s3://...``) or a :class:`Location` (missing or not a
            folder: no checkpoints).
        marker: the file whose presence makes a folder a complete checkpoint.
        contents: check the model files' digests too (False: sizes alone, for a caller that checks what it reads).

    Returns:
        One :class:`Checkpoint` per folder, by step (the N of its name).
    """
    run = _run_location(run_dir)
    by_folder: dict[str, dict[str, int]] = {}
    for name, size in run.files().items():
        folder, _, rest = name.partition("/")
        if rest and named_step(folder) is not None:
            by_folder.setdefault(folder, {})[rest] = size
    checked = (lambda name: name != STATE_FILE) if contents else (lambda name: False)
    found = [Checkpoint(run.child(folder).url, named_step(folder) or 0) for folder, files in by_folder.items()
             if marker in files and (marker != INFO_FILE or complete_by_manifest(run.child(folder), files, checked))]
    return sorted(found, key=lambda c: (c.step, c.url))


def resume_point(run: Location, name: str | None) -> Any:
    """The checkpoint folder ``name`` of the run (:func:`resume_folder`'s choice) as a Ray Train Checkpoint on the run's
    filesystem, or None (a fresh run) for no name."""
    from ray.train import Checkpoint

    return None if name is None else Checkpoint(path=run.child(name).path, filesystem=run.filesystem)


def resume_folder(run: Location) -> str | None:
    """The folder name of the run's latest complete checkpoint by hrsa's rule (every file its manifest lists, at its
    size); None for a fresh run. Not Ray Train's own record of the run: Ray registers a checkpoint a while after its
    files are written, and a run killed in between would resume from an earlier one, or from scratch. A worker group
    asks when it starts, so one that Ray Train restarts (a failure, a preempted node) resumes from the checkpoints
    saved before it, not from where the run started. Newest first, each checked whole by digest (its optimizer state
    too) until one holds: the ones before it are not read."""
    for checkpoint in reversed(list_checkpoints(run, contents=False)):
        folder = _run_location(checkpoint.url)
        if complete_by_manifest(folder, folder.files(), lambda name: True):
            return PurePosixPath(checkpoint.url).name
    return None


def checkpoint_step(folder: Location | Path | str) -> int:
    """The training step of a checkpoint folder: its ``hrsa_train.json``'s, else the N of its name ``step_N``."""
    location = _run_location(folder)
    info = location.child(INFO_FILE)
    if info.kind() == "file":
        return int(json.loads(info.read_text())["step"])
    step = named_step(location.name)
    if step is None:
        raise ValueError(f"Expected a checkpoint folder named step_N or holding {INFO_FILE}. Got {location.url!r} "
                         "instead. Pass a checkpoint folder of a training run.")
    return step


def named_step(name: str) -> int | None:
    """The N of a folder name ``step_N`` (the one rule for reading a step from a name), else None."""
    match = _STEP_FOLDER.fullmatch(name)
    return int(match.group(1)) if match else None
