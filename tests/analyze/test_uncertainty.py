"""Intervals and null baselines: per-group statistics, the jackknife, exact permutation nulls, and their coverage.

Oracles here are independent of hrsa's accumulators: explicit Gram matrices, scores recomputed on the raw tokens
left after dropping a group of documents, and enumerations or draws of actual permutations.
"""

from __future__ import annotations

import io
import itertools
import json
import math

import numpy as np
import pytest
from scipy.stats import t as student_t

from hrsa.analyze.accumulators.groups import GroupedMoments, document_groups
from hrsa.analyze.accumulators.moments import moments
from hrsa.analyze.metrics.dimwise_correlation import dimwise_correlation_from_moments, dimwise_correlation_null
from hrsa.analyze.metrics.linear_cka import linear_cka_from_moments, linear_cka_null
from hrsa.analyze.metrics.procrustes import procrustes_similarity_from_moments
from hrsa.analyze.metrics.uncertainty import jackknife_interval
from hrsa.analyze.pair.analysis import analyze_pair
from hrsa.analyze.results import save_results


def _gram_cka(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(0), y - y.mean(0)
    k, l_ = xc @ xc.T, yc @ yc.T
    return float((k * l_).sum() / (np.linalg.norm(k) * np.linalg.norm(l_)))


def _mean_r(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(x.shape[1])]))


# --- the accumulators ------------------------------------------------------------------------------------------


def test_without_is_the_statistics_of_the_other_tokens(make_pair) -> None:
    x, y = make_pair(700, 12, dtype=np.float64)  # offsets up to 1e4 and outlier dimensions
    whole, rest, part = moments(x, y), moments(x[:450], y[:450]), moments(x[450:], y[450:])
    left = whole.without(part)
    assert left.n == rest.n
    for name in ("mean_x", "mean_y", "c_xx", "c_yy", "c_xy", "g_xx", "g_xy", "g_yx", "g_yy"):
        want = getattr(rest, name)
        assert np.max(np.abs(getattr(left, name) - want)) <= 1e-9 * np.max(np.abs(want)), name
    for name in ("q_xx", "q_yy", "q_xy"):
        assert getattr(left, name) == pytest.approx(getattr(rest, name), rel=1e-10), name
    with pytest.raises(ValueError, match="fewer than"):
        part.without(whole)


def test_document_groups_hold_whole_documents_with_balanced_tokens() -> None:
    counts = np.array([5] * 40)
    assert np.bincount(document_groups(counts, 8)).tolist() == [5] * 8  # 40 documents of 5 tokens: 8 x 5 documents
    assert document_groups(np.array([3, 900, 2, 2]), 4).tolist() == [0, 1, 2, 2]  # a long document is a group alone
    assert document_groups(np.array([7, 7]), 10).tolist() == [0, 1]  # fewer documents than groups
    assert document_groups(np.array([4]), 10).tolist() == [0]


def test_grouped_moments_merge_to_the_statistics_of_every_token(make_pair) -> None:
    x, y = make_pair(600, 8, dtype=np.float64)
    parts = {g: moments(x[g::3], y[g::3]) for g in range(3)}
    left = GroupedMoments({0: parts[0]}).merge(GroupedMoments({1: parts[1], 2: parts[2]}))
    total = left.total()
    assert total.n == 600
    want = moments(x, y).c_xy
    assert np.max(np.abs(total.c_xy - want)) <= 1e-12 * np.max(np.abs(want))  # rounding only
    assert [g for g, _ in left.leave_one_out(total)] == [0, 1, 2]


# --- null baselines ----------------------------------------------------------------------------------------------


def test_cka_and_dimcorr_nulls_are_exact_over_every_permutation() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_t(3, size=(7, 3)) + np.array([1e4, 0.0, 0.0])  # heavy tails and an offset
    y = rng.normal(size=(7, 3)) ** 3
    perms = [list(p) for p in itertools.permutations(range(7))]
    cka, mean_r = np.array([_gram_cka(x, y[p]) for p in perms]), np.array([_mean_r(x, y[p]) for p in perms])
    m = moments(x, y)
    cka_null, r_null = linear_cka_null(m), dimwise_correlation_null(m)
    assert cka_null.mean == pytest.approx(cka.mean(), rel=1e-9) and cka_null.std == pytest.approx(cka.std(), rel=1e-9)
    assert r_null.mean == 0.0 and abs(mean_r.mean()) < 1e-12
    assert r_null.std == pytest.approx(mean_r.std(), rel=1e-9)


