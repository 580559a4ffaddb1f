"""``EncoderOptions``: how an embedding model loads and runs, the settings ``hrsa mine-negatives`` and
``hrsa eval`` share (each field is a flag of both: ``--device``, ``--dtype``, ``--attention``, ``--batch-size``,
``--max-length``), declared here once.

The defaults are :class:`~hrsa.train.encode.TextEncoder`'s. A verb with other defaults re-declares the field with
the same annotated type, which carries the check and the help (``batch_size: BatchSize = 64``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from hrsa.extract.model_spec import AttentionMode, DTypeName

__all__ = ["BatchSize", "EncoderOptions", "MaxLength"]

BatchSize = Annotated[int, Field(ge=1, description="Texts per forward pass.")]
MaxLength = Annotated[int, Field(ge=1, description="Cut texts to this many tokens.")]


class EncoderOptions(BaseModel):
    """How the embedding model loads (device, dtype, attention) and runs (texts per pass, tokens per text)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: BatchSize = 32
    max_length: MaxLength = 512
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ... (default: CUDA when available).")
    dtype: DTypeName = Field("auto", description="Compute dtype; auto = bfloat16 on GPU, float32 on CPU.")
    attention: AttentionMode = Field("auto", description="Attention mode; auto = what the model or checkpoint says.")
