"""Results name the models they compared by what the store knew of them (source, content digest, settings), not
only by id: a model deleted and extracted again under the same id is another model, and the report says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hrsa.analyze.pair import analyze_pair
from hrsa.analyze.report.cli import report
from hrsa.analyze.report.html import write_report
from hrsa.analyze.results import read_results, save_results
from hrsa.cli import cli
from hrsa.store import ActivationStore
from hrsa.store.format import ATTRS_KEY
from hrsa.store.testing import make_table

D, STATES = 8, 3
DIGEST_1 = "1f" * 16
DIGEST_2 = "2e" * 16


def _put(store: ActivationStore, mid: str, cid: str, x: dict[int, np.ndarray], source: dict) -> None:
    store.create_model(mid, corpus=cid, n_hidden_states=STATES, hidden_size=D, dtype="float32", source=source,
                       extraction={"max_length": 512}, chunk_tokens=64, shard_tokens=256)
    writer = store.writer(mid)
    for unit in writer.units():
        writer.write_unit(unit, {k: v[unit.start : unit.stop].astype(np.float32) for k, v in x.items()})


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[ActivationStore, Path, Path]:
    """a vs b, then b deleted and another model extracted as b, then a vs b again: (store, old results, new)."""
    root = tmp_path_factory.mktemp("provenance")
    rng = np.random.default_rng(1)
    store = ActivationStore.open(str(root / "store"), mode="a")
    table = make_table((40, 30, 50))
    cid = store.write_corpus(table, tokenizer={"name": "tok", "fingerprint": "fp"}, source="test")
    x = {k: rng.normal(size=(table.n_tokens, D)) for k in range(STATES)}
    _put(store, "a", cid, x, {"kind": "hub", "id": "org/base", "revision": "abc123", "content": None})
    _put(store, "b", cid, {k: v + 0.1 * rng.normal(size=v.shape) for k, v in x.items()},
         {"kind": "local", "path": "/models/tuned-v1", "content": DIGEST_1})
    old = save_results(analyze_pair(store, "a", "b", metrics=("cka",), backend="numpy", scheduler="sync"),
                       root / "old", store=store, run_id="old-run").json_path
    store.delete_model("b")
    _put(store, "b", cid, {k: rng.normal(size=v.shape) for k, v in x.items()},
         {"kind": "local", "path": "/models/tuned-v2", "content": DIGEST_2})
    new = save_results(analyze_pair(store, "a", "b", metrics=("cka",), backend="numpy", scheduler="sync"),
                       root / "new", store=store, run_id="new-run").json_path
    return store, old, new


def test_results_record_each_models_identity(two_runs) -> None:
    store, old, new = two_runs
    _, doc = read_results(old)
    b = doc["models"]["b"]
    assert b["source"] == {"kind": "local", "path": "/models/tuned-v1", "content": DIGEST_1}
    assert (b["dtype"], b["corpus"], b["hidden_states"], b["complete"]) == ("float32", doc["corpus"], [0, 1, 2], True)
    assert b["units_done"] == b["n_units"] > 0 and b["extraction"] == {"max_length": 512}
    assert doc["models"]["a"]["source"]["revision"] == "abc123" and doc["models"]["a"]["source"]["content"] is None
    _, doc_new = read_results(new)
    assert doc_new["models"]["a"]["identity"] == doc["models"]["a"]["identity"]  # the same a in both runs
    assert doc_new["models"]["b"]["identity"] != b["identity"]  # another b under the same id
    record = store.results_record("old-run").attrs[ATTRS_KEY]
    assert record["models"] == doc["models"]  # the store's record holds them too


def test_provenance_shows_each_models_source_and_digest(two_runs, tmp_path: Path) -> None:
    _, old, _ = two_runs
    page = write_report([old], tmp_path / "r.html").read_text()
    prov = page.split("<h3>Provenance</h3>")[1].split("</dl>")[0]
    assert "local:/models/tuned-v1" in prov and DIGEST_1[:12] in prov
    assert "hub:org/base@abc123" in prov
    assert "different models" not in page  # one results file: nothing to contradict


def test_report_warns_when_one_id_names_different_models(two_runs, tmp_path: Path) -> None:
    _, old, new = two_runs
    page = write_report([old, new], tmp_path / "r.html").read_text()
    warnings = [line for line in page.splitlines() if 'class="warning"' in line]
    assert len(warnings) == 1 and "b" in warnings[0] and "old-run" in warnings[0] and "new-run" in warnings[0]
    result = CliRunner().invoke(type(cli)(commands=[report]), ["report", str(old), str(new), "--out", str(tmp_path / "c.html")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("hrsa: warning:")]
    assert len(lines) == 1 and "model b" in lines[0] and "old-run" in lines[0] and "new-run" in lines[0]


def test_results_without_identities_still_render(two_runs, tmp_path: Path) -> None:
    """Results of an earlier hrsa hold no "models": the report renders them, and warns of nothing it cannot tell."""
    _, old, new = two_runs
    copies = []
    for name, path in (("o", old), ("n", new)):
        doc = json.loads(path.read_text())
        del doc["models"]
        (tmp_path / name).mkdir()
        copies.append((tmp_path / name / "results.json"))
        copies[-1].write_text(json.dumps(doc))
    page = write_report(copies, tmp_path / "r.html").read_text()
    assert "<h3>Provenance</h3>" in page and 'class="warning"' not in page
    assert "not recorded" in page


def test_store_rm_names_the_result_records_of_the_model(tmp_path: Path, two_runs) -> None:
    store, _, _ = two_runs
    import shutil

    url = str(tmp_path / "copy")
    shutil.copytree(store.url if "://" not in store.url else store.url.split("://", 1)[1], url)
    result = CliRunner().invoke(cli, ["store", "rm", url, "b", "--yes"])
    assert result.exit_code == 0, result.output
    assert "deleted b" in result.stdout and "2 result record(s)" in result.stdout and "kept" in result.stdout
    assert ActivationStore.open(url).results_ids() == ["new-run", "old-run"]  # left as they were


def test_one_model_in_two_stores_over_two_corpora_is_not_warned_of_as_deleted(tmp_path: Path) -> None:
    """The same weights extracted into two stores, each over its own corpus (one study's datasets), have two identities
    (the identity holds the corpus and extraction settings): the report warned "model a names 2 different models ...
    It was deleted and extracted again between the analyses", of models never deleted. An id names one model within
    one store; across stores it is not a deletion, and the report must not say so."""
    rng = np.random.default_rng(2)
    outs = []
    for name, lengths in (("cot", (40, 30, 50)), ("mail", (60, 20))):
        store = ActivationStore.open(str(tmp_path / name), mode="a")
        table = make_table(lengths)
        cid = store.write_corpus(table, tokenizer={"name": "tok", "fingerprint": "fp"}, source=name)
        x = {k: rng.normal(size=(table.n_tokens, D)) for k in range(STATES)}
        _put(store, "a", cid, x, {"kind": "local", "path": "/models/base", "content": DIGEST_1})
        _put(store, "b", cid, {k: v + 0.1 * rng.normal(size=v.shape) for k, v in x.items()},
             {"kind": "local", "path": "/models/tuned", "content": DIGEST_2})
        out = tmp_path / f"out-{name}"
        result = CliRunner().invoke(cli, ["analyze", "--store", str(tmp_path / name), "--pair", "a", "b", "--metrics",
                                          "cka", "--scheduler", "sync", "--out", str(out)])
        assert result.exit_code == 0, result.output
        outs.append(out)
    result = CliRunner().invoke(cli, ["report", *map(str, outs), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert "hrsa: warning:" not in result.stderr and "deleted" not in result.stderr, result.stderr
    assert 'class="warning"' not in (tmp_path / "r.html").read_text()


def test_the_same_store_named_two_ways_is_one_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Identities are grouped by store, by the store each run names: `--store store` from the project folder and
    `--store /abs/.../store` (or the pipeline, which names it absolute) are one store, so b deleted and extracted again
    between them must still be warned of (it was not: two store names, two groups)."""
    rng = np.random.default_rng(2)
    monkeypatch.chdir(tmp_path)
    store = ActivationStore.open("store", mode="a")
    table = make_table((40, 30))
    cid = store.write_corpus(table, tokenizer={"name": "tok", "fingerprint": "fp"}, source="test")
    x = {k: rng.normal(size=(table.n_tokens, D)) for k in range(STATES)}
    _put(store, "a", cid, x, {"kind": "local", "path": "/models/base", "content": None})
    _put(store, "b", cid, x, {"kind": "local", "path": "/models/tuned-v1", "content": DIGEST_1})

    def analyze(name: str, out: str) -> None:
        result = CliRunner().invoke(cli, ["analyze", "--store", name, "--pair", "a", "b", "--metrics", "cka",
                                          "--backend", "numpy", "--run-id", out, "--out", out])
        assert result.exit_code == 0, result.output

    analyze("store", "first")
    store.delete_model("b")
    _put(store, "b", cid, {k: rng.normal(size=v.shape) for k, v in x.items()},
         {"kind": "local", "path": "/models/tuned-v2", "content": DIGEST_2})
    analyze(str(tmp_path / "store"), "second")
    result = CliRunner().invoke(cli, ["report", "first", "second", "--out", "r.html"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("hrsa: warning:")]
    assert len(lines) == 1 and "model b" in lines[0] and "first" in lines[0] and "second" in lines[0], result.stderr
