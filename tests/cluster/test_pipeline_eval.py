"""A pipeline's eval section: `hrsa eval` of a model or of every checkpoint of a training run as a stage, skipped when
its checkpoints, task files and settings are as they were and its eval.json is the one it wrote; bad tasks are one
line naming the YAML key, found before any stage runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from hrsa.cluster.pipeline import PipelineError, parse_pipeline
from hrsa.cluster.runner import run_pipeline
from hrsa.store.errors import UserError
from hrsa.train.evaluate import EvalConfig, evaluate

pytestmark = pytest.mark.integration


def _pairs(path: Path, n: int = 8) -> Path:
    path.write_text("".join(json.dumps({"query": f"fox {i}", "pos": f"the lazy dog {i} " * 3}) + "\n" for i in range(n)))
    return path


def _values(root: Path, tiny_models: Any, **evaluation: Any) -> dict[str, Any]:
    corpus = root / "words.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"w{i} the quick fox"}) + "\n" for i in range(4)))
    return {"store": str(root / "store"), "out": str(root / "out"), "corpora": {"words": {"path": str(corpus)}},
            "models": {"enc": {"model": str(tiny_models.dir("bert"))}},
            "eval": {"dev": {"model": "enc", "instructions": False, **evaluation}}}


def _ran(result: Any) -> dict[str, bool]:
    return {stage.name: stage.ran for stage in result.stages}


def test_an_evaluation_scores_its_model_as_hrsa_eval_does_and_a_rerun_skips_it(tmp_path: Path, tiny_models: Any) -> None:
    tasks = [f"retrieval:{_pairs(tmp_path / 'dev.jsonl')}"]
    config = parse_pipeline(_values(tmp_path, tiny_models, tasks=tasks))
    first = run_pipeline(config, console=Console(quiet=True))
    assert _ran(first) == {"eval:dev": True}
    path = first.evals["dev"]
    assert path == tmp_path / "out" / "eval" / "dev" / "eval.json"
    alone = evaluate(EvalConfig(model=str(tiny_models.dir("bert")), tasks=tasks, instructions=False,
                                out=tmp_path / "alone"))
    ours = json.loads(path.read_text())["checkpoints"][0]["results"]
    theirs = json.loads(alone.json_path.read_text())["checkpoints"][0]["results"]
    assert {t: r["main_score"] for t, r in ours.items()} == {t: r["main_score"] for t, r in theirs.items()}
    again = run_pipeline(config, console=Console(quiet=True))
    assert _ran(again) == {"eval:dev": False}


@pytest.mark.parametrize("change", ["task file edited", "eval.json deleted", "eval.json edited", "setting changed"])
def test_what_changes_a_score_runs_the_evaluation_again(tmp_path: Path, tiny_models: Any, change: str) -> None:
    task = _pairs(tmp_path / "dev.jsonl")
    values = _values(tmp_path, tiny_models, tasks=[f"retrieval:{task}"])
    run_pipeline(parse_pipeline(values), console=Console(quiet=True))
    path = tmp_path / "out" / "eval" / "dev" / "eval.json"
    scored = _main_score(path)
    if change == "task file edited":
        _pairs(task, n=6)
    elif change == "eval.json deleted":
        path.unlink()
    elif change == "eval.json edited":
        path.write_text(path.read_text().replace('"main_score": ', '"main_score": 0.5, "was": '))
    else:
        values["eval"]["dev"]["limit"] = 4
    again = run_pipeline(parse_pipeline(values), console=Console(quiet=True))
    assert _ran(again) == {"eval:dev": True}
    assert _main_score(path) == scored or change in ("task file edited", "setting changed")
    batch = {**values, "eval": {"dev": {**values["eval"]["dev"], "batch_size": 3}}}  # changes no score
    assert _ran(run_pipeline(parse_pipeline(batch), console=Console(quiet=True))) == {"eval:dev": False}


def _main_score(path: Path) -> float:
    (result,) = json.loads(path.read_text())["checkpoints"][0]["results"].values()
    return result["main_score"]


@pytest.mark.parametrize("tasks, expected", [
    (["retrieval:{root}/gone.jsonl"], r"^eval\.dev\.tasks: Expected a task retrieval:FILE naming an existing"),
    (["NoSuchMtebTask"], r"^eval\.dev\.tasks: Expected an MTEB task or benchmark name"),
    (["SciFact"], r"^eval\.dev\.tasks: Expected the Hugging Face hub, or the data of MTEB task SciFact in the local "
                  r"datasets cache\. Got offline mode \(HF_HUB_OFFLINE is set\), and no copy of mteb/scifact at revision"),
])
def test_a_task_that_cannot_run_is_refused_before_anything_is_created(tmp_path: Path, tiny_models: Any,
                                                                       datasets_cache: Path, tasks: list[str],
                                                                       expected: str) -> None:
    values = _values(tmp_path, tiny_models, tasks=[t.format(root=tmp_path) for t in tasks])
    with pytest.raises(UserError, match=expected):
        run_pipeline(parse_pipeline(values), console=Console(quiet=True))
    assert not (tmp_path / "out").exists()


def test_an_mteb_evaluation_runs_and_reruns_offline_from_the_datasets_cache(tmp_path: Path, tiny_models: Any,
                                                                            datasets_cache: Path) -> None:
    """Offline, every MTEB evaluation was refused before any stage, even one whose data was cached and one that was up
    to date (it needs no data at all): the cache at mteb's revision stands in for the hub."""
    from tests.conftest import BANKING77, banking77_splits, cache_hub_dataset

    task, repo, pinned = BANKING77
    cache_hub_dataset(datasets_cache, repo, pinned, banking77_splits())
    config = parse_pipeline(_values(tmp_path, tiny_models, tasks=[task]))
    first = run_pipeline(config, console=Console(quiet=True))
    assert _ran(first) == {"eval:dev": True} and _main_score(first.evals["dev"]) == 1.0
    assert _ran(run_pipeline(config, console=Console(quiet=True))) == {"eval:dev": False}


