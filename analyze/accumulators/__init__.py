"""Mergeable float64 statistics of token streams (pure numpy): :class:`Moments` for a matched pair of hidden
states and :class:`CrossMoments` for cross-layer pairs. Both merge with one Chan combine, so Dask tree-reduces
them and a cluster can split the tokens; ``hrsa.analyze.accumulators.testing`` is the conformance suite every
accumulator passes."""
