"""Streaming from a store == the in-memory float64 oracle, for any block size, workers and token selection."""

from __future__ import annotations

import numpy as np
import pytest

from hrsa.analyze.metrics import UnderdeterminedWarning
from hrsa.analyze.pair import PairResults, analyze_pair
from hrsa.analyze.streaming.stream import split_segments, token_blocks
from hrsa.store import ActivationStore
from hrsa.store.selection import TokenSelection

ALL = ("dimcorr", "cka", "procrustes")


def selected_rows(ps, sel: TokenSelection) -> np.ndarray:
    """The token indices a selection keeps, from the corpus table (independently of the store's resolver)."""
    keep = np.ones(ps.position.shape[0], dtype=bool)
    if sel.exclude_special:
        keep &= ~ps.is_special
    if sel.exclude_first:
        keep &= ps.position != 0
    if sel.positions:
        keep &= (ps.position >= sel.positions[0]) & (ps.position < sel.positions[1])
    if sel.docs is not None:
        in_docs = np.zeros_like(keep)
        for d in sel.docs:
            in_docs[ps.doc_offsets[d] : ps.doc_offsets[d + 1]] = True
        keep &= in_docs
    return np.flatnonzero(keep)


def assert_matches_oracle(res: PairResults, ps, rows: np.ndarray, oracle, *, h_inv: bool = True) -> None:
    assert res.n_tokens == rows.size
    for i, k in enumerate(res.matched):
        x, y = ps.x[k][rows], ps.y[k][rows]
        assert res.cka[i].value == pytest.approx(oracle.cka(x, y), abs=1e-6), f"CKA, state {k}"
        r = oracle.dimcorr(x, y)
        np.testing.assert_allclose(res.dimcorr[i].per_dim, r, rtol=0, atol=1e-6, err_msg=f"dimcorr, state {k}")
        assert res.dimcorr[i].mean == pytest.approx(np.nanmean(r), abs=1e-6)  # NaN: a constant dimension
        want_h_inv, want_residual = oracle.procrustes(x, y)
        assert res.procrustes[i].residual == pytest.approx(want_residual, abs=1e-6), f"residual, state {k}"
        if h_inv:
            assert res.procrustes[i].h_inv == pytest.approx(want_h_inv, abs=1e-5), f"H_inv, state {k}"


def test_many_tokens_match_the_oracle(pair_store, oracle) -> None:
    res = analyze_pair(pair_store.open(), "a", "b", metrics=ALL, debiased=True, backend="numpy")
    rows = np.arange(pair_store.position.size)
    assert res.matched == (0, 1, 2, 3) and res.metrics == ALL
    assert_matches_oracle(res, pair_store, rows, oracle)
    for i, k in enumerate(res.matched):
        assert res.cka_debiased[i].value == pytest.approx(oracle.debiased_cka(pair_store.x[k], pair_store.y[k]), abs=1e-6)
    assert not any(p.underdetermined for p in res.procrustes)


def test_fewer_tokens_than_dimensions_match_the_oracle_and_warn(narrow_store, oracle) -> None:
    with pytest.warns(UnderdeterminedWarning, match="not unique"):
        res = analyze_pair(narrow_store.open(), "a", "b", metrics=ALL, backend="numpy")
    rows = np.arange(narrow_store.position.size)
    assert rows.size < narrow_store.x[0].shape[1]
    assert_matches_oracle(res, narrow_store, rows, oracle, h_inv=False)  # O* is not unique: no H_inv to compare
    assert all(p.underdetermined for p in res.procrustes)


@pytest.mark.parametrize(("block_tokens", "workers", "scheduler"), [(16, 3, "threads"), (64, 1, "threads"), (1000, 2, "threads"), (100, 2, "sync")])
def test_any_block_size_and_worker_count_give_the_same_results(pair_store, oracle, block_tokens, workers, scheduler) -> None:
    store = pair_store.open()
    reference = analyze_pair(store, "a", "b", metrics=ALL, backend="numpy", compute_dtype="float64")
    res = analyze_pair(store, "a", "b", metrics=ALL, backend="numpy", block_tokens=block_tokens, workers=workers,
                       scheduler=scheduler, compute_dtype="float64")
    for got, want in zip(res.cka + res.dimcorr + res.procrustes, reference.cka + reference.dimcorr + reference.procrustes):
        for field in ("value", "mean", "h_inv", "residual"):
            if hasattr(want, field):
                assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-10, abs=1e-12)
    assert res.settings["block_tokens"] == block_tokens and res.settings["scheduler"] == scheduler
    assert_matches_oracle(res, pair_store, np.arange(pair_store.position.size), oracle)


