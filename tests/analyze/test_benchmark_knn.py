"""benchmarks/knn.py --quick runs to the end, prints its three sections, and its figures hold: exact search agrees
with numpy float64 brute force, recall is a fraction, and the measured peak of (c) stays under the budget it states."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "knn.py"


@pytest.mark.slow
def test_quick_knn_benchmark_figures(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out), "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    for figure in ("ratio numpy / FAISS", "recall@10", "peak RSS above baseline"):
        assert figure in run.stdout, run.stdout + run.stderr
    figures = json.loads(out.read_text())
    speed, hnsw, memory = figures["speed"], figures["hnsw"], figures["memory"]
    assert math.isfinite(speed["ratio"]) and speed["ratio"] > 0
    assert speed["agreement"] >= 0.99  # the same neighbours as float64 brute force, in order
    assert speed["offset_1e4_agreement"] >= 0.99  # also where every cosine sits within ~1e-8 of the others
    assert 0.0 <= hnsw["recall"] <= 1.0 and hnsw["recall"] >= 0.9
    assert math.isfinite(hnsw["speedup"]) and hnsw["speedup"] > 0
    plan = memory["plan"]
    assert plan["sample_reads"] > 1  # the sample does not fit the budget in one block: it is read by blocks
    assert plan["estimated_peak"] <= memory["budget"]
    assert 0 < memory["measured_peak"] <= memory["budget"]
    assert memory["measured_peak"] <= 1.25 * memory["estimate"]  # RSS also counts allocator and library pages
    assert not list(tmp_path.glob("hrsa-knn-bench-*"))  # its store is removed
