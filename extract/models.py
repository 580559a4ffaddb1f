"""Loading a model for extraction, and the reference forward pass over whole documents.

:func:`load_model` turns a :class:`ModelSpec` into a :class:`LoadedModel`: the base transformer
(``AutoModel``, no LM head: we need hidden states, not logits) in eval mode on one device, its
tokenizer, and the facts the store records (number of hidden states L+1, hidden size D, dtype,
attention mode, tokenizer fingerprint).

The attention mode is checked, not assumed: after loading, a probe changes the last of a few tokens
and looks at the first token's hidden states. They move under bidirectional attention and stay put
under causal attention. A decoder made bidirectional with ``config.is_causal = False`` (honoured by
Llama, Qwen2 and Qwen3 on transformers >= 5.2) is thus verified, and an architecture that ignores the
flag is refused instead of being stored under the wrong label.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hrsa.extract.model_spec import ModelSpec, ModelSpecError, parse_model_spec
from hrsa.extract.packaged import packaged_model, packaged_model_path, packaged_model_version
from hrsa.runtime.locations import parse_location
from hrsa.store.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "AttentionModeError",
    "ModelSpec",
    "ModelSpecError",
    "parse_model_spec",
    "load_model",
    "load_tokenizer",
    "ModelLimits",
    "forward_hidden_states",
    "tokenizer_fingerprint",
    "resolve_dtype",
    "choose_attn_implementation",
]

# First-token change (relative L2, any hidden state) above which the probe calls attention bidirectional.
# Causal attention gives exactly 0 here; bidirectional gives O(1e-2) or more even on the final state.
_PROBE_THRESHOLD = 1e-4


class ModelLoadError(UserError, OSError):
    """The weights or tokenizer could not be found or read."""


class AttentionModeError(UserError, ValueError):
    """An attention mode the architecture cannot run in."""


@dataclass(frozen=True, eq=False)  # identity semantics: it holds a live model
class LoadedModel:
    """A model ready for extraction, plus what the store records about it.

    Attributes:
        model: the base transformer (``AutoModel``), eval mode, on ``device``.
        tokenizer: its tokenizer.
        spec: the spec it was loaded from.
        device: where it runs.
        dtype: the compute dtype, "float32", "bfloat16" or "float16".
        attention: "causal" or "bidirectional", as verified by the probe.
        n_hidden_states: L + 1 (index 0 the embedding output, L the last layer after any final norm).
        hidden_size: D.
        tokenizer_fingerprint: sha256 over vocabulary, special tokens and tokenization settings.
        attn_implementation: "flash_attention_2", "sdpa" or "eager".
        source: where the weights came from (spec fields plus resolved path and package version).
        context_length: the most positions the model takes (None if its config does not say).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    device: torch.device
    dtype: str
    attention: str
    n_hidden_states: int
    hidden_size: int
    tokenizer_fingerprint: str
    attn_implementation: str
    source: dict[str, Any] = field(default_factory=dict)
    context_length: int | None = None

    def tokenizer_info(self) -> dict[str, str]:
        """The ``tokenizer`` mapping that :meth:`ActivationStore.write_corpus` expects."""
        return {"name": self.spec.name, "fingerprint": self.tokenizer_fingerprint}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``name``; "auto" is bfloat16 on CUDA (fast, same range as fp32), else float32."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def choose_attn_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """flash-attention 2 where it can run (installed, CUDA, half precision), else PyTorch SDPA."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available() or dtype == torch.float32:
        return "sdpa"
    try:
        import flash_attn  # noqa: F401  (source-only package: often absent, sometimes broken)
    except Exception:
        return "sdpa"
    return "flash_attention_2"


def _resolve_weights(spec: ModelSpec) -> tuple[str, str | None, dict[str, Any]]:
    """(folder or hub id, gguf file name or None, provenance) for ``from_pretrained``."""
    if spec.kind == "hub":
        return str(spec.id), spec.gguf_file, {}
    if spec.kind == "local":
        return str(spec.path), None, {}
    if spec.kind == "remote":  # each machine loads its own cached copy (an extraction worker on every node)
        return str(parse_location(str(spec.path)).local_folder()), None, {}
    if spec.kind == "gguf":
        path = Path(str(spec.path))
        return str(path.parent), path.name, {}
    entry = packaged_model(str(spec.id))
    path = packaged_model_path(entry.name)
    provenance = {
        "resolved_path": str(path),
        "package": entry.distribution,
        "package_version": packaged_model_version(entry.name),
    }
    if entry.is_gguf:
        return str(path.parent), path.name, provenance
    return str(path), None, provenance


