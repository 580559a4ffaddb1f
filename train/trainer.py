"""``hrsa train``'s driver: InfoNCE embedding training on Ray Train, with checkpoints that ``hrsa extract`` loads.

Recipe (:func:`run_training`): (1) validate the data, the backbone and the output here, where a mistake is one
line; (2) connect to Ray, size the workers to fit the nodes and check that every node reaches the run folder
(:mod:`hrsa.train.placement`), then hold the folder (:mod:`hrsa.train.run_lock`: one training at a time) and claim
it for this training recipe (:mod:`hrsa.train.recipe`: the same recipe resumes, another one into a folder that has
trained is refused); (3) run :func:`hrsa.train.worker.train_worker` on ``workers`` Ray Train workers, restarted by
Ray Train up to ``max_failures`` times (each new worker resumes from the latest complete checkpoint); (4) show
progress from rank 0's per-step reports; (5) list the checkpoints (:mod:`hrsa.train.checkpoints`).

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

Output layout: the output (a local or shared path, or a URL such as ``s3://bucket/runs/a``) is opened as a pyarrow
filesystem and a path on it (:mod:`hrsa.runtime.locations`), and Ray Train gets both, ``RunConfig(storage_path=
<parent>, storage_filesystem=<fs>, name=<name>)``, so it persists each checkpoint to ``output/step_000100`` etc.
through the same filesystem hrsa reads the run with: a Hugging Face model folder (config with the attention
mode, weights, tokenizer) plus ``hrsa_train.json`` (step, loss, settings, recipe key, backbone, and the size
and digest of every other file) and ``trainer_state.pt`` (optimizer, schedule, step) for resuming. Re-running
the same recipe into the same output resumes from the latest complete checkpoint (found by hrsa's rule and loaded
by the workers through the run's filesystem, not Ray Train's record, which lags the files); the data order and
dropout are seeded per step, so a resumed run computes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import signal
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hrsa.runtime.locations import Location, parse_location
from hrsa.store.errors import UserError
from hrsa.train.checkpoints import list_checkpoints, step_folders
from hrsa.train.config import TrainConfig

if TYPE_CHECKING:
    from hrsa.train.data import TrainRecord
    from hrsa.train.placement import WorkerPlacement
    from hrsa.train.recipe import TrainingRecipe

__all__ = ["StopRequest", "TrainResult", "TrainingStopped", "place_training", "run_training"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`run_training` did.

    Attributes:
        output: the run folder: an absolute Path, or a URL (``s3://...``) for a run on remote storage.
        checkpoints: every checkpoint folder of the run (this call's and earlier ones), sorted by step (Paths, or
            URLs for a remote run).
        steps: the optimizer steps this call took the model through (1-based), each once: after a restart, the steps
            that ran again from the checkpoint it resumed from count once, as they ran the last time.
        losses: the global-batch loss of each of those steps.
        final_loss: the last step's loss (NaN when this call ran none).
        resumed_from: the checkpoint step this call started from, None for a fresh run.
        restarted_from: for each time Ray Train restarted the workers in this call (after a failure, ``max_failures``,
            or a preempted node), the checkpoint step they resumed from (0: from the backbone, no checkpoint yet).
    """

    output: Path | str
    checkpoints: tuple[Path | str, ...]
    steps: tuple[int, ...]
    losses: tuple[float, ...]
    final_loss: float
    resumed_from: int | None
    restarted_from: tuple[int, ...] = ()


class TrainingStopped(KeyboardInterrupt):
    """The driver was interrupted (Ctrl-C): its workers stopped before a step, all before the same one, with the
    step they had reached saved (nothing to save when they stopped before their first step).

    Attributes:
        result: what the call did up to there (the same call resumes).
        step: the step the workers stopped after: the run's latest checkpoint (0 on a fresh run: none yet).
    """

    def __init__(self, result: TrainResult, step: int) -> None:
        super().__init__(result, step)
        self.result, self.step = result, step

    def __str__(self) -> str:
        return f"training stopped after step {self.step}"