@pytest.mark.parametrize(
    "selection",
    [
        TokenSelection(exclude_special=True),
        TokenSelection(exclude_first=True),
        TokenSelection(positions=(5, 100)),
        TokenSelection(docs=(4, 0, 2)),
        TokenSelection(exclude_special=True, positions=(0, 64), docs=(2, 4)),
    ],
    ids=["special", "first", "positions", "docs", "combined"],
)
def test_token_selections_reduce_the_tokens_and_match_the_oracle_on_them(pair_store, oracle, selection) -> None:
    res = analyze_pair(pair_store.open(), "a", "b", metrics=ALL, selection=selection, backend="numpy", block_tokens=64)
    rows = selected_rows(pair_store, selection)
    assert 0 < rows.size < pair_store.position.size
    assert res.selection == selection
    assert_matches_oracle(res, pair_store, rows, oracle)


def test_bfloat16_models_match_the_oracle_on_their_values(make_pair_store, oracle) -> None:
    ps = make_pair_store(dtype="bfloat16")
    # bf16 keeps 8 bits of mantissa: at an offset of 1e4 its spacing is 64, so that dimension is constant
    # (degenerate for dimcorr, and C_xy loses rank, so Procrustes' O* is not unique).
    with pytest.warns(UnderdeterminedWarning):
        res = analyze_pair(ps.open(), "a", "b", metrics=ALL, backend="numpy", block_tokens=128)
    assert all(d.n_degenerate >= 1 for d in res.dimcorr)
    assert_matches_oracle(res, ps, np.arange(ps.position.size), oracle, h_inv=False)


def test_float32_products_stay_close_to_the_oracle(pair_store, oracle) -> None:
    res = analyze_pair(pair_store.open(), "a", "b", metrics=("cka", "dimcorr"), backend="numpy", compute_dtype="float32")
    assert res.settings["compute_dtype"] == "float32"
    for i, k in enumerate(res.matched):
        assert res.cka[i].value == pytest.approx(oracle.cka(pair_store.x[k], pair_store.y[k]), abs=1e-5)


def test_token_blocks_cover_a_range_and_an_index_exactly() -> None:
    blocks = token_blocks(slice(5, 27), 8)
    assert [b.index for b in blocks] == [0, 1, 2, 3]
    assert sum(b.n_rows for b in blocks) == 22
    index = np.array([30, 2, 3, 4, 9, 17, 16, 31])  # unsorted, as a document order may be
    blocks = token_blocks(index, 8)
    got = np.concatenate([np.arange(b.index * 8, b.index * 8 + 8)[b.rows] for b in blocks])
    np.testing.assert_array_equal(got, np.sort(index))
    assert isinstance(blocks[0].rows, slice)  # 2, 3, 4 is a run: read as a slice


def test_segments_are_contiguous_balanced_and_complete() -> None:
    blocks = token_blocks(slice(0, 1000), 64)
    segments = split_segments(blocks, 3)
    assert len(segments) == 3
    assert [b for seg in segments for b in seg] == blocks
    sizes = [sum(b.n_rows for b in seg) for seg in segments]
    assert max(sizes) - min(sizes) <= 64
    assert len(split_segments(blocks[:2], 8)) == 2  # never more segments than blocks


def test_store_is_not_written_by_an_analysis(pair_store) -> None:
    store = ActivationStore.open(pair_store.url, mode="r")
    analyze_pair(store, "a", "b", metrics=("cka",), backend="numpy")
    assert list(store.group("results").group_keys()) == []


def test_progress_counts_every_token_of_every_pass(pair_store) -> None:
    seen, plans = [], []
    res = analyze_pair(pair_store.open(), "a", "b", cross_layer=True, backend="numpy", block_tokens=128, workers=2,
                       on_block=seen.append, on_plan=plans.append)
    assert plans == [res.plan] and res.plan.passes >= 2  # the matched pass, and the cross-layer one(s)
    assert sum(seen) == res.n_tokens * res.plan.passes


