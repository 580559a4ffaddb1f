"""`hrsa train` settings and data: every mistake is one line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hrsa.cli import cli
from hrsa.store.errors import UserError
from hrsa.train.config import TrainConfig, load_train_config


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, ["train", *args])


def _one_error_line(result: Any) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hrsa: error: "), result.output
    return lines[0]


def test_missing_fields_are_named_at_once() -> None:
    line = _one_error_line(_run("--data", "x.jsonl"))
    assert "--backbone is required" in line and "--output is required" in line


@pytest.mark.parametrize("value", ["0", "-0.5"])
def test_temperature_must_be_positive(value: str) -> None:
    line = _one_error_line(_run("--backbone", "b", "--data", "d", "--output", "o", "--temperature", value))
    assert "temperature" in line and "greater than 0" in line


def test_batch_must_divide_over_workers() -> None:
    line = _one_error_line(_run("--backbone", "b", "--data", "d", "--output", "o", "--workers", "3",
                                "--batch-size", "8"))
    assert "divisible by --workers" in line


def test_unknown_yaml_key_and_flag_precedence(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("backbone: b\ndata: d.jsonl\noutput: out\nbatch_size: 4\nlearning_rate: 1\n")
    with pytest.raises(UserError, match="learning_rate"):
        load_train_config(path, {})
    path.write_text("backbone: b\ndata: d.jsonl\noutput: out\nbatch_size: 4\n")
    config = load_train_config(path, {"batch_size": 8, "lr": None})
    assert config.batch_size == 8 and config.lr == TrainConfig.model_fields["lr"].default
    assert config.temperature == 0.02 and config.attention == "bidirectional"


def _write(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize(("record", "message"), [
    ({"query": "q", "negs": ["n"]}, "no 'pos' on line 2"),
    ('{"query": "q", ', "invalid JSON on line 2"),
    ({"query": "q", "pos": "p", "negs": "n"}, "'negs' to be a list of texts.*line 2"),
    ({"query": "q", "pos": "p"}, "no 'negs' on line 2"),
    ({"query": "q", "pos": "p", "negs": [], "instruction": 1}, "'instruction' to be text.*line 2"),
    ({"query": "q", "pos": "p", "negs": []}, "at least 1 negatives.*line 2"),
])
def test_bad_records_name_their_line(tmp_path: Path, record: Any, message: str) -> None:
    from hrsa.train.data import TrainDataError, load_training_records

    path = _write(tmp_path / "d.jsonl", [{"query": "q", "pos": "p", "negs": ["n"]}, record])
    with pytest.raises(TrainDataError, match=message):
        load_training_records(path, negatives=1)


def test_bad_data_is_one_line_before_any_worker_starts(tiny_models: Any, tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [{"query": "q", "pos": "p"}])
    line = _one_error_line(_run("--backbone", str(tiny_models.dir("llama")), "--data", str(path),
                                "--output", str(tmp_path / "out")))
    assert "line 1" in line and not (tmp_path / "out").exists()


def test_batches_are_deterministic_and_split_into_equal_shards(tmp_path: Path) -> None:
    from hrsa.train.data import global_batch, load_training_records

    path = _write(tmp_path / "d.jsonl", [{"query": f"q{i}", "pos": f"p{i}", "negs": [f"n{i}a", f"n{i}b", f"n{i}c"]}
                                         for i in range(10)])
    records = load_training_records(path, negatives=2)
    batches = [global_batch(records, s, batch_size=4, negatives=2, seed=3, instruction="Find") for s in range(5)]
    assert batches[2] == global_batch(records, 2, batch_size=4, negatives=2, seed=3, instruction="Find")
    first_epoch = [q for b in batches[:2] for q in b.queries]  # 10 records: two batches of 4, two left over
    assert len(set(first_epoch)) == 8
    b = batches[0]
    assert b.queries[0].startswith("Instruct: Find\nQuery: q")
    i = b.queries[0].rsplit("q", 1)[1]
    assert b.docs[0] == f"p{i}" and all(d.startswith(f"n{i}") for d in b.docs[1:3])
    halves = [b.shard(r, 2) for r in range(2)]
    assert halves[0].queries + halves[1].queries == b.queries and halves[0].docs + halves[1].docs == b.docs


def test_a_records_own_instruction_wins_over_the_run_wide_one(tmp_path: Path) -> None:
    """The run's instruction is for records without their own; a record's own is never overridden."""
    from hrsa.train.data import global_batch, load_training_records

    path = _write(tmp_path / "d.jsonl", [{"query": "q0", "pos": "p0", "negs": ["n0"], "instruction": "Own"},
                                         {"query": "q1", "pos": "p1", "negs": ["n1"]}])
    records = load_training_records(path, negatives=1, batch_size=2)
    batch = global_batch(records, 0, batch_size=2, negatives=1, seed=0, instruction="Find")
    assert sorted(batch.queries) == ["Instruct: Find\nQuery: q1", "Instruct: Own\nQuery: q0"]
    bare = global_batch(records, 0, batch_size=2, negatives=1, seed=0)
    assert sorted(bare.queries) == ["Instruct: Own\nQuery: q0", "q1"]


def test_each_querys_negatives_are_its_records_own_and_never_repeated(tmp_path: Path) -> None:
    """k negatives drawn without replacement: asking for all of a record's negatives gives each of them once (a
    negative twice in a group reweights it in the loss)."""
    from hrsa.train.data import global_batch, load_training_records

    path = _write(tmp_path / "d.jsonl", [{"query": f"q{i}", "pos": f"p{i}", "negs": [f"n{i}{c}" for c in "abcd"]}
                                         for i in range(6)])
    records = load_training_records(path, negatives=4)
    for step in range(12):
        batch = global_batch(records, step, batch_size=3, negatives=4, seed=step)
        for query, start in zip(batch.queries, range(0, len(batch.docs), 5)):
            i = query[1:]
            assert batch.docs[start] == f"p{i}"
            assert sorted(batch.docs[start + 1:start + 5]) == [f"n{i}{c}" for c in "abcd"]


@pytest.mark.parametrize(("n_records", "batch_size"), [(10, 4), (7, 7), (9, 2), (5, 3)])
def test_no_batch_holds_a_record_twice(n_records: int, batch_size: int) -> None:
    """A record twice in a batch is its own in-batch negative; epochs cut N // B batches, never across epochs."""
    from hrsa.train.data import batch_indices

    per_epoch = n_records // batch_size
    batches = [batch_indices(s, n_records=n_records, batch_size=batch_size, seed=1) for s in range(6 * per_epoch)]
    assert all(len(set(b.tolist())) == batch_size for b in batches)
    for epoch in range(6):
        seen = [i for b in batches[epoch * per_epoch:(epoch + 1) * per_epoch] for i in b.tolist()]
        assert len(set(seen)) == len(seen) == per_epoch * batch_size
    left_over = {e: set(range(n_records)) - {i for b in batches[e * per_epoch:(e + 1) * per_epoch] for i in b.tolist()}
                 for e in range(6)}
    assert n_records % batch_size == 0 or len({frozenset(v) for v in left_over.values()}) > 1  # not always the same ones