class StopRequest:
    """What the driver asks of its workers, read by rank 0 before every step (a Ray actor of no CPU): 0 go on,
    1 stop and save the last step (Ctrl-C), 2 stop at once (the run folder's lease was taken over)."""

    def __init__(self) -> None:
        self.requested = 0

    def request(self, *, save: bool = True) -> None:
        self.requested = max(self.requested, 1 if save else 2)

    def get(self) -> int:
        return self.requested


@dataclass(frozen=True)
class _Prepared:
    """What the driver checked and resolved before Ray starts."""

    config: TrainConfig
    spec: dict[str, Any]  # the backbone's ModelSpec as a dict
    records: list[TrainRecord]
    run: Location
    recipe: TrainingRecipe


def _prepare(config: TrainConfig) -> _Prepared:
    """Absolute paths, a parsed backbone spec, the validated records, the run folder's location and the recipe, or a
    UserError with nothing written."""
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.runtime.checkpoint_manifest import refuse_incomplete_checkpoint
    from hrsa.train.data import load_training_records
    from hrsa.train.recipe import training_recipe
    from hrsa.train.run_lock import refuse_if_in_use

    config = config.model_copy(update={"data": config.data.expanduser().resolve()})
    run = parse_location(config.output)
    if run.kind() == "file":
        raise UserError(f"Expected --output to be a folder. Got the file {run.url} instead. Pick another path.")
    _refuse_model_folder(run)
    if not run.is_local and "/" not in run.path.strip("/"):
        raise UserError(f"Expected --output to be a folder inside a bucket (s3://BUCKET/runs/NAME). Got {run.url} "
                        "instead. Add a folder name.")
    # A folder another training runs into is refused first: before a mismatched recipe's "delete it to start over",
    # and before minutes of hashing a large backbone. The lock itself is taken once Ray is up.
    refuse_if_in_use(run)
    spec = parse_model_spec(config.backbone, dtype=config.dtype, attention=config.attention)
    refuse_incomplete_checkpoint(spec)  # a checkpoint of another run, its weights edited or still being copied
    # every record checked before any worker starts
    records = load_training_records(config.data, negatives=config.negatives, batch_size=config.batch_size)
    config = config.model_copy(update={"output": run.as_path_or_url()})
    recipe = training_recipe(config)
    _check_either_device(run, recipe)  # before Ray starts: another recipe's run is refused at once
    return _Prepared(config, spec.to_dict(), records, run, recipe)


def _refuse_model_folder(run: Location) -> None:
    """Refuse an --output that is a model folder (a checkpoint, a backbone): the run's step folders, recipe and lock
    would be written inside it, a run nested in a model that is then no longer what its digest and manifest say
    (usually --output given a checkpoint meant as --backbone, or for its run)."""
    from hrsa.runtime.checkpoint_manifest import INFO_FILE, is_model_folder

    if not is_model_folder(run):
        return
    resume = (f"; to resume the run it is a checkpoint of, pass that run's folder ({run.parent.url})"
              if run.child(INFO_FILE).kind() == "file" else "")
    raise UserError(f"Expected --output to be a training run's folder (new, or one to resume). Got {run.url}, a model "
                    "folder (it holds config.json or a checkpoint's manifest) instead: the run would be trained inside "
                    f"it. To train from it, pass it as --backbone with another --output{resume}.")


