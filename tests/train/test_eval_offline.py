"""MTEB tasks without the hub: scored from the local datasets cache at the revision mteb pins, and at no other.

Compute nodes are often offline (HF_HUB_OFFLINE=1) with the data cached beforehand; `hrsa eval` refused every MTEB
task there. Offline, datasets reads the most recently written revision it has cached, whatever revision is asked
for: a cache that also holds another revision would score other data under the pinned revision's name, so that is
refused too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from hrsa.train.eval_tasks import EvalError
from hrsa.train.evaluate import EvalConfig, evaluate
from tests.conftest import BANKING77, banking77_splits, cache_hub_dataset

pytestmark = pytest.mark.integration
TASK, REPO, PINNED = BANKING77


def test_an_mteb_task_cached_at_its_revision_is_scored_offline(datasets_cache: Path, tmp_path: Path,
                                                              tiny_models: Any) -> None:
    def accuracy(shift: int, out: str) -> float:
        cache_hub_dataset(datasets_cache, REPO, PINNED, banking77_splits(test_shift=shift))
        result = evaluate(EvalConfig(model=str(tiny_models.dir("bert")), tasks=TASK, instructions=False,
                                     out=tmp_path / out))
        return json.loads(result.json_path.read_text())["checkpoints"][0]["results"][TASK]["main_score"]

    # The cached rows are what was scored: a classifier right on every train row is right on the same test rows, and
    # wrong on every one once the test labels are moved on (no other data gives 1.0 and then 0.0)
    assert accuracy(0, "same") == 1.0
    shutil.rmtree(datasets_cache / "mteb___banking77")
    assert accuracy(1, "moved") == 0.0


def test_offline_without_the_data_cached_is_one_line_naming_the_dataset_its_revision_and_the_cache(
        eval_cli: click.Group, datasets_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(eval_cli, ["eval", "--model", "packaged:all-minilm-l6-v2", "--tasks", TASK])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and f"{REPO} at revision {PINNED}" in line and str(datasets_cache) in line, line
    assert not (tmp_path / "eval").exists()


def test_offline_with_another_revision_cached_too_is_refused_not_scored_on_it(
        datasets_cache: Path, tmp_path: Path, tiny_models: Any) -> None:
    """datasets would read the newer copy (other data) and the scores would say the pinned revision."""
    cache_hub_dataset(datasets_cache, REPO, PINNED, banking77_splits())
    cache_hub_dataset(datasets_cache, REPO, "f" * 40, banking77_splits(per_label=3))
    with pytest.raises(EvalError, match=f"also holds revision {'f' * 40} of {REPO}"):
        evaluate(EvalConfig(model=str(tiny_models.dir("bert")), tasks=TASK, instructions=False, out=tmp_path / "eval"))
    assert not (tmp_path / "eval").exists()


def test_a_cached_task_loads_offline_even_where_the_hub_is_not_flagged_offline(
        datasets_cache: Path, tmp_path: Path, tiny_models: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection and no offline flag (a firewalled node): the cache serves, with datasets told not to try the hub
    (each of its attempts would wait on the network)."""
    import datasets
    import huggingface_hub.constants as hub
    import mteb.abstasks.abstask as abstask

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "https://hub.invalid")
    offline_while_loading = []
    real_load = abstask.load_dataset

    def load_dataset(*args: Any, **kwargs: Any) -> Any:  # the real load, noting the flags it ran under
        offline_while_loading.append((hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(abstask, "load_dataset", load_dataset)
    cache_hub_dataset(datasets_cache, REPO, PINNED, banking77_splits())
    result = evaluate(EvalConfig(model=str(tiny_models.dir("bert")), tasks=TASK, instructions=False,
                                 out=tmp_path / "eval"))
    assert TASK in json.loads(result.json_path.read_text())["checkpoints"][0]["results"]
    assert offline_while_loading == [(True, True)]
    assert (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == (False, False)  # put back after the load


def _mteb_task(name: str) -> Any:
    from hrsa.train.eval_tasks import mteb_tasks, parse_task_spec

    (task,) = mteb_tasks(parse_task_spec(name))
    return task


def test_a_revision_pinned_by_a_short_commit_is_its_cached_commit(datasets_cache: Path) -> None:
    """mteb pins some datasets by a short commit (IFIRAila: 1cb8772); datasets names the cached copy by the full one."""
    from hrsa.train.eval_tasks import check_cached_mteb_data

    task = _mteb_task("IFIRAila")
    with pytest.raises(EvalError, match="no copy of if-ir/aila at revision 1cb8772"):
        check_cached_mteb_data([task], "offline")
    cache_hub_dataset(datasets_cache, "if-ir/aila", "1cb8772" + "0" * 33, banking77_splits())
    check_cached_mteb_data([task], "offline")
    cache_hub_dataset(datasets_cache, "if-ir/aila", "1cb8773" + "0" * 33, banking77_splits())
    with pytest.raises(EvalError, match=f"also holds revision 1cb8773{'0' * 33} of if-ir/aila"):
        check_cached_mteb_data([task], "offline")


def test_a_revision_pinned_by_a_branch_is_the_commit_the_hub_cache_recorded_for_it(
        datasets_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """PublicHealthQA pins `main`: offline, which commit that is was recorded by huggingface_hub when the data was
    fetched (refs/main in its cache); without that record the copy cannot be told current, and is refused."""
    from hrsa.train.eval_tasks import check_cached_mteb_data

    hub_cache = tmp_path / "hub"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub_cache))
    task = _mteb_task("PublicHealthQA")
    commit = "c" * 40
    cache_hub_dataset(datasets_cache, "xhluca/publichealth-qa", commit, banking77_splits())
    with pytest.raises(EvalError, match="no copy of xhluca/publichealth-qa at revision main .its commit is not known"):
        check_cached_mteb_data([task], "offline")
    refs = hub_cache / "datasets--xhluca--publichealth-qa" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit)
    check_cached_mteb_data([task], "offline")
    (refs / "main").write_text("d" * 40)  # the branch has moved on since this copy was made
    with pytest.raises(EvalError, match="no copy of xhluca/publichealth-qa at revision main"):
        check_cached_mteb_data([task], "offline")


def test_an_aggregate_task_is_checked_by_the_datasets_of_its_tasks(datasets_cache: Path) -> None:
    """CQADupstackRetrieval has no dataset of its own ('aggregate tasks do not have a path'): its 12 tasks have."""
    from hrsa.train.eval_tasks import check_cached_mteb_data

    task = _mteb_task("CQADupstackRetrieval")
    parts = [t.metadata.dataset for t in task.metadata.tasks]
    for dataset in parts[:-1]:
        cache_hub_dataset(datasets_cache, dataset["path"], dataset["revision"], banking77_splits())
    with pytest.raises(EvalError, match=f"no copy of {parts[-1]['path']} at revision {parts[-1]['revision']}"):
        check_cached_mteb_data([task], "offline")
    cache_hub_dataset(datasets_cache, parts[-1]["path"], parts[-1]["revision"], banking77_splits())
    check_cached_mteb_data([task], "offline")
