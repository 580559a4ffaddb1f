"""``hrsa train``'s driver: InfoNCE embedding training on Ray Train, with checkpoints that ``hrsa extract`` loads.

Recipe (:func:`run_training`): (1) validate the data and the backbone here, where a mistake is one line, and
claim the run folder for this training recipe (:mod:`hrsa.train.recipe`: the same recipe resumes, another one
into a folder that has trained is refused); (2) connect to Ray; (3) run :func:`hrsa.train.worker.train_worker`
on ``workers`` Ray Train workers; (4) show progress from rank 0's per-step reports; (5) list the checkpoints
(:mod:`hrsa.train.checkpoints`).

What each worker does (set-up, the step loop, saving) lives in :mod:`hrsa.train.worker`.

Distributed choices:

- ``strategy="ddp"``: each worker holds the whole model. Gradients are averaged by our own bucketed
  all-reduce after the backward, not by DDP: a contrastive step runs several forwards (queries,
  documents, chunk re-forwards) before gradients are final, which DDP's hooks do not allow without
  ``no_sync`` juggling. The average is exact: InfoNCE's gather sums every rank's loss into each rank's
  gradients, and each rank's loss is the mean over its B/W queries, so mean-over-ranks of gradients is
  the gradient of the mean over all B queries -- the same as one process holding the whole batch.
- ``strategy="fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every transformer block and
  the root, for backbones too large for one device; its reduce-scatter averages gradients the same
  way. Works with gloo on CPU too. Checkpoints gather the full state dict to rank 0.

Output layout: ``RunConfig(storage_path=output.parent, name=output.name)``, so Ray Train persists each
checkpoint to ``output/step_000100`` etc.: a Hugging Face model folder (config with the attention
mode, weights, tokenizer) plus ``hrsa_train.json`` (step, loss, settings, recipe key, backbone, and the size
and digest of every other file) and ``trainer_state.pt`` (optimizer, schedule, step) for resuming. Re-running
the same recipe into the same output resumes from the latest checkpoint (Ray Train restores it); the data
order and dropout are seeded per step, so a resumed run computes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hrsa.store.errors import UserError
from hrsa.train.checkpoints import list_checkpoints
from hrsa.train.config import TrainConfig

__all__ = ["TrainResult", "run_training"]


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`run_training` did.

    Attributes:
        output: the run folder.
        checkpoints: every checkpoint folder of the run (this call's and earlier ones), sorted by step.
        steps: the optimizer steps this call ran (1-based).
        losses: the global-batch loss of each of those steps.
        final_loss: the last step's loss (NaN when this call ran none).
        resumed_from: the checkpoint step this call started from, None for a fresh run.
    """

    output: Path
    checkpoints: tuple[Path, ...]
    steps: tuple[int, ...]
    losses: tuple[float, ...]
    final_loss: float
    resumed_from: int | None


def _prepare(config: TrainConfig) -> tuple[TrainConfig, dict[str, Any], str]:
    """Absolute paths (workers change directory), a parsed backbone spec, validated data and the run folder
    claimed for this recipe (its key returned), or a UserError with nothing written."""
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.train.data import load_training_records
    from hrsa.train.recipe import claim_run_folder, training_recipe

    config = config.model_copy(update={"data": config.data.expanduser().resolve(),
                                       "output": config.output.expanduser().resolve()})
    spec = parse_model_spec(config.backbone, dtype=config.dtype, attention=config.attention)
    # every record checked before any worker starts
    load_training_records(config.data, negatives=config.negatives, batch_size=config.batch_size)
    if config.output.exists() and not config.output.is_dir():
        raise UserError(f"Expected --output to be a folder. Got the file {config.output} instead. Pick another path.")
    recipe = training_recipe(config)
    claim_run_folder(config.output, recipe)  # last: a mistake above leaves no folder behind
    return config, spec.to_dict(), recipe.key


def _unwrap_user_error(error: BaseException) -> BaseException | None:
    """A UserError raised in a worker, found through Ray's wrappers, so the CLI reports it in one line."""
    seen: list[BaseException] = [error, *getattr(error, "worker_failures", {}).values()]
    while seen:
        e = seen.pop()
        if isinstance(e, UserError):
            return e
        seen.extend(x for x in (getattr(e, "cause", None), e.__cause__) if isinstance(x, BaseException))
    return None


def run_training(config: TrainConfig, *, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train (or resume training) an embedding model as ``config`` says, on Ray Train.

    Args:
        config: the settings (see :func:`hrsa.train.config.load_train_config`).
        progress: show a progress bar of steps.
        stop_after: end this call after that step's checkpoint, as an interruption would (the schedule
            still spans ``max_steps``); re-running resumes. For time-sliced runs and resume drills.

    Raises:
        UserError: bad data, backbone or settings (one line that names the fix).
        RecipeMismatchError: ``config.output`` holds a run of another recipe (nothing in it is changed).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from hrsa.runtime.connection import connect
    from hrsa.train.worker import train_worker

    # Step 1: everything a user can get wrong, checked here.
    config, spec, recipe_key = _prepare(config)
    # Step 2: Ray, and where the workers run.
    conn = connect(config.address)
    use_gpu = config.use_gpu if config.use_gpu is not None else conn.n_gpus >= config.workers
    cpus = 1.0 if use_gpu else max(1.0, float(conn.n_cpus // config.workers))
    # Step 3: the workers; rank 0 sends (step, loss) through a queue for the progress bar.
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "spec": spec, "recipe": recipe_key,
                           "queue": queue, "stop_after": stop_after, "threads": int(cpus)},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cpus}),
        run_config=RunConfig(storage_path=str(config.output.parent), name=config.output.name),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    try:
        events = _fit_with_progress(trainer, queue, config.max_steps, progress=progress)
    except Exception as error:
        user_error = _unwrap_user_error(error)
        if user_error is not None:
            raise user_error from None
        raise
    finally:
        ray.kill(queue.actor)
    # Step 4: what this call did.
    steps = tuple(e["step"] for e in events if "step" in e)
    losses = tuple(e["loss"] for e in events if "step" in e)
    resumed = next((e["resumed_from"] for e in events if "resumed_from" in e), None)
    checkpoints = tuple(c.path for c in list_checkpoints(config.output))
    return TrainResult(config.output, checkpoints, steps, losses,
                       losses[-1] if losses else math.nan, resumed)


def _fit_with_progress(trainer: Any, queue: Any, total: int, *, progress: bool) -> list[dict[str, Any]]:
    """Run ``trainer.fit()`` in a thread while this one drains the workers' reports into a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=fit, daemon=True)
    events: list[dict[str, Any]] = []
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps {task.fields[loss]}"),
               TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=total, loss="")
        thread.start()
        while thread.is_alive() or not queue.empty():
            for event in _drain(queue, wait=thread.is_alive()):
                events.append(event)
                if "resumed_from" in event:
                    bar.update(task, completed=event["resumed_from"])
                if "step" in event:
                    bar.update(task, completed=event["step"], loss=f"loss {event['loss']:.4f}")
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return events


def _drain(queue: Any, *, wait: bool) -> list[dict[str, Any]]:
    from ray.util.queue import Empty

    try:
        items = [queue.get(block=wait, timeout=0.5 if wait else None)]
    except Empty:
        return []
    items.extend(queue.get_nowait_batch(queue.qsize()))
    return items
