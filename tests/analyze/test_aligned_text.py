"""Two tokenizers' corpora are aligned only when their documents hold the same text, not only the same record ids.

A record id says where a record was (``docs.jsonl:1`` by default), not what it holds: two files of one name in two
folders, or one file edited between two extractions, give the same ids to other texts. Their tokens' character
spans still coincide wherever the texts happen to (same word lengths), so an alignment on ids alone compared the two
models on different words and reported CKA over them. Each corpus keeps a sha256 of every document's text, field by
field, and alignment compares those.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

HIDDEN = 8
ONE = ["the quick brown fox", "jumps over the lazy dog", "w1 w2 w3"]
EDITED = ["the quick brown cat", "jumps over the lazy cow", "w1 w2 w3"]  # same lengths: most spans coincide


def _docs(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _table(path: Path, tokenizer: Any) -> Any:
    from hrsa.extract.corpus import CorpusSpec, load_records, tokenize_corpus

    spec = CorpusSpec(source=str(path))
    return tokenize_corpus(list(load_records(spec)), spec, tokenizer)


def _model(store: Any, mid: str, table: Any, seed: int) -> str:
    """A complete model over ``table``'s corpus, hidden states random."""
    cid = store.write_corpus(table, tokenizer={"name": mid, "fingerprint": mid})
    store.create_model(mid, corpus=cid, n_hidden_states=2, hidden_size=HIDDEN, dtype="float32", shard_tokens=64)
    values = np.random.default_rng(seed).standard_normal((table.n_tokens, HIDDEN)).astype(np.float32)
    writer = store.writer(mid)
    for unit in writer.units():
        writer.write_unit(unit, {0: values[unit.start : unit.stop], 1: 2 * values[unit.start : unit.stop]})
    return cid


@pytest.fixture
def tokenizers(tiny_models: Any) -> tuple[Any, Any]:
    """Two tokenizers that split the same text differently (the second holds two words as added tokens)."""
    return tiny_models.tokenizer(), tiny_models.tokenizer(extra_words=("quick", "lazy"))


def test_corpora_of_other_texts_under_the_same_record_ids_are_not_aligned(tmp_path: Path, tokenizers: tuple[Any, Any]) -> None:
    from hrsa.cli import cli
    from hrsa.store import ActivationStore
    from hrsa.store.errors import CorpusMismatchError

    tok_a, tok_b = tokenizers
    table_a, table_b = _table(_docs(tmp_path / "one", ONE), tok_a), _table(_docs(tmp_path / "two", EDITED), tok_b)
    assert table_a.record_ids == table_b.record_ids == ["docs.jsonl:1", "docs.jsonl:2", "docs.jsonl:3"]
    store = ActivationStore.open(tmp_path / "store", mode="a")
    cid_a, cid_b = _model(store, "a", table_a, 0), _model(store, "b", table_b, 1)
    with pytest.raises(CorpusMismatchError, match=rf"a on {cid_a} and b on {cid_b}, whose documents hold other text "
                                                  r"\(2 of 3: docs\.jsonl:1, docs\.jsonl:2\)") as error:
        store.token_pairs("a", "b")
    assert "\n" not in str(error.value) and "same corpus file" in str(error.value)
    assert "alignments" not in store.group("")  # nothing kept
    result = CliRunner().invoke(cli, ["analyze", "--store", store.url, "--pair", "a", "b", "--metrics", "cka",
                                      "--out", str(tmp_path / "out"), "--no-store-results"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("hrsa: error: Expected a and b extracted on the same text")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out" / "results.json").exists()


def test_the_same_text_in_another_folder_is_aligned(tmp_path: Path, tokenizers: tuple[Any, Any]) -> None:
    from hrsa.store import ActivationStore

    tok_a, tok_b = tokenizers
    table_a, table_b = _table(_docs(tmp_path / "one", ONE), tok_a), _table(_docs(tmp_path / "copy", ONE), tok_b)
    store = ActivationStore.open(tmp_path / "store", mode="a")
    _model(store, "a", table_a, 0)
    _model(store, "b", table_b, 1)
    pairs = store.token_pairs("a", "b")
    assert not pairs.identical and pairs.n_pairs == pairs.n_a  # every token of A's has its span in B's


def test_a_relabelled_copy_of_the_texts_is_aligned(tmp_path: Path, tokenizers: tuple[Any, Any]) -> None:
    """The digest covers the text fields the tokens came from, not the whole record: other labels are the same text."""
    from hrsa.store import ActivationStore

    tok_a, tok_b = tokenizers
    for folder, label in (("one", "x"), ("two", "y")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "docs.jsonl").write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t in ONE))
    store = ActivationStore.open(tmp_path / "store", mode="a")
    _model(store, "a", _table(tmp_path / "one" / "docs.jsonl", tok_a), 0)
    _model(store, "b", _table(tmp_path / "two" / "docs.jsonl", tok_b), 1)
    assert store.token_pairs("a", "b").n_pairs > 0


