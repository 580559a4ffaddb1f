"""``hrsa train``: InfoNCE embedding training on Ray Train, with checkpoints that ``hrsa extract`` loads.

Recipe (driver, :func:`run_training`): (1) validate the data and the backbone here, where a mistake is
one line; (2) connect to Ray; (3) run :func:`_train_worker` on ``workers`` Ray Train workers; (4) show
progress from rank 0's per-step reports; (5) list the checkpoints.

Recipe (each worker): set up the model (from the latest checkpoint when resuming), optimizer and
schedule, then per step: take this rank's slice of the step's global batch, forward and backward
(plain or chunked, see :mod:`hrsa.train.gradcache`), average gradients over ranks, clip, step.

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
mode, weights, tokenizer) plus ``hrsa_train.json`` (step, loss, settings, backbone) and
``trainer_state.pt`` (optimizer, schedule, step) for resuming. Re-running with the same output resumes
from the latest checkpoint (Ray Train restores it); the data order and dropout are seeded per step,
so a resumed run computes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hrsa.store.errors import UserError
from hrsa.train.config import TrainConfig

__all__ = ["INFO_FILE", "STATE_FILE", "TrainResult", "average_gradients", "checkpoint_dirs", "run_training"]

INFO_FILE = "hrsa_train.json"
STATE_FILE = "trainer_state.pt"


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


def checkpoint_dirs(output: Path) -> tuple[Path, ...]:
    """The complete checkpoints (folders ``step_NNNNNN`` holding ``hrsa_train.json``) in ``output``, by step."""
    found = [p for p in Path(output).glob("step_*") if (p / INFO_FILE).is_file() and p.name[5:].isdigit()]
    return tuple(sorted(found, key=lambda p: int(p.name[5:])))


# ----------------------------------------------------------------------------------------------------
# Driver


def _prepare(config: TrainConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """Absolute paths (workers change directory), a parsed backbone spec and validated data, or a UserError."""
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.train.data import load_records

    config = config.model_copy(update={"data": config.data.expanduser().resolve(),
                                       "output": config.output.expanduser().resolve()})
    spec = parse_model_spec(config.backbone, dtype=config.dtype, attention=config.attention)
    load_records(config.data, negatives=config.negatives)  # every record checked before any worker starts
    if config.output.exists() and not config.output.is_dir():
        raise UserError(f"Expected --output to be a folder. Got the file {config.output} instead. Pick another path.")
    return config, spec.to_dict()


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
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from hrsa.runtime.connection import connect

    # Step 1: everything a user can get wrong, checked here.
    config, spec = _prepare(config)
    # Step 2: Ray, and where the workers run.
    conn = connect(config.address)
    use_gpu = config.use_gpu if config.use_gpu is not None else conn.n_gpus >= config.workers
    cpus = 1.0 if use_gpu else max(1.0, float(conn.n_cpus // config.workers))
    # Step 3: the workers; rank 0 sends (step, loss) through a queue for the progress bar.
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "spec": spec, "queue": queue,
                           "stop_after": stop_after, "threads": int(cpus)},
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
    return TrainResult(config.output, checkpoint_dirs(config.output), steps, losses,
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


# ----------------------------------------------------------------------------------------------------
# Worker


def average_gradients(model: torch.nn.Module, world_size: int, *, bucket_elements: int = 25_000_000) -> None:
    """Average every parameter gradient over ranks (an all-reduce in flat buckets); a no-op for one rank."""
    import torch.distributed as dist

    if world_size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]  # the same list on every rank
    bucket: list[torch.Tensor] = []
    for i, grad in enumerate(grads):
        bucket.append(grad)
        if sum(g.numel() for g in bucket) >= bucket_elements or i == len(grads) - 1:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= world_size
            for g, part in zip(bucket, torch.split(flat, [g.numel() for g in bucket])):
                g.copy_(part.view_as(g))
            bucket = []


@dataclass
class _Session:
    """One worker's training state."""

    config: TrainConfig
    model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    records: list[Any]
    rank: int
    world: int
    device: torch.device
    step: int  # optimizer steps done
    resumed_from: int | None


