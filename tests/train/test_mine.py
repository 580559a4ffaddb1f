"""Hard-negative mining: FAISS + the positive-aware rule against an independent float64 brute force."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from hrsa.train.mine import MineConfig, mine_from_embeddings, mine_negatives

RATIO = 0.95


class TableEncoder:
    """A fake embedder: each text's vector is looked up in a table (so every score is chosen by the test)."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table

    def encode(self, texts, **kwargs) -> np.ndarray:
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _synthetic(tmp_path: Path, n_docs: int = 40, n_queries: int = 12, seed: int = 3):
    """Docs are one-hot vectors, so query i's score with doc j is its j-th coordinate: chosen on a grid."""
    rng = np.random.default_rng(seed)
    dim = n_docs + 1  # one more axis for a near-copy of doc 0 (different spacing, same text otherwise)
    docs = [f"doc number {j}" for j in range(n_docs)]
    table = {t: np.eye(dim)[j] for j, t in enumerate(docs)}
    variant = "  doc   number 0 "  # an exact duplicate of doc 0 once whitespace is folded
    table[variant] = np.eye(dim)[n_docs]
    grid = np.linspace(0.05, 1.0, dim)
    records, pos_idx = [], []
    for i in range(n_queries):
        scores = rng.permutation(grid)
        pos = int(rng.integers(n_docs))
        if i == 1:  # its positive ranks near the bottom: few candidates pass the 95% rule
            pos = int(np.argsort(scores[:n_docs])[2])
        if i == 0:
            pos = 0
            scores[n_docs] = 0.9 * scores[0]  # the copy of the positive would pass the score rule
        vec = scores / np.linalg.norm(scores)
        table[f"query {i}"] = vec
        records.append({"query": f"query {i}", "pos": docs[pos], "instruction": "find it" if i % 2 else None})
        pos_idx.append(pos)
    for r in records:
        if r["instruction"] is None:
            del r["instruction"]
    corpus = docs + [variant]
    return records, corpus, table


def _brute_force(records, corpus, table, k, ratio):
    """Independent: float64 scores against the whole corpus, sorted, filtered by text and by the rule."""
    fold = " ".join
    first: dict[str, str] = {}
    for t in corpus:  # one document per text once whitespace is folded (the tokenizer sees one), the first kept
        first.setdefault(fold(t.split()), t)
    corpus = list(first.values())
    out = []
    for r in records:
        q = table[r["query"]].astype(np.float32).astype(np.float64)
        pos_score = q @ table[r["pos"]].astype(np.float32).astype(np.float64)
        scored = [(q @ table[t].astype(np.float32).astype(np.float64), t) for t in corpus
                  if fold(t.split()) != fold(r["pos"].split())]
        scored.sort(key=lambda st: -st[0])
        out.append([t for s, t in scored if s < ratio * pos_score][:k])
    return out


def test_mine_matches_brute_force_and_rules(tmp_path: Path) -> None:
    records, corpus, table = _synthetic(tmp_path)
    inp = _write_jsonl(tmp_path / "pairs.jsonl", records)
    corpus_file = _write_jsonl(tmp_path / "corpus.jsonl", [{"body": t} for t in corpus + corpus[:5]])  # repeats too
    k = 6
    config = MineConfig(input=inp, corpus=corpus_file, corpus_field="body", k=k, depth=3, out=tmp_path / "out.jsonl")
    result = mine_negatives(config, encoder=TableEncoder(table))
    got = [json.loads(line) for line in result.out.read_text().splitlines()]
    expected = _brute_force(records, corpus, table, k, RATIO)
    for r in records:  # precondition of an exact comparison: no near-ties, nothing near a threshold
        scores = np.sort([table[r["query"]] @ table[t] for t in corpus])
        threshold = RATIO * (table[r["query"]] @ table[r["pos"]])
        assert np.diff(scores).min() > 1e-4 and np.abs(scores - threshold).min() > 1e-4
    # the scores are far from each other and from the thresholds, so float32 FAISS must agree exactly
    assert [g["negs"] for g in got] == expected
    for r, g in zip(records, got):
        assert (g["query"], g["pos"], g.get("instruction")) == (r["query"], r["pos"], r.get("instruction"))
        q = table[r["query"]]
        assert r["pos"] not in g["negs"] and "  doc   number 0 " not in g["negs"]
        assert all(q @ table[n] < RATIO * (q @ table[r["pos"]]) for n in g["negs"])
    assert result.n_short == sum(len(e) < k for e in expected) >= 1
    assert result.n_corpus == len(corpus) - 1 and result.n_queries == len(records)  # the spaced copy of doc 0 folded


