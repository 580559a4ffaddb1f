"""What ``hrsa eval`` keys its scores by is what it loaded: an S3 checkpoint its manifest does not vouch for is refused
as a local one is, files that change while the model loads are refused, an --out that would become part of the model
is refused, and a hub model is known by the snapshot its cache resolves to. And ``hrsa train --output`` of a checkpoint
folder is refused (it would train a run nested inside the checkpoint). An s3:// training run is evaluated as a local one
(every complete checkpoint in step order, incomplete ones skipped with the same note, --steps, scores reused by the
checkpoints' content), and a URL that is neither a model nor a run is one line naming it."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hrsa.train.checkpoints import INFO_FILE, file_manifest
from hrsa.train.recipe import RECIPE_FILE
from hrsa.train.testing import write_checkpoint


def _pairs(path: Path, n: int = 8) -> Path:
    path.write_text("".join(json.dumps({"query": f"fox {i}", "pos": f"the lazy dog {i} " * 3}) + "\n" for i in range(n)))
    return path


def _retrained(folder: Path) -> None:
    """Other weights in a checkpoint folder (a run trained again into the same output), and its manifest anew."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    (folder / INFO_FILE).unlink()
    (folder / INFO_FILE).write_text(json.dumps({"step": 2, "loss": 1.0, "files": file_manifest(folder)}))


def _upload(local: Path, url: str) -> str:
    """The files of a local folder, below ``url`` (the manifests last, as the trainer writes them)."""
    from hrsa.runtime.locations import parse_location

    remote = parse_location(url)
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == INFO_FILE)
    for file in files:
        remote.child(file.relative_to(local).as_posix()).write(file.read_bytes())
    return remote.url


def _local_run(tmp_path: Path, tiny_models) -> Path:
    """A run of hrsa train: steps 1 and 2 complete, step 3 still being copied (no manifest yet), and its recipe."""
    run = tmp_path / "run"
    for step in (1, 2):
        write_checkpoint(tiny_models.dir("bert"), run / f"step_{step:06d}", step)
    shutil.copytree(tiny_models.dir("bert"), run / "step_000003")
    (run / RECIPE_FILE).write_text("{}")
    return run


