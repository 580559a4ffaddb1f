"""``TrainConfig``: the settings of ``hrsa train``, equal to its flags and to its YAML file.

Precedence: a flag given on the command line > the YAML file (``--config``) > the defaults here. Every
field is a flag of the same name (``batch_size`` is ``--batch-size``). Example YAML::

    # hrsa train --config configs/examples/train.yaml
    backbone: packaged:smollm2-135m-instruct
    data: data/train.jsonl        # one {"query", "pos", "negs": [...], "instruction"?} per line
    output: runs/smollm2-embed    # checkpoints land in runs/smollm2-embed/step_000100 ... (or s3://bucket/runs/a)
    batch_size: 64                # queries per optimizer step, over all workers
    negatives: 1                  # hard negatives per query
    max_steps: 1000
    save_every: 100
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from hrsa.extract.model_spec import AttentionMode
from hrsa.runtime.settings import SETTING_NAMES, FolderLocation, SettingNames, flag_name, load_settings
from hrsa.store.errors import UserError

# SETTING_NAMES, SettingNames and flag_name live in hrsa.runtime.settings (analyze's messages name settings too);
# they stay importable from here.
__all__ = ["SCHEDULING_FIELDS", "SETTING_NAMES", "SettingNames", "Strategy", "TrainConfig", "TrainConfigError",
           "WeightDType", "flag_name", "load_train_config"]

# The dtype the weights are trained in: a vocabulary of its own, not extraction's DTypeName (a compute dtype
# with "auto" and float16); on GPU the forward runs under bf16 autocast either way.
WeightDType = Literal["float32", "bfloat16"]
Strategy = Literal["ddp", "fsdp"]
# Settings that say where and how the work runs, not what the weights become: N workers with B/N queries each,
# the chunked backward, gradient checkpointing and FSDP all give the gradients of one process holding the whole
# batch (tested) for a backbone without dropout; with dropout the masks depend on the workers and chunks, and the
# recipe takes those two back (hrsa.train.recipe). Every other field is part of a run's recipe, so a new field counts
# by default.
SCHEDULING_FIELDS = frozenset({"output", "workers", "use_gpu", "save_every", "chunk_size", "gradient_checkpointing",
                               "strategy", "address", "max_failures"})


class TrainConfigError(UserError, ValueError):
    """Training settings that do not validate; the message lists every problem at once."""


class TrainConfig(BaseModel):
    """Validated settings of one ``hrsa train`` run; each field is also a CLI flag."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backbone: str = Field(description="The model to train: a local folder, a .gguf file, packaged:<name> or org/name.")
    data: Path = Field(description="A .jsonl file with one {query, pos, negs: [...], instruction?} record per line.")
    output: FolderLocation = Field(description="The run folder, a path every node reaches or a URL "
                                   "(s3://bucket/runs/a): checkpoints go to OUTPUT/step_000100...; re-running resumes.")
    workers: int = Field(1, ge=1, description="Training workers (one per GPU, or CPU processes).")
    use_gpu: bool | None = Field(None, description="Train on GPUs (default: when the Ray cluster has enough).")
    batch_size: int = Field(32, ge=1, description="Queries per optimizer step over all workers (the global batch).")
    negatives: int = Field(1, ge=0, description="Hard negatives per query, sampled from each record's negs.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps in the whole run (the schedule's length).")
    save_every: int = Field(100, ge=1, description="Write a checkpoint every N steps (and at the end).")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of max_steps spent warming up (then cosine).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (none: no clipping).")
    temperature: float = Field(0.02, gt=0, description="InfoNCE temperature (0.02 is a logit scale of 50).")
    instruction: str | None = Field(None, description="Query instruction for records without their own.")
    max_length: int = Field(512, ge=2, description="Cut queries and documents to this many tokens.")
    chunk_size: int | None = Field(None, ge=1, description="Sequences per forward in the chunked (GradCache) "
                                   "backward; exact same gradients in bounded memory (none: plain backward).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    seed: int = Field(0, description="Seeds the data order, negative sampling and dropout (resume is exact).")
    attention: AttentionMode = Field(
        "bidirectional", description="bidirectional (default, also for decoders), causal, or auto (the model's own).")
    dtype: WeightDType = Field("float32", description="Weight dtype; on GPU the forward runs "
                                                  "under bf16 autocast either way.")
    strategy: Strategy = Field("ddp", description="ddp: a full copy per worker; fsdp: weights, "
                                             "gradients and optimizer state sharded over the workers.")
    address: str | None = Field(None, description="Ray address (default RAY_ADDRESS, else an embedded local Ray).")
    max_failures: int = Field(0, ge=0, description="Times Ray Train restarts the workers after one fails (a lost node, "
                              "a killed process); they resume from the latest complete checkpoint. Preempted nodes "
                              "are retried apart from these.")

    @model_validator(mode="after")
    def _batch_splits_over_workers(self, info: ValidationInfo) -> TrainConfig:
        if self.batch_size % self.workers:
            name: SettingNames = (info.context or {}).get(SETTING_NAMES, flag_name)
            raise ValueError(f"expected {name('batch_size')} divisible by {name('workers')} (each worker takes an "
                             f"equal share), got {self.batch_size} queries over {self.workers} workers")
        return self

    def recipe_settings(self) -> dict[str, Any]:
        """The settings that change the weights (all but :data:`SCHEDULING_FIELDS`; backbone and data are
        identified by their content in the recipe, not by their paths here)."""
        return self.model_dump(mode="json", exclude={*SCHEDULING_FIELDS, "backbone", "data"})

    @property
    def local_batch_size(self) -> int:
        """Queries per worker and step."""
        return self.batch_size // self.workers


def load_train_config(path: Path | None, flags: Mapping[str, Any]) -> TrainConfig:
    """Merge the YAML file at ``path`` (if any) with the flags that were given (not None) and validate.

    Raises:
        TrainConfigError: an unreadable file, or every problem of the merged settings at once, in one line.
    """
    return load_settings(TrainConfig, path, flags, verb="train", error=TrainConfigError)
