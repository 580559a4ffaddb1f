"""The chunked (GradCache) backward gives the gradients of the plain one, dropout included."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from hrsa.train.gradcache import contrastive_backward
from hrsa.train.loss import info_nce
from hrsa.train.model import EmbeddingModel, TokenBatch, tokenize

WORDS = "the quick brown fox jumps over the lazy dog tiny model hidden states w1 w2 w3".split()
QUERIES = [" ".join(WORDS[i % 9:i % 9 + 2 + i % 5]) for i in range(7)]
DOCS = [" ".join(WORDS[(3 * i) % 13:(3 * i) % 13 + 1 + i % 6]) for i in range(14)]


def _loss(embeddings: Any) -> torch.Tensor:
    return info_nce(embeddings[0], embeddings[1], temperature=0.05, group_size=2, gather=False)


def _grads(model: EmbeddingModel) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _load(tiny_models: Any, kind: str) -> tuple[EmbeddingModel, Any]:
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.train.model import load_embedding_model

    model, tok, _ = load_embedding_model(parse_model_spec(str(tiny_models.dir(kind))), device="cpu")
    return model, tok


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want) and want
    scale = max(float(g.abs().max()) for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 100])
def test_chunked_backward_equals_plain_backward(tiny_models: Any, chunk_size: int) -> None:
    model, tok = _load(tiny_models, "llama")
    model.eval()  # no dropout: the plain pass is the oracle
    q, d = tokenize(tok, QUERIES, max_length=32), tokenize(tok, DOCS, max_length=32)
    plain_loss = contrastive_backward(model, [q, d], _loss)
    plain = _grads(model)
    chunked_loss = contrastive_backward(model, [q, d], _loss, chunk_size=chunk_size)
    assert float(chunked_loss) == pytest.approx(float(plain_loss), rel=1e-5)
    _close(_grads(model), plain)


def _reference_with_dropout(model: EmbeddingModel, inputs: list[TokenBatch],
                            chunk_size: int) -> dict[str, torch.Tensor]:
    """The true gradient of the loss under the chunked pass's dropout masks: each chunk forwarded once, with a
    graph, in the same RNG order as GradCache's first pass, then a single backward through everything."""
    parts = [torch.cat([model.embed(b.rows(i, i + chunk_size)) for i in range(0, len(b), chunk_size)]) for b in inputs]
    _loss(parts).backward()
    return _grads(model)


@pytest.mark.parametrize("chunk_size", [2, 5])
def test_chunked_backward_replays_dropout_exactly(tiny_models: Any, chunk_size: int) -> None:
    model, tok = _load(tiny_models, "bert")  # hidden and attention dropout 0.1
    model.train()
    q, d = tokenize(tok, QUERIES, max_length=32), tokenize(tok, DOCS, max_length=32)
    torch.manual_seed(7)
    want = _reference_with_dropout(model, [q, d], chunk_size)
    torch.manual_seed(7)
    contrastive_backward(model, [q, d], _loss, chunk_size=chunk_size)
    _close(_grads(model), want)
    # Dropout is really on: another seed gives other gradients.
    torch.manual_seed(8)
    other = _reference_with_dropout(copy.deepcopy(model), [q, d], chunk_size)
    assert any(not torch.allclose(other[n], want[n], rtol=1e-3, atol=1e-6) for n in want)


def test_gradient_checkpointing_keeps_the_gradients(tiny_models: Any) -> None:
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.train.model import load_embedding_model

    spec = parse_model_spec(str(tiny_models.dir("qwen2")), attention="bidirectional")
    plain, tok, _ = load_embedding_model(spec, device="cpu")
    checkpointed, _, _ = load_embedding_model(spec, device="cpu", gradient_checkpointing=True)
    q, d = tokenize(tok, QUERIES, max_length=32), tokenize(tok, DOCS, max_length=32)
    contrastive_backward(plain, [q, d], _loss)
    contrastive_backward(checkpointed, [q, d], _loss, chunk_size=3)
    _close(_grads(checkpointed), _grads(plain))
