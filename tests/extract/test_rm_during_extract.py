"""`hrsa store rm` racing `hrsa extract` of the same model, end to end.

The extraction holds a lease on its model for as long as it runs (tests/store/test_model_lease.py has the store
level): `rm` between two units (no unit claim live then) is refused in one line naming the extraction, which goes on
and succeeds; a deletion that wins the race makes the extraction stop in one line, never write into what is left.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hrsa.store import ActivationStore
from hrsa.store.units import live_claims
from hrsa.store.verify import verify_store


pytestmark = pytest.mark.integration

TEXTS = {f"d{i}": f"w{i % 7} the quick brown fox jumps over the lazy dog {i}" for i in range(12)}


def write_jsonl(path: Path, records: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in records.items()))
    return path

# The real CLI in a driver process that pauses once after its first unit's result came back, until told to go on:
# `rm` then lands between units, deterministically.
PAUSING_DRIVER = r"""
import os, sys, time
from hrsa.extract import job
folder = os.environ["HRSA_TEST_PAUSE"]
real = job._dispatch

def paused(target, pending, on_result, start):
    def hook(result):
        on_result(result)
        if not os.path.exists(os.path.join(folder, "paused")):
            open(os.path.join(folder, "paused"), "w").close()
            while not os.path.exists(os.path.join(folder, "go")):
                time.sleep(0.05)
    return real(target, pending, hook, start)

job._dispatch = paused
from hrsa.cli import main
main()
"""


def _hrsa(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "hrsa"), *args], capture_output=True, text=True,
                          timeout=120)


def test_rm_between_two_units_of_a_running_extraction_is_refused_and_the_extraction_succeeds(
        ray_local: Any, tiny_models: Any, tmp_path: Path) -> None:
    import os

    import ray

    corpus = write_jsonl(tmp_path / "corpus.jsonl", TEXTS)
    store = str(tmp_path / "store")
    args = ["extract", "--store", store, "--model", str(tiny_models.dir("llama")), "--corpus", str(corpus), "--name",
            "tiny", "--workers", "1", "--shard-tokens", "16", "--address", ray.get_runtime_context().gcs_address]
    driver = subprocess.Popen([sys.executable, "-c", PAUSING_DRIVER, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "HRSA_TEST_PAUSE": str(tmp_path)})
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "paused").exists():
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "the extraction never finished a unit"
            time.sleep(0.1)
        opened = ActivationStore.open(store, mode="r")
        raw = opened.group("models").store
        while live_claims(raw, "models/tiny"):  # the worker's second unit in flight: let it finish
            assert time.monotonic() < deadline
            time.sleep(0.1)
        done = opened.model_info("tiny").units_done
        assert 1 <= done < opened.model_info("tiny").n_units  # between units: some done, none claimed
        rm = _hrsa("store", "rm", store, "tiny", "--yes")
        assert rm.returncode == 2, (rm.stdout, rm.stderr)
        lines = rm.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in rm.stderr, rm.stderr
        assert re.search(rf"extraction .*:{driver.pid}\b", lines[0]) and "stop it" in lines[0], lines[0]
        assert ActivationStore.open(store).model_info("tiny").units_done == done  # nothing deleted
    finally:
        (tmp_path / "go").touch()
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err[-3000:]
    assert "units written this run" in out, out
    info = ActivationStore.open(store).model_info("tiny")
    assert info.complete and verify_store(ActivationStore.open(store)).ok
    rm = _hrsa("store", "rm", store, "tiny", "--yes")  # the extraction over: its lease is gone
    assert rm.returncode == 0, rm.stderr
    assert ActivationStore.open(store).models() == []


def test_a_resume_whose_model_is_deleted_as_it_starts_stops_in_one_line(
        ray_local: Any, tiny_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The extraction found the model (to resume it), then an `rm` deleted it before the extraction held it: the
    extraction must say so in one line, not bind its workers to a model that is gone."""
    from hrsa.extract.config import ExtractConfig
    from hrsa.extract.job import ExtractionWorkers, run_extraction
    from hrsa.store.errors import HrsaError

    corpus = write_jsonl(tmp_path / "corpus.jsonl", TEXTS)
    config = ExtractConfig(store=str(tmp_path / "store"), model=str(tiny_models.dir("llama")), corpus=str(corpus),
                           name="tiny", shard_tokens=32, workers=1)
    with ExtractionWorkers() as workers:  # started once for both runs
        run_extraction(config, workers=workers)
        store = ActivationStore.open(config.store, mode="r+")
        writer = store.writer("tiny")
        writer.reset_unit(writer.units()[1])  # to resume
        check = ActivationStore.check_corpus

        def deleted_meanwhile(self: ActivationStore, cid: str) -> None:
            check(self, cid)
            ActivationStore.open(config.store, mode="r+").delete_model("tiny")

        monkeypatch.setattr(ActivationStore, "check_corpus", deleted_meanwhile)
        with pytest.raises(HrsaError) as failure:
            run_extraction(config, workers=workers)
    message = str(failure.value)
    assert "\n" not in message and "deleted" in message and "Run the same command again" in message, message
    store = ActivationStore.open(config.store)
    assert store.models() == store.half_created_models() == []  # nothing written into it after the deletion
