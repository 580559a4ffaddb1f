"""``TextEncoder``: any backbone or training checkpoint as a text embedder (mean pooled, L2-normalised).

The same recipe as training (:mod:`hrsa.train.pooling`): tokenise, run the base model, mean-pool the last
hidden state over real tokens, normalise. all-MiniLM-L6-v2 is this recipe too, so sentence-transformers is
not needed. Models load through :func:`hrsa.extract.models.load_model`, so a hub id, a local folder (a
checkpoint ``step_000100``), a ``.gguf`` file and ``packaged:NAME`` all work, and attention "auto" keeps
what the checkpoint says (a model trained bidirectionally carries ``config.is_causal=False``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from hrsa.extract.corpus import check_texts_vocabulary
from hrsa.store.errors import UserError
from hrsa.train.pooling import format_query, mean_pool

if TYPE_CHECKING:
    from hrsa.extract.models import LoadedModel

__all__ = ["NonFiniteEmbeddingsError", "TextEncoder", "length_order"]


class _TextNames(Sequence[str]):
    """Text number i as a message names it (built only for the one named)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        text = self.texts[i]
        return f"text {i + 1} ({text if len(text) <= 40 else text[:37] + '...'!r})"


def length_order(lengths: Sequence[int]) -> np.ndarray:
    """Indices that sort items longest first (stable), so each batch pads to similar lengths."""
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")


class NonFiniteEmbeddingsError(UserError, ValueError):
    """A model whose embeddings hold NaN or infinite values: no score or neighbour drawn from them means anything (NaN
    similarities rank in any order)."""


class TextEncoder:
    """A loaded model that turns texts into unit vectors.

    Args:
        loaded: a model from :func:`hrsa.extract.models.load_model`.
        max_length: default cut, in tokens (capped at the model's context length).
        batch_size: default texts per forward pass.
    """

    def __init__(self, loaded: LoadedModel, *, max_length: int = 512, batch_size: int = 32) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        if self.tokenizer.pad_token is None:  # decoders often ship without one; padding is masked anyway
            if self.tokenizer.eos_token is None:
                raise UserError(
                    f"Expected a tokenizer with a pad or an EOS token. Got neither in {loaded.spec.name} instead. "
                    "Set pad_token in its tokenizer_config.json."
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.max_length = max_length
        self.batch_size = batch_size
        # The vocabulary check's limit, read once (``encode`` runs per batch): None where every id the tokenizer gives
        # has an embedding (most tokenizers), so the check costs nothing there.
        embeddings = loaded.model.get_input_embeddings().num_embeddings
        self._vocabulary = embeddings if max(self.tokenizer.get_vocab().values(), default=-1) >= embeddings else None
        params = inspect.signature(loaded.model.forward).parameters
        self._takes_token_types = "token_type_ids" in params

    @classmethod
    def load(
        cls,
        model: str,
        *,
        device: str | None = None,
        dtype: str = "auto",
        attention: str = "auto",
        max_length: int = 512,
        batch_size: int = 32,
    ) -> TextEncoder:
        """Load ``model`` (hub id, local folder, .gguf file or ``packaged:NAME``) as an encoder.

        Raises:
            UserError: the model cannot be found or loaded (one line naming the fix).
        """
        from hrsa.extract.models import load_model, parse_model_spec

        spec = parse_model_spec(model, dtype=dtype, attention=attention)  # type: ignore[arg-type]
        with _no_loading_bar():
            return cls(load_model(spec, device=device), max_length=max_length, batch_size=batch_size)

    @property
    def name(self) -> str:
        return self.loaded.spec.name

    @property
    def dim(self) -> int:
        return self.loaded.hidden_size

    def _cut(self, max_length: int | None) -> int:
        cut = int(max_length or self.max_length)
        context = self.loaded.context_length
        return min(cut, context) if context else cut

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        max_length: int | None = None,
        instruction: str | None = None,
        show_progress: bool = False,
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Embed ``texts`` as float32 unit vectors, shape (N, D), in the order given.

        Args:
            texts: the texts.
            batch_size: texts per forward pass (default: the encoder's).
            max_length: cut each text to this many tokens (default: the encoder's).
            instruction: when given, each text is a query: ``format_query(text, instruction)``.
            show_progress: show a rich progress bar.
            on_batch: called with the number of texts after each batch.
        """
        import torch

        texts = [format_query(str(t), instruction) for t in texts] if instruction else [str(t) for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        tokens = self.tokenizer(texts, truncation=True, max_length=self._cut(max_length), padding=False)
        check_texts_vocabulary(tokens["input_ids"], texts, self._vocabulary, self.tokenizer, model=self.name,
                               names=_TextNames(texts))
        order = length_order([len(ids) for ids in tokens["input_ids"]])
        size = int(batch_size or self.batch_size)
        keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if self._takes_token_types else [])
        keys = [k for k in keys if k in tokens]
        with _progress(show_progress, len(texts)) as advance, torch.inference_mode():
            for start in range(0, len(texts), size):
                idx = order[start:start + size]
                batch = self.tokenizer.pad({k: [tokens[k][i] for i in idx] for k in keys}, return_tensors="pt")
                batch = {k: v.to(self.loaded.device) for k, v in batch.items()}
                hidden = self.loaded.model(**batch).last_hidden_state
                pooled = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
                out[idx] = pooled.cpu().numpy()
                advance(len(idx))
                if on_batch is not None:
                    on_batch(len(idx))
        self._check_finite(out, texts)
        return out

    def _check_finite(self, embeddings: np.ndarray, texts: Sequence[str]) -> None:
        """Refuse embeddings (N, D) holding NaN or infinity: a diverged checkpoint's NaN embeddings scored a retrieval
        task 0.49 (exit 0) and were a traceback of scikit-learn's in classification."""
        bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
        if bad.size:
            spec = self.loaded.spec
            raise NonFiniteEmbeddingsError(
                f"Expected finite embeddings from {spec.path or spec.id}. Got NaN or infinite values for {bad.size} of "
                f"{len(texts)} texts (such as {texts[bad[0]][:40]!r}) instead: its weights hold such values (a training "
                f"step that diverged?) or its activations overflow in {self.loaded.dtype}. Use another model or "
                "checkpoint, or load it with --dtype float32.")


class _progress:
    """A rich progress bar over texts, or nothing."""

    def __init__(self, show: bool, total: int) -> None:
        self.show, self.total, self.bar = show, total, None

    def __enter__(self) -> Callable[[int], None]:
        if not self.show:
            return lambda n: None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task("embedding", total=self.total)
        return lambda n: self.bar.advance(task, n)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextmanager
def _no_loading_bar() -> Iterator[None]:
    """Without transformers' per-tensor "Loading weights" bar: the verbs that load an encoder say what loads in lines
    and bars of their own (eval's checkpoint bar, mining's "loading ..."), and its tqdm lines broke through them."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()
