"""One contrastive step's forward and backward, plain or chunked (GradCache, Gao et al. 2021).

The contrastive loss couples every query with every document, so a big batch cannot simply be split
into micro-batches with summed gradients. GradCache splits it exactly:

1. forward every chunk of queries and documents without a graph, keeping only the embeddings
   (and the RNG state before each chunk, so dropout can be replayed);
2. compute the loss on those embeddings as leaves, backward to get d loss / d embedding;
3. forward each chunk again, with a graph and the same RNG state, and backpropagate the cached
   embedding gradient through it: ``emb.backward(grad)``.

Step 3 sums, chunk by chunk, exactly the terms of the plain backward, so the gradients are the same
(up to float rounding) while memory holds one chunk's activations at a time. The cost is a second
forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from hrsa.train.model import EmbeddingModel, TokenBatch

__all__ = ["contrastive_backward"]

LossFn = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _set_grad_sync(model: Any, enabled: bool) -> None:
    """FSDP2 modules reduce-scatter gradients in every backward; only the last chunk's needs to."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def contrastive_backward(model: EmbeddingModel, inputs: Sequence[TokenBatch], loss_fn: LossFn, *,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Embed each of ``inputs`` (e.g. queries, documents), compute ``loss_fn`` on the embeddings and backward.

    Gradients accumulate into the model's ``.grad`` (not averaged over workers: see the trainer).

    Args:
        model: the embedder, on the device the batches will be moved to.
        inputs: token batches, embedded in this order.
        loss_fn: maps the list of embeddings (one (n_i, D) tensor per input) to a scalar.
        chunk_size: sequences per forward pass; None embeds each input in one pass (plain backward).

    Returns:
        The loss, detached.
    """
    device = next(model.parameters()).device
    if chunk_size is None:
        loss = loss_fn([model.embed(batch.to(device)) for batch in inputs])
        loss.backward()
        return loss.detach()
    # Step 1: embeddings without a graph, remembering the RNG state before each chunk.
    chunks = [[batch.rows(i, i + chunk_size) for i in range(0, len(batch), chunk_size)] for batch in inputs]
    states: list[list[Any]] = []
    cached: list[torch.Tensor] = []
    with torch.no_grad():
        for group in chunks:
            states.append([])
            parts = []
            for chunk in group:
                states[-1].append(_rng_state(device))
                parts.append(model.embed(chunk.to(device)))
            cached.append(torch.cat(parts).detach().requires_grad_())  # (n_i, D)
    # Step 2: the loss on the embeddings as leaves: d loss / d embedding.
    loss = loss_fn(cached)
    loss.backward()
    # Step 3: forward each chunk again with the same RNG, backpropagate its slice of the cached gradient.
    last = (len(chunks) - 1, len(chunks[-1]) - 1)
    for g, group in enumerate(chunks):
        grads = torch.split(cached[g].grad, [len(c) for c in group])
        for c, chunk in enumerate(group):
            _set_rng_state(states[g][c], device)
            _set_grad_sync(model, (g, c) == last)
            model.embed(chunk.to(device)).backward(grads[c])
    return loss.detach()
