"""``hrsa eval`` on awkward inputs and re-runs: unique task names, earlier rows kept by a failed or narrowed re-run
with the curve always drawn from eval.json, one-line errors that create nothing, and a reuse key that holds the
dtype and device the scores were computed with."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hrsa.store.errors import UserError
from hrsa.train.eval_tasks import build_tasks, parse_task_spec
from hrsa.train.evaluate import CheckpointScores, EvalConfig, evaluate, plot_curve


@pytest.fixture()
def cli(verb_cli: Callable[[click.Command], click.Group]) -> click.Group:
    from hrsa.train.cli import eval_command

    return verb_cli(eval_command)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _pairs(path: Path, n: int = 8) -> Path:
    return _write_jsonl(path, [{"query": f"fox {i}", "pos": f"the lazy dog {i} " * 3} for i in range(n)])


def _labels(path: Path, n: int = 12) -> Path:
    return _write_jsonl(path, [{"text": f"fox {i}" if i % 2 else f"dog w{i}", "label": i % 2} for i in range(n)])


def _run(tmp_path: Path, tiny_models, steps: tuple[int, ...] = (1, 2, 3)) -> Path:
    run = tmp_path / "run"
    for step in steps:
        shutil.copytree(tiny_models.dir("bert"), run / f"step_{step:06d}")
    return run


def _one_line_exit_2(result) -> str:
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def _assert_curve_matches_json(out: Path, tmp_path: Path) -> list[int]:
    """The curve beside eval.json is the one drawn from eval.json's rows (or absent when under two steps)."""
    data = json.loads((out / "eval.json").read_text())
    rows = [CheckpointScores(name=c["name"], model=c["model"], step=c["step"], results=c["results"])
            for c in data["checkpoints"]]
    steps = [r.step for r in rows]
    if len([s for s in steps if s is not None]) > 1:
        expected = plot_curve(rows, [t["name"] for t in data["tasks"]], tmp_path / "expected.png")
        assert (out / "eval_curve.png").read_bytes() == expected.read_bytes()
    else:
        assert not (out / "eval_curve.png").exists()
    return steps


# --- 1. task names -------------------------------------------------------------------------------------------------


def test_task_names_are_unique_whatever_the_files_are_called(tmp_path: Path) -> None:
    files = [_pairs(tmp_path / "x-2.jsonl"), _pairs(tmp_path / "a" / "x.jsonl"), _pairs(tmp_path / "b" / "x.jsonl"),
             _pairs(tmp_path / "c" / "x.jsonl"), _pairs(tmp_path / "x-3.jsonl")]
    built = build_tasks([parse_task_spec(f"retrieval:{f}") for f in files], instruction=None, limit=None, seed=0)
    names = [task.metadata.name for _, task in built]
    assert len(set(names)) == len(names) == 5, names
    assert names[:2] == ["local-retrieval-x-2", "local-retrieval-x"]


def test_colliding_stems_keep_every_score(tmp_path: Path, tiny_models) -> None:
    files = [_pairs(tmp_path / "x-2.jsonl"), _pairs(tmp_path / "a" / "x.jsonl", 6),
             _pairs(tmp_path / "b" / "x.jsonl", 5)]
    result = evaluate(EvalConfig(model=str(tiny_models.dir("bert")), tasks=tuple(f"retrieval:{f}" for f in files),
                                 instructions=False, out=tmp_path / "ev1"))
    data = json.loads(result.json_path.read_text())
    names = [t["name"] for t in data["tasks"]]
    assert len(set(names)) == 3 and set(data["checkpoints"][0]["results"]) == set(names)
    assert [data["checkpoints"][0]["results"][n]["spec"] for n in names] == [f"retrieval:{f}" for f in files]


# --- 2. re-runs keep earlier rows; the curve is always eval.json's -------------------------------------------------


def test_failed_or_narrowed_rerun_keeps_earlier_rows_and_curve(tmp_path: Path, tiny_models) -> None:
    run = _run(tmp_path, tiny_models)
    tasks = (f"retrieval:{_pairs(tmp_path / 'pairs.jsonl')}", f"classification:{_labels(tmp_path / 'lab.jsonl')}")
    out = run / "eval"
    evaluate(EvalConfig(model=str(run), tasks=tasks, instructions=False))
    assert _assert_curve_matches_json(out, tmp_path) == [1, 2, 3]

    # narrowed: step 1 again (reused), steps 2 and 3 stay, the curve still shows all three
    result = evaluate(EvalConfig(model=str(run), tasks=tasks, instructions=False, steps=(1,)))
    assert _assert_curve_matches_json(out, tmp_path) == [1, 2, 3]
    assert [c.step for c in result.checkpoints] == [1, 2, 3]

    # other settings: earlier rows are not mixed in, and a lone step has no curve
    evaluate(EvalConfig(model=str(run), tasks=tasks, instructions=False, steps=(1,), seed=1))
    assert _assert_curve_matches_json(out, tmp_path) == [1]
    evaluate(EvalConfig(model=str(run), tasks=tasks, instructions=False))
    assert _assert_curve_matches_json(out, tmp_path) == [1, 2, 3]

    # failed: step 2's weights are gone; step 1 is redone, step 3's earlier scores are kept, step 2's (other
    # weights now) are not, and the curve is redrawn from what eval.json holds
    (run / "step_000002" / "model.safetensors").unlink()
    with pytest.raises(UserError):
        evaluate(EvalConfig(model=str(run), tasks=tasks, instructions=False))
    assert _assert_curve_matches_json(out, tmp_path) == [1, 3]