@pytest.mark.parametrize(("workers", "block"), [(1, 64), (2, 64), (1, 96)])  # 96: blocks end inside chunks of 64
def test_passes_read_shards_forward_never_whole_and_verify_each_one(pair_store, monkeypatch, workers: int,
                                                                      block: int) -> None:
    """A pass over runs of tokens reads no shard whole (one block's bytes at a time: store.reading.ShardStream) and
    compares every shard it read with its done record: each stream opened is closed and checked, none left open."""
    import hrsa.store.reading as reading

    loaded, opened, checked = [], [], []
    real_init, real_close = reading.ShardStream.__init__, reading.ShardStream.close
    monkeypatch.setattr(reading._VerifiedShards, "load", lambda self, key: loaded.append(key))

    def init(self, store, key, codec, record, scratch=None):
        opened.append(key)
        real_init(self, store, key, codec, record, scratch)

    def close(self):
        if not self.closed:
            checked.append(self._key)
        real_close(self)

    monkeypatch.setattr(reading.ShardStream, "__init__", init)
    monkeypatch.setattr(reading.ShardStream, "close", close)
    results = analyze_pair(pair_store.open(), "a", "b", metrics=("cka", "dimcorr"), cross_layer=True, block_tokens=block,
                           workers=workers, scheduler="threads", backend="numpy")
    assert results.cka_matrix.shape[0] > 1 and not loaded
    assert opened and sorted(checked) == sorted(opened)


@pytest.mark.parametrize("tile_kind", ["matched", "cross"])
def test_a_segment_that_ends_inside_a_substituted_shard_fails_before_it_returns(make_pair_store, tile_kind: str) -> None:
    """A segment reads part of a shard whose chunks are intact but whose bytes are another unit's: the rows it read
    decode, and the segment's end reads the shard's rest and fails, rather than return what it folded."""
    from pathlib import Path

    from hrsa.analyze.streaming.backends import NumpyBackend
    from hrsa.analyze.streaming.plan import Tile
    from hrsa.analyze.streaming.stream import StateReader, fold_segment
    from hrsa.store.errors import CorruptDataError

    pair = make_pair_store()
    store = pair.open()
    shard_tokens = store.model_info("a").layout.shard_tokens
    shards = sorted(p for p in Path(pair.url).rglob("*") if p.is_file() and "/a/hidden/1/c/" in p.as_posix())
    assert len(shards) >= 3 and shards[0].stat().st_size == shards[1].stat().st_size
    reader = StateReader({(m, k): store.hidden_state_array(m, k) for m in "ab" for k in (0, 1)}, 64)
    pairs = ((("a", 1), ("b", 1)),) if tile_kind == "matched" else ((("a", 1), ("b", 0)), (("a", 0), ("b", 1)))
    tile = Tile(tile_kind, pairs)
    half = token_blocks(slice(0, shard_tokens // 2), 64)
    backend = NumpyBackend(compute_dtype="float64")
    fold_segment(tile, reader, half, backend)  # intact: it folds and returns
    shards[0].write_bytes(shards[1].read_bytes())
    with pytest.raises(CorruptDataError, match="Expected an intact shard 0 .*xxh3 differs"):
        fold_segment(tile, reader, half, backend)


@pytest.mark.parametrize("cross_layer", [False, True], ids=["matched", "cross-layer"])
def test_a_block_s_states_are_read_by_several_threads_to_the_same_results(pair_store, monkeypatch, cross_layer) -> None:
    """With products on a GPU the host only reads: one thread decoding every state of a block left 15 of an H200
    machine's 16 cores idle. ``read_threads`` reads a block's states in that many threads at once (each its own
    buffers), to the very same results."""
    import threading
    import time

    from hrsa.analyze.streaming.stream import StateReader

    lock, in_flight, most = threading.Lock(), [0], [0]
    read = StateReader.read

    def slow_read(self, key, block):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.002)  # a read long enough for another thread's to start meanwhile
        try:
            return read(self, key, block)
        finally:
            with lock:
                in_flight[0] -= 1

    store = pair_store.open()
    runs = {}
    for threads in (1, 3):
        monkeypatch.setattr(StateReader, "read", slow_read)
        most[0] = 0
        runs[threads] = analyze_pair(store, "a", "b", metrics=("cka", "dimcorr"), cross_layer=cross_layer,
                                     block_tokens=256, workers=1, read_threads=threads, compute_dtype="float64",
                                     scheduler="threads")  # patched in this process: not on Ray
        assert most[0] == threads, f"{most[0]} reads at once with read_threads={threads}"
    one, three = runs[1], runs[3]
    assert [r.value for r in one.cka] == [r.value for r in three.cka]
    if cross_layer:
        assert np.array_equal(one.cka_matrix, three.cka_matrix)
    assert "3 reading threads" in three.plan.describe()