def test_the_null_matches_shuffled_activations(make_pair) -> None:
    x, y = make_pair(400, 16, dtype=np.float64)
    rng = np.random.default_rng(0)
    shuffled = np.array([_gram_cka(x, y[rng.permutation(400)]) for _ in range(1500)])
    null = linear_cka_null(moments(x, y))
    assert abs(shuffled.mean() - null.mean) < 4 * shuffled.std() / math.sqrt(shuffled.size)
    assert null.std == pytest.approx(shuffled.std(), rel=0.08)  # chi-square spread of a std from 1500 draws: ~2%
    assert not null.within(_gram_cka(x, y)) and null.within(shuffled[0])


# --- the jackknife -----------------------------------------------------------------------------------------------


def test_jackknife_interval_is_the_textbook_one() -> None:
    loo = [0.40, 0.46, 0.43, 0.45, 0.41]
    i = jackknife_interval(0.43, loo)
    se = math.sqrt(4 / 5 * sum((v - np.mean(loo)) ** 2 for v in loo))
    assert i.se == pytest.approx(se, rel=1e-12) and i.n_groups == 5
    assert i.high - 0.43 == pytest.approx(student_t.ppf(0.975, 4) * se, rel=1e-12)
    assert math.isnan(jackknife_interval(0.43, [0.4]).low)  # one group: no interval, not a zero-width one


def _simulated_coverage(n_reps: int, *, docs: int = 100, per_doc: int = 20, groups: int = 20) -> np.ndarray:
    """Share of replications whose 95% jackknife interval holds the population value, for CKA, mean r, similarity.

    Tokens share a per-document shift (so tokens of a document are alike, as in real text) and an offset of 1e4;
    the population values come from the population covariances, not from any sample.
    """
    d = 4
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(d, d))
    s_doc, s_tok, s_noise = np.diag([1.0, 0.5, 0.3, 0.2]), 0.5 * np.eye(d), 1.0
    s_xx = s_doc + s_tok
    s_xy, s_yy = s_xx @ mix, mix.T @ s_xx @ mix + s_noise * np.eye(d)
    truth = {
        "cka": np.sum(s_xy**2) / math.sqrt(np.sum(s_xx**2) * np.sum(s_yy**2)),
        "dimcorr": float(np.mean(np.diag(s_xy) / np.sqrt(np.diag(s_xx) * np.diag(s_yy)))),
        "similarity": np.linalg.svd(s_xy, compute_uv=False).sum() / math.sqrt(np.trace(s_xx) * np.trace(s_yy)),
    }
    scores = {
        "cka": lambda m: linear_cka_from_moments(m).value,
        "dimcorr": lambda m: dimwise_correlation_from_moments(m).mean,
        "similarity": procrustes_similarity_from_moments,
    }
    covered = np.zeros((n_reps, 3), dtype=bool)
    doc_of_token = np.repeat(np.arange(docs), per_doc)
    group_of_doc = document_groups(np.full(docs, per_doc), groups)
    for r in range(n_reps):
        g = np.random.default_rng(1000 + r)
        x = np.repeat(g.normal(size=(docs, d)) @ np.sqrt(s_doc), per_doc, axis=0) + g.normal(size=(docs * per_doc, d)) @ np.sqrt(s_tok)
        x += 1e4
        y = x @ mix + math.sqrt(s_noise) * g.normal(size=x.shape)
        group = group_of_doc[doc_of_token]
        grouped = GroupedMoments({k: moments(x[group == k], y[group == k]) for k in range(groups)})
        total = grouped.total()
        rests = [rest for _, rest in grouped.leave_one_out(total)]
        for c, name in enumerate(scores):
            f = scores[name]
            covered[r, c] = jackknife_interval(f(total), [f(m) for m in rests]).contains(truth[name])
    return covered.mean(axis=0)


def test_95_percent_intervals_cover_the_population_value_95_percent_of_the_time() -> None:
    coverage = _simulated_coverage(400)
    assert np.all((coverage >= 0.93) & (coverage <= 0.97)), dict(zip(("cka", "dimcorr", "similarity"), coverage))


# --- through analyze_pair and results.json ------------------------------------------------------------------------

# The pair store's documents (130, 1, 300, 69, 500 tokens) in 10 equal parts of its 1000 tokens: their middle tokens
# fall in parts 0, 1, 2, 4 and 7, so each document is a group of its own.
_GROUPS_OF_PAIR_STORE = ([0], [1], [2], [3], [4])


