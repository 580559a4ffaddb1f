"""``hrsa extract`` and the user's mistakes: one line that names the fix, exit code 2, no traceback,
and nothing already stored damaged (every file of the store hashes the same before and after).

The store the mistakes are made against is built in process (the tiny Llama's corpus and a complete
model, written by the worker class without Ray), so only the test that needs a worker starts Ray.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hrsa.extract.config import ExtractConfigError, load_extract_config, parse_extract_config
from hrsa.extract.packaged import PackagedModelNotFoundError, packaged_model_path
from hrsa.store import ActivationStore
from hrsa.store.errors import UserError

TEXTS = {"a": "the quick brown fox jumps over the lazy dog", "b": "w1 w2 w3", "c": "hidden states of a tiny model " * 3}


def requires_packaged(name: str) -> pytest.MarkDecorator:
    try:
        packaged_model_path(name)
    except PackagedModelNotFoundError as error:
        return pytest.mark.skip(reason=str(error))
    return pytest.mark.real_model


def write_jsonl(path: Path, records: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in records.items()))
    return path


def store_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under a local store: any write at all changes it."""
    files = (p for p in sorted(path.rglob("*")) if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", TEXTS)


@pytest.fixture(scope="module")
def finished_store(tiny_models: Any, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(a store holding the tiny Llama's corpus and a complete model on it, the corpus id).

    Written in process by the extraction worker class itself (plain Python without Ray).
    """
    from hrsa.extract.corpus import CorpusSpec, load_records, tokenize_corpus
    from hrsa.extract.models import parse_model_spec
    from hrsa.extract.worker import ExtractionWorker

    path = tmp_path_factory.mktemp("finished") / "store"
    store = ActivationStore.open(str(path), mode="a")
    model = parse_model_spec(str(tiny_models.dir("llama"))).to_dict()
    worker = ExtractionWorker(model, str(path), device="cpu")
    facts, loaded = worker.describe(), worker._loaded
    spec = CorpusSpec(source=str(corpus_file))
    table = tokenize_corpus(list(load_records(spec)), spec, loaded.tokenizer, context_length=loaded.context_length)
    cid = store.write_corpus(table, tokenizer=loaded.tokenizer_info(), source=str(corpus_file), fields=("text",),
                             extra={"corpus_spec": spec.to_dict()})
    # Recorded as run_extraction records it, so that re-running the same extraction finds the same settings.
    store.create_model("tiny", corpus=cid, n_hidden_states=facts["n_hidden_states"], hidden_size=facts["hidden_size"],
                       dtype=facts["dtype"], attention=facts["attention"], source=facts["source"], shard_tokens=16,
                       extraction={"token_budget": 8192, "attn_implementation": facts["attn_implementation"],
                                   "max_tokens": None, "max_docs": None})
    for unit in store.writer("tiny").units():
        assert worker.run_unit("tiny", unit.index, model)["written"]
    assert store.model_info("tiny").complete
    return path, cid


@pytest.fixture
def stored_copy(finished_store: tuple[Path, str], tmp_path: Path) -> Path:
    """A fresh copy of the finished store to make mistakes against."""
    return Path(shutil.copytree(finished_store[0], tmp_path / "store"))


def specials_model(tiny_models: Any, folder: Path) -> Path:
    """A copy of the tiny Llama whose tokenizer adds <s> ... </s> around every text (as BERT adds [CLS] ... [SEP]):
    an empty document tokenises to those two special tokens."""
    from tokenizers import processors

    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.models import load_tokenizer

    shutil.copytree(tiny_models.dir("llama"), folder)
    tokenizer, _ = load_tokenizer(parse_model_spec(str(folder)))
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    tokenizer.save_pretrained(folder)
    return folder


def added_token_model(tiny_models: Any, folder: Path) -> Path:
    """A copy of the tiny Llama (300 embeddings) whose tokenizer adds the token 'zzyzx' (id 300) it has none for."""
    shutil.copytree(tiny_models.dir("llama"), folder)
    tiny_models.tokenizer(("zzyzx",)).save_pretrained(folder)
    return folder


def run_cli(*args: str) -> Any:
    from hrsa.cli import cli

    return CliRunner().invoke(cli, ["extract", *args])


def assert_one_line_error(result: Any, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hrsa: error: Expected"), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing-model", ("Got nothing there",)),
        ("missing-corpus", ("Expected a corpus file or folder", "Check the path")),
        ("empty-document", ("Expected text in every document", "['blank']")),
        ("blank-document", ("Expected text in every document", "['blank']", "Remove them")),
        ("empty-document-specials", ("Expected text in every document", "['blank']", "Remove them")),
        ("too-long", ("at most 128 tokens (the model's context)", "in long", "--max-tokens 128")),
        ("max-tokens-above-context", ("at most 128 tokens (the model's context)", "--max-tokens 256", "in long",
                                      "--max-tokens 128")),
        ("bad-name", ("--name", "'../escape'")),
        ("layers-out-of-range", ("Expected --layers to be distinct hidden states in 0..2",)),
        ("token-past-vocabulary", ("Expected token ids below 300 (the model's vocabulary)", "300 ('zzyzx')",
                                   "in added", "resize_token_embeddings")),
    ],
)
def test_mistakes_are_one_line_and_damage_nothing(
    case: str, fragments: tuple[str, ...], stored_copy: Path, tiny_models: Any, corpus_file: Path, tmp_path: Path
) -> None:
    model, corpus, extra = str(tiny_models.dir("llama")), str(corpus_file), []
    if case == "missing-model":
        model = str(tmp_path / "no-such-model")
    elif case == "missing-corpus":
        corpus = str(tmp_path / "no-such-corpus.jsonl")
    elif case == "empty-document":
        corpus = str(write_jsonl(tmp_path / "c.jsonl", {"fine": "the lazy dog", "blank": ""}))
    elif case == "blank-document":  # stored as a whitespace token before
        corpus = str(write_jsonl(tmp_path / "c.jsonl", {"fine": "the lazy dog", "blank": " \n "}))
    elif case == "empty-document-specials":  # stored as <s></s> before
        model = str(specials_model(tiny_models, tmp_path / "specials"))
        corpus = str(write_jsonl(tmp_path / "c.jsonl", {"fine": "the lazy dog", "blank": ""}))
    elif case == "too-long":  # the tiny models take 128 positions
        corpus = str(write_jsonl(tmp_path / "c.jsonl", {"fine": "the lazy dog", "long": "the lazy dog " * 60}))
    elif case == "max-tokens-above-context":  # a cut past the context turned the context check off
        corpus = str(write_jsonl(tmp_path / "c.jsonl", {"fine": "the lazy dog", "long": "the lazy dog " * 60}))
        extra = ["--max-tokens", "256"]
    elif case == "bad-name":
        extra = ["--name", "../escape"]
    elif case == "token-past-vocabulary":  # failed mid-extraction, its store written, saying "re-run"
        model = str(added_token_model(tiny_models, tmp_path / "added"))
        corpus = str(write_jsonl(tmp_path / "c.jsonl", {"fine": "the lazy dog", "added": "the zzyzx dog"}))
    elif case == "layers-out-of-range":  # another corpus: it was stored before the model loaded and told
        corpus = str(write_jsonl(tmp_path / "c.jsonl", {"fine": "the lazy dog", "other": "w1 w2 w3"}))
        extra = ["--layers", "0,9", "--workers", "1", "--name", "new"]
    before = store_digest(stored_copy)
    result = run_cli("--store", str(stored_copy), "--model", model, "--corpus", corpus, *extra)
    assert_one_line_error(result, *fragments)
    assert store_digest(stored_copy) == before


def test_config_errors_are_listed_in_one_line(stored_copy: Path, tiny_models: Any, corpus_file: Path) -> None:
    before = store_digest(stored_copy)
    result = run_cli("--store", str(stored_copy), "--model", str(tiny_models.dir("llama")),
                     "--corpus", str(corpus_file), "--name", "bad name", "--text", "text", "--template", "{text}",
                     "--layers", "2,2")
    assert_one_line_error(result, "3 problem(s)", "name:", "template:", "layers:")
    assert store_digest(stored_copy) == before
    with pytest.raises(ExtractConfigError) as info:  # the same from Python
        parse_extract_config({"store": "s", "model": "m", "corpus": "c", "workers": 0, "colour": "red"})
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert "2 problem(s)" in str(info.value) and "workers" in str(info.value) and "colour" in str(info.value)


def test_settings_come_from_config_and_flags_win(tmp_path: Path, corpus_file: Path) -> None:
    """--config gives any field, the required ones included; a flag given wins; --layers text is parsed."""
    config = tmp_path / "extract.yaml"
    config.write_text(f"store: {tmp_path / 'store'}\nmodel: {tmp_path / 'nope'}\ncorpus: {corpus_file}\n"
                      "layers: 0,2\ndtype: float32\n")
    loaded = load_extract_config(config, {"layers": "1,3-4", "dtype": None, "workers": None})
    assert loaded.layers == [1, 3, 4] and loaded.dtype == "float32" and loaded.model == str(tmp_path / "nope")
    assert load_extract_config(config, {}).layers == [0, 2]
    assert parse_extract_config({"store": "s", "model": "m", "corpus": "c", "layers": [0, 1]}).layers == [0, 1]
    # Through the CLI: the model from the file is used (and missing), so this is the model's error, not a flag's.
    assert_one_line_error(run_cli("--config", str(config)), "Got nothing there")
    assert not (tmp_path / "store").exists()


def test_required_fields_missing_from_flags_and_config(tmp_path: Path, corpus_file: Path) -> None:
    config = tmp_path / "extract.yaml"
    config.write_text(f"corpus: {corpus_file}\n")
    result = run_cli("--config", str(config), "--layers", "x")
    assert_one_line_error(result, "3 problem(s)", "--store is required (as a flag or in --config)",
                          "--model is required", "layers: Expected hidden-state indices such as 0,3,5-9. Got 'x' instead")


@pytest.mark.integration
def test_causal_encoder_is_refused_in_one_line(
    stored_copy: Path, tiny_models: Any, corpus_file: Path, ray_local: Any
) -> None:
    """Found while a worker loads the model: the worker's UserError reaches the user as itself."""
    import ray

    before = store_digest(stored_copy)
    result = run_cli("--store", str(stored_copy), "--model", str(tiny_models.dir("bert")), "--corpus", str(corpus_file),
                     "--attention", "causal", "--workers", "1")
    assert_one_line_error(result, "an encoder that attends both ways", "--attention auto")
    assert store_digest(stored_copy) == before  # same tokenizer files, same text: the corpus was already there
    deadline = time.monotonic() + 20  # and the refused worker was given back
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < ray_local.n_cpus:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray_local.n_cpus


@pytest.mark.real_model
@requires_packaged("all-minilm-l6-v2")
def test_a_tokenizer_that_does_not_give_the_corpus_ids_is_refused(stored_copy: Path, finished_store: tuple[Path, str]) -> None:
    cid = finished_store[1]
    before = store_digest(stored_copy)
    result = run_cli("--store", str(stored_copy), "--model", "packaged:all-minilm-l6-v2", "--corpus", cid)
    assert_one_line_error(result, f"tokenizer to give the token ids of corpus {cid} on every document",
                          "Got other ids in 3 of 3 documents (a, b, c)", "Give the corpus file (--corpus ")
    assert store_digest(stored_copy) == before


# -- re-running on a stored model: the same settings resume (or do nothing), others are refused --------------------
def tiny_args(store: Path, tiny_models: Any, corpus: Path, *extra: str) -> list[str]:
    """The finished store's own extraction (model tiny, shard 16), plus ``extra`` flags."""
    return ["--store", str(store), "--model", str(tiny_models.dir("llama")), "--corpus", str(corpus),
            "--name", "tiny", "--shard-tokens", "16", *extra]


def test_rerunning_the_same_extraction_does_nothing(stored_copy: Path, tiny_models: Any, corpus_file: Path) -> None:
    """Complete and the same: nothing to do, nothing written, and no Ray needed to find that out."""
    before = store_digest(stored_copy)
    result = run_cli(*tiny_args(stored_copy, tiny_models, corpus_file, "--attention", "causal", "--layers", "0-2"))
    assert result.exit_code == 0, result.output
    assert "tiny: 0 of " in result.stdout and "units written this run" in result.stdout
    assert store_digest(stored_copy) == before


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (("--attention", "bidirectional"), ("attention 'bidirectional'", "stored 'causal'")),
        (("--dtype", "bfloat16"), ("dtype 'bfloat16'", "stored 'float32'")),
        (("--layers", "0,2"), ("hidden states [0, 2]", "stored [0, 1, 2]")),
        (("--max-docs", "2"), ("corpus", "max_docs 2")),
        (("--template", "{text}!"), ("corpus", "template")),
        (("--shard-tokens", "32"), ("32 tokens per unit", "stored 16")),
        (("--attention", "bidirectional", "--layers", "1"), ("attention 'bidirectional'", "hidden states [1]")),
    ],
    ids=["attention", "dtype", "layers", "max-docs", "template", "shard-tokens", "two-at-once"],
)
def test_rerunning_with_other_settings_is_refused(
    flags: tuple[str, ...], fragments: tuple[str, ...], stored_copy: Path, tiny_models: Any, corpus_file: Path
) -> None:
    before = store_digest(stored_copy)
    result = run_cli(*tiny_args(stored_copy, tiny_models, corpus_file), *flags)
    assert_one_line_error(result, "model tiny", *fragments, "--name", f"hrsa store rm {stored_copy} tiny")
    assert store_digest(stored_copy) == before


def test_the_corpus_is_compared_by_its_tokens(stored_copy: Path, tiny_models: Any, tmp_path: Path) -> None:
    """Same options, other text: another extraction. The same text from another path: the same one."""
    edited = write_jsonl(tmp_path / "edited.jsonl", {**TEXTS, "b": "w1 w2 w3 w4"})
    before = store_digest(stored_copy)
    result = run_cli(*tiny_args(stored_copy, tiny_models, edited))
    assert_one_line_error(result, "model tiny", "corpus", "other tokens", "--name")
    assert store_digest(stored_copy) == before
    moved = write_jsonl(tmp_path / "moved.jsonl", TEXTS)
    result = run_cli(*tiny_args(stored_copy, tiny_models, moved))
    assert result.exit_code == 0 and "tiny: 0 of " in result.stdout, result.output
    assert store_digest(stored_copy) == before


def test_the_comparison_is_one_function(finished_store: tuple[Path, str], tiny_models: Any, corpus_file: Path) -> None:
    """stored_mismatch, for the pipeline's runner too: [] for the same extraction, one entry per difference."""
    from hrsa.extract.rerun import stored_mismatch

    path, _ = finished_store
    store = ActivationStore.open(str(path))
    same = parse_extract_config({"store": str(path), "model": str(tiny_models.dir("llama")), "corpus": str(corpus_file),
                                 "name": "tiny", "shard_tokens": 16, "token_budget": 7})  # the budget moves no row
    assert stored_mismatch(store, same) == []
    other = same.model_copy(update={"attention": "bidirectional", "layers": [0], "max_tokens": 5})
    assert len(stored_mismatch(store, other)) == 3


def test_a_resume_compares_what_the_workers_loaded_with_the_stored_model(finished_store: tuple[Path, str],
                                                                       tiny_models: Any) -> None:
    """What the settings alone cannot tell (dtype "auto" gives bfloat16 on a GPU, float32 on a CPU; the weights at
    the path) is compared once a worker has loaded the model: a resume with another dtype wrote bfloat16 rows into a
    float32 model's units, mixed with the stored ones."""
    from hrsa.extract.models import parse_model_spec
    from hrsa.extract.rerun import loaded_mismatch
    from hrsa.extract.worker import ExtractionWorker

    path, _ = finished_store
    info = ActivationStore.open(str(path)).model_info("tiny")
    model = parse_model_spec(str(tiny_models.dir("llama"))).to_dict()
    worker = ExtractionWorker(model, str(path), device="cpu")
    assert loaded_mismatch(info, worker.describe(digest=True)) == []  # the stored model's own load
    found = loaded_mismatch(info, worker.describe({**model, "dtype": "bfloat16"}, digest=True))
    assert len(found) == 1 and "dtype 'bfloat16' as loaded (stored 'float32')" in found[0], found
    found = loaded_mismatch(info, worker.describe({**model, "attention": "bidirectional"}, digest=True))
    assert len(found) == 1 and "attention 'bidirectional' as loaded (stored 'causal')" in found[0], found


def test_the_same_model_files_elsewhere_are_the_same_model(finished_store: tuple[Path, str], tiny_models: Any,
                                                           corpus_file: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A moved project (`hrsa submit` unpacks its working dir to a new path each time): the model folder's path was
    compared, so a pipeline with a fresh out refused to adopt its own model. A stored model that records its files'
    digest (as an extraction records it) is the same model at any path holding those files, and not with other files
    there; one stored without the digest (an earlier hrsa; this store's, written by the worker alone) is still
    compared by its path."""
    import dataclasses

    from hrsa.extract.identity import model_content
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.rerun import stored_mismatch
    from tests.conftest import save_tiny_model

    path, _ = finished_store
    store = ActivationStore.open(str(path))
    moved = Path(shutil.copytree(tiny_models.dir("llama"), tmp_path / "moved"))
    asked = parse_extract_config({"store": str(path), "model": str(moved), "corpus": str(corpus_file), "name": "tiny",
                                  "shard_tokens": 16})
    info = store.model_info("tiny")
    assert "content" not in info.source
    assert [m for m in stored_mismatch(store, asked) if m.startswith(f"model local:{moved}")]
    content = model_content(parse_model_spec(str(tiny_models.dir("llama"))))
    monkeypatch.setattr(store, "model_info", lambda mid: dataclasses.replace(info, source={**info.source, "content": content}))
    assert stored_mismatch(store, asked) == []
    save_tiny_model(moved, "llama", seed=1)  # other weights there
    assert [m for m in stored_mismatch(store, asked) if m.startswith(f"model local:{moved} (stored local:")]


@pytest.mark.parametrize(("asked", "differs"), [("org/tiny@v1", False), ("org/tiny@v2", True), ("org/tiny", True),
                                                 ("other/tiny@v1", True)], ids=["same", "revision", "no-revision", "id"])
def test_a_hub_model_at_another_revision_is_another_model(finished_store: tuple[Path, str], corpus_file: Path,
                                                          monkeypatch: pytest.MonkeyPatch, asked: str,
                                                          differs: bool) -> None:
    """A hub model has no files here to digest: its id and revision are what says which weights made the stored rows,
    so a re-run at another revision is refused, never resumed into the rows of the first."""
    import dataclasses

    from hrsa.extract.rerun import stored_mismatch

    path, _ = finished_store
    store = ActivationStore.open(str(path))
    info = store.model_info("tiny")
    hub = {**info.source, "kind": "hub", "id": "org/tiny", "path": None, "revision": "v1", "content": None}
    monkeypatch.setattr(store, "model_info", lambda mid: dataclasses.replace(info, source=hub))
    config = parse_extract_config({"store": str(path), "model": asked, "corpus": str(corpus_file), "name": "tiny",
                                   "shard_tokens": 16})
    found = stored_mismatch(store, config)
    assert found == ([f"model hub:{asked} (stored hub:org/tiny@v1)"] if differs else [])


# -- mistakes that must leave no trace: a new store is created only once the model and the corpus are good ----------
@pytest.mark.parametrize("case", ["missing-model", "missing-corpus", "empty-corpus", "empty-document", "blank-document",
                                  "empty-document-specials", "too-long", "max-tokens-above-context", "broken-template",
                                  "layers-out-of-range"])
def test_a_new_store_is_not_created_by_a_mistake(case: str, tmp_path: Path, corpus_file: Path, tiny_models: Any) -> None:
    store, model, corpus, extra = tmp_path / "store", str(tiny_models.dir("llama")), str(corpus_file), []
    if case == "missing-model":
        model = str(tmp_path / "nope")
    elif case == "missing-corpus":
        corpus = str(tmp_path / "nope.jsonl")
    elif case == "empty-corpus":
        corpus = str(write_jsonl(tmp_path / "c.jsonl", {}))
    elif case == "empty-document":
        corpus = str(write_jsonl(tmp_path / "c.jsonl", {"fine": "the lazy dog", "blank": ""}))
    elif case == "blank-document":
        corpus = str(write_jsonl(tmp_path / "c.jsonl", {"fine": "the lazy dog", "blank": "\t"}))
    elif case == "empty-document-specials":
        model = str(specials_model(tiny_models, tmp_path / "specials"))
        corpus = str(write_jsonl(tmp_path / "c.jsonl", {"fine": "the lazy dog", "blank": ""}))
    elif case == "too-long":
        corpus = str(write_jsonl(tmp_path / "c.jsonl", {"long": "the lazy dog " * 60}))
    elif case == "max-tokens-above-context":
        corpus = str(write_jsonl(tmp_path / "c.jsonl", {"long": "the lazy dog " * 60}))
        extra = ["--max-tokens", "256"]
    elif case == "broken-template":  # was a traceback (string.Formatter's ValueError), after the store was made
        extra = ["--template", "{nope"]
    elif case == "layers-out-of-range":  # known once the model loads: the store and its corpus were made before
        extra = ["--layers", "0,9", "--workers", "1"]
    result = run_cli("--store", str(store), "--model", model, "--corpus", corpus, *extra)
    assert_one_line_error(result)
    assert not store.exists()


@pytest.mark.parametrize("recorded", [True, False], ids=["corpus-spec", "written-through-the-api"])
def test_a_stored_corpus_longer_than_the_models_context_is_refused_when_joined(
    recorded: bool, stored_copy: Path, tiny_models: Any, tmp_path: Path
) -> None:
    """A corpus cut at 256 tokens (stored for a model with a longer context) joined by id by the tiny Llama (128
    positions): its rows past the context went to the workers before (a BERT-like model failed there, a
    re-run-to-resume message and an incomplete model left in the store)."""
    from hrsa.extract.corpus import CorpusSpec, load_records, tokenize_corpus
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.models import load_tokenizer, tokenizer_fingerprint

    model = str(tiny_models.dir("llama"))
    tokenizer, limits = load_tokenizer(parse_model_spec(model))
    assert limits.context == 128
    corpus = write_jsonl(tmp_path / "c.jsonl", {"fine": "the lazy dog", "long": "the lazy dog " * 60})
    spec = CorpusSpec(source=str(corpus), max_tokens=256)
    table = tokenize_corpus(list(load_records(spec)), spec, tokenizer)  # no context given: a longer model's cut
    assert table.n_tokens > 128 + 3
    info = {"name": model, "fingerprint": tokenizer_fingerprint(tokenizer)}
    store = ActivationStore.open(str(stored_copy), mode="a")
    cid = store.write_corpus(table, tokenizer=info, source=str(corpus), fields=("text",),
                             extra={"corpus_spec": spec.to_dict()} if recorded else None)
    before = store_digest(stored_copy)
    result = run_cli("--store", str(stored_copy), "--model", model, "--corpus", cid, "--name", "short")
    assert_one_line_error(result, f"corpus {cid}", "at most 128 tokens (the model's context)", "in long",
                          f"--corpus {corpus} --max-tokens 128")
    assert store_digest(stored_copy) == before


@pytest.mark.parametrize("recorded", [True, False], ids=["corpus-spec", "written-through-the-api"])
def test_a_stored_corpus_with_tokens_past_the_models_vocabulary_is_refused_when_joined(
    recorded: bool, stored_copy: Path, tiny_models: Any, tmp_path: Path
) -> None:
    """A corpus holding an added token (id 300) joined by id by a model of 300 embeddings whose tokenizer gives it."""
    from hrsa.extract.corpus import CorpusSpec, load_records, tokenize_corpus
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.models import load_tokenizer, tokenizer_fingerprint

    model = str(added_token_model(tiny_models, tmp_path / "added"))
    tokenizer, limits = load_tokenizer(parse_model_spec(model))
    assert limits.vocabulary == 300
    corpus = write_jsonl(tmp_path / "c.jsonl", {"fine": "the lazy dog", "added": "the zzyzx dog"})
    spec = CorpusSpec(source=str(corpus))
    table = tokenize_corpus(list(load_records(spec)), spec, tokenizer)
    assert table.token_ids.max() == 300
    store = ActivationStore.open(str(stored_copy), mode="a")
    cid = store.write_corpus(table, tokenizer={"name": model, "fingerprint": tokenizer_fingerprint(tokenizer)},
                             source=str(corpus), fields=("text",),
                             extra={"corpus_spec": spec.to_dict()} if recorded else None)
    before = store_digest(stored_copy)
    result = run_cli("--store", str(stored_copy), "--model", model, "--corpus", cid, "--name", "added")
    assert_one_line_error(result, "Expected token ids below 300 (the model's vocabulary)", "300 ('zzyzx') in added")
    assert store_digest(stored_copy) == before


def test_a_store_path_that_is_a_file_is_one_line_and_left_as_it_was(tmp_path: Path, corpus_file: Path,
                                                                     tiny_models: Any) -> None:
    """zarr's local store raised FileExistsError (a traceback, exit 1) at the end of the checks."""
    store = tmp_path / "afile"
    store.write_text("not a store")
    result = run_cli("--store", str(store), "--model", str(tiny_models.dir("llama")), "--corpus", str(corpus_file))
    assert_one_line_error(result, "Expected a folder for the store at", "Got a file there")
    assert store.read_text() == "not a store"


def test_an_empty_corpus_says_what_is_empty(tmp_path: Path, tiny_models: Any) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", {})
    result = run_cli("--store", str(tmp_path / "store"), "--model", str(tiny_models.dir("llama")), "--corpus", str(corpus))
    assert_one_line_error(result, "at least one document", str(corpus), "Got none")
    assert "empty document(s) []" not in result.stderr


def test_negative_layers_name_hidden_states(tmp_path: Path, corpus_file: Path) -> None:
    result = run_cli("--store", str(tmp_path / "store"), "--model", str(tmp_path / "m"), "--corpus", str(corpus_file),
                     "--layers=-1")
    assert_one_line_error(result, "hidden-state indices", "'-1'", ">= 0")
    assert "document" not in result.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("where", ["local", "memory"])
@pytest.mark.parametrize("name", ["zarr.json", "models", "hidden", "units", "done", "claims", "Zarr.JSON"])
def test_reserved_names_are_refused_as_ids(where: str, name: str, stored_copy: Path, tiny_models: Any,
                                           corpus_file: Path) -> None:
    import fsspec

    if where == "local":
        url, snapshot = str(stored_copy), lambda: store_digest(stored_copy)
    else:
        url = f"memory://reserved-{name}"
        ActivationStore.open(url, mode="a")
        fs = fsspec.filesystem("memory")
        snapshot = lambda: {k: bytes(fs.cat_file(k)) for k in fs.find(f"/reserved-{name}")}  # noqa: E731
    before = snapshot()
    result = run_cli("--store", url, "--model", str(tiny_models.dir("llama")), "--corpus", str(corpus_file),
                     "--name", name)
    assert_one_line_error(result, f"Got {name!r}", "reserved")
    assert snapshot() == before


@pytest.mark.parametrize("value", ["", " ", ","])
def test_an_empty_layers_flag_is_refused_not_read_as_all(tmp_path: Path, corpus_file: Path, value: str) -> None:
    """`--layers "$UNSET"` stored every hidden state; an empty list is refused as `--docs ""` is."""
    with pytest.raises(UserError, match="which lists none"):
        parse_extract_config({"store": str(tmp_path / "s"), "model": "m", "corpus": str(corpus_file), "layers": value})


def test_chat_contents_left_as_markup_are_one_warning_line(tmp_path: Path, tiny_models: Any, ray_local: Any) -> None:
    """A chat template that rewrites contents (newlines to spaces) leaves them as markup: the extraction says so in
    one line on stderr (not a Python warning's two lines with a source path), and still extracts."""
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.models import load_tokenizer

    folder = Path(shutil.copytree(tiny_models.dir("llama"), tmp_path / "chat"))
    tokenizer, _ = load_tokenizer(parse_model_spec(str(folder)))
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] | replace('\\n', ' ') }}\n"
                               "{% endfor %}<s>assistant: ")
    tokenizer.save_pretrained(folder)
    corpus = tmp_path / "chats.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "m": [{"role": "user", "content": text}]}) + "\n"
                              for i, text in (("one", "the dog\nthe fox"), ("two", "the cat"))))
    result = run_cli("--store", str(tmp_path / "store"), "--model", str(folder), "--corpus", str(corpus),
                     "--template", "{chat:m}", "--name", "chat", "--workers", "1")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if "chat messages" in line]
    assert warned == [line for line in result.stderr.splitlines() if "markup" in line] and len(warned) == 1, result.stderr
    assert warned[0].startswith("hrsa: warning: 1 of 2 chat messages of field 'm'") and "one" in warned[0], warned


