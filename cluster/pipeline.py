"""``hrsa run``'s pipeline: one YAML (or a :class:`PipelineConfig` built in Python) that names the corpora,
the training runs, the models, the pairs to compare, the training dynamics to follow, the evaluations (``hrsa
eval`` of a run's checkpoints or a model) and the report.

Example (see configs/examples/pipeline.yaml for every field)::

    store: hrsa-out/store            # a path, or s3://bucket/store on a cluster
    out: hrsa-out/pipeline           # results, report and pipeline-state.json (or s3://bucket/out)
    corpora:
      cot: {path: ../shared/data/cot/samples, template: "{reasoning}", max_tokens: 512}
    models:
      base: {model: Qwen/Qwen2.5-0.5B, attention: bidirectional}
      rl: {model: hkust-nlp/Qwen-2.5-0.5B-SimpleRL-Zoo, attention: bidirectional}
    pairs:
      - {a: base, b: rl, corpus: cot, metrics: [cka, dimcorr, procrustes, knn]}

Every section validates with pydantic (unknown keys are errors); names must be slugs, and every name a
section uses must exist in the section it refers to. :func:`load_pipeline` reports every problem in one
line (a :class:`PipelineError`, exit code 2 from the CLI).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hrsa.analyze.config import AnalyzeConfig
from hrsa.analyze.report.cli import VerdictRules
from hrsa.analyze.report.summary import Comparison
from hrsa.extract.config import CorpusOptions, ExtractRunOptions, ModelSourceOptions
from hrsa.runtime.locations import is_url
from hrsa.runtime.settings import (
    SETTING_NAMES,
    FolderLocation,
    Problems,
    SettingNames,
    StoreUrl,
    read_yaml_mapping,
    validation_problems,
)
from hrsa.store.errors import InvalidIdError, UserError
from hrsa.store.ids import parse_id, slugify

__all__ = [
    "CorpusEntry",
    "DynamicsEntry",
    "ModelEntry",
    "PairAnalysisSettings",
    "PairEntry",
    "PipelineConfig",
    "PipelineError",
    "ReportEntry",
    "analysis_keys",
    "eval_keys",
    "load_pipeline",
    "parse_pipeline",
    "train_keys",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")
# A section's names are slugs: ids in the store and folder names (InvalidIdError is a ValueError, so pydantic
# reports it with the other problems).
Name = Annotated[str, AfterValidator(lambda name: parse_id(name, kind="name"))]
_OWNED = ("store", "pair", "out", "run_id")  # analysis settings that the pipeline sets itself


class PipelineError(UserError, ValueError):
    """A pipeline that does not validate; the message lists every problem at once."""


class CorpusEntry(CorpusOptions):
    """A corpus: where its records are and which text of each goes through the models (the corpus options of
    ``hrsa extract``), and where probes find each document's label."""

    path: str = Field(description="A .jsonl/.csv/.parquet file, a folder of them, or hf:NAME[:SPLIT].")
    label_field: str | None = Field(None, description="Probes: the record field holding each document's label (the "
                                                      "default of every pair on this corpus).")
    labels: str | None = Field(None, description="Probes: a .jsonl/.csv/.parquet of labels instead of the corpus's file.")


