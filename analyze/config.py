"""``AnalyzeConfig``: the settings of ``hrsa analyze``, equal to its flags and to its YAML file; and the vocabularies
of analysis settings (metric names, default neighbour counts, pooling, search), defined once here and imported by
the pair analysis and the local metrics.

Precedence: a flag given on the command line > the YAML file (``--config``) > the defaults here. Every
field is a flag of the same name (``cross_layer`` is ``--cross-layer``), whose help is the field's
description (:func:`hrsa.runtime.cli_options.config_options`). Validating a config loads no orchestration
(no Dask, Ray, FAISS or store reads). Example YAML::

    # hrsa analyze --config configs/analyze.yaml
    store: hrsa-out/store
    pair: [smollm2-135m, smollm2-135m-bidir]
    metrics: [cka, dimcorr, procrustes]
    cross_layer: true
    memory_budget: 4GB
    exclude_first: true
    # k-NN overlap and probes (metrics: [knn, probe]):
    k: [5, 10, 50]
    knn_sample: 50000
    label_field: label        # read from the corpus's source file, joined by record id
    pool: mean
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from hrsa.analyze.streaming.backends import BackendName, ComputeDtype
from hrsa.analyze.streaming.plan import parse_memory_budget
from hrsa.analyze.streaming.stream import Scheduler
from hrsa.runtime.settings import SETTING_NAMES, FolderPath, SettingNames, StoreUrl, flag_name, load_settings
from hrsa.store.errors import UserError
from hrsa.store.ids import parse_id
from hrsa.store.selection import parse_doc_ids, parse_int_list, parse_name_list

__all__ = [
    "DEFAULT_GROUPS",
    "DEFAULT_K",
    "LOCAL_METRICS",
    "METRICS",
    "MOMENT_METRICS",
    "AnalyzeConfig",
    "Metric",
    "Pool",
    "Search",
    "load_config",
]

Metric = Literal["dimcorr", "cka", "procrustes", "procrustes_distance", "cca", "svcca", "pwcca", "regression",
                 "effective_rank", "knn", "probe"]
METRICS: tuple[Metric, ...] = ("dimcorr", "cka", "procrustes")  # the paper's streaming metrics: the default
#: Every metric computed from the matched passes' Moments: the paper's, then the other measures on request.
MOMENT_METRICS: tuple[Metric, ...] = (*METRICS, "procrustes_distance", "cca", "svcca", "pwcca", "regression",
                                      "effective_rank")
LOCAL_METRICS: tuple[Metric, ...] = ("knn", "probe")  # local geometry and function, from their own reads
DEFAULT_K = (5, 10, 50)  # k-NN overlap's neighbour counts
#: Groups of documents for the jackknife intervals: t_9 quantiles (2.26) cost ~15% width against many groups,
#: while each group holds its own Moments (the planner halves the number where one pair would not fit).
DEFAULT_GROUPS = 10
Search = Literal["exact", "hnsw"]  # k-NN search: exact (FAISS flat, blocked) or approximate (HNSW)
Pool = Literal["mean", "last"]  # a probe's document feature: mean of its tokens, or its last token


class AnalyzeConfig(BaseModel):
    """Validated settings of one ``hrsa analyze`` run; each field's description is its flag's help."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: StoreUrl = Field(description="Store URL: a path or an fsspec URL such as s3://bucket/store.")
    pair: tuple[str, str] = Field(description="Model ids A and B (A's hidden states are the rows of matrices).")
    metrics: tuple[Metric, ...] = Field(METRICS, description=f"Comma-separated, among {','.join(get_args(Metric))}.")
    debiased: bool = Field(False, description="Also debiased CKA (unbiased HSIC) on the matched layers.")
    cross_layer: bool = Field(
        False, description="Also every hidden state of A against every one of B (CKA and dimcorr matrices).")
    memory_budget: str = Field(
        "4GB", description="Memory per worker, e.g. 4GB or 512MiB; sets the tiles. On Ray each analysis task holds "
        "its own accumulators in its own process and asks Ray for this much; on local threads it is the process's.")
    exclude_special: bool = Field(False, description="Drop special tokens (BOS, chat-template markers).")
    exclude_first: bool = Field(
        False, description="Drop position 0 of every document (attention sinks carry huge norms).")
    docs: tuple[int, ...] | None = Field(
        None, description="Keep only these documents, e.g. 0,3,5-9 (indices into the corpus's document table).")
    positions: tuple[int, int] | None = Field(
        None, description="Keep only positions A:B inside each document (A included, B not), e.g. 1:512.")
    fields: tuple[str, ...] | None = Field(
        None, description="Keep only the tokens of these source fields, e.g. reasoning (chat markup and template "
                          "text dropped): two models with different chat templates compare on the shared content.")
    save_rotation: bool = Field(False, description="Save Procrustes' rotation O* (D x D) of every matched layer.")
    groups: int = Field(
        DEFAULT_GROUPS, ge=0, description="Intervals: groups of whole documents for the jackknife (each holds its own "
                                          "accumulators in the matched passes); 0 turns intervals off.")
    # Defaults computed from the store: the description says what they are (no "[default]" can be generated).
    block_tokens: int | None = Field(
        None, gt=0, description="Tokens per block read and multiplied (at most 8192 with float32 products).  "
        "[default: ~32 MB of float64 per state]")
    workers: int | None = Field(
        None, gt=0, description="At most this many tasks at once: on Ray, tiles of layer pairs and token segments "
                                "spread over the cluster; on local threads each holds its own accumulators in the one "
                                "budget, so the plan may use fewer.  [default: the Ray cluster's CPUs; cores, up to 4]")
    scheduler: Scheduler = Field(
        "auto", description="Where the passes run: ray (Ray tasks over the cluster), threads (Dask, this process) or "
                            "sync; auto = Ray when connected (RAY_ADDRESS), else local threads.")
    backend: BackendName = Field(
        "auto", description="Where matrix products run; auto = CUDA when torch sees a GPU, else numpy.")
    compute_dtype: ComputeDtype = Field(
        "auto", description="dtype of the products of centred blocks (sums are float64); auto = float32 (within 1e-6 of "
        "float64), float64 with cca, svcca, pwcca or regression and for bf16/fp16 stores (float32 sums drift ~5e-6 "
        "there; kept float32, with a warning, on a local GPU whose float64 is slow).")
    out: FolderPath = Field(Path("hrsa-analysis"), description="Folder for results.json and figures.")
    run_id: str | None = Field(
        None, description="Name of the run in the store's results/.  [default: A--B--<UTC time>, -2, -3, ... added when taken]")
    store_results: bool = Field(True, description="Also write results into the store's results/ (opens it writable).")
    k: tuple[int, ...] = Field(DEFAULT_K, description="k-NN overlap: neighbour counts, comma-separated.")
    knn_sample: int | None = Field(
        50_000, gt=0, description="k-NN overlap: tokens in the seeded sample shared by both models (all when fewer).")
    knn_search: Search = Field(
        "exact", description="k-NN search: exact (blocked FAISS flat index) or hnsw (approximate; recall against "
                             "exact is reported).")
    seed: int = Field(0, description="Seed of the k-NN token sample and of the probes' train/dev/test split.")
    hidden_states: tuple[int, ...] | None = Field(
        None, description="k-NN and probes: only these hidden states, e.g. 0,6,12 (negative counts from the end: -1 "
                          "is the last).  [default: all shared]")
    label_field: str | None = Field(
        None, description="Probe: the record field holding each document's label (required with --metrics probe).")
    labels: str | None = Field(
        None, description="Probe: read labels from this .jsonl/.csv/.parquet instead of the corpus's source file.")
    id_field: str | None = Field(
        None, description="Probe: the id field of --labels (default: id, else FILE:LINE as extraction does).")
    pool: Pool = Field("mean", description="Probe: pool each document's tokens by mean or take the last.")
    probe_both_directions: bool = Field(False, description="Probe: also fit on B and test on A.")

    @field_validator("k", mode="before")
    @classmethod
    def _split_k(cls, value: Any) -> Any:
        return tuple(parse_int_list(value, ranges=False, what="neighbour counts")) if isinstance(value, str) else value

    @field_validator("hidden_states", mode="before")
    @classmethod
    def _split_hidden_states(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        # "-1" is the last hidden state, resolved against each model's (hidden_states.py), not a broken range A-B
        return tuple(parse_int_list(value, negative=True, what="hidden-state indices"))

    @field_validator("label_field", "labels", "id_field")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        # "" is no field nor file: read as "not given", it turned the probe's labels off without a word
        if value is not None and not value.strip():
            raise ValueError(f"expected a name, got {value!r}; leave the setting out instead")
        return value

    @field_validator("k")
    @classmethod
    def _check_k(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or min(value) < 1:
            raise ValueError(f"expected positive neighbour counts, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _probe_needs_labels(self, info: ValidationInfo) -> AnalyzeConfig:
        if "probe" in self.metrics and not self.label_field:
            name: SettingNames = (info.context or {}).get(SETTING_NAMES, flag_name)  # a pipeline's: its YAML key
            raise ValueError(f"the probe metric needs {name('label_field')} (the record field holding each "
                             "document's label)")
        return self

    @field_validator("metrics", mode="before")
    @classmethod
    def _split_metrics(cls, value: Any) -> Any:
        return tuple(parse_name_list(value, what="metrics", example="cka,knn")) if isinstance(value, str) else value

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _check_budget(cls, value: Any) -> Any:
        try:
            parse_memory_budget(value)
        except UserError as error:  # as a ValueError, so pydantic reports it with the other problems
            raise ValueError(str(error)) from None
        return str(value)

    @field_validator("fields", mode="before")
    @classmethod
    def _split_fields(cls, value: Any) -> Any:
        if isinstance(value, str):  # "" (an unset variable) is refused: it analysed every token, fields recorded null
            return tuple(parse_name_list(value, what="source fields", example="reasoning"))
        return value

    @field_validator("docs", mode="before")
    @classmethod
    def _parse_docs(cls, value: Any) -> Any:
        return tuple(parse_doc_ids(value)) if isinstance(value, str) else value

    @field_validator("positions", mode="before")
    @classmethod
    def _parse_positions(cls, value: Any) -> Any:
        if isinstance(value, str):
            start, _, stop = value.partition(":")
            try:
                value = (int(start) if start.strip() else 0, int(stop))
            except ValueError:
                raise ValueError(f"expected positions A:B such as 1:512, got {value!r}") from None
        if isinstance(value, (tuple, list)) and len(value) == 2 and not 0 <= value[0] < value[1]:
            raise ValueError(f"expected positions A:B with 0 <= A < B, got {value[0]}:{value[1]}")
        return value

    @field_validator("run_id")
    @classmethod
    def _check_run_id(cls, value: str | None) -> str | None:
        return parse_id(value, kind="run id") if value is not None else None  # InvalidIdError is a ValueError


def load_config(path: Path | None, flags: Mapping[str, Any]) -> AnalyzeConfig:
    """Merge the YAML file at ``path`` (if any) with the flags that were given (not None) and validate.

    Raises:
        UserError: an unreadable file, or every problem of the merged settings at once, in one line.
    """
    return load_settings(AnalyzeConfig, path, flags, verb="analyze")