def test_intervals_are_the_jackknife_over_document_groups(pair_store) -> None:
    res = analyze_pair(pair_store.open(), "a", "b", metrics=["cka", "dimcorr", "procrustes"], groups=10,
                       memory_budget="64MB", compute_dtype="float64")
    assert res.n_groups == len(_GROUPS_OF_PAIR_STORE)
    offsets = pair_store.doc_offsets
    for i, k in enumerate(res.matched):
        x, y = pair_store.x[k], pair_store.y[k]
        loo = []
        for docs in _GROUPS_OF_PAIR_STORE:
            drop = np.concatenate([np.arange(offsets[d], offsets[d + 1]) for d in docs])
            keep = np.setdiff1d(np.arange(x.shape[0]), drop)
            loo.append(_gram_cka(x[keep], y[keep]))
        g = len(loo)
        se = math.sqrt((g - 1) / g * np.sum((np.array(loo) - np.mean(loo)) ** 2))
        interval = res.intervals["cka/diagonal"][i]
        assert interval.se == pytest.approx(se, rel=1e-9)
        assert interval.low == pytest.approx(_gram_cka(x, y) - student_t.ppf(0.975, g - 1) * se, rel=1e-9)
        assert res.cka[i].value == pytest.approx(_gram_cka(x, y), rel=1e-12)
    assert set(res.intervals) == {"cka/diagonal", "dimcorr/diagonal", "procrustes/h_inv", "procrustes/similarity",
                                  "procrustes/residual"}
    assert set(res.nulls) == {"cka/diagonal", "dimcorr/diagonal"}


def test_groups_change_no_score_and_zero_groups_turn_intervals_off(pair_store) -> None:
    kw = dict(metrics=["cka", "dimcorr", "procrustes"], debiased=True, memory_budget="64MB", compute_dtype="float64")
    with_groups = analyze_pair(pair_store.open(), "a", "b", groups=10, **kw)
    without = analyze_pair(pair_store.open(), "a", "b", groups=0, **kw)
    assert without.intervals == {} and without.n_groups == 0
    for name in ("cka", "cka_debiased"):
        for u, v in zip(getattr(with_groups, name), getattr(without, name), strict=True):
            assert u.value == pytest.approx(v.value, rel=1e-12)
    for u, v in zip(with_groups.procrustes, without.procrustes, strict=True):
        assert u.h_inv == pytest.approx(v.h_inv, rel=1e-10)


def test_a_group_whose_removal_leaves_under_4_tokens_gives_no_interval_not_a_crash(make_pair_store) -> None:
    """Leaving out one big document of a small selection may leave 3 tokens: debiased CKA is undefined there (it
    raised after the passes) and every other score is ~1 for any two models (CKA's interval came out as
    [-0.6, 2.2]). The scores on all tokens stand; their intervals are NaN."""
    from hrsa.store.selection import TokenSelection

    store = make_pair_store(doc_lengths=(3, 1, 2, 300, 294), d=8).open()
    selection = TokenSelection(docs=(4, 0, 2), exclude_first=True)  # 293 + 2 + 1 tokens: without doc 4, 3 are left
    res = analyze_pair(store, "a", "b", metrics=["cka", "dimcorr"], debiased=True, selection=selection, groups=10,
                       backend="numpy", compute_dtype="float64")
    alone = analyze_pair(store, "a", "b", metrics=["cka", "dimcorr"], debiased=True, selection=selection, groups=0,
                         backend="numpy", compute_dtype="float64")
    assert res.n_tokens == 296 and res.n_groups >= 2
    assert [r.value for r in res.cka_debiased] == pytest.approx([r.value for r in alone.cka_debiased], rel=1e-12)
    assert [r.value for r in res.cka] == pytest.approx([r.value for r in alone.cka], rel=1e-12)
    assert {"cka/debiased_diagonal", "cka/diagonal", "dimcorr/diagonal"} <= set(res.intervals)
    assert all(math.isnan(i.low) and math.isnan(i.high) for name in res.intervals for i in res.intervals[name])


def test_results_json_carries_intervals_se_and_nulls(pair_store, tmp_path) -> None:
    res = analyze_pair(pair_store.open(), "a", "b", metrics=["cka", "dimcorr"], groups=10, memory_budget="64MB")
    saved = save_results(res, tmp_path / "out")
    doc = json.loads(saved.json_path.read_text())
    assert doc["uncertainty"]["method"] == "jackknife" and doc["uncertainty"]["groups"] == 5
    cka = doc["metrics"]["cka"]
    assert len(cka["intervals"]["diagonal"]) == len(cka["diagonal"]) == len(cka["se"]["diagonal"])
    for (low, high), value in zip(cka["intervals"]["diagonal"], cka["diagonal"], strict=True):
        assert low <= value <= high
    assert set(doc["metrics"]["dimcorr"]["null"]["diagonal"]) == {"mean", "std"}


