"""``hrsa eval`` on what it must not trust: checkpoints their manifest calls incomplete, weights that cannot be read,
and an eval.json whose scores were edited (reused scores are shown as reused)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hrsa.train.checkpoints import INFO_FILE, STATE_FILE, file_manifest
from hrsa.train.evaluate import EvalConfig, eval_targets, evaluate, skipped_targets
from hrsa.train.recipe import RECIPE_FILE


def _pairs(path: Path, n: int = 8) -> Path:
    path.write_text("".join(json.dumps({"query": f"fox {i}", "pos": f"the lazy dog {i} " * 3}) + "\n" for i in range(n)))
    return path


def _checkpoint(tiny_models, folder: Path, step: int) -> Path:
    """A checkpoint as `hrsa train` writes it: the model folder, trainer_state.pt and the manifest."""
    shutil.copytree(tiny_models.dir("bert"), folder)
    (folder / STATE_FILE).write_bytes(b"optimizer state")
    (folder / INFO_FILE).write_text(json.dumps({"step": step, "loss": 1.0, "files": file_manifest(folder)}))
    return folder


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _one_line_exit_2(result) -> str:
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


# --- truncated weights ---------------------------------------------------------------------------------------------


def test_a_checkpoint_its_manifest_calls_incomplete_is_skipped_with_a_note(eval_cli: click.Group, tmp_path: Path,
                                                                            tiny_models) -> None:
    run = tmp_path / "run"
    _checkpoint(tiny_models, run / "step_000001", 1)
    _truncate(_checkpoint(tiny_models, run / "step_000002", 2) / "model.safetensors")
    pairs = _pairs(tmp_path / "pairs.jsonl")
    result = CliRunner().invoke(eval_cli, ["eval", "--model", str(run), "--tasks", f"retrieval:{pairs}", "--no-instructions"])
    assert result.exit_code == 0, result.output
    assert "step_000002" in result.output and "incomplete" in result.output
    data = json.loads((run / "eval" / "eval.json").read_text())
    assert [c["step"] for c in data["checkpoints"]] == [1]

    # asked for by --steps, or the only checkpoint: refused in one line naming the folder, nothing written
    out = tmp_path / "ev"
    args = ["eval", "--model", str(run), "--tasks", f"retrieval:{pairs}", "--steps", "2", "--out", str(out)]
    assert "step_000002" in _one_line_exit_2(CliRunner().invoke(eval_cli, args))
    args = ["eval", "--model", str(run / "step_000002"), "--tasks", f"retrieval:{pairs}", "--out", str(out)]
    assert "step_000002" in _one_line_exit_2(CliRunner().invoke(eval_cli, args))
    assert not out.exists()


def _unfinished(tiny_models, folder: Path) -> Path:
    """A checkpoint of `hrsa train` whose save or copy has not finished: the model folder, no manifest yet (the trainer
    writes hrsa_train.json last)."""
    shutil.copytree(tiny_models.dir("bert"), folder)
    return folder


@pytest.mark.parametrize("under", ["", "checkpoints"])
def test_a_step_folder_without_its_manifest_in_an_hrsa_run_is_skipped_as_incomplete(
    eval_cli: click.Group, tmp_path: Path, tiny_models, under: str
) -> None:
    """In a run folder of `hrsa train` (it holds hrsa_recipe.json) a step folder with config.json but no hrsa_train.json
    is a checkpoint still being saved or copied: it was scored as a complete model."""
    run = tmp_path / "run"
    _checkpoint(tiny_models, run / under / "step_000001", 1)
    _unfinished(tiny_models, run / under / "step_000002")
    (run / RECIPE_FILE).write_text("{}")
    assert [t.step for t in eval_targets(str(run))] == [1]
    assert [t.name for t in skipped_targets(str(run))] == ["step_000002"]
    pairs = _pairs(tmp_path / "pairs.jsonl")
    result = CliRunner().invoke(eval_cli, ["eval", "--model", str(run), "--tasks", f"retrieval:{pairs}", "--no-instructions",
                                      "--out", str(tmp_path / "scored")])
    assert result.exit_code == 0, result.output
    assert f"skipped step_000002: {run / under / 'step_000002'} is incomplete: it has no {INFO_FILE}" in result.output
    assert [c["step"] for c in json.loads((tmp_path / "scored" / "eval.json").read_text())["checkpoints"]] == [1]

    # asked for by --steps, the run's only checkpoint, or by its own folder: refused in one line, nothing written
    out = tmp_path / "ev"
    common = ["--tasks", f"retrieval:{pairs}", "--out", str(out)]
    unfinished = run / under / "step_000002"
    line = _one_line_exit_2(CliRunner().invoke(eval_cli, ["eval", "--model", str(run), "--steps", "2", *common]))
    assert f"Got {unfinished} is incomplete: it has no {INFO_FILE}, which hrsa train writes last" in line
    line = _one_line_exit_2(CliRunner().invoke(eval_cli, ["eval", "--model", str(unfinished), *common]))
    assert f"{unfinished} is incomplete: it has no {INFO_FILE}" in line
    shutil.rmtree(run / under / "step_000001")
    line = _one_line_exit_2(CliRunner().invoke(eval_cli, ["eval", "--model", str(run), *common]))
    assert f"Expected a complete checkpoint in {run}. Got none instead: {unfinished} is incomplete" in line
    assert not out.exists()


def test_step_folders_outside_an_hrsa_run_are_models_without_a_manifest(tmp_path: Path, tiny_models) -> None:
    """Any Hugging Face model folder named by step is taken where no hrsa_recipe.json says it is a run of hrsa train."""
    run = tmp_path / "copies"
    _checkpoint(tiny_models, run / "step_000001", 1)
    _unfinished(tiny_models, run / "step_000002")
    assert [t.step for t in eval_targets(str(run))] == [1, 2] and not skipped_targets(str(run))
    assert [t.name for t in eval_targets(str(run / "step_000002"))] == ["step_000002"]


def test_unreadable_weights_are_one_line_naming_the_file(eval_cli: click.Group, tmp_path: Path, tiny_models) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_models.dir("bert"), model)  # a plain model folder: no manifest to tell
    _truncate(model / "model.safetensors")
    pairs = _pairs(tmp_path / "pairs.jsonl")
    args = ["eval", "--model", str(model), "--tasks", f"retrieval:{pairs}", "--out", str(tmp_path / "ev")]
    output = _one_line_exit_2(CliRunner().invoke(eval_cli, args))
    assert str(model / "model.safetensors") in output


def test_load_model_names_the_unreadable_weights_file(tmp_path: Path, tiny_models) -> None:
    from hrsa.extract.models import ModelLoadError, load_model, parse_model_spec

    model = tmp_path / "model"
    shutil.copytree(tiny_models.dir("bert"), model)
    (model / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(parse_model_spec(str(model)), device="cpu")


# --- reused scores: said so, and believed only when they agree with themselves -------------------------------------


def test_reused_scores_are_marked_as_reused(eval_cli: click.Group, tmp_path: Path, tiny_models) -> None:
    pairs = _pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "ev"
    args = ["eval", "--model", str(tiny_models.dir("bert")), "--tasks", f"retrieval:{pairs}", "--no-instructions",
            "--out", str(out)]
    first = CliRunner().invoke(eval_cli, args)
    assert first.exit_code == 0, first.output
    assert "reused from" not in first.output
    again = CliRunner().invoke(eval_cli, args)
    assert again.exit_code == 0, again.output
    assert "reused from" in again.output and str(out / "eval.json") in again.output.replace("\n", "")


def _scored_once(eval_cli: click.Group, tmp_path: Path, tiny_models) -> tuple[list[str], Path, dict, dict]:
    """The tiny BERT scored on one retrieval task into tmp_path/ev: (its args, out, eval.json, the task's entry)."""
    pairs = _pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "ev"
    args = ["eval", "--model", str(tiny_models.dir("bert")), "--tasks", f"retrieval:{pairs}", "--no-instructions",
            "--out", str(out)]
    assert CliRunner().invoke(eval_cli, args).exit_code == 0
    data = json.loads((out / "eval.json").read_text())
    (entry,) = data["checkpoints"][0]["results"].values()
    return args, out, data, entry


def test_an_edited_main_score_is_not_reused(eval_cli: click.Group, tmp_path: Path, tiny_models, monkeypatch) -> None:
    from hrsa.train.encode import TextEncoder

    args, out, data, entry = _scored_once(eval_cli, tmp_path, tiny_models)
    assert entry["main_score_name"] == "ndcg_at_10"
    truth = entry["main_score"]
    assert truth != 0.99
    entry["main_score"] = 0.99  # the entry's own ndcg_at_10 still says otherwise
    (out / "eval.json").write_text(json.dumps(data))

    loads: list[str] = []
    real_load = TextEncoder.load.__func__
    monkeypatch.setattr(TextEncoder, "load", classmethod(lambda cls, model, **kw: loads.append(model)
                                                         or real_load(cls, model, **kw)))
    result = CliRunner().invoke(eval_cli, args)
    assert result.exit_code == 0, result.output
    assert len(loads) == 1  # scored again
    table = "\n".join(line for line in result.output.splitlines() if not line.startswith("hrsa:"))
    assert "0.9900" not in table and f"{truth:.4f}" in table and "computed now" in table
    warning = [line for line in result.output.splitlines() if "ndcg_at_10" in line]
    assert len(warning) == 1 and str(out / "eval.json") in warning[0], result.output
    (entry,) = json.loads((out / "eval.json").read_text())["checkpoints"][0]["results"].values()
    assert entry["main_score"] == truth


def test_an_edited_row_of_another_checkpoint_is_not_kept(tmp_path: Path, tiny_models) -> None:
    from hrsa.train.evaluate import EvalWarning

    run = tmp_path / "run"
    for step in (1, 2):
        _checkpoint(tiny_models, run / f"step_{step:06d}", step)
    tasks = (f"retrieval:{_pairs(tmp_path / 'pairs.jsonl')}",)
    evaluate(EvalConfig(model=str(run), tasks=tasks, instructions=False))
    path = run / "eval" / "eval.json"
    data = json.loads(path.read_text())
    (entry,) = data["checkpoints"][1]["results"].values()
    entry["scores"]["test"][0]["ndcg_at_10"] = 0.5 if entry["main_score"] != 0.5 else 0.25
    path.write_text(json.dumps(data))
    with pytest.warns(EvalWarning, match="ndcg_at_10"):
        result = evaluate(EvalConfig(model=str(run), tasks=tasks, instructions=False, steps=(1,)))
    assert [c.step for c in result.checkpoints] == [1]
    assert result.checkpoints[0].reused == {"local-retrieval-pairs"}


# --- scores that are not numbers: never written, never reused -------------------------------------------------------


def _diverged(tiny_models, folder: Path) -> Path:
    """A model whose weights hold NaN, as a training step that diverged leaves them: every embedding is NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_models.dir("bert"), folder)
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if "word_embeddings" in k)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _one_error_line(result) -> str:
    """The one line of the refusal (exit 2), whatever progress bars transformers drew while the model loaded."""
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("hrsa:")]
    return line


def _labels(path: Path, n: int = 12) -> Path:
    path.write_text("".join(json.dumps({"text": f"fox {i}" if i % 2 else f"dog w{i}", "label": i % 2}) + "\n"
                            for i in range(n)))
    return path


@pytest.mark.parametrize("kind", ["retrieval", "classification"])
def test_a_model_whose_embeddings_are_not_finite_is_refused_not_scored(eval_cli: click.Group, tmp_path: Path,
                                                                       tiny_models, kind: str) -> None:
    """NaN embeddings scored ndcg_at_10 0.494 on retrieval (exit 0: NaN similarities rank in any order), and were a
    traceback of scikit-learn's on classification."""
    model = _diverged(tiny_models, tmp_path / "model")
    file = _pairs(tmp_path / "pairs.jsonl") if kind == "retrieval" else _labels(tmp_path / "labels.jsonl")
    out = tmp_path / "ev"
    args = ["eval", "--model", str(model), "--tasks", f"{kind}:{file}", "--no-instructions", "--out", str(out)]
    output = _one_error_line(CliRunner().invoke(eval_cli, args))
    assert output.startswith(f"hrsa: error: Expected finite embeddings from {model}. Got NaN or infinite values for ")
    assert "--dtype float32" in output
    assert not out.exists()  # nothing written, not even mteb's cache folder


def test_a_diverged_checkpoint_of_a_run_names_the_steps_left(eval_cli: click.Group, tmp_path: Path, tiny_models) -> None:
    run = tmp_path / "run"
    _checkpoint(tiny_models, run / "step_000001", 1)
    folder = _diverged(tiny_models, run / "step_000002")
    (folder / INFO_FILE).write_text(json.dumps({"step": 2, "loss": float("nan"), "files": file_manifest(folder)}))
    _checkpoint(tiny_models, run / "step_000003", 3)
    pairs = _pairs(tmp_path / "pairs.jsonl")
    output = _one_error_line(CliRunner().invoke(eval_cli, ["eval", "--model", str(run), "--tasks", f"retrieval:{pairs}",
                                                      "--no-instructions"]))
    assert f"finite embeddings from {folder}." in output and "--steps 1,3" in output
    data = json.loads((run / "eval" / "eval.json").read_text())
    assert [c["step"] for c in data["checkpoints"]] == [1]  # what was scored before it stays


def test_a_nan_main_score_of_an_earlier_eval_json_is_scored_again_and_never_written(eval_cli: click.Group, tmp_path: Path,
                                                                                 tiny_models) -> None:
    """A NaN main score (JSON NaN, from an earlier hrsa) is no result: it is scored again with a note that says it is
    not a number, and what is written instead is a number, reused by the next run without a note."""
    args, out, data, entry = _scored_once(eval_cli, tmp_path, tiny_models)
    truth = entry["main_score"]
    entry["main_score"] = float("nan")
    for subset in entry["scores"]["test"]:
        subset["main_score"] = subset["ndcg_at_10"] = float("nan")  # the entry agrees with itself: all NaN
    (out / "eval.json").write_text(json.dumps(data))

    again = CliRunner().invoke(eval_cli, args)
    assert again.exit_code == 0, again.output
    notes = [line for line in again.output.splitlines() if line.startswith("hrsa: not reusing")]
    assert len(notes) == 1 and "its main score is not a number (nan)" in notes[0], again.output
    assert "computed now" in again.output and f"{truth:.4f}" in again.output
    (entry,) = json.loads((out / "eval.json").read_text())["checkpoints"][0]["results"].values()
    assert entry["main_score"] == truth  # (mteb's secondary metrics, such as nauc_*, stay as mteb gives them: NaN too)

    third = CliRunner().invoke(eval_cli, args)
    assert third.exit_code == 0 and "not reusing" not in third.output and "reused from eval.json" in third.output


def test_a_nan_main_score_from_finite_embeddings_is_refused_naming_the_other_steps() -> None:
    """The one rule for any task (a hub task's metric undefined for embeddings all alike): never written."""
    from hrsa.store.errors import UserError
    from hrsa.train.evaluate import EvalTarget, _check_main_score

    class Task:
        class metadata:  # noqa: N801 (mteb's attribute)
            name = "STSBenchmark"

    entry = {"main_score": float("nan"), "main_score_name": "cosine_spearman"}
    target = EvalTarget(name="step_000002", model="/runs/r/step_000002", step=2)
    with pytest.raises(UserError) as refused:
        _check_main_score(entry, Task, target, [1, 3])
    assert str(refused.value) == ("Expected a number as the main score (cosine_spearman) of STSBenchmark for "
                                  "/runs/r/step_000002. Got nan instead: the metric is undefined for its embeddings "
                                  "(all alike?), and nothing of it is written. Evaluate the run's other checkpoints "
                                  "with --steps 1,3.")
    _check_main_score({**entry, "main_score": 0.5}, Task, target, [1, 3])  # a number passes


def test_an_eval_into_an_out_another_eval_writes_is_refused_and_leaves_its_files(eval_cli: click.Group, tmp_path: Path,
                                                                                tiny_models) -> None:
    """Two evals of one checkpoint share its default --out (<checkpoint>/eval): they raced on eval.json, and one that
    had created the folder and then failed removed it with the other's mteb-results in it."""
    from hrsa.runtime.locations import parse_location
    from hrsa.train.evaluate import EVAL_LOCK

    pairs = _pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "ev"
    with EVAL_LOCK.exclusive(parse_location(str(out))):  # the other eval, writing its scores
        (out / "mteb-results").mkdir()
        (out / "mteb-results" / "theirs.json").write_text("{}")
        result = CliRunner().invoke(eval_cli, ["eval", "--model", str(tiny_models.dir("bert")), "--tasks",
                                          f"retrieval:{pairs}", "--no-instructions", "--out", str(out)])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "hrsa eval" in lines[0] and "another --out" in lines[0], result.stderr
        assert (out / "mteb-results" / "theirs.json").read_text() == "{}" and not (out / "eval.json").exists()
