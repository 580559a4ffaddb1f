"""Corpora: records from files, one text per record, tokenised once into a CorpusTable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hrsa.extract.corpus import CorpusSpec, load_records, render_text, tokenize_corpus
from hrsa.store.records import CorpusError
from hrsa.store import ActivationStore

CHAT = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def _jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def tokenizer(tiny_models: Any) -> Any:
    tok = tiny_models.tokenizer()
    tok.chat_template = CHAT
    return tok


RECORDS = [
    {"id": "a", "text": "the quick brown fox", "messages": [{"role": "user", "content": "the dog"}], "reasoning": "lazy dog"},
    {"id": "b", "text": "jumps over the lazy dog " * 20, "messages": [{"role": "user", "content": "fox"}], "reasoning": "w1 w2"},
]


def test_jsonl_csv_parquet_give_the_same_records(tmp_path: Path) -> None:
    import pandas as pd

    flat = [{k: v for k, v in r.items() if k in ("id", "text")} for r in RECORDS]
    _jsonl(tmp_path / "c.jsonl", flat)
    pd.DataFrame(flat).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame(flat).to_parquet(tmp_path / "c.parquet")
    for suffix in ("jsonl", "csv", "parquet"):
        got = list(load_records(CorpusSpec(source=str(tmp_path / f"c.{suffix}"))))
        assert [(r["_id"], r["text"]) for r in got] == [("a", RECORDS[0]["text"]), ("b", RECORDS[1]["text"])]


def test_folder_max_docs_and_default_ids(tmp_path: Path) -> None:
    _jsonl(tmp_path / "1.jsonl", [{"text": "x"}, {"text": "y"}])
    _jsonl(tmp_path / "2.jsonl", [{"text": "z"}])
    got = list(load_records(CorpusSpec(source=str(tmp_path))))
    assert [r["_id"] for r in got] == ["1.jsonl:1", "1.jsonl:2", "2.jsonl:1"]
    assert len(list(load_records(CorpusSpec(source=str(tmp_path), max_docs=2)))) == 2


def test_field_and_chat_template(tokenizer: Any) -> None:
    assert render_text(RECORDS[0], CorpusSpec(source="-", text="reasoning")) == "lazy dog"
    text = render_text(RECORDS[0], CorpusSpec(source="-", template="{chat:messages}{reasoning}"), tokenizer)
    assert text == "<s>user: the dog\n<s>assistant: lazy dog"


def test_tokenize_records_specials_and_truncation(tokenizer: Any) -> None:
    spec = CorpusSpec(source="-", template="{chat:messages}{reasoning}", max_tokens=6)
    records = [{**r, "_id": r["id"]} for r in RECORDS]
    table = tokenize_corpus(records, spec, tokenizer)
    table.check()
    assert table.record_ids == ["a", "b"] and table.n_docs == 2
    assert np.diff(table.doc_offsets).max() <= 6 and table.truncated.all()
    assert table.is_special[table.doc_offsets[:-1]].all()  # "<s>" opens every chat document
    assert (table.original_length > 6).all()
    full = tokenize_corpus(records, CorpusSpec(source="-", template="{chat:messages}{reasoning}"), tokenizer)
    assert np.array_equal(full.token_ids[: 6], table.token_ids[:6]) and not full.truncated.any()


def test_same_text_and_tokenizer_is_one_corpus(tokenizer: Any, tmp_path: Path) -> None:
    store = ActivationStore.open(tmp_path / "s", mode="a")
    records = [{**r, "_id": r["id"]} for r in RECORDS]
    ids = {
        store.write_corpus(tokenize_corpus(records, CorpusSpec(source="-"), tokenizer), tokenizer={"name": "t", "fingerprint": "f"})
        for _ in range(2)
    }
    assert len(ids) == 1 and store.corpora() == sorted(ids)


def test_texts_that_differ_after_the_cut_are_two_corpora_each_with_its_own_documents(tokenizer: Any, tmp_path: Path) -> None:
    """Cut to 3 tokens, a short text and a longer one that starts alike give the same tokens: they were one corpus,
    whose documents (truncated, original length) were the first writer's, so the second model's were told wrong.
    The text is part of the corpus now (its digest), and so are the documents' original lengths."""
    store = ActivationStore.open(tmp_path / "s", mode="a")
    spec = CorpusSpec(source="-", max_tokens=3)
    short, longer = ([{"_id": "a", "text": t}, {"_id": "b", "text": "w1 w2 w3"}]
                     for t in ("the quick brown", "the quick brown fox jumps over the lazy dog"))
    tables = [tokenize_corpus(records, spec, tokenizer) for records in (short, longer)]
    assert np.array_equal(tables[0].token_ids, tables[1].token_ids)  # what a model runs over is the same
    cids = [store.write_corpus(t, tokenizer={"name": "t", "fingerprint": "f"}) for t in tables]
    assert cids[0] != cids[1]
    for cid, table in zip(cids, tables):
        docs = store.documents(cid)
        assert docs["truncated"].tolist() == table.truncated.tolist()
        assert docs["original_length"].tolist() == table.original_length.tolist()
    assert [store.documents(cid)["truncated"][0] for cid in cids] == [False, True]  # "the quick brown": 3 tokens


