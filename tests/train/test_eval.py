"""``hrsa eval``: local mteb tasks from files, checkpoint curves, task specs and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from hrsa.train.eval_tasks import parse_task_spec, split_task_list
from hrsa.train.evaluate import EvalConfig, eval_targets, evaluate


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _spam_pairs(shared_data: Path, n: int) -> list[dict]:
    """query = a mail's subject line, pos = the start of its body; distinct subjects only."""
    records, seen = [], set()
    for line in (shared_data / "spam-assassin" / "spam-assassin.jsonl").open():
        subject, _, body = json.loads(line)["text"].partition("\n\n")
        subject = subject.removeprefix("Re: ").strip()
        if len(subject) > 12 and len(body) > 100 and not {subject.lower(), body[:250]} & seen:
            seen |= {subject.lower(), body[:250]}
            records.append({"query": subject, "pos": body[:250]})
        if len(records) == n:
            break
    return records


def _spam_labels(shared_data: Path, per_label: int) -> list[dict]:
    mails = [json.loads(line) for line in (shared_data / "spam-assassin" / "spam-assassin.jsonl").open()]
    rng = np.random.default_rng(0)
    picked = []
    for label in ("ham", "spam"):
        group = [m for m in mails if m["label"] == label]
        picked += [{"body": group[i]["text"][:250], "kind": label} for i in rng.choice(len(group), per_label, replace=False)]
    return picked


def _ndcg10_one_relevant(q: np.ndarray, d: np.ndarray, relevant: list[int]) -> float:
    """Independent nDCG@10 with one relevant document a query: 1/log2(rank+1) inside the top 10, else 0."""
    scores = q.astype(np.float64) @ d.astype(np.float64).T
    ranks = (scores > scores[np.arange(len(q)), relevant][:, None]).sum(axis=1) + 1
    return float(np.mean(np.where(ranks <= 10, 1.0 / np.log2(ranks + 1), 0.0)))


def _no_constants(name: str) -> None:
    raise AssertionError(f"eval.json holds {name}, which strict JSON readers (jq, JavaScript, Go) refuse")


@pytest.mark.data
@pytest.mark.real_model
def test_minilm_local_tasks_through_cli(eval_cli: click.Group, tmp_path: Path, shared_data: Path, tiny_models) -> None:
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", _spam_pairs(shared_data, 60))
    labels = _write_jsonl(tmp_path / "labels.jsonl", _spam_labels(shared_data, 100))
    out = tmp_path / "eval-minilm"
    args = ["eval", "--model", "packaged:all-minilm-l6-v2", "--tasks", f"retrieval:{pairs}",
            "--tasks", f"classification:{labels}:body:kind", "--no-instructions", "--max-length", "64", "--out", str(out)]
    result = CliRunner().invoke(eval_cli, args)
    assert result.exit_code == 0, result.output
    # hrsa's own bars say which checkpoint and how many texts: transformers' and mteb's tqdm bars broke through them
    assert "Loading weights" not in result.stderr and "Searching corpus chunks" not in result.stderr, result.stderr
    data = json.loads((out / "eval.json").read_text(), parse_constant=_no_constants)  # strict JSON: no NaN token
    assert data["schema"] == "hrsa.eval/1" and len(data["checkpoints"]) == 1
    scores = data["checkpoints"][0]["results"]
    retrieval, classification = scores["local-retrieval-pairs"], scores["local-classification-labels"]
    assert retrieval["main_score_name"] == "ndcg_at_10" and "recall_at_10" in retrieval["scores"]["test"][0]
    assert classification["main_score_name"] == "accuracy"
    chance = 10 / 60  # even recall@10 of a random ranking; nDCG@10 is lower still
    assert retrieval["main_score"] > 0.5 > 2 * chance
    assert classification["main_score"] > 0.7  # the two labels are balanced: 0.5 is chance (MiniLM: 0.83)
    assert not (Path.home() / ".cache" / "mteb" / "results" / "hrsa__packaged-all-minilm-l6-v2").exists()
    assert (out / "mteb-results").is_dir()

    # a randomly initialised tiny model is far worse, and mteb's nDCG@10 agrees with an independent one
    from hrsa.train.encode import TextEncoder

    tiny = evaluate(EvalConfig(model=str(tiny_models.dir("bert")), tasks=(f"retrieval:{pairs}",), instructions=False,
                               max_length=64, out=tmp_path / "eval-tiny"))
    tiny_score = tiny.main_score("local-retrieval-pairs")
    assert retrieval["main_score"] > tiny_score + 0.2
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    encoder = TextEncoder.load(str(tiny_models.dir("bert")), device="cpu")
    q = encoder.encode([r["query"] for r in records], max_length=64)
    d = encoder.encode([r["pos"] for r in records], max_length=64)
    assert tiny_score == pytest.approx(_ndcg10_one_relevant(q, d, list(range(len(records)))), abs=2e-3)


