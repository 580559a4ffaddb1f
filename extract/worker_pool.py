"""Extraction workers kept from one extraction to the next: :class:`ExtractionWorkers`.

A worker process costs seconds to start before it computes anything (on CPU here: ~5 s to import torch and
transformers, ~7 s in all with Ray's start), more than a small extraction's work. A pipeline extracts many models
in a row with the same workers' shape, so it holds one :class:`ExtractionWorkers` over its extraction stage and
hands it to each :func:`~hrsa.extract.job.run_extraction`: the workers (and the CPUs/GPUs reserved for them) stay,
and each extraction loads its own model into them.

Why this is safe: every call the coordinator makes names the model's spec, and a worker loads that model when it
holds another (:class:`~hrsa.extract.worker.ExtractionWorker`); a worker Ray restarts starts with no model.
An extraction that fails closes the workers, and kept workers that were restarted or do not answer are replaced,
so every extraction starts with workers that have their whole restart budget.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["ALIVE_TIMEOUT_S", "ExtractionWorkers"]

ALIVE_TIMEOUT_S = 30.0  # a kept worker that does not answer in this time is replaced (a cold start takes ~7 s)


class ExtractionWorkers:
    """The workers of consecutive extractions: started for the first, kept while the next ones ask for the same
    shape (workers, resources, threads, store), started anew when one asks for another.

    Use it as a context manager: leaving it ends the workers and frees their reserved resources. One coordinator
    at a time: two extractions at once through one set of workers would load their models in turn under each other.
    """

    def __init__(self) -> None:
        self._shape: Hashable | None = None
        self._group: Any = None
        self._actors: list[Any] = []
        self._pids: list[int] | None = None  # the actors' processes as they started

    def take(self, shape: Hashable, start: Callable[[], tuple[Any, list[Any], list[int]]]) -> list[Any]:
        """The actors for ``shape``: those held when they have it and are as they started, else ``start()``'s
        (placement group, actors, their process ids once started) after the ones held are ended (their resources
        must be free before others are reserved)."""
        if shape != self._shape or not self._as_started():
            self.close()
            self._group, self._actors, self._pids = start()
            self._shape = shape
        return self._actors

    def _as_started(self) -> bool:
        """Whether the actors held answer within ALIVE_TIMEOUT_S from the processes they answered from before.

        Ray's ``max_restarts`` counts over an actor's life: a kept worker Ray restarted (or one dead for good, or
        one waiting for a lost node's room) is replaced, so each extraction has its full restart budget and a
        bounded wait for room.
        """
        import ray

        if not self._actors:
            return False
        try:
            pids = ray.get([actor.pid.remote() for actor in self._actors], timeout=ALIVE_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False
        return pids == self._pids

    @property
    def actors(self) -> list[Any]:
        """The actors held now (empty when none)."""
        return list(self._actors)

    def close(self) -> None:
        """End the actors held and remove their placement group (a no-op when none are held)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        actors, group = self._actors, self._group
        self._shape, self._group, self._actors, self._pids = None, None, [], None
        for actor in actors:
            ray.kill(actor)
        if group is not None:
            remove_placement_group(group)

    def __enter__(self) -> ExtractionWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