def test_mine_from_embeddings_deepens_until_complete() -> None:
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(300, 16)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[:20] + 0.05 * rng.normal(size=(20, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    pos_scores = np.einsum("qd,qd->q", queries, docs[:20]).astype(np.float64)
    exclude = [{i} for i in range(20)]
    got = mine_from_embeddings(queries, docs, pos_scores, exclude, k=5, max_score_ratio=0.5, depth=1)
    scores = queries.astype(np.float64) @ docs.astype(np.float64).T
    for i, negs in enumerate(got):
        order = [j for j in np.argsort(-scores[i], kind="stable") if j != i and scores[i, j] < 0.5 * pos_scores[i]]
        assert negs == order[:5]


def test_keep_existing_negatives(tmp_path: Path) -> None:
    records, corpus, table = _synthetic(tmp_path, n_queries=4)
    records[2]["negs"] = ["doc number 39", "doc number 38"]
    inp = _write_jsonl(tmp_path / "pairs.jsonl", records)
    corpus_file = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in corpus])
    config = MineConfig(input=inp, corpus=corpus_file, k=4, keep_existing=True, out=tmp_path / "o.jsonl")
    got = [json.loads(line) for line in mine_negatives(config, encoder=TableEncoder(table)).out.read_text().splitlines()]
    negs = got[2]["negs"]
    assert negs[:2] == ["doc number 39", "doc number 38"] and len(negs) == 4 and len(set(negs)) == 4


@pytest.mark.data
@pytest.mark.real_model
def test_real_minilm_on_spam_assassin(tmp_path: Path, shared_data: Path) -> None:
    from hrsa.train.encode import TextEncoder

    mails = [json.loads(line) for line in (shared_data / "spam-assassin" / "spam-assassin.jsonl").open()][:600]
    records, seen = [], set()
    for mail in mails:
        subject, _, body = mail["text"].partition("\n\n")
        if len(subject) > 8 and len(body) > 80 and subject not in seen:
            seen.add(subject)
            records.append({"query": subject, "pos": body[:200]})
    records = records[:150]
    inp = _write_jsonl(tmp_path / "pairs.jsonl", records)
    config = MineConfig(input=inp, k=3, max_length=48, out=tmp_path / "mined.jsonl")
    result = mine_negatives(config)
    lines = [json.loads(line) for line in result.out.read_text().splitlines()]
    assert len(lines) == len(records) == result.n_queries
    corpus = list(dict.fromkeys(r["pos"] for r in records))
    # independent check: the same model's embeddings, float64 scores over the whole corpus
    encoder = TextEncoder.load("packaged:all-minilm-l6-v2", device="cpu")
    q = encoder.encode([r["query"] for r in records], max_length=48).astype(np.float64)
    d = encoder.encode(corpus, max_length=48).astype(np.float64)
    row = {t: i for i, t in enumerate(corpus)}
    for i, (r, line) in enumerate(zip(records, lines)):
        assert set(line) == {"query", "pos", "negs"} and line["pos"] == r["pos"]
        scores = d @ q[i]
        limit = RATIO * scores[row[r["pos"]]]
        order = [corpus[j] for j in np.argsort(-scores, kind="stable") if corpus[j] != r["pos"] and scores[j] < limit]
        assert line["negs"][:2] == order[:2]  # the best two (ties at the third place are float noise)
        assert all(scores[row[n]] < limit + 1e-5 for n in line["negs"])
    assert result.n_short == sum(len(line["negs"]) < 3 for line in lines)


