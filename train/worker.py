"""One Ray Train worker of ``hrsa train``: its model, optimizer and data, the step loop, and its checkpoints.

Recipe (:func:`train_worker`, run by every worker): set up the model (from the latest checkpoint when
resuming), optimizer and schedule, then per step: take this rank's slice of the step's global batch, forward
and backward (plain or chunked, see :mod:`hrsa.train.gradcache`), average gradients over ranks, clip, step;
every ``save_every`` steps all ranks report and rank 0 writes the checkpoint folder (in place on a local or shared
path, else for Ray Train to upload).

Gradients under ``strategy="ddp"`` are averaged by :func:`average_gradients` after the backward, not by DDP's
hooks (see :mod:`hrsa.train.trainer` for why the average is exact); under ``"fsdp"``, FSDP2's reduce-scatter
averages them. The driver that starts these workers is :mod:`hrsa.train.trainer`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hrsa.train.checkpoints import (
    INFO_FILE, STATE_FILE, file_manifest, resume_folder, resume_point, step_folder_name,
)
from hrsa.train.config import TrainConfig

__all__ = ["STOP_AND_SAVE", "STOP_NOW", "WorkerSession", "average_gradients", "setup_session", "shard_fsdp", "stop_requested", "train_step",
           "train_worker"]


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
class WorkerSession:
    """One worker's training state: what :func:`train_step` reads and advances."""

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


def shard_fsdp(model: Any, device: torch.device) -> None:
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


def setup_session(config: TrainConfig, spec: dict[str, Any], rank: int, world: int, device: torch.device,
                  checkpoint: Any, *, records: list[Any] | None = None) -> WorkerSession:
    """Model (from the latest checkpoint when resuming), optimizer, schedule and data.

    Args:
        config: the run's settings.
        spec: the backbone's :class:`~hrsa.extract.model_spec.ModelSpec` as a dict (used on a fresh start).
        rank, world: this worker's rank and the number of workers.
        device: where the model trains.
        checkpoint: the Ray Train checkpoint to resume from (the run's latest complete one), or None.
        records: the training records (default: read from ``config.data``).
    """
    from transformers import get_cosine_schedule_with_warmup

    from hrsa.train.data import load_training_records

    with _checkpoint_folder(checkpoint) as folder:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False) if folder else None
        model, tokenizer = _load_model(config, spec, device, folder)
    if config.strategy == "fsdp":
        shard_fsdp(model, device)
    optimizer = _optimizer(model, config)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * config.max_steps),
                                                config.max_steps)
    step = 0
    if state is not None:
        _load_optimizer(model, optimizer, state["optimizer"], fsdp=config.strategy == "fsdp")
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
    if records is None:
        records = load_training_records(config.data, negatives=config.negatives)
    _check_vocabulary(model, tokenizer, records, config)
    return WorkerSession(config, model, tokenizer, optimizer, scheduler, records, rank, world, device, step)


def _check_vocabulary(model: Any, tokenizer: Any, records: list[Any], config: TrainConfig) -> None:
    """Every text of every record has an embedding for each of its tokens, checked before the first step (a token
    past the backbone's vocabulary failed a step with an IndexError)."""
    from hrsa.extract.corpus import check_texts_vocabulary
    from hrsa.train.pooling import format_query

    texts, names = [], []
    for i, record in enumerate(records):
        own = [format_query(record.query, record.instruction or config.instruction), record.pos, *record.negs]
        texts += own
        names += [f"record {i + 1}"] * len(own)
    check_texts_vocabulary(None, texts, model.backbone.get_input_embeddings().num_embeddings, tokenizer,
                           model=config.backbone, names=names, max_length=config.max_length)


def _load_model(config: TrainConfig, spec: dict[str, Any], device: torch.device,
                folder: Path | None) -> tuple[Any, Any]:
    """The embedder and tokenizer: from the checkpoint ``folder`` when resuming, else from the backbone ``spec``."""
    from hrsa.extract.model_spec import ModelSpec, parse_model_spec
    from hrsa.train.model import load_embedding_model

    model_spec = (parse_model_spec(str(folder), dtype=config.dtype, attention=config.attention) if folder
                  else ModelSpec.from_dict(spec))
    autocast = torch.bfloat16 if device.type == "cuda" else None
    load_device = torch.device("cpu") if config.strategy == "fsdp" else device
    model, tokenizer, _ = load_embedding_model(model_spec, device=load_device, autocast_dtype=autocast,
                                               gradient_checkpointing=config.gradient_checkpointing)
    return model, tokenizer


@contextmanager
def _checkpoint_folder(checkpoint: Any) -> Iterator[Path | None]:
    """The checkpoint to resume from as a local folder, while the model loads: the persisted folder itself on a
    local or shared filesystem, a temporary copy of it from remote storage (s3://...); None for a fresh start."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield Path(folder)


def _load_optimizer(model: Any, optimizer: torch.optim.Optimizer, saved: dict[str, Any], *, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved)


def train_step(s: WorkerSession) -> float:
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
                        gather=s.world > 1, masked=batch.masked)

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


def _full_state(s: WorkerSession) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(backbone weights, optimizer state), whole, on CPU; under FSDP every rank must call this."""
    if s.config.strategy == "ddp":
        return None, s.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights, optim = get_state_dict(s.model, s.optimizer, options=options)
    return {k.removeprefix("backbone."): v for k, v in weights.items()}, optim


