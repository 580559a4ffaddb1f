"""k-NN within --memory-budget: the real peak (tracemalloc) stays under the memory model's estimate, the estimate
under the budget; a budget too small is refused before any hidden state is read, with a fix that fits."""

from __future__ import annotations

import math
import re
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import numpy as np
import pytest

from hrsa.analyze.local.knn import knn_pair
from hrsa.analyze.local.memory import MAX_SAMPLE_READS, KnnPass, plan_knn
from hrsa.analyze.streaming.plan import MemoryBudgetError, parse_memory_budget
from hrsa.store import ActivationStore
from hrsa.store.errors import UserError

T = TypeVar("T")
N_DOCS, DOC_TOKENS, D = 40, 100, 64  # 4000 tokens: the sample's rows, not fixed costs, dominate the peak


@pytest.fixture(scope="module")
def knn_store(build_store, tmp_path_factory: pytest.TempPathFactory):
    return build_store(str(tmp_path_factory.mktemp("knn-memory") / "store"), doc_lengths=(DOC_TOKENS,) * N_DOCS, d=D)


@pytest.fixture(scope="module")
def bf16_store(build_store, tmp_path_factory: pytest.TempPathFactory):
    return build_store(str(tmp_path_factory.mktemp("knn-memory") / "bf16"), doc_lengths=(DOC_TOKENS,) * N_DOCS, d=D,
                       dtype="bfloat16")


def _size(n: int, k: int = 10, search: str = "exact") -> KnnPass:
    return KnnPass(n=n, d=D, read_bytes=4, k=k, shard_tokens=256, n_docs=N_DOCS, search=search)


def _measured(fn: Callable[[], T]) -> tuple[T, int]:
    """(fn's result, the peak bytes tracemalloc saw while it ran)."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def one_block(knn_store):
    return knn_pair(knn_store.open(), "a", "b", ks=(5, 10), n_sample=None, hidden_states=[1], memory_budget="1GB")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_block_holds_the_sample_once(request: pytest.FixtureRequest, dtype: str) -> None:
    store = request.getfixturevalue("knn_store" if dtype == "float32" else "bf16_store").open()
    knn_pair(store, "a", "b", ks=(5,), n_sample=300, hidden_states=[1])  # burn-in: imports, thread pools
    res, peak = _measured(lambda: knn_pair(store, "a", "b", ks=(5, 10), n_sample=None, hidden_states=[1],
                                           memory_budget="1GB"))
    assert res.sample_reads == 1 and res.n_tokens == N_DOCS * DOC_TOKENS
    assert peak <= res.estimated_peak <= parse_memory_budget("1GB")
    assert res.estimated_peak < 2.0 * peak, (peak, res.estimated_peak)  # an upper bound, not a loose one


def test_a_budget_below_the_sample_reads_it_in_blocks(knn_store, one_block) -> None:
    n = N_DOCS * DOC_TOKENS
    # Room for a third of the sample per block; the exact search finds k + 1 = 11 (the tie with the next neighbour).
    budget = _size(n, k=11).peak(math.ceil(n / 3), math.ceil(n / 3))
    res, peak = _measured(lambda: knn_pair(knn_store.open(), "a", "b", ks=(5, 10), n_sample=None, hidden_states=[1],
                                           memory_budget=budget))
    assert res.sample_reads == 3
    assert peak <= res.estimated_peak <= budget, (peak, res.estimated_peak, budget)
    for k in (5, 10):  # blocks change what is held, not the neighbours
        assert res.overlap[k][0].mean == one_block.overlap[k][0].mean
        assert res.overlap_interval[k][0] == one_block.overlap_interval[k][0]


def test_too_small_a_budget_is_refused_before_any_read(knn_store, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    original = ActivationStore.hidden_state
    monkeypatch.setattr(ActivationStore, "hidden_state", lambda self, *a, **kw: reads.append(a) or original(self, *a, **kw))
    with pytest.raises(MemoryBudgetError, match=r"--knn-sample \d+ or --memory-budget [0-9.]+MB") as error:
        knn_pair(knn_store.open(), "a", "b", ks=(10,), n_sample=None, memory_budget="5MB")
    assert reads == []
    assert isinstance(error.value, UserError) and "\n" not in str(error.value)


@pytest.mark.parametrize("search", ["exact", "hnsw"])
def test_the_fix_named_in_the_error_fits(search: str) -> None:
    size, budget = _size(200_000, search=search), parse_memory_budget("40MB")
    with pytest.raises(MemoryBudgetError) as error:
        plan_knn(size, budget)
    sample, need = re.search(r"--knn-sample (\d+) or --memory-budget (\S+)\.", str(error.value)).groups()
    fitted = plan_knn(replace(size, n=int(sample)), budget)
    assert fitted.estimated_peak <= budget and fitted.sample_reads <= MAX_SAMPLE_READS
    assert plan_knn(size, parse_memory_budget(need)).estimated_peak <= parse_memory_budget(need)
    with pytest.raises(MemoryBudgetError):
        plan_knn(replace(size, n=int(sample) + 50), budget)  # the largest sample that fits, within rounding


def test_blocks_grow_with_the_budget_and_hnsw_needs_the_whole_sample() -> None:
    size = _size(100_000)
    blocks = [plan_knn(size, parse_memory_budget(b)) for b in ("70MB", "140MB", "1GB")]
    assert [b.query_block for b in blocks] == sorted(b.query_block for b in blocks)
    assert blocks[-1].sample_reads == 1 and blocks[0].sample_reads > 1
    assert all(b.estimated_peak <= b.memory_budget for b in blocks)
    with pytest.raises(MemoryBudgetError, match="hnsw search"):
        plan_knn(replace(size, search="hnsw"), parse_memory_budget("70MB"))
    capped = plan_knn(size, parse_memory_budget("1GB"), query_block=1000, db_block=5000)
    assert (capped.query_block, capped.db_block, capped.sample_reads) == (1000, 5000, 100)  # caps asked for: no refusal


def test_peak_grows_with_what_is_held() -> None:
    base = _size(50_000)
    assert base.peak(5000, 5000) < base.peak(10_000, 10_000) < base.peak(50_000, 50_000)
    assert base.peak(50_000, 50_000) < replace(base, d=2 * D).peak(50_000, 50_000)
    assert base.peak(50_000, 50_000) < replace(base, k=50).peak(50_000, 50_000)
    np.testing.assert_array_less(base.search_bytes(50_000, 50_000), replace(base, search="hnsw").hnsw_bytes())