def _check_either_device(run: Location, recipe: TrainingRecipe) -> None:
    """Refuse a run folder of another recipe before Ray starts, where the kind of workers is not known yet: the folder
    may hold this recipe as run on CPU workers or on GPU workers (:meth:`TrainingRecipe.on_device`); which of the two
    may resume is checked once the workers are placed (:func:`~hrsa.train.recipe.claim_run_folder`)."""
    from hrsa.train.recipe import RecipeMismatchError, check_run_folder, read_recipe

    try:
        check_run_folder(run, recipe)
    except RecipeMismatchError:
        recorded = read_recipe(run)
        if recorded is None or recorded.key != recipe.on_device(True).key:
            raise


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
        PlacementError: workers no node can hold, or a local ``output`` some node of the cluster does not see.
        RecipeMismatchError: ``config.output`` holds a run of another recipe (nothing in it is changed).
        RunInUseError: another training is running into ``config.output`` (a local or shared folder).
    """
    from hrsa.train.recipe import claim_run_folder
    from hrsa.train.run_lock import exclusive_run

    # Step 1: everything a user can get wrong, checked here.
    prepared = _prepare(config)
    config, run = prepared.config, prepared.run
    # Step 2: Ray, and where the workers go. Only then is the folder claimed: a refusal leaves nothing behind.
    placement = place_training(config)
    prepared = replace(prepared, recipe=prepared.recipe.on_device(placement.use_gpu))  # bf16 autocast on GPUs
    created, held = run.is_local and not run.local_path().exists(), False
    try:
        with exclusive_run(run) as lost:  # a second training into this folder at once is refused (train.run_lock)
            held = True  # only a start that held the folder may remove it: a refused one would delete the holder's
            claim_run_folder(run, prepared.recipe)
            events = _run_workers(prepared, placement, progress=progress, stop_after=stop_after, lost=lost)
    except BaseException:
        if held and created and not step_folders(run):  # a start that failed (no worker loads the backbone)
            shutil.rmtree(run.local_path(), ignore_errors=True)
        raise
    # Step 4: what this call did.
    # Sizes alone: this call wrote them (a digest of each here would read every checkpoint's weights again).
    checkpoints = tuple(parse_location(c.url).as_path_or_url() for c in list_checkpoints(run, contents=False))
    result = _result(run, checkpoints, events)
    halted = [e["halted"] for e in events if "halted" in e]
    if halted:  # the workers stopped on the driver's Ctrl-C (not merely asked after they had finished)
        raise TrainingStopped(result, halted[-1])
    return result


def place_training(config: TrainConfig) -> WorkerPlacement:
    """Where the workers of ``config`` go on its Ray cluster (connected here), checked before anything is written:
    they fit the nodes, and every node reaches the run folder (else Ray waits forever, or fails at the first
    checkpoint). :func:`run_training` calls it; so does a caller that records a state of its own before training
    (the pipeline's stage, which a refusal must not leave started).

    Raises:
        PlacementError: workers no node can hold, or a local ``output`` some node of the cluster does not see.
    """
    from hrsa.runtime.connection import connect
    from hrsa.train.placement import check_every_node_reaches, plan_workers

    nodes = connect(config.address).nodes
    placement = plan_workers(nodes, workers=config.workers, use_gpu=config.use_gpu)
    check_every_node_reaches(parse_location(config.output), nodes)
    _wait_for_room(placement, config.workers)
    return placement


def _wait_for_room(placement: WorkerPlacement, workers: int) -> None:
    """Refuse, after :data:`~hrsa.runtime.placement.ROOM_TIMEOUT_S`, workers the cluster holds room for but other jobs
    use: Ray Train waited for them without end, printing nothing. The room is let go at once for Ray Train to take
    (PACK, its own strategy); a job taking it meanwhile leaves the wait to Ray Train, as before."""
    from ray.util.placement_group import remove_placement_group

    from hrsa.runtime.placement import reserve_room

    bundle = placement.resources_per_worker() or {"GPU": 1.0}
    remove_placement_group(reserve_room([dict(bundle) for _ in range(workers)], strategy="PACK"))


def _run_workers(prepared: _Prepared, placement: WorkerPlacement, *, progress: bool, stop_after: int | None,
                 lost: threading.Event) -> list[dict[str, Any]]:
    """Step 3: ``train_worker`` on the planned Ray Train workers; rank 0's events (starts, steps and losses, and
    ``halted`` where the workers stopped on the driver's Ctrl-C)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from hrsa.train.worker import train_worker

    config, run = prepared.config, prepared.run
    # Step 3: the workers; rank 0 sends (step, loss) through a queue for the progress bar. The records travel
    # through Ray's object store (no node but this one needs the data file); Ray Train persists checkpoints as
    # run/step_N through the run's own filesystem (a local or shared path, s3://...).
    here = on_driver_node()  # the driver's own actors live and die with it, not with a worker's node
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    stop_request = ray.remote(num_cpus=0)(StopRequest).options(scheduling_strategy=here).remote()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "spec": prepared.spec,
                           "records": ray.put(prepared.records), "recipe": prepared.recipe.key, "queue": queue,
                           "stop_after": stop_after, "stop_request": stop_request, "threads": placement.cpus,
                           "run": run},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=placement.use_gpu,
                                     resources_per_worker=placement.resources_per_worker()),
        run_config=RunConfig(storage_path=run.parent.path, storage_filesystem=run.filesystem, name=run.name,
                             failure_config=FailureConfig(max_failures=config.max_failures)),
        torch_config=TorchConfig(backend="nccl" if placement.use_gpu else "gloo"),
    )
    try:
        return _fit_with_progress(trainer, queue, stop_request, config.max_steps, progress=progress, lost=lost)
    except Exception as error:
        user_error = _unwrap_user_error(error)
        if user_error is not None:
            raise user_error from None
        raise
    finally:
        ray.kill(queue.actor)
        ray.kill(stop_request)


