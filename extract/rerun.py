"""Re-running an extraction on a model the store already holds: is it the same extraction?

One comparison, :func:`stored_mismatch`, for ``hrsa extract`` (:func:`hrsa.extract.job.run_extraction`) and the
pipeline's runner. What is compared is everything that changes a stored row: where the weights come from (kind,
hub id, revision, GGUF file) and their content (weights changed in place at the same path, local or behind a URL,
are another model; the same files at another path, a moved folder, are the same model; a model stored by an
earlier hrsa recorded no content, and is compared by its path instead), dtype, attention, which hidden states,
the tokens of the corpus (or, without them, its source and options), and the layout (tokens per unit). The token budget is not compared: it batches
documents differently but moves no row to another place (batched kernels may round differently by a few ulps
of the model's dtype: ~1e-2 relative in bfloat16; BATCH_RTOL in the tests bounds float32's). ``trust_remote_code`` is a permission, not a setting of the rows.

The same: the run resumes (or finds nothing to do). Different: :class:`RerunMismatchError`, before anything is
written, naming each difference and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hrsa.store.errors import UserError
from hrsa.store.model import describe_source

if TYPE_CHECKING:
    from hrsa.extract.config import ExtractConfig
    from hrsa.extract.model_spec import ModelSpec
    from hrsa.store import ActivationStore
    from hrsa.store.corpus import CorpusTable
    from hrsa.store.model import ModelInfo

__all__ = ["RerunMismatchError", "check_rerun", "loaded_mismatch", "stored_mismatch"]

_SOURCE_FIELDS = ("kind", "id", "path", "revision", "gguf_file")
_CORPUS_FIELDS = ("text", "template", "id_field", "max_docs", "max_tokens")


class RerunMismatchError(UserError, ValueError):
    """A re-run whose settings differ from those of the model stored under its id."""


def stored_mismatch(store: ActivationStore, config: ExtractConfig, *, corpus_hash: str | None = None,
                    table: CorpusTable | None = None) -> list[str]:
    """How stored model ``config.model_id()`` differs from what ``config`` would write: one phrase per difference.

    Args:
        store: a store holding the model.
        config: the extraction asked for.
        corpus_hash: the content hash of the corpus ``config`` asks for, tokenised by the model's tokenizer
            (:func:`hrsa.store.corpus.content_hash`), when the caller has it: then the corpus is compared by its
            tokens (an edited file at the same path differs). Without it, by its source and options as written.
        table: that tokenised corpus: when its hash differs (a corpus stored by an earlier hrsa, whose hash had
            the tokenizer in it; or other special-token flags), equal token ids on every document still match.

    Returns:
        ``[]`` when it is the same extraction (resume it, or nothing is left to do).
    """
    info = store.model_info(config.model_id())
    model = config.model_spec()
    spec = model.to_dict()
    found = []
    # Another path is another model unless the stored model recorded its files' digest and the files there have it
    # (the same files moved: a moved project); a model stored by an earlier hrsa recorded none.
    moved = spec["path"] != info.source.get("path")
    if any(spec[k] != info.source.get(k) for k in _SOURCE_FIELDS if k != "path") or (
            moved and (info.source.get("content") is None or _weights_changed(model, info))):
        found.append(f"model {_source_text(spec)} (stored {_source_text(info.source)})")
    elif not moved and _weights_changed(model, info):
        found.append(f"weights at {_source_text(spec)} (other files than those the stored model was extracted from)")
    for name, stored in (("dtype", info.dtype), ("attention", info.attention)):
        asked, stored_ask = getattr(config, name), info.source.get(name)
        if asked not in (stored, stored_ask):  # the same ask, or an explicit ask of what "auto" gave
            how = f"; it was asked as {stored_ask!r}" if stored_ask not in (None, stored) else ""
            found.append(f"{name} {asked!r} (stored {stored!r}{how})")
    layers = sorted(config.layers) if config.layers is not None else list(range(info.n_hidden_states))
    if layers != sorted(info.hidden_states):
        found.append(f"hidden states {layers} (stored {sorted(info.hidden_states)})")
    found += _layout_mismatch(info, config)
    found += _corpus_mismatch(store, info, config, corpus_hash, table)
    return found


def check_rerun(store: ActivationStore, config: ExtractConfig, *, corpus_hash: str | None = None,
                table: CorpusTable | None = None) -> None:
    """Raise :class:`RerunMismatchError` (one line: each difference, and the fix) unless :func:`stored_mismatch` is empty."""
    found = stored_mismatch(store, config, corpus_hash=corpus_hash, table=table)
    if found:
        mid = config.model_id()
        raise RerunMismatchError(
            f"Expected the settings of model {mid} stored in {store.url} to re-run or resume it. Got "
            f"{'; '.join(found)} instead. Pass --name NEW to keep both, or `hrsa store rm {store.url} {mid}` to "
            "replace it."
        )


def loaded_mismatch(info: ModelInfo, facts: Mapping[str, Any]) -> list[str]:
    """How the model a worker loaded (its ``describe()``) differs from the stored one it would resume.

    What the settings alone cannot tell: dtype "auto" on other hardware, weights changed in place at the same path.
    """
    found = [f"{name} {facts[key]!r} as loaded (stored {stored!r})"
             for name, key, stored in (("dtype", "dtype", info.dtype), ("attention", "attention", info.attention),
                                       ("hidden states (L+1)", "n_hidden_states", info.n_hidden_states),
                                       ("hidden size", "hidden_size", info.hidden_size))
             if facts[key] != stored]
    loaded, stored = facts.get("source", {}).get("content"), info.source.get("content")
    if loaded is not None and stored is not None and loaded != stored:
        found.append("weights whose files differ from those the stored model was extracted from")
    return found


def _weights_changed(spec: ModelSpec, info: ModelInfo) -> bool:
    """Whether the files at the spec's path differ from those the stored model recorded (a model stored by an
    earlier hrsa recorded none; a hub model has no files here). A model on object storage is compared by the files
    of its copy on this machine (:meth:`~hrsa.runtime.locations.Location.local_folder`: downloaded again only when
    the remote files' ETags changed), for a complete model too: no worker loads it then."""
    from hrsa.extract.identity import model_content

    stored = info.source.get("content")
    if stored is None or spec.kind == "hub":
        return False
    return model_content(spec) != stored


def _source_text(source: Mapping[str, Any]) -> str:
    return describe_source(source)


def _layout_mismatch(info: ModelInfo, config: ExtractConfig) -> list[str]:
    from hrsa.store.format import choose_layout

    asked = choose_layout(info.hidden_size, info.dtype, shard_tokens=config.shard_tokens)
    if asked == info.layout:
        return []
    return [f"{asked.shard_tokens} tokens per unit (stored {info.layout.shard_tokens}: --shard-tokens)"]


def _corpus_mismatch(store: ActivationStore, info: ModelInfo, config: ExtractConfig, corpus_hash: str | None,
                     table: CorpusTable | None) -> list[str]:
    if config.corpus == info.corpus:  # the stored corpus, by its id
        return []
    stored = store.corpus_info(info.corpus)
    stored_spec = dict(stored.extra.get("corpus_spec") or {"source": stored.source})
    asked_spec = {"source": config.corpus, **{k: getattr(config, k) for k in _CORPUS_FIELDS}}
    options = [f"{k} {asked_spec[k]!r}" for k in _CORPUS_FIELDS if asked_spec[k] != stored_spec.get(k)]
    if corpus_hash is not None:
        if corpus_hash == stored.content_hash:  # the same tokens, whatever the path or options say
            return []
        if table is not None and not store.differing_documents(info.corpus, table):
            return []
    elif not options and asked_spec["source"] == stored_spec.get("source"):
        return []
    was = [f"{k} {stored_spec.get(k)!r}" for k in _CORPUS_FIELDS if stored_spec.get(k) is not None]
    asked = f" with {', '.join(options)}" if options else ""
    return [f"corpus {config.corpus}{asked} (stored corpus {info.corpus} from {stored_spec.get('source')}"
            f"{' with ' + ', '.join(was) if was else ''} has other tokens)"]
