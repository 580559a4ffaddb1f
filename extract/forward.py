"""Batched forward passes: documents packed under a token budget, padding stripped from the output.

Documents are sorted by length so that a batch holds documents of similar length (little padding),
padded on the right, and run with an attention mask. Right padding leaves every real token's
position ids and (causal or bidirectional) attention exactly as in a lone forward pass; what can
differ is the floating-point order inside batched kernels, a few ulps of the model's dtype (see the fidelity tests):
~1e-6 relative in float32, but ~1e-2 in bfloat16, whose ulp is 2^-7 of a value.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from hrsa.extract.models import LoadedModel

__all__ = ["plan_batches", "batched_hidden_states", "torch_threads"]


def plan_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group document indices so each batch's padded size (count x longest) fits ``token_budget``.

    A document longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(i)  # sorted descending: the batch's first document is its longest
        else:
            batches.append([i])
    return batches


def _pad(docs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    longest = max(len(d) for d in docs)
    ids = torch.full((len(docs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), longest), dtype=torch.long)
    for row, doc in enumerate(docs):
        ids[row, : len(doc)] = torch.as_tensor(doc, dtype=torch.long)
        mask[row, : len(doc)] = 1
    return ids.to(device), mask.to(device)


def batched_hidden_states(
    loaded: LoadedModel, docs: Sequence[Sequence[int]], layers: Sequence[int], *, token_budget: int = 8192,
    on_host: bool = True,
) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
    """Yield ``(doc index, {layer: (T, D) tensor on CPU})`` for every document, in batch order.

    Args:
        loaded: the model.
        docs: token ids of each document (non-empty).
        layers: hidden-state indices to keep (others are dropped on the device).
        token_budget: at most this many padded tokens per forward pass.
        on_host: False: the rows stay on the model's device, views of the batch's states valid until the next
            document is asked for (a worker copies them straight into its unit's host buffers: one copy, not two).
    """
    import torch

    pad_id = loaded.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    with torch.inference_mode():
        for batch in plan_batches([len(d) for d in docs], token_budget):
            ids, mask = _pad([docs[i] for i in batch], pad_id, loaded.device)  # (B, T)
            states = loaded.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            kept = {k: states[k].to("cpu") if on_host else states[k] for k in layers}  # L+1 x (B, T, D)
            for row, i in enumerate(batch):
                n = len(docs[i])
                yield i, {k: kept[k][row, :n] for k in layers}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads inside the block: CPU results depend on it by ~1 ulp, so a
    reference pass meant to match a worker bit for bit must use the worker's thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
