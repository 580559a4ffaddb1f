"""Tile planning: every pair exactly once, within budget, square-ish tiles, clear errors."""

from __future__ import annotations

from dataclasses import replace
import itertools

import pytest

from hrsa.analyze.streaming.plan import MemoryBudgetError, PlanInputs, format_bytes, parse_memory_budget, plan_analysis
from hrsa.store.errors import UserError


def inputs(**kw) -> PlanInputs:
    base = {"matched": tuple(range(29)), "rows": tuple(range(29)), "cols": tuple(range(29)), "dx": 3584, "dy": 3584,
            "read_bytes_a": 2, "read_bytes_b": 2, "compute_bytes": 8, "n_tokens": 1_000_000, "block_tokens": 1024,
            "n_blocks": 977, "workers": 2, "memory_budget": 16 * 10**9}
    return PlanInputs(**{**base, **kw})


def test_a_7b_shaped_cross_layer_plan_covers_every_pair_once_within_budget() -> None:
    plan = plan_analysis(inputs())
    cross = [pair for t in plan.tiles if t.kind == "cross" for pair in t.pairs if pair[0] != pair[1]]
    assert sorted(cross) == [(("a", i), ("b", j)) for i in range(29) for j in range(29)]
    # Self co-moments once each: riding along in a cross tile that reads the state, or in a tile of their own.
    selfs = [pair for t in plan.tiles if t.kind in ("self", "cross") for pair in t.pairs if pair[0] == pair[1]]
    assert sorted(selfs) == sorted([(("a", i), ("a", i)) for i in range(29)] + [(("b", j), ("b", j)) for j in range(29)])
    assert all(p[0] in t.streams for t in plan.tiles if t.kind == "cross" for p in t.selfs)
    matched = [pair for t in plan.tiles if t.kind == "matched" for pair in t.pairs]
    assert matched == [(("a", k), ("b", k)) for k in range(29)]
    assert plan.estimated_peak <= 16 * 10**9
    assert plan.passes == plan.count("matched") + plan.count("cross") + plan.count("self")
    # Square-ish rectangles: no cross tile reads far more states than a square of the same pairs would.
    for tile in plan.tiles:
        if tile.kind == "cross":
            rows, cols = tile.rectangle
            assert len(rows) * len(cols) + len(tile.selfs) == len(tile.pairs)
    text = plan.describe()
    assert f"{plan.passes} pass(es)" in text and "29 x 29 pairs" in text and "GB" in text


def test_a_larger_budget_needs_fewer_passes() -> None:
    passes = [plan_analysis(inputs(memory_budget=b * 10**9)).passes for b in (4, 16, 64)]
    assert passes[0] > passes[1] > passes[2]


def test_small_models_fit_in_one_pass_per_kind() -> None:
    plan = plan_analysis(inputs(dx=64, dy=64, n_blocks=4))
    assert (plan.count("matched"), plan.count("cross"), plan.count("self")) == (1, 1, 0)  # selfs ride in the cross tile
    assert plan.bytes_read() == 2 * plan.selection_bytes()  # the matched pass and the cross pass read every state once
    # Products: 29 matched pairs (C_xx, C_yy, C_xy), 29 x 29 cross pairs, 58 self co-moments, 2 n D^2 each.
    assert plan.product_flops() == 2.0 * 1_000_000 * 64 * 64 * (3 * 29 + 29 * 29 + 58)


def test_too_small_a_budget_names_the_minimum() -> None:
    with pytest.raises(MemoryBudgetError, match=r"at least .* GB.*Raise --memory-budget"):
        plan_analysis(inputs(memory_budget=10**8))
    assert issubclass(MemoryBudgetError, UserError)


def test_parallelism_falls_back_to_one_worker_before_giving_up() -> None:
    one = plan_analysis(inputs(matched=(0,), rows=(), cols=(), workers=1, memory_budget=10**12)).estimated_peak
    plan = plan_analysis(inputs(matched=(0,), rows=(), cols=(), workers=4, memory_budget=one + 1))
    assert plan.workers == 1 and plan.passes == 1


