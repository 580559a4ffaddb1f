"""Per-group statistics: one :class:`Moments` per group of documents, for intervals from the one pass.

A score's uncertainty comes from how much it moves when whole documents go in or out (tokens of one document
are far from independent: they share a topic, a prompt, a position in a chat). The selected tokens are cut
into ``G`` groups of whole, consecutive documents with about equal token counts (:func:`document_groups`);
a streaming pass keeps one accumulator per group (:class:`GroupedMoments`, mergeable like ``Moments`` itself,
so segments and Dask's tree merge it unchanged), and the finish turns it into

- the total (the merge of every group: the point estimate is the same number as without groups), and
- the G leave-one-group-out statistics, each ``total.without(group)`` in O(D^2)
  (:meth:`GroupedMoments.leave_one_out`),

from which :func:`hrsa.analyze.metrics.uncertainty.jackknife_interval` makes the delete-a-group jackknife
interval of any score. Memory: G accumulators per pair instead of one (the planner counts them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hrsa.analyze.accumulators.moments import Moments

__all__ = ["SUBTRACT_MIN_SHARE", "GroupedMoments", "document_groups"]

SUBTRACT_MIN_SHARE = 64  # a rest of fewer than 1/64 of the tokens is merged, not subtracted (its error: 64 eps)


@dataclass(frozen=True, eq=False)
class GroupedMoments:
    """Moments of a pair of hidden states, kept per group of documents.

    Attributes:
        parts: ``{group: Moments}`` of the groups seen so far (a segment sees a few; the merged pass all).
    """

    parts: dict[int, Moments]

    def merge(self, other: GroupedMoments) -> GroupedMoments:
        """Group by group (pure; associative; groups held by only one side are kept as they are)."""
        parts = dict(self.parts)
        for g, m in other.parts.items():
            parts[g] = parts[g].merge(m) if g in parts else m
        return GroupedMoments(parts)

    @property
    def n(self) -> int:
        return sum(m.n for m in self.parts.values())

    def total(self) -> Moments:
        """The statistics of every token: the groups merged in group order."""
        groups = sorted(self.parts)
        total = self.parts[groups[0]]
        for g in groups[1:]:
            total = total.merge(self.parts[g])
        return total

    def leave_one_out(self, total: Moments) -> Iterator[tuple[int, Moments]]:
        """``(group, statistics of every token outside it)`` for each group that leaves some tokens behind.

        Subtracting a group from the total costs one O(D^2) step but leaves the total's rounding (~eps times its
        co-moments) in what remains: negligible while the rest holds a fair share of the tokens, everything when it
        holds a few (two equal tokens then show a spread, and CKA 1.4). Where the rest is under
        1/:data:`SUBTRACT_MIN_SHARE` of the tokens (at most one group can leave so few), it is merged from the other
        groups instead."""
        for g in sorted(self.parts):
            rest = total.n - self.parts[g].n
            if not 0 < self.parts[g].n < total.n:
                continue
            if rest * SUBTRACT_MIN_SHARE >= total.n:
                yield g, total.without(self.parts[g])
            else:
                others = [self.parts[h] for h in sorted(self.parts) if h != g]
                merged = others[0]
                for part in others[1:]:
                    merged = merged.merge(part)
                yield g, merged


def document_groups(doc_tokens: np.ndarray, n_groups: int) -> np.ndarray:
    """The group of each document: ``n_groups`` runs of consecutive documents with about equal token counts.

    Args:
        doc_tokens: (n_docs,) selected tokens of each document, in the order the pass reads them.
        n_groups: groups wanted; fewer when there are fewer documents (one document per group then), or when a
            long document outweighs a whole group's share.

    Returns:
        (n_docs,) int32 group ids, non-decreasing from 0, no id skipped.

    Example:
        >>> document_groups(np.array([3, 1, 2, 2]), 2).tolist()
        [0, 0, 1, 1]
    """
    doc_tokens = np.asarray(doc_tokens, dtype=np.int64)
    if doc_tokens.size == 0:
        return np.zeros(0, dtype=np.int32)
    before = np.cumsum(doc_tokens) - doc_tokens  # tokens ahead of each document
    # A document goes to the part (of n_groups equal parts of the tokens) that holds its middle token, so a long
    # document does not drag the short ones before it into its group; ranking the labels numbers the groups
    # 0..G'-1 with no gaps.
    total = int(before[-1] + doc_tokens[-1])
    label = (2 * before + doc_tokens) * max(1, n_groups) // max(1, 2 * total)
    _, group = np.unique(label, return_inverse=True)
    return group.astype(np.int32)