def _save_checkpoint(s: WorkerSession, loss: float, spec: dict[str, Any], recipe: str | None) -> None:
    """Every rank reports; rank 0 writes the folder ``output/step_NNNNNN``: in place where the run folder is on a local
    or shared filesystem that this node sees, and Ray Train is told not to upload it (written elsewhere and copied, a
    checkpoint's bytes were written twice: 1.6 GB of SmolLM2-135M's weights and optimizer state, ~5 s a copy on 2
    cores); else into a temporary folder that Ray Train uploads (s3://...)."""
    import ray.train

    weights, optim = _full_state(s)
    name = step_folder_name(s.step)
    metrics = {"step": s.step, "loss": loss}
    if s.rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    storage = ray.train.get_context().get_storage()
    if _writes_in_place(storage):
        folder = Path(storage.experiment_fs_path) / name
        publish_in_place(folder, lambda staging: _write_checkpoint(s, staging, loss, spec, recipe, weights, optim))
        checkpoint = ray.train.Checkpoint(str(folder), filesystem=storage.storage_filesystem)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
        return
    folder = Path(tempfile.mkdtemp(prefix="hrsa-ckpt-")) / name
    try:
        _write_checkpoint(s, folder, loss, spec, recipe, weights, optim)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)), checkpoint_dir_name=name)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


def _writes_in_place(storage: Any) -> bool:
    """Whether rank 0 writes checkpoints straight into the run folder: a local or shared path that this node sees.

    Ray Train's upload checks that the node sees the run folder (the marker its controller wrote there); an in-place
    write skips the upload, so it runs that check itself: a node-local path on a node added after the run started
    (hrsa's own check only sees the nodes there at the start) is Ray's clear error, not checkpoints left on that node.
    """
    import pyarrow.fs

    check = getattr(storage, "_check_validation_file", None)
    if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem) or check is None:
        return False  # remote storage, or a Ray Train without the check: upload, which checks
    check()
    return True


def publish_in_place(folder: Path, write: Callable[[Path], None]) -> None:
    """``write`` a checkpoint into a hidden sibling of ``folder``, then put it in the place of ``folder``: a reader never
    sees a mix of two saves of one step (a run retried by Ray saves a step again), and what a killed save left (a
    hidden sibling, a torn folder) is removed. Between the two renames the step is absent: resuming then takes the
    checkpoint before it."""
    for leftover in folder.parent.glob(f".{folder.name}.*"):  # of a save of this step killed before its renames
        shutil.rmtree(leftover, ignore_errors=True)
    staging, replaced = (folder.parent / f".{folder.name}.{kind}-{uuid.uuid4().hex[:8]}" for kind in ("new", "old"))
    try:
        write(staging)
        if folder.exists():
            folder.rename(replaced)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)


def _write_checkpoint(s: WorkerSession, folder: Path, loss: float, spec: dict[str, Any], recipe: str | None,
                      weights: dict[str, torch.Tensor] | None, optim: dict[str, Any]) -> None:
    """The model folder, the optimizer and schedule, then ``hrsa_train.json`` last: its manifest says when every
    other file is whole (Ray uploads files in any order; a reader may list the folder while it is written)."""
    s.model.save(folder, tokenizer=s.tokenizer, state_dict=weights)
    torch.save({"optimizer": optim, "scheduler": s.scheduler.state_dict(), "step": s.step}, folder / STATE_FILE)
    info = {"step": s.step, "loss": loss, "backbone": spec, "config": s.config.model_dump(mode="json"),
            "recipe": recipe, "world_size": s.world, "attention": s.config.attention, "files": file_manifest(folder)}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2))


def train_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train loop run by every worker."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if loop_config["threads"]:
        torch.set_num_threads(loop_config["threads"])
    device = ray.train.torch.get_device()
    run = loop_config["run"]
    # Rank 0 picks the checkpoint and tells the others: ranks listing the run apart could see different latest ones.
    name = resume_folder(run) if rank == 0 else None
    if world > 1:
        from ray.train.collective import broadcast_from_rank_zero

        name = broadcast_from_rank_zero(name)
    s = setup_session(config, loop_config["spec"], rank, world, device, resume_point(run, name),
                      records=ray.get(loop_config["records"]))
    queue = loop_config["queue"] if rank == 0 else None
    if queue is not None:
        queue.put({"started": s.step})  # each start: a restarted group tells the driver where it resumed
    stop = min(config.max_steps, loop_config["stop_after"] or config.max_steps)
    saved, loss = s.step, math.nan  # where it resumed from is saved; a fresh start has nothing to save
    while s.step < stop:
        # Asked before each step, so a stop during set-up or a save costs no further step and no second save.
        if asked := stop_requested(s, loop_config["stop_request"]):
            if s.step > saved and asked == STOP_AND_SAVE:  # not into a folder another training holds now
                _save_checkpoint(s, loss, loop_config["spec"], loop_config.get("recipe"))
            if queue is not None:
                queue.put({"halted": s.step})  # the driver reports a stop only when the workers did stop
            return
        loss = train_step(s)
        if queue is not None:
            queue.put({"step": s.step, "loss": loss})
        if s.step % config.save_every == 0 or s.step == stop:
            _save_checkpoint(s, loss, loop_config["spec"], loop_config.get("recipe"))
            saved = s.step


STOP_AND_SAVE, STOP_NOW = 1, 2  # what the driver asks (0: nothing): Ctrl-C saves the last step; a lost lease does not


def stop_requested(s: WorkerSession, stop_request: Any) -> int:
    """What the driver asked of the workers: 0 go on, STOP_AND_SAVE (Ctrl-C), STOP_NOW (the run folder's lease was
    taken over: nothing more goes into it). Rank 0 reads the flag and every rank gets its answer, so all stop at the
    same step (a rank that went on alone would wait forever in the next all-reduce)."""
    import ray
    import torch.distributed as dist

    requested = int(ray.get(stop_request.get.remote())) if s.rank == 0 else 0
    if s.world == 1:
        return requested
    flag = torch.tensor([float(requested)], device=s.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())
