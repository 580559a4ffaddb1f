"""The two-node local Ray cluster of (f), as a context manager (hrsa.cluster.local_cluster starts and stops it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hrsa.cluster.local_cluster import ray_node_env, start_ray_cluster


@contextmanager
def two_node_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """``(address, env)``: the GCS address, and the environment its drivers need."""
    env = ray_node_env()
    cluster = start_ray_cluster(env)
    try:
        yield cluster.address, env
    finally:
        cluster.stop()