def on_driver_node() -> Any:
    """A scheduling strategy that places an actor on the driver's node. A CPU-less actor may otherwise land on any
    node; were that a worker's node, losing it would take the progress queue and stop flag with it, and the
    restart that ``--max-failures`` allows would fail at its first step."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _result(run: Location, checkpoints: tuple[Path | str, ...], events: list[dict[str, Any]]) -> TrainResult:
    """The call's result from rank 0's events: a ``started`` (the step it starts from) each time a worker group
    starts, then a ``step`` and its ``loss`` per step. A restarted group runs again the steps after its checkpoint:
    the later loss of a step is the one the final model went through."""
    starts = [e["started"] for e in events if "started" in e]
    losses: dict[int, float] = {}
    for event in events:
        if "started" in event:  # steps after the restart's checkpoint ran in vain
            losses = {step: loss for step, loss in losses.items() if step <= event["started"]}
        elif "step" in event:
            losses[event["step"]] = event["loss"]
    steps = tuple(sorted(losses))
    resumed = starts[0] if starts and starts[0] > 0 else None
    return TrainResult(run.as_path_or_url(), checkpoints, steps, tuple(losses[s] for s in steps),
                       losses[steps[-1]] if steps else math.nan, resumed, tuple(starts[1:]))


def _fit_with_progress(trainer: Any, queue: Any, stop_request: Any, total: int, *, progress: bool,
                       lost: threading.Event | None = None) -> list[dict[str, Any]]:
    """Run ``trainer.fit()`` in a thread while this one drains the workers' reports into a progress bar (plain
    periodic lines when the output is not a terminal: a log shows the steps and the loss as they come).

    Ctrl-C here asks the workers to stop before their next step (saving the last one), and waits for them: Ray
    Train's own handler is not installed outside the main thread, and a driver that left at once would, in a
    notebook, leave them training into a folder it no longer holds. A second Ctrl-C leaves without waiting.
    Returns rank 0's events."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from hrsa.runtime.progress import LineProgress

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
    with LineProgress(*columns, disable=not progress, label="training") as bar, _first_interrupt() as interrupted:
        task = bar.add_task("train", total=total, loss="")
        thread.start()
        asked = abandoned = False
        while thread.is_alive() or not queue.empty():
            if interrupted.is_set() and not asked:
                asked = True
                stop_request.request.remote()
                log.warning("stopping: the workers save their last step and stop (Ctrl-C again to leave them)")
            if lost is not None and lost.is_set() and not abandoned:  # another training holds the folder now: no save
                abandoned = True
                stop_request.request.remote(save=False)
            for event in _drain(queue, wait=thread.is_alive()):
                events.append(event)
                if "started" in event:
                    bar.update(task, completed=event["started"])
                if "step" in event:
                    bar.update(task, completed=event["step"], loss=f"loss {event['loss']:.4f}")
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return events


@contextmanager
def _first_interrupt() -> Iterator[threading.Event]:
    """An Event the first Ctrl-C sets, instead of raising KeyboardInterrupt wherever the main thread happens to be
    (inside a queue read, it would drop the events read); the second Ctrl-C raises as usual. Off the main thread,
    where no handler can be installed, the Event is never set (Ctrl-C reaches only the main thread)."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        if interrupted.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        interrupted.set()

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _drain(queue: Any, *, wait: bool) -> list[dict[str, Any]]:
    from ray.util.queue import Empty

    try:
        items = [queue.get(block=wait, timeout=0.5 if wait else None)]
    except Empty:
        return []
    items.extend(queue.get_nowait_batch(queue.qsize()))
    return items
