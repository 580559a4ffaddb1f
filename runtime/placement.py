"""How many CPUs each of several workers can take when every worker must fit on one node: the arithmetic shared by
extraction and training workers (Ray places a task's or actor's resources on one node, and waits without end for
resources no node holds, expecting an autoscaler to add such a node).
"""

from __future__ import annotations

from collections.abc import Sequence

from hrsa.store.errors import UserError

__all__ = ["PlacementError", "cpus_per_worker", "describe_nodes"]


class PlacementError(UserError, ValueError):
    """Work the cluster cannot run: workers no node can hold, or a folder some node does not reach."""


def cpus_per_worker(node_cpus: Sequence[float], workers: int) -> int:
    """The most whole CPUs each of ``workers`` workers can take, every worker on one node: the largest k with
    sum over nodes of floor(cpus / k) >= workers.

    Raises:
        PlacementError: the nodes cannot hold ``workers`` workers of one CPU.

    Example:
        >>> cpus_per_worker([8, 2], 2), cpus_per_worker([8, 2], 3), cpus_per_worker([16], 3)
        (4, 2, 5)
    """
    fits = [k for k in range(1, int(max(node_cpus, default=0)) + 1) if sum(int(c // k) for c in node_cpus) >= workers]
    if not fits:
        most = sum(int(c) for c in node_cpus)
        raise PlacementError(f"Expected --workers the Ray cluster can place, one CPU each at least: at most {most} "
                             f"({describe_nodes(node_cpus, 'CPUs')}). Got {workers} instead. Pass --workers "
                             f"{max(most, 1)} or fewer, or add nodes.")
    return max(fits)


def describe_nodes(amounts: Sequence[float], what: str) -> str:
    """``2 node(s) with 8, 2 CPUs``: what each node has, for messages."""
    return f"{len(amounts)} node(s) with {', '.join(f'{a:g}' for a in amounts) or 'no'} {what}"