@pytest.fixture
def s3(s3_endpoint: str, tmp_path: Path, monkeypatch) -> str:
    """A fresh prefix of the test bucket, with the environment a run's reader has."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("HRSA_CACHE", str(tmp_path / "cache"))
    return f"s3://hrsa-test/runs-{uuid.uuid4().hex[:8]}"


def _other_weights_same_size(weights_file: Path) -> bytes:
    """The bytes of other weights of the same size (a save over the file, as a training run writes one)."""
    import torch
    from safetensors.torch import load, save

    data = weights_file.read_bytes()
    changed = save({k: v + 0.05 * torch.randn_like(v) for k, v in load(data).items()}, metadata={"format": "pt"})
    assert len(changed) == len(data)
    return changed


def _one_line_exit_2(result) -> str:
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def _one_error_line(result) -> str:
    """The one line of the refusal (exit 2), whatever progress bars transformers drew while the model loaded."""
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("hrsa:")]
    return line


def _eval(eval_cli: click.Group, model: str, pairs: Path, out: Path, *extra: str):
    args = ["eval", "--model", model, "--tasks", f"retrieval:{pairs}", "--no-instructions", "--out", str(out), *extra]
    return CliRunner().invoke(eval_cli, args)


# --- 1. an S3 checkpoint is checked against its manifest -------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["short", "same_size"])
def test_an_s3_checkpoint_its_manifest_does_not_vouch_for_is_refused(eval_cli: click.Group, tmp_path: Path, tiny_models,
                                                                    s3_endpoint: str, monkeypatch, damage: str) -> None:
    """A local checkpoint its manifest calls incomplete is refused; the same checkpoint on S3 was scored (exit 0) and
    its scores written as the step's. Weights cut short show in the listing's sizes; weights overwritten at the same
    size only in the digests of the copy eval loads."""
    from hrsa.runtime.locations import parse_location

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("HRSA_CACHE", str(tmp_path / "cache"))
    local = write_checkpoint(tiny_models.dir("bert"), tmp_path / "ckpt", 2)
    remote = parse_location(f"s3://hrsa-test/runs-{uuid.uuid4().hex[:8]}/step_000002")
    _upload(local, remote.url)
    weights = (local / "model.safetensors").read_bytes()
    remote.child("model.safetensors").write(weights[: len(weights) // 2] if damage == "short"
                                            else _other_weights_same_size(local / "model.safetensors"))
    out = tmp_path / "ev"
    output = _one_line_exit_2(_eval(eval_cli, remote.url, _pairs(tmp_path / "pairs.jsonl"), out))
    assert remote.url in output and "incomplete" in output and "Wait for the copy" in output
    assert not out.exists()


@pytest.mark.integration
def test_a_whole_s3_checkpoint_is_scored(eval_cli: click.Group, tmp_path: Path, tiny_models, s3_endpoint: str,
                                         monkeypatch) -> None:
    from hrsa.runtime.locations import parse_location

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("HRSA_CACHE", str(tmp_path / "cache"))
    local = write_checkpoint(tiny_models.dir("bert"), tmp_path / "ckpt", 2)
    remote = parse_location(f"s3://hrsa-test/runs-{uuid.uuid4().hex[:8]}/step_000002")
    _upload(local, remote.url)
    result = _eval(eval_cli, remote.url, _pairs(tmp_path / "pairs.jsonl"), tmp_path / "ev")
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "ev" / "eval.json").read_text())["checkpoints"]) == 1


# --- 2. files changed between the digest and the load ---------------------------------------------------------------


def test_files_changed_while_the_model_loads_are_refused_and_not_written(eval_cli: click.Group, tmp_path: Path,
                                                                         tiny_models, monkeypatch) -> None:
    """eval digested the folder, then loaded it: weights written in between (a training run saving into it) were
    scored under the digest of the weights before."""
    from hrsa.train.encode import TextEncoder

    model = tmp_path / "model"
    shutil.copytree(tiny_models.dir("bert"), model)
    real_load = TextEncoder.load.__func__

    def load_after_a_save(cls, name, **kwargs):  # the save lands after the digest, before the real load reads it
        (model / "model.safetensors").write_bytes(_other_weights_same_size(model / "model.safetensors"))
        return real_load(cls, name, **kwargs)

    monkeypatch.setattr(TextEncoder, "load", classmethod(load_after_a_save))
    out = tmp_path / "ev"
    output = _one_error_line(_eval(eval_cli, str(model), _pairs(tmp_path / "pairs.jsonl"), out))
    assert str(model) in output and "changed" in output
    assert not out.exists()


def test_a_model_that_stays_put_while_it_loads_is_scored(eval_cli: click.Group, tmp_path: Path, tiny_models) -> None:
    result = _eval(eval_cli, str(tiny_models.dir("bert")), _pairs(tmp_path / "pairs.jsonl"), tmp_path / "ev")
    assert result.exit_code == 0, result.output


# --- 3. hrsa train --output of a checkpoint folder -------------------------------------------------------------------


@pytest.mark.parametrize("what", ["checkpoint", "model"])
def test_training_into_a_model_folder_is_refused_and_creates_nothing(verb_cli, tmp_path: Path, tiny_models,
                                                                     monkeypatch, what: str) -> None:
    """It trained a run nested inside the checkpoint (step_000001/step_000002...), its files mixed with the model's."""
    from hrsa.train.cli import train

    # never Ray: the refusal comes before it, and without it the test fails here rather than starting a cluster
    monkeypatch.setattr("hrsa.train.trainer.place_training", lambda config: pytest.fail("reached Ray"))
    folder = tmp_path / "run" / "step_000002"
    if what == "checkpoint":
        write_checkpoint(tiny_models.dir("bert"), folder, 2)
    else:
        shutil.copytree(tiny_models.dir("bert"), folder)
    before = sorted(p.name for p in folder.iterdir())
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"query": f"fox {i}", "pos": f"dog {i}", "negs": [f"cat {i}"]}) + "\n"
                            for i in range(8)))
    args = ["train", "--backbone", str(tiny_models.dir("bert")), "--data", str(data), "--output", str(folder),
            "--batch-size", "4", "--negatives", "1", "--max-steps", "2"]
    output = _one_line_exit_2(CliRunner().invoke(verb_cli(train), args))
    assert str(folder) in output and "--backbone" in output
    assert sorted(p.name for p in folder.iterdir()) == before


