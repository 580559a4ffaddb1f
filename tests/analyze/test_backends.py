"""Backends: torch reproduces the numpy block statistics; CUDA runs match the oracle (gpu tier)."""

from __future__ import annotations

import numpy as np
import pytest

from hrsa.analyze.streaming.backends import NumpyBackend, TorchBackend, resolve_backend
from hrsa.analyze.pair import analyze_pair
from hrsa.store.errors import UserError

FIELDS = ("mean_x", "mean_y", "c_xx", "c_yy", "c_xy", "q_xx", "q_yy", "q_xy", "g_xx", "g_xy", "g_yx", "g_yy")


def test_torch_on_cpu_in_float64_equals_numpy(make_pair) -> None:
    x, y = make_pair(500, 12)
    got, want = TorchBackend(device="cpu", compute_dtype="float64").moments(x, y), NumpyBackend().moments(x, y)
    for name in FIELDS:
        ref = np.asarray(getattr(want, name))
        np.testing.assert_allclose(getattr(got, name), ref, rtol=0, atol=1e-10 * max(np.abs(ref).max(), 1.0), err_msg=name)
    pairs = [("x", "y"), ("x", "x")]
    cross_t = dict(TorchBackend(device="cpu", compute_dtype="float64").cross_moments({"x": x, "y": y}, pairs))
    cross_n = dict(NumpyBackend().cross_moments({"x": x, "y": y}, pairs))
    for pair in pairs:
        np.testing.assert_allclose(cross_t[pair].c_xy, cross_n[pair].c_xy, rtol=1e-10)


def test_torch_reads_bfloat16_blocks(make_pair) -> None:
    import ml_dtypes

    x, y = make_pair(300, 8)
    xb, yb = x.astype(ml_dtypes.bfloat16), y.astype(ml_dtypes.bfloat16)
    got = TorchBackend(device="cpu", compute_dtype="float64").moments(xb, yb)
    want = NumpyBackend().moments(xb, yb)
    np.testing.assert_allclose(got.c_xy, want.c_xy, rtol=1e-10)


def test_resolve_backend() -> None:
    assert resolve_backend("numpy") == NumpyBackend("float32")  # float64 for the inverses: test_compute_dtype.py
    assert resolve_backend("numpy", "float32").compute_dtype == "float32"
    with pytest.raises(UserError, match="compute dtype"):
        resolve_backend("numpy", "float16")


def test_analysis_with_the_torch_backend_matches_numpy(pair_store) -> None:
    store = pair_store.open()
    via_torch = analyze_pair(store, "a", "b", metrics=("cka", "procrustes"), backend="torch", compute_dtype="float64",
                             cross_layer=True)
    via_numpy = analyze_pair(store, "a", "b", metrics=("cka", "procrustes"), backend="numpy", cross_layer=True,
                             compute_dtype="float64")
    assert via_torch.settings["backend"] == "torch"
    np.testing.assert_allclose(via_torch.cka_matrix, via_numpy.cka_matrix, rtol=1e-10)
    np.testing.assert_allclose([p.h_inv for p in via_torch.procrustes], [p.h_inv for p in via_numpy.procrustes], rtol=1e-9)


@pytest.mark.gpu
def test_cuda_float32_products_match_the_oracle(pair_store, oracle) -> None:
    res = analyze_pair(pair_store.open(), "a", "b", backend="cuda", cross_layer=True)
    assert res.settings["compute_dtype"] == "float32" and res.settings["backend"] == "torch"
    for i, k in enumerate(res.matched):
        x, y = pair_store.x[k], pair_store.y[k]
        assert res.cka[i].value == pytest.approx(oracle.cka(x, y), abs=1e-5)
        assert res.procrustes[i].h_inv == pytest.approx(oracle.procrustes(x, y)[0], abs=1e-4)
    for i in res.hidden_states_a:
        for j in res.hidden_states_b:
            assert res.cka_matrix[i, j] == pytest.approx(oracle.cka(pair_store.x[i], pair_store.y[j]), abs=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])  # float64: a bf16 store's default products
