"""``hrsa submit`` on a real two-node Ray cluster (two ``ray start`` on this machine): the job runs the
pipeline with extraction workers on both nodes, and gets what one node gets, bit for bit.

The cluster lives in its own processes (own ports, own --temp-dir, own process groups), started and
stopped by process group here: never ``ray stop`` (it would kill every Ray on the machine, the test
session's embedded one included), and never ``ray.init`` in this process for it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from rich.console import Console

from hrsa.cluster.local_cluster import NODE_PORT_FLAGS, free_port, free_ports, ray_node_env, ray_start_node
from hrsa.cluster.pipeline import parse_pipeline
from hrsa.cluster.runner import run_pipeline
from hrsa.cluster.state import STATE_FILE
from hrsa.store import ActivationStore

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")]  # Ray's own log tailing

TEXTS = ["the quick brown fox jumps over the lazy dog " * 3, "hidden states of a tiny model " * 4, "w1 w2 w3 " * 9,
         "the lazy dog " * 10, "jumps over " * 12, "tiny model " * 8, "the quick brown fox " * 6, "w1 w2 w3 tiny " * 7]
MODELS = ("llama", "qwen")


@dataclass
class Cluster:
    dashboard: str
    groups: list[int]
    address: str = ""  # the GCS address, for drivers of their own (RAY_ADDRESS)


def stop(groups: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
        time.sleep(2 if sig == signal.SIGTERM else 0)


def alive_nodes(dashboard: str) -> int:
    try:
        with urllib.request.urlopen(f"{dashboard}/nodes?view=summary", timeout=5) as r:
            nodes = json.load(r)["data"]["summary"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # A short folder, not pytest's: a node's socket paths must stay under 108 bytes (under pytest-xdist's
    # /tmp/pytest-of-root/pytest-N/popen-gw1/ray0/session_<date>_<pid>/sockets/dash_MetricsHead did not).
    temp = Path(tempfile.mkdtemp(prefix="hrsa-ray-"))
    env = ray_node_env()  # the job's `python` is this venv's; no token auth on the loopback; no model hub
    ports = iter(free_ports(3 + 2 * len(NODE_PORT_FLAGS)))
    port, dashboard_port = next(ports), next(ports)
    groups: list[int] = []
    try:
        groups.append(ray_start_node(["--head", f"--port={port}", "--num-cpus=1", '--resources={"node_head": 1}',
                                      "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                      f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={next(ports)}",
                                      f"--temp-dir={temp}"], env, temp / "head.log", ports))
        groups.append(ray_start_node([f"--address=127.0.0.1:{port}", "--num-cpus=1", '--resources={"node_b": 1}'], env,
                                     temp / "node-b.log", ports))
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + 60
        while alive_nodes(dashboard) < 2:
            if time.monotonic() > deadline:
                pytest.fail("the two-node cluster did not come up in 60 s")
            time.sleep(0.5)
        yield Cluster(dashboard, groups, f"127.0.0.1:{port}")
    finally:
        stop(groups)
        shutil.rmtree(temp, ignore_errors=True)


def pipeline_values(root: Path, corpus: Path, tiny_models: Any) -> dict[str, Any]:
    # Two workers per model (one per node: each node has one CPU, each worker takes one) and small units,
    # so that both workers get some. The analysis runs on the driver's threads: Dask-on-Ray would start a
    # worker process per node for a few tiny tasks (tests/analyze covers it).
    extract = {"workers": 2, "shard_tokens": 64}
    return {
        "store": str(root / "store"), "out": str(root / "out"),
        "corpora": {"words": {"path": str(corpus)}},
        "models": {"llama": {"model": str(tiny_models.dir("llama")), **extract},
                   "qwen": {"model": str(tiny_models.dir("qwen2")), "attention": "bidirectional", **extract}},
        "pairs": [{"a": "llama", "b": "qwen", "corpus": "words", "metrics": ["cka", "dimcorr", "procrustes", "knn"],
                   "k": [5, 10], "scheduler": "threads"}],
        # On the cluster a Ray task on one of its nodes (the driver's CPU is not the cluster's); here, in-process
        "eval": {"qwen-dev": {"model": "qwen", "tasks": [f"retrieval:{corpus.with_name('dev.jsonl')}"],
                              "instructions": False}},
    }


def metric_values(path: Path) -> dict[str, float]:
    """Every number of results.json's metrics, by its path (cka.diagonal.3, knn.k.5.0, ...)."""
    def flat(value: Any, where: str) -> Iterator[tuple[str, float]]:
        if isinstance(value, dict):
            for k, v in value.items():
                yield from flat(v, f"{where}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield from flat(v, f"{where}.{i}")
        elif isinstance(value, (int, float)) or value is None:
            yield where, float("nan") if value is None else float(value)

    return dict(flat(json.loads(path.read_text())["metrics"], "metrics"))


def test_submitted_pipeline_spreads_extraction_over_both_nodes_and_matches_one_node(
        cluster: Cluster, tmp_path: Path, tiny_models: Any, ray_local: Any) -> None:
    from hrsa.cli import cli

    corpus = tmp_path / "words.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    corpus.with_name("dev.jsonl").write_text("".join(json.dumps({"query": t[:12], "pos": t}) + "\n" for t in TEXTS))
    project = tmp_path / "project"  # the job's working directory: the pipeline file travels in it
    project.mkdir()
    (project / "pipeline.yaml").write_text(yaml.safe_dump(pipeline_values(tmp_path / "cluster", corpus, tiny_models)))
    # Step 1: the job on the two-node cluster, through `hrsa submit` (which follows its logs).
    result = CliRunner().invoke(cli, ["submit", str(project / "pipeline.yaml"), "--address", cluster.dashboard,
                                      "--working-dir", str(project), "--env", "HF_HUB_OFFLINE=1"])
    assert result.exit_code == 0, result.output
    assert "submitted job" in result.output and "SUCCEEDED" in result.output
    state = json.loads((tmp_path / "cluster" / "out" / STATE_FILE).read_text())["stages"]
    for model in MODELS:
        assert len(set(state[f"extract:{model}"]["outputs"]["node_ids"])) == 2, state[f"extract:{model}"]
    # Step 2: the same pipeline on one node (the session's embedded Ray).
    local = run_pipeline(parse_pipeline(pipeline_values(tmp_path / "local", corpus, tiny_models)),
                         console=Console(quiet=True))
    # Step 3: the same activations, bit for bit, and the same metrics.
    on_cluster, on_one = ActivationStore.open(tmp_path / "cluster" / "store"), ActivationStore.open(tmp_path / "local" / "store")
    for model in MODELS:
        info = on_cluster.model_info(model)
        assert info.complete and info.n_units >= 4
        for k in info.hidden_states:
            a = np.asarray(on_cluster.hidden_state(model, k).compute())
            b = np.asarray(on_one.hidden_state(model, k).compute())
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{model} hidden state {k}"
    cluster_metrics = metric_values(tmp_path / "cluster" / "out" / "pairs" / "llama--qwen" / "results.json")
    local_metrics = metric_values(local.results["llama--qwen"])
    assert cluster_metrics.keys() == local_metrics.keys()
    assert {k.split(".")[1] for k in local_metrics} == {"cka", "dimcorr", "procrustes", "knn"}
    keys = sorted(local_metrics)
    np.testing.assert_allclose([cluster_metrics[k] for k in keys], [local_metrics[k] for k in keys], rtol=1e-9, atol=1e-12)
    # The evaluation ran as a task on a node of the cluster, and scored as it does in one process
    both_nodes = set(state["extract:llama"]["outputs"]["node_ids"])  # the two nodes' ids, asserted above
    assert state["eval:qwen-dev"]["outputs"]["node_id"] in both_nodes
    scores = [json.loads(path.read_text())["checkpoints"][0]["results"]
              for path in (tmp_path / "cluster" / "out" / "eval" / "qwen-dev" / "eval.json", local.evals["qwen-dev"])]
    assert [{t: r["main_score"] for t, r in s.items()} for s in scores] == [
        {t: r["main_score"] for t, r in scores[1].items()}] * 2


def test_a_failing_job_fails_hrsa_submit(cluster: Cluster, tmp_path: Path) -> None:
    from hrsa.cli import cli

    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({
        "store": str(tmp_path / "store"), "out": str(tmp_path / "out"),
        "corpora": {"gone": {"path": str(tmp_path / "missing.jsonl")}},
        "models": {"m": {"model": str(tmp_path / "no-model")}, "n": {"model": str(tmp_path / "no-model")}},
        "pairs": [{"a": "m", "b": "n", "corpus": "gone"}]}))
    result = CliRunner().invoke(cli, ["submit", str(tmp_path / "pipeline.yaml"), "--address", cluster.dashboard,
                                      "--working-dir", str(tmp_path)])
    assert result.exit_code == 1
    # the job's own one-line error, in its logs: the pipeline's paths are checked on the cluster, before any stage
    assert "hrsa: error: Expected a corpus file or folder at" in result.output
    assert result.output.strip().splitlines()[-1].startswith("hrsa: error: Expected job raysubmit_")


