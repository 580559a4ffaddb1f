"""`hrsa analyze`: writes results.json, figures and results/<run>; every error is one line and exit 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hrsa.analyze.pair import analyze_pair
from hrsa.cli import cli
from hrsa.store.format import ATTRS_KEY


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["analyze", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, build_store, store_model):
    """A pair store, plus "other" on another corpus, written into by the CLI (hence module-scoped, not session)."""
    ps = build_store(str(tmp_path_factory.mktemp("cli") / "store"))
    store = ps.open("r+")
    from hrsa.store.testing import make_table

    other = store.write_corpus(make_table((50, 50)), tokenizer={"name": "t", "fingerprint": "f"})
    store_model(store, "other", other, {k: np.random.default_rng(k).normal(size=(100, 16)) for k in range(4)})
    return ps


def test_help_documents_every_flag() -> None:
    code, out, _ = run("--help")
    assert code == 0
    for flag in ("--store", "--pair", "--metrics", "--debiased", "--cross-layer", "--memory-budget", "--exclude-special",
                 "--exclude-first", "--docs", "--positions", "--save-rotation", "--out", "--config", "--scheduler"):
        assert flag in out


def test_cross_layer_run_writes_json_figures_and_store_results(cli_store, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = run("--store", cli_store.url, "--pair", "a", "b", "--cross-layer", "--memory-budget", "400kB",
                               "--exclude-first", "--docs", "0,2-4", "--out", str(out), "--run-id", "cli-run",
                               "--backend", "numpy", "--block-tokens", "128", "--compute-dtype", "float64")
    assert code == 0, stderr
    assert "plan:" in stderr and "pass(es)" in stderr  # the plan is printed before the passes
    assert "this process:" in stderr and "resident before the passes" in stderr  # and what lies outside the budget
    assert "results.json" in stdout and "results/cli-run" in stdout
    doc = json.loads((out / "results.json").read_text())
    assert doc["run_id"] == "cli-run" and doc["token_filter"]["docs"] == [0, 2, 3, 4]
    assert doc["config"]["memory_budget"] == "400kB" and doc["plan"]["passes"] > 3
    assert {p.name for p in out.glob("*.png")} == {"cka_cross_layer.png", "dimcorr_cross_layer.png", "layers.png"}
    # The numbers are the API's on the same selection.
    from hrsa.store.selection import TokenSelection

    api = analyze_pair(cli_store.open(), "a", "b", cross_layer=True, backend="numpy", compute_dtype="float64",
                       selection=TokenSelection(exclude_first=True, docs=(0, 2, 3, 4)))
    np.testing.assert_allclose(doc["metrics"]["cka"]["matrix"], api.cka_matrix, rtol=1e-10)
    assert doc["n_tokens"] == api.n_tokens
    stored = cli_store.open().results_record("cli-run")
    assert stored.attrs[ATTRS_KEY]["n_tokens"] == api.n_tokens


def test_a_run_into_an_earlier_runs_folder_leaves_nothing_of_it_beside_its_results(cli_store, tmp_path: Path) -> None:
    """--out reused: the cross-layer figures of the first run must not stay beside the second run's k-NN results
    (each file there describes the run in results.json); a user's own file is left alone."""
    out = tmp_path / "out"
    common = ("--store", cli_store.url, "--pair", "a", "b", "--backend", "numpy", "--out", str(out),
              "--no-store-results")
    code, _, stderr = run(*common, "--metrics", "cka,procrustes", "--cross-layer", "--save-rotation")
    assert code == 0, stderr
    assert {"cka_cross_layer.png", "layers.png"} <= {p.name for p in out.iterdir()}
    assert list(out.glob("procrustes_rotation_*.npy"))
    (out / "notes.txt").write_text("mine")
    code, _, stderr = run(*common, "--metrics", "dimcorr")
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} == {"results.json", "layers.png", "notes.txt"}
    assert list(json.loads((out / "results.json").read_text())["metrics"]) == ["dimcorr"]


