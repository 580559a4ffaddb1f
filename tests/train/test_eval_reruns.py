"""``hrsa eval`` on awkward inputs and re-runs: unique task names, earlier rows kept by a failed or narrowed re-run
(--no-resume of some steps too) with the curve always drawn from eval.json, one-line errors that create nothing, a
reuse key that holds the dtype, device and mteb version the scores were computed with, a query on several lines as
one query, malformed eval.json and hrsa_train.json rescored or incomplete (never a traceback), and `hrsa extract` or
`hrsa train` of a checkpoint its manifest calls incomplete refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from hrsa.store.errors import UserError
from hrsa.train.checkpoints import INFO_FILE, list_checkpoints, manifest_complete
from hrsa.train.eval_tasks import build_tasks, parse_task_spec
from hrsa.train.evaluate import CheckpointScores, EvalConfig, evaluate, plot_curve
from hrsa.train.testing import write_checkpoint


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


def test_classification_needs_two_records_a_label(eval_cli: click.Group, tmp_path: Path, tiny_models) -> None:
    one_each = _write_jsonl(tmp_path / "lab2.jsonl", [{"text": "a cat", "label": "x"}, {"text": "a dog", "label": "y"}])
    args = ["eval", "--model", str(tiny_models.dir("bert")), "--tasks", f"classification:{one_each}",
            "--no-instructions", "--out", str(tmp_path / "ev3")]
    output = _one_line_exit_2(CliRunner().invoke(eval_cli, args))
    assert "at least 2 records of each label" in output and "'x'" in output
    assert not (tmp_path / "ev3").exists()
    two_each = _write_jsonl(tmp_path / "lab4.jsonl", [{"text": f"a cat {i}", "label": "xy"[i % 2]} for i in range(4)])
    (_, task), = build_tasks([parse_task_spec(f"classification:{two_each}")], instruction=None, limit=None, seed=0)
    assert len(task.dataset["train"]) == len(task.dataset["test"]) == 2


def test_failing_inputs_create_no_folders(eval_cli: click.Group, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    _pairs(tmp_path / "pairs.jsonl")
    (tmp_path / "emptyrun").mkdir()
    args = ["eval", "--model", "emptyrun", "--tasks", "retrieval:pairs.jsonl"]
    output = _one_line_exit_2(CliRunner().invoke(eval_cli, args))
    assert "step_" in output and list((tmp_path / "emptyrun").iterdir()) == []
    for model in ("nosuch", "nosuch-org/nosuch-model"):  # the second parses as a hub id and fails to load
        args = ["eval", "--model", model, "--tasks", "retrieval:pairs.jsonl", "--out", "ev2"]
        _one_line_exit_2(CliRunner().invoke(eval_cli, args))
        assert not (tmp_path / "ev2").exists()
        assert not (tmp_path / "eval").exists()


def test_steps_of_a_plain_model_are_refused(eval_cli: click.Group, tmp_path: Path, tiny_models) -> None:
    pairs = _pairs(tmp_path / "pairs.jsonl")
    args = ["eval", "--model", str(tiny_models.dir("bert")), "--tasks", f"retrieval:{pairs}", "--steps", "5",
            "--no-instructions", "--out", str(tmp_path / "ev4")]
    output = _one_line_exit_2(CliRunner().invoke(eval_cli, args))
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


# --- checkpoints fed back, and malformed files -----------------------------------------------------------------------


def _overwrite_weights_same_size(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    weights_file = folder / "model.safetensors"
    size = weights_file.stat().st_size
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in load_file(weights_file).items()}, weights_file,
              metadata={"format": "pt"})
    assert weights_file.stat().st_size == size


# --- a query on several lines is one query with several positives ------------------------------------------------


class _PerfectEncoder:
    """One-hot of the topic number in each text ("topic 3", "doc 3 a"): every positive of a query is its nearest
    neighbour, and nothing else is near it."""

    dim = 16

    def encode(self, texts, **kwargs) -> np.ndarray:  # noqa: ANN001, ANN003
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            out[i, int(text.split()[1])] = 1.0
        return out


def test_a_query_on_several_lines_is_one_query_with_all_its_positives(tmp_path: Path, tiny_models,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A pairs file holds one line a positive: a query with two positives is on two lines. Scored one query a line,
    each line's other positive was an irrelevant document ranked above or beside its own, and a perfect encoder
    scored nDCG@10 0.815 instead of 1 (silently: exit 0, a plausible number)."""
    from hrsa.train import encode

    pairs = _write_jsonl(tmp_path / "dup.jsonl", [{"query": f"topic {k}", "pos": f"doc {k} {s}"}
                                                  for k in range(12) for s in "ab"])
    monkeypatch.setattr(encode.TextEncoder, "load", classmethod(lambda cls, model, **kw: _PerfectEncoder()))
    result = evaluate(EvalConfig(model=str(tiny_models.dir("bert")), tasks=(f"retrieval:{pairs}",),
                                 instructions=False, out=tmp_path / "out"))
    assert result.main_score("local-retrieval-dup") == pytest.approx(1.0)