def test_a_failed_extraction_still_prints_the_warnings_gathered_before_it(tmp_path: Path, tiny_models: Any,
                                                                          ray_local: Any) -> None:
    """The chat-markup warning (found while tokenising) was dropped when the run then failed: a user fixing the
    error never learnt that part of the corpus would be left as markup. It prints before the error line."""
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.models import load_tokenizer

    folder = Path(shutil.copytree(tiny_models.dir("llama"), tmp_path / "chat"))
    tokenizer, _ = load_tokenizer(parse_model_spec(str(folder)))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | replace('\\n', ' ') }}\n{% endfor %}"
    tokenizer.save_pretrained(folder)
    corpus = tmp_path / "chats.jsonl"
    corpus.write_text(json.dumps({"id": "one", "m": [{"role": "user", "content": "the dog\nthe fox"}]}) + "\n")
    result = run_cli("--store", str(tmp_path / "store"), "--model", str(folder), "--corpus", str(corpus),
                     "--template", "{chat:m}", "--name", "chat", "--workers", "1", "--layers", "99")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("hrsa: warning: 1 of 1 chat messages of field 'm'"), lines
    assert "99" in lines[1] and not (tmp_path / "store").exists(), lines


@pytest.mark.parametrize("option", [["--max-tokens", "2"], ["--max-docs", "1"], ["--text", "body"]])
def test_corpus_options_with_a_stored_corpus_id_are_refused_not_ignored(
        stored_copy: Path, finished_store: tuple[Path, str], tiny_models: Any, option: list[str]) -> None:
    """They were ignored (every stored document extracted whole) while the model recorded --max-tokens 2 as its cut."""
    before = store_digest(stored_copy)
    result = run_cli("--store", str(stored_copy), "--model", str(tiny_models.dir("llama")), "--corpus", finished_store[1],
                     "--name", "cut", *option)
    assert_one_line_error(result, "Expected no corpus options with a stored corpus", f"{option[0]} {option[1]}")
    assert store_digest(stored_copy) == before