def test_an_evaluation_s_errors_name_its_yaml_keys(tmp_path: Path, tiny_models: Any) -> None:
    """`hrsa eval` says --steps; a pipeline has no such flag."""
    values = _values(tmp_path, tiny_models, tasks=[f"retrieval:{_pairs(tmp_path / 'dev.jsonl')}"], steps=[1])
    with pytest.raises(UserError) as caught:
        run_pipeline(parse_pipeline(values), console=Console(quiet=True))
    assert "eval.dev.steps" in str(caught.value) and "--steps" not in str(caught.value)


@pytest.mark.parametrize("evaluation, expected", [
    ({"model": "nope", "tasks": ["SciFact"]}, "eval.dev.model: 'nope' is not a run of the train section (none) nor a "
                                             "model of the models section (enc)"),
    ({"model": "enc", "tasks": ["SciFact"], "out": "x"}, "eval.dev.out: set by the pipeline"),
    ({"model": "enc", "tasks": ["SciFact"], "resume": False}, "eval.dev.resume: set by the pipeline"),
    ({"model": "enc"}, "eval.dev.tasks is required"),
    ({"model": "enc", "tasks": ["SciFact"], "bogus": 1}, "eval.dev.bogus"),
])
def test_an_evaluation_that_does_not_validate_is_one_line(tmp_path: Path, tiny_models: Any,
                                                          evaluation: dict[str, Any], expected: str) -> None:
    values = {**_values(tmp_path, tiny_models), "eval": {"dev": evaluation}}
    with pytest.raises(PipelineError) as caught:
        parse_pipeline(values)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def _hub_snapshot(cache: Path, repo: str, ref: str, commit: str, source: Path) -> None:
    """A model in the Hugging Face cache as huggingface_hub lays it out: snapshots/<commit>/, refs/<ref> naming it."""
    import shutil

    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return cache


def test_a_model_s_revision_is_the_revision_evaluated(tmp_path: Path, tiny_models: Any, hub_cache: Path) -> None:
    """`models.enc.revision` was in the stage's key but never reached `hrsa eval`: the main branch was scored as v2."""
    from tests.conftest import save_tiny_model

    _hub_snapshot(hub_cache, "hrsa-test/tiny", "main", "a" * 40, tiny_models.dir("bert"))
    _hub_snapshot(hub_cache, "hrsa-test/tiny", "v2", "b" * 40, save_tiny_model(tmp_path / "v2", "bert", seed=1))
    tasks = [f"retrieval:{_pairs(tmp_path / 'dev.jsonl')}"]
    values = _values(tmp_path, tiny_models, tasks=tasks)
    values["models"]["enc"] = {"model": "hrsa-test/tiny", "revision": "v2"}
    result = run_pipeline(parse_pipeline(values), console=Console(quiet=True))
    alone = evaluate(EvalConfig(model="hrsa-test/tiny@v2", tasks=tasks, instructions=False, out=tmp_path / "alone"))
    main = evaluate(EvalConfig(model="hrsa-test/tiny", tasks=tasks, instructions=False, out=tmp_path / "main"))
    assert _main_score(alone.json_path) != _main_score(main.json_path)  # two models, two scores
    assert _main_score(result.evals["dev"]) == _main_score(alone.json_path)