# --- the CLI ---------------------------------------------------------------------------------------------------------


@pytest.fixture()
def cli(verb_cli: Callable[[click.Command], click.Group]) -> click.Group:
    from hrsa.train.cli import mine_negatives_command

    return verb_cli(mine_negatives_command)


@pytest.mark.parametrize(("lines", "message"), [
    (['{"query": "a", "pos": "b"}', '{"query": "c"}'], "line 2"),
    (['{"query": "a", "pos": "b"}', "{not json"], "invalid JSON on line 2"),
    (['{"query": "a", "pos": "b", "negs": "x"}'], "'negs' to be a list"),
    (['{"query": "a", "pos": "b"}', "", '{"query": "c", "pos": "d", "instruction": 3}'], "int on line 3"),
    ([], "at least one record"),
])
def test_cli_bad_input_exits_2(cli: click.Group, tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(cli, ["mine-negatives", "--input", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_missing_file_bad_flag_and_existing_out(cli: click.Group, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["mine-negatives", "--input", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2 and "no such file" in result.output
    good = _write_jsonl(tmp_path / "pairs.jsonl", [{"query": "a", "pos": "b"}])
    result = runner.invoke(cli, ["mine-negatives", "--input", str(good), "--max-score-ratio", "-1", "--k", "0"])
    assert result.exit_code == 2 and "2 problem(s)" in result.output and "max_score_ratio" in result.output
    (tmp_path / "out.jsonl").write_text("keep me\n")
    result = runner.invoke(cli, ["mine-negatives", "--input", str(good), "--out", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (tmp_path / "out.jsonl").read_text() == "keep me\n"
    before = good.read_bytes()  # --overwrite onto its own input replaced the pairs it mines
    result = runner.invoke(cli, ["mine-negatives", "--input", str(good), "--out", str(good), "--overwrite"])
    assert result.exit_code == 2 and "Expected --out other than --input" in result.output and good.read_bytes() == before
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": "x"}, {"body": "y"}])
    result = runner.invoke(cli, ["mine-negatives", "--input", str(good), "--corpus", str(corpus)])
    assert result.exit_code == 2 and "line 2" in result.output and "--corpus-field" in result.output


@pytest.mark.parametrize(("pos", "kept"), [(0.8, [0.5, 0.0, -0.2, -0.49, -0.6, -0.9]), (-0.5, [-0.6, -0.9]),
                                         (0.0, [-0.2, -0.49, -0.6, -0.9])])
def test_the_margin_stays_below_the_positive_whatever_its_sign(pos: float, kept: list[float]) -> None:
    """ratio x pos lies above a negative positive's score: candidates scoring higher than the positive would pass."""
    from hrsa.train.mine import select_negatives

    candidates = np.array([[0.9, 0.77, 0.5, 0.0, -0.2, -0.49, -0.6, -0.9]])
    (chosen,) = select_negatives(candidates, np.arange(8)[None], np.array([pos]), [set()], k=8, max_score_ratio=RATIO)
    assert [float(candidates[0, i]) for i in chosen] == kept
    assert all(candidates[0, i] < pos for i in chosen)


# --- every positive of a query, kept negatives, the ratio's range (review) ------------------------------------------


def _one_hot_table(texts: list[str], queries: dict[str, list[float]]) -> dict[str, np.ndarray]:
    """Each text its own axis; each query's vector gives its score with every text (in ``texts`` order)."""
    table = {t: np.eye(len(texts))[i] for i, t in enumerate(texts)}
    for q, scores in queries.items():
        table[q] = np.asarray(scores) / np.linalg.norm(scores)
    return table


CAT_1, CAT_2 = "A cat is a small domesticated feline mammal.", "Cats are small carnivorous felines kept as pets."
OTHERS = [f"unrelated document {i}" for i in range(6)]


def test_another_positive_of_the_same_query_is_never_its_negative(tmp_path: Path) -> None:
    """Two rows share a query: each one's positive is a positive of that query, so neither is the other's negative
    (it scores under the ratio here, so only the exclusion keeps it out)."""
    texts = [CAT_1, CAT_2, *OTHERS]
    # "what is a cat" scores CAT_1 1.0, CAT_2 0.9 (under 0.95 x 1.0: a candidate by score alone), the others less
    table = _one_hot_table(texts, {"what is a cat": [1.0, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05],
                                   "what is a dog": [0.1, 0.6, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1]})
    records = [{"query": "what is a cat", "pos": CAT_1}, {"query": "what is a cat", "pos": CAT_2},
               {"query": "what is a dog", "pos": OTHERS[0]}]
    inp = _write_jsonl(tmp_path / "pairs.jsonl", records)
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
    config = MineConfig(input=inp, corpus=corpus, k=3, out=tmp_path / "out.jsonl")
    got = [json.loads(line) for line in mine_negatives(config, encoder=TableEncoder(table)).out.read_text().splitlines()]
    assert got[0]["negs"] == OTHERS[:3] and got[1]["negs"] == OTHERS[:3]
    assert got[2]["negs"][0] == CAT_2  # another query's positive is a fair negative


def test_kept_negatives_equal_to_a_positive_are_dropped(tmp_path: Path) -> None:
    texts = [CAT_1, CAT_2, *OTHERS]
    table = _one_hot_table(texts, {"what is a cat": [1.0, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]})
    records = [{"query": "what is a cat", "pos": CAT_1, "negs": [f" {CAT_1}", OTHERS[5], CAT_2]},
               {"query": "what is a cat", "pos": CAT_2}]
    inp = _write_jsonl(tmp_path / "pairs.jsonl", records)
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
    config = MineConfig(input=inp, corpus=corpus, k=3, keep_existing=True, out=tmp_path / "out.jsonl")
    result = mine_negatives(config, encoder=TableEncoder(table))
    got = [json.loads(line) for line in result.out.read_text().splitlines()]
    assert got[0]["negs"] == [OTHERS[5], OTHERS[0], OTHERS[1]]  # its own positive and the other cat one dropped
    assert result.n_dropped == 2 and "dropped 2 kept negatives" in result.summary()


@pytest.mark.parametrize("ratio", ["5", "1.01"])
def test_cli_a_ratio_above_1_is_refused(cli: click.Group, tmp_path: Path, ratio: str) -> None:
    """A ratio above 1 keeps candidates scoring above the positive."""
    good = _write_jsonl(tmp_path / "pairs.jsonl", [{"query": "a", "pos": "b"}])
    result = CliRunner().invoke(cli, ["mine-negatives", "--input", str(good), "--max-score-ratio", ratio])
    assert result.exit_code == 2 and "max_score_ratio" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "pairs.mined.jsonl").exists()
    assert MineConfig(input=good, max_score_ratio=1.0).max_score_ratio == 1.0


@pytest.mark.real_model
def test_real_minilm_never_mines_another_positive_of_the_query(cli: click.Group, tmp_path: Path) -> None:
    """The reviewer's case, through the CLI with the packaged model."""
    rows = [{"query": "what is a cat", "pos": CAT_1}, {"query": "what is a cat", "pos": CAT_2},
            *({"query": q, "pos": p} for q, p in [
                ("capital of france", "Paris is the capital and largest city of France."),
                ("how do planes fly", "Wings generate lift as air flows faster over their upper surface."),
                ("boiling point of water", "Water boils at 100 degrees Celsius at sea level."),
                ("who wrote hamlet", "Hamlet is a tragedy written by William Shakespeare."),
                ("what is a dog", "The dog is a domesticated descendant of the wolf."),
                ("python list sort", "Use sorted() or list.sort() to order a Python list.")])]
    inp = _write_jsonl(tmp_path / "mine.jsonl", rows)
    result = CliRunner().invoke(cli, ["mine-negatives", "--input", str(inp), "--k", "3", "--out", str(tmp_path / "m1.jsonl")])
    assert result.exit_code == 0, result.output
    got = [json.loads(line) for line in (tmp_path / "m1.jsonl").read_text().splitlines()]
    assert CAT_2 not in got[0]["negs"] and CAT_1 not in got[1]["negs"] and len(got[0]["negs"]) == 3


def test_an_out_that_is_not_a_regular_file_or_inside_a_store_is_refused_with_the_settings(tmp_path: Path) -> None:
    """Refused before the model is loaded, as the other settings are: a FIFO at --out, or a path in an hrsa store."""
    import os

    import pydantic

    from hrsa.store import ActivationStore

    inp = tmp_path / "pairs.jsonl"
    inp.write_text('{"query": "q", "pos": "p"}\n')
    os.mkfifo(tmp_path / "fifo")
    ActivationStore.open(str(tmp_path / "store"), mode="a")
    for out, message in [(tmp_path / "fifo", "regular file"), (tmp_path / "store" / "zarr.json", "inside the hrsa store")]:
        with pytest.raises(pydantic.ValidationError, match=message):
            MineConfig(input=inp, out=out)
    assert (tmp_path / "fifo").is_fifo()


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_texts_equal_once_whitespace_is_folded_are_one_negative(tmp_path: Path) -> None:
    """"the cat sat" and "the  cat sat" are one document to the tokenizer; both were mined, one negative twice (which
    reweights it in the loss), in the corpus and among negatives kept with --keep-existing alike."""
    dup_a, dup_b = "the cat sat", "the  cat sat"
    table = {"q": _unit([1.0, 0.0, 0.0]), "pos": _unit([1.0, 0.1, 0.0]), dup_a: _unit([0.5, 1.0, 0.0]),
             dup_b: _unit([0.5, 1.0, 0.0]), "other": _unit([0.2, 0.0, 1.0])}
    pairs = _write_jsonl(tmp_path / "p.jsonl", [{"query": "q", "pos": "pos"}])
    corpus = _write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in ["pos", dup_a, dup_b, "other"]])
    out = mine_negatives(MineConfig(input=pairs, corpus=corpus, k=3, out=tmp_path / "o.jsonl"),
                         encoder=TableEncoder(table)).out
    assert json.loads(out.read_text())["negs"] == [dup_a, "other"]
    kept = _write_jsonl(tmp_path / "k.jsonl", [{"query": "q", "pos": "pos", "negs": [dup_b, dup_a]}])
    out = mine_negatives(MineConfig(input=kept, corpus=corpus, k=3, keep_existing=True, out=tmp_path / "o2.jsonl"),
                         encoder=TableEncoder(table)).out
    assert json.loads(out.read_text())["negs"] == [dup_b, "other"]


def test_out_at_the_corpus_is_refused_and_the_corpus_kept(tmp_path: Path) -> None:
    """--out at --input was refused; at --corpus, --overwrite replaced the user's corpus with the mined pairs."""
    from hrsa.store.errors import UserError

    table = {"q": _unit([1.0, 0.0]), "pos": _unit([1.0, 0.1]), "d": _unit([0.3, 1.0])}
    pairs = _write_jsonl(tmp_path / "p.jsonl", [{"query": "q", "pos": "pos"}])
    corpus = _write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in ["pos", "d"]])
    before = corpus.read_text()
    with pytest.raises(UserError, match="Expected --out other than --corpus"):
        mine_negatives(MineConfig(input=pairs, corpus=corpus, k=1, out=corpus, overwrite=True), encoder=TableEncoder(table))
    assert corpus.read_text() == before


def test_a_ratio_of_one_never_mines_a_text_scoring_as_the_positive(tmp_path: Path) -> None:
    """"Under 1 x the positive's score": a case variant of the positive with its very embedding (an uncased tokenizer)
    was mined in 57 of 200 draws, FAISS's float32 score rounding just under the positive's float64 one."""
    rng = np.random.default_rng(0)
    mined = 0
    pairs = _write_jsonl(tmp_path / "p.jsonl", [{"query": "q", "pos": "pos"}])
    corpus = _write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in ["pos", "POS", "far"]])
    for _ in range(200):
        q, p = (_unit(rng.standard_normal(64)).astype(np.float32) for _ in range(2))
        table = {"q": q, "pos": p, "POS": p.copy(), "far": -q}
        out = mine_negatives(MineConfig(input=pairs, corpus=corpus, k=2, max_score_ratio=1.0, out=tmp_path / "o.jsonl",
                                        overwrite=True), encoder=TableEncoder(table)).out
        mined += "POS" in json.loads(out.read_text())["negs"]
    assert mined == 0