@pytest.mark.parametrize("workers", [1, 2], ids=["whole-pass", "two-segments"])
@pytest.mark.parametrize("room", [True, False], ids=["fits-on-the-device", "no-room-on-the-device"])
def test_a_device_sum_folds_its_runs_on_the_device(pair_store, monkeypatch, room, workers, dtype) -> None:
    """On a GPU the float32 run sums fold into a float64 sum on the device. A pass of one segment reduces it there to
    what the metrics read (|C|_F^2, the diagonal: nothing crosses, the host's total is never written); a segment of
    several crosses once, to be merged. (Folding every run on the host sent the whole tile over PCIe and swept it in
    host memory every 8,192 tokens: an H200 ran a 29 x 29 analysis of D = 1536 at 74x its products' roofline.)
    Where the sum does not fit in the device's free memory, each run crosses over as before, to the same results.
    The device path runs here on CPU tensors, the code CUDA runs, with runs of one 250-token block each."""
    import hrsa.analyze.accumulators.cross_tile as cross_tile

    monkeypatch.setattr(TorchBackend, "_sums_on_host", property(lambda self: False))
    sums_made = []
    if not room:
        monkeypatch.setattr(cross_tile, "_device_sum", lambda products, rows: sums_made.append(rows))
    else:
        made = cross_tile._device_sum
        monkeypatch.setattr(cross_tile, "_device_sum", lambda products, rows: sums_made.append(rows) or made(products, rows))
    monkeypatch.setattr(cross_tile, "FLOAT32_SUM_TOKENS", 250)
    crossings, summarised = [], []
    to_host, on_device = cross_tile.PendingBlocks._sum_to_host, cross_tile.PendingBlocks.device_summaries
    monkeypatch.setattr(cross_tile.PendingBlocks, "_sum_to_host",
                        lambda self: crossings.append(self.total.keys_x) or to_host(self))

    def summaries(self):
        found = on_device(self)
        summarised.extend([] if found is None else [not self.total.c.any()])  # the host's total left untouched
        return found

    monkeypatch.setattr(cross_tile.PendingBlocks, "device_summaries", summaries)
    store = pair_store.open()
    on_gpu = analyze_pair(store, "a", "b", metrics=("cka", "dimcorr"), backend="torch", compute_dtype=dtype,
                          cross_layer=True, block_tokens=250, workers=workers, scheduler="threads")  # patched: no Ray
    exact = analyze_pair(store, "a", "b", metrics=("cka", "dimcorr"), backend="numpy", compute_dtype="float64",
                         cross_layer=True)
    assert on_gpu.plan.workers == workers
    tolerance = 1e-6 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(on_gpu.cka_matrix, exact.cka_matrix, rtol=0, atol=tolerance)
    np.testing.assert_allclose(on_gpu.dimcorr_matrix, exact.dimcorr_matrix, rtol=0, atol=tolerance)
    if dtype == "float64":  # the first run's float64 sum becomes the device's sum: no second matrix, room or not
        assert not sums_made
        room = True
    else:
        assert sums_made
    if not room:
        assert not crossings and not summarised
    elif workers == 1:
        assert not crossings and summarised and all(summarised)
    else:
        tiles = set(crossings)
        assert not summarised and len(crossings) == workers * len(tiles), crossings


