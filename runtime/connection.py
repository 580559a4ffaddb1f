"""Connecting to Ray: an embedded local instance by default, a cluster when an address is given.

``RAY_ADDRESS`` or an explicit address connects to a running cluster; otherwise hrsa starts a local
Ray in this process (about 5 s here) with the dashboard off, and reuses it for the rest of the process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from hrsa.store.errors import UserError

__all__ = ["NodeResources", "RayConnection", "connect", "RayConnectionError"]


class RayConnectionError(UserError, ConnectionError):
    """No Ray cluster answers at the address given."""


@dataclass(frozen=True)
class NodeResources:
    """One alive node: its Ray id, address, and the CPUs and GPUs it has (in total, busy or not)."""

    node_id: str
    address: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class RayConnection:
    address: str  # "local" for the embedded instance
    n_cpus: float
    n_gpus: float
    n_nodes: int
    nodes: tuple[NodeResources, ...] = ()  # a task's CPUs must fit one node: the totals above do not say where


def connect(address: str | None = None, *, num_cpus: int | None = None) -> RayConnection:
    """Connect once per process; later calls return the live connection's facts.

    Args:
        address: a Ray address ("ray://host:10001", "host:6379", "auto"); None reads ``RAY_ADDRESS``,
            and with neither, starts an embedded local Ray.
        num_cpus: CPUs for an embedded instance (default: all).
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
            else:
                # "local", not None: Ray's None joins the cluster the machine's last `ray start` recorded (a dead
                # one, when its head was killed without `ray stop`), and the embedded instance is what hrsa promises.
                # Ray's own start-up lines (an INFO, a token WARNING) came before hrsa's output, and before its one-line
                # errors; its errors still show.
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR)
        except (ConnectionError, TimeoutError, ValueError) as error:
            raise RayConnectionError(
                f"Expected a Ray cluster at {address}. Got {type(error).__name__}: {error} instead. "
                "Check the address (RAY_ADDRESS or --address), or drop it to run on an embedded local Ray."
            ) from error
    resources = ray.cluster_resources()
    nodes = tuple(NodeResources(n["NodeID"], n.get("NodeManagerAddress", "?"), float(n["Resources"].get("CPU", 0)),
                                float(n["Resources"].get("GPU", 0))) for n in ray.nodes() if n.get("Alive"))
    return RayConnection(address or "local", float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), len(nodes),
                         nodes)