def test_checkpoint_series_gives_curve(tmp_path: Path, tiny_models) -> None:
    run = tmp_path / "run"
    for step in (1, 2):
        shutil.copytree(tiny_models.dir("bert"), run / f"step_{step:06d}")
    pairs = _write_jsonl(tmp_path / "toy.jsonl", [
        {"query": f"the quick fox {i}", "pos": f"jumps over the lazy dog {i} " * 3, "negs": [f"w1 w2 {i}"]}
        for i in range(12)])
    labelled = _write_jsonl(tmp_path / "lab.jsonl", [{"text": f"fox {i}" if i % 2 else f"dog w{i}", "label": i % 2}
                                                     for i in range(16)])
    config = EvalConfig(model=str(run), tasks=(f"retrieval:{pairs}", f"classification:{labelled}"), instructions=False)
    result = evaluate(config)
    assert result.json_path == run / "eval" / "eval.json"
    data = json.loads(result.json_path.read_text())
    assert [c["step"] for c in data["checkpoints"]] == [1, 2]
    assert [c["name"] for c in data["checkpoints"]] == ["step_000001", "step_000002"]
    first, second = (c["results"]["local-retrieval-toy"]["main_score"] for c in data["checkpoints"])
    assert first == second  # the same weights
    assert result.figure_path is not None and result.figure_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    only = eval_targets(str(run), steps=(2,))
    assert [c.step for c in only] == [2]


def test_saved_scores_are_reused_by_content_not_by_path(tmp_path: Path, tiny_models, monkeypatch) -> None:
    """Scores are keyed by the model's files and the task file's content: a moved run reuses them all; new weights
    at the same path, or an edited task file under the same spec text, are scored again."""
    import torch
    from safetensors.torch import load_file, save_file

    from hrsa.train.encode import TextEncoder

    for step in (1, 2):
        shutil.copytree(tiny_models.dir("bert"), tmp_path / "run" / f"step_{step:06d}")
    pairs = _write_jsonl(tmp_path / "toy.jsonl", [{"query": f"fox {i}", "pos": f"the lazy dog {i} " * 3} for i in range(8)])
    out = tmp_path / "eval"

    loads: list[str] = []
    real_load = TextEncoder.load.__func__
    monkeypatch.setattr(TextEncoder, "load", classmethod(lambda cls, model, **kw: loads.append(Path(model).name)
                                                         or real_load(cls, model, **kw)))

    def scores(run: Path) -> list[float]:
        result = evaluate(EvalConfig(model=str(run), tasks=(f"retrieval:{pairs}",), instructions=False, out=out))
        return [result.main_score("local-retrieval-toy", i) for i in range(2)]

    first = scores(tmp_path / "run")
    assert loads == ["step_000001", "step_000002"]
    shutil.move(tmp_path / "run", tmp_path / "moved")  # the same files elsewhere: nothing to compute
    assert scores(tmp_path / "moved") == first and len(loads) == 2
    weights_file = tmp_path / "moved" / "step_000002" / "model.safetensors"  # retrained in place: other weights
    weights = {name: value + 0.05 * torch.randn_like(value) for name, value in load_file(weights_file).items()}
    save_file(weights, weights_file, metadata={"format": "pt"})
    retrained = scores(tmp_path / "moved")
    assert loads[2:] == ["step_000002"] and retrained[0] == first[0] and retrained[1] != first[1]
    _write_jsonl(pairs, [{"query": f"fox {i}", "pos": f"w1 w2 {i} " * 3} for i in range(8)])  # same path, new task
    scores(tmp_path / "moved")
    assert loads[3:] == ["step_000001", "step_000002"]


