"""Helpers for tests of the training side (as :mod:`hrsa.store.testing` is for the store's): folders laid out as
``hrsa train`` writes them, without a training run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hrsa.train.checkpoints import INFO_FILE, STATE_FILE, file_manifest

__all__ = ["write_checkpoint"]


def write_checkpoint(source: Path, folder: Path, step: int) -> Path:
    """A checkpoint of ``source``'s model at ``folder`` as ``hrsa train`` writes one: the model's files,
    trainer_state.pt, and the manifest (``hrsa_train.json``) written last."""
    shutil.copytree(source, folder)
    (folder / STATE_FILE).write_bytes(b"optimizer state")
    (folder / INFO_FILE).write_text(json.dumps({"step": step, "loss": 1.0, "files": file_manifest(folder)}))
    return folder
