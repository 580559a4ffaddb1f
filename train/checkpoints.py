"""The checkpoint folders of a training run: their names, which ones are complete, and their steps.

``hrsa train`` writes each checkpoint as ``<run>/step_000100``: a Hugging Face model folder plus
``trainer_state.pt`` (for resuming) and ``hrsa_train.json``, whose ``files`` lists every other file of the folder
with its size and digest. Ray Train copies the folder into the run file by file, in no set order, so
``hrsa_train.json`` may land before the weights: a checkpoint is complete when every file it lists is there with
its listed size. The trainer, ``hrsa eval`` and the pipeline runner all find checkpoints here, with one rule.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["INFO_FILE", "STATE_FILE", "Checkpoint", "checkpoint_step", "file_manifest", "list_checkpoints",
           "step_folder_name", "step_folders"]

INFO_FILE = "hrsa_train.json"  # step, loss, settings, recipe, and the manifest of the folder's other files
STATE_FILE = "trainer_state.pt"  # optimizer, schedule and step, for resuming
_STEP_FOLDER = re.compile(r"step_([0-9]+)")
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")  # what a checkpoint written before manifests must hold


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint folder of a run and the optimizer step it was saved at."""

    path: Path
    step: int


def step_folder_name(step: int) -> str:
    """The folder name of the checkpoint saved after ``step`` optimizer steps: ``step_000100``."""
    return f"step_{step:06d}"


def file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file of a checkpoint folder but ``hrsa_train.json``: its size and content digest, by name."""
    from hrsa.runtime.fingerprint import file_digest, folder_files

    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "xxh3": file_digest(p)}
            for p in folder_files(folder, skip=(INFO_FILE,))}


def step_folders(run_dir: Path) -> list[Path]:
    """Every folder named ``step_N`` directly in ``run_dir``, complete or not (a run that has trained)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and _named_step(p.name) is not None)


def list_checkpoints(run_dir: Path, *, marker: str = INFO_FILE) -> list[Checkpoint]:
    """The complete checkpoints directly in ``run_dir``, sorted by step.

    A checkpoint is a folder named ``step_N`` that holds ``marker``. With the default marker, the trainer's
    ``hrsa_train.json``, every file its manifest lists must be there with its size too (one written before
    manifests: some weights). ``hrsa eval`` passes ``"config.json"`` to take any Hugging Face model folder
    named by step.

    Args:
        run_dir: a training output folder (missing or not a folder: no checkpoints).
        marker: the file whose presence makes a folder a complete checkpoint.

    Returns:
        One :class:`Checkpoint` per folder, by step (the N of its name).
    """
    found = [Checkpoint(path=folder, step=_named_step(folder.name) or 0) for folder in step_folders(run_dir)
             if (folder / marker).is_file() and (marker != INFO_FILE or _complete(folder))]
    return sorted(found, key=lambda c: (c.step, c.path.name))


def _complete(folder: Path) -> bool:
    """Whether a folder holds every file its ``hrsa_train.json`` lists, at its listed size (a cheap check: a
    partial copy is short or missing; digests are there for readers that need the content itself)."""
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):  # half copied
        return False
    files = info.get("files") if isinstance(info, dict) else None
    if files is None:  # written before manifests
        return (folder / "config.json").is_file() and any(any(folder.glob(w)) for w in _WEIGHTS)
    return all((folder / name).is_file() and (folder / name).stat().st_size == entry["size"]
               for name, entry in files.items())


def checkpoint_step(folder: Path) -> int:
    """The training step of a checkpoint folder: its ``hrsa_train.json``'s, else the N of its name ``step_N``."""
    info = Path(folder) / INFO_FILE
    if info.is_file():
        return int(json.loads(info.read_text())["step"])
    step = _named_step(Path(folder).name)
    if step is None:
        raise ValueError(f"Expected a checkpoint folder named step_N or holding {INFO_FILE}. Got {str(folder)!r} "
                         "instead. Pass a checkpoint folder of a training run.")
    return step


def _named_step(name: str) -> int | None:
    """The N of a folder name ``step_N`` (the one rule for reading a step from a name), else None."""
    match = _STEP_FOLDER.fullmatch(name)
    return int(match.group(1)) if match else None
