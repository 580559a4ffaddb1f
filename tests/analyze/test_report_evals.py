"""The report's task scores: each eval.json `hrsa eval` wrote, a row per checkpoint and a column per task, its main
scores as written; a file that is not one (or whose scores are not numbers) is one line, never a drawn table."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hrsa.analyze.report.cli import report
from hrsa.analyze.report.evals import EVAL_SCHEMA, EvalFileError, load_evaluation
from hrsa.cli import cli
from tests.analyze.test_report import results_dirs  # noqa: F401  # the module fixture of analysed pairs


@pytest.fixture(scope="module")
def eval_json(tmp_path_factory: pytest.TempPathFactory, tiny_models: Any) -> Path:
    """A real eval.json: two checkpoints of a run on a retrieval task."""
    from hrsa.train.evaluate import EvalConfig, evaluate

    root = tmp_path_factory.mktemp("evals")
    for step in (3, 6):
        shutil.copytree(tiny_models.dir("bert"), root / "run" / f"step_{step:06d}")
    pairs = root / "dev.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"fox {i}", "pos": f"the lazy dog {i} " * 3}) + "\n" for i in range(8)))
    return evaluate(EvalConfig(model=str(root / "run"), tasks=(f"retrieval:{pairs}",), instructions=False,
                               out=root / "out")).json_path


def test_the_schema_is_the_one_hrsa_eval_writes() -> None:
    from hrsa.train.evaluate import SCHEMA

    assert EVAL_SCHEMA == SCHEMA


def test_the_report_shows_each_checkpoint_s_main_scores(eval_json: Path, results_dirs: dict[str, Path],  # noqa: F811
                                                         tmp_path: Path) -> None:
    hrsa = type(cli)(commands=[report])
    out = tmp_path / "r.html"
    result = CliRunner().invoke(hrsa, ["report", str(results_dirs["scaled"]), "--evals", str(eval_json),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    section = page.split('id="evaluations"', 1)[1]
    doc = json.loads(eval_json.read_text())
    written = [(row["step"], row["results"]["local-retrieval-dev"]["main_score"]) for row in doc["checkpoints"]]
    shown = re.findall(r"<tr><td>step_0+\d+</td><td>(\d+)</td><td class=\"num\">([0-9.]+)</td></tr>", section)
    assert [(int(step), float(score)) for step, score in shown] == [(s, round(v, 3)) for s, v in written]
    assert "local-retrieval-dev (ndcg_at_10)" in section
    assert "<h3>out</h3>" in section  # named by its folder (a pipeline's <out>/eval/<name>), the model below it


@pytest.mark.parametrize("forge, expected", [
    (lambda d: {**d, "schema": "hrsa.results/1"}, "Expected an eval.json of schema hrsa.eval/1"),
    (lambda d: _score(d, "0.9"), "main_score '0.9' is not a number"),
    (lambda d: _score(d, float("nan")), "main_score nan is not a number"),
    (lambda d: _score(d, True), "main_score True is not a number"),
    (lambda d: {**d, "checkpoints": [{**d["checkpoints"][0], "step": "3"}]}, "step '3' is not an integer"),
    (lambda d: {k: v for k, v in d.items() if k != "tasks"}, "KeyError: 'tasks'"),
])
def test_a_forged_eval_file_is_one_line(eval_json: Path, tmp_path: Path, forge: Any, expected: str) -> None:
    forged = tmp_path / "eval.json"
    forged.write_text(json.dumps(forge(json.loads(eval_json.read_text()))))
    with pytest.raises(EvalFileError) as caught:
        load_evaluation(forged)
    assert expected in str(caught.value) and str(forged) in str(caught.value) and "\n" not in str(caught.value)


def _score(doc: dict[str, Any], value: Any) -> dict[str, Any]:
    first = doc["checkpoints"][0]
    results = {name: {**r, "main_score": value} for name, r in first["results"].items()}
    return {**doc, "checkpoints": [{**first, "results": results}, *doc["checkpoints"][1:]]}