def test_a_yaml_config_is_overridden_by_flags(cli_store, tmp_path: Path) -> None:
    config = tmp_path / "analyze.yaml"
    config.write_text(f"store: {cli_store.url}\npair: [a, b]\nmetrics: [cka, dimcorr]\nexclude_special: true\n"
                      f"out: {tmp_path / 'from-yaml'}\nstore_results: false\nbackend: numpy\n")
    code, _, stderr = run("--config", str(config), "--metrics", "cka", "--out", str(tmp_path / "from-flag"))
    assert code == 0, stderr
    doc = json.loads((tmp_path / "from-flag" / "results.json").read_text())
    assert list(doc["metrics"]) == ["cka"] and doc["token_filter"]["exclude_special"] is True
    assert not (tmp_path / "from-yaml").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pair", "a", "nope"], "Expected a model of this store"),
        (["--pair", "a", "other"], "same corpus"),
        (["--pair", "a", "b", "--memory-budget", "lots"], "memory budget such as 4GB"),
        (["--pair", "a", "b", "--memory-budget", "1e400"], "memory budget such as 4GB"),  # inf: was a traceback
        (["--pair", "a", "b", "--memory-budget", "1kB"], "Raise --memory-budget"),
        (["--pair", "a", "b", "--metrics", "cka,rsa"], "metrics"),
        (["--pair", "a", "b", "--positions", "9:3"], "positions"),
        (["--pair", "a", "b", "--docs", "0,99"], "document indices"),
        (["--pair", "a", "b", "--docs", "5-3"], "Got '5-3' instead. Write it 3-5."),  # selected nothing, silently
        (["--pair", "a", "b", "--run-id", "../up"], "run id"),
        (["--pair", "a", "b", "--metrics", "probe"], "the probe metric needs --label-field"),  # a pipeline: its key
        (["--pair", "a"], "pair"),
        (["--pair", "a", "b", "--fields", ""], "Got '', which lists none"),  # analysed every token, fields null
        (["--pair", "a", "b", "--fields", " , "], "Got ' , ', which lists none"),
        (["--pair", "a", "b", "--docs", ""], "Got '', which lists none"),
        (["--pair", "a", "b", "--k", ""], "Got '', which lists none"),
        (["--pair", "a", "b", "--metrics", ""], "Got '', which lists none"),
        (["--pair", "a", "b", "--metrics", "cka,probe", "--label-field", ""], "label_field: expected a name, got ''"),
        (["--pair", "a", "b", "--metrics", "probe", "--label-field", "label", "--labels", " "], "expected a name"),
    ],
    ids=["unknown-model", "corpus-mismatch", "bad-budget", "infinite-budget", "small-budget", "bad-metric",
         "bad-positions", "bad-docs", "reversed-docs", "bad-run-id", "probe-without-labels", "half-pair",
         "empty-fields", "blank-fields", "empty-docs", "empty-k", "empty-metrics", "empty-label-field", "blank-labels"],
)
def test_user_errors_are_one_line_and_exit_2(cli_store, tmp_path: Path, args: list[str], message: str) -> None:
    code, stdout, stderr = run("--store", cli_store.url, "--backend", "numpy", "--out", str(tmp_path / "o"), *args)
    assert code == 2, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], stderr
    assert not (tmp_path / "o" / "results.json").exists()