def test_a_batch_larger_than_the_records_is_one_line(tiny_models: Any, tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [{"query": f"q{i}", "pos": f"p{i}", "negs": ["n"]} for i in range(5)])
    line = _one_error_line(_run("--backbone", str(tiny_models.dir("llama")), "--data", str(path),
                                "--output", str(tmp_path / "out"), "--batch-size", "8"))
    assert "at least --batch-size (8) training records" in line and "Got 5" in line
    assert not (tmp_path / "out").exists()


def test_too_few_negatives_name_the_flag(tiny_models: Any, tmp_path: Path) -> None:
    """`hrsa train`'s messages name its flags (a pipeline's name its YAML keys: tests/cluster/test_pipeline.py)."""
    path = _write(tmp_path / "d.jsonl", [{"query": f"q{i}", "pos": f"p{i}", "negs": ["n"]} for i in range(8)])
    line = _one_error_line(_run("--backbone", str(tiny_models.dir("llama")), "--data", str(path),
                                "--output", str(tmp_path / "out"), "--negatives", "3"))
    assert "Expected at least 3 negatives per record (--negatives). Got 1 on line 1" in line
    assert "Lower --negatives to 1 (every record has that many), or mine more negatives." in line
    assert not (tmp_path / "out").exists()


def test_negatives_mined_short_for_some_queries_name_how_many_and_the_largest_count_every_record_has(
        tiny_models: Any, tmp_path: Path) -> None:
    """`mine-negatives --k 7` leaves a query short when fewer candidates score under the positive; `train --negatives 7`
    named only the first short line, so a user lowered --negatives one refusal at a time."""
    counts = [7, 7, 4, 7, 2, 7, 7, 5]
    path = _write(tmp_path / "d.jsonl", [{"query": f"q{i}", "pos": f"p{i}", "negs": [f"n{j}" for j in range(n)]}
                                         for i, n in enumerate(counts)])
    line = _one_error_line(_run("--backbone", str(tiny_models.dir("llama")), "--data", str(path),
                                "--output", str(tmp_path / "out"), "--negatives", "7"))
    assert "Got 4 on line 3" in line and "3 of 8 records have fewer than 7" in line, line
    assert "Lower --negatives to 2 (every record has that many), or mine more negatives." in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flag", "expected"), [("none", None), ("None", None), ("0.5", 0.5), (None, 2.0)])
def test_max_grad_norm_none_means_no_clipping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str | None,
                                              expected: float | None) -> None:
    import click

    seen = []

    def fake_training(config: TrainConfig, **kwargs: Any) -> None:
        seen.append(config)
        raise click.exceptions.Exit(0)

    monkeypatch.setattr("hrsa.train.trainer.run_training", fake_training)
    settings = tmp_path / "t.yaml"
    settings.write_text("backbone: b\ndata: d.jsonl\noutput: out\nmax_grad_norm: 2.0\n")
    result = _run("--config", str(settings), *(["--max-grad-norm", flag] if flag else []))
    assert result.exit_code == 0, result.output
    assert seen[0].max_grad_norm == expected  # the flag wins over the file, "none" included


def test_max_grad_norm_must_be_a_number_or_none() -> None:
    result = _run("--backbone", "b", "--data", "d", "--output", "o", "--max-grad-norm", "nope")
    assert result.exit_code == 2 and "'--max-grad-norm': expected a number or 'none', got 'nope'" in result.output


@pytest.mark.parametrize("under", ["", "models/run", "models/m/run"])
def test_an_output_inside_an_hrsa_store_is_refused_and_the_store_left_alone(tmp_path: Path, under: str) -> None:
    """A run folder under STORE/models/ was listed by `store ls` as a half-created model, whose suggested repair
    (`hrsa store rm`) deletes the run's checkpoints; checkpoints among a store's objects are the store's damage."""
    from hrsa.store import ActivationStore
    from hrsa.store.testing import fill_model, new_model

    store = ActivationStore.open(str(tmp_path / "store"), mode="a")
    new_model(store, "m")
    fill_model(store, "m")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    output = tmp_path / "store" / under if under else tmp_path / "store"
    line = _one_error_line(_run("--backbone", "b", "--data", "d", "--output", str(output)))
    assert "--output" in line and "inside the hrsa store" in line, line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
