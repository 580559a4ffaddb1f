"""``hrsa eval``'s job: MTEB scores of a backbone, a checkpoint, or every checkpoint of a training run (a curve).

``--model`` is anything :class:`~hrsa.train.encode.TextEncoder` loads, or a training output folder holding
``step_XXXXXX`` checkpoint folders (directly or under ``checkpoints/``; a path, or a URL such as ``s3://bucket/runs/a``
where ``hrsa train --output`` wrote it): each is evaluated, in step order.
Results go to ``<out>/eval.json`` (schema ``hrsa.eval/1``) after each checkpoint, with a PNG curve of main
score against step when there are several, always redrawn from what eval.json holds. Re-running reuses the
scores of a (model, task) already there with the same settings (the dtype as resolved, the device kind), and
keeps the rows of the run's other checkpoints (a ``--steps`` subset, or a run that failed part-way); both are
keyed by content (:func:`hrsa.extract.identity.model_digest`, :func:`hrsa.train.eval_tasks.task_identity`):
a moved checkpoint keeps its scores, retrained weights or an edited task file at the same path get new ones. A
result is reused only when it agrees with itself (its ``main_score`` is the mean of the metric mteb names as the
main score, in its own scores): an edited one is scored again, with a note. Reused rows are marked
(:attr:`CheckpointScores.reused`). A checkpoint with an ``hrsa_train.json`` manifest is evaluated only when complete
by it (:func:`hrsa.train.checkpoints.manifest_complete`); in a run of ``hrsa train`` (a folder holding
``hrsa_recipe.json``) a step folder without one is not finished (the trainer writes it last) and is skipped alike;
a checkpoint behind a URL is judged by its manifest too (sizes listed, and the digests of the copy loaded here). The
digest is taken again once a model has loaded, and a change in between is refused (its scores would be keyed to other
weights); an ``--out`` that is a model folder is refused (eval.json would become one of its files).
mteb's own result files go to ``<out>/mteb-results``, never to the home folder. Nothing is written before the
inputs are checked and a model has loaded (or its scores were all reused).

This file owns the settings (:class:`EvalConfig`), which models to evaluate, the results file and the curve.
Task specs are parsed in :mod:`hrsa.train.eval_tasks`; what mteb sees is built in
:mod:`hrsa.train.mteb_adapter`.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import math
import posixpath
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from pydantic import Field, field_validator

from hrsa.runtime.checkpoint_manifest import is_model_folder, refuse_incomplete_checkpoint
from hrsa.runtime.files import write_atomic
from hrsa.runtime.folder_lock import FolderLock
from hrsa.runtime.locations import Location, is_url, parse_location
from hrsa.runtime.settings import FolderPath
from hrsa.store.local_files import check_output_file
from hrsa.store.selection import parse_int_list
from hrsa.train.checkpoints import INFO_FILE, list_checkpoints, manifest_complete, named_step
from hrsa.train.encoder_options import EncoderOptions
from hrsa.train.eval_tasks import EvalError, TaskSpec, build_tasks, parse_task_spec, split_task_list, task_identity
from hrsa.train.recipe import RECIPE_FILE
from hrsa.extract.identity import manifest_digest, model_digest

__all__ = [
    "SCHEMA",
    "CheckpointScores",
    "EvalConfig",
    "EvalResult",
    "EvalTarget",
    "EvalWarning",
    "eval_targets",
    "evaluate",
    "plot_curve",
    "skipped_targets",
]

SCHEMA = "hrsa.eval/1"
EVAL_LOCK = FolderLock(".hrsa_eval.lock", "`hrsa eval`", "evaluate into another --out")


class EvalWarning(UserWarning):
    """A note of ``hrsa eval`` that changes what was scored: a checkpoint skipped, an earlier score not reused."""


class EvalConfig(EncoderOptions):
    """Settings of ``hrsa eval``; each field is also a flag (``batch_size`` is ``--batch-size``).

    How the embedding model loads and runs (device, dtype, attention, batch size, max length) is
    :class:`~hrsa.train.encoder_options.EncoderOptions`, shared with ``hrsa mine-negatives``.
    """

    model: str = Field(description="A model (hub id, folder, .gguf, packaged:NAME, s3://... folder) or a training "
                       "output folder of step_XXXXXX checkpoints (a path, or a URL such as s3://bucket/runs/a): each "
                       "is evaluated and the scores form a curve.")
    tasks: tuple[str, ...] = Field(description="Repeatable or comma-separated. retrieval:FILE (JSON lines query, pos[, "
                                   "negs, instruction]; nDCG@10), classification:FILE[:TEXT_FIELD[:LABEL_FIELD]] (JSON "
                                   "lines, default fields text and label; accuracy), or an MTEB task or benchmark name "
                                   "such as SciFact or 'MTEB(eng, v2)' (mteb:NAME also works; needs the Hugging Face "
                                   "hub).")
    out: FolderPath | None = Field(None, description="Results folder: eval.json, eval_curve.png, mteb-results/ (default: "
                             "<model>/eval for a local model, else ./eval).")
    instructions: bool = Field(True, description="Queries (and classification inputs) get 'Instruct: {task instruction}"
                               "\\nQuery: '; use --no-instructions for models trained without them.")
    instruction: str | None = Field(None, description="Instruction of local tasks (default: mteb's default for the "
                                    "task type).")
    steps: tuple[int, ...] | None = Field(None, description="Only these checkpoint steps, comma-separated, e.g. "
                                          "100,200 (default: all).")
    limit: int | None = Field(None, ge=2, description="Local tasks: evaluate a seeded sample of at most this many "
                              "records (default: all).")
    seed: int = Field(0, description="Seed of local tasks' sampling and train/test split.")
    resume: bool = Field(True, description="Keep results already in <out>/eval.json made with the same settings.")

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
        return tuple(parse_int_list(value, ranges=False, what="checkpoint steps")) if isinstance(value, str) else value

    def out_dir(self) -> Path:
        if self.out is not None:
            return self.out
        local = Path(self.model).expanduser()
        # a model not on this disk (a run on S3, a hub id) gets a folder of its own: one ./eval for all of them had
        # each evaluation rewrite the last one's eval.json without its scores
        return local / "eval" if local.is_dir() else Path("eval") / re.sub(r"[^A-Za-z0-9._-]+", "--", self.model)

    def settings(self) -> dict[str, Any]:
        """What changes a score besides the checkpoint and the task: results are reused only when equal.

        The dtype is the one the model runs in (``auto`` resolved for the device: bfloat16 on CUDA, float32
        elsewhere), and the device kind is kept too: scores computed on a GPU are not taken for a CPU run's; so is
        mteb's version, which computes the metrics.
        """
        from importlib.metadata import version

        import torch

        from hrsa.extract.models import resolve_dtype

        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return {"instructions": self.instructions, "instruction": self.instruction, "limit": self.limit,
                "max_length": self.max_length, "seed": self.seed, "attention": self.attention,
                "dtype": str(resolve_dtype(self.dtype, device)).removeprefix("torch."), "device": device.type,
                "mteb": version("mteb")}  # its metrics are its own: another version's scores are not reused


# --- models --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalTarget:
    """One model to evaluate: its display name, what to load, its training step (None for a plain model)."""

    name: str
    model: str
    step: int | None = None


def eval_targets(model: str, steps: tuple[int, ...] | None = None) -> list[EvalTarget]:
    """The checkpoints of a training output folder (``step_XXXXXX`` model folders, directly or under
    ``checkpoints/``; a path or a URL such as ``s3://bucket/runs/a``), in step order; else the model itself. A
    checkpoint with a manifest (``hrsa_train.json``) is taken only when complete by it
    (:func:`~hrsa.train.checkpoints.manifest_complete`; behind a URL, by the digests of the copy loaded here too), and
    in a run of ``hrsa train`` (it holds ``hrsa_recipe.json``) one without a manifest is not taken;
    :func:`skipped_targets` names the ones left out.

    Raises:
        EvalError: ``steps`` asks for checkpoints the folder does not have (or has incomplete), or for any of a model
            that is not a training run; a folder (or a URL without config.json) that is neither a model nor a run; a
            run whose checkpoints are all incomplete; a checkpoint folder its manifest calls incomplete (or a run's
            step folder without one).
    """
    return _targets(model, steps)[0]


def skipped_targets(model: str, steps: tuple[int, ...] | None = None) -> list[EvalTarget]:
    """The checkpoints of a training run that :func:`eval_targets` leaves out as incomplete (by their manifest, or
    without one in a run of ``hrsa train``)."""
    return _targets(model, steps)[1]


def _incomplete(folder: str) -> str:
    """Why the checkpoint folder at ``folder`` (a path or URL) is not taken, in words."""
    location = parse_location(folder)
    if location.child(INFO_FILE).kind() != "file":
        return (f"{location.url} is incomplete: it has no {INFO_FILE}, which hrsa train writes last in each checkpoint "
                "of its run (a save or copy still under way, or cut short)")
    return (f"{location.url} is incomplete by its {INFO_FILE} (a file it lists is missing, short or changed: a copy or "
            "save still under way, or cut short)")


def _in_hrsa_run(parent: Location) -> bool:
    """Whether step folders in ``parent`` (a run folder, or its checkpoints/) are checkpoints of `hrsa train`: the run
    records its recipe (hrsa_recipe.json)."""
    run = parent.parent if parent.name == "checkpoints" else parent
    return any(folder.child(RECIPE_FILE).kind() == "file" for folder in (parent, run))


def _checkpoint_complete(folder: Location) -> bool | None:
    """Whether a model folder is a complete checkpoint: by its manifest where it has one; without, False for a step
    folder of an `hrsa train` run (the trainer writes the manifest last: its save or copy has not finished), None
    (nothing to judge it by) for any other folder."""
    complete = manifest_complete(folder)
    if complete is None and named_step(folder.name) is not None and _in_hrsa_run(folder.parent):
        return False
    return complete


def _targets(model: str, steps: tuple[int, ...] | None, *,
             judge_copies: bool = True) -> tuple[list[EvalTarget], list[EvalTarget]]:
    """(the targets, the run's checkpoints skipped as incomplete); raises as :func:`eval_targets`. Without
    ``judge_copies``, a remote run's checkpoints are judged by their listing alone (nothing downloaded)."""
    folder = _folder_of_checkpoints(model)
    if folder is None:
        return [_lone_model(model, steps)], []
    found, skipped = _run_checkpoints(folder)
    if not found:
        _refuse_not_a_run(folder, skipped)  # passes a folder of GGUF files on, to the model loader
        return [_lone_model(model, steps)], []
    if steps is not None:
        found, skipped = _only_steps(folder, found, skipped, steps), []
    if not folder.is_local and judge_copies:
        found, skipped = _judge_copies(folder, found, skipped, steps)
    return found, skipped


def _folder_of_checkpoints(model: str) -> Location | None:
    """Where to look for a run's checkpoints: a local folder without config.json, or any URL without one (object
    storage has no folders of their own: a missing prefix and an empty one list alike, and both are refused as
    neither a model nor a run, not passed on to load as a model); None for a model (a hub id, a file, config.json)."""
    if is_url(model):
        location = parse_location(model)
        return None if location.child("config.json").kind() == "file" else location
    folder = Path(model).expanduser()
    return parse_location(folder) if folder.is_dir() and not (folder / "config.json").is_file() else None


def _run_checkpoints(folder: Location) -> tuple[list[EvalTarget], list[EvalTarget]]:
    """(the complete checkpoints, the incomplete ones) of the run at ``folder`` (directly or under checkpoints/), in
    step order, judged by what their folders list (on object storage: the sizes alone)."""
    for parent in (folder, folder.child("checkpoints")):
        # any Hugging Face model folder named by step, not only the checkpoints of `hrsa train`; those with a
        # manifest are judged by it, as training and the pipeline judge them, and in a run of hrsa train those
        # without one are not finished
        candidates = [EvalTarget(name=posixpath.basename(c.url), model=c.url, step=c.step)
                      for c in list_checkpoints(parent, marker="config.json")]
        if candidates:
            found: list[EvalTarget] = []
            skipped: list[EvalTarget] = []
            for target in candidates:
                (skipped if _checkpoint_complete(parse_location(target.model)) is False else found).append(target)
            return found, skipped
    return [], []


def _refuse_not_a_run(folder: Location, skipped: list[EvalTarget]) -> None:
    """Refuse a folder that holds no complete checkpoint: a run whose checkpoints are all incomplete, or a folder
    that is neither a model nor a run. A local folder of GGUF files passes: the model loader's hint names them."""
    if skipped:
        _refuse_none_complete(folder, skipped)
    if folder.is_local and any(folder.local_path().glob("*.gguf")):
        return
    recipes = [f.name for f in folder.folders() if f.name.startswith("recipe-")]  # a pipeline's training runs
    hint = ("Check --model" if not recipes else f"It holds a pipeline's training run: pass --model "
            f"{folder.child(recipes[0]).url}" if len(recipes) == 1 else f"It holds a pipeline's training runs, one a "
            f"recipe ({', '.join(recipes)}): pass one of them as --model")
    raise EvalError(f"Expected a model folder holding config.json, or a training run holding step_XXXXXX checkpoint "
                    f"folders (directly or under checkpoints/). Got {folder.url} with neither instead. {hint}.")


def _refuse_none_complete(folder: Location, skipped: list[EvalTarget]) -> NoReturn:
    raise EvalError(f"Expected a complete checkpoint in {folder.url}. Got none instead: "
                    f"{'; '.join(_incomplete(t.model) for t in skipped)}. Wait for the copy to finish, or train again "
                    "into the run to write them anew.")


def _refuse_incomplete_steps(steps: tuple[int, ...], broken: list[EvalTarget]) -> NoReturn:
    raise EvalError(f"Expected complete checkpoints for --steps {','.join(map(str, steps))}. Got "
                    f"{'; '.join(_incomplete(t.model) for t in broken)} instead. Drop those steps, wait for the copy "
                    "to finish, or train again into the run to write them anew.")


def _lone_model(model: str, steps: tuple[int, ...] | None) -> EvalTarget:
    """``model`` as the one target: anything the model loader takes, refused when it is a checkpoint of a run its
    manifest (or its lack of one) calls incomplete."""
    if steps is not None:
        raise EvalError(f"Expected --steps only with a training run (a folder of step_XXXXXX checkpoints). Got "
                        f"--steps {','.join(map(str, steps))} with the model {model} instead. Drop --steps, or "
                        "point --model at the run.")
    folder = Path(model).expanduser()
    if (is_url(model) or folder.is_dir()) and _checkpoint_complete(parse_location(model)) is False:
        raise EvalError(f"Expected a complete checkpoint. Got {_incomplete(model)} instead. Wait for the copy to "
                        "finish, or train again into its run to write it anew.")
    return EvalTarget(name=folder.name if folder.exists() else model, model=model)


def _only_steps(folder: Location, found: list[EvalTarget], skipped: list[EvalTarget],
                steps: tuple[int, ...]) -> list[EvalTarget]:
    """The run's checkpoints of ``steps``, refusing any of them incomplete or missing."""
    broken = [t for t in skipped if t.step in steps]
    if broken:
        _refuse_incomplete_steps(steps, broken)
    missing = sorted(set(steps) - {c.step for c in found})
    if missing:
        raise EvalError(f"Expected checkpoints for steps {list(steps)} in {folder.url}. Got none for {missing} instead "
                        f"(there are {[c.step for c in found]}). Check --steps.")
    return [c for c in found if c.step in steps]


def _judge_copies(folder: Location, found: list[EvalTarget], skipped: list[EvalTarget],
                  steps: tuple[int, ...] | None) -> tuple[list[EvalTarget], list[EvalTarget]]:
    """A remote run's checkpoints judged again by the digests of the copies this machine loads (downloaded now, and
    once per machine: the load and the score's digest read the same copy): their listing shows sizes alone, and
    weights overwritten at the same size pass them. Only those about to be scored (after ``--steps``) are fetched.
    One that fails is skipped, as a local checkpoint whose digests disagree is, and refused when asked for by
    ``steps`` or when none is left."""
    changed = [t for t in found if manifest_complete(t.model, by_content=True) is False]
    if not changed:
        return found, skipped
    if steps is not None:
        _refuse_incomplete_steps(steps, changed)
    found = [t for t in found if t not in changed]
    skipped = sorted(skipped + changed, key=lambda t: t.step or 0)
    if not found:
        _refuse_none_complete(folder, skipped)
    return found, skipped


# --- results -------------------------------------------------------------------------------------------------------


@dataclass
class CheckpointScores:
    """One checkpoint's results: per task, the main score and every score mteb computed."""

    name: str
    model: str
    step: int | None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_digest: str | None = None  # what the scores are reused by (the model's content)
    reused: set[str] = field(default_factory=set)  # the tasks whose scores were read from an earlier eval.json


    def main_scores(self) -> dict[str, float]:
        return {task: float(r["main_score"]) for task, r in self.results.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "step": self.step, "model_digest": self.model_digest,
                "results": self.results}


@dataclass(frozen=True)
class EvalResult:
    """What ``hrsa eval`` wrote: the JSON file, the curve (None for a single model), and every row eval.json holds
    (this run's, and the earlier rows it kept), in step order."""

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
            "task_digest": task_identity(spec, task), "settings": settings, "scores": scores}


def _earlier_rows(path: Path, note: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The checkpoint rows of an earlier ``eval.json`` at ``path`` (none if absent, unreadable or of another schema).

    Only what reads as hrsa wrote it: a row whose step, model digest or results are of another type, and a result
    that is not a mapping with a task digest (an edited or damaged file), are left out (scored again), with a note
    naming the file, never a traceback."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return []
    checkpoints = data.get("checkpoints", [])
    rows, dropped = [], 0
    for c in checkpoints if isinstance(checkpoints, list) else []:
        results = c.get("results") if isinstance(c, dict) else None
        if not isinstance(results, dict) or not (c.get("step") is None or type(c.get("step")) is int) \
                or not (c.get("model_digest") is None or isinstance(c.get("model_digest"), str)):
            dropped += 1
            continue
        kept = {name: e for name, e in results.items() if isinstance(e, dict) and isinstance(e.get("task_digest"), str)}
        dropped += len(results) - len(kept)
        rows.append({**c, "results": kept})
    if (dropped or not isinstance(checkpoints, list)) and note is not None:
        note(f"not reusing {dropped or 'any'} malformed result(s) of {path} (edited?); scoring them again.")
    return rows


def _previous(rows: list[dict[str, Any]], settings: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Earlier results with the same settings, by (model digest, task digest), in the file's order (the same weights
    at two steps give two); results written before digests are not reused."""
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in rows:
        for entry in c.get("results", {}).values():
            if isinstance(entry, dict) and entry.get("settings") == settings and c.get("model_digest") \
                    and entry.get("task_digest"):
                found.setdefault((c["model_digest"], entry["task_digest"]), []).append(entry)
    return found


def _disagreement(entry: dict[str, Any], task: Any) -> str | None:
    """Why an earlier result's main score is not to be believed, or None when it is.

    mteb records which metric is a task's main score (``task.metadata.main_score``, kept as ``main_score_name``) and
    each subset's value of it (``scores[split][i]``, beside that subset's ``main_score``); the result's
    ``main_score`` is their mean (``TaskResult.get_score``). An entry edited by hand, or damaged, breaks one of these.
    """
    name = task.metadata.main_score
    if entry.get("main_score_name") != name:
        return f"its main score is {entry.get('main_score_name')!r}, the task's is {name!r}"
    scores = entry.get("scores")
    subsets = [s for split in scores.values() if isinstance(split, list) for s in split] \
        if isinstance(scores, dict) else []
    try:
        main = float(entry["main_score"])
        values = [float(s[name]) for s in subsets]
        mains = [float(s["main_score"]) for s in subsets]
    except (KeyError, TypeError, ValueError):
        return f"its scores lack {name} or main_score"
    if not values:
        return "it holds no scores"
    if not math.isfinite(main):  # never written now (a NaN is no score); an earlier hrsa wrote them
        return f"its main score is not a number ({main})"
    mean = sum(values) / len(values)
    if not all(math.isclose(m, v, rel_tol=1e-6, abs_tol=1e-9) for m, v in zip(mains, values, strict=True)) \
            or not math.isclose(main, mean, rel_tol=1e-6, abs_tol=1e-9):
        return f"its main_score {main:.4f} is not its own {name} {mean:.4f}"
    return None


def _reusable(candidates: list[dict[str, Any]], task: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the first earlier result that agrees with itself, or None; why the first one did not, if none did)."""
    why = None
    for entry in candidates:
        problem = _disagreement(entry, task)
        if problem is None:
            return entry, None
        why = why or problem
    return None, why


def _kept_rows(rows: list[dict[str, Any]], targets: list[EvalTarget], tasks: list[tuple[TaskSpec, Any]],
               settings: dict[str, Any], model: str, *, source: Path,
               note: Callable[[str], None]) -> list[CheckpointScores]:
    """Earlier rows of this run's checkpoints that stay in eval.json until (unless) this run scores them again.

    A row stays when the run still holds a checkpoint at its step with the same content and the row has every task
    of this run (same task content) with the same settings, each result agreeing with itself (:func:`_disagreement`;
    a row of a step this run does not score that fails it is dropped with a note naming ``source``): a narrowed
    (``--steps``) or failed re-run keeps the rest of the curve, while rows of other weights, tasks or settings are
    never mixed in.
    """
    if not rows or any(t.step is None for t in targets):
        return []
    checkpoints = {t.step: t for t in _targets(model, None, judge_copies=False)[0]}
    wanted = {task.metadata.name: (spec, task_identity(spec, task), task) for spec, task in tasks}
    scored_now = {t.step for t in targets}
    kept = []
    for row in rows:
        here = checkpoints.get(row.get("step"))
        if here is None or not row.get("model_digest") or _digest_to_keep(here, scored_now) != row["model_digest"]:
            continue
        by_task = {e.get("task_digest"): e for e in row.get("results", {}).values() if e.get("settings") == settings}
        if not all(digest in by_task for _, digest, _ in wanted.values()):
            continue
        problems = [(name, why) for name, (_, digest, task) in wanted.items()
                    if (why := _disagreement(by_task[digest], task)) is not None]
        if problems:
            if here.step not in scored_now:
                name, why = problems[0]
                note(f"not keeping {name} of {here.name} from {source}: {why} (edited?); its row is dropped, "
                     f"evaluate step {here.step} again to restore it.")
            continue
        kept.append(CheckpointScores(name=here.name, model=here.model, step=here.step,
                                     model_digest=row["model_digest"], reused=set(wanted),
                                     results={name: {**by_task[digest], "spec": spec.text}
                                              for name, (spec, digest, _) in wanted.items()}))
    return kept


def _digest_to_keep(target: EvalTarget, scored_now: set[int | None]) -> str | None:
    """The digest an earlier row of ``target`` is kept by: its content's; for a checkpoint behind a URL that this run
    does not score, the one its listed manifest gives (the files' digests as the trainer recorded them, sizes checked
    by the listing): fetching every checkpoint of a run to keep its curve was a whole run's download from a fresh
    node, and the scores of this run's steps are keyed by the copies they load."""
    if target.step in scored_now or not is_url(target.model):
        return model_digest(target.model)
    return manifest_digest(target.model)


def _write_results(out: Path, config: EvalConfig, tasks: list[tuple[TaskSpec, Any]],
                   rows: list[CheckpointScores]) -> Path | None:
    """eval.json, and the curve drawn from the same rows (removed when fewer than two steps): the two never disagree.

    Returns:
        The curve's path, or None when there is none.
    """
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "eval.json", config, tasks, rows)
    curve = out / "eval_curve.png"
    if len([r for r in rows if r.step is not None]) > 1:
        return plot_curve(rows, [t.metadata.name for _, t in tasks], curve)
    curve.unlink(missing_ok=True)  # an earlier evaluation's curve would sit beside results it does not show
    return None


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
    write_atomic(path, json.dumps(_strict(data), indent=2, allow_nan=False))