def test_workers_are_traded_for_fewer_passes_not_more() -> None:
    serial = plan_analysis(inputs(workers=1, memory_budget=4 * 10**9))
    parallel = plan_analysis(inputs(workers=4, memory_budget=4 * 10**9))
    assert parallel.passes == serial.passes  # 4 copies of each tile would need far more passes
    roomy = plan_analysis(inputs(dx=64, dy=64, workers=4))
    assert roomy.workers == 4 and roomy.passes == 2  # when memory is plentiful, parallelism is free


def test_workers_never_exceed_blocks() -> None:
    assert plan_analysis(inputs(dx=8, dy=8, n_blocks=2, workers=8)).workers == 2


@pytest.mark.parametrize(("text", "expected"), [("4GB", 4 * 10**9), ("512MiB", 512 * 2**20), ("1.5g", 1_500_000_000),
                                                ("2e9", 2 * 10**9), ("300kB", 300_000), (1234, 1234)])
def test_memory_budgets_parse(text, expected) -> None:
    assert parse_memory_budget(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GB", "0", "4 parsecs", ""])
def test_bad_memory_budgets_are_user_errors(text) -> None:
    with pytest.raises(UserError, match="Expected a memory budget"):
        parse_memory_budget(text)


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (512, 2.5e6, 3.2e9)] == ["512 B", "2.5 MB", "3.2 GB"]


def test_tiles_are_disjoint_in_pairs() -> None:
    plan = plan_analysis(inputs(memory_budget=8 * 10**9))
    seen = [pair for t in plan.tiles for pair in t.pairs if t.kind != "matched"]
    assert len(seen) == len(set(seen))
    assert all(a != b for a, b in itertools.pairwise(plan.tiles))


def test_each_tile_has_its_estimate_and_the_plan_the_largest() -> None:
    plan = plan_analysis(inputs(memory_budget=8 * 10**9))
    assert max(plan.estimate(t) for t in plan.tiles) == plan.estimated_peak <= 8 * 10**9
    assert all(plan.estimate(t) <= 8 * 10**9 for t in plan.tiles)


@pytest.mark.parametrize("workers", [1, 3])
def test_the_readers_cache_counts_once_per_state_read_whatever_the_workers(workers) -> None:
    bare = plan_analysis(inputs(dx=64, dy=32, n_blocks=8, workers=workers))
    cached = plan_analysis(inputs(dx=64, dy=32, n_blocks=8, workers=workers, cache_bytes_a=1000, cache_bytes_b=10))
    assert cached.tiles == bare.tiles and cached.workers == bare.workers == workers
    for tile in bare.tiles:
        states = [s for s, _ in tile.streams]
        assert cached.estimate(tile) - bare.estimate(tile) == 1000 * states.count("a") + 10 * states.count("b")


def test_finishing_a_matched_pair_is_counted() -> None:
    """With blocks of one token the finish (the SVD-based metrics on D x D co-moments) makes a matched tile's peak."""
    plan = plan_analysis(inputs(matched=(0,), rows=(), cols=(), dx=512, dy=512, block_tokens=1, workers=1))
    moments = 8 * 3 * 512**2
    assert plan.estimated_peak >= moments + 12 * 8 * 512**2


def test_groups_of_documents_are_counted_and_halved_when_one_pair_would_not_fit() -> None:
    one = inputs(matched=(0,), rows=(), cols=(), workers=1, n_blocks=10)
    plain, grouped = plan_analysis(replace(one, groups=0)), plan_analysis(replace(one, groups=10))
    moments = 8 * 3 * 3584**2  # C_xx, C_yy, C_xy of one pair
    assert grouped.estimated_peak - plain.estimated_peak >= 10 * moments  # ten groups' Moments, and the jackknife's two
    assert grouped.inputs.groups == 10 and "10 groups" in grouped.describe()
    tight = plan_analysis(replace(one, groups=10, memory_budget=grouped.estimated_peak - 1))  # ten do not fit, five do
    assert tight.inputs.groups == 5 and tight.groups_asked == 10 and tight.estimated_peak < grouped.estimated_peak
    assert "5 groups (of 10 asked" in tight.describe()
    none = plan_analysis(replace(one, groups=10, memory_budget=plain.estimated_peak))  # only the plain pass fits
    assert none.inputs.groups == 0 and none.estimated_peak == plain.estimated_peak


