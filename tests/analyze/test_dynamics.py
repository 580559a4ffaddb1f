"""Training dynamics: write_dynamics / load_dynamics round trip and the Figure 5 plot, from real results.json files.

Three "checkpoints" of model B at steps 0/10/20 drift away from A (more noise each step), so CKA must fall.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hrsa.analyze.local.knn import KnnOptions
from hrsa.analyze.pair import analyze_pair
from hrsa.analyze.report.dynamics import SCHEMA, load_dynamics, write_dynamics
from hrsa.analyze.report.figures import dynamics_figure, plot_dynamics
from hrsa.analyze.results import ResultsFileError, results_dict, write_json

STEPS = (0, 10, 20)
NOISE = {0: 0.1, 10: 1.0, 20: 4.0}  # per step: how far B's checkpoint has drifted from A


@pytest.fixture(scope="module")
def steps_store(build_store, store_model, tmp_path_factory: pytest.TempPathFactory):
    """A pair store plus checkpoints ``step-<s>`` = A + noise, and each step's results.json under one folder."""
    root = tmp_path_factory.mktemp("dynamics")
    pair = build_store(str(root / "store"), doc_lengths=(300, 200, 100), d=8)
    store = pair.open("r+")
    cid = store.model_info("a").corpus
    rng = np.random.default_rng(3)
    ckpt = {s: store_model(store, f"step-{s}", cid, {k: x + NOISE[s] * x.std(0) * rng.normal(size=x.shape) for k, x in pair.x.items()})
            for s in STEPS}
    results = []
    for s in STEPS:
        res = analyze_pair(store, "a", f"step-{s}", metrics=("cka", "dimcorr", "knn"), backend="numpy", scheduler="sync",
                           knn_options=KnnOptions(ks=(5, 10), n_sample=200))
        results.append(write_json(results_dict(res, run_id=f"step-{s}"), root / "runs" / f"step-{s}"))
    return root, pair, ckpt, results


