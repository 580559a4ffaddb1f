"""How many CPUs each of several workers can take when every worker must fit on one node: the arithmetic shared by
extraction and training workers (Ray places a task's or actor's resources on one node, and waits without end for
resources no node holds, expecting an autoscaler to add such a node).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hrsa.store.errors import UserError

__all__ = ["ROOM_TIMEOUT_S", "FolderNotWritableError", "PlacementError", "check_every_node_sees", "cpus_per_worker",
           "describe_nodes", "nodes_not_seeing", "reserve_room"]

# How long workers may wait for CPUs/GPUs that the cluster has but other jobs hold, before the run gives up instead
# of hanging (loading a model is not counted: the resources are reserved first).
ROOM_TIMEOUT_S = 120.0

_ANSWER_S = 60.0  # a node that has not answered a trivial task by then is counted as not reaching the folder


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


class FolderNotWritableError(PlacementError):
    """A folder whose reach cannot be asked: this process cannot write a file there."""


def check_every_node_sees(folder: str, nodes: Sequence[Any], *, flag: str, use_instead: str) -> None:
    """Refuse a local ``folder`` (a URL passes) that some node of a multi-node cluster does not see (a node-local
    disk): work there would find nothing, or another folder at that path.

    Raises:
        PlacementError: naming the nodes, ``flag`` and ``use_instead`` (what to pass instead).
        FolderNotWritableError: the folder cannot be written, so its reach cannot be asked.
    """
    from hrsa.runtime.locations import is_url

    if is_url(folder):
        return
    blind = nodes_not_seeing(Path(folder), nodes, flag=flag)
    if blind:
        raise PlacementError(f"Expected {flag} on storage every node of the Ray cluster reaches. Got {folder}, a path "
                             f"that node(s) {', '.join(blind)} do not see (or did not answer), instead. {use_instead}")


def nodes_not_seeing(folder: Path, nodes: Sequence[Any], *, flag: str) -> list[str]:
    """The nodes (``address (id)``) of a multi-node cluster that do not see the local ``folder`` (a node-local disk):
    a file is written in it (or its nearest existing parent, so nothing new stays), each node is asked whether it sees
    it, and the file is removed. Empty for a one-node cluster.

    Raises:
        FolderNotWritableError: the folder cannot be written (named as ``flag``).
    """
    if len(nodes) < 2:
        return []
    anchor = next(p for p in (folder, *folder.parents) if p.is_dir())
    token = uuid.uuid4().hex
    marker = anchor / f".hrsa-reach-{token}"
    try:
        marker.write_text(token)
    except OSError as error:
        raise FolderNotWritableError(f"Expected a writable {flag}. Got {folder}, where {anchor} refuses a file ({error}) "
                             "instead. Pick a folder you can write.") from None
    try:
        return _asked(marker, token, nodes)
    finally:
        marker.unlink(missing_ok=True)


def _sees(path: str, token: str) -> bool:
    """Run on one node: whether it sees the file at ``path`` holding ``token``."""
    file = Path(path)
    return file.is_file() and file.read_text() == token


def _asked(marker: Path, token: str, nodes: Sequence[Any]) -> list[str]:
    """The nodes that do not see ``marker`` (or do not answer in time): one task pinned to each."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task: Any = ray.remote(num_cpus=0, max_retries=0)(_sees)
    asked = {f"{n.address} ({n.node_id[:8]})": task.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote(str(marker), token)
        for n in nodes}
    ready, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=_ANSWER_S)
    return [node for node, ref in asked.items() if ref not in ready or not _answer(ref)]


def _answer(ref: Any) -> bool:
    import ray

    try:
        return bool(ray.get(ref))
    except ray.exceptions.RayError:  # the task failed on that node (hrsa not importable...): it cannot say it sees it
        return False


def reserve_room(bundles: list[dict[str, float]], *, strategy: str, timeout_s: float | None = None) -> Any:
    """A placement group holding ``bundles`` (one per worker), ready within ``timeout_s`` (default
    :data:`ROOM_TIMEOUT_S`). Ray itself waits without end for resources other jobs hold (Ray Train too: it retries
    its workers' start for ever), so a busy cluster is an error here, not a hang.

    Raises:
        PlacementError: the cluster did not free room for them in time (the group is removed).
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group(bundles, strategy=strategy)
    timeout_s = ROOM_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise PlacementError(
            f"Expected room for {len(bundles)} worker(s) of {bundles[0]} on the Ray cluster within {timeout_s:g} s. "
            f"Got only {ray.available_resources()} free instead (other jobs hold the rest). Pass fewer --workers, or "
            "re-run when the cluster is free."
        ) from None
    return group
