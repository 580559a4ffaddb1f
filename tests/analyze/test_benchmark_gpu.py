"""benchmarks/gpu.py, the GPU machine's one run, at smoke size on the CPU: every part runs to its figures, so a lent
GPU's minutes are not spent finding a broken script (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"
# (a) times each GEMM 0.2 s, not 2 s: still at least one product of each dtype, and no figure of it is asserted.
SMOKE = ["--device", "cpu", "--tokens", "1536", "--hidden", "48", "--states", "3", "--extract-docs", "2",
         "--gemm-seconds", "0.2"]


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *SMOKE, "--dir", str(tmp_path / "stores"), *args],
                          capture_output=True, text=True, timeout=300, check=True)


def test_cka_part_compares_hrsa_with_the_official_approach(tmp_path: Path) -> None:
    (tmp_path / "stores").mkdir()
    out = run(tmp_path, "--only", "cka", "--json", str(tmp_path / "cka.json"))
    for figure in ("(a) GEMM rates", "the official approach's speed", "roofline:", "CKA matrices agree", "projected"):
        assert figure in out.stdout, out.stdout + out.stderr
    figures = json.loads((tmp_path / "cka.json").read_text())["cka"]
    assert figures["max_diff"] < 1e-4  # the two CKA matrices are of the same activations
    assert list((tmp_path / "stores").iterdir()) == []  # the synthetic stores are cleaned up


@pytest.mark.data  # the State of the Union corpus of ../shared/data
def test_extract_part_writes_every_unit_and_times_bare_forward_passes(tmp_path: Path) -> None:
    (tmp_path / "stores").mkdir()
    out = run(tmp_path, "--only", "extract", "--json", str(tmp_path / "extract.json"))
    assert "extraction / bare forward passes" in out.stdout, out.stdout + out.stderr
    figures = json.loads((tmp_path / "extract.json").read_text())["extract"]
    assert figures["tokens"] > 0 and figures["attn"] == "sdpa"
