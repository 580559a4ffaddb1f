"""InfoNCE: against a float64 oracle, and 2 gathering workers against one process holding the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hrsa.train.loss import info_nce


def _oracle(q: np.ndarray, d: np.ndarray, temperature: float, group: int) -> float:
    """-mean log softmax at each query's own positive, in plain float64 loops."""
    total = 0.0
    for i in range(len(q)):
        scores = [float(q[i] @ d[j]) / temperature for j in range(len(d))]
        top = max(scores)
        log_z = top + np.log(sum(np.exp(s - top) for s in scores))
        total += log_z - scores[i * group]
    return total / len(q)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_info_nce_matches_a_float64_oracle(group: int) -> None:
    rng = np.random.default_rng(group)
    q = rng.standard_normal((5, 8))
    d = rng.standard_normal((5 * group, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    got = info_nce(torch.from_numpy(q), torch.from_numpy(d), temperature=0.05, group_size=group, gather=False)
    assert float(got) == pytest.approx(_oracle(q, d, 0.05, group), rel=1e-5)


def test_info_nce_rejects_a_wrong_number_of_documents() -> None:
    with pytest.raises(ValueError, match="documents"):
        info_nce(torch.ones(2, 3), torch.ones(5, 3), temperature=0.1, group_size=2, gather=False)


# Each rank: its half of the batch, gathered documents, gradients averaged over ranks. Plain, chunked
# (chunk 3 does not divide the 4 local queries or 8 documents), FSDP2, and FSDP2 chunked (only the last chunk's
# backward reduce-scatters: the earlier chunks' gradients must wait for it, not be lost).
_WORKER = textwrap.dedent('''
    import copy, datetime, sys, torch, torch.distributed as dist
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.train.gradcache import contrastive_backward
    from hrsa.train.loss import info_nce
    from hrsa.train.model import load_embedding_model, tokenize
    from hrsa.train.worker import average_gradients, shard_fsdp

    rank, folder, out, queries, docs = int(sys.argv[1]), sys.argv[2], sys.argv[3], eval(sys.argv[4]), eval(sys.argv[5])
    # A file rendezvous, not a TCP port picked in advance (another process could take that port in between); a hang
    # becomes an error after two minutes.
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    spec = parse_model_spec(folder, attention="bidirectional")
    base, tok, _ = load_embedding_model(spec, device="cpu")
    results = {}
    for mode in ("plain", "chunked", "fsdp", "fsdp-chunked"):
        model = copy.deepcopy(base)
        b = len(queries) // 2
        q = tokenize(tok, queries[rank * b:(rank + 1) * b], max_length=32)
        d = tokenize(tok, docs[rank * 2 * b:(rank + 1) * 2 * b], max_length=32)
        if mode.startswith("fsdp"):
            shard_fsdp(model, torch.device("cpu"))
        loss_fn = lambda e: info_nce(e[0], e[1], temperature=0.05, group_size=2, gather=True)
        contrastive_backward(model, [q, d], loss_fn, chunk_size=3 if mode.endswith("chunked") else None)
        if mode.startswith("fsdp"):
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        else:
            average_gradients(model, 2)
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[mode] = grads
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
''')


@pytest.mark.integration
def test_two_gathering_workers_give_the_gradients_of_one_process(tiny_models: Any, tmp_path: Path) -> None:
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.train.gradcache import contrastive_backward
    from hrsa.train.model import load_embedding_model, tokenize

    folder = str(tiny_models.dir("llama"))
    words = "the quick brown fox jumps over the lazy dog tiny model hidden states".split()
    queries = [" ".join(words[i:i + 3 + i % 4]) for i in range(8)]
    docs = [" ".join(words[(2 * i + j) % 12:(2 * i + j) % 12 + 2 + j]) for i in range(8) for j in range(2)]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), folder, str(tmp_path), repr(queries), repr(docs)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the two workers did not finish in 300 s:\n" + "\n".join(p.communicate()[0] for p in procs))
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    # The oracle: one process, the whole batch, no gathering.
    model, tok, _ = load_embedding_model(parse_model_spec(folder, attention="bidirectional"), device="cpu")
    contrastive_backward(model, [tokenize(tok, queries, max_length=32), tokenize(tok, docs, max_length=32)],
                         lambda e: info_nce(e[0], e[1], temperature=0.05, group_size=2, gather=False))
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    scale = max(float(g.abs().max()) for g in expected.values())
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for mode, grads in results.items():
            assert set(grads) == set(expected), mode
            for name, grad in grads.items():
                torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5 * scale, msg=f"{mode} {name}")


