"""The checkpoint folders of a training run: their names, which ones are complete, and their steps.

``hrsa train`` writes each checkpoint as ``<run>/step_000100``: a Hugging Face model folder plus
``trainer_state.pt`` (for resuming) and ``hrsa_train.json``, written last, so a folder holding it is complete.
The trainer, ``hrsa eval`` and the pipeline runner all find checkpoints here, with one rule.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["INFO_FILE", "STATE_FILE", "Checkpoint", "checkpoint_step", "list_checkpoints", "step_folder_name"]

INFO_FILE = "hrsa_train.json"  # step, loss, settings, backbone; written last, so it marks a folder complete
STATE_FILE = "trainer_state.pt"  # optimizer, schedule and step, for resuming
_STEP_FOLDER = re.compile(r"step_([0-9]+)")


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint folder of a run and the optimizer step it was saved at."""

    path: Path
    step: int


def step_folder_name(step: int) -> str:
    """The folder name of the checkpoint saved after ``step`` optimizer steps: ``step_000100``."""
    return f"step_{step:06d}"


def list_checkpoints(run_dir: Path, *, marker: str = INFO_FILE) -> list[Checkpoint]:
    """The complete checkpoints directly in ``run_dir``, sorted by step.

    A checkpoint is a folder named ``step_N`` that holds ``marker``. The default marker is the file the trainer
    writes last; ``hrsa eval`` passes ``"config.json"`` to take any Hugging Face model folder named by step.

    Args:
        run_dir: a training output folder (missing or not a folder: no checkpoints).
        marker: the file whose presence makes a folder a complete checkpoint.

    Returns:
        One :class:`Checkpoint` per folder, by step (the N of its name).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        step = _named_step(child.name)
        if step is not None and (child / marker).is_file():
            found.append(Checkpoint(path=child, step=step))
    return sorted(found, key=lambda c: (c.step, c.path.name))


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