@pytest.mark.parametrize(
    ("spec", "records", "match"),
    [
        (CorpusSpec(source="-", text="nope"), RECORDS, "field 'nope'"),
        (CorpusSpec(source="-", template="{problem}"), RECORDS, "fields \\['problem'\\]"),
        (CorpusSpec(source="-"), [{"text": "", "_id": "e"}], "empty document"),
        # A missing value (JSON null, a CSV's empty cell) was rendered as the text "None" (or "nan") and extracted.
        (CorpusSpec(source="-"), [{"text": "a"}, {"text": None}],
         r"^Expected a value of field 'text' in every record\. Got none in record 1 instead\. Fill it in or drop"),
        (CorpusSpec(source="-", template="Q: {problem} A: {answer}"), [{"problem": "p", "answer": None}],
         r"^Expected a value of field 'answer' in every record\. Got none in record 0 instead"),
        (CorpusSpec(source="-", template="{text} {score:.2f}"), [{"text": "t", "score": "high"}],  # a traceback before
         r"^Expected the template's \{score:\.2f\} to format every record\. Got ValueError: .* on record 0"),
    ],
)
def test_bad_corpora_are_user_errors(tokenizer: Any, spec: CorpusSpec, records: list[dict[str, Any]], match: str) -> None:
    records = [{"_id": str(i), **r} for i, r in enumerate(records)]
    with pytest.raises(CorpusError, match=match):
        tokenize_corpus(records, spec, tokenizer)


def test_documents_longer_than_the_context_need_max_tokens(tokenizer: Any) -> None:
    records = [{**r, "_id": r["id"]} for r in RECORDS]
    with pytest.raises(CorpusError, match="--max-tokens 8"):
        tokenize_corpus(records, CorpusSpec(source="-"), tokenizer, context_length=8)
    assert tokenize_corpus(records, CorpusSpec(source="-", max_tokens=8), tokenizer, context_length=8).n_tokens <= 16


def test_missing_paths_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="Got nothing there"):
        list(load_records(CorpusSpec(source=str(tmp_path / "absent.jsonl"))))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CorpusError, match="Got x.txt"):
        list(load_records(CorpusSpec(source=str(tmp_path / "x.txt"))))
    with pytest.raises(CorpusError, match="not both"):
        CorpusSpec(source="-", text="a", template="{b}")
    with pytest.raises(CorpusError, match="positive"):
        CorpusSpec(source="-", max_docs=0)


# -- where a chat message's content lands in the rendered text -------------------------------------------------------
# A default system prompt, as SmolLM2's ("... trained by Hugging Face") and Qwen2.5's templates add when the messages
# have none: a message whose text also appears in it was labelled at the system prompt's occurrence.
DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}<s>system: You are an assistant trained by Hugging Face\n"
                  "{% endif %}")


def _chat_spans(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> tuple[str, list[Any]]:
    from hrsa.extract.corpus import render_spans

    tokenizer.chat_template = template
    return render_spans({"m": messages, "_id": "r"}, CorpusSpec(source="-", template="{chat:m}"), tokenizer)


@pytest.mark.parametrize(
    ("template", "messages", "expected"),
    [
        # the default system prompt holds the user's text
        (DEFAULT_SYSTEM + CHAT, [{"role": "user", "content": "Hugging Face"}],
         "<s>system: You are an assistant trained by Hugging Face\n<s>user: [Hugging Face]\n<s>assistant: "),
        # a role tag holds it
        (CHAT, [{"role": "user", "content": "user"}], "<s>user: [user]\n<s>assistant: "),
        # an earlier message's markup holds the next message's text
        (CHAT, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "ssistant"}],
         "<s>user: [a]\n<s>assistant: [ssistant]\n<s>assistant: "),
    ],
    ids=["default-system-prompt", "role-tag", "earlier-markup"],
)
def test_a_message_is_labelled_where_the_template_put_it(tokenizer: Any, template: str, messages: list[dict[str, str]],
                                                          expected: str) -> None:
    text, segments = _chat_spans(tokenizer, template, messages)
    marked, at = [], 0
    for seg in segments:
        marked += [text[at:seg.start], "[", text[seg.start:seg.stop], "]"]
        at = seg.stop
    assert "".join([*marked, text[at:]]) == expected
    assert [s.offset for s in segments] == [sum(len(m["content"]) for m in messages[:i]) for i in range(len(messages))]