# --- 4. --out inside the model evaluated -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["model", "checkpoint_of_the_run"])
def test_an_out_that_would_become_part_of_the_model_is_refused(eval_cli: click.Group, tmp_path: Path, tiny_models,
                                                               where: str) -> None:
    """eval.json and eval_curve.png at a model folder's top level are files of the model by its digest: the next
    eval did not know it, and its scores were never reused (nor an extraction's identity kept)."""
    from hrsa.extract.identity import model_digest

    if where == "model":
        model = out = tmp_path / "model"
        shutil.copytree(tiny_models.dir("bert"), model)
    else:
        model = tmp_path / "run"
        for step in (1, 2):
            write_checkpoint(tiny_models.dir("bert"), model / f"step_{step:06d}", step)
        out = model / "step_000001"
    before, digest = sorted(p.name for p in out.iterdir()), model_digest(str(out))
    output = _one_line_exit_2(_eval(eval_cli, str(model), _pairs(tmp_path / "pairs.jsonl"), out))
    assert str(out) in output and "--out" in output
    assert sorted(p.name for p in out.iterdir()) == before and model_digest(str(out)) == digest

    # below the model folder (its default <model>/eval), the model's files stay as they are
    result = _eval(eval_cli, str(model), _pairs(tmp_path / "pairs.jsonl"), out / "results")
    assert result.exit_code == 0, result.output
    assert model_digest(str(out)) == digest


# --- 5. a hub model without a revision is known by its cached snapshot -----------------------------------------------


def _snapshot(cache: Path, repo: str, commit: str, source: Path) -> None:
    """A model in the Hugging Face cache as huggingface_hub lays it out: snapshots/<commit>/, refs/main naming it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)


def test_a_hub_model_that_moved_on_is_scored_again(tmp_path: Path, tiny_models, monkeypatch) -> None:
    """Keyed by its id alone, `org/name` reused the scores of the snapshot before as the new one's."""
    from hrsa.train.evaluate import EvalConfig, evaluate

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    _snapshot(cache, "hrsa-test/tiny", "a" * 40, tiny_models.dir("bert"))
    config = EvalConfig(model="hrsa-test/tiny", tasks=(f"retrieval:{_pairs(tmp_path / 'pairs.jsonl')}",),
                        instructions=False, out=tmp_path / "ev")
    first = evaluate(config)
    assert first.checkpoints[0].reused == set()
    assert evaluate(config).checkpoints[0].reused == {"local-retrieval-pairs"}  # the same snapshot: reused

    other = tmp_path / "other"
    shutil.copytree(tiny_models.dir("bert"), other)
    (other / "model.safetensors").write_bytes(_other_weights_same_size(other / "model.safetensors"))
    _snapshot(cache, "hrsa-test/tiny", "b" * 40, other)  # refs/main now names the new commit
    again = evaluate(config)
    assert again.checkpoints[0].reused == set()
    assert again.checkpoints[0].model_digest != first.checkpoints[0].model_digest


def test_a_hub_model_the_load_brings_up_to_date_is_scored_anew_not_refused(tmp_path: Path, tiny_models,
                                                                           monkeypatch) -> None:
    """Online, a load of `org/name` downloads the hub's new commit and moves refs/main: the digest after the load is
    not the one before. That is the load bringing the model up to date, not files changing under it: refused, every
    evaluation after a hub release failed once. It is scored anew, every task, under the digest of what loaded."""
    from hrsa.train.encode import TextEncoder
    from hrsa.train.evaluate import EvalConfig, evaluate

    cache = tmp_path / "hub"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    _snapshot(cache, "hrsa-test/tiny", "a" * 40, tiny_models.dir("bert"))
    config = EvalConfig(model="hrsa-test/tiny", tasks=(f"retrieval:{_pairs(tmp_path / 'pairs.jsonl')}",),
                        instructions=False, out=tmp_path / "ev")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    first = evaluate(config)
    other = tmp_path / "other"
    shutil.copytree(tiny_models.dir("bert"), other)
    (other / "model.safetensors").write_bytes(_other_weights_same_size(other / "model.safetensors"))
    real_load = TextEncoder.load.__func__

    def load_downloading_the_new_commit(cls, name, **kwargs):  # what an online load does when the hub moved on
        _snapshot(cache, "hrsa-test/tiny", "b" * 40, other)
        return real_load(cls, name, **kwargs)

    monkeypatch.setattr(TextEncoder, "load", classmethod(load_downloading_the_new_commit))
    config = config.model_copy(update={"tasks": (*config.tasks, f"retrieval:{_pairs(tmp_path / 'more.jsonl', 6)}")})
    again = evaluate(config)
    row = again.checkpoints[0]
    assert row.reused == set() and row.model_digest not in (None, first.checkpoints[0].model_digest)


