"""Extraction workers kept from one extraction to the next: :class:`ExtractionWorkers`.

A worker process costs seconds to start before it computes anything (on CPU here: ~5 s to import torch and
transformers, ~7 s in all with Ray's start), more than a small extraction's work. A pipeline extracts many models
in a row with the same workers' shape, so it holds one :class:`ExtractionWorkers` over its extraction stage and
hands it to each :func:`~hrsa.extract.job.run_extraction`: the workers (and the CPUs/GPUs reserved for them) stay,
and each extraction loads its own model into them.

Why this is safe: every call the coordinator makes names the model's spec, and a worker loads that model when it
holds another (:class:`~hrsa.extract.worker.ExtractionWorker`); a worker Ray restarts starts with no model.
An extraction that fails closes the workers, so the next one starts afresh.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["ExtractionWorkers"]


class ExtractionWorkers:
    """The workers of consecutive extractions: started for the first, kept while the next ones ask for the same
    shape (workers, resources, threads, store, token budget), started anew when one asks for another.

    Use it as a context manager: leaving it ends the workers and frees their reserved resources.
    """

    def __init__(self) -> None:
        self._shape: Hashable | None = None
        self._group: Any = None
        self._actors: list[Any] = []

    def take(self, shape: Hashable, start: Callable[[], tuple[Any, list[Any]]]) -> list[Any]:
        """The actors for ``shape``: those held when they have it, else ``start()``'s (placement group, actors)
        after the ones held are ended (their resources must be free before others are reserved)."""
        if shape != self._shape or not self._actors:
            self.close()
            self._group, self._actors = start()
            self._shape = shape
        return self._actors

    @property
    def actors(self) -> list[Any]:
        """The actors held now (empty when none)."""
        return list(self._actors)

    def close(self) -> None:
        """End the actors held and remove their placement group (a no-op when none are held)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        actors, group = self._actors, self._group
        self._shape, self._group, self._actors = None, None, []
        for actor in actors:
            ray.kill(actor)
        if group is not None:
            remove_placement_group(group)

    def __enter__(self) -> ExtractionWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