def test_query_instructions_embed_each_query_with_its_own_instruction(tmp_path: Path) -> None:
    """With --query-instructions the query embedded is "Instruct: {instruction}\\nQuery: {query}" (its ranking is
    the one mined from), without it the bare query; a record without an instruction is bare either way."""
    texts = [CAT_1, CAT_2, *OTHERS]
    bare = [1.0, 0.2, 0.9, 0.8, 0.7, 0.1, 0.05, 0.02]  # bare "what is a cat": OTHERS[0..2] rank first
    instructed = [1.0, 0.2, 0.02, 0.05, 0.1, 0.9, 0.8, 0.7]  # instructed: OTHERS[3..5] rank first
    table = _one_hot_table(texts, {"what is a cat": bare, "Instruct: find a pet\nQuery: what is a cat": instructed,
                                   "what is a dog": [0.1, 1.0, 0.05, 0.9, 0.02, 0.8, 0.01, 0.7]})
    records = [{"query": "what is a cat", "pos": CAT_1, "instruction": "find a pet"},
               {"query": "what is a dog", "pos": CAT_2}]
    inp = _write_jsonl(tmp_path / "pairs.jsonl", records)
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
    got = {}
    for flag in (False, True):
        config = MineConfig(input=inp, corpus=corpus, k=3, query_instructions=flag, out=tmp_path / f"{flag}.jsonl")
        out = mine_negatives(config, encoder=TableEncoder(table)).out
        got[flag] = [json.loads(line) for line in out.read_text().splitlines()]
    assert got[False][0]["negs"] == OTHERS[:3]
    assert got[True][0]["negs"] == OTHERS[3:6]
    assert got[True][0]["instruction"] == "find a pet"
    assert got[False][1]["negs"] == got[True][1]["negs"] == [OTHERS[1], OTHERS[3], OTHERS[5]]


