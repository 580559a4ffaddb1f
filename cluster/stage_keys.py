"""A pipeline stage's key: the hash of its resolved inputs, so a stage re-runs exactly when an input changed.

Inputs are the stage's settings plus the identity of what it reads (:func:`source_fingerprint`): small files
by their content, large ones (weights) by size and modification time, a folder (a checkpoint) by its files,
anything that is not a local path (hub id, ``hf:``, ``packaged:``, a URL) by its text, and an upstream stage
by its key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["source_fingerprint", "stage_key"]

_HASHED = 64 << 20  # files up to this size are identified by their content (a rewrite of the same text is the same)


def stage_key(inputs: Mapping[str, Any]) -> str:
    """A stage's key: the hash of its resolved inputs (canonical JSON, so the order of keys does not matter)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_fingerprint(source: str) -> Any:
    """What identifies a model or corpus: a local file or folder by its files (content hash for small ones, size
    and modification time for large ones such as weights), anything else (hub id, hf:, packaged:, URL) by its text."""
    path = Path(source).expanduser()
    if "://" in source or ":" in source.split("/")[0] or not path.exists():
        return source
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {"path": str(path.resolve()), "files": [[str(f.relative_to(path)) if f != path else f.name, _file_identity(f)]
                                                   for f in files]}


def _file_identity(path: Path) -> Any:
    stat = path.stat()
    if stat.st_size > _HASHED:
        return [stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
