"""analyze_pair refuses what it cannot compare, with one clear UserError; accepts what it can."""

from __future__ import annotations

import numpy as np
import pytest

from hrsa.analyze.pair import analyze_pair
from hrsa.store import ActivationStore
from hrsa.store.errors import (
    CorpusMismatchError,
    IncompleteModelError,
    ModelNotFoundError,
    SelectionError,
    UserError,
)
from hrsa.store.selection import TokenSelection
from hrsa.store.testing import make_table


@pytest.fixture(scope="module")
def store_with_extras(tmp_path_factory, build_store, store_model) -> tuple[ActivationStore, object]:
    """The pair store plus: "other" on another corpus, "twin" on a same-token corpus of another tokenizer,
    "wide" (D = 8) on a's corpus, "partial" with one unit written, "late" with only hidden state 9."""
    ps = build_store(str(tmp_path_factory.mktemp("checks") / "store"))
    store = ps.open("r+")
    cid = store.model_info("a").corpus
    rng = np.random.default_rng(0)
    other = store.write_corpus(make_table((40, 60)), tokenizer={"name": "test-tok", "fingerprint": "fp-1"})
    store_model(store, "other", other, {k: rng.normal(size=(100, 16)) for k in range(4)})
    twin = store.write_corpus(make_table(), tokenizer={"name": "test-tok-2", "fingerprint": "fp-2"})
    store_model(store, "twin", twin, {k: ps.y[k] for k in range(4)})
    store_model(store, "wide", cid, {k: rng.normal(size=(1000, 8)) for k in range(4)})
    store_model(store, "late", cid, {9: rng.normal(size=(1000, 16))})
    store.create_model("partial", corpus=cid, n_hidden_states=4, hidden_size=16, dtype="float32", chunk_tokens=64, shard_tokens=256)
    writer = store.writer("partial")
    writer.write_unit(writer.units()[0], {k: np.zeros((256, 16), np.float32) for k in range(4)})
    return store, ps


def test_different_corpora_raise_corpus_mismatch(store_with_extras) -> None:
    store, _ = store_with_extras
    with pytest.raises(CorpusMismatchError, match=r"same text.*a on corpus-.*other on corpus-.*different documents") as info:
        analyze_pair(store, "a", "other", backend="numpy")
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_identical_token_ids_under_another_corpus_id_are_accepted(store_with_extras, oracle) -> None:
    store, ps = store_with_extras
    res = analyze_pair(store, "a", "twin", metrics=("cka",), backend="numpy")
    assert res.cka[0].value == pytest.approx(oracle.cka(ps.x[0], ps.y[0]), abs=1e-6)


def test_different_widths_refuse_dimcorr_and_procrustes_but_not_cka(store_with_extras) -> None:
    store, _ = store_with_extras
    with pytest.raises(UserError, match=r"equal hidden sizes for dimcorr, procrustes.*--metrics cka"):
        analyze_pair(store, "a", "wide", backend="numpy")
    assert 0 <= analyze_pair(store, "a", "wide", metrics=("cka",), backend="numpy").cka[0].value <= 1


def test_no_hidden_states_in_common(store_with_extras) -> None:
    store, _ = store_with_extras
    with pytest.raises(UserError, match="hidden states in common"):
        analyze_pair(store, "a", "late", backend="numpy")


def test_incomplete_extraction(store_with_extras) -> None:
    store, _ = store_with_extras
    with pytest.raises(IncompleteModelError, match="1/4 work units"):
        analyze_pair(store, "a", "partial", backend="numpy")


def test_unknown_model_and_metric(store_with_extras) -> None:
    store, _ = store_with_extras
    with pytest.raises(ModelNotFoundError, match="nope"):
        analyze_pair(store, "a", "nope", backend="numpy")
    with pytest.raises(UserError, match="metrics among dimcorr, cka, procrustes, procrustes_distance, cca, svcca, pwcca, regression, effective_rank, knn, probe. Got rsa"):
        analyze_pair(store, "a", "b", metrics=("cka", "rsa"), backend="numpy")


def test_selections_that_leave_too_little(store_with_extras) -> None:
    store, _ = store_with_extras
    with pytest.raises(SelectionError):
        analyze_pair(store, "a", "b", selection=TokenSelection(positions=(600, 700)), backend="numpy")
    with pytest.raises(UserError, match="at least 4 tokens"):
        analyze_pair(store, "a", "b", debiased=True, selection=TokenSelection(docs=(1,)), backend="numpy")


def test_unknown_scheduler_and_backend(store_with_extras) -> None:
    store, _ = store_with_extras
    with pytest.raises(UserError, match="scheduler"):
        analyze_pair(store, "a", "b", metrics=("cka",), scheduler="mpi", backend="numpy")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="backend"):
        analyze_pair(store, "a", "b", metrics=("cka",), backend="tpu")  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_fewer_than_4_tokens_are_refused_before_any_pass(make_pair_store, n: int) -> None:
    """CKA of 2 tokens is 1 and every correlation +-1 for any two models; 3 unrelated ones scored 0.986, without a
    word. So few tokens are refused, as for debiased CKA, before anything is read."""
    from hrsa.store.errors import UserError
    from hrsa.store.selection import TokenSelection

    store = make_pair_store(doc_lengths=(2, 3, 295), d=8).open()
    with pytest.raises(UserError, match=f"Expected at least 4 tokens to compare .* Got {n} instead"):
        analyze_pair(store, "a", "b", metrics=["cka", "dimcorr"], selection=TokenSelection(tokens=(5, 5 + n)),
                     backend="numpy")
    assert analyze_pair(store, "a", "b", metrics=["cka"], selection=TokenSelection(tokens=(5, 9)),
                        backend="numpy").n_tokens == 4


def _write_states(store: ActivationStore, mid: str, cid: str, states: dict[int, np.ndarray]) -> None:
    store.create_model(mid, corpus=cid, n_hidden_states=len(states), hidden_size=states[0].shape[1], dtype="float32",
                       hidden_states=sorted(states), chunk_tokens=64, shard_tokens=128)
    writer = store.writer(mid)
    for unit in writer.units():
        writer.write_unit(unit, {k: v[unit.start : unit.stop].astype(np.float32) for k, v in states.items()})


def test_models_of_different_depths_are_matched_by_index_with_a_warning(tmp_path) -> None:
    """A 3-state model against a 7-state one compared states 0-2 and left out 3-6 without a word."""
    import warnings

    from hrsa.analyze.pair.resolve import DepthWarning

    store = ActivationStore.open(str(tmp_path / "s"), mode="a")
    table = make_table((120, 90))
    cid = store.write_corpus(table, tokenizer={"name": "t", "fingerprint": "f"}, source="test")
    rng = np.random.default_rng(0)
    states = {k: rng.normal(size=(table.n_tokens, 8)) for k in range(7)}
    _write_states(store, "shallow", cid, {k: states[k] for k in range(3)})
    _write_states(store, "deep", cid, states)
    _write_states(store, "shallow2", cid, {k: states[k] + 0.1 for k in range(3)})
    with pytest.warns(DepthWarning, match=r"shallow \(3 hidden states\) and deep \(7\).*hidden states 3-6 of deep"):
        res = analyze_pair(store, "shallow", "deep", metrics=("cka",))
    assert res.matched == (0, 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DepthWarning)  # the same depth: nothing said
        analyze_pair(store, "shallow", "shallow2", metrics=("cka",))