def test_a_message_the_template_trims_is_labelled_in_place_at_its_offset(tokenizer: Any) -> None:
    """Templates such as Qwen3's trim contents: the trimmed text is found where the template put it, and its span in
    the chat field's text (contents end to end) starts after the whitespace the template dropped."""
    template = DEFAULT_SYSTEM + CHAT.replace("m['content']", "m['content'] | trim")
    messages = [{"role": "user", "content": " Hugging Face \n"}, {"role": "assistant", "content": "Face"}]
    text, segments = _chat_spans(tokenizer, template, messages)
    assert text.index("user: ") < segments[0].start and text[segments[0].start:segments[0].stop] == "Hugging Face"
    assert segments[0].offset == 1
    assert text.index("assistant: ") < segments[1].start and text[segments[1].start:segments[1].stop] == "Face"
    assert segments[1].offset == len(messages[0]["content"])


def test_a_message_the_template_drops_is_markup_and_the_next_is_still_found(tokenizer: Any) -> None:
    template = ("{% for m in messages %}{% if m['role'] != 'tool' %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
                "{% endif %}{% endfor %}<s>assistant: ")
    messages = [{"role": "tool", "content": "fox"}, {"role": "user", "content": "the fox"}]
    text, segments = _chat_spans(tokenizer, template, messages)
    assert text == "<s>user: the fox\n<s>assistant: "
    assert [(text[s.start:s.stop], s.offset) for s in segments] == [("the fox", 3)]


def test_chat_tokens_of_the_default_system_prompt_are_markup(tokenizer: Any) -> None:
    """Token spans follow: the system prompt's "Hugging Face" tokens are markup, the user's carry its characters."""
    tokenizer.chat_template = DEFAULT_SYSTEM + CHAT
    spec = CorpusSpec(source="-", template="{chat:m}")
    records = [{"_id": "r", "m": [{"role": "user", "content": "Hugging Face"}]}]
    table = tokenize_corpus(records, spec, tokenizer)
    text = render_text(records[0], spec, tokenizer)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    content = [a for (a, _), f in zip(offsets, table.token_field) if f == 0]
    assert content and min(content) >= text.index("user: ") + len("user: ")
    assert all(table.token_field[t] == -1 for t, (_, b) in enumerate(offsets) if b <= text.index("<s>user"))
    mine = table.token_field == 0
    assert table.char_start[mine].min() == 0 and table.char_end[mine].max() == len("Hugging Face")


# -- empty documents: refused whatever special tokens the tokenizer adds around them ---------------------------------
def _with_specials(tokenizer: Any) -> Any:
    """The tiny tokenizer, adding <s> ... </s> around every text (as BERT adds [CLS] ... [SEP], Llama a BOS)."""
    from tokenizers import processors

    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    assert tokenizer("the dog")["input_ids"][0] == 2 and tokenizer("")["input_ids"] == [2, 3]
    return tokenizer


@pytest.mark.parametrize("specials", [False, True], ids=["no-specials", "specials"])
@pytest.mark.parametrize("blank", ["", " ", "\n\t  \n"], ids=["empty", "space", "whitespace"])
def test_an_empty_or_whitespace_document_is_refused_naming_it(tokenizer: Any, specials: bool, blank: str) -> None:
    tokenizer = _with_specials(tokenizer) if specials else tokenizer
    records = [{"_id": "fine", "text": "the lazy dog"}, {"_id": "blank", "text": blank}]
    with pytest.raises(CorpusError, match=r"^Expected text in every document\. Got 1 empty document\(s\) \['blank'\] "
                                          r".*Remove them"):
        tokenize_corpus(records, CorpusSpec(source="-"), tokenizer)
    table = tokenize_corpus(records[:1], CorpusSpec(source="-"), tokenizer)  # the rest is fine
    assert table.n_docs == 1


def test_a_template_of_empty_fields_keeps_its_own_text(tokenizer: Any) -> None:
    """A template's literal text is what the model is given: a record whose fields are empty still has a document."""
    table = tokenize_corpus([{"_id": "r", "q": ""}], CorpusSpec(source="-", template="Question: {q}"), tokenizer)
    assert table.n_docs == 1 and table.n_tokens > 0


