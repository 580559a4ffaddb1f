"""``hrsa report``: a self-contained HTML report from real results of ``analyze_pair`` (every metric, cross-layer).

One labelled store holds model ``a`` and three partners whose relation to it is known by construction:
``scaled`` (2.5 a: identical up to scale, identity rotation), ``rotated`` (a Q, Q a random rotation: the same
geometry in another basis) and ``random`` (unrelated Gaussian data). The verdicts follow from that.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hrsa.analyze.local.knn import KnnOptions
from hrsa.analyze.local.probe import ProbeOptions
from hrsa.analyze.pair import analyze_pair
from hrsa.analyze.report.cli import report
from hrsa.analyze.report.dynamics import write_dynamics
from hrsa.analyze.report.html import write_report
from hrsa.analyze.report.summary import CKA_PRESERVED, KNN_PRESERVED, Thresholds, summarize
from hrsa.analyze.results import ResultsFileError, read_results, results_dict, write_json
from hrsa.cli import cli
from hrsa.store import ActivationStore
from hrsa.store.errors import UserError
from hrsa.store.testing import make_table

D, STATES, N_DOCS = 16, 4, 200
PARTNERS = ("scaled", "rotated", "random")
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _build_store(root: Path) -> ActivationStore:
    """Labelled documents (ham/spam in a jsonl source); model a carries the label in dimensions 0-1."""
    rng = np.random.default_rng(5)
    lengths = tuple(int(n) for n in rng.integers(3, 10, size=N_DOCS))
    labels = rng.choice(["ham", "spam"], size=N_DOCS)
    source = root / "mail.jsonl"
    source.write_text("".join(json.dumps({"id": f"rec-{i}", "label": str(v), "text": "t"}) + "\n" for i, v in enumerate(labels)))
    table = make_table(lengths)
    store = ActivationStore.open(str(root / "store"), mode="a")
    cid = store.write_corpus(table, tokenizer={"name": "tok", "fingerprint": "fp"}, source=str(source),
                             extra={"corpus_spec": {"source": str(source), "text": "text", "id_field": None}})
    sign = np.repeat(np.where(labels == "spam", 1.0, -1.0), lengths)  # (N,)
    x = {0: rng.normal(size=(table.n_tokens, D))}
    x[0][:, :2] += sign[:, None]
    for k in range(1, STATES):
        x[k] = x[k - 1] + 0.5 * rng.normal(size=(table.n_tokens, D))  # (N, D): each layer drifts a bit
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))  # (D, D) random rotation
    models = {"a": x, "scaled": {k: 2.5 * v for k, v in x.items()}, "rotated": {k: v @ q for k, v in x.items()},
              "random": {k: rng.normal(size=v.shape) for k, v in x.items()}}
    for mid, states in models.items():
        store.create_model(mid, corpus=cid, n_hidden_states=STATES, hidden_size=D, dtype="float32", chunk_tokens=64, shard_tokens=256)
        writer = store.writer(mid)
        for unit in writer.units():
            writer.write_unit(unit, {k: v[unit.start : unit.stop].astype(np.float32) for k, v in states.items()})
    return store


@pytest.fixture(scope="module")
def results_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{partner: folder of results.json} for a against each partner, every metric, cross-layer, both probe directions."""
    root = tmp_path_factory.mktemp("report")
    store = _build_store(root)
    out = {}
    for partner in PARTNERS:
        res = analyze_pair(store, "a", partner, metrics=("dimcorr", "cka", "procrustes", "knn", "probe"), cross_layer=True,
                           debiased=True, backend="numpy", scheduler="sync", knn_options=KnnOptions(ks=(5, 10, 50)),
                           probe_options=ProbeOptions(label_field="label", both_directions=True))
        # results.json as save_results writes it, without its PNGs (the report draws its own)
        out[partner] = write_json(results_dict(res, run_id=f"a-vs-{partner}"), root / f"out-{partner}").parent
    return out


