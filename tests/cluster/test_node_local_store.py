"""A local store that some node of the cluster does not see (a node-local disk) is refused before anything is created,
by extraction (its workers there would find no store, or another one at that path) and by an analysis's Ray passes
(their tasks there would read another store, or none, and name a damage this store does not have).

The second node runs in its own mount namespace with ``node-local/`` covered by an empty tmpfs, as in
tests/train/test_multi_node.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = [pytest.mark.integration]

TEXTS = ["the quick brown fox jumps over the lazy dog " * 3, "hidden states of a tiny model " * 4, "w1 w2 w3 " * 9,
         "the lazy dog " * 10]


@pytest.fixture(scope="module")
def cluster(ray_clusters: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("node-local-store")
    hidden = root / "node-local"
    hidden.mkdir()
    env = ray_clusters.env()
    started = ray_clusters.start(env, second_node_prefix=ray_clusters.hiding_command(hidden))
    return {"address": started.address, "env": {**env, "RAY_ADDRESS": started.address}, "hidden": hidden, "root": root}


def error_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("hrsa:")]


def test_an_extraction_into_a_node_local_store_is_refused_before_anything_is_created(cluster: dict[str, Any],
                                                                                   tiny_models: Any) -> None:
    corpus = cluster["root"] / "words.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    store = cluster["hidden"] / "store"
    done = subprocess.run([sys.executable, "-m", "hrsa", "extract", "--address", cluster["address"], "--store", str(store),
                           "--model", str(tiny_models.dir("llama")), "--corpus", str(corpus), "--workers", "2",
                           "--shard-tokens", "64"], env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = error_lines(done)
    assert line.startswith("hrsa: error: Expected --store on storage every node of the Ray cluster reaches.")
    assert str(store) in line and "do not see" in line
    assert list(cluster["hidden"].iterdir()) == []  # no store, no marker left


def test_an_analysis_of_a_node_local_store_on_ray_is_refused_naming_the_store(cluster: dict[str, Any]) -> None:
    from hrsa.store import ActivationStore
    from hrsa.store.testing import make_table

    rng = np.random.default_rng(0)
    path = cluster["hidden"] / "analysed"
    store = ActivationStore.open(path, mode="w-")
    table = make_table((300, 200))
    cid = store.write_corpus(table, tokenizer={"name": "t", "fingerprint": "f"}, source="test")
    for mid in ("a", "b"):
        store.create_model(mid, corpus=cid, n_hidden_states=2, hidden_size=8, dtype="float32", hidden_states=[0, 1],
                           chunk_tokens=64, shard_tokens=128)
        writer = store.writer(mid)
        states = {k: rng.normal(size=(table.n_tokens, 8)).astype(np.float32) for k in range(2)}
        for unit in writer.units():
            writer.write_unit(unit, {k: v[unit.start : unit.stop] for k, v in states.items()})
    env = {k: v for k, v in cluster["env"].items()}
    done = subprocess.run([sys.executable, "-m", "hrsa", "analyze", "--store", str(path), "--pair", "a", "b", "--workers",
                           "2", "--block-tokens", "64", "--out", str(cluster["root"] / "out"), "--no-store-results"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=os.getcwd())
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = error_lines(done)
    assert line.startswith("hrsa: error: Expected --store on storage every node of the Ray cluster reaches.")
    assert "verify --reset-damaged" not in line
    assert not (cluster["root"] / "out").exists()
