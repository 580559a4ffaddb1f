"""InfoNCE with in-batch and hard negatives, optionally over the documents of every worker.

Each query's documents come as a group ``[pos, neg_1, ..., neg_k]`` (``group_size = k + 1``), so the
positive of local query ``i`` is document ``i * group_size``. With ``gather``, the documents of all
``W`` workers are gathered (with gradients: :func:`torch.distributed.nn.functional.all_gather`) in rank
order, and the positive of query ``i`` on rank ``r`` is global document ``(r * b + i) * group_size``.
Every other document, local or not, is a negative of every query, but those ``masked``: another positive of the
query's text (the same pair twice in the training file, or a query with several positives in one batch), which
scored as a wrong answer kept even a perfect model's loss at log 2.

The loss is the mean over the *local* queries. Across ranks, the gather's backward sums every rank's
loss into each rank's document gradients, so averaging parameter gradients over ranks (as the trainer
does) gives exactly the gradient of the mean over the global batch: 2 workers x B/2 == 1 process x B.
Queries need no gathering: a query is only scored against documents.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

__all__ = ["gather_with_grad", "info_nce"]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(``x`` of every rank concatenated in rank order, this rank); gradients flow back to each rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), dist.get_rank()


def info_nce(q: torch.Tensor, d: torch.Tensor, *, temperature: float, group_size: int, gather: bool,
             masked: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
    """Mean InfoNCE loss of the local queries against all (local or gathered) documents.

    Args:
        q: (b, D) query embeddings (unit norm).
        d: (b * group_size, D) document embeddings, grouped per query as [pos, neg_1..neg_k].
        temperature: scores are cosine / temperature.
        group_size: documents per query, k + 1.
        gather: score against the documents of every rank (a no-op without torch.distributed).
        masked: (local query, global document) pairs left out of the query's softmax: documents that are positives
            of the query's text too (:attr:`hrsa.train.data.Batch.masked`). Never a query's own positive.

    Returns:
        The scalar loss, ``-mean_i log softmax(q_i . d / temperature)[pos_i]``.

    Example:
        >>> q = torch.eye(2); d = torch.eye(2)
        >>> round(float(info_nce(q, d, temperature=1.0, group_size=1, gather=False)), 4)
        0.3133
    """
    b = q.shape[0]
    if d.shape[0] != b * group_size:
        raise ValueError(f"Expected {b} x {group_size} documents. Got {d.shape[0]} instead.")
    docs, rank = gather_with_grad(d) if gather else (d, 0)  # (W * b * g, D)
    scores = q.float() @ docs.float().T / temperature  # (b, W * b * g)
    labels = rank * b * group_size + torch.arange(b, device=q.device) * group_size
    if masked:
        rows, cols = (torch.tensor(index, device=q.device) for index in zip(*masked))
        scores = scores.index_put((rows, cols), torch.tensor(float("-inf"), device=q.device))
    return F.cross_entropy(scores, labels)
