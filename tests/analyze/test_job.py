"""``run_analysis`` over an earlier run's outputs: a run that is refused or fails leaves them as they were (its out
folder and its store record, byte for byte); they are replaced only once the new results are computed and written
beside them, and a run stopped at any step of its writing is redone whole by a run that replaces it (the pipeline's)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from hrsa.analyze.config import AnalyzeConfig
from hrsa.analyze.job import run_analysis
from hrsa.analyze.results import read_results
from hrsa.store.errors import UserError
from hrsa.store.format import ATTRS_KEY

RUN_ID = "rerun"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder``, by relative path, with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def config(store: Any, out: Path, *, replace: bool = True, **changes: Any) -> AnalyzeConfig:
    """A run of the pipeline's kind (replace: its own run id, taken again by each re-run), or of `hrsa analyze`'s
    (a new run id each time)."""
    values = {"store": store.url, "pair": ("a", "b"), "metrics": ("cka", "dimcorr"), "cross_layer": True,
              "backend": "numpy", "out": out, "run_id": RUN_ID if replace else None, "scheduler": "sync"}
    return AnalyzeConfig(**{**values, **changes})


def earlier_run(store: Any, out: Path, *, replace: bool) -> dict[str, Any]:
    """A first run's outputs, as they stand: out's files and the store's records (their files) and ids."""
    run_analysis(config(store, out, replace=replace, save_rotation=True, metrics=("cka", "dimcorr", "procrustes")),
                 replace=replace)
    return outputs(store, out)


def outputs(store: Any, out: Path) -> dict[str, Any]:
    return {"out": snapshot(out), "records": snapshot(Path(store.url) / "results"), "ids": store.open().results_ids()}


def fail_in_a_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    import hrsa.analyze.pair.assembly as assembly

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected: a metric failed")

    monkeypatch.setattr(assembly, "linear_cka_from_summaries", broken)


def fail_in_the_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    import hrsa.analyze.job as job

    def broken(doc: Any, out_dir: Path) -> Any:
        (Path(out_dir) / "layers.png").write_bytes(b"half a figure")  # as a failing drawing may leave one
        raise RuntimeError("injected: drawing failed")

    monkeypatch.setattr(job, "plot_figures", broken)


@pytest.mark.parametrize("replace", [True, False], ids=["replace", "standalone"])
def test_a_refused_analysis_leaves_the_earlier_results_as_they_were(fresh_pair_store, tmp_path: Path,
                                                                    replace: bool) -> None:
    """With replace (the pipeline's re-run), the record and the out folder went before the checks: a refused run
    (here a hidden state the models do not share) lost them."""
    out = tmp_path / "out"
    before = earlier_run(fresh_pair_store, out, replace=replace)
    with pytest.raises(UserError, match="Expected hidden states shared by a and b"):
        run_analysis(config(fresh_pair_store, out, replace=replace, metrics=("cka", "knn"), hidden_states=(99,)),
                     replace=replace)
    assert outputs(fresh_pair_store, out) == before


