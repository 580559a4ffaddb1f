"""``hrsa train`` on a two-node Ray cluster (two ``ray start`` on this machine, one CPU each) with its output on S3
(moto's server): two workers, one per node, checkpoints read through the run's filesystem, a killed run resumed
to the weights of an uninterrupted one; and what the cluster cannot run refused before training, in one line.

The second node runs in its own mount namespace with ``node-local/`` covered by an empty tmpfs: a folder there is a
node-local disk the head sees and the second node does not.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")]

SETTINGS = ["--workers", "2", "--batch-size", "4", "--negatives", "1", "--max-length", "16", "--lr", "1e-3",
            "--warmup-ratio", "0.1", "--quiet"]


@pytest.fixture(scope="module")
def s3_env(s3_endpoint: str) -> Iterator[dict[str, str]]:
    """The S3 variables of the nodes and drivers, also set here (the tests read the runs through pyarrow)."""
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(ray_clusters: Any, s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("multi-node")
    hidden = root / "node-local"
    hidden.mkdir()
    env = ray_clusters.env(s3_env)
    started = ray_clusters.start(env, second_node_prefix=ray_clusters.hiding_command(hidden))
    return {"cluster": started, "env": env, "hidden": hidden, "root": root}


@pytest.fixture(scope="module")
def data(tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"query": f"the quick fox {i}", "pos": "the lazy dog " + "w1 " * (i % 5),
                                        "negs": ["w1 w2 w3", f"tiny model {i}"]}) + "\n" for i in range(40)))
    return path


def train_command(cluster: dict[str, Any], backbone: Path, data: Path, output: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hrsa", "train", "--address", cluster["cluster"].address, "--backbone", str(backbone),
            "--data", str(data), "--output", output, *SETTINGS, *extra]


def run(command: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def error_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    """hrsa's own error lines (Ray's connection log lines are not hrsa's)."""
    return [line for line in done.stderr.splitlines() if line.startswith("hrsa:")]


def s3_files(url: str) -> dict[str, int]:
    from hrsa.runtime.locations import parse_location

    return parse_location(url).files()


def s3_bytes(url: str) -> bytes:
    from hrsa.runtime.locations import parse_location

    return parse_location(url).read_bytes()


def test_a_node_local_output_is_refused_before_anything_starts(cluster: dict[str, Any], tiny_models: Any,
                                                               data: Path) -> None:
    output = cluster["hidden"] / "run"
    done = run(train_command(cluster, tiny_models.dir("llama"), data, str(output), "--max-steps", "2"), cluster["env"])
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = error_lines(done)
    assert line.startswith("hrsa: error: Expected --output on storage every node of the Ray cluster reaches.")
    assert str(output) in line and "s3://" in line and "do not see" in line
    assert list(cluster["hidden"].iterdir()) == []  # no run folder, no marker left


def test_workers_no_node_can_hold_are_refused_before_anything_starts(cluster: dict[str, Any], tiny_models: Any,
                                                                     data: Path) -> None:
    output = f"s3://hrsa-test/refused-{uuid.uuid4().hex[:8]}"
    command = train_command(cluster, tiny_models.dir("llama"), data, output, "--max-steps", "2")
    command[command.index("--workers") + 1] = "4"  # two nodes of one CPU hold two
    done = run(command, cluster["env"])
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = error_lines(done)
    assert "at most 2 (2 node(s) with 1, 1 CPUs). Got 4 instead. Pass --workers 2" in line
    assert s3_files(output) == {}


