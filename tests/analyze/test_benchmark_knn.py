"""benchmarks/knn.py --quick runs to the end and prints its three figures (no timing asserts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "knn.py"


@pytest.mark.slow
def test_quick_knn_benchmark_prints_its_figures() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=600, check=True)
    for figure in ("ratio numpy / FAISS", "growth of the peak", "recall@10"):
        assert figure in run.stdout, run.stdout + run.stderr
