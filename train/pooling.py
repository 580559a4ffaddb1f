"""What turns a backbone into a text embedder: query formatting and mean pooling.

Shared by training (:mod:`hrsa.train.trainer`), mining and evaluation, so a checkpoint embeds text the
same way everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["format_query", "mean_pool"]


def format_query(query: str, instruction: str | None) -> str:
    """The paper's query format: ``"Instruct: {instruction}\\nQuery: {query}"``; the bare query without one."""
    return f"Instruct: {instruction}\nQuery: {query}" if instruction else query


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, D) over the tokens where ``attention_mask`` (B, T) is 1: padding never counts.

    Sums in float32 so bf16 hidden states do not lose the mean to rounding.
    """
    mask = attention_mask.unsqueeze(-1).float()
    summed = (hidden.float() * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp_min(1.0)