def test_a_hub_model_that_moved_on_is_evaluated_again(tmp_path: Path, tiny_models: Any, hub_cache: Path) -> None:
    """Keyed by its id's text, `org/name` stayed up to date when refs/main named a new commit: the old weights'
    scores stood for the new ones (`hrsa eval` alone scores them again)."""
    from tests.conftest import save_tiny_model

    _hub_snapshot(hub_cache, "hrsa-test/tiny", "main", "a" * 40, tiny_models.dir("bert"))
    values = _values(tmp_path, tiny_models, tasks=[f"retrieval:{_pairs(tmp_path / 'dev.jsonl')}"])
    values["models"]["enc"] = {"model": "hrsa-test/tiny"}
    assert _ran(run_pipeline(parse_pipeline(values), console=Console(quiet=True))) == {"eval:dev": True}
    assert _ran(run_pipeline(parse_pipeline(values), console=Console(quiet=True))) == {"eval:dev": False}
    _hub_snapshot(hub_cache, "hrsa-test/tiny", "main", "b" * 40, save_tiny_model(tmp_path / "new", "bert", seed=1))
    assert _ran(run_pipeline(parse_pipeline(values), console=Console(quiet=True))) == {"eval:dev": True}


@pytest.mark.parametrize("lines, kind, expected", [
    (['{"query": "a", "pos": "b"}', "not json"], "retrieval", "Got invalid JSON on line 2"),
    (['{"text": "a", "label": 1}', '{"text": "b", "label": "1"}'], "classification", "to be of one type"),
    ([], "retrieval", "Got an empty file"),
])
def test_a_task_file_that_cannot_be_read_is_refused_before_anything_is_created(
    tmp_path: Path, tiny_models: Any, lines: list[str], kind: str, expected: str
) -> None:
    """Found at the eval stage, after hours of training and extraction (its existence alone was checked first)."""
    task = tmp_path / "dev.jsonl"
    task.write_text("".join(line + "\n" for line in lines))
    values = _values(tmp_path, tiny_models, tasks=[f"{kind}:{task}"])
    with pytest.raises(UserError, match=rf"^eval\.dev\.tasks: .*{expected}"):
        run_pipeline(parse_pipeline(values), console=Console(quiet=True))
    assert not (tmp_path / "out").exists()


def test_an_evaluation_whose_model_the_pipeline_now_names_otherwise_is_scored_anew(tmp_path: Path,
                                                                                  tiny_models: Any) -> None:
    """Attacks the eval stage after an edit of the YAML that changes its model (here `models.enc.model` pointed at
    other weights; a `train:` run retrained with another lr goes to another `recipe-<key>` folder alike): the
    stage's out folder, `<out>/eval/<name>`, is the pipeline's own, yet `hrsa eval`'s guard for a user's `--out`
    holding another model's eval.json refused the re-run in one line naming `--out`, a flag the pipeline has none of.
    The stage must score the new model and its eval.json hold only the new model's rows."""
    from tests.conftest import save_tiny_model

    task = f"retrieval:{_pairs(tmp_path / 'dev.jsonl')}"
    values = _values(tmp_path, tiny_models, tasks=[task])
    run_pipeline(parse_pipeline(values), console=Console(quiet=True))
    path = tmp_path / "out" / "eval" / "dev" / "eval.json"
    other = save_tiny_model(tmp_path / "other-bert", "bert", seed=5)
    values["models"]["enc"]["model"] = str(other)
    again = run_pipeline(parse_pipeline(values), console=Console(quiet=True))
    assert _ran(again)["eval:dev"]
    doc = json.loads(path.read_text())
    alone = evaluate(EvalConfig(model=str(other), tasks=[task], instructions=False, out=tmp_path / "alone"))
    assert doc["model"] == str(other) and len(doc["checkpoints"]) == 1
    (ours,) = doc["checkpoints"][0]["results"].values()
    (theirs,) = json.loads(alone.json_path.read_text())["checkpoints"][0]["results"].values()
    assert ours["main_score"] == theirs["main_score"]


