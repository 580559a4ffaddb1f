"""Result files: results.json in the documented schema, results/<run> in the store, read back as written."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hrsa.analyze.pair import analyze_pair
from hrsa.analyze.results import (
    SCHEMA,
    ResultsFileError,
    find_results,
    new_run_id,
    read_results,
    results_dict,
    save_results,
    write_to_store,
)
from hrsa.store.errors import UserError
from hrsa.store.format import ATTRS_KEY
from hrsa.store.selection import TokenSelection

@pytest.fixture(scope="module")
def setup(tmp_path_factory, build_store):
    ps = build_store(str(tmp_path_factory.mktemp("results") / "store"))
    store = ps.open("r+")
    res = analyze_pair(store, "a", "b", cross_layer=True, debiased=True, save_rotation=True, backend="numpy",
                       selection=TokenSelection(exclude_first=True, positions=(0, 400)))
    return store, res


def test_results_json_follows_the_schema(setup, tmp_path) -> None:
    store, res = setup
    saved = save_results(res, tmp_path / "out", run_id="run-1", config={"store": "x"})
    doc = json.loads(saved.json_path.read_text())
    assert doc["schema"] == SCHEMA and doc["run_id"] == "run-1" and doc["config"] == {"store": "x"}
    assert (doc["a"], doc["b"], doc["corpus"]) == ("a", "b", store.model_info("a").corpus)
    assert doc["n_tokens"] == res.n_tokens and doc["alignment"] is None  # one corpus: nothing aligned
    assert doc["token_filter"] == {"exclude_special": False, "exclude_first": True, "positions": [0, 400], "fields": None,
                                   "docs": None, "tokens": None}
    assert doc["hidden_states_a"] == doc["hidden_states_b"] == doc["matched_hidden_states"] == [0, 1, 2, 3]
    m = doc["metrics"]
    assert m["cka"]["estimator"] == "biased"
    assert m["cka"]["diagonal"] == [c.value for c in res.cka]
    assert np.array(m["cka"]["matrix"]).shape == (4, 4) and np.array(m["dimcorr"]["matrix"]).shape == (4, 4)
    assert len(m["cka"]["debiased_diagonal"]) == 4
    assert m["dimcorr"]["diagonal"] == [d.mean for d in res.dimcorr] and m["dimcorr"]["n_dims"] == 16
    assert set(m["dimcorr"]) >= {"median", "q25", "q75", "min", "max", "n_degenerate"}
    assert m["procrustes"]["h_inv"] == [p.h_inv for p in res.procrustes]
    assert len(m["procrustes"]["residual"]) == 4 and m["procrustes"]["underdetermined"] == [False] * 4
    assert m["procrustes"]["rotations"] == [f"procrustes_rotation_{k}.npy" for k in range(4)]
    assert doc["plan"]["passes"] == res.plan.passes and doc["settings"]["backend"] == "numpy"
    rotation = np.load(tmp_path / "out" / "procrustes_rotation_2.npy")
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(16), atol=1e-10)


def test_save_results_writes_no_figures_and_returns_the_document(setup, tmp_path) -> None:
    _, res = setup
    saved = save_results(res, tmp_path, run_id="run-2")
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [*(f"procrustes_rotation_{k}.npy" for k in range(4)), "results.json"]  # no PNG
    assert read_results(tmp_path) == (saved.json_path, saved.doc)  # the reader gives back what the writer wrote
    assert [p.name for p in saved.rotations] == saved.doc["metrics"]["procrustes"]["rotations"]


def test_results_go_into_the_store(setup, tmp_path) -> None:
    store, res = setup
    saved = save_results(res, tmp_path, store=store, run_id="run-3")
    assert saved.store_path == "results/run-3"
    group = store.results_record("run-3")
    assert group.attrs[ATTRS_KEY]["run_id"] == "run-3"
    np.testing.assert_allclose(group["cka/matrix"][:], res.cka_matrix)
    np.testing.assert_allclose(group["procrustes/h_inv"][:], [p.h_inv for p in res.procrustes])
    assert group["procrustes/rotation/1"].shape == (16, 16)
    with pytest.raises(UserError, match="already holds"):
        save_results(res, tmp_path, store=store, run_id="run-3")


def test_a_read_only_store_and_a_bad_run_id_are_user_errors(setup, tmp_path) -> None:
    store, res = setup
    from hrsa.store import ActivationStore

    read_only = ActivationStore.open(store.url, mode="r")
    with pytest.raises(UserError, match="writable"):
        write_to_store(read_only, res, results_dict(res, run_id="run-4"))
    with pytest.raises(UserError, match="run id"):
        save_results(res, tmp_path, run_id="../escape")


def test_nan_is_written_as_null(setup) -> None:
    _, res = setup
    from dataclasses import replace

    nan_matrix = res.cka_matrix.copy()
    nan_matrix[0, 1] = math.nan
    doc = results_dict(replace(res, cka_matrix=nan_matrix), run_id="r")
    assert doc["metrics"]["cka"]["matrix"][0][1] is None
    json.dumps(doc, allow_nan=False)


def test_run_ids_are_valid_slugs(setup) -> None:
    _, res = setup
    run_id = new_run_id(res)
    assert run_id.startswith("a--b--") and len(run_id) <= 128


def test_runs_without_an_id_in_the_same_second_each_get_their_own_record(fresh_pair_store, tmp_path,
                                                                          monkeypatch) -> None:
    """The default id is the pair and the second: a second run within that second (a script, a loop) must not
    fail after its passes over a taken id, nor overwrite the first; it takes the next free id."""
    from datetime import UTC, datetime

    import hrsa.analyze.results as results_module

    store = fresh_pair_store.open("r+")
    res = analyze_pair(store, "a", "b", metrics=("cka",), backend="numpy")
    frozen = datetime(2026, 12, 3, 11, 35, 24, tzinfo=UTC)
    monkeypatch.setattr(results_module, "new_run_id", lambda r, now=None: new_run_id(r, now=frozen))
    ids = [save_results(res, tmp_path / str(i), store=store).run_id for i in range(3)]
    assert ids == ["a--b--20261203T113524Z", "a--b--20261203T113524Z-2", "a--b--20261203T113524Z-3"]
    assert set(ids) <= set(store.results_ids())
    with pytest.raises(UserError, match="Expected a new run id"):  # an id the user gave is never changed
        save_results(res, tmp_path / "given", store=store, run_id=ids[0])


def test_find_results_takes_files_folders_and_parents(setup, tmp_path) -> None:
    _, res = setup
    one = save_results(res, tmp_path / "runs" / "one", run_id="one").json_path
    two = save_results(res, tmp_path / "runs" / "two", run_id="two").json_path
    assert find_results([one]) == [one] and find_results([one.parent]) == [one]
    assert find_results([tmp_path / "runs"]) == [one, two]  # a parent: each subfolder's results.json, sorted
    with pytest.raises(ResultsFileError, match="Got 2 in its subfolders"):
        read_results(tmp_path / "runs")


_EDITED = '{"schema": "%s", "a": "a", "b": "b", "matched_hidden_states": [0], "metrics": {"cka": {"diagonal": [%s]}}}'


@pytest.mark.parametrize("bad", ["missing", "empty-folder", "not-json", "wrong-schema", "no-metrics", "Infinity",
                                 "-Infinity"])
def test_read_results_rejects(bad: str, tmp_path) -> None:
    """An infinite CKA is no result of any metric: refused, not drawn (a NaN literal reads as undefined, as null
    does: tests/analyze/test_report.py::test_valid_edge_values_are_read)."""
    files = {"not-json": "{not json", "wrong-schema": json.dumps({"schema": "hrsa.other/9"}),
             "no-metrics": json.dumps({"schema": SCHEMA, "a": "a", "b": "b", "matched_hidden_states": []}),
             **{c: _EDITED % (SCHEMA, c) for c in ("Infinity", "-Infinity")}}
    path = tmp_path / "nope" if bad == "missing" else tmp_path
    if bad in files:
        path = tmp_path / "results.json"
        path.write_text(files[bad])
    with pytest.raises(ResultsFileError) as info:
        read_results(path)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith("Expected") and "\n" not in str(info.value)


def test_replace_reruns_over_an_interrupted_run(fresh_pair_store, tmp_path) -> None:
    """A run that stopped after creating its record (arrays, no document) and left a figure of an earlier setting:
    with replace=True the re-run ends with one complete record of that id and no stray file; others stay."""
    from hrsa.analyze.config import AnalyzeConfig
    from hrsa.analyze.job import run_analysis

    store = fresh_pair_store.open("r+")
    stale = store.create_results("rerun")  # as an interrupted write leaves it: arrays, no document
    stale.create_array("cka/diagonal", data=np.zeros(4))
    store.create_results("other-run").attrs[ATTRS_KEY] = {"run_id": "other-run"}
    out = tmp_path / "out"
    out.mkdir()
    (out / "knn_overlap.png").write_bytes(b"an earlier setting's figure")
    config = AnalyzeConfig(store=fresh_pair_store.url, pair=("a", "b"), metrics=("cka",), backend="numpy", out=out,
                           run_id="rerun")
    with pytest.raises(UserError, match="already holds"):  # without replace the stale record blocks the run
        run_analysis(config)
    run = run_analysis(config, replace=True)
    store = fresh_pair_store.open()
    assert store.results_ids() == ["other-run", "rerun"]
    record = store.results_record("rerun")
    assert record.attrs[ATTRS_KEY]["run_id"] == "rerun" and sorted(record.group_keys()) == ["cka"]
    np.testing.assert_allclose(record["cka/diagonal"][:], [c.value for c in run.results.cka])
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.json", *(p.name for p in run.figures)])
    assert not (out / "knn_overlap.png").exists()
