"""Several `hrsa extract` processes on one store at once: each unit of a model is written exactly once.

Real CLI processes, each with its own local Ray, racing on one local store. The writes are counted by what each
process reports it wrote ("K of N units written this run"): exactly-once means the K add up to N.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hrsa.store import ActivationStore
from hrsa.store.verify import verify_store

pytestmark = pytest.mark.integration

TEXTS = [f"document {i}: " + " ".join(f"w{j}" for j in range(i * 7 % 23 + 5)) for i in range(24)]


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    return path


def _extract(store: Path, model: Path, corpus: Path, name: str) -> subprocess.Popen[str]:
    args = ["extract", "--store", str(store), "--model", str(model), "--corpus", str(corpus), "--name", name,
            "--shard-tokens", "16", "--workers", "1"]
    return subprocess.Popen([sys.executable, "-c", "from hrsa.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


_outputs: list[str] = []  # the last _written call's stdout of each process


def _written(procs: list[subprocess.Popen[str]]) -> list[tuple[int, int]]:
    outs = [p.communicate(timeout=600) for p in procs]
    _outputs[:] = [out for out, _ in outs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    found = [re.search(r"(\d+) of (\d+) units written this run", out) for out, _ in outs]
    assert all(found), outs
    return [(int(m.group(1)), int(m.group(2))) for m in found]  # type: ignore[union-attr]


def test_four_extractions_of_one_model_write_each_unit_once(tiny_models: Any, tmp_path: Path, ray_local: Any) -> None:
    corpus, model = _corpus(tmp_path), tiny_models.dir("llama")
    written = _written([_extract(tmp_path / "store", model, corpus, "tiny") for _ in range(4)])
    outputs = list(_outputs)
    n_units = written[0][1]
    assert n_units >= 8 and sum(k for k, _ in written) == n_units, written
    if sum(k > 0 for k, _ in written) >= 2:  # they raced: the first to start saw the others' units done meanwhile
        assert any("by other extractions running at once" in out for out in outputs), outputs
    store = ActivationStore.open(str(tmp_path / "store"))
    assert verify_store(store).ok
    # The same bytes as one extraction alone (in this process, on the session's Ray: a fifth CLI process would
    # start a Ray of its own, ~20 s, to check what the racing ones already checked).
    from hrsa.extract.job import ExtractConfig, run_extraction

    alone_result = run_extraction(ExtractConfig(store=str(tmp_path / "alone"), model=str(model), corpus=str(corpus),
                                                name="tiny", shard_tokens=16, workers=1))
    assert (alone_result.units_written, alone_result.n_units) == (n_units, n_units)
    alone = ActivationStore.open(str(tmp_path / "alone"))
    for k in store.model_info("tiny").hidden_states:
        assert np.array_equal(store.hidden_state("tiny", k).compute(), alone.hidden_state("tiny", k).compute())


@pytest.mark.slow  # 100 s on 2 cores; the store-level race (tests/store/test_claims.py) covers creation in the default run
def test_four_extractions_of_different_models_into_one_store(tiny_models: Any, tmp_path: Path) -> None:
    corpus, model = _corpus(tmp_path), tiny_models.dir("llama")
    names = [f"tiny-{i}" for i in range(4)]
    written = _written([_extract(tmp_path / "store", model, corpus, name) for name in names])
    assert all(k == n for k, n in written), written
    store = ActivationStore.open(str(tmp_path / "store"))
    assert store.models() == names and len(store.corpora()) == 1
    assert verify_store(store).ok