def _records(tmp_path: Path, rows: list[dict]) -> list:
    import json

    from hrsa.train.data import load_training_records

    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_training_records(path, negatives=1, batch_size=2)


def test_a_duplicated_pair_or_a_second_positive_of_a_query_is_masked_not_a_negative(tmp_path: Path) -> None:
    """A pair twice in the training file (both copies in one batch), or one query with two positives: each query's
    document group held a positive of its own text, scored as a wrong answer (a perfect model's loss stayed log 2)."""
    from hrsa.train.data import global_batch

    twice = {"query": "what is hrsa", "pos": "a way to compare hidden states", "negs": ["n1", "n2"]}
    batch = global_batch(_records(tmp_path, [twice, twice]), 0, batch_size=2, negatives=1, seed=0)
    assert batch.masked == ((0, 2), (1, 0))  # each query's other copy of its positive
    two = [{"query": "capital of france", "pos": "Paris is the capital of France.", "negs": ["Lyon", "Nice"]},
           {"query": "capital  of france", "pos": "France's capital city is Paris.", "negs": ["Lyon", "Nice"]}]
    batch = global_batch(_records(tmp_path, two), 0, batch_size=2, negatives=1, seed=0)
    assert batch.masked == ((0, 2), (1, 0))
    assert batch.shard(1, 2).masked == ((0, 0),)  # the second worker's query, against the gathered documents
    assert batch.shard(0, 2).masked == ((0, 2),)  # the first worker's: its own query only, never the second's
    distinct = [{"query": f"q{i}", "pos": f"p{i}", "negs": ["n"]} for i in range(2)]
    assert global_batch(_records(tmp_path, distinct), 0, batch_size=2, negatives=1, seed=0).masked == ()


def test_masked_documents_leave_the_softmax_as_a_float64_oracle_says() -> None:
    """A perfect model (each query its positive, orthogonal to the rest) with each positive twice in the batch: log 2
    unmasked, ~0 masked; and on random embeddings, equal to the float64 loops over the unmasked documents."""
    q = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # [pos, neg] x 2
    assert float(info_nce(q, d, temperature=0.02, group_size=2, gather=False)) == pytest.approx(np.log(2), rel=1e-4)
    assert float(info_nce(q, d, temperature=0.02, group_size=2, gather=False, masked=((0, 2), (1, 0)))) < 1e-20
    rng = np.random.default_rng(0)
    qs, ds = rng.standard_normal((3, 8)), rng.standard_normal((6, 8))
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    ds /= np.linalg.norm(ds, axis=1, keepdims=True)
    masked = ((0, 3), (0, 4), (2, 1))
    total = 0.0
    for i in range(3):
        scores = [float(qs[i] @ ds[j]) / 0.05 for j in range(6) if (i, j) not in masked]
        own = float(qs[i] @ ds[2 * i]) / 0.05
        total += np.log(sum(np.exp(s) for s in scores)) - own
    got = info_nce(torch.from_numpy(qs), torch.from_numpy(ds), temperature=0.05, group_size=2, gather=False,
                   masked=masked)
    assert float(got) == pytest.approx(total / 3, rel=1e-5)


def test_a_training_step_leaves_the_masked_documents_out(tiny_models: Any, tmp_path: Path, monkeypatch) -> None:
    """The step hands its batch's masked pairs to the loss (the real one, spied on): a pair twice in the file."""
    import json

    import hrsa.train.loss as loss
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.train.config import TrainConfig
    from hrsa.train.worker import setup_session, train_step

    data = tmp_path / "t.jsonl"
    twice = {"query": "the quick fox", "pos": "the lazy dog", "negs": ["w1 w2 w3"]}
    data.write_text((json.dumps(twice) + "\n") * 2)
    config = TrainConfig(backbone=str(tiny_models.dir("llama")), data=data, output=tmp_path / "run", batch_size=2,
                         max_steps=1, max_length=16)
    seen = []
    real = loss.info_nce
    monkeypatch.setattr(loss, "info_nce", lambda *a, **k: (seen.append(k.get("masked")), real(*a, **k))[1])
    spec = parse_model_spec(config.backbone, attention="bidirectional").to_dict()
    train_step(setup_session(config, spec, 0, 1, torch.device("cpu"), None))
    assert seen and all(m == ((0, 2), (1, 0)) for m in seen), seen
