"""A training run is keyed by its recipe: what changes the weights (backbone and data by content, every setting of
the optimisation), never what only schedules the work. A run folder records the recipe it was started with; the
same recipe resumes, another one is refused in one line with nothing in the folder touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hrsa.train.config import TrainConfig
from hrsa.train.recipe import RECIPE_FILE, RecipeMismatchError, claim_run_folder, read_recipe, training_recipe


def write_data(path: Path, n: int = 8) -> Path:
    path.write_text("".join(json.dumps({"query": f"q{i}", "pos": f"p{i}", "negs": [f"n{i}"]}) + "\n" for i in range(n)))
    return path


@pytest.fixture
def config(tmp_path: Path, tiny_models: Any) -> TrainConfig:
    return TrainConfig(backbone=str(tiny_models.dir("llama")), data=write_data(tmp_path / "d.jsonl"),
                       output=tmp_path / "run", batch_size=4, max_steps=2, save_every=1, lr=1e-3)


def key(config: TrainConfig, **changes: Any) -> str:
    return training_recipe(config.model_copy(update=changes)).key


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def fake_checkpoint(run: Path, source: Path, step: int) -> Path:
    folder = run / f"step_{step:06d}"
    shutil.copytree(source, folder)
    (folder / "hrsa_train.json").write_text(json.dumps({"step": step, "loss": 1.0}))
    return folder


@pytest.mark.parametrize("changes", [{"workers": 2}, {"chunk_size": 2}, {"save_every": 7}, {"strategy": "fsdp"},
                                     {"gradient_checkpointing": True}, {"use_gpu": False}, {"address": "ray://x:1"}])
def test_scheduling_settings_are_not_the_recipe(config: TrainConfig, changes: dict[str, Any], tmp_path: Path) -> None:
    assert key(config, **changes, output=tmp_path / "elsewhere") == key(config)


@pytest.mark.parametrize("changes", [{"lr": 0.05}, {"seed": 1}, {"batch_size": 8}, {"negatives": 0}, {"max_steps": 3},
                                     {"temperature": 0.05}, {"max_length": 16}, {"instruction": "Find"},
                                     {"attention": "causal"}, {"dtype": "bfloat16"}, {"max_grad_norm": None},
                                     {"weight_decay": 0.0}, {"warmup_ratio": 0.2}])
def test_every_setting_that_changes_the_weights_is_the_recipe(config: TrainConfig, changes: dict[str, Any]) -> None:
    assert key(config, **changes) != key(config)


@pytest.mark.parametrize("changes", [{"workers": 2}, {"chunk_size": 2}])
def test_where_the_backbone_draws_dropout_workers_and_chunks_are_the_recipe(config: TrainConfig, tiny_models: Any,
                                                                            changes: dict[str, Any]) -> None:
    """Dropout masks are drawn per worker (seeded by rank) and chunk by chunk: a tiny BERT (dropout 0.1) trained with
    2 workers or chunks of 2 ended with weights 2 lr away from 1 worker's, under the same recipe key, so a resume
    with another worker count mixed the two runs silently. A backbone without dropout (Llama: above) keeps them apart
    from its recipe: the same gradients, tested."""
    bert = config.model_copy(update={"backbone": str(tiny_models.dir("bert"))})
    assert key(bert, **changes) != key(bert)
    assert key(config, **changes) == key(config)
    name, value = next(iter(changes.items()))
    assert training_recipe(bert.model_copy(update=changes)).differences(training_recipe(bert)) == [
        f"{name} {value} (the run has {'1' if name == 'workers' else 'none'})"]


def test_a_backbone_whose_config_leaves_dropout_to_its_class_defaults_draws_it(config: TrainConfig, tiny_models: Any,
                                                                               tmp_path: Path) -> None:
    """BERT's class defaults hold dropout 0.1: a config.json without the keys still trains with it."""
    folder = tmp_path / "bert-defaults"
    shutil.copytree(tiny_models.dir("bert"), folder)
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in settings.items() if "dropout" not in k}))
    bert = config.model_copy(update={"backbone": str(folder)})
    assert key(bert, workers=2) != key(bert)


def test_backbone_and_data_count_by_content_not_by_path(config: TrainConfig, tmp_path: Path) -> None:
    before = key(config)
    moved_data = Path(shutil.copy(config.data, tmp_path / "moved.jsonl"))
    moved_backbone = shutil.copytree(config.backbone, tmp_path / "moved-backbone")
    assert key(config, data=moved_data, backbone=str(moved_backbone)) == before
    write_data(moved_data, n=9)  # one more record at the same path
    assert key(config, data=moved_data) != before
    settings = json.loads((moved_backbone / "config.json").read_text())
    (moved_backbone / "config.json").write_text(json.dumps({**settings, "rms_norm_eps": 1e-5}))
    edited = key(config, backbone=str(moved_backbone))
    assert edited != before
    (moved_backbone / "eval").mkdir()  # `hrsa eval` writes into a model folder by default: not the model
    (moved_backbone / "eval" / "eval.json").write_text("{}")
    assert key(config, backbone=str(moved_backbone)) == edited