@pytest.fixture(scope="module")
def report_html(results_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("html")
    dyn = write_dynamics(root / "dynamics.json", runs=("run-1", "run-2"), steps=[0, 10, 20],
                         results=[results_dirs[p] for p in PARTNERS])
    return write_report([results_dirs[p] for p in PARTNERS], root / "report.html", dynamics=dyn, title="HRSA <b>&</b> co")


def test_report_is_self_contained_and_holds_every_section(report_html: Path, results_dirs: dict[str, Path]) -> None:
    page = report_html.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)  # nothing fetched from elsewhere
    assert "<script" not in page.lower() and "<link" not in page.lower()
    for section in ("Summary by level (Table 2)", "Cross-layer similarity (Figure 3)", "Procrustes H_inv (Table 3)",
                    "k-NN overlap (Table 4)", "Cross-model linear probes (Figure 4)", "Training dynamics (Figure 5)",
                    "Provenance", "Thresholds"):
        assert section in page, section
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3 * 4 + 1  # per pair: 2 heatmaps, k-NN, probes; one dynamics figure
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert "HRSA &lt;b&gt;&amp;&lt;/b&gt; co" in page and "<b>&</b>" not in page  # the title is escaped
    for partner, folder in results_dirs.items():
        doc = json.loads((folder / "results.json").read_text())
        for value in (doc["run_id"], doc["corpus"], str(doc["n_tokens"]), doc["hrsa_version"], doc["created"]):
            assert value in page
        for h in doc["metrics"]["procrustes"]["h_inv"]:  # Table 3, 3 decimals
            assert f'<td class="num">{h:.3f} ± ' in page  # with half its jackknife interval
        for values in doc["metrics"]["knn"]["k"].values():  # Table 4
            assert all(f'<td class="num">{v:.3f} ± ' in page for v in values)  # with its bootstrap interval
        accuracy = doc["metrics"]["probe"]["2"]["reverse"]["target"]["test"]["accuracy"]  # Figure 4's table, B -> A
        assert f'<td class="num">{accuracy:.3f} [' in page  # with its Wilson interval, [low, high]
        assert f"a vs {partner}" in page


@pytest.mark.parametrize(("partner", "expected"), [
    ("scaled", {"representation": "preserved", "geometry": "preserved", "function": "preserved"}),
    # same geometry in a rotated basis: coordinates (and so probes) do not carry over
    ("rotated", {"representation": "restructured", "geometry": "preserved", "function": "restructured"}),
    ("random", {"representation": "restructured", "geometry": "restructured", "function": "restructured"}),
])
def test_summary_verdicts(results_dirs: dict[str, Path], partner: str, expected: dict[str, str]) -> None:
    _, doc = read_results(results_dirs[partner])
    summary = summarize(doc)
    assert {lv.level: lv.verdict for lv in summary.levels} == expected
    states = doc["matched_hidden_states"]
    layers = [v for k, v in zip(states, doc["metrics"]["cka"]["diagonal"]) if k != 0]  # the embedding output left out
    cka = float(np.mean(layers))
    check = next(c for lv in summary.levels for c in lv.checks if c.metric == "linear CKA")
    assert check.value == pytest.approx(cka) and check.passed == (cka >= CKA_PRESERVED)
    assert 0 in states and "embedding output (hidden state 0) left out" in check.detail
    with_embedding = next(c for lv in summarize(doc, thresholds=Thresholds(exclude_embedding=False)).levels
                          for c in lv.checks if c.metric == "linear CKA")
    assert with_embedding.value == pytest.approx(float(np.mean(doc["metrics"]["cka"]["diagonal"])))
    knn = next(c for lv in summary.levels for c in lv.checks if c.metric.startswith("k-NN"))
    assert knn.metric == "k-NN overlap at k = 10" and knn.passed == (np.mean(doc["metrics"]["knn"]["k"]["10"]) >= KNN_PRESERVED)