def test_corpora_stored_without_text_digests_are_not_aligned(tmp_path: Path, tokenizers: tuple[Any, Any]) -> None:
    """A corpus stored by an earlier hrsa (or through the API without digests) holds nothing that tells its text:
    its record ids are what let other texts through, so alignment is refused, naming the fix, even where an
    alignment of the two corpora was kept in the store before."""
    from hrsa.store import ActivationStore
    from hrsa.store.alignment import align_corpora, alignment_key, write_alignment
    from hrsa.store.errors import CorpusMismatchError
    from hrsa.store.objects import ensure_group

    tok_a, tok_b = tokenizers
    bare = [dataclasses.replace(_table(_docs(tmp_path / "one", ONE), tok), text_fields=(), text_sha256=None)
            for tok in (tok_a, tok_b)]
    store = ActivationStore.open(tmp_path / "store", mode="a")
    cid_a, cid_b = _model(store, "a", bare[0], 0), _model(store, "b", bare[1], 1)
    corpora = store.group("corpora")
    write_alignment(ensure_group(store.group("").store, "alignments"), alignment_key(cid_a, cid_b),
                    *align_corpora(corpora[cid_a], corpora[cid_b]))  # as an earlier hrsa kept it
    fix = r"Delete the models on them \(`hrsa store rm`\) and run the same `hrsa extract` again"
    with pytest.raises(CorpusMismatchError,
                       match=rf"{cid_a} and {cid_b} stored without their documents' text digests .* {fix}") as error:
        store.token_pairs("a", "b")
    assert "\n" not in str(error.value)


def test_tokens_holding_part_of_a_character_pair_only_as_runs_split_alike(tmp_path: Path, tokenizers: tuple[Any, Any]) -> None:
    """"naïve": one tokenizer's tokens "n", "a" + half of "ï", the other half, "v", "e" (byte-level BPE widens each
    span to the whole character: 0:1, 1:3, 2:3, 3:4, 4:5); the other's "n", "aï", "ve" (0:1, 1:3, 3:5). By span and
    count, "a" + half of "ï" paired with "aï" (also where that side's cut ended inside "ï"): only "n" pairs. A third
    tokenizer that splits "aï" as the first one does pairs with it token by token."""
    from hrsa.store import ActivationStore
    from hrsa.store.alignment import align_corpora

    base = _table(_docs(tmp_path / "docs", ["naïve"]), tokenizers[0])

    def spans(pairs: list[tuple[int, int]]) -> Any:
        n = len(pairs)
        return dataclasses.replace(
            base, token_ids=np.arange(5, 5 + n, dtype=np.int32), doc_offsets=np.array([0, n], dtype=np.int64),
            is_special=np.zeros(n, bool), original_length=np.array([n], dtype=np.int64), token_field=np.zeros(n, np.int16),
            char_start=np.array([a for a, _ in pairs], np.int32), char_end=np.array([b for _, b in pairs], np.int32))

    store = ActivationStore.open(str(tmp_path / "store"), mode="a")
    split = [(0, 1), (1, 3), (2, 3), (3, 4), (4, 5)]
    cids = [store.write_corpus(spans(s), tokenizer={"name": name, "fingerprint": name})
            for name, s in (("q", split), ("p", [(0, 1), (1, 3), (3, 5)]), ("r", [(0, 1), (1, 3), (2, 3), (3, 5)]))]
    groups = [store._corpus_group(c) for c in cids]
    rows_a, rows_b = align_corpora(groups[0], groups[1])
    assert rows_a.tolist() == [0] and rows_b.tolist() == [0]
    rows_a, rows_b = align_corpora(groups[0], groups[2])
    assert rows_a.tolist() == [0, 1, 2] and rows_b.tolist() == [0, 1, 2]