def _from_pretrained(
    auto_class: Any, location: str, spec: ModelSpec, *, missing: tuple[type[Exception], ...] = (OSError,), **kwargs: Any
) -> Any:
    """``auto_class.from_pretrained`` with the spec's options; a missing or unreadable model is a UserError.

    ``missing`` lists the exceptions that mean "files not there": OSError for weights, and also
    ValueError for tokenizers (transformers raises it when no tokenizer file can be found).
    """
    from safetensors import SafetensorError

    if spec.revision:
        kwargs["revision"] = spec.revision
    try:
        return auto_class.from_pretrained(location, trust_remote_code=spec.trust_remote_code, **kwargs)
    except SafetensorError as e:  # a weights file cut short or damaged: not an OSError, so named here
        damaged = _unreadable_safetensors(Path(location)) if Path(location).is_dir() else None
        raise ModelLoadError(
            f"Expected readable weights in {damaged or location}. "
            f"Got SafetensorError: {str(e).splitlines()[0] if str(e) else ''} instead. The file is damaged or was cut "
            "short (a copy, download or save that stopped part-way): copy or save the model again."
        ) from e
    except missing as e:
        where = f"{location} ({kwargs['gguf_file']})" if kwargs.get("gguf_file") else location
        raise ModelLoadError(
            f"Expected a loadable model at {where}. "
            f"Got {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} instead. "
            "Check the path or id; without a reachable hub, use a local folder, a .gguf file or packaged:<name>."
        ) from e


def _unreadable_safetensors(folder: Path) -> Path | None:
    """The first ``*.safetensors`` file of ``folder`` whose header cannot be read (cut short, overwritten), if any."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception:  # SafetensorError, or an OSError reading it: either way, this file is the broken one
            return path
    return None


def _load_weights(spec: ModelSpec, location: str, gguf_file: str | None, dtype: torch.dtype, impl: str) -> Any:
    """The base model; falls back to eager attention for architectures without SDPA / flash support."""
    from transformers import AutoModel

    extra: dict[str, Any] = {}
    if gguf_file:
        from transformers import GgufConfig

        # Unpack every weight into a plain dense model. Left to itself, transformers keeps the weights
        # packed and computes with hub-downloaded kernels when the `kernels` package is installed, so
        # the activations would depend on what else is installed; dense weights give the same values
        # everywhere (checked equal to the default path on SmolLM2 without `kernels`).
        extra = {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)}
    for attempt in dict.fromkeys((impl, "eager")):
        try:
            return _from_pretrained(AutoModel, location, spec, dtype=dtype, attn_implementation=attempt, **extra)
        except ValueError as e:  # transformers: "... does not support an attention implementation through ..."
            if attempt == "eager" or "attention" not in str(e).lower():
                raise
    raise AssertionError("unreachable")


def _context_length(config: Any) -> int | None:
    """Most positions the model embeds: ``max_position_embeddings`` (Llama, Qwen, BERT) or ``n_positions`` (GPT-2)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _tokenizer_at(spec: ModelSpec, location: str, gguf_file: str | None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    return _from_pretrained(AutoTokenizer, location, spec, missing=(OSError, ValueError), **extra)


@dataclass(frozen=True)
class ModelLimits:
    """What a model can take, from its config: ``context`` positions and ``vocabulary`` token embeddings (None:
    the config does not say)."""

    context: int | None
    vocabulary: int | None


def load_tokenizer(spec: ModelSpec) -> tuple[PreTrainedTokenizerBase, ModelLimits]:
    """The spec's tokenizer and the model's limits, without loading any weights.

    For tokenising a corpus before (or without) running the model. Raises as :func:`load_model`.
    """
    location, gguf_file, _ = _resolve_weights(spec)  # once: a remote folder's copy, the same for both
    config = _config_at(spec, location, gguf_file)
    return _tokenizer_at(spec, location, gguf_file), ModelLimits(_context_length(config), _vocabulary_size(config))


def _vocabulary_size(config: Any) -> int | None:
    """Rows of the model's token embedding: its (text) config's ``vocab_size``, as from_pretrained builds it."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "vocab_size", None)
    return value if isinstance(value, int) and value > 0 else None


def load_config(spec: ModelSpec) -> Any:
    """The spec's model config (no weights, no tokenizer). Raises as :func:`load_model`."""
    location, gguf_file, _ = _resolve_weights(spec)
    return _config_at(spec, location, gguf_file)


def _config_at(spec: ModelSpec, location: str, gguf_file: str | None) -> Any:
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, location, spec, **({"gguf_file": gguf_file} if gguf_file else {}))


