"""Mergeable float64 statistics of token streams (pure numpy; no Dask, Zarr, Ray or torch).

- ``moments``: :class:`Moments`, everything the matched-layer metrics need of a pair of hidden states.
- ``cross_moments``: :class:`CrossMoments`, the slimmer cross co-moments of the cross-layer matrices.
- ``centring``: centring a chunk on its own mean and refusing NaN/inf, the first step of every accumulator
  and backend.
- ``_chan``: the one pairwise combine of Chan et al. that every ``merge`` calls.
- ``testing``: ``AccumulatorTests``, the conformance suite every accumulator passes (test-only; hypothesis).
"""
