"""Connecting to Ray: without an address, hrsa runs on an embedded local Ray, whatever else runs on the machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hrsa.cluster.local_cluster import ray_node_env

_CONNECT = """
from hrsa.runtime.connection import connect
c = connect(num_cpus=1)
print(c.address, c.n_nodes, c.n_cpus)
"""


@pytest.mark.integration
def test_without_an_address_a_left_over_ray_start_record_is_not_joined() -> None:
    """Ray's own ``ray.init()`` joins the cluster named in ``<ray temp>/ray_current_cluster`` (what the last
    ``ray start`` on the machine wrote): a head killed without ``ray stop`` leaves it there, and every verb then
    failed to connect to a dead address. With no address, the README promises an embedded local Ray."""
    temp = Path(tempfile.mkdtemp(prefix="hr-", dir="/tmp"))  # Ray's socket paths must stay short
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens there
        env = ray_node_env({"RAY_TMPDIR": str(temp)})
        done = subprocess.run([sys.executable, "-c", _CONNECT], env=env, capture_output=True, text=True, timeout=180,
                              check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split()[-3:] == ["local", "1", "1.0"]
    finally:
        shutil.rmtree(temp, ignore_errors=True)