def test_an_evaluation_of_a_run_retrained_with_another_lr_scores_the_new_run(tmp_path: Path, tiny_models: Any) -> None:
    """Attacks the most common way the eval stage's model changes: `train.ra.lr` edited, so the run trains anew into its
    own `recipe-<key>` folder, and `eval.dev` (model: ra) now names that folder. The stage's eval.json held the old
    run's curve, and the re-run was refused ("Expected eval.dev.out's eval.json to hold scores of ...") after the new
    training had run; `hrsa demo --lr`, `--train-steps` or `--perturbation` after a first demo failed so. The new run is
    scored, and no row of the old run stays."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"query": f"fox {i}", "pos": f"the lazy dog {i}", "negs": [f"cat {i}"]}) + "\n"
                            for i in range(8)))
    task = f"retrieval:{_pairs(tmp_path / 'dev.jsonl')}"
    values = _values(tmp_path, tiny_models, tasks=[task])
    values["train"] = {"ra": {"backbone": str(tiny_models.dir("bert")), "data": str(data), "batch_size": 4,
                              "max_steps": 1, "save_every": 1, "lr": 1e-3, "warmup_ratio": 0, "max_length": 16}}
    values["eval"]["dev"]["model"] = "ra"
    first = run_pipeline(parse_pipeline(values), console=Console(quiet=True))
    old = json.loads(first.evals["dev"].read_text())
    values["train"]["ra"]["lr"] = 5e-3
    again = run_pipeline(parse_pipeline(values), console=Console(quiet=True))
    assert _ran(again)["train:ra"] and _ran(again)["eval:dev"]
    doc = json.loads(again.evals["dev"].read_text())
    assert doc["model"] != old["model"] and Path(doc["model"]).parent == Path(old["model"]).parent  # recipe-<key>
    assert [row["step"] for row in doc["checkpoints"]] == [1]
    assert doc["checkpoints"][0]["model_digest"] != old["checkpoints"][0]["model_digest"]
    assert Path(doc["checkpoints"][0]["model"]).is_relative_to(doc["model"])


def test_the_report_is_written_again_when_an_evaluation_scores_anew(tmp_path: Path, tiny_models: Any,
                                                                   ray_local: Any) -> None:
    """The report shows the evaluations beside the pairs: it is keyed by their keys too, or new scores (a task file
    edited) left the report of the old ones up to date."""
    task = _pairs(tmp_path / "dev.jsonl")
    values = _values(tmp_path, tiny_models, tasks=[f"retrieval:{task}"])
    values["pairs"] = [{"a": "enc", "b": "enc", "corpus": "words", "metrics": ["cka"], "scheduler": "threads"}]
    first = run_pipeline(parse_pipeline(values), console=Console(quiet=True))
    assert _ran(first) == {"extract:enc": True, "analyze:enc--enc": True, "eval:dev": True, "report": True}
    _pairs(task, n=6)
    again = run_pipeline(parse_pipeline(values), console=Console(quiet=True))
    assert _ran(again) == {"extract:enc": False, "analyze:enc--enc": False, "eval:dev": True, "report": True}


def test_other_steps_of_a_run_evaluate_it_again(tmp_path: Path, tiny_models: Any, ray_local: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """eval's steps (which checkpoints of a run are scored) are in the stage's key: steps added left eval.json of the
    earlier steps up to date, without the new ones' scores."""
    import shutil

    import hrsa.train.trainer
    from hrsa.train.recipe import claim_run_folder, training_recipe
    from hrsa.train.trainer import TrainResult

    def fake_training(config: Any, *, progress: bool = True) -> TrainResult:  # checkpoints of the tiny bert
        config.output.mkdir(parents=True, exist_ok=True)
        claim_run_folder(config.output, training_recipe(config))
        for step in (1, 2):
            folder = config.output / f"step_{step:06d}"
            if not folder.is_dir():
                shutil.copytree(tiny_models.dir("bert"), folder)
                (folder / "hrsa_train.json").write_text(json.dumps({"step": step, "loss": 1.0 / step}))
        return TrainResult(config.output, tuple(sorted(config.output.glob("step_*"))), (), (), float("nan"), None)

    monkeypatch.setattr(hrsa.train.trainer, "run_training", fake_training)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"query": f"fox {i}", "pos": f"the lazy dog {i}", "negs": ["w1 w2"]}) + "\n"
                            for i in range(40)))
    values = _values(tmp_path, tiny_models, tasks=[f"retrieval:{_pairs(tmp_path / 'dev.jsonl')}"], model="run", steps=[1])
    values["train"] = {"run": {"backbone": str(tiny_models.dir("bert")), "data": str(data), "max_steps": 2,
                               "save_every": 1}}
    first = run_pipeline(parse_pipeline(values), console=Console(quiet=True))
    assert _ran(first)["eval:dev"]
    values["eval"]["dev"]["steps"] = [1, 2]
    again = run_pipeline(parse_pipeline(values), console=Console(quiet=True))
    assert _ran(again) == {"train:run": False, "eval:dev": True}
    steps = [c.get("step") for c in json.loads(first.evals["dev"].read_text())["checkpoints"]]
    assert sorted(steps) == [1, 2], steps
