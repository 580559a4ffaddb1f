"""``ExtractConfig``: the settings of ``hrsa extract``, equal to its flags and to its YAML file.

Precedence: a flag given on the command line > the YAML file (``--config``) > the defaults here. Every
field is a flag of the same name (``token_budget`` is ``--token-budget``). Example YAML::

    # hrsa extract --config configs/examples/extract.yaml
    store: hrsa-out/store
    model: packaged:smollm2-135m-instruct
    corpus: ../shared/data/cot/samples
    template: "{chat:messages}{reasoning}"
    attention: bidirectional
    layers: 0,10,20-30            # or a list [0, 10, 20]

Three groups of fields are shared with the pipeline (:mod:`hrsa.cluster.pipeline`), which extracts the same
way: :class:`CorpusOptions` (which text of each record goes through the model), :class:`ExtractRunOptions` (how
a model runs over a corpus) and :class:`ModelSourceOptions` (which weights of a repository or folder load, and
whether its code may run). They are declared here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from hrsa.extract.model_spec import AttentionMode, DTypeName, ModelSpec
from hrsa.runtime.settings import StoreUrl, load_settings, parse_settings
from hrsa.store.errors import UserError
from hrsa.store.ids import parse_id, slugify
from hrsa.store.selection import parse_int_list

__all__ = ["CorpusOptions", "ExtractConfig", "ExtractConfigError", "ExtractRunOptions", "ModelSourceOptions",
           "load_extract_config", "parse_extract_config"]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ExtractConfigError(UserError, ValueError):
    """Extraction settings that do not validate; the message lists every problem at once."""


class ExtractRunOptions(BaseModel):
    """How a model runs over a corpus: the extraction settings that name neither the model nor the corpus."""

    model_config = _FROZEN

    attention: AttentionMode = Field("auto", description="auto: the architecture's own.")
    dtype: DTypeName = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    layers: list[int] | None = Field(None, description="Hidden states to store, e.g. 0,12,24-28 (default all L+1).")
    workers: int | None = Field(None, ge=1, description="Extraction workers: default one per GPU, or 1 on CPU.")
    token_budget: int = Field(8192, ge=1, description="Padded tokens per forward pass.")
    shard_tokens: int | None = Field(None, ge=1, description="Tokens per work unit (default: ~32 MiB shards).")

    @field_validator("layers", mode="before")
    @classmethod
    def _parse_layers(cls, value: Any) -> Any:
        """``"0,12,24-28"`` (a flag, or YAML text) -> a list; the same syntax as document lists. Blank is refused
        (an unset variable stored every hidden state): leave the flag out for all."""
        if not isinstance(value, str):
            return value
        negative = [p.strip() for p in value.split(",") if p.strip().startswith("-")]
        if negative:  # "-1" would read as a broken range A-B: say what is wrong with it instead
            raise ValueError(f"Expected hidden-state indices >= 0 such as 0,12,24-28. Got {negative[0]!r} instead. "
                             "Count from 0: negative indices do not count from the end here")
        return parse_int_list(value, what="hidden-state indices")  # a ValueError: gathered

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 0 or len(set(value)) != len(value)):
            raise ValueError(f"expected distinct hidden-state indices >= 0 such as 0,12,24-28, got {value}")
        return value


class ModelSourceOptions(BaseModel):
    """Which weights of a hub repository or folder load, and whether code shipped with them may run."""

    model_config = _FROZEN

    revision: str | None = Field(None, description="Hub revision.")
    gguf_file: str | None = Field(None, description="A .gguf file inside the folder or hub repository.")
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model.")


class CorpusOptions(BaseModel):
    """Which records of a corpus are read and which text of each goes through the model."""

    model_config = _FROZEN

    text: str | None = Field(None, description="The field holding each record's text (default 'text').")
    template: str | None = Field(None, description="A format string over fields; {chat:FIELD} applies the chat template.")
    id_field: str | None = Field(None, description="The field holding each record's id.")
    max_docs: int | None = Field(None, ge=1, description="Use the first N documents.")
    max_tokens: int | None = Field(None, ge=1, description="Cut documents to N tokens.")

    @field_validator("template")
    @classmethod
    def _text_or_template(cls, value: str | None, info: ValidationInfo) -> str | None:
        text = info.data.get("text")  # validated before: fields are checked in order, errors gathered
        if value is not None and text is not None:
            raise ValueError(f"expected text or template, not both; got text={text!r} and template={value!r}")
        if value is not None:
            import string

            try:  # checked here, before a store or folder is made: a corpus reader would fail on it later
                list(string.Formatter().parse(value))
            except ValueError as error:
                raise ValueError(f"expected a format string such as '{{question}} {{answer}}'; got {value!r} "
                                 f"({error}); double a brace to keep it literal ({{{{ or }}}})") from None
        return value


class ExtractConfig(ExtractRunOptions, ModelSourceOptions, CorpusOptions):
    """Everything ``hrsa extract`` takes; each field is also a CLI flag."""

    store: StoreUrl = Field(description="Store URL: a local path or an fsspec URL (s3://bucket/store).")
    model: str = Field(description="A local folder, a .gguf file, packaged:<name>, or a hub id org/name[@revision].")
    corpus: str = Field(description="A .jsonl/.csv/.parquet file, a folder of them, hf:NAME[:SPLIT], or a stored corpus id.")
    name: str | None = Field(None, description="Model id in the store (default: derived from --model).")
    address: str | None = Field(None, description="Ray address (default RAY_ADDRESS, else an embedded local Ray).")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        # InvalidIdError is a ValueError: pydantic reports it with the other problems
        return parse_id(value, kind="model id (--name)") if value is not None else None

    def model_id(self) -> str:
        """The model's id in the store: ``name``, else derived from ``model`` (``packaged:x``, ``org/x``, ``x.gguf`` -> x).

        Raises:
            InvalidIdError: no valid id can be derived (then ``--name`` gives one).
        """
        if self.name:
            return self.name
        derived = slugify(self.model.removeprefix("packaged:").rstrip("/").split("/")[-1].removesuffix(".gguf"))
        return parse_id(derived, kind="model id (derived from --model; give one with --name)")

    def model_spec(self) -> ModelSpec:
        """The model these settings load (source, revision, GGUF file, dtype, attention, remote code).

        Raises:
            ModelSpecError: ``model`` names nothing usable.
        """
        from hrsa.extract.model_spec import parse_model_spec

        return parse_model_spec(self.model, revision=self.revision, gguf_file=self.gguf_file, dtype=self.dtype,
                                attention=self.attention, trust_remote_code=self.trust_remote_code)


def parse_extract_config(values: Mapping[str, Any]) -> ExtractConfig:
    """Validate extraction settings (a mapping from Python or the pipeline) at the boundary.

    Raises:
        ExtractConfigError: every problem at once, in one line.
    """
    return parse_settings(ExtractConfig, values, verb="extract", error=ExtractConfigError)


def load_extract_config(path: Path | None, flags: Mapping[str, Any]) -> ExtractConfig:
    """Merge the YAML file at ``path`` (if any) with the flags that were given (not None) and validate.

    Raises:
        ExtractConfigError: an unreadable file, or every problem of the merged settings at once, in one line.
    """
    return load_settings(ExtractConfig, path, flags, verb="extract", error=ExtractConfigError)
