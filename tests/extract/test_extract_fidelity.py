"""Fidelity on the two real packaged models: what the store holds for a document is what a direct
transformers forward pass of that document alone gives.

- Through the store (Ray, one worker, ``token_budget=1`` so every document runs alone): bit for bit.
  The reference runs at the worker's torch thread count: CPU kernels split their sums by thread, and
  1 vs 2 threads differ by ~1 ulp on some shapes.
- Batched (the default budget: documents of different lengths right-padded into one pass, in
  process): within ``BATCH_RTOL`` of each hidden state's largest |value|. Padding changes the shapes
  that blocked fp32 kernels sum over, not which tokens are attended to. Measured on three SpamAssassin
  mails: SmolLM2 up to 1.2e-6 of the largest value (2.7e-4 absolute next to its ~2.5e4 outlier
  features), MiniLM within a few ulps; 1e-5 leaves ~10x room.

Costs: SmolLM2's worker loads the session's Hugging Face folder of it (the packaged GGUF dequantised once, the same
float32 weights: ~2 s, where the GGUF takes ~30 s), its reference is the session's (shared with test_models.py);
MiniLM loads in ~4 s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hrsa.extract.forward import batched_hidden_states, torch_threads
from hrsa.extract.job import ExtractConfig, run_extraction
from hrsa.extract.models import LoadedModel, forward_hidden_states, load_model, parse_model_spec
from hrsa.extract.packaged import PackagedModelNotFoundError, packaged_model_path
from hrsa.store import ActivationStore

BATCH_RTOL = 1e-5
SPAM_RECORDS = (27, 45, 33)  # three short mails (342, 142, 294 characters): different lengths, so batches pad
MODELS = {"smollm2": "smollm2-135m-instruct", "minilm": "all-minilm-l6-v2"}


def requires_packaged(name: str) -> pytest.MarkDecorator:
    try:
        packaged_model_path(name)
    except PackagedModelNotFoundError as error:
        return pytest.mark.skip(reason=str(error))
    return pytest.mark.real_model


pytestmark = [pytest.mark.real_model, pytest.mark.integration, pytest.mark.data]



@pytest.fixture
def spam_corpus(shared_data: Path, tmp_path: Path) -> Path:
    lines = (shared_data / "spam-assassin" / "spam-assassin.jsonl").read_text().splitlines()
    path = tmp_path / "spam.jsonl"
    path.write_text("".join(lines[i] + "\n" for i in SPAM_RECORDS))
    return path


def reference_model(name: str, request: pytest.FixtureRequest) -> LoadedModel:
    """The in-process model to compare with: SmolLM2 from the session (shared), MiniLM loaded here."""
    if name == "smollm2":
        return request.getfixturevalue("smollm2")
    return load_model(parse_model_spec(f"packaged:{MODELS['minilm']}"), device="cpu")


@pytest.mark.parametrize(
    "name",
    [pytest.param("smollm2", marks=requires_packaged(MODELS["smollm2"])),
     pytest.param("minilm", marks=requires_packaged(MODELS["minilm"]))],
)
def test_stored_hidden_states_equal_a_lone_forward_pass(
    name: str, spam_corpus: Path, tmp_path: Path, ray_local: Any, request: pytest.FixtureRequest
) -> None:
    # Step 1: extract through Ray into a store, one document per forward pass.
    spec = str(request.getfixturevalue("smollm2_folder")) if name == "smollm2" else f"packaged:{MODELS[name]}"
    config = ExtractConfig(store=str(tmp_path / "store"), model=spec, dtype="float32", corpus=str(spam_corpus),
                           name="real", workers=1, token_budget=1)
    result = run_extraction(config)
    model = reference_model(name, request)
    store = ActivationStore.open(config.store)
    info = store.model_info("real")
    assert info.complete and result.units_written == info.n_units
    assert (info.n_hidden_states, info.hidden_size, info.dtype) == (model.n_hidden_states, model.hidden_size, "float32")
    assert info.attention == model.attention  # SmolLM2 causal, MiniLM bidirectional
    # Step 2: the documents as stored (the model's own tokenizer, special tokens included).
    docs_table = store.documents(info.corpus)
    assert list(docs_table["record_id"]) == [json.loads(line)["id"] for line in spam_corpus.read_text().splitlines()]
    token_ids = store.tokens(info.corpus)["token_id"].to_numpy()
    docs = [token_ids[a:b].tolist() for a, b in zip(docs_table["start"], docs_table["stop"])]
    assert docs == [model.tokenizer(json.loads(line)["text"]).input_ids
                    for line in spam_corpus.read_text().splitlines()]
    assert len({len(d) for d in docs}) == len(docs)  # different lengths: the batched check below pads
    # Step 3: bit for bit against each document alone, at the worker's thread count.
    with torch_threads(max(1, int(ray_local.n_cpus))):  # one worker gets every CPU of the node
        want = forward_hidden_states(model, docs)
    for k in range(info.n_hidden_states):
        got = store.hidden_state("real", k).compute()  # (N, D)
        for d, (a, b) in enumerate(zip(docs_table["start"], docs_table["stop"])):
            np.testing.assert_array_equal(got[a:b], want[d][k].numpy(), err_msg=f"doc {d} hidden state {k}")
    # Step 4: the default budget batches all three documents (right-padded): equal within BATCH_RTOL.
    layers = list(range(info.n_hidden_states))
    batched = dict(batched_hidden_states(model, docs, layers, token_budget=8192))
    for d, ref in enumerate(want):
        for k in layers:
            tol = BATCH_RTOL * float(ref[k].abs().max())
            err = float((batched[d][k] - ref[k]).abs().max())
            assert err <= tol, f"doc {d} hidden state {k}: batched differs by {err:.3g} > {tol:.3g}"
