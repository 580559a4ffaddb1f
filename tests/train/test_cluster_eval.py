"""`hrsa eval` as a Ray task (a pipeline's eval stage on a cluster): the scores `hrsa eval` gives here, written into the
driver's out with the driver's task specs; the earlier eval.json travels with the task; hrsa's own errors come back
as themselves; a task the cluster cannot place is an error, not a wait."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import hrsa.runtime.placement as placement
from hrsa.runtime.placement import PlacementError
from hrsa.train.cluster_eval import evaluate_on_cluster
from hrsa.train.eval_tasks import EvalError
from hrsa.train.evaluate import EvalConfig, evaluate

pytestmark = pytest.mark.integration


def _tasks(root: Path) -> tuple[str, ...]:
    root.mkdir(parents=True, exist_ok=True)
    pairs, labelled = root / "dev.jsonl", root / "mail.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"fox {i}", "pos": f"the lazy dog {i} " * 3}) + "\n" for i in range(8)))
    labelled.write_text("".join(json.dumps({"body": f"fox {i}" if i % 2 else f"dog w{i}", "y": i % 2}) + "\n"
                                for i in range(12)))
    return f"retrieval:{pairs}", f"classification:{labelled}:body:y"


def _scores(path: Path) -> dict[Any, dict[str, float]]:
    return {row["step"]: {name: r["main_score"] for name, r in row["results"].items()}
            for row in json.loads(path.read_text())["checkpoints"]}


def _run(root: Path, tiny_models: Any) -> Path:
    for step in (1, 2):
        shutil.copytree(tiny_models.dir("bert"), root / "run" / f"step_{step:06d}")
    return root / "run"


def test_a_task_scores_as_hrsa_eval_does_and_names_the_driver_s_specs(tmp_path: Path, tiny_models: Any,
                                                                         ray_local: Any) -> None:
    tasks = _tasks(tmp_path / "tasks")
    model = str(tiny_models.dir("bert"))
    result = evaluate_on_cluster(EvalConfig(model=model, tasks=tasks, instructions=False, out=tmp_path / "out"),
                                 gpu=False, nodes=ray_local.nodes)
    here = evaluate(EvalConfig(model=model, tasks=tasks, instructions=False, out=tmp_path / "here"))
    assert result.json_path == tmp_path / "out" / "eval.json"
    assert _scores(result.json_path) == _scores(here.json_path)
    doc = json.loads(result.json_path.read_text())
    assert [t["spec"] for t in doc["tasks"]] == list(tasks)  # not the task's copies, gone with its folder
    assert {r["spec"] for row in doc["checkpoints"] for r in row["results"].values()} == set(tasks)
    assert doc["config"]["tasks"] == list(tasks) and doc["config"]["out"] == str(tmp_path / "out")
    assert result.node_id in {node.node_id for node in ray_local.nodes}


def test_the_earlier_eval_json_travels_with_the_task(tmp_path: Path, tiny_models: Any, ray_local: Any) -> None:
    """A narrowed re-run (one step) keeps the other step's row, as `hrsa eval` keeps it in its own out."""
    tasks = _tasks(tmp_path / "tasks")[:1]
    config = EvalConfig(model=str(_run(tmp_path, tiny_models)), tasks=tasks, instructions=False, out=tmp_path / "out")
    first = _scores(evaluate_on_cluster(config, gpu=False, nodes=ray_local.nodes).json_path)
    assert sorted(first) == [1, 2]
    again = evaluate_on_cluster(config.model_copy(update={"steps": (2,)}), gpu=False, nodes=ray_local.nodes)
    assert _scores(again.json_path) == first
    assert (tmp_path / "out" / "eval_curve.png").is_file()


def test_hrsa_s_own_error_in_the_task_comes_back_as_itself(tmp_path: Path, tiny_models: Any, ray_local: Any) -> None:
    config = EvalConfig(model=str(tiny_models.dir("bert")), tasks=_tasks(tmp_path / "tasks")[:1], steps=(5,),
                        out=tmp_path / "out")
    with pytest.raises(EvalError, match=r"^Expected --steps only with a training run") as caught:
        evaluate_on_cluster(config, gpu=False, nodes=ray_local.nodes)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_gpu_the_cluster_does_not_have_is_an_error_not_a_wait(tmp_path: Path, tiny_models: Any, ray_local: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "ROOM_TIMEOUT_S", 2.0)
    config = EvalConfig(model=str(tiny_models.dir("bert")), tasks=_tasks(tmp_path / "tasks")[:1], out=tmp_path / "out")
    with pytest.raises(PlacementError, match="Expected room for 1 worker"):
        evaluate_on_cluster(config, gpu=True, nodes=ray_local.nodes)
    assert not (tmp_path / "out").exists()


def test_a_classification_file_with_a_colon_in_its_name_scores_as_hrsa_eval_does(tmp_path: Path, tiny_models: Any,
                                                                                  ray_local: Any) -> None:
    """`hrsa eval` takes an existing file's name whole (`classification:mail:v2.jsonl`); the task's copy was shipped
    as `.../mail:v2.jsonl:text:label` and read as the file `.../mail` with fields `v2.jsonl:text:label`."""
    labelled = tmp_path / "tasks" / "mail:v2.jsonl"
    labelled.parent.mkdir(parents=True)
    labelled.write_text("".join(json.dumps({"text": f"fox {i}" if i % 2 else f"dog w{i}", "label": i % 2}) + "\n"
                                for i in range(12)))
    tasks = (f"classification:{labelled}",)
    model = str(tiny_models.dir("bert"))
    here = evaluate(EvalConfig(model=model, tasks=tasks, instructions=False, out=tmp_path / "here"))
    result = evaluate_on_cluster(EvalConfig(model=model, tasks=tasks, instructions=False, out=tmp_path / "out"),
                                 gpu=False, nodes=ray_local.nodes)
    assert _scores(result.json_path) == _scores(here.json_path)


def test_a_curve_the_task_no_longer_draws_does_not_stay_in_the_driver_s_out(tmp_path: Path, tiny_models: Any,
                                                                           ray_local: Any) -> None:
    """Attacks a re-run on a cluster whose rows leave one step (another task, `steps` narrowed to one): `hrsa eval`
    removes its curve then (it would show rows eval.json no longer holds), but the task evaluates in a folder of its own
    and only the files it wrote came back, so the driver's out kept the first run's curve, of another task, beside the
    new eval.json."""
    retrieval, classification = _tasks(tmp_path / "tasks")
    config = EvalConfig(model=str(_run(tmp_path, tiny_models)), tasks=(retrieval,), instructions=False,
                        out=tmp_path / "out")
    evaluate_on_cluster(config, gpu=False, nodes=ray_local.nodes)
    assert (tmp_path / "out" / "eval_curve.png").is_file()
    again = evaluate_on_cluster(config.model_copy(update={"tasks": (classification,), "steps": (2,)}), gpu=False,
                                nodes=ray_local.nodes)
    assert sorted(_scores(again.json_path)) == [2]
    local = config.model_copy(update={"out": tmp_path / "here"})  # the same two runs as `hrsa eval` runs them
    evaluate(local)
    here = evaluate(local.model_copy(update={"tasks": (classification,), "steps": (2,)}))
    assert here.figure_path is None and not (tmp_path / "here" / "eval_curve.png").exists()
    assert not (tmp_path / "out" / "eval_curve.png").exists()