def snapshot(folder: str) -> dict[str, str]:
    """Every file under ``folder``, by relative path, with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("under", "message"), [("", "out: expected a folder"),
                                                 ("sub", "out: expected a path inside folders")])
def test_an_out_that_is_a_file_is_refused_before_any_pass(cli_store, tmp_path: Path, under: str, message: str) -> None:
    """A file at --out, or above it: refused with the settings, so no result is kept in the store (whose run id it
    would use up) by a run that could not write its folder."""
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    before, records = snapshot(cli_store.url), cli_store.open().results_ids()
    code, stdout, stderr = run("--store", cli_store.url, "--pair", "a", "b", "--backend", "numpy", "--out",
                               str(existing / under) if under else str(existing), "--run-id", "out-is-a-file")
    assert code == 2, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and str(existing) in lines[0], stderr
    assert "plan:" not in stderr  # refused with the settings, before the plan and its passes
    assert existing.read_text() == "keep me"
    assert snapshot(cli_store.url) == before and cli_store.open().results_ids() == records  # the store is untouched


def unwritable(monkeypatch: pytest.MonkeyPatch, *folders: Path) -> None:
    """``folders`` and all under them as a read-only filesystem answers access(2) (EROFS): mounting one needs
    privileges the test machine may not grant; the write itself is not reached (refused before any work)."""
    import os

    access = os.access
    barred = [str(f) for f in folders]
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if (mode & os.W_OK and any(
        str(path) == b or str(path).startswith(b + "/") for b in barred)) else access(path, mode, **kw))


@pytest.mark.parametrize("out", ["read-only", "/dev/null"])
def test_an_out_that_cannot_be_written_is_refused_before_any_pass(cli_store, tmp_path: Path, monkeypatch, out: str) -> None:
    """A read-only filesystem at --out (or a device node) failed after the whole analysis, in a traceback."""
    if out == "read-only":
        (tmp_path / "ro").mkdir()
        unwritable(monkeypatch, tmp_path / "ro")
        out = str(tmp_path / "ro" / "deep" / "o")
    before, records = snapshot(cli_store.url), cli_store.open().results_ids()
    code, stdout, stderr = run("--store", cli_store.url, "--pair", "a", "b", "--backend", "numpy", "--out", out)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and out in lines[0], (stdout, stderr)
    assert "plan:" not in stderr and not (tmp_path / "ro" / "deep").exists()
    assert snapshot(cli_store.url) == before and cli_store.open().results_ids() == records


def test_a_store_that_cannot_be_written_is_refused_before_any_pass_unless_only_read(cli_store, tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """A store on a read-only filesystem: the analysis computed, then failed writing its record in a traceback."""
    unwritable(monkeypatch, Path(cli_store.url))
    code, stdout, stderr = run("--store", cli_store.url, "--pair", "a", "b", "--backend", "numpy", "--out",
                               str(tmp_path / "o"))
    assert code == 2 and stderr.count("\n") == 1 and "--no-store-results" in stderr and "plan:" not in stderr, stderr
    assert not (tmp_path / "o").exists()
    code, stdout, stderr = run("--store", cli_store.url, "--pair", "a", "b", "--backend", "numpy", "--metrics", "cka",
                               "--out", str(tmp_path / "o"), "--no-store-results")
    assert code == 0 and (tmp_path / "o" / "results.json").is_file(), stderr


@pytest.mark.parametrize("inside", ["", "models/a"])
def test_an_out_inside_the_store_is_refused(cli_store, inside: str) -> None:
    """results.json and figures were written among the store's arrays (its root, or a model's group)."""
    before = snapshot(cli_store.url)
    out = str(Path(cli_store.url) / inside) if inside else cli_store.url
    code, stdout, stderr = run("--store", cli_store.url, "--pair", "a", "b", "--backend", "numpy", "--out", out)
    assert code == 2 and stderr.count("\n") == 1 and "Expected --out outside any hrsa store" in stderr, (stdout, stderr)
    assert f"inside the hrsa store {Path(cli_store.url).resolve()}" in stderr, stderr
    assert snapshot(cli_store.url) == before


def test_an_out_inside_another_store_is_refused(cli_store, tmp_path: Path) -> None:
    """results.json and figures written into another hrsa store's folders (its results group, a model's) litter it."""
    from hrsa.store import ActivationStore

    other = tmp_path / "other-store"
    ActivationStore.open(str(other), mode="a")
    before = snapshot(str(other))
    code, stdout, stderr = run("--store", cli_store.url, "--pair", "a", "b", "--backend", "numpy", "--out",
                               str(other / "results" / "mine"))
    assert code == 2 and stderr.count("\n") == 1 and f"inside the hrsa store {other.resolve()}" in stderr, (stdout, stderr)
    assert snapshot(str(other)) == before and not (other / "results" / "mine").exists()


def test_a_missing_store_is_one_line_and_exit_2(tmp_path: Path) -> None:
    code, _, stderr = run("--store", str(tmp_path / "nowhere"), "--pair", "a", "b")
    assert code == 2 and stderr.count("\n") == 1 and "Expected an hrsa store" in stderr


def test_every_settings_problem_is_reported_at_once(cli_store) -> None:
    code, _, stderr = run("--store", cli_store.url, "--pair", "a", "b", "--positions", "9:3", "--metrics", "cka,rsa",
                          "--memory-budget", "lots")
    assert code == 2 and stderr.count("\n") == 1
    assert "3 problem(s)" in stderr and "positions" in stderr and "metrics" in stderr and "memory budget" in stderr


def test_a_missing_store_flag_names_the_flag() -> None:
    code, _, stderr = run("--pair", "a", "b")
    assert code == 2 and "--store is required" in stderr


def test_underdetermined_procrustes_is_one_warning_line(narrow_store, tmp_path: Path) -> None:
    code, _, stderr = run("--store", narrow_store.url, "--pair", "a", "b", "--no-store-results", "--backend", "numpy",
                          "--out", str(tmp_path))
    assert code == 0, stderr
    warning_lines = [line for line in stderr.splitlines() if "warning" in line.lower()]
    assert len(warning_lines) == 1 and warning_lines[0].startswith(
        "hrsa: warning: Orthogonal Procrustes: the optimal rotation is not unique at hidden states [0, 1, 2, 3]")
    assert "40 tokens are no more than D = 48 dimensions" in warning_lines[0]
    assert json.loads((tmp_path / "results.json").read_text())["metrics"]["procrustes"]["underdetermined"] == [True] * 4


def test_more_groups_than_documents_says_how_many_the_intervals_use(cli_store, tmp_path: Path) -> None:
    """--groups 1000 on a selection of 4 documents: the jackknife leaves out one document at a time, and says so in the
    plan it prints and in results.json (it was accepted without a word, the results saying only "groups": 4)."""
    code, _, stderr = run("--store", cli_store.url, "--pair", "a", "b", "--docs", "0,2-4", "--groups", "1000",
                          "--no-store-results", "--backend", "numpy", "--out", str(tmp_path))
    assert code == 0, stderr
    assert "intervals: statistics kept per group of documents, 4 groups (of 1000 asked: the selection's whole " \
           "documents make no more)" in " ".join(stderr.split())  # as one line: the console folds it at its width
    uncertainty = json.loads((tmp_path / "results.json").read_text())["uncertainty"]
    assert uncertainty["groups"] == 4 and uncertainty["groups_asked"] == 1000


def test_a_taken_run_id_names_the_command_that_frees_it(cli_store, tmp_path: Path) -> None:
    """The refusal said "delete that record first" with no verb that could: `hrsa store rm ... --results` now does."""
    common = ("--store", cli_store.url, "--pair", "a", "b", "--metrics", "dimcorr", "--backend", "numpy", "--run-id", "twice")
    assert run(*common, "--out", str(tmp_path / "one"))[0] == 0
    code, _, stderr = run(*common, "--out", str(tmp_path / "two"))
    assert code == 2 and stderr.count("\n") == 1 and not (tmp_path / "two").exists(), stderr
    command = stderr[stderr.index("`hrsa ") + 1 : stderr.rindex("`")].split()[1:]
    assert command == ["store", "rm", cli_store.url, "twice", "--results"], stderr
    assert CliRunner().invoke(cli, [*command, "--yes"]).exit_code == 0
    assert run(*common, "--out", str(tmp_path / "two"))[0] == 0


def test_a_record_deleted_while_its_analysis_writes_it_is_not_written_back_partial(cli_store, tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """`hrsa store rm URL RUN --results` of a record still being written (listed as incomplete by `store ls`): the
    analysis went on, wrote its document, and the store held a complete-looking record without the arrays written
    before the deletion (exit 0)."""
    import hrsa.analyze.results as results_module

    arrays = results_module._arrays

    class DeletedAfterTheFirst(dict):
        def items(self):  # the record's arrays, written one by one: another process deletes it after the first
            for k, (name, values) in enumerate(super().items()):
                yield name, values
                if k == 0:
                    result = CliRunner().invoke(cli, ["store", "rm", cli_store.url, "raced", "--results", "--yes"])
                    assert result.exit_code == 0, result.output

    monkeypatch.setattr(results_module, "_arrays", lambda *a: DeletedAfterTheFirst(arrays(*a)))
    code, _, stderr = run("--store", cli_store.url, "--pair", "a", "b", "--metrics", "dimcorr,cka", "--backend", "numpy",
                          "--run-id", "raced", "--out", str(tmp_path / "out"))
    errors = [line for line in stderr.splitlines() if line.startswith("hrsa: error:")]
    assert code == 2 and len(errors) == 1 and "deleted while being written" in errors[0], stderr
    assert "raced" not in cli_store.open().results_ids()