def test_the_plan_says_what_holds_its_largest_tiles_memory() -> None:
    """The accumulators, the store reader's shard objects (a whole verified shard per state) and the rest, from the
    memory model's own terms: a 7B cross-layer tile's accumulators by hand, and the three adding up to the estimate."""
    cache = 8192 * 3584 * 2
    plan = plan_analysis(inputs(matched=(), compute_bytes=4, workers=1, cache_bytes_a=cache, cache_bytes_b=cache))
    largest = max(plan.tiles, key=plan.estimate)
    rows, cols = largest.rectangle
    accumulators = len(largest.pairs) * 8 * (3584 * 3584 + 2 * 3584)  # C_xy and two means per pair, float64
    line = plan.describe().splitlines()[-1]
    assert line.startswith("    its largest tile: accumulators ") and format_bytes(accumulators) in line
    assert f"the reader's shard objects {format_bytes(cache * (len(rows) + len(cols)))}," in line
    rest = plan.estimate(largest) - accumulators - cache * (len(rows) + len(cols))
    assert line.endswith(f"blocks and product sums {format_bytes(rest)}") and rest > 0


@pytest.mark.parametrize("compute_bytes", [4, 8])
def test_a_gpus_free_memory_bounds_the_tiles_whose_sums_stay_there(compute_bytes: int) -> None:
    """A 7B pair's 29 x 29 tile holds 86 GB of float64 sums on the GPU (float64 products add into them; float32 ones
    keep a 43 GB float32 run sum beside them): one tile fits the host's 200 GB, not an 80 GB GPU. The device's free
    memory bounds the tiles as the budget does, and every tile's estimate on the device fits it."""
    from hrsa.analyze.streaming.plan import _MemoryModel

    inputs = PlanInputs(matched=(), rows=tuple(range(29)), cols=tuple(range(29)), dx=3584, dy=3584, read_bytes_a=2,
                        read_bytes_b=2, compute_bytes=compute_bytes, n_tokens=1_000_000, block_tokens=4096,
                        n_blocks=245, workers=1, memory_budget=200 * 10**9)
    host_only = plan_analysis(inputs)
    assert host_only.count("cross") == 1
    on_gpu = plan_analysis(replace(inputs, device_budget=78 * 10**9))
    memory = _MemoryModel(on_gpu.inputs, on_gpu.workers)
    sums = max(memory.device_peak(t) for t in host_only.tiles)
    assert sums > 78 * 10**9  # the single tile would not fit the GPU
    assert on_gpu.count("cross") > 1 and all(memory.device_peak(t) <= 78 * 10**9 for t in on_gpu.tiles)
    assert "GPU: ~" in on_gpu.describe() and "GPU" not in host_only.describe()


