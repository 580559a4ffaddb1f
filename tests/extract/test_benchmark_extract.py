"""benchmarks/extract.py --quick runs to the end and prints its figures (no timing asserts).

Run on a tiny model built here, so the smoke test checks the script, not SmolLM2's loading time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "extract.py"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.data
def test_quick_benchmark_prints_its_figures(tiny_models: Any, tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--model", str(tiny_models.dir("llama")),
                          "--max-tokens", "64", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    for figure in ("overhead ratio (extraction unit phase / bare forward", "GB/s per worker", "tokens/s:",
                   "peak RSS after loading:", "MiB on disk", "codecs on these activations", "blosc-lz4-shuffle"):
        assert figure in run.stdout, run.stdout + run.stderr
    assert list(tmp_path.iterdir()) == []  # the stores are cleaned up