def _shard_fsdp(model: Any, device: torch.device) -> None:
    """FSDP2: shard each transformer block, then the rest, over all ranks (weights move to ``device``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import torch.distributed as dist

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = set(getattr(model.backbone, "_no_split_modules", None) or ())
    for module in model.backbone.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _optimizer(model: Any, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    flat = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": flat, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def _setup(config: TrainConfig, spec: dict[str, Any], rank: int, world: int, device: torch.device,
           checkpoint: Any) -> _Session:
    """Model (from the latest checkpoint when resuming), optimizer, schedule and data."""
    from transformers import get_cosine_schedule_with_warmup

    from hrsa.extract.model_spec import ModelSpec, parse_model_spec
    from hrsa.train.data import load_records
    from hrsa.train.model import load_embedding_model

    state, folder = None, None
    if checkpoint is not None:
        folder = Path(checkpoint.path)  # local storage: the persisted folder itself
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    model_spec = (parse_model_spec(str(folder), dtype=config.dtype, attention=config.attention) if folder
                  else ModelSpec.from_dict(spec))
    autocast = torch.bfloat16 if device.type == "cuda" else None
    load_device = torch.device("cpu") if config.strategy == "fsdp" else device
    model, tokenizer, _ = load_embedding_model(model_spec, device=load_device, autocast_dtype=autocast,
                                               gradient_checkpointing=config.gradient_checkpointing)
    if config.strategy == "fsdp":
        _shard_fsdp(model, device)
    optimizer = _optimizer(model, config)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * config.max_steps),
                                                config.max_steps)
    step = 0
    if state is not None:
        _load_optimizer(model, optimizer, state["optimizer"], fsdp=config.strategy == "fsdp")
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
    records = load_records(config.data, negatives=config.negatives)
    return _Session(config, model, tokenizer, optimizer, scheduler, records, rank, world, device, step,
                    step if state is not None else None)


def _load_optimizer(model: Any, optimizer: torch.optim.Optimizer, saved: dict[str, Any], *, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved)


def _train_step(s: _Session) -> float:
    """One optimizer step on this rank's slice of the global batch; returns the global-batch loss."""
    import torch.distributed as dist

    from hrsa.train.data import global_batch
    from hrsa.train.gradcache import contrastive_backward
    from hrsa.train.loss import info_nce
    from hrsa.train.model import tokenize

    c = s.config
    # Step 1: this rank's queries and document groups; dropout seeded by (seed, step, rank) for exact resume.
    batch = global_batch(s.records, s.step, batch_size=c.batch_size, negatives=c.negatives, seed=c.seed,
                         instruction=c.instruction).shard(s.rank, s.world)
    torch.manual_seed((c.seed * 1_000_003 + s.step) * 4099 + s.rank)
    queries = tokenize(s.tokenizer, batch.queries, max_length=c.max_length)
    docs = tokenize(s.tokenizer, batch.docs, max_length=c.max_length)

    def loss_fn(embeddings: Any) -> torch.Tensor:
        return info_nce(embeddings[0], embeddings[1], temperature=c.temperature, group_size=c.negatives + 1,
                        gather=s.world > 1)

    # Step 2: forward and backward, then gradients averaged over ranks (FSDP's reduce-scatter does it itself).
    loss = contrastive_backward(s.model, [queries, docs], loss_fn, chunk_size=c.chunk_size)
    if c.strategy == "ddp":
        average_gradients(s.model, s.world)
    if c.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), c.max_grad_norm)
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.step += 1
    if s.world > 1:
        dist.all_reduce(loss)
        loss /= s.world
    return float(loss)


def _full_state(s: _Session) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(backbone weights, optimizer state), whole, on CPU; under FSDP every rank must call this."""
    if s.config.strategy == "ddp":
        return None, s.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights, optim = get_state_dict(s.model, s.optimizer, options=options)
    return {k.removeprefix("backbone."): v for k, v in weights.items()}, optim


def _save_checkpoint(s: _Session, loss: float, spec: dict[str, Any]) -> None:
    """Every rank reports; rank 0 writes the folder that Ray Train persists as ``output/step_NNNNNN``."""
    import ray.train

    weights, optim = _full_state(s)
    name = f"step_{s.step:06d}"
    metrics = {"step": s.step, "loss": loss}
    if s.rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    folder = Path(tempfile.mkdtemp(prefix="hrsa-ckpt-")) / name
    try:
        s.model.save(folder, tokenizer=s.tokenizer, state_dict=weights)
        torch.save({"optimizer": optim, "scheduler": s.scheduler.state_dict(), "step": s.step}, folder / STATE_FILE)
        info = {"step": s.step, "loss": loss, "backbone": spec, "config": s.config.model_dump(mode="json"),
                "world_size": s.world, "attention": s.config.attention}
        (folder / INFO_FILE).write_text(json.dumps(info, indent=2))  # last: marks the folder complete
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)), checkpoint_dir_name=name)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


def _train_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train loop run by every worker."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if loop_config["threads"]:
        torch.set_num_threads(loop_config["threads"])
    device = ray.train.torch.get_device()
    s = _setup(config, loop_config["spec"], rank, world, device, ray.train.get_checkpoint())
    queue = loop_config["queue"] if rank == 0 else None
    if queue is not None and s.resumed_from is not None:
        queue.put({"resumed_from": s.resumed_from})
    stop = min(config.max_steps, loop_config["stop_after"] or config.max_steps)
    while s.step < stop:
        loss = _train_step(s)
        if queue is not None:
            queue.put({"step": s.step, "loss": loss})
        if s.step % config.save_every == 0 or s.step == stop:
            _save_checkpoint(s, loss, loop_config["spec"])