def _strict(value: Any) -> Any:
    """``value`` with every NaN or infinity as None (JSON's null): mteb gives some secondary metrics as NaN (the
    ``nauc_*`` of a small task), which strict JSON readers refuse; main scores are never NaN (refused before)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def plot_curve(rows: list[CheckpointScores], tasks: list[str], path: Path) -> Path:
    """Main score of each task against training step, one line a task, saved as a PNG."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no global backend switch

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
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
    return path


# --- the job -------------------------------------------------------------------------------------------------------


def evaluate(
    config: EvalConfig,
    *,
    on_checkpoint: Callable[[EvalTarget, int, int], None] | None = None,
    on_task: Callable[[str], None] | None = None,
    on_texts: Callable[[int], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    own_out: bool = False,
) -> EvalResult:
    """Evaluate every checkpoint of ``config.model`` on every task of ``config.tasks``.

    Args:
        config: the settings.
        on_checkpoint: called as ``(checkpoint, index, count)`` before each checkpoint loads.
        on_task: called with each task's name as it finishes.
        on_texts: called with the number of texts after each embedded batch.
        on_note: called with each one-line note (a checkpoint skipped as incomplete, an earlier score not reused);
            None: each is an :class:`EvalWarning`.
        own_out: ``config.out`` is the caller's own folder for this evaluation (a pipeline's ``<out>/eval/<name>``),
            not a user's: an eval.json there of another model (the pipeline now names other weights) is replaced
            rather than refused. Its rows are never kept (they are kept by their checkpoints' digests).

    Returns:
        The scores, and where the JSON and the curve were written.

    Raises:
        UserError: bad task specs or files, unknown MTEB names, an unreachable hub for MTEB tasks, a model
            that cannot be loaded; all before any model runs, except the last.
    """
    # Step 1: everything a user can get wrong, checked before any model loads and before anything is written.
    from hrsa.extract.model_spec import parse_model_spec

    specs = [parse_task_spec(t) for t in config.tasks]
    targets, skipped = _targets(config.model, config.steps)
    for target in targets:
        spec = parse_model_spec(target.model, dtype=config.dtype, attention=config.attention)
        if target.step is None:  # a run's checkpoints were judged above (behind a URL, their copies by digest)
            refuse_incomplete_checkpoint(spec, by_content=True)  # a lone one behind a URL: its copy by digest
    out = config.out_dir()
    if out.exists() and not out.is_dir():
        raise EvalError(f"Expected --out to be a folder. Got the file {out} instead. Pick another path.")
    _refuse_out_in_a_model(out)
    if config.out is not None and not own_out:
        _refuse_another_models_scores(out / "eval.json", config.model, targets)
    for name in ("eval.json", "eval_curve.png"):  # before any evaluation: no FIFO there, no folder inside a store
        check_output_file(out / name, flag="--out")
    tasks = build_tasks(specs, instruction=config.instruction, limit=config.limit, seed=config.seed)
    note = on_note or _warn
    source = out / "eval.json"
    for target in skipped:
        note(f"skipped {target.name}: {_incomplete(target.model)}; it is evaluated once complete.")

    # Steps 2 and 3 hold `out` against another eval of the same checkpoint (they share its default --out, and
    # raced on eval.json): the refused one is one line, and writes and removes nothing.
    created = not out.exists()
    with EVAL_LOCK.exclusive(parse_location(str(out))):
        try:
            rows, figure = _resume_and_score(targets, tasks, config, source, note, on_checkpoint, on_task, on_texts)
        except BaseException:
            # Made by this call, holding no score: a failure leaves none. Only while held: an eval refused by the
            # lock must not remove the folder of the one that holds it.
            if created and not (out / "eval.json").exists():
                shutil.rmtree(out, ignore_errors=True)
            raise
    return EvalResult(json_path=out / "eval.json", figure_path=figure, tasks=tuple(t.metadata.name for _, t in tasks),
                      checkpoints=tuple(rows))


def _refuse_another_models_scores(path: Path, model: str, targets: list[EvalTarget]) -> None:
    """Refuse an --out whose eval.json holds the scores of another --model: this run rewrites the file with its own
    model's rows only, and the other's curve was gone without a word. The same model moved (a row of the digest of
    one of this run's checkpoints) is this model."""
    try:
        recorded = json.loads(path.read_text()).get("model")
    except (OSError, ValueError, AttributeError):  # none, or unreadable: nothing of another model's to lose
        return
    if not isinstance(recorded, str) or recorded == model:
        return
    digests = {row.get("model_digest") for row in _earlier_rows(path)}
    if not digests & {model_digest(target.model) for target in targets}:
        raise EvalError(f"Expected --out's eval.json to hold scores of {model} (this run rewrites it). Got {path} with "
                        f"those of {recorded} instead. Pass another --out, or delete the file.")


def _refuse_out_in_a_model(out: Path) -> None:
    """Refuse an --out that is a model folder (the one evaluated, a checkpoint of the run): eval.json and the curve
    would become top-level files of the model, which its digest reads (:func:`hrsa.extract.identity.model_files`):
    the next eval would know it as another model and never reuse its scores (an extraction would key it anew too).
    Refused rather than left out of the digest: a file named eval.json in a model folder would then never count, and a
    user asking for results in the model's own files more likely mistook --out for --model. A folder below it (the
    default <model>/eval) is not the model's."""
    if out.is_dir() and is_model_folder(parse_location(str(out))):
        raise EvalError(f"Expected --out outside the model's own files. Got {out}, a model folder (it holds config.json "
                        "or a checkpoint's manifest) instead: eval.json there would become one of its files and change "
                        f"its digest. Pick a folder below it ({out / 'eval'}) or elsewhere.")


def _resume_and_score(targets: list[EvalTarget], tasks: list[tuple[TaskSpec, Any]], config: EvalConfig, source: Path,
                      note: Callable[[str], None], on_checkpoint: Callable[[EvalTarget, int, int], None] | None,
                      on_task: Callable[[str], None] | None,
                      on_texts: Callable[[int], None] | None) -> tuple[list[CheckpointScores], Path | None]:
    """Steps 2 and 3 of :func:`evaluate`: results already there with the same settings are reused (resume), and the
    rows of this run's other checkpoints kept until scored again; then each checkpoint in turn, eval.json and the
    curve rewritten as soon as it is done (a crash keeps what is done)."""
    settings = config.settings()
    earlier = _earlier_rows(source, note)
    # --no-resume scores again every checkpoint asked for; the rows of the run's other checkpoints (a --steps subset)
    # are kept as a resume keeps them, not dropped with the curve
    done = _previous(earlier, settings) if config.resume else {}
    kept = _kept_rows(earlier, targets, tasks, settings, config.model, source=source, note=note)
    return _score_each(targets, tasks, config, kept, done=done, on_checkpoint=on_checkpoint, on_task=on_task,
                       on_texts=on_texts, note=note)


def _score_each(targets: list[EvalTarget], tasks: list[tuple[TaskSpec, Any]], config: EvalConfig,
                kept: list[CheckpointScores], *, done: dict[tuple[str, str], list[dict[str, Any]]],
                on_checkpoint: Callable[[EvalTarget, int, int], None] | None, on_task: Callable[[str], None] | None,
                on_texts: Callable[[int], None] | None,
                note: Callable[[str], None]) -> tuple[list[CheckpointScores], Path | None]:
    """Score each target, writing eval.json (this run's rows and the ``kept`` ones) and the curve after each.

    Returns:
        Every row eval.json holds, in step order, and the curve's path (None when there is none).
    """
    out = config.out_dir()
    rows: list[CheckpointScores] = []
    rows_now: list[CheckpointScores] = []
    figure: Path | None = None
    for index, target in enumerate(targets):
        if on_checkpoint is not None:
            on_checkpoint(target, index, len(targets))
        others = [t.step for t in targets if t is not target and t.step is not None]
        rows.append(_score_target(target, tasks, config, done=done, cache_dir=out / "mteb-results", on_task=on_task,
                                  on_texts=on_texts, source=out / "eval.json", note=note, others=others))
        redone = {r.step for r in rows}
        rows_now = sorted(rows + [r for r in kept if r.step not in redone], key=lambda r: (r.step is None, r.step or 0))
        figure = _write_results(out, config, tasks, rows_now)
    return rows_now, figure


def _score_target(target: EvalTarget, tasks: list[tuple[TaskSpec, Any]], config: EvalConfig, *,
                  done: dict[tuple[str, str], list[dict[str, Any]]], cache_dir: Path,
                  on_task: Callable[[str], None] | None, on_texts: Callable[[int], None] | None, source: Path,
                  note: Callable[[str], None], others: list[int]) -> CheckpointScores:
    """One model's scores on every task: earlier results reused (those that agree with themselves; another is scored
    again, with a note naming ``source``), the model loaded only when a task is left.

    Raises:
        EvalError: embeddings or a main score that are not numbers (naming ``others``, the run's other steps).
    """
    import mteb
    from mteb.cache import ResultCache

    from hrsa.train.encode import NonFiniteEmbeddingsError, TextEncoder
    from hrsa.train.mteb_adapter import HrsaMtebEncoder

    settings = config.settings()
    row = CheckpointScores(name=target.name, model=target.model, step=target.step, model_digest=model_digest(target.model))
    todo = []
    for spec, task in tasks:
        previous, why = _reusable(done.get((row.model_digest, task_identity(spec, task)), []), task)
        if previous is not None:
            row.results[task.metadata.name] = {**previous, "spec": spec.text}
            row.reused.add(task.metadata.name)
            if on_task is not None:
                on_task(task.metadata.name)
        else:
            if why is not None:
                note(f"not reusing {task.metadata.name} of {target.name} from {source}: {why} (edited?); scoring it "
                     "again.")
            todo.append((spec, task))
    if not todo:
        return row
    encoder = TextEncoder.load(target.model, device=config.device, dtype=config.dtype, attention=config.attention,
                               max_length=config.max_length, batch_size=config.batch_size)
    loaded = _digest_of_what_loaded(target, row.model_digest)
    if loaded != row.model_digest:  # a hub model the load brought up to date: no earlier score is of these weights
        row.results.clear()
        row.reused.clear()
        todo = list(tasks)
    row.model_digest = loaded
    cache = ResultCache(cache_dir)  # creates the folder: only now that a model has loaded
    wrapper = HrsaMtebEncoder(encoder, name=_meta_name(target), use_instructions=config.instructions,
                              batch_size=config.batch_size, max_length=config.max_length, on_batch=on_texts)
    for spec, task in todo:
        try:
            with _quiet_mteb():  # show_progress_bar in encode_kwargs: mteb's "Searching corpus chunks" bar, off
                encode_kwargs = {"batch_size": config.batch_size, "show_progress_bar": False}
                result = mteb.evaluate(wrapper, task, cache=cache, overwrite_strategy="always", show_progress_bar=False,
                                       encode_kwargs=encode_kwargs).task_results[0]
        except NonFiniteEmbeddingsError as error:
            raise EvalError(f"{error}{_leave_out(target, others)}") from None
        row.results[task.metadata.name] = _task_result_entry(result, task, settings, spec)
        _check_main_score(row.results[task.metadata.name], task, target, others)
        if on_task is not None:
            on_task(task.metadata.name)
    del wrapper, encoder
    _free_memory()  # the next checkpoint's weights replace these
    return row


def _digest_of_what_loaded(target: EvalTarget, before: str | None) -> str | None:
    """The model's digest once it has loaded, which its scores are keyed by: the digest taken before the load
    (``before``, which earlier scores were looked up by) held only if the files stayed put while they were read. A
    change in between (a training run saving into the folder, a copy under way) would key these scores to weights
    other than the ones scored: refused, nothing of this model written. A hub model is known by the snapshot its
    revision resolves to: one not yet cached had no digest before (None), and an online load moves ``main`` to the
    hub's new commit; either way the snapshot the load resolved is what it loaded (the caller scores it anew).

    Raises:
        EvalError: the model's files (not a hub model's) changed between the digest and the load.
    """
    from hrsa.extract.model_spec import parse_model_spec

    after = model_digest(target.model)  # each file read again only if its size, time or inode changed
    if before is not None and after != before and parse_model_spec(target.model).kind != "hub":
        raise EvalError(f"Expected the files of {target.model} to stay as they were while it loaded. Got them changed "
                        "in between instead (a training run or copy writing there, a hub model updated in the cache): "
                        "its scores would be keyed to other weights, and nothing of it is written. Evaluate again "
                        "once the writer is done.")
    return after


@contextmanager
def _quiet_mteb() -> Iterator[None]:
    """mteb without the lines that say nothing to an hrsa user: its "No prompt found" for every task without an MTEB
    prompt (hrsa's local tasks: the instructions are hrsa's own, --instructions), printed twice (log and warning),
    and the datasets library's progress bars over a few hundred texts."""
    import datasets

    logger = logging.getLogger("mteb.abstasks.abstask")
    level, bars = logger.level, datasets.utils.logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No prompt found on the abstask class")
            yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _check_main_score(entry: dict[str, Any], task: Any, target: EvalTarget, others: list[int]) -> None:
    """Refuse a main score that is not a number: NaN is no measurement of the model (written, it would be printed,
    drawn and reused as one)."""
    if not math.isfinite(entry["main_score"]):
        raise EvalError(f"Expected a number as the main score ({entry['main_score_name']}) of {task.metadata.name} "
                        f"for {target.model}. Got {entry['main_score']} instead: the metric is undefined for its "
                        f"embeddings (all alike?), and nothing of it is written.{_leave_out(target, others)}")


def _leave_out(target: EvalTarget, others: list[int]) -> str:
    """How to evaluate a run's other checkpoints without this one (nothing for a lone model)."""
    if target.step is None:
        return ""
    if not others:
        return " It is the only step asked for: evaluate another run."
    return f" Evaluate the run's other checkpoints with --steps {','.join(map(str, others))}."


def _warn(message: str) -> None:
    warnings.warn(message, EvalWarning, stacklevel=3)


def _meta_name(target: EvalTarget) -> str:
    """An mteb model name ``hrsa/<slug>`` (its result files go to ``mteb-results/results/hrsa__<slug>``)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(target.model).name if target.step is not None
                  else target.name).strip("-") or "model"
    return f"hrsa/{slug}"


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
