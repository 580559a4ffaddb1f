"""Extraction's CPU workers fit one node each: sized from the nodes, not from the whole cluster's CPUs."""

from __future__ import annotations

import pytest

from hrsa.extract.job import WorkerPlacementError, _check_placement, _placement
from hrsa.runtime.connection import NodeResources, RayConnection


def cluster(*cpus: float, gpus: float = 0) -> RayConnection:
    nodes = tuple(NodeResources(f"n{i}", f"10.0.0.{i}", c, 0) for i, c in enumerate(cpus))
    return RayConnection("ray://x", float(sum(cpus)), gpus, len(nodes), nodes)


@pytest.mark.parametrize(("cpus", "workers", "each"), [((1, 1), 1, 1), ((1, 1), 2, 1), ((8, 2), 1, 8), ((8, 2), 2, 4),
                                                       ((4, 4), 1, 4)])
def test_each_cpu_worker_takes_what_one_node_holds(cpus: tuple[float, ...], workers: int, each: int) -> None:
    n, gpus, per_worker, threads = _placement(cluster(*cpus), workers)
    assert (n, gpus, per_worker, threads) == (workers, 0.0, float(each), each)
    _check_placement(cluster(*cpus), n, gpus, per_worker)  # placeable


def test_more_workers_than_the_nodes_hold_is_refused() -> None:
    n, gpus, per_worker, _ = _placement(cluster(1, 1), 3)
    with pytest.raises(WorkerPlacementError, match=r"at most 2 .*Got 3 instead\. Pass --workers 2 "):
        _check_placement(cluster(1, 1), n, gpus, per_worker)


@pytest.mark.parametrize(("nodes", "each"), [(((32, 4),), 8.0), (((32, 4), (16, 8)), 2.0), (((2, 4),), 1.0),
                                             (((64, 8), (4, 0)), 8.0)])
def test_a_gpu_worker_takes_its_share_of_its_nodes_cpus_to_write_with(nodes: tuple[tuple[float, float], ...],
                                                                      each: float) -> None:
    """One worker per GPU, each with the CPUs of a GPU node divided among its GPUs (the smallest share of any GPU
    node, at least 1): they encode, hash and write shards while the GPU computes; a CPU-only node does not count."""
    resources = tuple(NodeResources(f"n{i}", f"10.0.0.{i}", c, g) for i, (c, g) in enumerate(nodes))
    conn = RayConnection("ray://x", float(sum(c for c, _ in nodes)), float(sum(g for _, g in nodes)), len(nodes),
                         resources)
    n, gpus, per_worker, threads = _placement(conn, None)
    assert (n, gpus, per_worker, threads) == (int(conn.n_gpus), 1.0, each, 0)
    _check_placement(conn, n, gpus, per_worker)
