"""Edges of ``--memory-budget``: the budget a refusal names works when used, near-minimum budgets plan
instead of raising a traceback, the local passes give freed heap back between tiles, and the resident set printed
beside the plan already holds the libraries the passes and figures import."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from hrsa.analyze.streaming.plan import MemoryBudgetError, PlanInputs, parse_memory_budget, plan_analysis
from hrsa.store.selection import TokenSelection


def _named_budget(error: MemoryBudgetError) -> int:
    return parse_memory_budget(re.search(r"at least ([0-9.]+ ?[kMGT]?B)", str(error)).group(1).replace(" ", ""))


@pytest.mark.parametrize("d", [48, 96, 1000, 2048, 3000, 4096])
def test_the_budget_a_refusal_names_is_enough(d: int) -> None:
    inputs = PlanInputs(matched=(0, 1), rows=(), cols=(), dx=d, dy=d, read_bytes_a=4, read_bytes_b=4, compute_bytes=8,
                        n_tokens=1000, block_tokens=256, n_blocks=4, workers=1, memory_budget=1)
    with pytest.raises(MemoryBudgetError) as refused:
        plan_analysis(inputs)
    named = _named_budget(refused.value)
    plan = plan_analysis(PlanInputs(**{**inputs.__dict__, "memory_budget": named}))  # no MemoryBudgetError
    assert plan.estimated_peak <= named


def test_a_hidden_size_under_64_just_above_the_smallest_budget_is_planned(make_pair_store) -> None:
    """D = 48: the smallest blocks that fit are 48 tokens, which the planner never tried; the budget the refusal
    named (and those up to ~10% above it) raised ``ValueError: min() arg is an empty sequence``."""
    from hrsa.analyze.pair.resolve import resolve_pair

    store = make_pair_store(d=48, doc_lengths=(700, 1, 1, 300, 1200, 64, 65, 500, 150)).open()
    kw = dict(metrics=("cka", "dimcorr", "procrustes", "cca"), debiased=True, cross_layer=True,
              selection=TokenSelection(), block_tokens=None, workers=2, save_rotation=False, compute_bytes=8, groups=10)
    with pytest.raises(MemoryBudgetError) as refused:
        resolve_pair(store, "a", "b", memory_budget=1000, **kw)
    named = _named_budget(refused.value)
    for budget in (named, int(named * 1.03), int(named * 1.08)):
        pair = resolve_pair(store, "a", "b", memory_budget=budget, **kw)
        assert pair.plan.estimated_peak <= budget


def test_local_passes_give_the_freed_heap_back_after_each_tile(pair_store, monkeypatch) -> None:
    """Arrays under glibc's mmap threshold (a co-moment matrix of D <= 362, a group's Moments) stay in the worker
    threads' heaps once freed: without a trim after each tile the next pass's peak stacks on them (measured: 25 states
    of D = 256 at --memory-budget 191MB peaked 86-153 MB above budget + printed baseline; 7-9 MB with it)."""
    import hrsa.analyze.pair.passes as passes
    from hrsa.analyze.pair import analyze_pair

    calls = []
    monkeypatch.setattr(passes, "release_freed_heap", lambda: calls.append(1), raising=False)
    res = analyze_pair(pair_store.open(), "a", "b", metrics=("cka", "dimcorr"), cross_layer=True, memory_budget="60kB",
                       scheduler="threads", backend="numpy", groups=0, workers=1)
    assert res.plan.passes >= 2
    assert len(calls) >= res.plan.passes


_PRINTED = textwrap.dedent("""
    import sys
    import hrsa.analyze.cli as cli
    seen = []
    real = cli.resident_bytes
    def resident_bytes():
        seen.append(sorted(m for m in ("dask", "scipy", "matplotlib") if m in sys.modules))
        return real()
    cli.resident_bytes = resident_bytes
    sys.argv = ["hrsa", "analyze", "--store", sys.argv[1], "--pair", "a", "b", "--no-store-results", "--out", sys.argv[2],
                "--metrics", "cka,dimcorr", "--groups", "0"]
    from hrsa.cli import main
    try:
        main()
    except SystemExit:
        pass
    print("SEEN", seen)
