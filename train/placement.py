"""Where ``hrsa train``'s workers run, checked before any starts: every worker fits one node, and every node
reaches the run folder.

Ray Train places each worker as one bundle of resources on one node, and waits without end for a bundle no node
can hold (it expects an autoscaler to add such a node): a CPU worker sized from the whole cluster's CPUs divided by
the workers can exceed every node. So CPU workers are sized per node (:func:`hrsa.runtime.placement.cpus_per_worker`),
and a request the nodes cannot hold is one line naming the fix.

Ray Train writes checkpoints from the workers' nodes and its own state from wherever its controller runs, so the
run folder must be storage every node reaches. A local path on a multi-node cluster is checked by asking each node
for a file written here (:func:`check_every_node_reaches`): Ray Train itself would fail only when a worker on a
node-local disk saves its first checkpoint, after the training up to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hrsa.runtime.connection import NodeResources
from hrsa.runtime.locations import Location
from hrsa.runtime.placement import PlacementError, check_every_node_sees, cpus_per_worker, describe_nodes

__all__ = ["PlacementError", "WorkerPlacement", "check_every_node_reaches", "cpus_per_worker", "plan_workers"]


@dataclass(frozen=True)
class WorkerPlacement:
    """What each training worker asks Ray for.

    Attributes:
        use_gpu: one GPU per worker (NCCL), else CPU workers (gloo).
        cpus: CPUs each CPU worker takes, and its torch threads (1 for a GPU worker, which asks for no CPU).
    """

    use_gpu: bool
    cpus: int

    def resources_per_worker(self) -> dict[str, float] | None:
        """Ray Train's ``resources_per_worker`` (None: its default, one GPU)."""
        return None if self.use_gpu else {"CPU": float(self.cpus)}


def plan_workers(nodes: Sequence[NodeResources], *, workers: int, use_gpu: bool | None) -> WorkerPlacement:
    """Each worker's resources on these nodes: one GPU each when asked (by default, when the nodes have a GPU per
    worker), else the most CPUs each that still fit.

    Raises:
        PlacementError: more GPU workers than GPUs, or more CPU workers than CPUs.
    """
    gpu_slots = sum(int(n.gpus) for n in nodes)
    if use_gpu is None:
        use_gpu = gpu_slots >= workers
    if not use_gpu:
        return WorkerPlacement(False, cpus_per_worker([n.cpus for n in nodes], workers))
    if gpu_slots == 0:
        raise PlacementError(f"Expected a GPU in the Ray cluster for --use-gpu. Got none "
                             f"({describe_nodes([n.cpus for n in nodes], 'CPUs')}) instead. Train on CPUs (--no-use-gpu) "
                             "or add GPU nodes.")
    if gpu_slots < workers:
        raise PlacementError(f"Expected --workers the Ray cluster can place, one GPU each: at most {gpu_slots} "
                             f"({describe_nodes([n.gpus for n in nodes], 'GPUs')}). Got {workers} instead. Pass "
                             f"--workers {gpu_slots} or fewer, train on CPUs (--no-use-gpu), or add GPU nodes.")
    return WorkerPlacement(True, 1)


def check_every_node_reaches(run: Location, nodes: Sequence[NodeResources]) -> None:
    """Refuse a local run folder that some node of a multi-node cluster does not see (a node-local disk).

    A file is written in the folder (or its nearest existing parent, so nothing new stays), each node is asked
    whether it sees it, and the file is removed. Remote storage (``s3://``...) and a one-node cluster pass as they are.

    Raises:
        PlacementError: a node does not see the folder, or it cannot be written.
    """
    if run.is_local:
        check_every_node_sees(run.url, nodes, flag="--output", use_instead=(
            "Train into a URL such as s3://BUCKET/runs/NAME, or a path on a filesystem mounted on every node (NFS, EFS)."))