def test_a_whole_pass_planned_on_the_gpu_refuses_to_move_its_sums_to_the_host(pair_store, monkeypatch) -> None:
    """A whole pass whose sums the plan kept on the GPU counts no host memory for them (a 7B tile: 86 GB on a host
    budgeted 4 GB). Where the GPU's free memory fell after the plan (another process), the device refuses the sum at the
    pass's first run: one line naming the cause, not the tile's sums written into host memory nobody budgeted. A pass
    the plan counted on the host still crosses (test_a_device_sum_folds_its_runs_on_the_device)."""
    import hrsa.analyze.accumulators.cross_tile as cross_tile
    import hrsa.analyze.pair.analysis as analysis
    from hrsa.analyze.streaming.plan import MemoryBudgetError

    monkeypatch.setattr(TorchBackend, "_sums_on_host", property(lambda self: False))
    monkeypatch.setattr(analysis, "device_budget", lambda backend, gpu_workers: 10 << 30)  # the plan: a roomy GPU
    monkeypatch.setattr(cross_tile, "_device_sum", lambda products, rows: None)  # the pass: no room left
    monkeypatch.setattr(cross_tile, "device_free_bytes", lambda device: 3 << 20)
    crossings = []
    monkeypatch.setattr(cross_tile.PendingBlocks, "_add_to_host", lambda self, matrix: crossings.append(matrix.shape))
    with pytest.raises(MemoryBudgetError, match=r"GPU.*fell after the plan.*another process") as refused:
        analyze_pair(pair_store.open(), "a", "b", metrics=("cka",), backend="torch", compute_dtype="float32",
                     cross_layer=True, block_tokens=250, workers=1, scheduler="threads")
    assert "\n" not in str(refused.value) and not crossings


def test_the_gpus_free_memory_is_planned_for_and_tiles_change_nothing(pair_store, monkeypatch) -> None:
    """Where the products run on a local GPU, its free memory bounds the tiles (a tile's sums stay there): given a GPU
    with room for a few pairs only, the analysis makes more passes, to the same results."""
    import hrsa.analyze.pair.analysis as analysis

    store = pair_store.open()
    common = dict(metrics=("cka",), cross_layer=True, backend="numpy", compute_dtype="float64", scheduler="threads",
                  workers=1, block_tokens=64)
    roomy = analyze_pair(store, "a", "b", **common)
    monkeypatch.setattr(analysis, "device_budget", lambda backend, gpu_workers: 60_000)  # bytes: room for a few 16 x 16 pairs
    tight = analyze_pair(store, "a", "b", **common)
    assert roomy.plan.inputs.device_budget is None and tight.plan.inputs.device_budget == 60_000
    assert tight.plan.passes > roomy.plan.passes
    np.testing.assert_allclose(tight.cka_matrix, roomy.cka_matrix, rtol=1e-12)


def test_a_gpu_without_room_for_one_pair_gets_smaller_blocks_or_one_line_naming_it(make_pair_store, monkeypatch) -> None:
    """One pair's stacks and sums must fit the GPU too: a GPU with room for one pair of small blocks only gets smaller
    blocks (every tile's estimate there within its free memory), and one with room for none is refused in one line
    naming the GPU, before any pass, not planned past it to run out of memory mid-pass."""
    import hrsa.analyze.pair.analysis as analysis
    from hrsa.analyze.streaming.plan import _MemoryModel
    from hrsa.store.errors import UserError

    store = make_pair_store(d=128).open()
    common = dict(metrics=("cka",), cross_layer=True, backend="numpy", compute_dtype="float64", scheduler="threads",
                  workers=1)
    roomy = analyze_pair(store, "a", "b", **common)
    # 1 x 1 pair of D = 128 in float64: its sum 131 kB, its stacks twice 262 kB at 64 tokens (524 kB at 128)
    monkeypatch.setattr(analysis, "device_budget", lambda backend, gpu_workers: 400_000)
    tight = analyze_pair(store, "a", "b", **common)
    memory = _MemoryModel(tight.plan.inputs, tight.plan.workers)
    assert tight.plan.inputs.block_tokens == 64 < roomy.plan.inputs.block_tokens
    assert all(memory.device_peak(t) <= 400_000 for t in tight.plan.tiles)
    np.testing.assert_allclose(tight.cka_matrix, roomy.cka_matrix, rtol=1e-12)
    monkeypatch.setattr(analysis, "device_budget", lambda backend, gpu_workers: 1_000)
    with pytest.raises(UserError, match=r"free on the GPU .* Got 1 kB there .* instead\. Free GPU memory") as refused:
        analyze_pair(store, "a", "b", **common)
    assert "\n" not in str(refused.value)