""")


def test_the_resident_set_printed_beside_the_plan_holds_the_libraries_the_run_imports(pair_store, tmp_path) -> None:
    """Dask and SciPy (first imported by the passes, ~60 MB) and matplotlib (the figures, ~35 MB) were loaded after the
    printed baseline: a run peaked ~90 MB above budget + baseline whatever its budget."""
    done = subprocess.run([sys.executable, "-c", _PRINTED, pair_store.url, str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300, check=False)
    seen = re.search(r"SEEN (.*)", done.stdout)
    assert seen, done.stderr[-2000:]
    assert seen.group(1) == "[['dask', 'matplotlib', 'scipy']]", seen.group(1)


def _plan_at(store, budget: int, selection: TokenSelection = TokenSelection()):
    from hrsa.analyze.pair.resolve import resolve_pair

    return resolve_pair(store, "a", "b", metrics=("cka", "dimcorr"), debiased=False, cross_layer=True,
                        selection=selection, memory_budget=budget, block_tokens=None, workers=1, save_rotation=False,
                        compute_bytes=8, groups=0)


def test_a_larger_budget_never_plans_a_slower_analysis(make_pair_store) -> None:
    """Blocks below the hidden size were planned only when no larger one fit: 930 kB planned 11 passes in blocks of
    64 tokens, 1.07 MB 20 passes in blocks of 128 (each pass reads the selection again). Every size is planned now,
    and the plan of least projected time chosen. Within 10%: a size's tiles are chosen for the fewest passes, not the
    fewest bytes, and with more room they may read a little more (here 7.5% once, from 2.1 MB to 2.4 MB)."""
    from hrsa.analyze.pair.resolve import projected_seconds

    store = make_pair_store(d=128, dtype="bfloat16", doc_lengths=(700, 900, 1200, 300, 1000)).open()
    plans = [(budget, _plan_at(store, budget).plan) for budget in (int(6e5 * 1.15**i) for i in range(16))]
    seconds = [(budget, projected_seconds(plan), plan.passes, plan.inputs.block_tokens) for budget, plan in plans]
    assert all(later[1] <= 1.1 * earlier[1] for earlier, later in itertools.pairwise(seconds)), seconds
    assert seconds[-1][1] < 0.6 * seconds[0][1] and seconds[-1][2] < seconds[0][2] / 4, seconds


def test_the_block_size_is_chosen_by_what_it_reads_and_how_fast_it_multiplies(make_pair_store) -> None:
    """Fewest passes first chose the thinnest blocks whenever they saved a pass, though thin blocks slow the products
    and their tiles may read more: (e) of benchmarks/analyze.py at 1.1 GB ran in blocks of 288 tokens and 5 passes
    (8.57 GB read, 50.6-55.1 s) where blocks of 1,024 and 6 passes read 7.14 GB in 45.2-46.1 s. Here blocks of 64
    tokens would save two passes over 128's; the plan of least projected time is chosen, and it is the thicker one."""
    from hrsa.analyze.pair import resolve

    store = make_pair_store(d=128, doc_lengths=(700, 900, 1200, 300, 1000)).open()
    options: list[Any] = []
    plans = resolve._plans

    def kept(layout: Any, sizes: list[int], least_passes: int = 0) -> Any:
        found = plans(layout, sizes, least_passes)
        options[:] = [plan for _, _, plan in found[0]]
        return found

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(resolve, "_plans", kept)  # the real plans, seen
        chosen = _plan_at(store, 2_800_000).plan
    by_size = {plan.inputs.block_tokens: plan for plan in options}
    passes = {size: plan.passes for size, plan in by_size.items()}
    assert passes[64] < passes[128] == chosen.passes and chosen.inputs.block_tokens == 128, passes
    assert resolve.projected_seconds(chosen) == min(resolve.projected_seconds(plan) for plan in options)


def test_the_budget_a_refusal_names_for_a_selection_of_rows_is_the_smallest_that_plans(make_pair_store) -> None:
    """The refusal named one block size's need, not the least of those tried: with --positions 0:2 it named 2-4x
    more than planned and ran."""
    store = make_pair_store(d=256, doc_lengths=(700, 900, 1200, 300, 1000, 800)).open()
    selection = TokenSelection(positions=(0, 2))
    with pytest.raises(MemoryBudgetError) as refused:
        _plan_at(store, 1000, selection)
    named = _named_budget(refused.value)
    assert _plan_at(store, named, selection).plan.estimated_peak <= named
    with pytest.raises(MemoryBudgetError):
        _plan_at(store, int(named * 0.98), selection)