def test_two_workers_train_to_s3_and_another_recipe_is_refused_there(cluster: dict[str, Any], tiny_models: Any,
                                                                     data: Path) -> None:
    output = f"s3://hrsa-test/runs-{uuid.uuid4().hex[:8]}/a"
    command = train_command(cluster, tiny_models.dir("llama"), data, output, "--max-steps", "4", "--save-every", "2")
    done = run(command, cluster["env"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"latest checkpoint: {output}/step_000004" in done.stdout
    files = s3_files(output)
    assert {"hrsa_recipe.json", "step_000002/model.safetensors", "step_000004/hrsa_train.json"} <= set(files)
    from hrsa.train.checkpoints import list_checkpoints

    assert [(c.url, c.step) for c in list_checkpoints(output)] == [(f"{output}/step_000002", 2),
                                                                   (f"{output}/step_000004", 4)]
    info = json.loads(s3_bytes(f"{output}/step_000004/hrsa_train.json"))
    assert info["world_size"] == 2 and info["step"] == 4
    refused = run([*command, "--lr", "0.05"], cluster["env"])  # the last flag given wins
    assert refused.returncode == 2 and "lr 0.05 (the run has 0.001)" in error_lines(refused)[0]
    assert s3_files(output) == files  # nothing touched


@pytest.mark.slow
def test_a_killed_two_worker_run_on_s3_resumes_to_the_weights_of_an_uninterrupted_one(
        cluster: dict[str, Any], tiny_models: Any, data: Path) -> None:
    """The driver (and with it its Ray Train workers) is killed after the checkpoint of step 20; the same command
    resumes from the latest checkpoint on S3 and ends with the bytes an uninterrupted run ends with."""
    root = f"s3://hrsa-test/resume-{uuid.uuid4().hex[:8]}"
    steps = ["--max-steps", "40", "--save-every", "10"]
    whole = run(train_command(cluster, tiny_models.dir("llama"), data, f"{root}/whole", *steps), cluster["env"])
    assert whole.returncode == 0, whole.stdout + whole.stderr
    command = train_command(cluster, tiny_models.dir("llama"), data, f"{root}/killed", *steps)
    proc = subprocess.Popen(command, env=cluster["env"], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while "step_000020/hrsa_train.json" not in s3_files(f"{root}/killed"):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint of step 20 before the deadline"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver; the cluster ends its job's workers
        proc.wait()
    from hrsa.runtime.locations import parse_location
    from hrsa.train.checkpoints import list_checkpoints

    complete = [c.step for c in list_checkpoints(f"{root}/killed")]
    assert complete and complete[-1] < 40, "the run finished before it was killed"
    # The killed driver's lease on the run stays until it lapses (60 s): the same command is refused in one line
    # that names the lease to delete, and resumes once it is deleted.
    refused = run(command, cluster["env"])
    assert refused.returncode == 2 and f"delete {root}/killed/.hrsa_train.lock" in "".join(error_lines(refused))
    parse_location(f"{root}/killed/.hrsa_train.lock").delete()
    resumed = run(command, cluster["env"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # From the latest complete checkpoint, whether or not Ray Train had recorded it before the kill (the cluster ends
    # the dead driver's workers a moment later: one may have completed a later checkpoint since it was listed).
    start = re.search(r"resumed from step (\d+),", resumed.stdout)
    assert start and complete[-1] <= int(start.group(1)) < 40, (complete, resumed.stdout)
    # The same weights, byte for byte: the same data, dropout and all-reduce order per step, and a checkpoint restores
    # exactly. The optimizer state holds the same values (its pickle may share objects differently after a resume).
    whole, killed = f"{root}/whole/step_000040", f"{root}/killed/step_000040"
    assert s3_bytes(f"{whole}/model.safetensors") == s3_bytes(f"{killed}/model.safetensors")
    a, b = (torch.load(io.BytesIO(s3_bytes(f"{run}/trainer_state.pt")), weights_only=False) for run in (whole, killed))
    assert a["step"] == b["step"] == 40 and a["scheduler"] == b["scheduler"]
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_a_pipeline_on_the_cluster_keeps_everything_on_s3(cluster: dict[str, Any], tiny_models: Any, data: Path,
                                                          tmp_path: Path) -> None:
    """`hrsa run --out s3://...` on the two nodes: the run trains under OUT/train/RUN on S3, the trained model is
    extracted from its checkpoint there, and the results, the report and the state are uploaded beside it."""
    import yaml

    corpus = tmp_path / "words.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"the quick fox {i} " * (i + 2)}) + "\n"
                              for i in range(6)))
    backbone = str(tiny_models.dir("llama"))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "store": str(tmp_path / "store"), "out": str(tmp_path / "ignored"), "corpora": {"words": {"path": str(corpus)}},
        "train": {"r": {"backbone": backbone, "data": str(data), "workers": 2, "batch_size": 4, "max_steps": 2,
                        "save_every": 2, "max_length": 16}},
        "models": {"base": {"model": backbone}, "tuned": {"train": "r"}},
        "pairs": [{"a": "base", "b": "tuned", "corpus": "words", "metrics": ["cka"], "scheduler": "threads"}]}))
    out = f"s3://hrsa-test/pipeline-{uuid.uuid4().hex[:8]}/out"
    done = run([sys.executable, "-m", "hrsa", "run", str(pipeline), "--out", out, "--address",
                cluster["cluster"].address], cluster["env"])
    assert done.returncode == 0, done.stdout + done.stderr
    files = s3_files(out)
    assert {"pipeline-state.json", "report.html", "pairs/base--tuned/results.json"} <= files.keys()
    assert any(f.startswith("train/r/recipe-") and f.endswith("step_000002/model.safetensors") for f in files)
    state = json.loads(s3_bytes(f"{out}/pipeline-state.json"))["stages"]
    (checkpoint,) = state["train:r"]["outputs"]["checkpoints"]
    assert checkpoint.startswith(f"{out}/train/r/recipe-") and state["report"]["status"] == "done"
    assert not (tmp_path / "ignored").exists()