def test_encoder_formats_queries_not_documents() -> None:
    from hrsa.train.mteb_adapter import HrsaMtebEncoder, local_metadata
    from mteb.types import PromptType

    class Recorder:
        dim = 3

        def __init__(self) -> None:
            self.seen: list[list[str]] = []

        def encode(self, texts, **kwargs):
            self.seen.append(list(texts))
            return np.zeros((len(texts), 3), dtype=np.float32)

    recorder = Recorder()
    wrapper = HrsaMtebEncoder(recorder, name="hrsa/test")
    meta = local_metadata("LocalX", "retrieval", Path("x.jsonl"), prompt="Find the mail")
    batches = [{"text": ["a", "b"]}, {"text": ["c"]}]
    wrapper.encode(batches, task_metadata=meta, hf_split="test", hf_subset="default", prompt_type=PromptType.query)
    wrapper.encode(batches, task_metadata=meta, hf_split="test", hf_subset="default", prompt_type=PromptType.document)
    own = [{"text": ["a mine"], "query": ["a"], "instruction": ["mine"]}]
    wrapper.encode(own, task_metadata=meta, hf_split="test", hf_subset="default", prompt_type=PromptType.query)
    assert recorder.seen == [["Instruct: Find the mail\nQuery: a", "Instruct: Find the mail\nQuery: b",
                              "Instruct: Find the mail\nQuery: c"], ["a", "b", "c"], ["Instruct: mine\nQuery: a"]]
    plain = HrsaMtebEncoder(recorder, name="hrsa/test", use_instructions=False)
    plain.encode(batches, task_metadata=meta, hf_split="test", hf_subset="default", prompt_type=PromptType.query)
    assert recorder.seen[-1] == ["a", "b", "c"]


def test_task_specs(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": 1}])
    assert split_task_list("SciFact, MTEB(eng, v2),retrieval:a.jsonl") == ["SciFact", "MTEB(eng, v2)", "retrieval:a.jsonl"]
    spec = parse_task_spec(f"classification:{f}:body:kind")
    assert (spec.kind, spec.path, spec.text_field, spec.label_field) == ("classification", f, "body", "kind")
    assert parse_task_spec(f"classification:{f}").text_field == "text"
    assert parse_task_spec("mteb:SciFact").name == parse_task_spec("SciFact").name == "SciFact"
    assert EvalConfig(model="m", tasks="SciFact,MTEB(eng, v2)").tasks == ("SciFact", "MTEB(eng, v2)")


@pytest.mark.parametrize(("tasks", "message"), [
    ("SciFact", "HF_HUB_OFFLINE"),
    ("NoSuchTaskAnywhere", "Expected an MTEB task or benchmark name"),
    ("retrieval:missing.jsonl", "no file at missing.jsonl"),
])
def test_cli_errors_are_one_line(eval_cli: click.Group, tmp_path: Path, monkeypatch, tasks: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    result = CliRunner().invoke(eval_cli, ["eval", "--model", "packaged:all-minilm-l6-v2", "--tasks", tasks])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_missing_field_names_the_line(eval_cli: click.Group, tmp_path: Path, tiny_models) -> None:
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"query": "a", "pos": "b"}, {"query": "c", "positive": "d"}])
    result = CliRunner().invoke(eval_cli, ["eval", "--model", str(tiny_models.dir("bert")), "--tasks", f"retrieval:{bad}"])
    assert result.exit_code == 2 and "line 2" in result.output and "'pos'" in result.output
    labels = _write_jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": 0}, {"text": "b"}])
    result = CliRunner().invoke(eval_cli, ["eval", "--model", str(tiny_models.dir("bert")), "--tasks", f"classification:{labels}"])
    assert result.exit_code == 2 and "record 2" in result.output
