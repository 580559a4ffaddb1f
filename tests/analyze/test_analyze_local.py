"""k-NN overlap and probes through ``analyze_pair`` and ``hrsa analyze``: results.json, store arrays, figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hrsa.analyze.local.knn import KnnOptions
from hrsa.analyze.local.probe import ProbeOptions
from hrsa.analyze.pair import analyze_pair
from hrsa.analyze.report.figures import plot_figures
from hrsa.analyze.results import save_results
from hrsa.cli import cli
from hrsa.store.errors import UserError
from hrsa.store.selection import TokenSelection


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["analyze", *args])
    return result.exit_code, result.stdout, result.stderr


def test_analyze_pair_local_metrics_only(labelled_store, tmp_path: Path) -> None:
    store, _, _ = labelled_store
    res = analyze_pair(store, "a", "c", metrics=("knn", "probe"), selection=TokenSelection(exclude_special=True),
                       knn_options=KnnOptions(ks=(5, 10), n_sample=500), probe_options=ProbeOptions(label_field="label"),
                       backend="numpy")
    assert res.cka is None and res.plan.passes == 0  # no streaming pass without streaming metrics
    assert res.knn is not None and res.knn.n_tokens == 500
    assert all(v.mean == 1.0 for values in res.knn.overlap.values() for v in values)  # c is a copy of a
    assert res.probe is not None and all(r.source == r.target for r in res.probe.a_to_b.values())
    saved = save_results(res, tmp_path, run_id="local-metrics", store=store)
    stored = store.group("results")["local-metrics"]
    assert stored["knn/k/5"][:].tolist() == [1.0, 1.0] and stored["knn/hidden_states"][:].tolist() == [0, 1]
    doc = json.loads(saved.json_path.read_text())
    assert doc["metrics"]["knn"]["k"] == {"5": [1.0, 1.0], "10": [1.0, 1.0]} and doc["metrics"]["knn"]["n_tokens"] == 500
    test = doc["metrics"]["probe"]["1"]["target"]["test"]
    assert set(test) == {"accuracy", "macro_f1", "n"} and test["accuracy"] > 0.85
    assert {p.name for p in plot_figures(saved.doc, tmp_path)} == {"knn_overlap.png", "probe.png"}


def test_analyze_pair_probe_needs_labels(labelled_store) -> None:
    store, _, _ = labelled_store
    with pytest.raises(UserError, match="label field"):
        analyze_pair(store, "a", "b", metrics=("probe",), backend="numpy")


def test_cli_knn_and_probe_with_streaming_metrics(labelled_store, tmp_path: Path) -> None:
    store, _, _ = labelled_store
    out = tmp_path / "out"
    code, stdout, stderr = run("--store", store.url, "--pair", "a", "b", "--metrics", "cka,knn,probe", "--k", "5,10",
                               "--knn-sample", "300", "--knn-search", "hnsw", "--label-field", "label", "--pool", "last",
                               "--probe-both-directions", "--exclude-special", "--backend", "numpy", "--out", str(out),
                               "--no-store-results")
    assert code == 0, stderr
    assert "kNN@5" in stdout and "probe test acc" in stdout
    doc = json.loads((out / "results.json").read_text())
    knn, probe = doc["metrics"]["knn"], doc["metrics"]["probe"]
    assert knn["search"] == "hnsw" and len(knn["recall"]["5"]) == 2 and knn["n_tokens"] == 300
    assert all(v > 0.9 for v in knn["k"]["10"])  # b is a rotation of a: 1 with exact search, nearly so with HNSW
    assert all(0.9 <= r <= 1.0 for pair in knn["recall"]["10"] for r in pair)
    assert set(probe) == {"0", "1"} and "reverse" in probe["0"]
    assert doc["settings"]["probe"]["pool"] == "last" and doc["config"]["k"] == [5, 10]
    assert (out / "knn_overlap.png").exists() and (out / "probe.png").exists()


def test_cli_probe_without_label_field_is_one_line(labelled_store, tmp_path: Path) -> None:
    store, _, _ = labelled_store
    code, _, stderr = run("--store", store.url, "--pair", "a", "b", "--metrics", "probe", "--out", str(tmp_path / "o"))
    assert code == 2 and stderr.count("\n") == 1 and "--label-field" in stderr


def test_help_documents_the_local_flags() -> None:
    code, out, _ = run("--help")
    assert code == 0
    for flag in ("--k", "--knn-sample", "--knn-search", "--seed", "--hidden-states", "--label-field", "--labels", "--pool",
                 "--probe-both-directions"):
        assert flag in out


def test_cli_labels_of_mixed_kinds_are_one_line_and_create_nothing(labelled_store, tmp_path: Path) -> None:
    """Labels 1 and "1" in one file made two classes of one label, silently: refused in one line, exit 2."""
    store, _, labels = labelled_store
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"id": f"rec-{i}", "label": 1 if v == "spam" else "0"}) + "\n"
                             for i, v in enumerate(labels)))
    results_before = sorted(store.results_ids())
    out = tmp_path / "o"
    code, _, stderr = run("--store", store.url, "--pair", "a", "b", "--metrics", "cka,probe", "--label-field", "label",
                          "--labels", str(mixed), "--out", str(out), "--run-id", "mixed-labels")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "to be of one type" in stderr and "Make the labels one type" in stderr
    assert not out.exists() and sorted(store.results_ids()) == results_before


def test_cli_hidden_states_count_from_the_end_and_results_name_the_index(labelled_store, tmp_path: Path) -> None:
    """`hrsa store get --layer -1` reads the last hidden state; `hrsa analyze --hidden-states -1` refused it."""
    store, _, _ = labelled_store
    out = tmp_path / "out"
    code, _, stderr = run("--store", store.url, "--pair", "a", "b", "--metrics", "knn,probe", "--k", "5",
                          "--knn-sample", "300", "--label-field", "label", "--hidden-states=-1", "--backend", "numpy",
                          "--out", str(out), "--run-id", "last-state")
    assert code == 0, stderr
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["metrics"]["probe"]) == {"1"} and doc["metrics"]["knn"]["hidden_states"] == [1]
    assert doc["settings"]["knn"]["hidden_states"] == [1] and doc["settings"]["probe"]["hidden_states"] == [1]
    assert store.group("results")["last-state"]["knn/hidden_states"][:].tolist() == [1]


def test_cli_hidden_states_out_of_range_from_the_end_is_one_line(labelled_store, tmp_path: Path) -> None:
    store, _, _ = labelled_store
    out = tmp_path / "out"
    code, _, stderr = run("--store", store.url, "--pair", "a", "b", "--metrics", "knn", "--hidden-states", "-3",
                          "--backend", "numpy", "--out", str(out), "--no-store-results")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "(0, 1; from the end -2, -1). Got -3 instead" in stderr and not out.exists()


@pytest.mark.parametrize("name", ["results.json", "layers.png", "procrustes_rotation_0.npy"])
def test_an_output_name_held_by_a_folder_is_refused_before_any_work(pair_store, tmp_path: Path, monkeypatch,
                                                                    name: str) -> None:
    """A folder at --out/results.json failed with IsADirectoryError once every pass had run (and the run's store
    record was taken); the README promises a refusal before any work for an output path something else holds."""
    import hrsa.analyze.job as job

    out = tmp_path / "o"
    (out / name / "kept").mkdir(parents=True)
    monkeypatch.setattr(job, "_compare", lambda *a, **k: pytest.fail("the passes ran"))
    code, _, stderr = run("--store", pair_store.url, "--pair", "a", "b", "--metrics", "cka,procrustes",
                          "--save-rotation", "--out", str(out), "--no-store-results")
    assert code == 2 and stderr.count("\n") == 1 and str(out / name) in stderr, stderr
    assert (out / name / "kept").is_dir() and sorted(p.name for p in out.iterdir()) == [name]