# -- submit's checks, before anything reaches a cluster ---------------------------------------------------
def test_submit_checks_the_pipeline_and_the_address_first(tmp_path: Path) -> None:
    from hrsa.cli import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("store: s\n")
    result = CliRunner().invoke(cli, ["submit", str(bad), "--address", "http://127.0.0.1:9", "--working-dir", str(tmp_path)])
    assert result.exit_code == 2 and "Expected a valid pipeline" in result.output and result.output.count("\n") == 1
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"store": str(tmp_path / "s"), "out": str(tmp_path / "o"),
                                    "corpora": {"c": {"path": "c.jsonl"}}}))
    outside = CliRunner().invoke(cli, ["submit", str(good), "--working-dir", str(tmp_path / "elsewhere")])
    assert outside.exit_code == 2  # click: the working directory does not exist
    (tmp_path / "sub").mkdir()
    result = CliRunner().invoke(cli, ["submit", str(good), "--address", "http://127.0.0.1:9", "--working-dir",
                                      str(tmp_path / "sub")])
    assert result.exit_code == 2 and "Expected the pipeline inside the working directory" in result.output
    result = CliRunner().invoke(cli, ["submit", str(good), "--address", f"http://127.0.0.1:{free_port()}",
                                      "--working-dir", str(tmp_path)])
    assert result.exit_code == 2 and "Expected a Ray dashboard at" in result.output and result.output.count("\n") == 1