def load_model(spec: ModelSpec, *, device: str | torch.device | None = None) -> LoadedModel:
    """Load ``spec``'s base model and tokenizer for extraction.

    Args:
        spec: from :func:`parse_model_spec`.
        device: "cpu", "cuda", "cuda:1"...; None picks CUDA when available.

    Returns:
        A :class:`LoadedModel` whose attention mode has been verified by a probe.

    Raises:
        ModelLoadError: weights or tokenizer not found or unreadable.
        PackagedModelNotFoundError: a packaged model whose pip package is not installed.
        AttentionModeError: causal attention asked of an encoder, or bidirectional of a decoder
            that ignores ``config.is_causal``.
    """
    import torch
    import transformers

    # Step 1: where the weights are, and how to run them.
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(spec.dtype, device)
    impl = choose_attn_implementation(device, torch_dtype)
    location, gguf_file, provenance = _resolve_weights(spec)
    # Step 2: tokenizer and base model. GGUF weights are dequantised (to float32), then cast to torch_dtype.
    tokenizer = _tokenizer_at(spec, location, gguf_file)
    model = _load_weights(spec, location, gguf_file, torch_dtype, impl).to(device).eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # one forward per document: a KV cache would only cost memory
    # Step 3: set and verify the attention mode; the probe also measures L+1 and D.
    attention, n_states, hidden = _set_attention(model, tokenizer, spec.attention)
    source = {**spec.to_dict(), **provenance, "transformers_version": transformers.__version__}
    if gguf_file:
        source["gguf_dequantized"] = True
    return LoadedModel(
        model=model, tokenizer=tokenizer, spec=spec, device=device,
        dtype=str(model.dtype).removeprefix("torch."), attention=attention,
        n_hidden_states=n_states, hidden_size=hidden, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        attn_implementation=str(model.config._attn_implementation), source=source,
        context_length=_context_length(model.config),
    )


def _probe_ids(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[int], list[int]]:
    """Two ordinary-token sequences that differ only in their last token."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(min(vocab_size, 4096)) if i not in special][-5:]
    return ids[:4], ids[:3] + ids[4:5]


def _probe(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[float, int, int]:
    """(largest relative change of token 0 over hidden states, L+1, D) when only the last token changes."""
    import torch

    a, b = _probe_ids(tokenizer, int(model.get_input_embeddings().num_embeddings))
    with torch.inference_mode():
        states_a = model(torch.tensor([a], device=model.device), output_hidden_states=True).hidden_states
        states_b = model(torch.tensor([b], device=model.device), output_hidden_states=True).hidden_states
    change = 0.0
    for x, y in zip(states_a, states_b):
        x0, y0 = x[0, 0].float(), y[0, 0].float()  # (D,): token 0
        change = max(change, float((x0 - y0).norm() / x0.norm().clamp_min(1e-12)))
    return change, len(states_a), int(states_a[-1].shape[-1])


def _set_attention(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, wanted: str) -> tuple[str, int, int]:
    """Put ``model`` in the ``wanted`` attention mode and return (mode, L+1, D) as verified."""
    change, n_states, hidden = _probe(model, tokenizer)
    native = "bidirectional" if change > _PROBE_THRESHOLD else "causal"
    name = type(model).__name__
    if wanted in ("auto", native):
        return native, n_states, hidden
    if native == "bidirectional":
        raise AttentionModeError(
            f"Expected attention 'bidirectional' or 'auto' for {name}, an encoder that attends both ways by design. "
            "Got 'causal' instead. Drop the causal setting (--attention auto)."
        )
    model.config.is_causal = False  # transformers >= 5.2: Llama/Qwen2/Qwen3 build a bidirectional mask
    change, n_states, hidden = _probe(model, tokenizer)
    if change <= _PROBE_THRESHOLD:
        raise AttentionModeError(
            f"Expected {name} to run bidirectionally with config.is_causal=False. Got causal outputs instead: "
            "this architecture ignores the flag. Use --attention causal, or a Llama/Qwen2/Qwen3 model."
        )
    return "bidirectional", n_states, hidden


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over everything that decides how text becomes token ids, stable across loads.

    For fast tokenizers that is the backend's full state (vocabulary, merges, normaliser,
    pre-tokeniser, post-processor, added tokens) minus truncation and padding, which the extractor
    sets itself. Special tokens and BOS/EOS settings are added for every tokenizer.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:  # slow (Python) tokenizers: the vocabulary is what we can see
        state = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])}
    settings = {
        "special_tokens": {str(k): str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()},
        "special_ids": sorted(int(i) for i in tokenizer.all_special_ids),
        "added_tokens": sorted((int(i), t.content) for i, t in tokenizer.added_tokens_decoder.items()),
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
    }
    payload = json.dumps({"fingerprint_version": 1, "state": state, "settings": settings}, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def forward_hidden_states(loaded: LoadedModel, input_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The reference forward pass: one document at a time, no padding, every hidden state.

    Slow on purpose: batching and padding are what the extractor adds, and this is what its output
    is checked against.

    Args:
        loaded: from :func:`load_model`.
        input_ids: one list of token ids per document (each non-empty).

    Returns:
        One CPU tensor per document, shape (L+1, T, D), in the model's dtype.
    """
    import torch

    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for i, doc in enumerate(input_ids):
            if len(doc) == 0:
                raise ValueError(f"Expected at least one token in every document. Got an empty document {i}.")
            ids = torch.tensor([list(doc)], dtype=torch.long, device=loaded.device)  # (1, T)
            states = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states  # L+1 x (1, T, D)
            out.append(torch.stack([s[0] for s in states]).cpu())  # (L+1, T, D)
    return out