def test_reports_show_intervals_and_grey_out_scores_of_unrelated_models(make_pair_store, tmp_path) -> None:
    from rich.console import Console

    from hrsa.analyze.report.figures import layer_profile_figure
    from hrsa.analyze.report.html import render_report
    from hrsa.analyze.report.summary import score_uncertainty, summary_table
    from hrsa.store import ActivationStore
    from tests.analyze.conftest import write_model

    ps = make_pair_store(doc_lengths=(40,) * 30)
    store = ActivationStore.open(ps.url, mode="r+")
    unrelated = {k: np.random.default_rng(k).normal(size=v.shape) for k, v in ps.x.items()}  # B knows nothing of A
    write_model(store, "c", store.model_info("a").corpus, unrelated)
    docs = {}
    for b in ("b", "c"):
        res = analyze_pair(store, "a", b, metrics=["cka", "dimcorr"], groups=10, memory_budget="64MB")
        docs[b] = save_results(res, tmp_path / b).doc
    assert not any(score_uncertainty(docs["b"], "cka", "diagonal").within_null)
    assert all(score_uncertainty(docs["c"], "cka", "diagonal").within_null)
    console = Console(file=io.StringIO(), width=200, record=True, color_system="truecolor")
    console.print(summary_table(docs["c"]))
    text = console.export_text(clear=False)
    assert "±" in text and "jackknife interval over 10 groups" in text
    assert "\x1b[2m0.00" in console.export_text(styles=True)  # dimmed cells
    html = render_report([(tmp_path / b / "results.json", docs[b]) for b in ("b", "c")])
    assert html.count('class="num within-null"') == 2 * len(docs["c"]["matched_hidden_states"])  # c's CKA and dimcorr
    assert "delete-a-group jackknife interval" in html
    fig = layer_profile_figure(docs["b"])
    assert len(fig.axes[0].containers) == 2  # error bars of CKA and of dimcorr


def test_knn_intervals_reach_results_json(pair_store, tmp_path) -> None:
    from hrsa.analyze.local.knn import KnnOptions

    res = analyze_pair(pair_store.open(), "a", "b", metrics=["knn"], knn_options=KnnOptions(ks=(5,), n_sample=400),
                       memory_budget="64MB")
    knn = json.loads(save_results(res, tmp_path / "out").json_path.read_text())["metrics"]["knn"]
    assert 2 <= knn["n_docs"] <= 5 and len(knn["intervals"]["5"]) == len(knn["k"]["5"]) == len(knn["se"]["5"])
    for (low, high), value in zip(knn["intervals"]["5"], knn["k"]["5"], strict=True):
        assert low <= value <= high


def test_a_knn_pass_that_cannot_fit_is_refused_before_the_streaming_passes(pair_store, monkeypatch) -> None:
    import hrsa.analyze.pair.analysis as analysis
    from hrsa.analyze.local.knn import KnnOptions
    from hrsa.analyze.streaming.plan import MemoryBudgetError

    ran = []
    monkeypatch.setattr(analysis, "run_passes", lambda *a, **k: ran.append(1))
    with pytest.raises(MemoryBudgetError, match="for k-NN on 1000 sampled tokens"):
        analyze_pair(pair_store.open(), "a", "b", metrics=["cka", "knn"], knn_options=KnnOptions(n_sample=None),
                     memory_budget="400kB", block_tokens=128)
    assert ran == []


def test_a_group_left_out_down_to_a_few_equal_tokens_has_no_spread() -> None:
    """Two equal float32 rows at an offset of 1e3 are left when the other 998 tokens' group goes: subtracting that
    group from the total would leave the total's rounding as their spread (CKA up to 1.42 seen); merged from the
    other groups, they have none, and CKA is NaN."""
    from hrsa.analyze.accumulators.groups import GroupedMoments
    from hrsa.analyze.accumulators.moments import moments
    from hrsa.analyze.metrics import linear_cka_from_moments

    for seed in range(10):
        rng = np.random.default_rng(seed)
        x = (rng.normal(size=(1000, 16)) + 1e3).astype(np.float32)
        y = (x + rng.normal(size=(1000, 16))).astype(np.float32)
        x[998:], y[998:] = x[998], y[998]  # the small group: two equal tokens
        grouped = GroupedMoments({0: moments(x[:998], y[:998]), 1: moments(x[998:], y[998:])})
        rest = dict(grouped.leave_one_out(grouped.total()))[0]
        assert rest.n == 2 and np.isnan(linear_cka_from_moments(rest).value), seed