def test_excludes_leave_out_outputs_and_large_files_and_the_package_is_hrsa(tmp_path: Path) -> None:
    from hrsa.cluster.submit import _staged_package, compute_excludes
    from hrsa.store.errors import UserError

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_bytes(b"\0" * 2048)
    (tmp_path / "data" / "small.jsonl").write_text("{}\n")
    (tmp_path / "runs" / "store").mkdir(parents=True)
    (tmp_path / "runs" / "store" / "shard").write_bytes(b"\0" * 4096)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "huge").write_bytes(b"\0" * 4096)
    excludes = compute_excludes(tmp_path, outputs=[str(tmp_path / "runs" / "store"), "s3://bucket/store"], large=1024,
                                limit=1024)
    assert "/data/big.bin" in excludes and "/runs/store" in excludes and ".venv" in excludes
    assert not any("small" in e for e in excludes)
    with pytest.raises(UserError, match="Ray's upload cap"):
        compute_excludes(tmp_path, large=10_000, limit=1024)  # big.bin now counts, and is over the cap
    with _staged_package() as package:
        assert package.name == "hrsa" and (package / "cluster" / "submit.py").is_file() and (package / "__main__.py").is_file()
        assert not (package / "tests").exists() and not list(package.rglob("*.yaml"))


def test_an_analysis_splits_its_tokens_over_both_nodes_and_equals_one_process(cluster: Cluster, tmp_path: Path) -> None:
    """Ray tasks: every tile at once, each tile's tokens in segments spread over the nodes; the same numbers as the
    local threads to 1e-12 (float64 products, so the sums differ only by their order)."""
    from hrsa.analyze.pair import analyze_pair
    from hrsa.store.testing import make_table

    # A store of two related models: 6 hidden states of D = 24 over 3,000 tokens with 1e4 offsets.
    rng = np.random.default_rng(5)
    store = ActivationStore.open(tmp_path / "store", mode="w-")
    table = make_table((700, 300, 1100, 900))
    cid = store.write_corpus(table, tokenizer={"name": "t", "fingerprint": "f"}, source="test")
    x = {k: rng.normal(size=(table.n_tokens, 24)) + rng.uniform(-1e4, 1e4, 24) for k in range(6)}
    for mid, states in (("a", x), ("b", {k: v @ (np.eye(24) + 0.2 * rng.normal(size=(24, 24))) for k, v in x.items()})):
        store.create_model(mid, corpus=cid, n_hidden_states=6, hidden_size=24, dtype="float32", hidden_states=list(range(6)),
                           chunk_tokens=128, shard_tokens=512)
        writer = store.writer(mid)
        for unit in writer.units():
            writer.write_unit(unit, {k: v[unit.start : unit.stop].astype(np.float32) for k, v in states.items()})
    flags = ["--metrics", "cka,dimcorr,procrustes", "--cross-layer", "--compute-dtype", "float64", "--block-tokens", "256",
             "--memory-budget", "2MB"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ADDRESS=cluster.address, RAY_AUTH_MODE="disabled")
    done = subprocess.run([sys.executable, "-m", "hrsa", "analyze", "--store", str(tmp_path / "store"), "--pair", "a", "b",
                           "--workers", "2", "--out", str(tmp_path / "out"), "--no-store-results", *flags],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    on_cluster = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_cluster["settings"]["scheduler"] == "ray"
    per_node = on_cluster["settings"]["segments_per_node"]
    assert len(per_node) == 2 and min(per_node.values()) >= 1, per_node  # both nodes ran segments
    assert on_cluster["plan"]["passes"] >= 2  # several tiles at once, not one
    local = analyze_pair(store, "a", "b", metrics=("cka", "dimcorr", "procrustes"), cross_layer=True, scheduler="threads",
                         compute_dtype="float64", block_tokens=256, memory_budget="2MB", groups=10)
    np.testing.assert_allclose(on_cluster["metrics"]["cka"]["matrix"], local.cka_matrix, rtol=0, atol=1e-12)
    np.testing.assert_allclose(on_cluster["metrics"]["dimcorr"]["matrix"], local.dimcorr_matrix, rtol=0, atol=1e-12)
    np.testing.assert_allclose(on_cluster["metrics"]["procrustes"]["h_inv"], [p.h_inv for p in local.procrustes], rtol=0, atol=1e-12)
    np.testing.assert_allclose(on_cluster["metrics"]["cka"]["diagonal"], [c.value for c in local.cka], rtol=0, atol=1e-12)