def test_a_hub_model_is_keyed_by_the_commit_its_revision_resolves_to(tmp_path: Path, tiny_models, monkeypatch) -> None:
    """Not cached yet: no key (nothing earlier is reused; the load's snapshot keys its scores). A pinned commit keeps
    its key when main moves on; main's key follows it."""
    from hrsa.extract.identity import model_digest

    cache = tmp_path / "hub"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert model_digest("hrsa-test/tiny") is None
    _snapshot(cache, "hrsa-test/tiny", "a" * 40, tiny_models.dir("bert"))
    main, pinned = model_digest("hrsa-test/tiny"), model_digest(f"hrsa-test/tiny@{'a' * 40}")
    assert main is not None and pinned is not None
    _snapshot(cache, "hrsa-test/tiny", "b" * 40, tiny_models.dir("bert"))
    assert model_digest(f"hrsa-test/tiny@{'a' * 40}") == pinned
    assert model_digest("hrsa-test/tiny") not in (None, main)


# --- 6. a training run on S3 ----------------------------------------------------------------------------------------


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "eval.json").read_text())["checkpoints"]


@pytest.mark.integration
def test_an_s3_run_is_evaluated_as_a_local_run_is(eval_cli: click.Group, tmp_path: Path, tiny_models, s3: str) -> None:
    """It was taken as one model and refused ("Expected a model folder holding config.json")."""
    local = _local_run(tmp_path, tiny_models)
    run = _upload(local, f"{s3}/run")
    pairs = _pairs(tmp_path / "pairs.jsonl")

    result = _eval(eval_cli, run, pairs, tmp_path / "remote")
    assert result.exit_code == 0, result.output
    assert (f"skipped step_000003: {run}/step_000003 is incomplete: it has no {INFO_FILE}, which hrsa train writes last"
            in result.output)
    remote_rows = _rows(tmp_path / "remote")
    assert [(r["step"], r["name"], r["model"]) for r in remote_rows] == [
        (1, "step_000001", f"{run}/step_000001"), (2, "step_000002", f"{run}/step_000002")]
    assert (tmp_path / "remote" / "eval_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same shape and scores as the run evaluated where it was trained
    assert _eval(eval_cli, str(local), pairs, tmp_path / "local").exit_code == 0
    local_rows = _rows(tmp_path / "local")
    assert [sorted(r) for r in remote_rows] == [sorted(r) for r in local_rows]
    assert [r["results"] for r in remote_rows] == [r["results"] for r in local_rows]


@pytest.mark.integration
def test_steps_of_an_s3_run(eval_cli: click.Group, tmp_path: Path, tiny_models, s3: str) -> None:
    run = _upload(_local_run(tmp_path, tiny_models), f"{s3}/run")
    pairs = _pairs(tmp_path / "pairs.jsonl")
    result = _eval(eval_cli, run, pairs, tmp_path / "ev", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in _rows(tmp_path / "ev")] == [2]

    # an incomplete step asked for, or one the run does not have: one line, nothing written
    out = tmp_path / "none"
    line = _one_line_exit_2(_eval(eval_cli, run, pairs, out, "--steps", "3"))
    assert f"Got {run}/step_000003 is incomplete: it has no {INFO_FILE}" in line
    assert "Got none for [7]" in _one_line_exit_2(_eval(eval_cli, run, pairs, out, "--steps", "7"))
    assert not out.exists()


@pytest.mark.integration
def test_an_s3_checkpoint_overwritten_at_the_same_size_is_skipped_as_a_local_one_is(
        eval_cli: click.Group, tmp_path: Path, tiny_models, s3: str) -> None:
    """Its listing's sizes match the manifest; the digests of the copy eval loads do not: skipped with the note of a
    local checkpoint whose digests do not match, not scored, and not the end of the whole run's evaluation."""
    from hrsa.runtime.locations import parse_location

    local = _local_run(tmp_path, tiny_models)
    shutil.rmtree(local / "step_000003")
    run = _upload(local, f"{s3}/run")
    weights = local / "step_000002" / "model.safetensors"
    manifest = (local / "step_000002" / INFO_FILE).read_text()
    _retrained(local / "step_000002")  # other weights of the same size, the old manifest kept
    parse_location(f"{run}/step_000002/model.safetensors").write(weights.read_bytes())
    assert json.loads(manifest)["files"]["model.safetensors"]["size"] == weights.stat().st_size

    result = _eval(eval_cli, run, _pairs(tmp_path / "pairs.jsonl"), tmp_path / "ev")
    assert result.exit_code == 0, result.output
    assert f"skipped step_000002: {run}/step_000002 is incomplete by its {INFO_FILE}" in result.output
    assert [r["step"] for r in _rows(tmp_path / "ev")] == [1]


@pytest.mark.integration
def test_a_rerun_reuses_scores_by_content_and_scores_a_rewritten_checkpoint_again(
        eval_cli: click.Group, tmp_path: Path, tiny_models, s3: str, monkeypatch) -> None:
    """Scores are keyed by the digest of the checkpoint's files (the copy loaded here), not by its URL: a re-run loads
    nothing, and a checkpoint trained anew at the same URL is scored again, its neighbour's score reused."""
    from hrsa.extract.identity import model_digest
    from hrsa.train.encode import TextEncoder

    local = _local_run(tmp_path, tiny_models)
    shutil.rmtree(local / "step_000003")
    run = _upload(local, f"{s3}/run")
    pairs, out = _pairs(tmp_path / "pairs.jsonl"), tmp_path / "ev"
    loads: list[str] = []
    real_load = TextEncoder.load.__func__
    monkeypatch.setattr(TextEncoder, "load", classmethod(lambda cls, model, **kw: loads.append(model)
                                                         or real_load(cls, model, **kw)))

    assert _eval(eval_cli, run, pairs, out).exit_code == 0
    first = _rows(out)
    assert loads == [f"{run}/step_000001", f"{run}/step_000002"]
    assert first[0]["model_digest"] == first[1]["model_digest"]  # the same weights at two URLs: one digest

    result = _eval(eval_cli, run, pairs, out)
    assert result.exit_code == 0, result.output
    assert len(loads) == 2 and "reused from eval.json" in result.output
    assert _rows(out) == first

    _retrained(local / "step_000002")  # trained again into the same output: other weights at the same URL
    _upload(local / "step_000002", f"{run}/step_000002")
    assert model_digest(f"{run}/step_000002") != first[1]["model_digest"]
    assert _eval(eval_cli, run, pairs, out).exit_code == 0
    again = _rows(out)
    assert loads[2:] == [f"{run}/step_000002"]
    assert again[0] == first[0] and again[1]["model_digest"] != first[1]["model_digest"]
    key = "local-retrieval-pairs"
    assert again[1]["results"][key]["main_score"] != first[1]["results"][key]["main_score"]


@pytest.mark.parametrize("what", ["missing", "empty", "other files"])
@pytest.mark.integration
def test_an_s3_url_that_is_neither_a_model_nor_a_run_is_one_line(eval_cli: click.Group, tmp_path: Path, s3: str,
                                                                 what: str) -> None:
    from hrsa.runtime.locations import parse_location

    url = f"{s3}/nothing"
    if what == "empty":  # the marker object a console's "create folder" leaves
        folder = parse_location(url)
        folder.filesystem.create_dir(folder.path)
    elif what == "other files":
        parse_location(url).child("notes.txt").write("not a model")
        parse_location(url).child("logs", "step_1.txt").write("not a checkpoint")
    out = tmp_path / "ev"
    line = _one_line_exit_2(_eval(eval_cli, url, _pairs(tmp_path / "pairs.jsonl"), out))
    assert f"Got {url} with neither instead" in line and "training run holding step_XXXXXX" in line
    assert "Check --model" in line
    assert not out.exists()


@pytest.mark.integration
def test_a_checkpoint_copied_between_disk_and_s3_keeps_its_digest(tmp_path: Path, tiny_models, s3_endpoint: str,
                                                                  monkeypatch) -> None:
    """The same files are the same model wherever they are: the digest held the spec's kind ("local", "remote"), so a
    checkpoint uploaded after it was evaluated on disk (or the other way) was scored again as another model."""
    from hrsa.extract.identity import manifest_digest, model_digest

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("HRSA_CACHE", str(tmp_path / "cache"))
    local = write_checkpoint(tiny_models.dir("bert"), tmp_path / "run" / "step_000001", 1)
    url = _upload(local, f"s3://hrsa-test/moved-{uuid.uuid4().hex[:8]}/step_000001")
    assert model_digest(url) == model_digest(str(local)) == manifest_digest(url)  # by its manifest: nothing fetched
    _retrained(local)
    assert model_digest(url) != model_digest(str(local))  # other files: another model


@pytest.mark.integration
def test_two_models_evaluated_without_out_keep_their_own_scores(eval_cli: click.Group, tmp_path: Path, tiny_models,
                                                                s3: str, monkeypatch) -> None:
    """Models not on this disk (a run on S3, a hub id) all defaulted to ./eval: the second run rewrote eval.json
    without the first's curve, silently. Each gets its own folder; an --out holding another model's eval.json is
    refused, not overwritten."""
    monkeypatch.chdir(tmp_path)
    pairs = _pairs(tmp_path / "pairs.jsonl")
    runs = [_upload(write_checkpoint(tiny_models.dir(kind), tmp_path / name / "step_000001", 1).parent, f"{s3}/{name}")
            for name, kind in (("a", "bert"), ("b", "llama"))]  # other weights: another model
    for run in runs:
        result = CliRunner().invoke(eval_cli, ["eval", "--model", run, "--tasks", f"retrieval:{pairs}",
                                               "--no-instructions"])
        assert result.exit_code == 0, result.output
    written = sorted(p.parent for p in (tmp_path / "eval").rglob("eval.json"))
    assert len(written) == 2 and [json.loads((w / "eval.json").read_text())["model"] for w in written] == runs
    before = (written[0] / "eval.json").read_bytes()
    output = _one_line_exit_2(_eval(eval_cli, runs[1], pairs, written[0]))
    assert runs[0] in output and "another --out" in output
    assert (written[0] / "eval.json").read_bytes() == before


@pytest.mark.integration
def test_a_steps_rerun_of_an_s3_run_fetches_only_the_steps_it_scores(eval_cli: click.Group, tmp_path: Path,
                                                                      tiny_models, s3: str, monkeypatch) -> None:
    """Scoring step 2 of a run evaluated at step 1 before downloaded every checkpoint of the run to judge the earlier
    rows (a 7B run: every checkpoint, from a fresh node). Rows of steps not scored now are judged by their listed
    manifests; step 1's row stays in the curve."""
    from hrsa.runtime.locations import Location

    run = _upload(_local_run(tmp_path, tiny_models), f"{s3}/run")
    pairs, out = _pairs(tmp_path / "pairs.jsonl"), tmp_path / "ev"
    assert _eval(eval_cli, run, pairs, out, "--steps", "1").exit_code == 0
    monkeypatch.setenv("HRSA_CACHE", str(tmp_path / "fresh-node"))
    fetched: list[str] = []
    real = Location.local_folder
    monkeypatch.setattr(Location, "local_folder", lambda self, **kw: (fetched.append(self.url), real(self, **kw))[1])
    result = _eval(eval_cli, run, pairs, out, "--steps", "2")
    assert result.exit_code == 0, result.output
    assert all(url.rstrip("/").endswith("step_000002") for url in fetched), fetched
    assert [row["step"] for row in _rows(out)] == [1, 2]
