"""Edges of `hrsa eval`'s outputs and of checkpoints fed back into the store: a query with several
positives scored as several queries, malformed eval.json and hrsa_train.json as tracebacks, --no-resume dropping the
run's other rows, and `hrsa extract` of a checkpoint its manifest calls incomplete."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from hrsa.store.errors import UserError
from hrsa.train.checkpoints import INFO_FILE, STATE_FILE, file_manifest, list_checkpoints, manifest_complete
from hrsa.train.evaluate import EvalConfig, evaluate


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


def _checkpoint(source: Path, folder: Path, step: int) -> Path:
    """A checkpoint as `hrsa train` writes it: the model folder, trainer_state.pt and the manifest, written last."""
    shutil.copytree(source, folder)
    (folder / STATE_FILE).write_bytes(b"optimizer state")
    (folder / INFO_FILE).write_text(json.dumps({"step": step, "loss": 1.0, "files": file_manifest(folder)}))
    return folder


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
def test_a_malformed_eval_json_is_scored_again_not_a_traceback(cli: click.Group, tmp_path: Path, tiny_models,
                                                               damage: str) -> None:
    run = tmp_path / "run"
    for step in (1, 2):
        shutil.copytree(tiny_models.dir("bert"), run / f"step_{step:06d}")
    args = ["eval", "--model", str(run), "--tasks", f"retrieval:{_pairs(tmp_path / 'pairs.jsonl')}",
            "--no-instructions"]
    assert CliRunner().invoke(cli, args).exit_code == 0
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
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "malformed" in result.output and "Traceback" not in result.output
    assert [c["step"] for c in json.loads(path.read_text())["checkpoints"]] == [1, 2]


@pytest.mark.parametrize("manifest", [[], {"step": 1, "files": []}, {"step": 1, "files": {"config.json": 12}},
                                      {"step": 1, "files": {"config.json": {"xxh3": "00"}}}, "text"])
def test_a_malformed_manifest_makes_a_checkpoint_incomplete_not_a_traceback(tmp_path: Path, tiny_models,
                                                                            manifest: object) -> None:
    folder = _checkpoint(tiny_models.dir("bert"), tmp_path / "run" / "step_000001", 1)
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

    damaged = _checkpoint(tiny_models.dir("llama"), tmp_path / "run" / "step_000002", 2)
    _overwrite_weights_same_size(damaged)
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": "the quick brown fox"}])
    config = parse_extract_config({"store": str(tmp_path / "store"), "model": str(damaged), "corpus": str(corpus)})
    with pytest.raises(UserError, match="incomplete"):
        run_extraction(config)
    assert not (tmp_path / "store").exists()


def test_extract_takes_a_whole_checkpoint(tmp_path: Path, tiny_models) -> None:
    from hrsa.extract.config import parse_extract_config
    from hrsa.runtime.checkpoint_manifest import refuse_incomplete_checkpoint

    whole = _checkpoint(tiny_models.dir("llama"), tmp_path / "run" / "step_000001", 1)
    refuse_incomplete_checkpoint(parse_extract_config({"store": str(tmp_path / "s"), "model": str(whole),
                                                       "corpus": "x.jsonl"}).model_spec())
    refuse_incomplete_checkpoint(parse_extract_config({"store": str(tmp_path / "s"), "model": str(tiny_models.dir("llama")),
                                                       "corpus": "x.jsonl"}).model_spec())  # a plain model folder


def test_training_refuses_a_backbone_checkpoint_its_manifest_calls_incomplete(tmp_path: Path, tiny_models) -> None:
    """`hrsa train --backbone` of the same checkpoint trained from the overwritten weights as from the step's."""
    from hrsa.train.config import TrainConfig
    from hrsa.train.trainer import run_training

    damaged = _checkpoint(tiny_models.dir("llama"), tmp_path / "run" / "step_000002", 2)
    _overwrite_weights_same_size(damaged)
    data = _write_jsonl(tmp_path / "train.jsonl", [{"query": f"fox {i}", "pos": f"dog {i}", "negs": [f"cat {i}"]}
                                                   for i in range(8)])
    config = TrainConfig(backbone=str(damaged), data=data, output=tmp_path / "out", batch_size=4, negatives=1,
                         max_steps=2)
    with pytest.raises(UserError, match="calls incomplete"):
        run_training(config, progress=False)
    assert not (tmp_path / "out").exists()