def _oracle_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA from the feature-space formula in float64 (Kornblith et al. 2019)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(xc.T @ yc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def test_round_trip(steps_store, tmp_path: Path) -> None:
    root, pair, ckpt, results = steps_store
    path = write_dynamics(root / "runs" / "dynamics.json", runs=("base-run", "tuned-run"), steps=[20, 0, 10],
                          results=[results[2], results[0].parent, results[1]])  # any order; a folder works too
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA and doc["runs"] == ["base-run", "tuned-run"]
    assert [e["step"] for e in doc["steps"]] == list(STEPS)
    assert [e["results"] for e in doc["steps"]] == [f"step-{s}/results.json" for s in STEPS]  # relative: the folder can move
    moved = shutil.copytree(root / "runs", tmp_path / "moved")
    dyn = load_dynamics(moved / "dynamics.json")
    assert dyn.runs == ("base-run", "tuned-run") and dyn.steps == STEPS
    assert dyn.pairs == tuple(("a", f"step-{s}") for s in STEPS) and dyn.results[0].is_relative_to(moved)
    assert dyn.cka is not None and dyn.dimcorr is not None and set(dyn.knn) == {5, 10}
    for i, s in enumerate(STEPS):  # per hidden state, against an independent formula on the stored values
        expected = [_oracle_cka(pair.x[k], ckpt[s][k]) for k in sorted(pair.x)]
        assert [dyn.cka.layers[k][i] for k in sorted(pair.x)] == pytest.approx(expected, rel=1e-6)
        assert dyn.cka.mean[i] == pytest.approx(np.mean(expected[1:]), rel=1e-6)  # the embedding output left out
        knn10 = json.loads(results[i].read_text())["metrics"]["knn"]["k"]["10"]
        assert dyn.knn[10].mean[i] == pytest.approx(np.mean(knn10[1:]))
    assert dyn.cka.mean[0] > dyn.cka.mean[1] > dyn.cka.mean[2]  # B drifts away from A
    assert dyn.knn[10].mean[0] > dyn.knn[10].mean[2]


def test_a_step_without_a_metric_leaves_a_gap(steps_store, tmp_path: Path) -> None:
    _, _, _, results = steps_store
    doc = json.loads(results[1].read_text())
    del doc["metrics"]["dimcorr"]
    partial = write_json(doc, tmp_path / "partial")
    dyn = load_dynamics(write_dynamics(tmp_path / "d.json", runs=("r1", "r2"), steps=STEPS,
                                       results=[results[0], partial, results[2]]))
    assert dyn.dimcorr is not None and np.isnan(dyn.dimcorr.mean[1]) and np.isfinite(dyn.dimcorr.mean[::2]).all()
    assert all(np.isnan(v[1]) for v in dyn.dimcorr.layers.values())


def test_figure_5(steps_store, tmp_path: Path) -> None:
    _, _, _, results = steps_store
    dyn = load_dynamics(write_dynamics(tmp_path / "d.json", runs=("r1", "r2"), steps=STEPS, results=results))
    fig = dynamics_figure(dyn)
    cka_ax, dimcorr_ax, knn_ax = fig.axes
    assert [ax.get_xlabel() for ax in fig.axes] == ["training step (0 = the backbones)"] * 3 and dimcorr_ax.get_ylabel() == "mean dimension-wise r"
    mean_line = next(line for line in cka_ax.get_lines() if line.get_label() == "mean over hidden states")
    assert list(mean_line.get_xdata()) == list(STEPS) and np.allclose(mean_line.get_ydata(), dyn.cka.mean)
    assert len(cka_ax.get_lines()) == len(dyn.cka.layers) + 1
    assert {line.get_label() for line in knn_ax.get_lines()} == {"k = 5", "k = 10"}
    png = plot_dynamics(dyn, tmp_path / "fig5.png")
    from matplotlib.image import imread

    image = imread(png)  # (H, W, 4)
    assert image.shape[0] > 300 and image.shape[1] > 3 * image.shape[0] // 2
    assert (image[..., :3] < 0.9).any(axis=2).mean() > 0.02  # lines drawn, not a blank canvas


@pytest.mark.parametrize("bad", ["lengths", "repeated-step", "one-run", "not-results"])
def test_write_dynamics_rejects(steps_store, bad: str, tmp_path: Path) -> None:
    _, _, _, results = steps_store
    kwargs = {"runs": ("r1", "r2"), "steps": list(STEPS), "results": results}
    kwargs |= {"lengths": {"steps": [0, 10]}, "repeated-step": {"steps": [0, 10, 10]}, "one-run": {"runs": ("r1",)},
               "not-results": {"results": [results[0], results[1], tmp_path]}}[bad]
    with pytest.raises(ResultsFileError, match="^Expected"):
        write_dynamics(tmp_path / "d.json", **kwargs)
    assert not (tmp_path / "d.json").exists()


def test_load_dynamics_rejects(steps_store, tmp_path: Path) -> None:
    _, _, _, results = steps_store
    with pytest.raises(ResultsFileError, match="schema hrsa.dynamics/1"):
        load_dynamics(results[0])
    path = write_dynamics(tmp_path / "d.json", runs=("r1", "r2"), steps=STEPS, results=results)
    doc = json.loads(path.read_text())
    doc["steps"][1]["results"] = "gone/results.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ResultsFileError, match="does not exist"):
        load_dynamics(path)


# -- several series, from step 0 (issue 16) -----------------------------------------------------------------------
def test_step_0_is_the_backbones_and_the_series_is_named(steps_store, tmp_path: Path) -> None:
    _, _, _, results = steps_store
    dyn = load_dynamics(write_dynamics(tmp_path / "d.json", runs=("base", "rl"), steps=STEPS, results=results,
                                       name="base-vs-rl"))
    assert dyn.name == "base-vs-rl" and dyn.steps[0] == 0
    unnamed = load_dynamics(write_dynamics(tmp_path / "e.json", runs=("base", "rl"), steps=STEPS, results=results))
    assert unnamed.name == "base vs rl"
    fig = dynamics_figure(dyn)
    assert all("0 = the backbones" in ax.get_xlabel() for ax in fig.axes)  # step 0 is not a checkpoint


def test_mean_changes_say_how_far_each_metric_moved_from_step_0(steps_store, tmp_path: Path) -> None:
    from hrsa.analyze.report.dynamics import mean_changes

    _, _, _, results = steps_store
    dyn = load_dynamics(write_dynamics(tmp_path / "d.json", runs=("base", "rl"), steps=STEPS, results=results))
    changes = {c.label: c for c in mean_changes(dyn)}
    cka = changes["linear CKA"]
    assert (cka.first_step, cka.last_step) == (0, 20)
    assert (cka.first, cka.last) == (pytest.approx(dyn.cka.mean[0]), pytest.approx(dyn.cka.mean[-1]))
    assert cka.change == pytest.approx(cka.last - cka.first) and cka.change < 0  # B drifts away from A
    assert set(changes) == {"linear CKA", "mean dimension-wise r", "k-NN overlap, k = 10"}  # k closest to 10


def test_several_series_on_one_plot(steps_store, tmp_path: Path) -> None:
    """The paper's Figure 5 compares runs: one line per series (its mean over hidden states) in each metric's panel."""
    from hrsa.analyze.report.figures import dynamics_comparison_figure, plot_dynamics_comparison

    _, _, _, results = steps_store
    first = load_dynamics(write_dynamics(tmp_path / "1.json", runs=("base-e", "rl-e"), steps=STEPS, results=results,
                                         name="0.5B"))
    second = load_dynamics(write_dynamics(tmp_path / "2.json", runs=("base-e", "rl-e"), steps=[0, 20],
                                          results=[results[0], results[2]], name="1.5B"))
    fig = dynamics_comparison_figure([first, second])
    assert [ax.get_ylabel() for ax in fig.axes] == ["linear CKA", "mean dimension-wise r", "k-NN overlap, k = 10"]
    cka_ax = fig.axes[0]
    lines = {line.get_label(): line for line in cka_ax.get_lines()}
    assert set(lines) == {"0.5B", "1.5B"}
    assert list(lines["0.5B"].get_xdata()) == list(STEPS) and np.allclose(lines["0.5B"].get_ydata(), first.cka.mean)
    assert list(lines["1.5B"].get_xdata()) == [0, 20]
    assert plot_dynamics_comparison([first, second], tmp_path / "fig5.png").stat().st_size > 10_000


def test_the_report_shows_every_series(steps_store, tmp_path: Path) -> None:
    import re

    from hrsa.analyze.report.html import write_report

    _, _, _, results = steps_store
    paths = [write_dynamics(tmp_path / f"{name}.json", runs=(f"{name}-base", f"{name}-rl"), steps=STEPS, results=results,
                            name=name) for name in ("small", "large")]
    page = write_report([results[-1]], tmp_path / "r.html", dynamics=paths).read_text()
    for name in ("small", "large"):
        assert f"Training dynamics: {name}" in page and f"{name}-base vs {name}-rl" in page
    assert "every series on one plot" in page
    assert "From step 0 (the backbones) to step 20" in page  # what the curves show, in words
    figures = re.findall(r'<figcaption>([^<]*)</figcaption>', page)
    assert sum("training dynamics" in c for c in figures) == 3  # each series' own, and the comparison
    one = write_report([results[-1]], tmp_path / "one.html", dynamics=paths[0]).read_text()  # a single file still works
    assert "Training dynamics: small" in one and "every series on one plot" not in one


def test_hrsa_report_takes_one_dynamics_file_per_series(steps_store, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hrsa.analyze.report.cli import report
    from hrsa.cli import cli

    _, _, _, results = steps_store
    paths = [write_dynamics(tmp_path / f"{n}.json", runs=("a", "b"), steps=STEPS, results=results, name=n) for n in ("s1", "s2")]
    hrsa = type(cli)(commands=[report])
    args = ["report", str(results[-1]), "--out", str(tmp_path / "r.html"), "--dynamics", str(paths[0]), "--dynamics", str(paths[1])]
    result = CliRunner().invoke(hrsa, args)
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    assert "Training dynamics: s1" in page and "Training dynamics: s2" in page
    config = tmp_path / "report.yaml"
    config.write_text(f"results: [{results[-1]}]\ndynamics: {paths[0]}\n")  # one file in YAML: a scalar is fine
    assert CliRunner().invoke(hrsa, ["report", "--config", str(config), "--out", str(tmp_path / "y.html")]).exit_code == 0
    # a series' folder, as RESULTS take a pair's folder (it failed with "Is a directory")
    folder = tmp_path / "dynamics" / "s3"
    write_dynamics(folder / "dynamics.json", runs=("a", "b"), steps=STEPS, results=results, name="s3")
    result = CliRunner().invoke(hrsa, ["report", str(results[-1]), "--out", str(tmp_path / "f.html"), "--dynamics",
                                       str(folder)])
    assert result.exit_code == 0, result.output
    assert "Training dynamics: s3" in (tmp_path / "f.html").read_text()


# -- review: contradictory dynamics files ---------------------------------------------------------------------------
@pytest.mark.parametrize(("bad", "edit"), [
    ("repeated-step", lambda d: d["steps"].append({**d["steps"][1], "results": d["steps"][2]["results"]})),
    ("negative-step", lambda d: d["steps"][0].update(step=-3)),
    ("bool-step", lambda d: d["steps"][1].update(step=True)),
    ("float-step", lambda d: d["steps"][1].update(step=2.5)),
    ("string-step", lambda d: d["steps"][1].update(step="10")),
    ("runs-string", lambda d: d.update(runs="xy")),
    ("runs-three", lambda d: d.update(runs=["x", "y", "z"])),
    ("runs-empty-name", lambda d: d.update(runs=["x", ""])),
    ("results-number", lambda d: d["steps"][0].update(results=3)),
    ("steps-mapping", lambda d: d.update(steps={"0": "x"})),
    ("step-not-mapping", lambda d: d["steps"].append(5)),
    ("name-number", lambda d: d.update(name=5)),
])
def test_load_dynamics_refuses_contradictions(steps_store, tmp_path: Path, bad: str, edit) -> None:
    from click.testing import CliRunner

    from hrsa.analyze.report.cli import report
    from hrsa.cli import cli

    _, _, _, results = steps_store
    path = write_dynamics(tmp_path / "d.json", runs=("r1", "r2"), steps=STEPS, results=results)
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ResultsFileError) as info:
        load_dynamics(path)
    message = str(info.value)
    assert message.startswith("Expected") and " Got " in message and "\n" not in message and str(path) in message
    result = CliRunner().invoke(type(cli)(commands=[report]), ["report", str(results[0]), "--dynamics", str(path),
                                                               "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("steps", [[0, True, 20], [0, 2.5, 20], [0, "10", 20], [0, -1, 20]])
def test_write_dynamics_takes_integer_steps_only(steps_store, tmp_path: Path, steps: list) -> None:
    _, _, _, results = steps_store
    with pytest.raises(ResultsFileError, match="^Expected distinct integer training steps >= 0"):
        write_dynamics(tmp_path / "d.json", runs=("r1", "r2"), steps=steps, results=results)
    assert not (tmp_path / "d.json").exists()


def test_the_series_table_names_the_pair_each_step_compares(steps_store, tmp_path: Path) -> None:
    """Checkpoints have their own ids (a pipeline's <run>-step-<N>), so each step compares its own pair of model ids:
    the report names them step by step rather than drawing one curve without saying what it joins."""
    from hrsa.analyze.report.html import write_report

    _, _, _, results = steps_store
    varied = load_dynamics(write_dynamics(tmp_path / "v.json", runs=("r1", "r2"), steps=STEPS, results=results))
    assert varied.pairs == (("a", "step-0"), ("a", "step-10"), ("a", "step-20"))
    page = write_report([results[0]], tmp_path / "v.html", dynamics=tmp_path / "v.json").read_text()
    for step, pair in zip(STEPS, varied.pairs):
        assert f"<td>{step}</td><td>{pair[0]} vs {pair[1]}</td>" in page


# -- the curves average as the verdicts do, over comparable steps ---------------------------------------------------
def test_the_curves_leave_out_the_embedding_output_as_the_verdicts_do(steps_store, tmp_path: Path) -> None:
    """Table 2 left hidden state 0 out of its means, the curves did not: the same results read 0.572 and 0.570."""
    from hrsa.analyze.report.html import write_report
    from hrsa.analyze.report.summary import Thresholds, summarize

    _, _, _, results = steps_store
    path = write_dynamics(tmp_path / "d.json", runs=("r1", "r2"), steps=STEPS, results=results)
    dyn = load_dynamics(path)
    docs = [json.loads(r.read_text()) for r in results]
    assert 0 in docs[0]["matched_hidden_states"] and len(docs[0]["matched_hidden_states"]) > 1
    for i, doc in enumerate(docs):
        for thresholds, curves in ((Thresholds(), dyn), (Thresholds(exclude_embedding=False), dyn.averaged(False))):
            checks = {c.metric: c.value for lv in summarize(doc, thresholds=thresholds).levels for c in lv.checks}
            assert curves.cka.mean[i] == pytest.approx(checks["linear CKA"], abs=1e-12)
            assert curves.dimcorr.mean[i] == pytest.approx(checks["mean dimension-wise correlation"], abs=1e-12)
            assert curves.knn[10].mean[i] == pytest.approx(checks["k-NN overlap at k = 10"], abs=1e-12)
    every = [np.mean(docs[i]["metrics"]["cka"]["diagonal"]) for i in range(len(STEPS))]
    assert dyn.averaged(False).cka.mean == pytest.approx(every) and dyn.cka.mean != pytest.approx(every)
    assert 0 in dyn.cka.layers  # its thin line is still drawn
    page = write_report([results[0]], tmp_path / "r.html", dynamics=path).read_text()
    assert f"{dyn.cka.mean[0]:.3f} \u2192 {dyn.cka.mean[-1]:.3f}" in page
    included = write_report([results[0]], tmp_path / "i.html", dynamics=path,
                            thresholds=Thresholds(exclude_embedding=False)).read_text()
    assert f"{every[0]:.3f} \u2192 {every[-1]:.3f}" in included


def _load_refused(tmp_path: Path, results: list[Path]) -> tuple[Path, str]:
    """A dynamics file over ``results`` (one a step), and the one-line refusal of load_dynamics to read it."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"schema": SCHEMA, "runs": ["r1", "r2"], "steps": [
        {"step": s, "results": str(r)} for s, r in zip(STEPS, results)]}))
    with pytest.raises(ResultsFileError) as info:
        load_dynamics(path)
    return path, str(info.value)


@pytest.mark.parametrize(("field", "edit"), [
    ("token_filter", lambda d: d["token_filter"].update(exclude_first=True)),
    ("n_tokens", lambda d: d.update(n_tokens=d["n_tokens"] - 7)),
    ("corpus", lambda d: d.update(corpus="another-corpus")),
])
def test_load_dynamics_refuses_steps_over_different_tokens(steps_store, tmp_path: Path, field: str, edit) -> None:
    """A curve joins numbers of one token set: a step measured on other tokens is not a point of it."""
    _, _, _, results = steps_store
    doc = json.loads(results[1].read_text())
    edit(doc)
    other = write_json(doc, tmp_path / "other")
    path, message = _load_refused(tmp_path, [results[0], other, results[2]])
    assert message.startswith("Expected") and "\n" not in message and str(path) in message
    assert field in message and "step 10" in message and "step 0" in message


@pytest.mark.parametrize(("what", "knn"), [
    ("n_tokens", KnnOptions(ks=(5, 10), n_sample=300)),  # another sample of tokens: overlaps of other neighbourhoods
    ("seed", KnnOptions(ks=(5, 10), n_sample=200, seed=7)),
    ("hidden_states", KnnOptions(ks=(5, 10), n_sample=200, hidden_states=(1,))),  # a mean over other hidden states
])
def test_dynamics_refuse_steps_whose_knn_sampled_other_tokens_or_hidden_states(steps_store, tmp_path: Path, what: str,
                                                                                knn: KnnOptions) -> None:
    """k-NN overlap is measured on a seeded token subsample (and on --hidden-states): a step analysed with another
    sample size, seed or hidden states has the same corpus, filter, token count and matched hidden states, so its
    k-NN point passed the same-tokens check and the curve moved (0.85 -> 0.74 on one pair of unchanged models) by
    the sampling alone. Both write_dynamics and load_dynamics must refuse it, naming the k-NN sample."""
    root, pair, _, results = steps_store
    store = pair.open("r")
    res = analyze_pair(store, "a", "step-10", metrics=("cka", "dimcorr", "knn"), backend="numpy", scheduler="sync",
                       knn_options=knn)
    other = write_json(results_dict(res, run_id=f"step-10-{what}"), tmp_path / "other")
    with pytest.raises(ResultsFileError) as info:
        write_dynamics(tmp_path / "w.json", runs=("r1", "r2"), steps=list(STEPS), results=[results[0], other, results[2]])
    assert "k-NN" in str(info.value) and what in str(info.value) and "step 10" in str(info.value)
    path, message = _load_refused(tmp_path, [results[0], other, results[2]])
    assert message.startswith("Expected") and "\n" not in message and what in message and "k-NN" in message


def test_knn_samples_of_later_steps_are_checked_when_step_0_has_no_knn(steps_store, tmp_path: Path) -> None:
    """Step 0 analysed without k-NN (a gap the curve allows), steps 10 and 20 with other k-NN seeds: every step was
    checked against step 0 only, which had no sample to compare, and the curve joined overlaps of other samples."""
    _, pair, _, results = steps_store
    doc0 = json.loads(results[0].read_text())
    del doc0["metrics"]["knn"]
    step0 = write_json(doc0, tmp_path / "s0")
    res = analyze_pair(pair.open("r"), "a", "step-20", metrics=("cka", "dimcorr", "knn"), backend="numpy",
                       scheduler="sync", knn_options=KnnOptions(ks=(5, 10), n_sample=200, seed=7))
    other = write_json(results_dict(res, run_id="step-20-seed7"), tmp_path / "s20")
    with pytest.raises(ResultsFileError, match=r"k-NN seed .* at step 20 but .* at step 10 instead"):
        write_dynamics(tmp_path / "w.json", runs=("r1", "r2"), steps=list(STEPS), results=[step0, results[1], other])