def test_thresholds_are_overridable_and_stated(results_dirs: dict[str, Path], tmp_path: Path) -> None:
    _, scaled = read_results(results_dirs["scaled"])
    _, unrelated = read_results(results_dirs["random"])
    assert summarize(scaled, thresholds=Thresholds(cka=1.01)).verdict("geometry") == "restructured"  # CKA is 1.0
    assert summarize(unrelated, thresholds=Thresholds(cka=0.0, knn=0.0)).verdict("geometry") == "preserved"
    assert summarize(scaled, thresholds=Thresholds(knn_k=40)).levels[1].checks[1].metric == "k-NN overlap at k = 50"
    page = write_report([results_dirs["random"]], tmp_path / "r.html", thresholds=Thresholds(cka=0.0, knn=0.0, h_inv=0.123)).read_text()
    assert "&gt;= 0.123" in page and page.count('class="preserved">preserved') >= 2
    no_probe = {**unrelated, "metrics": {k: v for k, v in unrelated["metrics"].items() if k != "probe"}}
    assert summarize(no_probe).verdict("function") == "not measured"


def test_probes_that_ran_without_signal_are_said_so_not_taken_for_unmeasured(results_dirs: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """Probes whose source readouts never beat chance by the minimum signal leave transfer undefined: the report
    said "function not measured" above the probe table that showed them."""
    _, doc = read_results(results_dirs["random"])
    silent = json.loads(json.dumps(doc))
    for entry in silent["metrics"]["probe"].values():
        for direction in (entry, entry.get("reverse")):
            if direction:
                direction["source"]["test"]["accuracy"] = entry["chance"]  # no signal above chance
                direction["test_accuracy_interval"] = None  # those of the scores replaced
    assert summarize(silent).verdict("function") == "no signal"
    page = write_report([write_json(silent, tmp_path / "silent")], tmp_path / "r.html").read_text()
    assert 'class="no-signal">no signal' in page and "function not measured" not in page


@pytest.mark.parametrize("bad", ["empty", "missing", "empty-folder", "wrong-schema", "not-json"])
def test_bad_inputs_are_user_errors(bad: str, tmp_path: Path) -> None:
    paths = {"empty": [], "missing": [tmp_path / "nope"], "empty-folder": [tmp_path], "wrong-schema": [tmp_path / "w.json"],
             "not-json": [tmp_path / "n.json"]}[bad]
    (tmp_path / "w.json").write_text(json.dumps({"schema": "hrsa.other/9"}))
    (tmp_path / "n.json").write_text("{not json")
    with pytest.raises(ResultsFileError) as info:
        write_report(paths, tmp_path / "out.html")
    assert isinstance(info.value, UserError) and "\n" not in str(info.value) and str(info.value).startswith("Expected")
    assert not (tmp_path / "out.html").exists()


def test_cli_report(results_dirs: dict[str, Path], tmp_path: Path) -> None:
    hrsa = type(cli)(commands=[report])  # hrsa's own group class: a UserError becomes one line and exit 2
    config = tmp_path / "report.yaml"
    config.write_text(f"results: [{results_dirs['scaled']}, {results_dirs['random']}]\nmin_cka: 0.5\n")
    result = CliRunner().invoke(hrsa, ["report", "--config", str(config), "--out", str(tmp_path / "r.html"), "--min-knn", "0.25"])
    assert result.exit_code == 0, result.output
    assert "a vs scaled: representation preserved, geometry preserved, function preserved" in result.stdout
    assert "a vs random: representation restructured, geometry restructured" in result.stdout
    page = (tmp_path / "r.html").read_text()
    assert "&gt;= 0.5</td>" in page and "&gt;= c + 0.25 (1 - c)" in page  # the config's and the flag's thresholds
    bad = CliRunner().invoke(hrsa, ["report", str(tmp_path / "r.html"), "--out", str(tmp_path / "s.html")])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "results.json" in bad.stderr


@pytest.mark.parametrize(("flag", "value"), [("--min-cka", "-1"), ("--min-cka", "5"), ("--min-cka", "nan"),
                                            ("--min-knn", "1.5"), ("--min-dimcorr", "-2"), ("--min-h-inv", "inf"),
                                            ("--min-probe-transfer", "-0.1")])
def test_a_threshold_outside_its_metrics_range_is_refused(results_dirs: dict[str, Path], tmp_path: Path, flag: str,
                                                          value: str) -> None:
    """A CKA threshold of -1 turns "restructured" into "preserved": a verdict no one asked for, so out-of-range and
    non-finite thresholds are one line, and no report is written."""
    hrsa = type(cli)(commands=[report])
    result = CliRunner().invoke(hrsa, ["report", str(results_dirs["random"]), "--out", str(tmp_path / "r.html"),
                                       flag, value])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert flag.removeprefix("--").replace("-", "_") in result.stderr and not (tmp_path / "r.html").exists()


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@pytest.mark.skipif(_browser() is None, reason=f"no headless browser ({', '.join(BROWSERS)}) on PATH")
def test_report_renders_in_chromium(report_html: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
                    "--window-size=1280,4000", report_html.as_uri()], check=True, capture_output=True, timeout=120, cwd=tmp_path)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))  # (H, W, 3)
    assert pixels.shape == (4000, 1280, 3)
    non_white = (pixels < 245).any(axis=2).mean()
    colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert non_white > 0.1, f"mostly blank: {non_white:.3f} of pixels not white"
    assert len(colours) > 200, f"only {len(colours)} colours: figures missing?"