@pytest.mark.parametrize(("dim", "compute_bytes", "passes"), [(1536, 8, 1), (3584, 8, 1), (3584, 4, 2)])
def test_a_whole_pass_on_a_gpu_counts_no_host_accumulators_and_reads_the_store_once(dim: int, compute_bytes: int,
                                                                                    passes: int, monkeypatch) -> None:
    """A stacked tile's pass of one segment with products on a GPU keeps its float64 sums there and reduces them there
    to what CKA and dimension-wise correlation read (PendingBlocks.device_summaries): the host never writes its total.
    Counted on the host as well, a 1.5B pair's 29 x 29 tile (16 GB of sums) took 9 passes at the default 4 GB budget
    on an H200 that held it whole, and a 7B pair's (86 GB) 48: each a read of the whole store. (A 7B tile's float32
    products keep a 43 GB run sum beside the float64 one: two tiles on the H200.)"""
    from hrsa.analyze.streaming import plan as plan_module
    from hrsa.analyze.streaming.plan import _MemoryModel

    monkeypatch.setattr(plan_module, "host_memory_bytes", lambda: 128 << 30)  # the H200 node's RAM
    inputs = PlanInputs(matched=(), rows=tuple(range(29)), cols=tuple(range(29)), dx=dim, dy=dim, read_bytes_a=2,
                        read_bytes_b=2, compute_bytes=compute_bytes, n_tokens=1_000_000, block_tokens=4096,
                        n_blocks=245, workers=4, memory_budget=4 * 10**9)
    host_only = plan_analysis(inputs)
    on_gpu = plan_analysis(replace(inputs, device_budget=137 * 10**9))  # an H200's 139 GiB less the margin
    assert host_only.passes >= 5
    assert (on_gpu.passes, on_gpu.workers) == (passes, 1)  # one segment: several would each cross their sums over
    memory = _MemoryModel(on_gpu.inputs, 1)
    assert all(memory.sums_on_device(t) and memory.device_peak(t) <= 137 * 10**9 for t in on_gpu.tiles)
    tile = on_gpu.tiles[0]
    assert on_gpu.estimated_peak <= 4 * 10**9 and memory.accumulators(tile) == 0
    assert "accumulators none here (summed and reduced on the GPU)" in on_gpu.describe()
    # Where each worker's segment crosses its sums to the host (Ray: segments per tile not known to the plan, so
    # counted), and with several segments locally, the host holds them and the tiles stay small.
    assert plan_analysis(replace(inputs, device_budget=137 * 10**9, per_worker=True)).passes == host_only.passes
    several = _MemoryModel(replace(inputs, device_budget=137 * 10**9), 2)
    assert several.peak(tile) > 2 * len(tile.pairs) * 8 * dim * dim
    # The host's total is allocated unwritten: a tile's sums larger than the host's RAM would be refused by Linux's
    # overcommit heuristic, so there the host's budget bounds the tiles as before.
    monkeypatch.setattr(plan_module, "host_memory_bytes", lambda: 8 << 30)
    assert plan_analysis(replace(inputs, device_budget=137 * 10**9)).passes > 1


@pytest.mark.parametrize(("dim", "block", "free", "budget"), [(3584, 4096, 137, 4), (4096, 8192, 78, 16),
                                                              (3584, 8192, 137, 16), (1536, 4096, 20, 4),
                                                              (12288, 8192, 12, 16)])