# -- --max-tokens and the model's context: a cut longer than the context is refused, not stored -------------------
def test_max_tokens_above_the_context_is_refused_when_a_document_exceeds_the_context(tokenizer: Any) -> None:
    records = [{**r, "_id": r["id"]} for r in RECORDS]
    with pytest.raises(CorpusError, match=r"^Expected documents of at most 8 tokens \(the model's context\)\. .*"
                                          r"--max-tokens 256.* in b.*--max-tokens 8"):
        tokenize_corpus(records, CorpusSpec(source="-", max_tokens=256), tokenizer, context_length=8)
    # a cut above the context that no document reaches stores every document whole
    short = [{"_id": "s", "text": "the dog"}]
    table = tokenize_corpus(short, CorpusSpec(source="-", max_tokens=256), tokenizer, context_length=8)
    assert not table.truncated.any() and table.n_tokens <= 8


# -- chat contents the template changed: left as markup, and said so ---------------------------------------------------
def test_chat_contents_the_template_rewrote_are_counted_as_markup_in_a_warning(tokenizer: Any) -> None:
    """A template that rewrites a content (newlines to spaces here; HTML escaping, reasoning cut out elsewhere) leaves
    it unlabelled: its tokens are markup, so --fields and alignment across tokenizers leave them out. That was said
    nowhere; now a warning counts them per field."""
    from hrsa.extract.corpus import ChatMarkupWarning

    tokenizer.chat_template = CHAT.replace("m['content']", "m['content'] | replace('\\n', ' ')")
    spec = CorpusSpec(source="-", template="{chat:m}")
    records = [{"_id": "r0", "m": [{"role": "user", "content": "the dog\nthe fox"}, {"role": "assistant", "content": "a fox"}]},
               {"_id": "r1", "m": [{"role": "user", "content": "the cat"}]}]
    with pytest.warns(ChatMarkupWarning) as caught:
        table = tokenize_corpus(records, spec, tokenizer)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "1 of 3 chat messages of field 'm'" in message and "r0" in message and "--fields" in message, message
    assert (table.token_field == 0).any()  # the others are labelled as before


def test_chat_contents_all_found_warn_nothing(tokenizer: Any) -> None:
    import warnings

    records = [{"_id": "r0", "m": [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "a fox"}]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_corpus(records, CorpusSpec(source="-", template="{chat:m}"), tokenizer)


def test_a_template_that_refuses_the_stand_ins_counts_every_content(tokenizer: Any) -> None:
    """The stand-ins are private-use characters: a template that raises on them leaves every content as markup."""
    from hrsa.extract.corpus import ChatMarkupWarning

    tokenizer.chat_template = ("{% for m in messages %}{% if '\\ue000' in m['content'] %}{{ raise_exception('odd') }}"
                               "{% endif %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    records = [{"_id": "r0", "m": [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "a fox"}]}]
    with pytest.warns(ChatMarkupWarning, match="2 of 2 chat messages of field 'm'"):
        table = tokenize_corpus(records, CorpusSpec(source="-", template="{chat:m}"), tokenizer)
    assert not (table.token_field >= 0).any()


def test_a_blank_content_a_trimming_template_renders_as_nothing_is_no_markup_warning(tokenizer: Any) -> None:
    """Templates that trim contents (Llama 3's `message['content'] | trim`) render a blank content as nothing: there
    is nothing of it to find, nor any token of it to leave out, yet it was warned of as changed beyond finding."""
    import warnings

    tokenizer.chat_template = CHAT.replace("m['content']", "m['content'] | trim")
    records = [{"_id": "r0", "m": [{"role": "user", "content": " the dog "}, {"role": "assistant", "content": "\n"}]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = tokenize_corpus(records, CorpusSpec(source="-", template="{chat:m}"), tokenizer)
    assert (table.token_field == 0).any()


def test_chat_messages_the_template_cannot_render_are_one_error_naming_the_record(tokenizer: Any) -> None:
    """A content that is a number (a JSON 5) made a template's string method (Qwen's .strip(), .split(...)) a jinja
    traceback."""
    from hrsa.store.records import CorpusError

    tokenizer.chat_template = CHAT.replace("m['content']", "m['content'].strip()")
    records = [{"_id": "ok", "m": [{"role": "user", "content": "the dog"}]},
               {"_id": "numeric", "m": [{"role": "user", "content": 5}]}]
    with pytest.raises(CorpusError) as error:
        tokenize_corpus(records, CorpusSpec(source="-", template="{chat:m}"), tokenizer)
    message = str(error.value)
    assert message.startswith("Expected") and "\n" not in message and "numeric" in message and "'m'" in message, message
