"""``hrsa eval``: MTEB scores of a backbone, a checkpoint, or every checkpoint of a training run (a curve).

Task specs (``--tasks``, repeatable or comma-separated):

- ``retrieval:FILE``: JSON lines with query, pos (optional negs, instruction); nDCG@10 over all pos + negs.
- ``classification:FILE[:TEXT_FIELD[:LABEL_FIELD]]``: JSON lines with a text and a label (default fields
  ``text`` and ``label``); accuracy of a logistic regression fitted on a stratified half.
- ``NAME`` or ``mteb:NAME``: an MTEB task (``SciFact``) or benchmark (``MTEB(eng, v2)``); its data comes
  from the Hugging Face hub, so it needs the hub (a clear error when it is not reachable).

``--model`` is anything :class:`~hrsa.train.encode.TextEncoder` loads, or a training output folder holding
``step_XXXXXX`` checkpoint folders (directly or under ``checkpoints/``): each is evaluated, in step order.
Results go to ``<out>/eval.json`` (schema ``hrsa.eval/1``) after each checkpoint, with a PNG curve of main
score against step when there are several; re-running skips (checkpoint, task) pairs already there with
the same settings. mteb's own result files go to ``<out>/mteb-results``, never to the home folder.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hrsa.store.errors import UserError

__all__ = [
    "SCHEMA",
    "Checkpoint",
    "CheckpointScores",
    "EvalConfig",
    "EvalResult",
    "TaskSpec",
    "evaluate",
    "find_checkpoints",
    "parse_task_spec",
    "split_task_list",
]

SCHEMA = "hrsa.eval/1"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class EvalError(UserError, ValueError):
    """A task spec, model folder or hub state that ``hrsa eval`` cannot work with."""


def split_task_list(text: str) -> list[str]:
    """Split on commas outside parentheses: ``"SciFact,MTEB(eng, v2)"`` is two specs."""
    return [part.strip() for part in re.split(r",(?![^()]*\))", text) if part.strip()]


class EvalConfig(BaseModel):
    """Settings of ``hrsa eval``; each field is also a flag."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="A model (hub id, folder, .gguf, packaged:NAME) or a folder of step_XXXXXX checkpoints.")
    tasks: tuple[str, ...] = Field(description="Task specs: retrieval:FILE, classification:FILE[:TEXT:LABEL], or MTEB names.")
    out: Path | None = Field(None, description="Results folder (default: <model>/eval for a local model, else ./eval).")
    instructions: bool = Field(True, description="Queries get 'Instruct: {task instruction}\\nQuery: ' (off for plain models).")
    instruction: str | None = Field(None, description="The instruction of local tasks (default: mteb's per task type).")
    steps: tuple[int, ...] | None = Field(None, description="Only these checkpoint steps.")
    limit: int | None = Field(None, ge=2, description="Local tasks: a seeded sample of at most this many records.")
    batch_size: int = Field(32, ge=1, description="Texts per forward pass.")
    max_length: int = Field(512, ge=1, description="Cut texts to this many tokens.")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ... (default: CUDA when available).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    attention: Literal["auto", "causal", "bidirectional"] = Field("auto", description="auto: what the checkpoint says.")
    seed: int = Field(0, description="Seed of local tasks' sampling and splits.")
    resume: bool = Field(True, description="Keep results already in <out>/eval.json for the same settings.")

    @field_validator("tasks", mode="before")
    @classmethod
    def _split_tasks(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            value = tuple(part for item in value for part in split_task_list(str(item)))
            if not value:
                raise ValueError("expected at least one task")
        return value

    @field_validator("steps", mode="before")
    @classmethod
    def _split_steps(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return tuple(int(v) for v in value.split(",") if v.strip())
            except ValueError:
                raise ValueError(f"expected comma-separated steps such as 100,200, got {value!r}") from None
        return value

    def out_dir(self) -> Path:
        if self.out is not None:
            return self.out
        local = Path(self.model).expanduser()
        return local / "eval" if local.is_dir() else Path("eval")

    def settings(self) -> dict[str, Any]:
        """What changes a score besides the checkpoint and the task: results are reused only when equal."""
        return {"instructions": self.instructions, "instruction": self.instruction, "limit": self.limit,
                "max_length": self.max_length, "seed": self.seed, "dtype": self.dtype, "attention": self.attention}


# --- tasks ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """One parsed ``--tasks`` entry: kind "retrieval", "classification" or "mteb"."""

    text: str
    kind: Literal["retrieval", "classification", "mteb"]
    name: str
    path: Path | None = None
    text_field: str = "text"
    label_field: str = "label"


def parse_task_spec(text: str) -> TaskSpec:
    """Parse ``retrieval:FILE``, ``classification:FILE[:TEXT_FIELD[:LABEL_FIELD]]``, ``mteb:NAME`` or ``NAME``.

    Raises:
        EvalError: a local task whose file does not exist.
    """
    kind, sep, rest = text.partition(":")
    if sep and kind == "mteb":
        return TaskSpec(text=text, kind="mteb", name=rest.strip())
    if not sep or kind not in ("retrieval", "classification"):
        return TaskSpec(text=text, kind="mteb", name=text.strip())
    fields: list[str] = []
    path_text = rest
    if kind == "classification" and not Path(rest).expanduser().is_file():
        path_text, *fields = rest.split(":")  # FILE:TEXT:LABEL (a file name with ':' is taken whole when it exists)
    path = Path(path_text).expanduser()
    if len(fields) > 2 or not path.is_file():
        form = "retrieval:FILE" if kind == "retrieval" else "classification:FILE[:TEXT_FIELD[:LABEL_FIELD]]"
        got = f"no file at {path}" if not path.is_file() else f"{len(fields)} fields"
        raise EvalError(f"Expected a task {form} naming an existing JSON-lines file. Got {got} in {text!r} instead. "
                        "Check the path.")
    name = f"local-{kind}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', path.stem)}"
    extra = dict(zip(("text_field", "label_field"), fields))
    return TaskSpec(text=text, kind=kind, name=name, path=path, **{k: v for k, v in extra.items() if v})  # type: ignore[arg-type]


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used, or None when it answers (checked fast: offline flag, 5 s connect)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "offline mode (HF_HUB_OFFLINE is set)"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=5).close()
    except OSError as error:
        return f"no connection to {url.hostname} ({error})"
    return None


def _offline_error(names: list[str], why: str) -> EvalError:
    return EvalError(f"Expected a reachable Hugging Face hub for the data of MTEB task(s) {', '.join(names)}. Got {why} "
                     "instead. Connect to the hub, or evaluate on local tasks: retrieval:FILE or classification:FILE.")


def _mteb_tasks(spec: TaskSpec) -> list[Any]:
    """The MTEB tasks a name stands for (a task, or every task of a benchmark); unknown names are errors."""
    import mteb

    try:
        return list(mteb.get_tasks(tasks=[spec.name]))
    except KeyError:
        pass
    try:
        return list(mteb.get_benchmark(spec.name).tasks)
    except KeyError:
        raise EvalError(f"Expected an MTEB task or benchmark name, or a local task (retrieval:FILE, "
                        f"classification:FILE[:TEXT:LABEL]). Got {spec.name!r} instead. Check the spelling "
                        "(mteb.get_tasks() lists the names).") from None


def build_tasks(specs: list[TaskSpec], config: EvalConfig) -> list[tuple[TaskSpec, Any]]:
    """The mteb task objects for ``specs``, data loaded (local files read and checked, hub data downloaded).

    Raises:
        EvalError / JsonlError: unknown names, unreadable files or missing fields, an unreachable hub.
    """
    from hrsa.train.local_tasks import LocalClassificationTask, LocalRetrievalTask

    named = [(spec, task) for spec in specs if spec.kind == "mteb" for task in _mteb_tasks(spec)]
    if named and (why := _hub_unreachable()):
        raise _offline_error([s.name for s, _ in named], why)
    built: list[tuple[TaskSpec, Any]] = []
    names: set[str] = set()
    for spec in specs:
        if spec.kind == "mteb":
            built.extend(pair for pair in named if pair[0] is spec)
            continue
        name = spec.name if spec.name not in names else f"{spec.name}-{len(names)}"
        options = {"name": name, "instruction": config.instruction, "limit": config.limit, "seed": config.seed}
        task = (LocalRetrievalTask(spec.path, **options) if spec.kind == "retrieval" else
                LocalClassificationTask(spec.path, text_field=spec.text_field, label_field=spec.label_field, **options))
        built.append((spec, task))
        names.add(name)
    for spec, task in built:
        try:
            task.load_data()
        except (ConnectionError, TimeoutError) as error:
            raise _offline_error([task.metadata.name], f"{type(error).__name__}: {str(error).splitlines()[0]}") from None
    return built


# --- models --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """One model to evaluate: its display name, what to load, its training step (None for a plain model)."""

    name: str
    model: str
    step: int | None = None


def find_checkpoints(model: str, steps: tuple[int, ...] | None = None) -> list[Checkpoint]:
    """The checkpoints of a training output folder (``step_XXXXXX`` folders holding config.json), in step order;
    else the model itself.

    Raises:
        EvalError: ``steps`` asks for checkpoints the folder does not have.
    """
    folder = Path(model).expanduser()
    found: list[Checkpoint] = []
    if folder.is_dir() and not (folder / "config.json").is_file():
        for parent in (folder, folder / "checkpoints"):
            for child in sorted(parent.iterdir()) if parent.is_dir() else []:
                match = _STEP_DIR.match(child.name)
                if match and child.is_dir() and (child / "config.json").is_file():
                    found.append(Checkpoint(name=child.name, model=str(child), step=int(match.group(1))))
            if found:
                break
    if not found:
        return [Checkpoint(name=Path(model).name if folder.exists() else model, model=model)]
    found.sort(key=lambda c: c.step or 0)
    if steps is not None:
        missing = sorted(set(steps) - {c.step for c in found})
        if missing:
            raise EvalError(f"Expected checkpoints for steps {list(steps)} in {folder}. Got none for {missing} instead "
                            f"(there are {[c.step for c in found]}). Check --steps.")
        found = [c for c in found if c.step in steps]
    return found


# --- results -------------------------------------------------------------------------------------------------------


@dataclass
class CheckpointScores:
    """One checkpoint's results: per task, the main score and every score mteb computed."""

    name: str
    model: str
    step: int | None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def main_scores(self) -> dict[str, float]:
        return {task: float(r["main_score"]) for task, r in self.results.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "step": self.step, "results": self.results}


@dataclass(frozen=True)
class EvalResult:
    """What ``hrsa eval`` wrote: the JSON file, the curve (None for a single model), and the scores."""

    json_path: Path
    figure_path: Path | None
    tasks: tuple[str, ...]
    checkpoints: tuple[CheckpointScores, ...]

    def main_score(self, task: str, checkpoint: int = -1) -> float:
        """The main score of ``task`` for a checkpoint (by position; default the last)."""
        return float(self.checkpoints[checkpoint].results[task]["main_score"])


def _task_result_entry(result: Any, task: Any, settings: dict[str, Any], spec: TaskSpec) -> dict[str, Any]:
    scores = json.loads(json.dumps(result.scores, default=float))
    return {"main_score": float(result.get_score()), "main_score_name": task.metadata.main_score, "spec": spec.text,
            "settings": settings, "scores": scores}


def _previous(path: Path, settings: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Results already in ``path`` with the same settings, by (checkpoint model path, task name)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return {}
    return {(c["model"], task): entry for c in data.get("checkpoints", []) for task, entry in c.get("results", {}).items()
            if entry.get("settings") == settings}


def _write_json(path: Path, config: EvalConfig, tasks: list[tuple[TaskSpec, Any]], rows: list[CheckpointScores]) -> None:
    import mteb

    data = {
        "schema": SCHEMA,
        "model": config.model,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mteb_version": mteb.__version__,
        "tasks": [{"name": t.metadata.name, "spec": s.text, "kind": s.kind, "main_score_name": t.metadata.main_score}
                  for s, t in tasks],
        "checkpoints": [row.to_dict() for row in rows],
        "config": config.model_dump(mode="json"),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def plot_curve(rows: list[CheckpointScores], tasks: list[str], path: Path) -> Path:
    """Main score of each task against training step, one line a task, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task in tasks:
        points = [(r.step, r.results[task]["main_score"]) for r in rows if task in r.results and r.step is not None]
        if points:
            name = rows[0].results.get(task, {}).get("main_score_name", "main score")
            ax.plot(*zip(*points), marker="o", label=f"{task} ({name})")
    ax.set_xlabel("training step")
    ax.set_ylabel("main score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the job -------------------------------------------------------------------------------------------------------


def evaluate(
    config: EvalConfig,
    *,
    on_checkpoint: Callable[[Checkpoint, int, int], None] | None = None,
    on_task: Callable[[str], None] | None = None,
    on_texts: Callable[[int], None] | None = None,
) -> EvalResult:
    """Evaluate every checkpoint of ``config.model`` on every task of ``config.tasks``.

    Args:
        config: the settings.
        on_checkpoint: called as ``(checkpoint, index, count)`` before each checkpoint loads.
        on_task: called with each task's name as it finishes.
        on_texts: called with the number of texts after each embedded batch.

    Returns:
        The scores, and where the JSON and the curve were written.

    Raises:
        UserError: bad task specs or files, unknown MTEB names, an unreachable hub for MTEB tasks, a model
            that cannot be loaded; all before any model runs, except the last.
    """
    specs = [parse_task_spec(t) for t in config.tasks]
    checkpoints = find_checkpoints(config.model, config.steps)
    tasks = build_tasks(specs, config)
    import mteb
    from mteb.cache import ResultCache

    from hrsa.train.encode import TextEncoder
    from hrsa.train.local_tasks import HrsaMtebEncoder

    out = config.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "eval.json"
    settings = config.settings()
    done = _previous(json_path, settings) if config.resume else {}
    cache = ResultCache(out / "mteb-results")
    rows: list[CheckpointScores] = []
    for index, checkpoint in enumerate(checkpoints):
        if on_checkpoint is not None:
            on_checkpoint(checkpoint, index, len(checkpoints))
        row = CheckpointScores(name=checkpoint.name, model=checkpoint.model, step=checkpoint.step)
        todo = []
        for spec, task in tasks:
            previous = done.get((checkpoint.model, task.metadata.name))
            if previous is not None and previous.get("spec") == spec.text:
                row.results[task.metadata.name] = previous
                if on_task is not None:
                    on_task(task.metadata.name)
            else:
                todo.append((spec, task))
        if todo:
            encoder = TextEncoder.load(checkpoint.model, device=config.device, dtype=config.dtype,
                                       attention=config.attention, max_length=config.max_length,
                                       batch_size=config.batch_size)
            wrapper = HrsaMtebEncoder(encoder, name=_meta_name(checkpoint), use_instructions=config.instructions,
                                      batch_size=config.batch_size, max_length=config.max_length, on_batch=on_texts)
            for spec, task in todo:
                result = mteb.evaluate(wrapper, task, cache=cache, overwrite_strategy="always", show_progress_bar=False,
                                       encode_kwargs={"batch_size": config.batch_size}).task_results[0]
                row.results[task.metadata.name] = _task_result_entry(result, task, settings, spec)
                if on_task is not None:
                    on_task(task.metadata.name)
            del wrapper, encoder
            _free_memory()
        rows.append(row)
        _write_json(json_path, config, tasks, rows)  # after each checkpoint: a crash keeps what is done
    names = [t.metadata.name for _, t in tasks]
    stepped = [r for r in rows if r.step is not None]
    figure = plot_curve(rows, names, out / "eval_curve.png") if len(stepped) > 1 else None
    return EvalResult(json_path=json_path, figure_path=figure, tasks=tuple(names), checkpoints=tuple(rows))


def _meta_name(checkpoint: Checkpoint) -> str:
    """An mteb model name ``hrsa/<slug>`` (its result files go to ``mteb-results/results/hrsa__<slug>``)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(checkpoint.model).name if checkpoint.step is not None
                  else checkpoint.name).strip("-") or "model"
    return f"hrsa/{slug}"


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
