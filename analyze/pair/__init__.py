"""Compare two models of a store: :func:`analyze_pair` (the Python API behind ``hrsa analyze``) and its
:class:`PairResults`.

A recipe in four phases, one module each:

1. :mod:`.resolve` (with :mod:`.checks`): check the pair (both complete, same corpus, shared hidden states,
   sizes the metrics need), resolve the token selection, cut it into blocks, and plan tiles under the memory
   budget (a :class:`~hrsa.analyze.pair.resolve.ResolvedPair`);
2. :mod:`.passes`: one streaming pass per tile (:mod:`hrsa.analyze.streaming.stream`), each tile finished into
   small results right away so that its D x D accumulators are freed before the next pass;
3. the local metrics (k-NN overlap: :mod:`hrsa.analyze.local.knn`; probes: :mod:`hrsa.analyze.local.probe`) on the
   same checked pair, on their own reads of the store;
4. :mod:`.assembly`: per-layer results and cross-layer matrices into a frozen :class:`PairResults`.

:mod:`.analysis` holds the recipe itself. Its ``selection`` argument is a
:class:`hrsa.store.selection.TokenSelection`.
"""

from __future__ import annotations

from hrsa.analyze.pair.analysis import analyze_pair
from hrsa.analyze.pair.pair_results import PairResults

__all__ = ["PairResults", "analyze_pair"]
