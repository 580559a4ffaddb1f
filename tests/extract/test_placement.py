"""Extraction's CPU workers fit one node each: sized from the nodes, not from the whole cluster's CPUs."""

from __future__ import annotations

from typing import Any

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


def gpu_cluster(*nodes: tuple[float, float]) -> RayConnection:
    resources = tuple(NodeResources(f"n{i}", f"10.0.0.{i}", c, g) for i, (c, g) in enumerate(nodes))
    return RayConnection("ray://x", float(sum(c for c, _ in nodes)), float(sum(g for _, g in nodes)), len(nodes),
                         resources)


@pytest.mark.parametrize(("nodes", "each"), [(((32, 4),), 7.0), (((96, 8),), 8.0), (((32, 4), (16, 8)), 1.0),
                                             (((2, 4),), 0.5), (((64, 8), (4, 0)), 7.0)])
def test_a_gpu_worker_takes_a_share_of_its_nodes_cpus_to_write_with(nodes: tuple[tuple[float, float], ...],
                                                                    each: float) -> None:
    """One worker per GPU, each with a GPU node's CPUs but one divided among its GPUs (at most 8; the smallest share
    of any GPU node; a fraction on a node with fewer CPUs than GPUs): they encode, hash and write shards while the GPU
    computes. A CPU-only node does not count; torch keeps one thread."""
    conn = gpu_cluster(*nodes)
    n, gpus, per_worker, threads = _placement(conn, None)
    assert (n, gpus, per_worker, threads) == (int(conn.n_gpus), 1.0, each, 1)
    _check_placement(conn, n, gpus, per_worker)  # every GPU's worker fits
    with pytest.raises(WorkerPlacementError, match=f"at most {n} "):
        _check_placement(conn, n + 1, gpus, per_worker)


def test_gpu_workers_are_counted_by_the_cpus_their_nodes_hold_too() -> None:
    """Four 1-GPU, 1-CPU workers do not fit a node of 4 GPUs and 2 CPUs: two do (Ray would wait for the rest)."""
    with pytest.raises(WorkerPlacementError, match=r"at most 2 .*Got 4 instead"):
        _check_placement(gpu_cluster((2, 4)), 4, 1.0, 1.0)


class _Holder:
    def ready(self) -> bool:
        return True


def test_an_extraction_on_a_cluster_whose_cpus_another_job_holds_is_refused_after_its_wait(
        tmp_path: Any, tiny_models: Any, ray_local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait for room that other jobs hold ends in one line, nothing created (it had no test)."""
    import json

    import ray

    import hrsa.extract.job as job
    from hrsa.extract.config import parse_extract_config

    monkeypatch.setattr(job, "PLACEMENT_TIMEOUT_S", 3.0)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "the lazy dog"}) + "\n")
    config = parse_extract_config({"store": str(tmp_path / "store"), "model": str(tiny_models.dir("llama")),
                                   "corpus": str(corpus), "workers": 1})
    holder = ray.remote(num_cpus=2)(_Holder).remote()
    try:
        assert ray.get(holder.ready.remote(), timeout=60)
        with pytest.raises(WorkerPlacementError, match=r"Expected room for 1 worker\(s\) .* within 3 s"):
            job.run_extraction(config)
    finally:
        ray.kill(holder)
    assert not (tmp_path / "store").exists()