class ModelEntry(ExtractRunOptions, ModelSourceOptions):
    """A model: weights to load (``model``), or the final checkpoint of a training run (``train``), with the
    options of ``hrsa extract`` that say how it runs (attention, dtype, layers, workers...)."""

    model: str | None = Field(None, description="A local folder, a .gguf file, packaged:<name>, or a hub id org/name[@rev].")
    train: str | None = Field(None, description="A run of the train section: its final checkpoint.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelEntry:
        if (self.model is None) == (self.train is None):
            raise ValueError(f"expected exactly one of model or train, got model={self.model!r}, train={self.train!r}")
        return self


class PairAnalysisSettings(AnalyzeConfig):
    """The analysis settings of one pipeline comparison: :class:`AnalyzeConfig`'s fields and checks, less those
    the pipeline sets itself (store, pair, out, run id)."""

    store: str = ""
    pair: tuple[str, str] = ("", "")  # type: ignore[assignment]

    @field_validator(*_OWNED, mode="before")
    @classmethod
    def _not_owned(cls, value: Any) -> Any:
        raise ValueError("set by the pipeline, not per pair; remove it")

    def analyze_config(self, *, store: str, pair: tuple[str, str], out: Path, run_id: str) -> AnalyzeConfig:
        """The full :class:`AnalyzeConfig` of one comparison."""
        values = self.model_dump(include=set(AnalyzeConfig.model_fields) - set(_OWNED))
        return AnalyzeConfig.model_validate({**values, "store": store, "pair": pair, "out": out, "run_id": run_id})


class PairEntry(PairAnalysisSettings):
    """Two models compared on one corpus, with every analysis setting of ``hrsa analyze``."""

    a: str = Field(description="A model of the models section (A's states are the rows of matrices).")
    b: str = Field(description="A model of the models section.")
    corpus: str = Field(description="A corpus of the corpora section: both models run over it.")
    name: str | None = Field(None, description="The pair's name: folder of its results (default A--B).")

    @property
    def label(self) -> str:
        return self.name or f"{self.a}--{self.b}"


class DynamicsEntry(PairAnalysisSettings):
    """The paper's Figure 5: two training runs from step 0 (their backbones) through every step both saved, run a
    at step s against run b at step s (or at the fixed step ``b_step``: how far a run moved from a starting point)."""

    a: str = Field(description="A run of the train section.")
    b: str = Field(description="A run of the train section (the same run as a, with b_step, follows its drift).")
    corpus: str = Field(description="The fixed probe corpus every checkpoint runs over.")
    name: str | None = Field(None, description="Name of this series (default A--B).")
    b_step: int | None = Field(None, ge=0, description="Compare each step of a with b at this one step (0: b's "
                                                       "backbone); default: b at the same step.")
    extract: ExtractRunOptions = Field(default_factory=ExtractRunOptions, description="How the checkpoints are extracted "
                                       "(attention auto: as the run trained).")

    @property
    def label(self) -> str:
        return self.name or f"{self.a}--{self.b}"


class ReportEntry(VerdictRules):
    """The HTML report over every pair and every dynamics series, with the verdicts' rules."""

    model_config = _FROZEN

    path: Path | None = Field(None, description="Where the report goes (default <out>/report.html).")
    title: str | None = Field(None, description="The report's title.")
    description: str | None = Field(None, description="A paragraph under the title: what the study asks and how to "
                                                      "read it.")

    @field_validator("path", mode="before")
    @classmethod
    def _local_path(cls, value: Any) -> Any:
        """A URL read as a local path: ``s3://b/r.html`` wrote ``./s3:/b/r.html`` on the driver, named like a URL."""
        if is_url(value):
            raise ValueError(f"expected a local file, got the URL {value}; leave report.path out to write the report "
                             "into out (a remote out keeps it there)")
        return value


class PipelineConfig(BaseModel):
    """A whole pipeline: train -> extract -> analyze -> dynamics -> eval -> report (see the module docstring)."""

    model_config = _FROZEN

    store: StoreUrl = Field(description="Store URL: a local path or an fsspec URL (s3://bucket/store) every node reaches.")
    out: FolderLocation = Field(description="Folder for results, dynamics, the report and pipeline-state.json: a path, "
                                "or a URL (s3://bucket/hrsa/out) that outlives the cluster.")
    address: str | None = Field(None, description="Ray address (default RAY_ADDRESS, else an embedded local Ray).")
    corpora: dict[Name, CorpusEntry] = Field(min_length=1, description="Corpora by name.")
    train: dict[Name, Any] = Field(default_factory=dict, description="Training runs by name: TrainConfig fields.")
    models: dict[Name, ModelEntry] = Field(default_factory=dict, description="Models by name (their ids in the store).")
    pairs: list[PairEntry] = Field(default_factory=list, description="Pairs to compare.")
    dynamics: list[DynamicsEntry] = Field(default_factory=list, description="Training dynamics to follow.")
    report: ReportEntry = Field(default_factory=ReportEntry, description="The report.")
    eval: dict[Name, Any] = Field(default_factory=dict, description="Evaluations by name: EvalConfig fields, with model "
                                  "naming a run of the train section (each checkpoint: a curve) or a model of the models "
                                  "section; results in <out>/eval/<name>/eval.json.")

    @field_validator("train")
    @classmethod
    def _train_configs(cls, value: dict[str, Any], info: Any) -> dict[str, Any]:
        configs, problems = {}, []
        for run, fields in value.items():
            try:
                configs[run] = _train_config(run, fields, info.data.get("out"))
            except Problems as error:
                problems += error.problems
        if problems:
            raise Problems(problems)
        return configs

    @field_validator("eval")
    @classmethod
    def _eval_configs(cls, value: dict[str, Any]) -> dict[str, Any]:
        configs, problems = {}, []
        for name, fields in value.items():
            try:
                configs[name] = _eval_config(name, fields)
            except Problems as error:
                problems += error.problems
        if problems:
            raise Problems(problems)
        return configs

    @model_validator(mode="before")
    @classmethod
    def _corpus_labels(cls, data: Any) -> Any:
        """A pair without a label field takes its corpus's (before the pairs' own checks need it)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("corpora"), Mapping):
            return data
        corpora, entries = data["corpora"], data.get("pairs")
        if not isinstance(entries, list):
            return data
        pairs = []
        for p in entries:
            corpus = corpora.get(p.get("corpus")) if isinstance(p, Mapping) else None
            if isinstance(corpus, Mapping) and p.get("label_field") is None:
                p = {**p, **{k: corpus[k] for k in ("label_field", "labels") if corpus.get(k) is not None and p.get(k) is None}}
            pairs.append(p)
        return {**data, "pairs": pairs}

    @model_validator(mode="after")
    def _cross_references(self) -> PipelineConfig:
        problems = _reference_problems(self.model_dump())
        if problems:
            raise Problems(problems)
        return self

    # -- what the runner derives -----------------------------------------------------------------
    @property
    def report_path(self) -> Path:
        return self.report.path or self.out / "report.html"

    def model_corpora(self, model: str) -> list[str]:
        """The corpora ``model`` runs over (those of its pairs), in order of first use."""
        used = [c for p in self.pairs for c, m in ((p.corpus, p.a), (p.corpus, p.b)) if m == model]
        return list(dict.fromkeys(used))

    def store_id(self, model: str, corpus: str) -> str:
        """The model's id in the store: its name, or ``<name>--<corpus>`` when it runs over several corpora."""
        return slugify(model if len(self.model_corpora(model)) <= 1 else f"{model}--{corpus}")

    def table_2_columns(self) -> list[Comparison]:
        """The side-by-side Table 2's columns: the pairs of the same two models (either way round, on any corpus) are
        one column, named after the first of them, its levels read from them in the pipeline's order (e.g. the
        backbones on CoT traces and with probes on a labelled corpus, then the embedding models the same way)."""
        groups: dict[frozenset[str], list[int]] = {}
        for i, p in enumerate(self.pairs):
            groups.setdefault(frozenset((p.a, p.b)), []).append(i)
        return [Comparison(f"{self.pairs[g[0]].a} vs {self.pairs[g[0]].b}", tuple(g)) for g in groups.values()]

    def checkpoint_id(self, run: str, step: int, corpus: str) -> str:
        """A dynamics checkpoint's id in the store: ``<run>-step-<N>`` (``--<corpus>`` with several corpora)."""
        corpora = list(dict.fromkeys(d.corpus for d in self.dynamics if run in (d.a, d.b)))
        return slugify(f"{run}-step-{step}" + (f"--{corpus}" if len(corpora) > 1 else ""))


def _reference_problems(data: Mapping[str, Any]) -> list[str]:
    """Names used but not defined (and names clashing), on a validated pipeline or on raw YAML alike, so a
    pipeline with other problems still gets these listed too."""
    def section(key: str) -> Mapping[str, Any]:
        value = data.get(key)
        return value if isinstance(value, Mapping) else {}

    corpora, models, runs = section("corpora"), section("models"), section("train")
    problems = [f"models.{name}.train: {m['train']!r} is not a run of the train section ({_known(runs)})"
                for name, m in models.items() if isinstance(m, Mapping) and m.get("train") is not None
                and m["train"] not in runs]
    lowered = [str(n).lower() for n in models]
    problems += [f"models: names {sorted(n for n in models if str(n).lower() == low)} are one id in the store; rename one"
                 for low in sorted({n for n in lowered if lowered.count(n) > 1})]
    for where, pool, kind in (("pairs", models, "models"), ("dynamics", runs, "train")):
        entries = [e for e in data.get(where) or [] if isinstance(e, Mapping)] if isinstance(data.get(where), list) else []
        for i, e in enumerate(entries):
            problems += [f"{where}.{i}.{side}: {e[side]!r} is not a name of the {kind} section ({_known(pool)})"
                         for side in ("a", "b") if side in e and e[side] not in pool]
            if "corpus" in e and e["corpus"] not in corpora:
                problems.append(f"{where}.{i}.corpus: {e['corpus']!r} is not a name of the corpora section ({_known(corpora)})")
        labels = [str(e.get("name") or f"{e.get('a')}--{e.get('b')}") for e in entries]
        problems += [f"{where}: two entries named {n!r}; give them distinct names (name: ...)"
                     for n in sorted({n for n in labels if labels.count(n) > 1})]
        problems += [f"{where}.{i}: {n!r} is not a valid name; set name: to letters, digits, '.', '_' and '-'"
                     for i, n in enumerate(labels) if not _is_slug(n)]
    problems += [f"eval.{name}.model: {e['model']!r} is not a run of the train section ({_known(runs)}) nor a model "
                 f"of the models section ({_known(models)})"
                 for name, e in section("eval").items() if isinstance(e, Mapping) and "model" in e
                 and e["model"] not in runs and e["model"] not in models]
    return problems


def _is_slug(name: str) -> bool:
    try:
        parse_id(name)
    except InvalidIdError:
        return False
    return True


def _known(names: Mapping[str, Any]) -> str:
    return ", ".join(names) or "none"


def _train_config(run: str, fields: Any, out: Path | str | None) -> Any:
    """A run's TrainConfig; its output defaults to <out>/train/<run> (on the same storage as a remote out)."""
    try:
        from hrsa.train.config import SETTING_NAMES, TrainConfig
    except ImportError as error:
        raise Problems([f"{run}: training is not available in this hrsa ({error})"]) from None
    if isinstance(fields, TrainConfig):
        return fields
    if not isinstance(fields, Mapping):
        raise Problems([f"{run}: expected a mapping of training settings, got {type(fields).__name__}"])
    values = dict(fields)
    if values.get("output") is None and out is not None:
        values["output"] = f"{str(out).rstrip('/')}/train/{run}" if is_url(out) else Path(out) / "train" / run
    try:
        return TrainConfig.model_validate(values, context={SETTING_NAMES: train_keys(run)})
    except ValidationError as error:
        raise Problems([_under_run(run, p) for p in validation_problems(error, flags=False)]) from None


_EVAL_OWNED = ("out", "resume")  # eval settings the pipeline sets: <out>/eval/<name>, and results reused by content


def _eval_config(name: str, fields: Any) -> Any:
    """An evaluation's EvalConfig, its model still the name of a train run or a model (the runner resolves it)."""
    from hrsa.train.evaluate import EvalConfig

    if isinstance(fields, EvalConfig):
        return fields
    if not isinstance(fields, Mapping):
        raise Problems([f"{name}: expected a mapping of eval settings, got {type(fields).__name__}"])
    owned = [f"{name}.{key}: set by the pipeline (results go to <out>/eval/{name}, earlier scores of the same "
             "checkpoints, tasks and settings are kept); leave it out" for key in _EVAL_OWNED if key in fields]
    try:
        config = EvalConfig.model_validate(dict(fields), context={SETTING_NAMES: eval_keys(name)})
    except ValidationError as error:
        raise Problems(owned + [_under_run(name, p) for p in validation_problems(error, flags=False)]) from None
    if owned:
        raise Problems(owned)
    return config


def eval_keys(name: str) -> SettingNames:
    """How messages about evaluation ``name`` name its settings: ``eval.<name>.tasks``, not `hrsa eval`'s ``--tasks``."""
    return lambda field: f"eval.{name}.{field}"


def train_keys(run: str) -> SettingNames:
    """How messages about training run ``run`` name its settings: by their keys in the pipeline's YAML
    (``train.<run>.batch_size``), not by `hrsa train`'s flags (``--batch-size``), which a pipeline has none of."""
    return lambda field: f"train.{run}.{field}"


def extraction_keys(corpus: str, section: str) -> SettingNames:
    """How messages about an extraction name its settings: a corpus option (``template``, ``docs``...) by its key under
    ``corpora.<corpus>``, any other by its key under ``section`` (``models.llama``, ``dynamics.0.extract``), not by
    `hrsa extract`'s flags (``--layers``), which a pipeline has none of."""
    return lambda field: f"corpora.{corpus}.{field}" if field in CorpusOptions.model_fields else f"{section}.{field}"


# A pair's probe settings it may take from its corpus: label_field and labels (PipelineConfig._corpus_labels), id_field
# (the runner reads labels from the corpus file with the corpus's id field).
_FROM_CORPUS = ("label_field", "labels", "id_field")


def analysis_keys(config: PipelineConfig, section: str, index: int) -> SettingNames:
    """How messages about the analysis of ``<section>.<index>`` (``pairs.0``, ``dynamics.1``) name its settings: by
    their keys in the pipeline's YAML (``pairs.0.hidden_states``), not by `hrsa analyze`'s flags, which a pipeline has
    none of. A probe setting with its corpus's value is named there first, as the key the user most likely wrote:
    ``corpora.words.label_field (or pairs.0.label_field)``."""
    entry = getattr(config, section)[index]
    corpus = config.corpora[entry.corpus]

    def name(field: str) -> str:
        own = f"{section}.{index}.{field}"
        taken = getattr(corpus, field, None) if field in _FROM_CORPUS else None
        if taken is not None and getattr(entry, field) in (None, taken):
            return f"corpora.{entry.corpus}.{field} (or {own})"
        return own

    return name


def _under_run(run: str, problem: str) -> str:
    """A TrainConfig problem under its run: ``<run>.batch_size: ...``; one about the whole run, which
    :func:`validation_problems` places at "config", is ``<run>: ...`` (the YAML has no key config)."""
    return f"{run}: {problem.removeprefix('config: ')}" if problem.startswith("config: ") else f"{run}.{problem}"


def parse_pipeline(values: Mapping[str, Any]) -> PipelineConfig:
    """Validate a pipeline given as a mapping (e.g. parsed YAML).

    Raises:
        PipelineError: every problem at once, in one line.
    """
    try:  # a pair's messages name its keys (label_field), under their place in the file (pairs.0)
        return PipelineConfig.model_validate(dict(values), context={SETTING_NAMES: lambda field: field})
    except ValidationError as error:
        problems = validation_problems(error, flags=False)
        problems += [p for p in _reference_problems(values) if p not in problems]  # when the fields failed first
        raise PipelineError(f"Expected a valid pipeline. Got {len(problems)} problem(s) instead: {'; '.join(problems)}. "
                            "Fix them in the pipeline file (configs/examples/pipeline.yaml shows every field).") from None


def load_pipeline(path: str | Path, *, out: str | None = None) -> PipelineConfig:
    """Read and validate the pipeline YAML at ``path``.

    Args:
        path: the pipeline file.
        out: replaces the file's ``out`` (before validation, so the training runs' default outputs follow it).

    Raises:
        PipelineError: an unreadable file, not a mapping, or every problem of its contents at once.
    """
    loaded = read_yaml_mapping(path, error=PipelineError, what="pipeline sections (store, out, corpora, models, pairs...)")
    return parse_pipeline({**loaded, "out": out} if out is not None else loaded)