def test_local_retrieval_groups_the_lines_of_one_query(tmp_path: Path) -> None:
    from hrsa.train.mteb_adapter import LocalRetrievalTask

    pairs = _write_jsonl(tmp_path / "p.jsonl", [{"query": "q", "pos": "a"}, {"query": "q", "pos": "b"},
                                                 {"query": "q", "pos": "c", "instruction": "other"},
                                                 {"query": "r", "pos": "a"}])
    task = LocalRetrievalTask(pairs, name="local-retrieval-p")
    task.load_data()
    split = task.dataset["default"]["test"]
    texts = {q["id"]: (q["text"], q.get("instruction", "")) for q in split["queries"]}
    relevant = {texts[qid]: sorted(docs) for qid, docs in split["relevant_docs"].items()}
    assert relevant == {("q", ""): ["d0", "d1"], ("q", "other"): ["d2"], ("r", ""): ["d0"]}


# --- malformed files are scored again / incomplete, never a traceback ---------------------------------------------


@pytest.mark.parametrize("damage", ["results-a-list", "result-a-string", "step-a-list", "digest-a-list",
                                    "checkpoints-a-number"])
def test_a_malformed_eval_json_is_scored_again_not_a_traceback(eval_cli: click.Group, tmp_path: Path, tiny_models,
                                                               damage: str) -> None:
    run = tmp_path / "run"
    for step in (1, 2):
        shutil.copytree(tiny_models.dir("bert"), run / f"step_{step:06d}")
    args = ["eval", "--model", str(run), "--tasks", f"retrieval:{_pairs(tmp_path / 'pairs.jsonl')}",
            "--no-instructions"]
    assert CliRunner().invoke(eval_cli, args).exit_code == 0
    path = run / "eval" / "eval.json"
    data = json.loads(path.read_text())
    row = data["checkpoints"][0]
    if damage == "results-a-list":
        row["results"] = [1]
    elif damage == "result-a-string":
        row["results"] = {name: "edited" for name in row["results"]}
    elif damage == "step-a-list":
        row["step"] = [1]
    elif damage == "digest-a-list":
        row["model_digest"] = [row["model_digest"]]
    else:
        data["checkpoints"] = 3
    path.write_text(json.dumps(data))
    result = CliRunner().invoke(eval_cli, args)
    assert result.exit_code == 0, result.output
    assert "malformed" in result.output and "Traceback" not in result.output
    assert [c["step"] for c in json.loads(path.read_text())["checkpoints"]] == [1, 2]


@pytest.mark.parametrize("manifest", [[], {"step": 1, "files": []}, {"step": 1, "files": {"config.json": 12}},
                                      {"step": 1, "files": {"config.json": {"xxh3": "00"}}}, "text"])
