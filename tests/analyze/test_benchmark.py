"""benchmarks/analyze.py --quick runs to the end and prints its three figures (no timing asserts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "analyze.py"


@pytest.mark.slow
def test_quick_benchmark_prints_its_figures(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=600, check=True)
    for figure in ("ratio streaming / in-memory", "growth of the peak", "passes:", "holding both models", "groups: ratio"):
        assert figure in run.stdout, run.stdout + run.stderr
    assert list(tmp_path.iterdir()) == []  # the synthetic stores are cleaned up
