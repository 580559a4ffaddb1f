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
    (["SciFact"], r"^Expected the Hugging Face hub for the MTEB tasks of eval\.dev\.tasks: SciFact\. Got offline mode"),
])
def test_a_task_that_cannot_run_is_refused_before_anything_is_created(tmp_path: Path, tiny_models: Any,
                                                                       tasks: list[str], expected: str) -> None:
    values = _values(tmp_path, tiny_models, tasks=[t.format(root=tmp_path) for t in tasks])
    with pytest.raises(UserError, match=expected):
        run_pipeline(parse_pipeline(values), console=Console(quiet=True))
    assert not (tmp_path / "out").exists()


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
