"""Training workers sized per node: the most CPUs each that still fit the nodes, or one line when nothing fits."""

from __future__ import annotations

import pytest

from hrsa.runtime.connection import NodeResources
from hrsa.runtime.locations import parse_location
from hrsa.train.placement import (PlacementError, WorkerPlacement, check_every_node_reaches, cpus_per_worker,
                                  plan_workers)


def nodes(*resources: tuple[float, float]) -> list[NodeResources]:
    return [NodeResources(f"node{i:02d}" * 4, f"10.0.0.{i}", cpus, gpus) for i, (cpus, gpus) in enumerate(resources)]


@pytest.mark.parametrize(("node_cpus", "workers", "each"), [
    ([2], 1, 2), ([2], 2, 1), ([16], 3, 5), ([8, 2], 2, 4), ([8, 2], 3, 2), ([8, 8], 2, 8), ([1, 1], 2, 1),
    ([4, 4, 1], 3, 2), ([3.5, 0.5], 1, 3),
])
def test_each_worker_takes_the_most_cpus_that_still_fit_one_node(node_cpus: list[float], workers: int,
                                                                 each: int) -> None:
    assert cpus_per_worker(node_cpus, workers) == each
    assert sum(int(c // each) for c in node_cpus) >= workers  # every worker fits on some node
    assert sum(int(c // (each + 1)) for c in node_cpus) < workers  # one more CPU each would not


def test_the_whole_cluster_divided_by_the_workers_is_not_what_a_node_holds() -> None:
    """Two nodes of 4 CPUs: 8 // 1 = 8 CPUs for one worker would wait forever; a node holds 4."""
    assert cpus_per_worker([4, 4], 1) == 4 and cpus_per_worker([4, 4], 2) == 4 and cpus_per_worker([4, 4], 3) == 2


@pytest.mark.parametrize(("node_cpus", "workers", "most"), [([1, 1], 3, 2), ([0.5], 1, 0), ([], 1, 0)])
def test_more_workers_than_cpus_is_one_line_naming_the_fix(node_cpus: list[float], workers: int, most: int) -> None:
    fix = rf"at most {most} .*Got {workers} instead\. Pass --workers {max(most, 1)} "
    with pytest.raises(PlacementError, match=fix):
        cpus_per_worker(node_cpus, workers)


def test_gpu_workers_take_one_gpu_each_and_are_chosen_when_there_are_enough() -> None:
    assert plan_workers(nodes((8, 1), (8, 1)), workers=2, use_gpu=None) == WorkerPlacement(True, 1)
    assert plan_workers(nodes((8, 1), (8, 0)), workers=2, use_gpu=None) == WorkerPlacement(False, 8)
    assert plan_workers(nodes((8, 0.5), (8, 0.5)), workers=1, use_gpu=None).use_gpu is False  # no whole GPU
    assert WorkerPlacement(True, 1).resources_per_worker() is None
    assert WorkerPlacement(False, 3).resources_per_worker() == {"CPU": 3.0}
    with pytest.raises(PlacementError, match=r"one GPU each: at most 1 \(2 node\(s\) with 1, 0 GPUs\)\. Got 2 instead"):
        plan_workers(nodes((8, 1), (8, 0)), workers=2, use_gpu=True)


def test_use_gpu_on_a_cluster_without_gpus_says_so_rather_than_at_most_0() -> None:
    """It said "at most 0 ... Pass --workers 1 or fewer": the workers given, and no word of the missing GPU."""
    with pytest.raises(PlacementError, match=r"^Expected a GPU in the Ray cluster for --use-gpu\. Got none \(1 node\(s\) "
                                             r"with 2 CPUs\) instead\. Train on CPUs \(--no-use-gpu\) or add GPU nodes\.$"):
        plan_workers(nodes((2, 0)), workers=1, use_gpu=True)


def test_remote_storage_and_one_node_need_no_reach_check(tmp_path) -> None:
    check_every_node_reaches(parse_location(tmp_path / "run"), nodes((2, 0)))  # one node: nothing to ask
    assert list(tmp_path.iterdir()) == []