@pytest.mark.parametrize("fail", [fail_in_a_metric, fail_in_the_figures], ids=["metric", "figures"])
@pytest.mark.parametrize("replace", [True, False], ids=["replace", "standalone"])
def test_a_failing_analysis_leaves_the_earlier_results_as_they_were(fresh_pair_store, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch, replace: bool,
                                                                    fail: Any) -> None:
    """A metric that raises (as a kill in the passes): nothing written yet. Figures that fail: results.json and the
    record were written before them, beside the earlier run's figures."""
    out = tmp_path / "out"
    before = earlier_run(fresh_pair_store, out, replace=replace)
    fail(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        run_analysis(config(fresh_pair_store, out, replace=replace, debiased=True), replace=replace)
    assert outputs(fresh_pair_store, out) == before


def test_a_failing_analysis_creates_no_out_folder(fresh_pair_store, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fail_in_the_figures(monkeypatch)
    ids = fresh_pair_store.open().results_ids()
    with pytest.raises(RuntimeError, match="injected"):
        run_analysis(config(fresh_pair_store, tmp_path / "new" / "out"), replace=True)
    assert not (tmp_path / "new").exists() and fresh_pair_store.open().results_ids() == ids


def test_before_writing_is_called_once_the_results_are_computed(fresh_pair_store, tmp_path: Path) -> None:
    """The pipeline records its stage as started there: a refused run leaves the stage's record as it was."""
    calls: list[bool] = []

    def before_writing() -> None:
        calls.append((tmp_path / "out").exists())

    with pytest.raises(UserError):
        run_analysis(config(fresh_pair_store, tmp_path / "out", hidden_states=(99,), metrics=("knn",)),
                     before_writing=before_writing)
    assert calls == []
    run_analysis(config(fresh_pair_store, tmp_path / "out"), before_writing=before_writing)
    assert calls == [False]  # once, before anything was written


def stop_in_the_store(monkeypatch: pytest.MonkeyPatch, out: Path) -> None:
    import hrsa.analyze.job as job

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected: the store write stopped")

    monkeypatch.setattr(job, "write_to_store", broken)


def stop_in_the_swap(monkeypatch: pytest.MonkeyPatch, out: Path) -> None:
    """A kill after the first staged file moved into out: a folder of both runs."""
    moves: list[str] = []
    replace = os.replace

    def stops(src: Any, dst: Any) -> None:
        if Path(dst).parent == out and Path(src).parent != out:
            moves.append(str(dst))
            if len(moves) == 2:
                raise RuntimeError("injected: killed in the swap")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", stops)


@pytest.mark.parametrize("stop", [stop_in_the_store, stop_in_the_swap], ids=["store", "swap"])
def test_a_run_stopped_while_writing_is_redone_whole_by_a_replacing_run(fresh_pair_store, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        stop: Any) -> None:
    """Past the computation a stop may leave the earlier run's outputs in part (the pipeline has recorded its stage
    as started by then, so it runs again); the run that replaces them ends with one complete record, its results.json
    and its figures, nothing else."""
    out = tmp_path / "out"
    earlier_run(fresh_pair_store, out, replace=True)
    with monkeypatch.context() as patch:
        stop(patch, out)
        with pytest.raises(RuntimeError, match="injected"):
            run_analysis(config(fresh_pair_store, out, metrics=("cka",), cross_layer=False), replace=True)
    run = run_analysis(config(fresh_pair_store, out, metrics=("cka",), cross_layer=False), replace=True)
    _, doc = read_results(out)
    record = fresh_pair_store.open().results_record(RUN_ID)
    assert list(doc["metrics"]) == ["cka"] and record.attrs[ATTRS_KEY] == doc
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.json", *(p.name for p in run.figures)])


@pytest.mark.parametrize("replace", [True, False], ids=["replace", "standalone"])
def test_a_killed_runs_staging_folder_goes_with_the_next_run(fresh_pair_store, tmp_path: Path, replace: bool) -> None:
    from hrsa.analyze.job import STAGING_PREFIX

    left = tmp_path / "out" / f"{STAGING_PREFIX}killed"
    left.mkdir(parents=True)
    (left / "results.json").write_text("{}")
    run_analysis(config(fresh_pair_store, tmp_path / "out", replace=replace), replace=replace)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(STAGING_PREFIX)]


@pytest.mark.parametrize("replace", [True, False], ids=["replace", "standalone"])
def test_a_run_stopped_in_the_swap_leaves_no_results_json_beside_files_of_another_run(
        fresh_pair_store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replace: bool) -> None:
    """A stop after the first staged file moved in had left the earlier run's results.json beside this run's files:
    a folder that reads as complete and describes two runs. Without results.json it reads as unfinished."""
    out = tmp_path / "out"
    earlier_run(fresh_pair_store, out, replace=replace)
    stop_in_the_swap(monkeypatch, out)
    with pytest.raises(RuntimeError, match="injected"):
        run_analysis(config(fresh_pair_store, out, replace=replace, metrics=("cka",), cross_layer=False),
                     replace=replace)
    assert not (out / "results.json").exists()


def test_two_runs_writing_into_one_out_folder_write_one_after_the_other(fresh_pair_store, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run clears the staging folders it finds: a second run finishing while the first was staging removed the
    first's staging folder, and the first failed with its files gone. Now the second waits for the first."""
    import threading

    import hrsa.analyze.job as job

    out, first_staging, second_done = tmp_path / "out", threading.Event(), threading.Event()
    draw = job.plot_figures
    errors: list[BaseException] = []

    def slow_for_the_first(doc: Any, out_dir: Path) -> Any:
        figures = draw(doc, out_dir)
        if threading.current_thread().name == "first":
            first_staging.set()
            second_done.wait(timeout=3)  # the second run, once waiting for this one, never sets it
        return figures

    def first() -> None:
        try:
            run_analysis(config(fresh_pair_store, out, replace=False, metrics=("cka",)))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    monkeypatch.setattr(job, "plot_figures", slow_for_the_first)
    thread = threading.Thread(target=first, name="first")
    thread.start()
    assert first_staging.wait(timeout=120)
    second = run_analysis(config(fresh_pair_store, out, replace=False, metrics=("cka", "dimcorr")))
    second_done.set()
    thread.join()
    assert errors == []
    _, doc = read_results(out)  # the second run's, written after the first's
    assert doc["run_id"] == second.saved.run_id and sorted(doc["metrics"]) == ["cka", "dimcorr"]
    assert not [p for p in out.iterdir() if p.name.startswith(job.STAGING_PREFIX)]


def yaml_keys(field: str) -> str:
    return f"pairs.0.{field}"


def test_messages_from_deep_in_the_passes_name_the_callers_settings(fresh_pair_store, tmp_path: Path) -> None:
    """The pipeline has no flags: a budget too small for one pass said "Raise --memory-budget" to its users."""
    with pytest.raises(UserError) as refused:
        run_analysis(config(fresh_pair_store, tmp_path / "out", memory_budget="1KB"), names=yaml_keys)
    message = str(refused.value)
    assert "pairs.0.memory_budget" in message and "pairs.0.block_tokens" in message and "--" not in message


def test_warnings_name_the_callers_settings(fresh_pair_store, tmp_path: Path) -> None:
    """A k-NN sample of a few tokens overlaps by chance: the warning's fix names the YAML keys, not the flags."""
    run = run_analysis(config(fresh_pair_store, tmp_path / "out", metrics=("knn",), knn_sample=12, k=(5,)),
                       names=yaml_keys)
    chance = [w for w in run.warnings if "by chance alone" in w]
    assert chance and "pairs.0.knn_sample" in chance[0] and "smaller pairs.0.k." in chance[0] and "--" not in chance[0]


def test_the_cli_keeps_its_flags_in_messages(fresh_pair_store, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="Raise --memory-budget, or lower --block-tokens"):
        run_analysis(config(fresh_pair_store, tmp_path / "out", memory_budget="1KB"))


def test_warnings_of_a_run_that_then_fails_come_with_its_error(fresh_pair_store, tmp_path: Path) -> None:
    """The k-NN chance warning was gathered and then dropped when the run failed after the passes: the error now
    carries it, and `hrsa` prints it before the error line."""
    from click.testing import CliRunner

    from hrsa.cli import cli

    def refuse() -> None:
        raise UserError("stopped before writing")

    with pytest.raises(UserError, match="stopped before writing") as caught:
        run_analysis(config(fresh_pair_store, tmp_path / "out", metrics=("cka", "knn"), k=(100,)),
                     before_writing=refuse)
    assert any("by chance alone" in line for line in caught.value.warnings), caught.value.warnings

    @cli.command("fail-with-warnings")
    def fail_with_warnings() -> None:
        raise caught.value

    try:
        result = CliRunner().invoke(cli, ["fail-with-warnings"])
    finally:
        cli.commands.pop("fail-with-warnings")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and lines[-1] == "hrsa: error: stopped before writing", result.stderr
    assert lines[:-1] == [f"hrsa: warning: {line}" for line in caught.value.warnings]


def test_a_run_whose_default_id_another_run_takes_meanwhile_writes_under_the_next_one(fresh_pair_store, tmp_path: Path,
                                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `hrsa analyze` of one pair in the same second: the default id was picked from a listing, so the run that
    listed before the other created its record failed after all its passes ("Expected a new run id", no --run-id
    given). Here the other run creates the id between this run's listing and its write: this run takes `-2`."""
    import hrsa.analyze.results as results_module
    from hrsa.store import ActivationStore

    monkeypatch.setattr(results_module, "new_run_id", lambda results, now=None: "a--b--20261204T235758Z")
    create, raced = ActivationStore.create_results, []

    def other_run_first(self: ActivationStore, run_id: str) -> Any:
        if not raced:  # the other run's record, created a moment before this run's
            raced.append(create(ActivationStore.open(self.url, mode="r+"), run_id))
            raced[0].attrs[ATTRS_KEY] = {"run_id": run_id, "writer": "other"}
        return create(self, run_id)

    monkeypatch.setattr(ActivationStore, "create_results", other_run_first)
    saved = run_analysis(config(fresh_pair_store, tmp_path / "out", replace=False), replace=False).saved
    store = fresh_pair_store.open()
    assert saved.run_id == "a--b--20261204T235758Z-2"
    assert json.loads(saved.json_path.read_text())["run_id"] == saved.run_id
    assert store.results_record("a--b--20261204T235758Z").attrs[ATTRS_KEY]["writer"] == "other"
    assert store.results_record(saved.run_id).attrs[ATTRS_KEY]["run_id"] == saved.run_id


def test_a_failed_run_lets_go_of_the_default_id_it_took(fresh_pair_store, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ids = fresh_pair_store.open().results_ids()
    fail_in_the_figures(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        run_analysis(config(fresh_pair_store, tmp_path / "out", replace=False), replace=False)
    assert fresh_pair_store.open().results_ids() == ids and not (tmp_path / "out").exists()


def test_a_run_that_fails_writing_its_record_lets_go_of_the_id_it_was_given(fresh_pair_store, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure (or Ctrl-C) while `--run-id X` wrote its record left an incomplete results/X: a re-run with the same
    id was refused as taken."""
    import hrsa.analyze.results as results_module

    def stopped(*args: Any, **kwargs: Any) -> Any:  # inside the record's write, its metadata there
        raise RuntimeError("injected: the record's arrays")

    ids = fresh_pair_store.open().results_ids()
    monkeypatch.setattr(results_module, "_arrays", stopped)
    with pytest.raises(RuntimeError, match="injected"):
        run_analysis(config(fresh_pair_store, tmp_path / "out", replace=False, run_id="given"), replace=False)
    assert fresh_pair_store.open().results_ids() == ids
    monkeypatch.undo()
    saved = run_analysis(config(fresh_pair_store, tmp_path / "out", replace=False, run_id="given"), replace=False).saved
    assert saved.run_id == "given" and "given" in fresh_pair_store.open().results_ids()
