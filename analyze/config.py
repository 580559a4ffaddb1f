"""``AnalyzeConfig``: the settings of ``hrsa analyze``, equal to its flags and to its YAML file.

Precedence: a flag given on the command line > the YAML file (``--config``) > the defaults here. Every
field is a flag of the same name (``cross_layer`` is ``--cross-layer``). Example YAML::

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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hrsa.analyze.local.knn import DEFAULT_K, KnnOptions
from hrsa.analyze.local.probe import ProbeOptions

from hrsa.analyze.pair import METRICS, TokenSelection
from hrsa.analyze.streaming.plan import parse_memory_budget
from hrsa.store.errors import UserError
from hrsa.store.ids import parse_id
from hrsa.store.selection import parse_doc_ids
from hrsa.runtime.settings import load_settings

__all__ = ["AnalyzeConfig", "load_config"]

Metric = Literal["dimcorr", "cka", "procrustes", "knn", "probe"]


class AnalyzeConfig(BaseModel):
    """Validated settings of one ``hrsa analyze`` run (see the flags' help for each field)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str
    pair: tuple[str, str]
    metrics: tuple[Metric, ...] = METRICS  # type: ignore[assignment]
    debiased: bool = False
    cross_layer: bool = False
    memory_budget: str = "4GB"
    exclude_special: bool = False
    exclude_first: bool = False
    docs: tuple[int, ...] | None = None
    positions: tuple[int, int] | None = None
    save_rotation: bool = False
    block_tokens: int | None = Field(default=None, gt=0)
    workers: int | None = Field(default=None, gt=0)
    scheduler: Literal["auto", "threads", "sync", "ray"] = "auto"
    backend: Literal["auto", "numpy", "torch", "cuda"] = "auto"
    compute_dtype: Literal["auto", "float32", "float64"] = "auto"
    out: Path = Path("hrsa-analysis")
    run_id: str | None = None
    store_results: bool = True
    k: tuple[int, ...] = DEFAULT_K
    knn_sample: int | None = Field(default=50_000, gt=0)
    knn_search: Literal["exact", "hnsw"] = "exact"
    seed: int = 0
    hidden_states: tuple[int, ...] | None = None
    label_field: str | None = None
    labels: str | None = None
    id_field: str | None = None
    pool: Literal["mean", "last"] = "mean"
    probe_both_directions: bool = False

    @field_validator("k", "hidden_states", mode="before")
    @classmethod
    def _split_ints(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return tuple(int(v) for v in value.split(",") if v.strip())
            except ValueError:
                raise ValueError(f"expected comma-separated integers such as 5,10,50, got {value!r}") from None
        return value

    @field_validator("k")
    @classmethod
    def _check_k(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or min(value) < 1:
            raise ValueError(f"expected positive neighbour counts, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _probe_needs_labels(self) -> AnalyzeConfig:
        if "probe" in self.metrics and not self.label_field:
            raise ValueError("the probe metric needs --label-field (the record field holding each document's label)")
        return self

    @field_validator("metrics", mode="before")
    @classmethod
    def _split_metrics(cls, value: Any) -> Any:
        return tuple(m.strip() for m in value.split(",") if m.strip()) if isinstance(value, str) else value

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _check_budget(cls, value: Any) -> Any:
        try:
            parse_memory_budget(value)
        except UserError as error:  # as a ValueError, so pydantic reports it with the other problems
            raise ValueError(str(error)) from None
        return str(value)

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

    def selection(self) -> TokenSelection:
        return TokenSelection(exclude_special=self.exclude_special, exclude_first=self.exclude_first,
                              positions=self.positions, docs=self.docs)

    def api_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`hrsa.analyze.analyze_pair`."""
        return {
            "metrics": self.metrics, "debiased": self.debiased, "cross_layer": self.cross_layer,
            "selection": self.selection(), "memory_budget": self.memory_budget, "block_tokens": self.block_tokens,
            "workers": self.workers, "scheduler": self.scheduler, "backend": self.backend,
            "compute_dtype": self.compute_dtype, "save_rotation": self.save_rotation,
            "knn_options": KnnOptions(ks=self.k, n_sample=self.knn_sample, seed=self.seed, search=self.knn_search,
                                      hidden_states=self.hidden_states),
            "probe_options": ProbeOptions(label_field=self.label_field, labels_file=self.labels, id_field=self.id_field,
                                          pool=self.pool, both_directions=self.probe_both_directions, seed=self.seed,
                                          hidden_states=self.hidden_states) if self.label_field else None,
        }


def load_config(path: Path | None, flags: Mapping[str, Any]) -> AnalyzeConfig:
    """Merge the YAML file at ``path`` (if any) with the flags that were given (not None) and validate.

    Raises:
        UserError: an unreadable file, or every problem of the merged settings at once, in one line.
    """
    return load_settings(AnalyzeConfig, path, flags, verb="analyze")