def test_queries_equal_once_whitespace_is_folded_share_their_positives(tmp_path: Path) -> None:
    """"what is a cat" and "what  is a cat " are one query text: each line's positive is never the other's negative,
    though it scores under the ratio."""
    texts = [CAT_1, CAT_2, *OTHERS]
    scores = [1.0, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    table = _one_hot_table(texts, {"what is a cat": scores, "what  is a cat ": scores})
    records = [{"query": "what is a cat", "pos": CAT_1}, {"query": "what  is a cat ", "pos": CAT_2}]
    inp = _write_jsonl(tmp_path / "pairs.jsonl", records)
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
    out = mine_negatives(MineConfig(input=inp, corpus=corpus, k=3, out=tmp_path / "o.jsonl"),
                         encoder=TableEncoder(table)).out
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["negs"] for g in got] == [OTHERS[:3], OTHERS[:3]]


def test_a_corpus_copy_of_the_positive_spaced_otherwise_is_never_its_negative(tmp_path: Path) -> None:
    """The corpus holds the positive only with other whitespace (its own embedding, scoring under the ratio): still
    the positive, never mined."""
    spaced = "  A cat is a  small domesticated feline mammal. "
    texts = [spaced, CAT_2, *OTHERS]
    table = _one_hot_table(texts, {"what is a cat": [0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 1.0]})
    table = {t: np.append(v, 0.0) if t in texts else v for t, v in table.items()}
    table[CAT_1] = np.eye(len(texts) + 1)[len(texts)]  # the positive as the records spell it: embedded apart
    records = [{"query": "what is a cat", "pos": CAT_1}]
    inp = _write_jsonl(tmp_path / "pairs.jsonl", records)
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
    out = mine_negatives(MineConfig(input=inp, corpus=corpus, k=3, out=tmp_path / "o.jsonl"),
                         encoder=TableEncoder(table)).out
    assert json.loads(out.read_text())["negs"] == [CAT_2, OTHERS[0], OTHERS[1]]
