"""benchmarks/train.py --quick runs to the end and prints its figures (no timing asserts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train.py"


def test_quick_benchmark_prints_its_figures() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    for figure in ("samples/s per worker: plain", "overhead ratio (chunked / plain):", "peak memory plain: RSS",
                   "peak memory chunked: RSS"):
        assert figure in run.stdout, run.stdout + run.stderr