def test_the_gpu_admits_at_run_time_the_float32_tiles_the_plan_fits_there(dim, block, free, budget, monkeypatch) -> None:
    """The plan and the pass's own check on each device sum (cross_tile._device_sum, at the first run's flush: the
    rectangle's, then each self co-moment's, while the stacks and every run's float32 sum are held) are one rule: a
    tile the plan fits is admitted, so its float64 sums stay on the GPU and the host's total (counted 0 for a
    one-segment pass) is never written. Found by review: a 7B tile planned at 136.9 of 137 GB was refused at run time
    (its 86 GB total went to a host budgeted 4 GB), and so was a self tile of D = 12288."""
    import types

    import torch
    from hrsa.analyze.accumulators import cross_tile
    from hrsa.analyze.streaming import plan as plan_module
    from hrsa.analyze.streaming.plan import Tile, _MemoryModel

    class RunSum:  # what _device_sum reads of a run's float32 product on a CUDA device
        device = types.SimpleNamespace(type="cuda")

        def __init__(self, rows: int, cols: int) -> None:
            self.shape = (rows, cols)

        def element_size(self) -> int:
            return 4

        def numel(self) -> int:
            return self.shape[0] * self.shape[1]

    monkeypatch.setattr(plan_module, "host_memory_bytes", lambda: 2 << 40)
    monkeypatch.setattr(torch, "zeros", lambda *args, **kwargs: "the device sum")  # where _device_sum admits it
    device_budget = free * 10**9
    plan = plan_analysis(PlanInputs(matched=(), rows=tuple(range(29)), cols=tuple(range(29)), dx=dim, dy=dim,
                                    read_bytes_a=2, read_bytes_b=2, compute_bytes=4, n_tokens=1_000_000,
                                    block_tokens=block, n_blocks=-(-1_000_000 // block), workers=4,
                                    memory_budget=budget * 10**9, device_budget=device_budget))
    memory = _MemoryModel(plan.inputs, plan.workers)
    admitted = {}
    lone_self = Tile("self", ((("a", 0), ("a", 0)),))  # a state's self co-moments alone: no run sum freed before it
    for tile in (*plan.tiles, lone_self):
        assert memory.device_peak(tile) <= device_budget
        tight = memory.device_peak(tile)  # a GPU with exactly the room the plan counts for this tile
        rows, cols = tile.rectangle or ((), ())
        sums = [RunSum(len(rows) * dim, len(cols) * dim)] if rows else []
        sums += [RunSum(dim, dim) for _ in tile.selfs]  # folded after the rectangle's, in turn
        held = block * max(len(rows) + len(cols), 1) * dim * 4 + sum(4 * r.numel() for r in sums)  # stacks, run sums
        for run_sum in sums:
            # the budget is the GPU's free memory less a margin for cuBLAS: the rule must not lean on that margin
            monkeypatch.setattr(cross_tile, "device_free_bytes", lambda device, held=held: tight - held)
            admitted.setdefault(tile.kind, []).append(cross_tile._device_sum(run_sum, block) == "the device sum")
            held += 8 * run_sum.numel() - 4 * run_sum.numel()  # its float64 sum kept, its run's sum let go
    assert admitted and all(all(kind) for kind in admitted.values()), admitted


def test_a_budget_equal_to_a_tiles_estimate_holds_that_tile() -> None:
    """The budget is an upper bound the estimate may reach: two matched pairs whose tile's estimate is exactly the
    budget stay one pass, and one byte less makes two."""
    two = inputs(matched=(0, 1), rows=(), cols=(), dx=256, dy=256, workers=1, memory_budget=10**12)
    together = plan_analysis(two)
    assert together.passes == 1
    exact = plan_analysis(replace(two, memory_budget=together.estimated_peak))
    assert exact.passes == 1 and exact.estimated_peak == together.estimated_peak
    assert plan_analysis(replace(two, memory_budget=together.estimated_peak - 1)).passes == 2


@pytest.mark.parametrize("groups", [0, 10])
def test_a_per_worker_budget_is_one_tasks_whatever_the_workers(groups: int) -> None:
    """Per-worker budgets (Ray tasks, each its own process): a task holds one copy of its tile's accumulators (all G
    groups' with groups), so the tiles and estimates do not depend on the workers: every W plans as W = 1 does, and the
    reader's cache is the several workers' (never the lone reader's)."""
    base = inputs(matched=tuple(range(6)), rows=tuple(range(4)), cols=tuple(range(4)), dx=512, dy=384, n_blocks=50,
                  memory_budget=3 * 10**8, groups=groups, per_worker=True, cache_bytes_a=7000, cache_bytes_b=5000,
                  lone_cache_bytes=(10, 10))
    plans = {w: plan_analysis(replace(base, workers=w)) for w in (1, 2, 8)}
    assert {w: p.workers for w, p in plans.items()} == {1: 1, 2: 2, 8: 8}
    assert plans[1].tiles == plans[2].tiles == plans[8].tiles
    for tile in plans[1].tiles:
        assert plans[1].estimate(tile) == plans[2].estimate(tile) == plans[8].estimate(tile)
    assert plans[1].estimated_peak == plans[8].estimated_peak
    if groups:  # a matched tile holds G Moments per pair while streaming
        matched = [t for t in plans[8].tiles if t.kind == "matched"][0]
        moments = 8 * (512**2 + 384**2 + 512 * 384)
        assert plans[8].estimate(matched) >= groups * moments * len(matched.pairs)
    shared = plan_analysis(replace(base, per_worker=False, workers=1, lone_cache_bytes=None))
    assert shared.tiles == plans[1].tiles and shared.estimated_peak == plans[1].estimated_peak


@pytest.mark.parametrize(("dx", "dy"), [(512, 64), (64, 512)])
def test_finishing_a_matched_pair_of_unequal_widths_counts_the_wider(dx: int, dy: int) -> None:
    """The metrics' D x D float64 matrices (measured 12.5 of them) are of the wider model's D."""
    plan = plan_analysis(inputs(matched=(0,), rows=(), cols=(), dx=dx, dy=dy, block_tokens=1, workers=1))
    moments = 8 * (dx * dx + dy * dy + dx * dy)
    assert plan.estimated_peak >= moments + 12.5 * 8 * max(dx, dy) ** 2