def test_a_malformed_manifest_makes_a_checkpoint_incomplete_not_a_traceback(tmp_path: Path, tiny_models,
                                                                            manifest: object) -> None:
    folder = write_checkpoint(tiny_models.dir("bert"), tmp_path / "run" / "step_000001", 1)
    (folder / INFO_FILE).write_text(json.dumps(manifest))
    assert manifest_complete(folder) is False
    assert list_checkpoints(tmp_path / "run") == []


# --- --no-resume with --steps keeps the run's other rows ----------------------------------------------------------


def test_no_resume_of_some_steps_keeps_the_rows_of_the_others(tmp_path: Path, tiny_models) -> None:
    run = tmp_path / "run"
    for step in (1, 2):
        shutil.copytree(tiny_models.dir("bert"), run / f"step_{step:06d}")
    tasks = (f"retrieval:{_pairs(tmp_path / 'pairs.jsonl')}",)
    evaluate(EvalConfig(model=str(run), tasks=tasks, instructions=False))
    result = evaluate(EvalConfig(model=str(run), tasks=tasks, instructions=False, steps=(2,), resume=False))
    assert [c.step for c in result.checkpoints] == [1, 2]
    assert [c.reused for c in result.checkpoints] == [{"local-retrieval-pairs"}, set()]  # step 2 computed again
    assert [c["step"] for c in json.loads((run / "eval" / "eval.json").read_text())["checkpoints"]] == [1, 2]
    assert (run / "eval" / "eval_curve.png").is_file()


# --- hrsa extract of a checkpoint its manifest calls incomplete ---------------------------------------------------


def test_extract_refuses_a_checkpoint_its_manifest_calls_incomplete_and_creates_nothing(tmp_path: Path,
                                                                                        tiny_models) -> None:
    """Training never resumes from it, the pipeline and `hrsa eval` refuse it: weights overwritten at the same size
    were extracted (exit 0) and stored as the step's."""
    from hrsa.extract.config import parse_extract_config
    from hrsa.extract.job import run_extraction

    damaged = write_checkpoint(tiny_models.dir("llama"), tmp_path / "run" / "step_000002", 2)
    _overwrite_weights_same_size(damaged)
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": "the quick brown fox"}])
    config = parse_extract_config({"store": str(tmp_path / "store"), "model": str(damaged), "corpus": str(corpus)})
    with pytest.raises(UserError, match="incomplete"):
        run_extraction(config)
    assert not (tmp_path / "store").exists()


def test_extract_takes_a_whole_checkpoint(tmp_path: Path, tiny_models) -> None:
    from hrsa.extract.config import parse_extract_config
    from hrsa.runtime.checkpoint_manifest import refuse_incomplete_checkpoint

    whole = write_checkpoint(tiny_models.dir("llama"), tmp_path / "run" / "step_000001", 1)
    refuse_incomplete_checkpoint(parse_extract_config({"store": str(tmp_path / "s"), "model": str(whole),
                                                       "corpus": "x.jsonl"}).model_spec())
    refuse_incomplete_checkpoint(parse_extract_config({"store": str(tmp_path / "s"), "model": str(tiny_models.dir("llama")),
                                                       "corpus": "x.jsonl"}).model_spec())  # a plain model folder


def test_training_refuses_a_backbone_checkpoint_its_manifest_calls_incomplete(tmp_path: Path, tiny_models) -> None:
    """`hrsa train --backbone` of the same checkpoint trained from the overwritten weights as from the step's."""
    from hrsa.train.config import TrainConfig
    from hrsa.train.trainer import run_training

    damaged = write_checkpoint(tiny_models.dir("llama"), tmp_path / "run" / "step_000002", 2)
    _overwrite_weights_same_size(damaged)
    data = _write_jsonl(tmp_path / "train.jsonl", [{"query": f"fox {i}", "pos": f"dog {i}", "negs": [f"cat {i}"]}
                                                   for i in range(8)])
    config = TrainConfig(backbone=str(damaged), data=data, output=tmp_path / "out", batch_size=4, negatives=1,
                         max_steps=2)
    with pytest.raises(UserError, match="calls incomplete"):
        run_training(config, progress=False)
    assert not (tmp_path / "out").exists()
