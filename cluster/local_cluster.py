"""A local Ray cluster of two nodes on this machine (two ``ray start``, one CPU each): what the multi-node tests and
``benchmarks/analyze.py`` run on, to exercise placement over nodes without a second machine.

Each node runs in its own process group with its own ports, and is stopped by group: never ``ray stop`` (it would
kill every Ray on the machine, a test session's embedded one too), and never ``ray.init`` in the starting process
for it (drive it with subprocesses given ``address``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NODE_PORT_FLAGS", "LocalRayCluster", "free_port", "free_ports", "node_port_args", "ray_node_env",
           "ray_start_node", "start_ray_cluster"]

RAY = Path(sys.executable).parent / "ray"


# The ports of a node's processes that ``ray start`` would otherwise pick itself, at random, possibly clashing with a
# second node's on the same machine.
NODE_PORT_FLAGS = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                   "--metrics-export-port", "--node-manager-port", "--object-manager-port")


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free now. All are held open until all are picked: picked one at a time (bind port 0,
    close), the OS may hand back a port it just gave, and a head's GCS and object manager once got the same one."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def node_port_args(ports: Iterator[int]) -> list[str]:
    """One node's ``--<process>-port=N`` flags, each taking the next port of ``ports``."""
    return [f"{flag}={next(ports)}" for flag in NODE_PORT_FLAGS]


@dataclass
class LocalRayCluster:
    """Two ``ray start`` nodes on this machine, stopped by process group."""

    address: str  # the GCS address (host:port), for ``--address`` and RAY_ADDRESS
    groups: list[int]
    temp: Path | None = None  # its logs and sockets, removed when it stops

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for group in self.groups:
                try:
                    os.killpg(group, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2 if sig == signal.SIGTERM else 0)
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)


def ray_node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a local cluster's nodes and drivers: this venv first on PATH, no token auth on the loopback,
    no model hub, none of this process's RAY_ variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    return {**env, **(extra or {})}


def ray_start_node(args: list[str], env: dict[str, str], log: Path, ports: Iterator[int],
                   wrap: Sequence[str] = ()) -> int:
    """``ray start`` in a new process group (every Ray process of the node inherits it), its processes' ports taken
    from ``ports``; returns the group."""
    cmd = [*wrap, str(RAY), "start", *args, *node_port_args(ports), "--object-store-memory=200000000",
           "--disable-usage-stats"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if proc.wait(timeout=60) != 0:
            LocalRayCluster("", [proc.pid]).stop()
            raise RuntimeError(f"ray start failed: {log.read_text()[-2000:]}")
    return proc.pid


_WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[2])
while sum(1 for n in ray.nodes() if n["Alive"]) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)
sys.exit(0 if sum(1 for n in ray.nodes() if n["Alive"]) >= 2 else 1)
"""


def _wait_for_two_nodes(address: str, env: dict[str, str], timeout: float = 90) -> None:
    """Through the GCS, as any driver sees the cluster (the dashboard is off: a loaded machine is slow to start it)."""
    done = subprocess.run([sys.executable, "-c", _WAIT_FOR_NODES, address, str(timeout)], env=env, capture_output=True,
                          text=True, timeout=timeout + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the two-node cluster did not come up in {timeout:g} s: {done.stderr[-2000:]}")


def start_ray_cluster(env: dict[str, str], *, second_node_prefix: list[str] | None = None) -> LocalRayCluster:
    """A head and a second node, one CPU each (``second_node_prefix`` wraps the second's ``ray start``), with their
    logs in a short temporary folder (a node's socket paths must stay under 108 bytes)."""
    ports = iter(free_ports(2 + 2 * len(NODE_PORT_FLAGS)))
    port, temp = next(ports), Path(tempfile.mkdtemp(prefix="hrsa-ray-"))
    cluster = LocalRayCluster(f"127.0.0.1:{port}", [], temp)
    try:
        cluster.groups.append(ray_start_node(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                                              f"--ray-client-server-port={next(ports)}", f"--temp-dir={temp}"],
                                             env, temp / "head.log", ports))
        # The second node's own temporary folder, as a machine of its own has: sharing the head's, its runtime-env
        # agent deleted a job's working directory under the running driver once its own workers let go of it.
        (temp / "b").mkdir()
        cluster.groups.append(ray_start_node([f"--address={cluster.address}", "--num-cpus=1", f"--temp-dir={temp / 'b'}"],
                                             env, temp / "node-b.log", ports, second_node_prefix or ()))
        _wait_for_two_nodes(cluster.address, env)
    except BaseException:
        cluster.stop()
        raise
    return cluster
