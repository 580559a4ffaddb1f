"""``run_pipeline``: train -> extract -> analyze -> dynamics -> eval -> report, each stage skipped when its
outputs exist and match its inputs.

Each stage calls its verb's one job function (``run_training``, ``run_extraction``, ``run_analysis``,
``write_dynamics``, ``write_report``): a stage here adds only its key, its record and its line. A stage's key
hashes its resolved inputs (:mod:`hrsa.cluster.stage_keys`); ``<out>/pipeline-state.json``
(:mod:`hrsa.cluster.state`) records each stage's key and status. A stage runs when it has no record, its
key changed, it never finished, or its outputs are gone; otherwise it is skipped. Extraction and training
resume by themselves, so a stage that stopped half way continues where it stopped. Each training recipe gets
its own run folder, ``<output>/recipe-<key>``, so a changed training input trains anew (see ``train``).

Model ids in the store are the pipeline's model names (``<name>--<corpus>`` for a model run over several
corpora); the checkpoints of a dynamics series are ``<run>-step-<N>``, and its step 0 is the run's backbone. The
same weights over the same corpus with the same settings are extracted once, whatever they are called (a
series' step 0 is often a pair's backbone, its last step a pair's trained model). A stored model this pipeline
did not write is never touched: the run stops and names the fix.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from hrsa.cluster.progress import stage_progress
from hrsa.cluster.remote_out import PublishedOut
from hrsa.cluster.stage_keys import (
    ANALYZE_SCHEDULING, AUTO_FEW_LEVEL_PRODUCTS, EXTRACT_SCHEDULING, corpus_fingerprint, source_fingerprint, stage_key,
)
from hrsa.cluster.state import STATE_FILE, PipelineState
from hrsa.extract.config import CorpusOptions, ExtractConfig, ExtractRunOptions, ModelSourceOptions, parse_extract_config
from hrsa.extract.job import stored_differences
from hrsa.extract.worker_pool import ExtractionWorkers
from hrsa.runtime.fingerprint import file_digest
from hrsa.runtime.folder_lock import FolderLock
from hrsa.runtime.locations import is_url, parse_location
from hrsa.runtime.progress import gathered_warnings
from hrsa.runtime.settings import SettingNames, renamed_flags
from hrsa.store.errors import HrsaError, UserError

if TYPE_CHECKING:
    from hrsa.analyze.config import AnalyzeConfig
    from hrsa.analyze.job import AnalysisRun
    from hrsa.cluster.pipeline import DynamicsEntry, PairAnalysisSettings, PipelineConfig
    from hrsa.train.config import TrainConfig
    from hrsa.train.evaluate import EvalConfig

__all__ = ["PipelineResult", "StageOutcome", "run_pipeline"]

# In out, held by the `hrsa run` writing there: flock on a local or shared out, a lease on an S3 one.
PIPELINE_LOCK = FolderLock(".hrsa_run.lock", "`hrsa run`", "give this pipeline another out")

# The settings of an extraction a pipeline gives (the rest, store, model, corpus and name, it sets itself).
_EXTRACT_SETTINGS = frozenset({*ExtractRunOptions.model_fields, *ModelSourceOptions.model_fields, *CorpusOptions.model_fields})


@dataclass(frozen=True)
class StageOutcome:
    """One stage of a run: ``name`` such as ``extract:base``, whether it ran, and why (or why not)."""

    name: str
    ran: bool
    reason: str


@dataclass(frozen=True)
class PipelineResult:
    """What a pipeline run produced.

    Attributes:
        out: the pipeline's output folder, or its URL (a remote out; the paths below are then the local copies of
            what was uploaded there); store: the store URL.
        report: the report file, or None when there was nothing to report.
        results: results.json of each pair, by pair name.
        dynamics: the dynamics file of each series, by series name.
        models: store id of each extraction, by stage name (``extract:<id>``).
        stages: every stage in the order it was considered.
        evals: eval.json of each evaluation, by its name.
    """

    out: Path | str
    store: str
    report: Path | None
    results: Mapping[str, Path]
    dynamics: Mapping[str, Path]
    models: Mapping[str, str]
    stages: tuple[StageOutcome, ...]
    evals: Mapping[str, Path] = field(default_factory=dict)

    @property
    def ran(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages if s.ran)

    @property
    def skipped(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages if not s.ran)


@dataclass(frozen=True)
class _Trained:
    checkpoints: tuple[str, ...]  # absolute paths, or URLs of a run on remote storage
    steps: tuple[int, ...]
    key: str
    output: str  # the run's folder (its recipe's), a path or a URL


@dataclass(frozen=True)
class _Extracted:
    store_id: str
    key: str


@dataclass(frozen=True)
class _Analyzed:
    results: Path
    key: str


def run_pipeline(config: PipelineConfig, *, console: Console | None = None,
                 local_copy: Path | None = None) -> PipelineResult:
    """Run (or resume) a pipeline; each stage prints a line saying whether it runs and why.

    Args:
        config: a validated pipeline (:func:`hrsa.cluster.pipeline.load_pipeline`, or built in Python). Its ``out``
            may be a URL (``s3://...``): the stages then write a local copy that is uploaded after each stage
            (:mod:`hrsa.cluster.remote_out`), so the outputs outlive the cluster and a re-run anywhere resumes.
        console: where lines and progress bars go (default: a new rich Console on stdout).
        local_copy: where a remote ``out``'s local copy is written (default: a new temporary folder, which the
            result's paths point into: the caller removes it).

    Raises:
        UserError: a model, corpus or setting that cannot work (one line that names the fix).
    """
    if not is_url(config.store):  # Ray's workers read it where they run, not in this process's folder
        config = config.model_copy(update={"store": str(Path(config.store).expanduser().resolve())})
    out = config.out
    _check_inputs_exist(config)  # before anything is created: a missing path is not found after an hour's extraction
    # Two runs into one out would each resume the same stages and write the state file over the other's.
    where = parse_location(str(out))
    made = [] if is_url(out) else _missing_folders(Path(out))
    with PIPELINE_LOCK.exclusive(where) as lost:

        def still_held() -> None:  # a lease taken over by another run: nothing more is uploaded, the run stops
            if lost.is_set():
                raise PIPELINE_LOCK.lost(where)

        try:
            # A remote out (s3://...): the stages write a local copy of it, uploaded as each stage records itself.
            published = (PublishedOut.open(str(out), state_file=STATE_FILE, local=local_copy,
                                           skip=(PIPELINE_LOCK.lock_file,), check=still_held,
                                           skip_under=_written_remotely(config)) if is_url(out) else None)
            if published is None:
                return _run_stages(config, console or Console(), None, out)
            config = config.model_copy(update={"out": published.local})
            with published.naming_urls():  # not the local copy: a temporary folder, gone once the run ends
                return _run_stages(config, console or Console(), published, out)
        except BaseException:
            # Only while the lock is held: a run refused by another's lock must not remove that run's lock file.
            _remove_if_unused(made)
            raise


def _written_remotely(config: PipelineConfig) -> tuple[str, ...]:
    """The folders under a remote ``out`` (relative to it) that stages write straight to the remote side, never
    through its local copy: the training runs (``<out>/train/<run>`` by default) and a store kept under the out."""
    root = parse_location(str(config.out)).url.rstrip("/") + "/"
    found = []
    for url in (*(str(tc.output) for tc in config.train.values()), config.store):
        if is_url(url) and (u := parse_location(url).url.rstrip("/") + "/").startswith(root) and u != root:
            found.append(u.removeprefix(root).rstrip("/"))
    return tuple(found)


def _missing_folders(out: Path) -> list[Path]:
    """The folders from ``out`` up that do not exist yet (deepest first): those this run creates. Resolved as its lock
    is (symlinks followed, ``..`` taken away): spelt ``new/../kept/out``, ``new/../kept`` did not exist while ``new``
    did not, and once the run had made ``new``, removing it removed ``kept``, a folder the user had made."""
    out = out.expanduser().resolve()
    return [folder for folder in (out, *out.parents) if not folder.exists()]


def _remove_if_unused(made: list[Path]) -> None:
    """Remove the folders this run created (``made``, deepest first) when it failed before any stage recorded itself:
    a refusal (a training the cluster cannot place) leaves nothing. Only empty folders go, after the lock file this
    run put there; a folder anything else was written into stays, and so do the ones above it."""
    if not made or (made[0] / STATE_FILE).exists():
        return
    (made[0] / PIPELINE_LOCK.lock_file).unlink(missing_ok=True)
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            return


def _run_stages(config: PipelineConfig, console: Console, published: PublishedOut | None, out: Any) -> PipelineResult:
    from hrsa.cluster.pipeline import analysis_keys

    runner = _Runner(config, console, published=published)
    # Step 1: training runs; Step 2: every model over each corpus of its pairs, and the dynamics checkpoints.
    trained = {run: runner.train(run, tc) for run, tc in config.train.items()}
    # The extractions share their workers (started once, each loading its model): they end before the analyses.
    with ExtractionWorkers() as runner.extraction_workers:
        models = {(m, c): runner.extract_model(m, c, trained) for m in config.models for c in config.model_corpora(m)}
        unused = [m for m in config.models if not config.model_corpora(m)]
        if unused:
            runner.console.print(f"[dim]models in no pair (not extracted): {escape(', '.join(unused))}[/]", emoji=False)
        series = {d.label: runner.extract_checkpoints(d, trained) for d in config.dynamics}
    runner.extraction_workers = None
    # Step 3: pairs; Step 4: dynamics series; Step 5: the report.
    results = {p.label: runner.analyze(f"analyze:{p.label}", p, models[p.a, p.corpus], models[p.b, p.corpus],
                                       config.out / "pairs" / p.label, analysis_keys(config, "pairs", i))
               for i, p in enumerate(config.pairs)}
    dynamics = {d.label: runner.dynamics(d, series[d.label], analysis_keys(config, "dynamics", i))
                for i, d in enumerate(config.dynamics)}
    left = _left_behind(config)
    if left:  # kept, as every output is; but a folder-wide `hrsa report <out>/pairs` would show them as current
        runner.console.print(f"[dim]results no longer in this pipeline (left as they are, not reported): "
                             f"{escape(', '.join(left))}[/]", emoji=False)
    # Step 5: evaluations (MTEB and local tasks); Step 6: the report.
    evals = {name: runner.evaluate(name, ec, trained) for name, ec in config.eval.items()}
    report = runner.report(results, dynamics, evals)
    return PipelineResult(out, config.store, report, {k: v.results for k, v in results.items()},
                          {k: v.results for k, v in dynamics.items()}, dict(runner.store_ids), tuple(runner.outcomes),
                          {k: v.results for k, v in evals.items()})


def _left_behind(config: PipelineConfig) -> list[str]:
    """The folders under ``<out>/pairs`` and ``<out>/dynamics`` that no pair or series of the pipeline names now (one
    renamed or removed from the YAML), relative to the out."""
    found = []
    for section, labels in (("pairs", {p.label for p in config.pairs}), ("dynamics", {d.label for d in config.dynamics})):
        folder = config.out / section
        if folder.is_dir():
            found += [f"{section}/{c.name}" for c in sorted(folder.iterdir()) if c.is_dir() and c.name not in labels]
    return found


def _task_fingerprint(spec_text: str) -> Any:
    """A task of an evaluation as its key holds it: a local task by its kind, fields and file content, an MTEB task
    by its name (its dataset revision is in mteb's version, which eval's settings hold)."""
    from hrsa.train.eval_tasks import parse_task_spec

    spec = parse_task_spec(spec_text)
    if spec.path is None:
        return {"mteb": spec.name}
    return {"kind": spec.kind, "fields": [spec.text_field, spec.label_field], "content": file_digest(spec.path)}


def _evaluated_model(entry: Any) -> tuple[str, list[Any]]:
    """A models-section entry as `hrsa eval` takes it (it has no revision or gguf_file setting: ``org/name@rev``, the
    folder's .gguf file), and what its scores are a function of: its files, its revision, and for a hub model the
    cached snapshot that revision resolves to (``org/name`` names other weights once the hub moves on; keyed by its
    text, the old weights' scores stood for the new ones')."""
    from hrsa.extract.identity import model_digest
    from hrsa.extract.model_spec import parse_model_spec

    spec = parse_model_spec(str(entry.model), revision=entry.revision, gguf_file=entry.gguf_file)
    model = str(entry.model)
    if spec.kind in ("local", "gguf") and entry.gguf_file:
        model = str(spec.path)  # the folder's .gguf file, as parse_model_spec found it
    elif spec.kind == "hub":
        if spec.gguf_file:
            raise UserError(f"Expected a model `hrsa eval` can load. Got the hub repository {entry.model} with gguf_file "
                            f"{entry.gguf_file} instead, which it cannot name. Download the .gguf file and name it as model.")
        model = f"{spec.id}@{spec.revision}" if spec.revision else str(spec.id)
    fingerprint = [source_fingerprint(str(entry.model)), entry.revision, entry.gguf_file]
    return model, fingerprint + ([{"snapshot": model_digest(model)}] if spec.kind == "hub" else [])


def _check_inputs_exist(config: PipelineConfig) -> None:
    """Refuse a corpus or model path of the pipeline's pairs that names nothing (one line, nothing created)."""
    from hrsa.extract.model_spec import parse_model_spec

    used = {c for m in config.models for c in config.model_corpora(m)} | {d.corpus for d in config.dynamics}
    for name in sorted(used):
        path = config.corpora[name].path
        if not (is_url(path) or path.startswith("hf:") or Path(path).expanduser().exists()):
            raise UserError(f"Expected a corpus file or folder at {path} (corpora.{name}.path). Got nothing there "
                            "instead. Check the path.")
    evaluated = {ec.model for ec in config.eval.values()}
    for name, entry in config.models.items():
        if entry.model is not None and (config.model_corpora(name) or name in evaluated):
            parse_model_spec(str(entry.model), revision=entry.revision, gguf_file=entry.gguf_file)  # raises, one line
    _check_eval_tasks(config)
    for run, tc in config.train.items():  # a missing or empty data file was found after the stage had started
        from hrsa.cluster.pipeline import train_keys
        from hrsa.train.data import load_training_records

        try:
            parse_model_spec(str(tc.backbone), dtype=tc.dtype, attention=tc.attention)
            load_training_records(Path(tc.data).expanduser(), negatives=tc.negatives, batch_size=tc.batch_size,
                                  names=train_keys(run))
        except UserError as error:  # the trainer's own words, under the run they are about
            raise UserError(f"train.{run}: {error}") from None


def _check_eval_tasks(config: PipelineConfig) -> None:
    """Refuse an evaluation's task file that is not there, an unknown MTEB name, or MTEB tasks whose data can be had
    neither from the hub nor from the local datasets cache, before hours of training and extraction rather than after."""
    from hrsa.train.eval_tasks import build_tasks, check_cached_mteb_data, hub_unreachable, mteb_tasks, parse_task_spec

    named: dict[str, list[Any]] = {}  # each evaluation's MTEB tasks
    for name, ec in config.eval.items():
        try:
            specs = [parse_task_spec(t) for t in ec.tasks]
            named[name] = [task for spec in specs if spec.kind == "mteb" for task in mteb_tasks(spec)]  # unknown names
            # Local task files read and checked as the stage reads them (JSON, fields, labels of one kind): a file
            # that exists but does not read was refused at the eval stage, after the training and the extractions
            build_tasks([s for s in specs if s.kind != "mteb"], instruction=ec.instruction, limit=ec.limit,
                        seed=ec.seed)
        except UserError as error:
            raise UserError(f"eval.{name}.tasks: {error}") from None
    why = hub_unreachable() if any(named.values()) else None
    if why is None:
        return
    for name, tasks in named.items():
        try:
            check_cached_mteb_data(tasks, why)  # the cache at mteb's revisions stands in for the hub (offline nodes)
        except UserError as error:
            raise UserError(f"eval.{name}.tasks: {error}") from None


def check_checkpoint_schedule(run: str, tc: TrainConfig, *, finished: bool) -> None:
    """Refuse a run whose checkpoints are not the ones its save_every asks for, before it trains (the steps up to its
    latest checkpoint) and after (every step): the recipe's folder is kept across save_every, so a finished run asked
    for denser checkpoints resumed at its last step, trained nothing, and the dynamics went on with the old steps
    without a word. A checkpoint before the latest that is damaged or cut short is never recomputed (training resumes
    from the latest): refused too, saying so.

    Raises:
        UserError: a step of the schedule (every save_every steps, and the last) without a checkpoint.
    """
    from hrsa.train.checkpoints import list_checkpoints, step_folder_name, step_folders

    steps = {c.step for c in list_checkpoints(tc.output)}
    if not steps:
        return
    wanted = {s for s in {*range(tc.save_every, tc.max_steps + 1, tc.save_every), tc.max_steps}
              if finished or s <= max(steps)}
    if not wanted - steps:
        return
    fix = f"Delete {tc.output} to train it again (the same seed gives the same weights)"
    present = {posixpath.basename(f.rstrip("/")) for f in step_folders(tc.output)}
    damaged = [step_folder_name(s) for s in sorted(wanted - steps) if step_folder_name(s) in present]
    if damaged:
        raise UserError(f"Expected the checkpoints of training run {run} to be whole. Got {', '.join(damaged)} damaged "
                        f"or cut short instead, before step {max(steps)}, which training resumes from (so it is never "
                        f"saved again). {fix}.")
    raise UserError(f"Expected training run {run} to hold a checkpoint every {tc.save_every} steps. Got steps "
                    f"{sorted(steps)} (saved under another save_every) instead, missing {sorted(wanted - steps)}. "
                    f"{fix} with this schedule, or set save_every back.")


def _readable_results(path: Path, run_id: str) -> bool:
    """Whether the stage's results.json is there, reads as one and is this stage's run (``run_id``): a truncated or
    edited one kept its stage up to date, and the report failed on it at every re-run; another analysis's, written
    into the pair's folder by `hrsa analyze --out`, was reported as the pair's."""
    from hrsa.analyze.results import read_results

    try:
        _, doc = read_results(path)
    except UserError:
        return False
    return doc.get("run_id") == run_id


def _analysis_written(folder: Path, outputs: Mapping[str, Any], run_id: str) -> bool:
    """Whether every file the analysis wrote (results.json, rotations, figures) is in ``folder`` as it wrote it, by
    digest: only results.json was checked, and a figure deleted or overwritten since stayed so at every re-run. A
    record of an earlier hrsa, without the digests: whether its results.json reads as this stage's."""
    if "files" not in outputs:
        return _readable_results(folder / "results.json", run_id)
    files = outputs["files"]
    return isinstance(files, dict) and all(
        (folder / name).is_file() and file_digest(folder / name) == digest for name, digest in files.items())


def _written_files(run: AnalysisRun) -> dict[str, str]:
    """Every file an analysis wrote into its folder, by name, with its digest (for :func:`_analysis_written`)."""
    return {f.name: file_digest(f) for f in (run.saved.json_path, *run.saved.rotations, *run.figures)}


def _dynamics_written(path: Path, outputs: Mapping[str, Any]) -> bool:
    """Whether the series' dynamics.json is the one its stage wrote (by its digest; a record of an earlier hrsa,
    without one: whether it reads as one). Its mere presence kept a truncated or edited file up to date, and the
    report failed on it at every re-run."""
    from hrsa.analyze.report.dynamics import load_dynamics

    if not path.is_file():
        return False
    if "digest" in outputs:
        return outputs["digest"] == file_digest(path)
    try:
        load_dynamics(path)
    except UserError:
        return False
    return True


def _checkpoints_complete(outputs: Mapping[str, Any], output: str, recipe: str) -> bool:
    """Whether every checkpoint a training stage recorded is complete in the run folder ``output`` (on any storage:
    one listing of the run folder). The folder the stage recorded, or the same recipe's folder elsewhere (a moved
    project, `hrsa submit`'s working dir unpacked anew): then it must record this recipe (``hrsa_recipe.json``), and
    its checkpoints of the recorded names are taken (complete: every file its manifest lists, with its digest on a
    local or shared filesystem)."""
    from hrsa.train.checkpoints import list_checkpoints
    from hrsa.train.recipe import RecipeMismatchError, read_recipe

    recorded = [_folder_name(c) for c in outputs.get("checkpoints", ())]
    if not recorded:
        return True
    if str(outputs.get("output")) != output:
        try:
            found = read_recipe(output)
        except RecipeMismatchError:  # unreadable: training says so, with the fix
            return False
        if found is None or found.key != recipe:
            return False
    return set(recorded) <= {_folder_name(c.url) for c in list_checkpoints(output)}


def _checkpoints_here(outputs: Mapping[str, Any], output: str) -> tuple[str, ...]:
    """The recorded checkpoints, in the run folder ``output`` where the stage recorded another (a moved project)."""
    from hrsa.runtime.locations import parse_location

    recorded = tuple(str(c) for c in outputs["checkpoints"])
    if str(outputs.get("output")) == output:
        return recorded
    run = parse_location(output)
    return tuple(str(run.child(_folder_name(c)).as_path_or_url()) for c in recorded)


def _folder_name(checkpoint: str | Path) -> str:
    """A checkpoint's folder name (``step_000100``), from its path or URL."""
    return posixpath.basename(str(checkpoint).rstrip("/"))


def _stored_identity(store: Any, mid: str) -> str:
    """A stored model's settings (source and weights digest, corpus, hidden states, dtype, layout...), hashed: what
    tells this pipeline's model from another put under its name since."""
    return stage_key(store.model_info(mid).to_attrs())


def _still_ours(store: Any, mid: str, entry: Mapping[str, Any]) -> bool:
    """Whether the stored model is the one the stage's record wrote (a record of an earlier hrsa, without the
    identity, is taken at its word)."""
    recorded = entry.get("outputs", {}).get("stored")
    return recorded is None or entry.get("status") != "done" or recorded == _stored_identity(store, mid)


@dataclass
class _Runner:
    config: PipelineConfig
    console: Console
    outcomes: list[StageOutcome] = field(default_factory=list)
    store_ids: dict[str, str] = field(default_factory=dict)
    last_steps: dict[str, Path] = field(default_factory=dict)  # each dynamics series' last results.json
    _extracted: dict[str, _Extracted] = field(default_factory=dict)
    # A remote out's local copy: uploaded after each state write, and its files named by their URLs in messages.
    published: PublishedOut | None = None
    extraction_workers: ExtractionWorkers | None = None  # kept across the extraction stages
    _asked: dict[str, str] = field(default_factory=dict)  # each extraction stage asked for -> its own key
    _by_content: dict[str, str] = field(default_factory=dict)  # content key -> the stage that extracted it

    def __post_init__(self) -> None:
        self.config.out.mkdir(parents=True, exist_ok=True)
        path = self.config.out / STATE_FILE
        self.state = (PipelineState(path) if self.published is None else
                      PipelineState(path, on_write=self.published.push, shown_as=str(self.published.url_of(path))))

    def _out_name(self, path: Path) -> str:
        """An output as the state records it: relative to the out (a remote out's local copy is a temporary folder,
        and a moved project keeps its out's layout), or where it is when elsewhere (a report.path)."""
        return path.relative_to(self.config.out).as_posix() if path.is_relative_to(self.config.out) else str(path)

    def _announce(self, stage: str, reason: str | None) -> bool:
        """Print the stage's line; True when it must run."""
        self.outcomes.append(StageOutcome(stage, reason is not None, reason or "up to date"))
        if reason is None:
            self.console.print(f"[dim]{escape(stage)}: skipped (up to date)[/]", emoji=False)
        else:
            self.console.print(f"[bold]{escape(stage)}[/]: running ({reason})", emoji=False)
        return reason is not None

    # -- Step 1: training ---------------------------------------------------------------------------
    def train(self, run: str, tc: TrainConfig) -> _Trained:
        """Train ``run`` into ``<output>/recipe-<key>``: its own folder per recipe, so changed inputs always train
        anew (in the old folder Ray Train would resume the old weights), and going back to an earlier recipe
        finds its run done; a pipeline never deletes a training run. The key is the recipe's (backbone and data
        by content, settings that change the weights) plus save_every: worker counts only schedule work."""
        from hrsa.train.recipe import training_recipe

        stage = f"train:{run}"
        if tc.address is None and self.config.address is not None:
            tc = tc.model_copy(update={"address": self.config.address})
        recipe = training_recipe(tc)
        tc = tc.model_copy(update={"output": parse_location(tc.output).child(recipe.folder_name).as_path_or_url()})
        key = stage_key({"recipe": recipe.key, "save_every": tc.save_every})
        output = str(tc.output)
        reason = self.state.reason_to_run(stage, key, lambda o: _checkpoints_complete(o, output, recipe.key))
        if self._announce(stage, reason):
            from hrsa.cluster.pipeline import train_keys
            from hrsa.train.checkpoints import checkpoint_step
            from hrsa.train.trainer import place_training, run_training

            check_checkpoint_schedule(run, tc, finished=False)  # before hours of training, not after
            try:
                place_training(tc)  # a request the cluster cannot place is refused before the stage counts as started
                self.state.start(stage, key)
                result = run_training(tc, progress=True)
            except HrsaError as error:  # the trainer names its settings by hrsa train's flags; here, the YAML's keys
                error.args = (renamed_flags(str(error), type(tc).model_fields, train_keys(run)),)
                raise
            check_checkpoint_schedule(run, tc, finished=True)
            self.state.finish(stage, key, {"output": str(tc.output), "recipe": recipe.key,
                                           "checkpoints": [str(c) for c in result.checkpoints],
                                           "steps": [checkpoint_step(c) for c in result.checkpoints]})
        outputs = self.state.entry(stage)["outputs"]  # type: ignore[index]
        return _Trained(_checkpoints_here(outputs, output), tuple(outputs["steps"]), key, output)

    # -- Step 2: extraction ---------------------------------------------------------------------------
    def extract_model(self, name: str, corpus: str, trained: Mapping[str, _Trained]) -> _Extracted:
        from hrsa.cluster.pipeline import extraction_keys

        entry = self.config.models[name]
        source = self._model_source(name, trained)
        return self._extract(self.config.store_id(name, corpus), source, corpus, options=entry, model_source=entry,
                             names=extraction_keys(corpus, f"models.{name}"))

    def extract_checkpoints(self, d: DynamicsEntry, trained: Mapping[str, _Trained]) -> dict[int, tuple[_Extracted, _Extracted]]:
        """Run a at step 0 (its backbone) and at every saved step, against run b at the same step (steps both saved)
        or at ``b_step``."""
        a, b = trained[d.a], trained[d.b]
        steps = sorted(set(a.steps) - {0} if d.b_step is not None else set(a.steps) & set(b.steps) - {0})
        if not steps:
            raise UserError(f"Expected checkpoints at common steps of runs {d.a} and {d.b}. Got steps {list(a.steps)} "
                            f"and {list(b.steps)} instead. Give both runs the same save_every and max_steps.")
        if d.b_step not in (None, 0, *b.steps):
            raise UserError(f"Expected b_step 0 or a saved step of run {d.b} ({list(b.steps)}). Got {d.b_step} instead. "
                            "Pick one of them.")
        return {step: (self._checkpoint(d, d.a, a, step), self._checkpoint(d, d.b, b, step if d.b_step is None else d.b_step))
                for step in (0, *steps)}

    def _checkpoint(self, d: DynamicsEntry, run: str, t: _Trained, step: int) -> _Extracted:
        """Run ``run`` at ``step`` (0: its backbone) over the series' corpus."""
        from hrsa.cluster.pipeline import extraction_keys

        source = self.config.train[run].backbone if step == 0 else str(t.checkpoints[t.steps.index(step)])
        return self._extract(self.config.checkpoint_id(run, step, d.corpus), source, d.corpus,
                             options=self._as_trained(d.extract, run),
                             names=extraction_keys(d.corpus, f"dynamics.{self.config.dynamics.index(d)}.extract"))

    def _as_trained(self, options: ExtractRunOptions, run: str) -> ExtractRunOptions:
        """A series' extraction settings for ``run``, its attention ``auto`` made the run's training attention:
        checkpoints record it (is_causal false), the backbone at step 0 does not, and a causal step 0 against
        bidirectional checkpoints would measure the attention mask rather than training."""
        trained_as = self.config.train[run].attention
        if options.attention != "auto" or trained_as == "auto":
            return options
        return options.model_copy(update={"attention": trained_as})

    def _extract(self, store_id: str, source: str, corpus: str, *, options: ExtractRunOptions, names: SettingNames,
                 model_source: ModelSourceOptions | None = None) -> _Extracted:
        """Extract ``source`` over ``corpus`` as ``store_id``, once per pipeline run however often it is asked, and
        once for the same weights, corpus and settings under any name.

        ``options`` say how it runs; ``model_source`` which weights load (a checkpoint folder needs none); ``names``
        how its messages name the settings (the YAML's keys).
        """
        c = self.config.corpora[corpus]
        ec = parse_extract_config({
            "store": self.config.store, "model": source, "corpus": c.path, "name": store_id,
            **c.model_dump(include=set(CorpusOptions.model_fields)),
            **options.model_dump(include=set(ExtractRunOptions.model_fields)),
            **(model_source.model_dump(include=set(ModelSourceOptions.model_fields)) if model_source else {}),
            "address": self.config.address,
        })
        # The store is not an input: whether it holds the model decides (a moved store with the model in it is fine).
        # Nor are the paths of the model and the corpus: their files are (a checkpoint folder by its model files:
        # extract.identity.model_files, not its bookkeeping), so the same files elsewhere (a moved project, `hrsa
        # submit`'s new working dir) keep the key.
        settings = ec.model_dump(mode="json", exclude={"store", "model", "corpus", *EXTRACT_SCHEDULING})
        inputs = {"model": source_fingerprint(source), "corpus": corpus_fingerprint(c.path, c)}
        key = self._earlier_key(f"extract:{store_id}", stage_key({"extract": settings, **inputs}), settings, source,
                                c.path, inputs, ec)
        content = stage_key({"extract": {k: v for k, v in settings.items() if k != "name"}, **inputs})  # any name
        stage = f"extract:{store_id}"
        if stage in self._extracted:  # the same checkpoint in two series: extracted once
            if self._asked[stage] != key:
                raise UserError(f"Expected one extraction for store id {store_id}. Got two that differ (a model named like a "
                                "checkpoint, or two dynamics series with other extract settings). Rename the model, or give "
                                "the series the same extract settings.")
            return self._extracted[stage]
        self._asked[stage] = key
        same = self._by_content.get(content)
        if same is not None:  # e.g. a series' step 0 is a pair's backbone: the stored one serves both
            self.outcomes.append(StageOutcome(stage, False, f"the same as {same} (weights, corpus and settings)"))
            self.console.print(f"[dim]{escape(stage)}: the same as {escape(same)} (weights, corpus and settings)[/]",
                               emoji=False)
            self._extracted[stage] = self._extracted[same]
            return self._extracted[same]
        self._by_content[content] = stage
        self._extracted[stage] = done = _Extracted(store_id, key)
        self.store_ids[stage] = store_id
        self._run_extraction(stage, key, ec, names)
        return done

    def _earlier_key(self, stage: str, key: str, settings: dict[str, Any], source: str, corpus: str,
                     inputs: dict[str, Any], ec: ExtractConfig) -> str:
        """``key`` (today's rule), or the key the stage's record holds where it is the key of an earlier rule for
        what it keyed and that still holds: otherwise the upgrade re-extracted every model and re-ran every analysis
        after it. Before 2026-12-05 a corpus file was keyed by its whole content (now by the records' ids and texts:
        the first label edited after the upgrade re-extracts once), and a ``packaged:`` model by its name."""
        entry = self.state.entry(stage)
        if entry is None or entry["key"] == key:
            return key
        whole_file = {**inputs, "corpus": source_fingerprint(corpus)}
        if entry["key"] == stage_key({"extract": settings, **whole_file}):
            return entry["key"]
        return self._earlier_packaged_key(stage, settings, source, whole_file, ec) or key

    def _earlier_packaged_key(self, stage: str, settings: dict[str, Any], source: str, inputs: dict[str, Any],
                              ec: ExtractConfig) -> str | None:
        """The key a ``packaged:`` model had when it was keyed by its name (before 2026-12-05), where the stage's
        record holds it and the stored model's weights are still the package's (its recorded content digest): the
        upgrade re-extracted it and re-ran every analysis after it. None otherwise."""
        from hrsa.extract.identity import model_content
        from hrsa.store import ActivationStore

        entry = self.state.entry(stage)
        if not source.startswith("packaged:") or entry is None:
            return None
        earlier = stage_key({"extract": settings, **inputs, "model": source})
        store = ActivationStore.open(ec.store)
        if entry["key"] != earlier or ec.name not in store.models():
            return None
        stored = store.model_info(ec.name).source.get("content")
        return earlier if stored is not None and stored == model_content(ec.model_spec()) else None

    def _run_extraction(self, stage: str, key: str, ec: ExtractConfig, names: SettingNames) -> None:
        from hrsa.extract.job import run_extraction
        from hrsa.store import ActivationStore

        store = ActivationStore.open(ec.store, mode="a")
        present = ec.name in store.models()
        complete = present and store.model_info(ec.name).complete
        entry = self.state.entry(stage)
        if present and entry is not None and not _still_ours(store, ec.name, entry):
            entry = None  # replaced in the store behind this pipeline (`hrsa store rm`, another extract): not its own
        if present and entry is None:  # not this pipeline's record (a new `out`, a new cluster): never overwritten
            mismatch = "; ".join(stored_differences(ec, store)) or None
            if mismatch:
                raise UserError(f"Expected model id {ec.name} free in {ec.store}, or extracted as this pipeline asks. Got "
                                f"a model {ec.name} there with {mismatch} instead. Delete it (`hrsa store rm {ec.store} "
                                f"{ec.name}`), or rename the model in the pipeline.")
            if complete:  # the same settings, recorded in the store: adopt it
                self.console.print(f"[dim]{escape(stage)}: found in the store with these settings: adopted[/]", emoji=False)
                self.state.finish(stage, key, {"model_id": ec.name, "adopted": True, "stored": _stored_identity(store, ec.name)})
        reason = self.state.reason_to_run(stage, key, lambda o: complete)
        if not self._announce(stage, reason):
            return
        # This pipeline's own model, from other inputs: redone from scratch, and let go only once the new one runs.
        # Its record may already say these inputs (a run of them that failed before it let go of the old model):
        # then the stored model's own settings tell.
        replace = present and entry is not None and (entry["key"] != key or bool(stored_differences(ec, store)))
        self.state.start(stage, key)
        warned: list[str] = []
        try:
            with stage_progress(self.console, "tokens") as (progress, task), gathered_warnings() as warned:
                result = run_extraction(ec, on_progress=lambda n, total: progress.update(task, total=total, advance=n),
                                        workers=self.extraction_workers, replace=replace)
        except HrsaError as error:  # named by the YAML's keys, not hrsa extract's flags; what it warned of still holds
            error.args = (renamed_flags(str(error), _EXTRACT_SETTINGS, names),)
            error.warnings = tuple(renamed_flags(message, _EXTRACT_SETTINGS, names) for message in warned)
            raise
        self._print_warnings(warned)
        self.state.finish(stage, key, {"model_id": result.model_id, "corpus_id": result.corpus_id, "n_tokens": result.n_tokens,
                                       "units_written": result.units_written, "nodes": list(result.nodes),
                                       "node_ids": list(result.node_ids),
                                       "stored": _stored_identity(ActivationStore.open(ec.store), ec.name)})  # as written now

    # -- Step 3: analysis -------------------------------------------------------------------------------
    def analyze(self, stage: str, options: PairAnalysisSettings, a: _Extracted, b: _Extracted, out_dir: Path,
                names: SettingNames) -> _Analyzed:
        """Compare a and b as ``options`` say, into ``out_dir``; messages name the settings by ``names`` (the YAML
        keys of the pair or the dynamics series)."""
        options = self._labels_from_corpus_file(options)
        settings = options.model_dump(mode="json", exclude={"a", "b", "corpus", "name", "extract", "b_step", "store", "pair",
                                                            "out", "run_id", "labels", *ANALYZE_SCHEDULING})
        # The probes' labels file by its name and content, not its path: editing it re-runs the probes (its path alone
        # would not), moving it re-runs nothing.
        key = stage_key({"analyze": settings, "labels": source_fingerprint(options.labels), "a": [a.store_id, a.key],
                         "b": [b.store_id, b.key], **self._auto_products(options, a, b)})
        json_path = out_dir / "results.json"
        run_id = f"{stage.partition(':')[2][:100]}--{key[:12]}".replace("@", "-")
        reason = self.state.reason_to_run(
            stage, key, lambda o: _analysis_written(out_dir, o, run_id) and self._recorded(options, run_id))
        if self._announce(stage, reason):
            # Recorded as started once its results are computed, before it writes: a run refused or failed before then
            # leaves the stage's record (and its earlier results) as they were.
            run = self._run_analysis(options.analyze_config(store=self.config.store, pair=(a.store_id, b.store_id),
                                                            out=out_dir, run_id=run_id),
                                     before_writing=lambda: self.state.start(stage, key), names=names)
            self.state.finish(stage, key, {"results": self._out_name(json_path), "files": _written_files(run)})
        return _Analyzed(json_path, key)

    def _auto_products(self, options: PairAnalysisSettings, a: _Extracted, b: _Extracted) -> dict[str, str]:
        """What auto's products are for a bf16/fp16 pair, for its key (see :data:`AUTO_FEW_LEVEL_PRODUCTS`); nothing
        for another pair, an explicit dtype, metrics with no co-moment products (k-NN, probes) or whose products were
        float64 under auto before (CCA and the others that invert C_xx): their keys are as before."""
        from hrsa.analyze.config import MOMENT_METRICS
        from hrsa.analyze.pair.analysis import stored_dtypes
        from hrsa.analyze.streaming.backends import FEW_LEVEL_DTYPES, FLOAT64_MEASURES
        from hrsa.store import ActivationStore

        metrics = set(options.metrics)
        if options.compute_dtype != "auto" or not metrics & set(MOMENT_METRICS) or metrics & FLOAT64_MEASURES:
            return {}
        dtypes = stored_dtypes(ActivationStore.open(self.config.store), (a.store_id, b.store_id))
        return {"auto_products": AUTO_FEW_LEVEL_PRODUCTS} if FEW_LEVEL_DTYPES & set(dtypes) else {}

    def _recorded(self, options: PairAnalysisSettings, run_id: str) -> bool:
        """Whether the store still holds the analysis's record (where it keeps one)."""
        from hrsa.store import ActivationStore

        return not options.store_results or run_id in ActivationStore.open(self.config.store).results_ids()

    def _labels_from_corpus_file(self, options: PairAnalysisSettings) -> PairAnalysisSettings:
        """Probes read labels from the corpus file this pipeline names, not the stored corpus's recorded source: a
        corpus is stored by its content, so a relabelled copy of a file is the same corpus, recorded as the first."""
        if "probe" not in options.metrics or options.labels is not None:
            return options
        corpus = self.config.corpora[options.corpus]  # type: ignore[attr-defined]
        return options.model_copy(update={"labels": corpus.path, "id_field": options.id_field or corpus.id_field})

    def _run_analysis(self, cfg: AnalyzeConfig, *, before_writing: Callable[[], None],
                      names: SettingNames) -> AnalysisRun:
        from hrsa.analyze.job import run_analysis

        # replace: this stage's key names the run id, so a record under it is this stage's, from a run that stopped
        # before it finished; it and the out folder (figures of an earlier setting) are replaced once the new results
        # are computed and written beside them.
        with stage_progress(self.console, "tokens x passes") as (progress, task):
            run = run_analysis(cfg, replace=True, before_writing=before_writing, names=names,
                               on_plan=lambda plan: progress.update(task, total=plan.passes * plan.inputs.n_tokens),
                               on_block=lambda n: progress.advance(task, n))
        self._print_warnings(run.warnings)
        return run

    def _print_warnings(self, messages: Sequence[str]) -> None:
        for message in messages:  # hrsa's warnings as lines below the bar (as its verbs print them)
            shown = self.published.shown(message) if self.published else message  # a remote out's files by URL
            self.console.print(f"hrsa: warning: {shown}", markup=False, emoji=False)

    # -- Step 4: dynamics -------------------------------------------------------------------------------
    def dynamics(self, d: DynamicsEntry, checkpoints: Mapping[int, tuple[_Extracted, _Extracted]],
                 names: SettingNames) -> _Analyzed:
        from hrsa.analyze.report.dynamics import write_dynamics

        folder = self.config.out / "dynamics" / d.label
        steps = sorted(checkpoints)
        done = [self.analyze(f"analyze:{d.label}@step-{s}", d, *checkpoints[s], folder / f"step-{s}", names)
                for s in steps]
        self.last_steps[d.label] = done[-1].results
        stage, path = f"dynamics:{d.label}", folder / "dynamics.json"
        key = stage_key({"dynamics": [d.a, d.b], "name": d.label, "steps": steps, "results": [r.key for r in done]})
        if self._announce(stage, self.state.reason_to_run(stage, key, lambda o: _dynamics_written(path, o))):
            self.state.start(stage, key)
            write_dynamics(path, runs=(d.a, d.b), steps=steps, results=[r.results for r in done], name=d.label)
            self.state.finish(stage, key, {"dynamics": self._out_name(path), "digest": file_digest(path)})
        return _Analyzed(path, key)

    # -- Step 5: evaluation ----------------------------------------------------------------------------
    def evaluate(self, name: str, ec: EvalConfig, trained: Mapping[str, _Trained]) -> _Analyzed:
        """Score ``ec.model`` (a run of the train section: each of its checkpoints, a curve; or a model of the models
        section, a trained one by its run's last checkpoint) on ``ec.tasks`` into ``<out>/eval/<name>/eval.json``.
        The key is the checkpoints' and local task files' content and the settings; when it changed, `hrsa eval`
        runs and keeps each earlier score of the same checkpoint, task and settings (it keys them by content too)."""
        from hrsa.cluster.pipeline import eval_keys

        source, models = self._eval_model(ec.model, trained)
        folder = self.config.out / "eval" / name
        path, stage = folder / "eval.json", f"eval:{name}"
        # What changes a score (the resolved dtype, the device kind where it runs, mteb's version...; not the batch
        # size): eval reuses the scores of equal settings anyway
        where = ec.model_copy(update={"device": ec.device or ("cuda" if self._cluster_gpus() else None)})
        key = stage_key({"eval": {**where.settings(), "steps": ec.steps}, "models": models,
                         "tasks": [_task_fingerprint(t) for t in ec.tasks]})

        def written(outputs: Mapping[str, Any]) -> bool:
            return path.is_file() and outputs.get("digest") == file_digest(path)

        if self._announce(stage, self.state.reason_to_run(stage, key, written)):
            try:
                ran = self._run_evaluation(ec.model_copy(update={"model": source, "out": folder, "resume": True}))
            except HrsaError as error:  # named by the YAML's keys (eval.<name>.tasks), not hrsa eval's flags
                error.args = (renamed_flags(str(error), type(ec).model_fields, eval_keys(name)),)
                raise
            # Recorded once done: a run stopped part-way left eval.json other than the digest recorded, so it runs
            # again, and eval keeps the scores it had written
            self.state.finish(stage, key, {"eval": self._out_name(path), "digest": file_digest(path), **ran})
        return _Analyzed(path, key)

    def _run_evaluation(self, ec: EvalConfig) -> dict[str, str]:
        """`hrsa eval` here, or on a cluster (an address given, or RAY_ADDRESS) as a Ray task on one of its nodes, a GPU
        one where it has GPUs: the driver's CPU would score a 7B run's checkpoints for days. Returns where it ran."""
        from hrsa.runtime.connection import connect
        from hrsa.train.cluster_eval import evaluate_on_cluster
        from hrsa.train.evaluate import evaluate

        address = self._cluster_address()
        if address:
            conn = connect(address)
            result = evaluate_on_cluster(ec, gpu=conn.n_gpus > 0, nodes=conn.nodes, own_out=True)
            self._print_warnings(result.notes)
            return {"node_id": result.node_id}
        notes: list[str] = []
        with stage_progress(self.console, "checkpoints") as (progress, task):
            # <out>/eval/<name> is this stage's own: another model's eval.json there (the YAML now names other weights)
            # is replaced, not refused as a user's --out would be
            evaluate(ec, on_checkpoint=lambda target, i, n: progress.update(task, total=n, completed=i),
                     on_note=notes.append, own_out=True)
        self._print_warnings(notes)
        return {}

    def _cluster_address(self) -> str | None:
        """The cluster the stages run on (the pipeline's address, or RAY_ADDRESS as under `hrsa submit`); None: here."""
        import os

        return self.config.address or os.environ.get("RAY_ADDRESS") or None

    def _cluster_gpus(self) -> bool:
        """Whether evaluations run on a cluster's GPU (the device their scores are keyed by)."""
        from hrsa.runtime.connection import connect

        address = self._cluster_address()
        return bool(address) and connect(address).n_gpus > 0

    def _eval_model(self, name: str, trained: Mapping[str, _Trained]) -> tuple[str, list[Any]]:
        """What an evaluation's model names, for `hrsa eval` (a run's folder, a checkpoint, a model), and its files'
        fingerprints (each checkpoint of a run)."""
        if name in self.config.train:
            run = trained[name]
            return run.output, [source_fingerprint(c) for c in run.checkpoints]
        if self.config.models[name].train is None:
            return _evaluated_model(self.config.models[name])
        source = self._model_source(name, trained)
        return source, [source_fingerprint(source)]

    def _model_source(self, name: str, trained: Mapping[str, _Trained]) -> str:
        """What model ``name`` of the models section loads: its ``model``, or its training run's last checkpoint."""
        entry = self.config.models[name]
        if entry.train is None:
            return str(entry.model)
        run = trained[entry.train]
        if not run.checkpoints:
            raise UserError(f"Expected a checkpoint of training run {entry.train} for model {name}. Got none. "
                            "Check the run's max_steps and save_every.")
        return str(run.checkpoints[-1])

    # -- Step 6: the report -----------------------------------------------------------------------------
    def report(self, results: Mapping[str, _Analyzed], dynamics: Mapping[str, _Analyzed],
               evals: Mapping[str, _Analyzed]) -> Path | None:
        if not results and not dynamics:
            self.console.print("[dim]report: skipped (no pairs and no dynamics to report)[/]")
            return None
        path = self.config.report_path
        # Without pairs, the report's pair section shows each series' last step.
        shown = [r.results for r in results.values()] or [self.last_steps[label] for label in dynamics]
        comparisons = self.config.table_2_columns() if results else None
        # Not its path (a moved project keeps its key), but the file there must be the one this stage wrote last, by
        # its digest: a report written elsewhere since (another path, the same settings) leaves this path's file of
        # an earlier run.
        key = stage_key({"pairs": {k: v.key for k, v in results.items()}, "dynamics": {k: v.key for k, v in dynamics.items()},
                         **({"evals": {k: v.key for k, v in evals.items()}} if evals else {}),  # keys as before without
                         "comparisons": [[c.label, c.results] for c in comparisons or ()],
                         **self.config.report.model_dump(mode="json", exclude={"path"})})

        def written(outputs: Mapping[str, Any]) -> bool:
            return path.is_file() and outputs.get("digest") == file_digest(path)

        if self._announce("report", self.state.reason_to_run("report", key, written)):
            from hrsa.analyze.report.html import read_report_inputs, write_report

            self.state.start("report", key)
            inputs = read_report_inputs(shown, dynamics=[d.results for d in dynamics.values()],
                                        evals=[e.results for e in evals.values()])
            if self.published is not None:  # the page names the results where they stay: at their URLs
                inputs = inputs.named(self.published.url_of)
            write_report(inputs, path, title=self.config.report.title, thresholds=self.config.report.thresholds(),
                         comparisons=comparisons, description=self.config.report.description)
            self.state.finish("report", key, {"report": self._out_name(path), "digest": file_digest(path)})
        return path