def test_other_tasks_are_not_mixed_in(tmp_path: Path, tiny_models) -> None:
    run = _run(tmp_path, tiny_models, steps=(1, 2))
    pairs, labels = _pairs(tmp_path / "pairs.jsonl"), _labels(tmp_path / "lab.jsonl")
    out = tmp_path / "ev"
    evaluate(EvalConfig(model=str(run), tasks=(f"retrieval:{pairs}",), instructions=False, out=out))
    both = (f"retrieval:{pairs}", f"classification:{labels}")
    result = evaluate(EvalConfig(model=str(run), tasks=both, instructions=False, steps=(1,), out=out))
    assert _assert_curve_matches_json(out, tmp_path) == [1]  # step 2 was never scored on the labels
    assert [c.step for c in result.checkpoints] == [1]


# --- 3-5. one-line errors that create nothing ----------------------------------------------------------------------


def test_classification_needs_two_records_a_label(cli: click.Group, tmp_path: Path, tiny_models) -> None:
    one_each = _write_jsonl(tmp_path / "lab2.jsonl", [{"text": "a cat", "label": "x"}, {"text": "a dog", "label": "y"}])
    args = ["eval", "--model", str(tiny_models.dir("bert")), "--tasks", f"classification:{one_each}",
            "--no-instructions", "--out", str(tmp_path / "ev3")]
    output = _one_line_exit_2(CliRunner().invoke(cli, args))
    assert "at least 2 records of each label" in output and "'x'" in output
    assert not (tmp_path / "ev3").exists()
    two_each = _write_jsonl(tmp_path / "lab4.jsonl", [{"text": f"a cat {i}", "label": "xy"[i % 2]} for i in range(4)])
    (_, task), = build_tasks([parse_task_spec(f"classification:{two_each}")], instruction=None, limit=None, seed=0)
    assert len(task.dataset["train"]) == len(task.dataset["test"]) == 2


def test_failing_inputs_create_no_folders(cli: click.Group, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    _pairs(tmp_path / "pairs.jsonl")
    (tmp_path / "emptyrun").mkdir()
    args = ["eval", "--model", "emptyrun", "--tasks", "retrieval:pairs.jsonl"]
    output = _one_line_exit_2(CliRunner().invoke(cli, args))
    assert "step_" in output and list((tmp_path / "emptyrun").iterdir()) == []
    for model in ("nosuch", "nosuch-org/nosuch-model"):  # the second parses as a hub id and fails to load
        args = ["eval", "--model", model, "--tasks", "retrieval:pairs.jsonl", "--out", "ev2"]
        _one_line_exit_2(CliRunner().invoke(cli, args))
        assert not (tmp_path / "ev2").exists()
        assert not (tmp_path / "eval").exists()


def test_steps_of_a_plain_model_are_refused(cli: click.Group, tmp_path: Path, tiny_models) -> None:
    pairs = _pairs(tmp_path / "pairs.jsonl")
    args = ["eval", "--model", str(tiny_models.dir("bert")), "--tasks", f"retrieval:{pairs}", "--steps", "5",
            "--no-instructions", "--out", str(tmp_path / "ev4")]
    output = _one_line_exit_2(CliRunner().invoke(cli, args))
    assert "--steps" in output
    assert not (tmp_path / "ev4").exists()


# --- 6. the reuse key holds the resolved dtype and the device kind -------------------------------------------------


def test_settings_hold_resolved_dtype_and_device() -> None:
    cpu = EvalConfig(model="m", tasks="SciFact", device="cpu").settings()
    assert (cpu["dtype"], cpu["device"]) == ("float32", "cpu")
    gpu = EvalConfig(model="m", tasks="SciFact", device="cuda:1").settings()
    assert (gpu["dtype"], gpu["device"]) == ("bfloat16", "cuda")
    assert EvalConfig(model="m", tasks="SciFact", device="cuda", dtype="float32").settings()["dtype"] == "float32"
    from importlib.metadata import version

    assert cpu["mteb"] == version("mteb")  # a row of another mteb version is scored again


def test_scores_of_another_dtype_device_or_mteb_are_not_reused(tmp_path: Path, tiny_models, monkeypatch) -> None:
    from hrsa.train.encode import TextEncoder

    pairs = _pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "ev"
    loads: list[str] = []
    real_load = TextEncoder.load.__func__
    monkeypatch.setattr(TextEncoder, "load", classmethod(lambda cls, model, **kw: loads.append(model)
                                                         or real_load(cls, model, **kw)))
    config = EvalConfig(model=str(tiny_models.dir("bert")), tasks=(f"retrieval:{pairs}",), instructions=False,
                        device="cpu", out=out)
    evaluate(config)
    evaluate(config)
    assert len(loads) == 1  # same settings: reused
    # another mteb computes its metrics its own way: an upgrade kept serving the old version's scores
    for stored in ({"dtype": "bfloat16", "device": "cuda"}, {"dtype": "auto"}, {"device": "cuda"}, {"mteb": "1.0.0"}):
        data = json.loads((out / "eval.json").read_text())
        for entry in data["checkpoints"][0]["results"].values():
            entry["settings"] = {**config.settings(), **stored}
        (out / "eval.json").write_text(json.dumps(data))
        before = len(loads)
        evaluate(config)
        assert len(loads) == before + 1, stored
