"""Streaming the store through the accumulators: where products run (:mod:`.backends`), how the hidden-state
pairs are tiled under a memory budget (:mod:`.plan`), and one pass of Dask tasks per tile (:mod:`.stream`)."""
