"""What ``hrsa eval`` keys its scores by is what it loaded: an S3 checkpoint its manifest does not vouch for is refused
as a local one is, files that change while the model loads are refused, an --out that would become part of the model
is refused, and a hub model is known by the snapshot its cache resolves to. And ``hrsa train --output`` of a checkpoint
folder is refused (it would train a run nested inside the checkpoint)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hrsa.train.checkpoints import INFO_FILE, STATE_FILE, file_manifest


def _pairs(path: Path, n: int = 8) -> Path:
    path.write_text("".join(json.dumps({"query": f"fox {i}", "pos": f"the lazy dog {i} " * 3}) + "\n" for i in range(n)))
    return path


def _checkpoint(source: Path, folder: Path, step: int) -> Path:
    """A checkpoint as `hrsa train` writes it: the model folder, trainer_state.pt and the manifest, written last."""
    shutil.copytree(source, folder)
    (folder / STATE_FILE).write_bytes(b"optimizer state")
    (folder / INFO_FILE).write_text(json.dumps({"step": step, "loss": 1.0, "files": file_manifest(folder)}))
    return folder


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
    local = _checkpoint(tiny_models.dir("bert"), tmp_path / "ckpt", 2)
    remote = parse_location(f"s3://hrsa-test/runs-{uuid.uuid4().hex[:8]}/step_000002")
    for file in local.iterdir():
        remote.child(file.name).write(file.read_bytes())
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
    local = _checkpoint(tiny_models.dir("bert"), tmp_path / "ckpt", 2)
    remote = parse_location(f"s3://hrsa-test/runs-{uuid.uuid4().hex[:8]}/step_000002")
    for file in local.iterdir():
        remote.child(file.name).write(file.read_bytes())
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
        _checkpoint(tiny_models.dir("bert"), folder, 2)
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
            _checkpoint(tiny_models.dir("bert"), model / f"step_{step:06d}", step)
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
