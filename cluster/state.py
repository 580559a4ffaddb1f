"""``<out>/pipeline-state.json``: what each stage of a pipeline last ran with, and whether it finished.

Per stage: its key (:mod:`hrsa.cluster.stage_keys`), its status ("started" before it writes anything, "done" with
its outputs after) and its outputs. One process writes it (the driver of ``hrsa run``), atomically, after each
change, so a re-run after a crash reads the last stage that finished and resumes from there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hrsa.runtime.files import write_atomic
from hrsa.store.errors import UserError

__all__ = ["STATE_FILE", "PipelineState"]

STATE_FILE = "pipeline-state.json"
_SCHEMA = "hrsa.pipeline-state/4"
# Earlier schemes' keys: schema 1's hashed scheduling settings and no labels content, schema 2's knew weights by
# size and modification time and a model behind a URL by its text, schema 3's held the absolute paths of the models,
# corpora and labels (a moved project re-ran every stage). Their records are dropped, not compared (a key from
# another scheme would read as "inputs changed" and delete stored models); stages are then checked afresh, and
# stored models that match what the pipeline asks are adopted.
_EARLIER = {"hrsa.pipeline-state/1", "hrsa.pipeline-state/2", "hrsa.pipeline-state/3"}


class PipelineState:
    """``<out>/pipeline-state.json``: per stage, its key, status and outputs (one writer: the driver).

    Args:
        path: the state file.
        on_write: called after each write (a remote ``out`` uploads what the stage wrote, then this file).
        shown_as: how messages name the file (a remote ``out``'s URL of it: ``path`` is then a local copy that is gone
            once the run ends, and moving it away fixed nothing).

    Raises:
        UserError: a state file that does not read as one (truncated, edited, of another schema): one line naming
            it, never a traceback.
    """

    def __init__(self, path: Path, *, on_write: Callable[[], None] | None = None, shown_as: str | None = None) -> None:
        self.path = path
        self.on_write = on_write
        self._stages: dict[str, dict[str, Any]] = {}
        if path.is_file():
            shown = shown_as or str(path)
            try:
                doc = json.loads(path.read_text())
            except (UnicodeDecodeError, ValueError) as error:
                raise UserError(f"Expected a pipeline state (JSON) in {shown}. Got a file that does not read as one "
                                f"({type(error).__name__}: {error}) instead. Move the file away to start "
                                "over.") from None
            schema = doc.get("schema") if isinstance(doc, dict) else None
            if schema in _EARLIER:
                return
            if schema != _SCHEMA:
                raise UserError(f"Expected a pipeline state of schema {_SCHEMA} in {shown}. Got {schema!r} "
                                "instead. Move the file away to start over.")
            stages = doc.get("stages")
            if not isinstance(stages, dict) or not all(_is_record(e) for e in stages.values()):
                raise UserError(f"Expected a pipeline state in {shown} whose stages each hold a key and a status. Got "
                                "a damaged or edited one instead. Move the file away to start over.")
            self._stages = stages

    def entry(self, stage: str) -> dict[str, Any] | None:
        """The stage's record (``key``, ``status``, ``outputs``), or None when it never started."""
        return self._stages.get(stage)

    def start(self, stage: str, key: str) -> None:
        """Record that ``stage`` runs with ``key`` (before it writes anything)."""
        self._stages[stage] = {"key": key, "status": "started"}
        self._write()

    def finish(self, stage: str, key: str, outputs: Mapping[str, Any]) -> None:
        """Record that ``stage`` finished with ``key``, and what it wrote."""
        self._stages[stage] = {"key": key, "status": "done", "outputs": dict(outputs)}
        self._write()

    def reason_to_run(self, stage: str, key: str, outputs_ok: Callable[[Mapping[str, Any]], bool]) -> str | None:
        """Why ``stage`` must run, or None when it is up to date."""
        entry = self.entry(stage)
        if entry is None:
            return "not run before"
        if entry["key"] != key:
            return "its inputs changed"
        if entry["status"] != "done":
            return "resuming an unfinished run"
        if not outputs_ok(entry.get("outputs", {})):
            return "its outputs are missing"
        return None

    def _write(self) -> None:
        # Atomic: a crash never leaves half a file, so a re-run always reads the last finished stage.
        write_atomic(self.path, json.dumps({"schema": _SCHEMA, "stages": self._stages}, indent=1, sort_keys=True) + "\n")
        if self.on_write is not None:
            self.on_write()


def _is_record(entry: Any) -> bool:
    """A stage's record as :meth:`PipelineState.start` and :meth:`PipelineState.finish` write it."""
    return (isinstance(entry, dict) and isinstance(entry.get("key"), str) and entry.get("status") in ("started", "done")
            and isinstance(entry.get("outputs", {}), dict))