def test_without_cross_layer_the_report_draws_profiles(results_dirs: dict[str, Path], tmp_path: Path) -> None:
    _, doc = read_results(results_dirs["rotated"])
    for metric in ("cka", "dimcorr"):
        del doc["metrics"][metric]["matrix"]
    doc["metrics"]["cka"]["diagonal"][1] = None  # an undefined value (NaN is written as null)
    del doc["metrics"]["probe"]
    page = write_report([write_json(doc, tmp_path / "plain")], tmp_path / "r.html").read_text()
    assert "Per-layer similarity" in page and "Cross-layer similarity" not in page and "Figure 4" not in page
    assert '<td class="num">n/a</td>' in page and page.count("data:image/png;base64,") == 2  # profile and k-NN
    assert summarize(doc).verdict("function") == "not measured"


def _table_rows(page: str, anchor: str) -> list[list[str]]:
    """The cells' texts of each body row of the table in the section whose heading has ``id=anchor``."""
    section = page.split(f'id="{anchor}"', 1)[1].split("<h2", 1)[0]
    body = section.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_table_2_side_by_side_merges_the_results_of_each_comparison(results_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The paper's study reads two Table 2s side by side (the backbones, the embedding models); each column may draw its
    levels from several results (CoT traces for representation and geometry, a labelled corpus for the probes)."""
    from hrsa.analyze.report.summary import Comparison

    _, scaled = read_results(results_dirs["scaled"])
    _, rotated = read_results(results_dirs["rotated"])
    no_probe = write_json({**scaled, "metrics": {k: v for k, v in scaled["metrics"].items() if k != "probe"}}, tmp_path / "geo")
    probe_only = write_json({**rotated, "run_id": "probes", "metrics": {"probe": rotated["metrics"]["probe"]}}, tmp_path / "fn")
    comparisons = [Comparison("backbones", (0, 1)), Comparison("embedding models", (2,))]
    page = write_report([no_probe, probe_only, results_dirs["random"]], tmp_path / "r.html", comparisons=comparisons).read_text()
    header = page.split('id="table-2"', 1)[1].split("</thead>", 1)[0]
    assert re.findall(r"<th>(.*?)</th>", header) == ["level", "metric", "backbones", "embedding models", "preserved when"]
    rows = _table_rows(page, "table-2")
    verdicts = {row[0]: row[2:4] for row in rows if row[1] == "verdict"}
    assert verdicts == {"representation": ["preserved", "restructured"], "geometry": ["preserved", "restructured"],
                        "function": ["restructured", "restructured"]}  # function from the probes-only results
    cka = next(row for row in rows if row[1] == "linear CKA")
    expected = summarize(scaled).levels[1].checks[0].value
    assert cka[2] == f"{expected:.3f}"
    measured = next(row for row in rows if row[1] == "measured on")
    assert "a-vs-scaled" in measured[2] and "probes" in measured[2] and "a-vs-random" in measured[3]
    # Without comparisons, each results file is its own column.
    plain = write_report([results_dirs[p] for p in PARTNERS], tmp_path / "p.html").read_text()
    header = plain.split('id="table-2"', 1)[1].split("</thead>", 1)[0]
    assert re.findall(r"<th>(.*?)</th>", header)[2:5] == [f"a vs {p}" for p in PARTNERS]


def test_comparisons_must_name_results_that_exist(results_dirs: dict[str, Path], tmp_path: Path) -> None:
    from hrsa.analyze.report.summary import Comparison

    with pytest.raises(UserError, match="^Expected comparisons of results 0-0. Got 3 instead"):
        write_report([results_dirs["scaled"]], tmp_path / "r.html", comparisons=[Comparison("x", (3,))])


# --- review: the output is never an input; forged results; RESULTS named in messages ---------------------------------


def _hrsa():
    return type(cli)(commands=[report])  # hrsa's own group class: a UserError becomes one line and exit 2


def test_out_that_is_an_input_is_refused_before_writing(results_dirs: dict[str, Path], tmp_path: Path) -> None:
    """--out naming a results.json read (or a dynamics file, or a step of one) would overwrite an input with HTML."""
    victim = tmp_path / "victim"
    shutil.copytree(results_dirs["scaled"], victim)
    before = (victim / "results.json").read_bytes()
    dyn = write_dynamics(tmp_path / "d.json", runs=("r1", "r2"), steps=[0, 5], results=[victim, results_dirs["random"]])
    dyn_before = dyn.read_bytes()
    cases = [[str(victim), "--out", str(victim / "results.json")],
             [str(results_dirs["rotated"]), "--dynamics", str(dyn), "--out", str(dyn)],
             [str(results_dirs["rotated"]), "--dynamics", str(dyn), "--out", str(victim / "." / "results.json")]]
    for args in cases:
        result = CliRunner().invoke(_hrsa(), ["report", *args])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert result.stderr.startswith("hrsa: Expected") or "Expected" in result.stderr
        assert "--out" in result.stderr and "input" in result.stderr
    assert (victim / "results.json").read_bytes() == before and dyn.read_bytes() == dyn_before


def test_cli_verdicts_come_from_the_documents_read(results_dirs: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The verdicts printed after writing are those of the report, not of a second read (which may see other files)."""
    import hrsa.analyze.report.html as html

    victim = tmp_path / "victim"
    shutil.copytree(results_dirs["scaled"], victim)
    real_write = html.write_atomic

    def write_then_tamper(path, data):
        out = real_write(path, data)
        (victim / "results.json").write_text("{not json")  # the input changes after the report was made
        return out

    monkeypatch.setattr(html, "write_atomic", write_then_tamper)
    result = CliRunner().invoke(_hrsa(), ["report", str(victim), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert "a vs scaled: representation preserved, geometry preserved, function preserved" in result.stdout


def _forge(doc: dict, bad: str) -> dict:
    m = doc["metrics"]
    n = len(doc["matched_hidden_states"])
    if bad == "metrics-list":
        doc["metrics"] = []
    elif bad == "matched-null":
        doc["matched_hidden_states"] = None
    elif bad == "matched-bool":
        doc["matched_hidden_states"] = [True] * n
    elif bad == "a-number":
        doc["a"] = 3
    elif bad == "diagonal-short":
        m["cka"]["diagonal"] = m["cka"]["diagonal"][: n - 2]
    elif bad == "diagonal-str":
        m["cka"]["diagonal"] = "high"
    elif bad == "cka-above-1":
        m["cka"]["diagonal"] = [5.0] * n
    elif bad == "cka-matrix-shape":
        m["cka"]["matrix"] = m["cka"]["matrix"][:-1]
    elif bad == "dimcorr-degenerate":
        m["dimcorr"]["n_degenerate"] = "none"
    elif bad == "h-inv-short":
        m["procrustes"]["h_inv"] = m["procrustes"]["h_inv"][:1]
    elif bad == "knn-k-word":
        m["knn"]["k"] = {"ten": m["knn"]["k"]["10"]}
    elif bad == "knn-k-short":
        m["knn"]["k"]["10"] = m["knn"]["k"]["10"][:1]
    elif bad == "h-inv-above-1":
        m["procrustes"]["h_inv"] = [5.0] * n
    elif bad == "knn-chance-negative":
        m["knn"]["chance"] = {k: -3.0 for k in m["knn"]["chance"]}
    elif bad == "probe-str":
        m["probe"] = "x"
    elif bad == "probe-accuracy":
        m["probe"]["2"]["target"]["test"]["accuracy"] = "high"
    # An interval of one number: report's table and figures indexed its second and crashed with a traceback.
    elif bad == "knn-interval-one":
        m["knn"]["intervals"]["10"] = [[0.5]] * len(m["knn"]["intervals"]["10"])
    elif bad == "cka-interval-one":
        m["cka"]["intervals"]["diagonal"] = [[0.5]] * n
    elif bad == "probe-interval-one":
        m["probe"]["2"]["test_accuracy_interval"]["source"] = [0.5]
    # Intervals that do not hold their score, and negative counts or spreads, were read as results: the report
    # printed "0.998 ± -0.4" or an interval beside a number outside it.
    elif bad == "cka-interval-away":
        m["cka"]["intervals"]["diagonal"] = [[0.0, 0.01]] * n
    elif bad == "cka-interval-reversed":
        m["cka"]["intervals"]["diagonal"] = [[v + 0.1, v - 0.1] for v in m["cka"]["diagonal"]]
    elif bad == "knn-interval-reversed":
        m["knn"]["intervals"]["10"] = [[0.9, 0.1]] * len(m["knn"]["intervals"]["10"])
    elif bad == "probe-interval-away":
        acc = m["probe"]["2"]["source"]["test"]["accuracy"]
        m["probe"]["2"]["test_accuracy_interval"]["source"] = [acc + 0.2, acc + 0.3] if acc < 0.5 else [0.0, 0.1]
    elif bad == "dimcorr-degenerate-negative":
        m["dimcorr"]["n_degenerate"] = [-1] * n
    elif bad == "cka-se-negative":
        m["cka"]["se"]["diagonal"] = [-0.1] * n
    elif bad == "probe-n-negative":
        m["probe"]["2"]["source"]["test"]["n"] = -4
    elif bad == "n-tokens-negative":
        doc["n_tokens"] = -5
    return doc


FORGERIES = {"metrics-list": "metrics", "matched-null": "matched_hidden_states", "matched-bool": "matched_hidden_states",
             "a-number": "a", "diagonal-short": "metrics.cka.diagonal", "diagonal-str": "metrics.cka.diagonal",
             "cka-above-1": "metrics.cka.diagonal", "cka-matrix-shape": "metrics.cka.matrix",
             "dimcorr-degenerate": "metrics.dimcorr.n_degenerate", "h-inv-short": "metrics.procrustes.h_inv",
             "knn-k-word": "metrics.knn.k", "knn-k-short": "metrics.knn.k.10", "probe-str": "metrics.probe",
             "probe-accuracy": "metrics.probe.2.target.test.accuracy", "knn-interval-one": "metrics.knn.intervals.10",
             "cka-interval-one": "metrics.cka.intervals.diagonal",
             "probe-interval-one": "metrics.probe.2.test_accuracy_interval.source",
             "h-inv-above-1": "metrics.procrustes.h_inv", "knn-chance-negative": "metrics.knn.chance",
             "cka-interval-away": "metrics.cka.intervals.diagonal",
             "cka-interval-reversed": "metrics.cka.intervals.diagonal", "knn-interval-reversed": "metrics.knn.intervals.10",
             "probe-interval-away": "metrics.probe.2.test_accuracy_interval.source",
             "dimcorr-degenerate-negative": "metrics.dimcorr.n_degenerate", "cka-se-negative": "metrics.cka.se.diagonal",
             "probe-n-negative": "metrics.probe.2.source.test.n", "n-tokens-negative": "n_tokens"}


@pytest.mark.parametrize(("bad", "field"), list(FORGERIES.items()))
def test_a_forged_results_file_is_one_line_naming_file_and_field(results_dirs: dict[str, Path], tmp_path: Path,
                                                                   bad: str, field: str) -> None:
    _, doc = read_results(results_dirs["scaled"])
    forged = tmp_path / "forged" / "results.json"
    forged.parent.mkdir()
    forged.write_text(json.dumps(_forge(doc, bad)))
    with pytest.raises(ResultsFileError) as info:
        read_results(forged)
    message = str(info.value)
    assert message.startswith("Expected") and " Got " in message and "instead" in message and "\n" not in message
    assert str(forged) in message and field in message, message
    result = CliRunner().invoke(_hrsa(), ["report", str(forged.parent), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert not (tmp_path / "r.html").exists()


def test_intervals_recorded_as_null_render_without_them(results_dirs: dict[str, Path], tmp_path: Path) -> None:
    """`"intervals": null` (the schema allows a missing group) ended `hrsa report` in a TypeError traceback."""
    _, doc = read_results(results_dirs["scaled"])
    for metric in ("knn", "cka"):
        doc["metrics"][metric]["intervals"] = None
    path = tmp_path / "null" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(doc))
    result = CliRunner().invoke(_hrsa(), ["report", str(path.parent), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").exists()


def test_valid_edge_values_are_read(results_dirs: dict[str, Path], tmp_path: Path) -> None:
    """NaN (null, or a NaN literal) and CKA a rounding error above 1 are results, not forgeries."""
    _, doc = read_results(results_dirs["scaled"])
    n = len(doc["matched_hidden_states"])
    doc["metrics"]["cka"]["diagonal"] = [None, float("nan"), 1.0 + 1e-7, 0.0][:n] + [1.0] * (n - 4)
    doc["metrics"]["cka"]["intervals"] = None  # those of the scores replaced
    path = tmp_path / "edge" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(doc))  # NaN written as the literal NaN (Python's json reads it back)
    assert read_results(path)[1]["metrics"]["cka"]["diagonal"][0] is None


def test_no_results_names_the_positional_arguments_and_yaml_takes_one_string(results_dirs: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    result = CliRunner().invoke(_hrsa(), ["report", "--out", str(tmp_path / "e.html")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "--results" not in result.stderr and "RESULTS" in result.stderr and "results:" in result.stderr
    config = tmp_path / "report.yaml"
    config.write_text(f"results: {results_dirs['scaled']}\n")
    result = CliRunner().invoke(_hrsa(), ["report", "--config", str(config), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert "a vs scaled: representation preserved" in result.stdout and (tmp_path / "r.html").is_file()


def test_out_that_is_not_a_regular_file_or_inside_a_store_is_refused(results_dirs: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """--out over a FIFO replaced it with the report; --out inside an hrsa store overwrote its metadata."""
    import hashlib
    import os

    from hrsa.store import ActivationStore

    os.mkfifo(tmp_path / "fifo")
    store = tmp_path / "store"
    ActivationStore.open(str(store), mode="a")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in store.rglob("*") if p.is_file()}
    for out, message in [(tmp_path / "fifo", "regular file"), (store / "zarr.json", "inside the hrsa store"),
                         (store / "results" / "r.html", "inside the hrsa store"),
                         (store / "new" / "r.html", "inside the hrsa store")]:
        result = CliRunner().invoke(_hrsa(), ["report", str(results_dirs["scaled"]), "--out", str(out)])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert message in result.stderr and "--out" in result.stderr, result.stderr
    assert (tmp_path / "fifo").is_fifo() and not (store / "new").exists()
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in store.rglob("*") if p.is_file()} == before