def test_the_same_recipe_resumes_and_a_folder_without_checkpoints_takes_a_new_one(config: TrainConfig) -> None:
    first = training_recipe(config)
    claim_run_folder(config.output, first)
    claim_run_folder(config.output, training_recipe(config.model_copy(update={"workers": 2})))  # the same recipe
    assert read_recipe(config.output) == first
    other = training_recipe(config.model_copy(update={"lr": 0.05}))
    claim_run_folder(config.output, other)  # nothing trained yet (e.g. a start that failed): the new recipe holds
    assert read_recipe(config.output) == other


def test_a_different_recipe_into_a_trained_folder_is_refused(config: TrainConfig) -> None:
    claim_run_folder(config.output, training_recipe(config))
    fake_checkpoint(config.output, Path(config.backbone), 1)
    with pytest.raises(RecipeMismatchError, match=r"lr 0\.05 \(the run has 0\.001\), seed 3 \(the run has 0\)"):
        claim_run_folder(config.output, training_recipe(config.model_copy(update={"lr": 0.05, "seed": 3})))


def test_a_run_on_gpus_does_not_resume_on_cpus_or_back(config: TrainConfig) -> None:
    """GPU workers train under bf16 autocast: use_gpu was a scheduling setting only, so a run resumed on the other kind
    of device mixed precisions under one recipe. A CPU run's recipe (and key) stays as it was."""
    cpu = training_recipe(config)
    assert cpu.on_device(False) == cpu and cpu.on_device(True).key != cpu.key
    claim_run_folder(config.output, cpu.on_device(True))
    fake_checkpoint(config.output, Path(config.backbone), 1)
    with pytest.raises(RecipeMismatchError, match=r"Got CPU workers \(the run has GPU workers \(bf16 autocast\)\)"):
        claim_run_folder(config.output, cpu)
    claim_run_folder(config.output, training_recipe(config.model_copy(update={"workers": 2})).on_device(True))
    # Before Ray starts the kind of workers is not known: the driver's check lets a GPU run of this recipe resume
    # (it refused every GPU run's resume), and still refuses another recipe.
    from hrsa.train.trainer import _prepare

    assert _prepare(config).recipe == cpu
    with pytest.raises(RecipeMismatchError, match=r"lr 0\.05 \(the run has 0\.001\)"):
        _prepare(config.model_copy(update={"lr": 0.05}))


def test_checkpoints_without_a_recorded_recipe_are_refused(config: TrainConfig) -> None:
    fake_checkpoint(config.output, Path(config.backbone), 1)
    with pytest.raises(RecipeMismatchError, match="no recorded recipe"):
        claim_run_folder(config.output, training_recipe(config))
    assert not (config.output / RECIPE_FILE).exists()


def test_hrsa_train_refuses_another_recipe_in_one_line_and_touches_nothing(config: TrainConfig) -> None:
    from hrsa.cli import cli

    claim_run_folder(config.output, training_recipe(config))
    fake_checkpoint(config.output, Path(config.backbone), 2)
    before = snapshot(config.output)
    args = ["train", "--backbone", config.backbone, "--data", str(config.data), "--output", str(config.output),
            "--batch-size", "4", "--max-steps", "2", "--save-every", "1"]
    result = CliRunner().invoke(cli, [*args, "--lr", "0.05"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hrsa: error: Expected the training recipe"), result.output
    assert "lr 0.05 (the run has 0.001)" in lines[0] and "new --output" in lines[0]
    assert snapshot(config.output) == before


@pytest.mark.integration
def test_a_run_on_s3_is_claimed_and_refused_through_its_filesystem(config: TrainConfig, s3_endpoint: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The same rules on an object store (moto): the recipe recorded there, another one refused with nothing touched."""
    import uuid

    from hrsa.runtime.locations import parse_location

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    run = parse_location(f"s3://hrsa-test/recipes-{uuid.uuid4().hex[:8]}/run")
    claim_run_folder(run.url, training_recipe(config))
    assert read_recipe(run.url) == training_recipe(config)
    for name, size in {"config.json": 2, "model.safetensors": 8}.items():
        run.child("step_000001", name).write(b"x" * size)
    run.child("step_000001", "hrsa_train.json").write(json.dumps({"step": 1, "loss": 1.0}))
    before = run.files()
    refusal = rf"Got lr 0\.05 \(the run has 0\.001\) instead\. .*delete {run.url} "
    with pytest.raises(RecipeMismatchError, match=refusal):
        claim_run_folder(run.url, training_recipe(config.model_copy(update={"lr": 0.05})))
    assert run.files() == before
