"""The embedder being trained: a backbone, mean pooling over non-padding tokens, L2 normalisation.

:func:`load_embedding_model` loads any backbone ``hrsa extract`` can (hub id, local folder, .gguf file,
packaged model) through :func:`hrsa.extract.models.load_model`, which also sets and verifies the
attention mode: decoders train bidirectionally by default (``config.is_causal = False``), and that flag
is saved with every checkpoint, so ``hrsa extract --model <checkpoint>`` runs it bidirectionally too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hrsa.store.errors import UserError
from hrsa.train.pooling import mean_pool

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from hrsa.extract.model_spec import ModelSpec

__all__ = ["EmbeddingModel", "TokenBatch", "load_embedding_model", "tokenize"]


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded token ids and mask, both (B, T)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, start: int, stop: int) -> TokenBatch:
        """Rows [start, stop), cut to their own longest sequence (less padding per chunk)."""
        mask = self.attention_mask[start:stop]
        width = max(1, int(mask.sum(dim=1).max()))
        return TokenBatch(self.input_ids[start:stop, :width], mask[:, :width])

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device))


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str] | tuple[str, ...], *, max_length: int) -> TokenBatch:
    """Tokenise ``texts`` right-padded (mean pooling masks padding; right padding keeps positions 0..T-1)."""
    tokenizer.padding_side = "right"
    out = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return TokenBatch(out["input_ids"], out["attention_mask"])


class EmbeddingModel(nn.Module):
    """A backbone turned text embedder: (B, T) token ids -> (B, D) unit-norm float32 embeddings.

    Args:
        backbone: a base transformer (``AutoModel``) returning ``last_hidden_state``.
        autocast_dtype: run the backbone under autocast to this dtype (bf16 on GPU); None: as is.
    """

    def __init__(self, backbone: nn.Module, *, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.autocast_dtype = autocast_dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled, L2-normalised last hidden states (B, D), in float32."""
        device_type = input_ids.device.type
        ctx = (torch.autocast(device_type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        return nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)  # (B, D)

    def embed(self, batch: TokenBatch) -> torch.Tensor:
        return self(batch.input_ids, batch.attention_mask)

    def save(self, folder: Path, *, tokenizer: PreTrainedTokenizerBase | None = None,
             state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write a Hugging Face model folder (config with the attention mode, weights, tokenizer).

        ``state_dict`` overrides the backbone's own (a full state dict gathered from FSDP shards).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return folder


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Batches need a pad token; reuse EOS (padding is masked out of attention and pooling anyway)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise UserError(f"Expected a tokenizer with a pad or EOS token. Got {name}'s without either. "
                            "Use a backbone whose tokenizer defines one.")
        tokenizer.pad_token = tokenizer.eos_token


def load_embedding_model(spec: ModelSpec, *, device: torch.device | str, gradient_checkpointing: bool = False,
                         autocast_dtype: torch.dtype | None = None) -> tuple[EmbeddingModel, Any, Any]:
    """Load ``spec``'s backbone (attention set and verified) in training mode.

    Returns:
        (model, tokenizer, loaded), ``loaded`` being the :class:`~hrsa.extract.models.LoadedModel`.
    """
    from hrsa.extract.models import load_model

    loaded = load_model(spec, device=device)
    backbone = loaded.model
    if gradient_checkpointing:
        # Non-reentrant: works under no_grad passes (GradCache) and with FSDP; transformers >= 5.x renamed it.
        kwargs = {"use_reentrant": False}
        if hasattr(backbone, "activation_checkpointing_enable"):
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    _ensure_pad_token(loaded.tokenizer, spec.name)
    model = EmbeddingModel(backbone, autocast_dtype=autocast_dtype)
    model.train()
    return model, loaded.tokenizer, loaded
