"""A cross-layer tile accumulated as one stacked matrix (one GEMM per block into a running sum, Chan's corrections of
a run of blocks as one low-rank GEMM when it is folded in) equals independent float64 co-moments of the whole data,
under 1e5 offsets that drift, outlier dimensions, uneven blocks and runs cut anywhere."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hrsa.analyze.accumulators.cross_moments import CrossMoments
from hrsa.analyze.accumulators.cross_tile import FLOAT32_SUM_TOKENS, CrossTileMoments, PendingBlocks, multiply_into
from hrsa.analyze.streaming.backends import NumpyBackend, TorchBackend

DX, DY = 24, 16
ROWS, COLS = (("a", 0), ("a", 3), ("a", 7)), (("b", 1), ("b", 2))


def states(rng: np.random.Generator, n: int) -> dict:
    """Hidden states with offsets up to 1e5 that drift along the tokens, and an outlier dimension."""
    base = rng.normal(size=(n, 8))
    out = {}
    for key in (*ROWS, *COLS):
        d = DX if key[0] == "a" else DY
        x = base @ rng.normal(size=(8, d)) + 0.3 * rng.normal(size=(n, d))
        x[:, 0] *= 300.0  # an outlier dimension
        x += rng.uniform(-1e5, 1e5, d) + np.linspace(0, 50, n)[:, None]  # offsets, and a drift across blocks
        out[key] = x.astype(np.float32)
    return out


def reference(xs: dict) -> dict:
    """Independent float64: the co-moment of the whole centred data, two-pass."""
    c = {k: np.asarray(v, dtype=np.float64) - np.asarray(v, dtype=np.float64).mean(0) for k, v in xs.items()}
    return {(kx, ky): c[kx].T @ c[ky] for kx in ROWS for ky in COLS}


@dataclass(frozen=True)
class DevicePathOnCpu(TorchBackend):
    """TorchBackend's GPU path on CPU tensors: run sums kept as torch tensors, folded into a float64 sum there, which
    crosses to the host's total at the end of a segment (or is reduced there to summaries: ``device_summaries``)."""

    @property
    def _sums_on_host(self) -> bool:
        return False


def fold(backend, xs: dict, cuts: list[int], run_tokens: int = FLOAT32_SUM_TOKENS,
         total: CrossTileMoments | None = None) -> CrossTileMoments:
    pending = PendingBlocks(total or CrossTileMoments.empty(ROWS, COLS, DX, DY), max_tokens=run_tokens)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        backend.fold_cross_tile(pending, {k: v[lo:hi] for k, v in xs.items()})
    return pending.finish()


BACKENDS = [NumpyBackend(), TorchBackend(device="cpu", compute_dtype="float64"),
            DevicePathOnCpu(device="cpu", compute_dtype="float64")]


@pytest.mark.parametrize("run_tokens", [1, 41, 10_000], ids=["a-run-a-block", "runs-cut-mid-way", "one-run"])
@pytest.mark.parametrize("backend", BACKENDS, ids=["numpy", "torch", "torch-device-sum"])
def test_stacked_blocks_equal_float64_co_moments_of_the_whole_data(backend, run_tokens) -> None:
    rng = np.random.default_rng(0)
    xs = states(rng, 700)
    # a one-token block, an empty one, uneven sizes; runs of one block, of a few, of all
    acc = fold(backend, xs, [0, 1, 40, 40, 333, 400, 512, 700], run_tokens)
    want = reference(xs)
    assert acc.n == 700 and acc.c.flags.f_contiguous
    for pair, moments in acc.items():
        np.testing.assert_allclose(moments.c_xy, want[pair], rtol=1e-11, atol=1e-9 * np.abs(want[pair]).max())
        np.testing.assert_allclose(moments.mean_x, np.asarray(xs[pair[0]], np.float64).mean(0), rtol=1e-13)
        np.testing.assert_allclose(moments.mean_y, np.asarray(xs[pair[1]], np.float64).mean(0), rtol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS, ids=["numpy", "torch", "torch-device-sum"])
def test_a_pass_that_continues_a_total_adds_to_it(backend) -> None:
    """A total that already holds tokens keeps them: the device sum's one crossing adds to it (it copies only into a
    total with nothing in it)."""
    rng = np.random.default_rng(3)
    xs = states(rng, 600)
    first = fold(NumpyBackend(), {k: v[:250] for k, v in xs.items()}, [0, 100, 250])
    acc = fold(backend, {k: v[250:] for k, v in xs.items()}, [0, 120, 350], run_tokens=100, total=first)
    want = reference(xs)
    assert acc.n == 600
    for pair, moments in acc.items():
        np.testing.assert_allclose(moments.c_xy, want[pair], rtol=1e-11, atol=1e-9 * np.abs(want[pair]).max())


def test_equals_the_per_pair_path_and_merging_segments_equals_one_pass() -> None:
    rng = np.random.default_rng(1)
    xs = states(rng, 500)
    whole = fold(NumpyBackend(), xs, [0, 128, 256, 384, 500])
    first, second = fold(NumpyBackend(), xs, [0, 128, 256]), fold(NumpyBackend(), {k: v[256:] for k, v in xs.items()}, [0, 128, 244])
    merged = first.merge(second)
    per_pair: dict = {}
    for lo, hi in ((0, 128), (128, 256), (256, 384), (384, 500)):
        for pair, part in NumpyBackend().cross_moments({k: v[lo:hi] for k, v in xs.items()}, [(i, j) for i in ROWS for j in COLS]):
            per_pair[pair] = per_pair[pair].merge(part) if pair in per_pair else part
    for (pair, a), (_, b) in zip(whole.items(), merged.items()):
        scale = np.abs(per_pair[pair].c_xy).max()
        np.testing.assert_allclose(a.c_xy, per_pair[pair].c_xy, rtol=0, atol=1e-12 * scale)
        np.testing.assert_allclose(b.c_xy, per_pair[pair].c_xy, rtol=0, atol=1e-12 * scale)
    assert merged.n == 500 and merged.merge(CrossTileMoments.empty(ROWS, COLS, DX, DY)) is merged


@pytest.mark.parametrize("run_tokens", [512, 1024, 10_000], ids=["a-run-a-block", "runs-of-two", "one-run"])
@pytest.mark.parametrize("backend", [NumpyBackend(compute_dtype="float32"), TorchBackend(device="cpu", compute_dtype="float32")],
                         ids=["numpy", "torch"])
def test_float32_products_stay_within_1e_6_of_float64(backend, run_tokens) -> None:
    rng = np.random.default_rng(2)
    xs = states(rng, 2000)
    want = reference(xs)
    acc = fold(backend, xs, [0, 512, 1024, 1536, 2000], run_tokens)
    for pair, moments in acc.items():
        assert np.abs(moments.c_xy - want[pair]).max() <= 1e-6 * np.abs(want[pair]).max()


def test_float32_runs_are_summed_in_float32_only_up_to_their_length() -> None:
    """The float32 sum of a run is folded into the float64 total every FLOAT32_SUM_TOKENS: a block whose product is
    below half a float32 ulp of the sum it is added to vanishes from a float32 sum, so a stream whose first block
    dwarfs the rest loses every later block when one float32 sum spans it (1.5e-6 of the total here, whatever the
    GEMM's rounding), and only the few of the first run with runs as long as they should be (3.7e-7)."""
    rng = np.random.default_rng(6)
    n, block = 64 * 1024, 1024
    x = rng.normal(size=(n, 1))
    x[:block] *= np.sqrt(1e8 / block)  # the first block's centred products sum to ~1e8 (a float32 ulp of 8)
    x[block:] *= np.sqrt(2.0 / block)  # every other block's to ~2: below half an ulp of 1e8, lost if added to it
    x = (x + 1.0).astype(np.float32)
    xs = {ROWS[0]: x, COLS[0]: x}
    want = sum(float(((b - b.mean()) ** 2).sum()) for b in np.split(x.astype(np.float64), n // block))
    means = x.astype(np.float64).reshape(-1, block).mean(axis=1)
    want += block * float(((means - means.mean()) ** 2).sum())  # between the blocks' means (Chan)

    def error(run_tokens: int) -> float:
        pending = PendingBlocks(CrossTileMoments.empty(ROWS[:1], COLS[:1], 1, 1), max_tokens=run_tokens)
        for lo in range(0, n, block):
            NumpyBackend(compute_dtype="float32").fold_cross_tile(pending, {k: v[lo : lo + block] for k, v in xs.items()})
        return abs(float(pending.finish().c[0, 0]) - want) / want

    assert error(FLOAT32_SUM_TOKENS) <= 1e-6 < error(n)


@pytest.fixture(params=["openblas", "torch"])
def gemm_path(request, monkeypatch):
    """multiply_into's two GEMMs: numpy's OpenBLAS through ctypes, and torch's where numpy has no OpenBLAS."""
    from hrsa.analyze.accumulators import gemm

    if request.param == "torch":
        monkeypatch.setattr(gemm, "_numpy_openblas", lambda: None)
    return request.param


def test_numpy_s_openblas_is_found_where_numpy_ships_it() -> None:
    """numpy's pip wheels ship scipy-openblas (ILP64, prefixed symbols): a binding that silently failed would fall back
    to torch's MKL (slower on AMD CPUs, deaf to the scheduler's BLAS thread limit)."""
    from threadpoolctl import threadpool_info

    from hrsa.analyze.accumulators.gemm import gemm_library

    numpy_blas = [lib for lib in threadpool_info() if "numpy" in lib["filepath"]]
    if not numpy_blas or numpy_blas[0]["internal_api"] != "openblas":
        pytest.skip("this numpy is not built on OpenBLAS")
    assert gemm_library() == numpy_blas[0]["filepath"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_product_goes_into_the_sum_without_a_copy(dtype, gemm_path) -> None:
    rng = np.random.default_rng(3)
    total = np.asfortranarray(rng.normal(size=(6, 4))).astype(dtype)
    before = total.copy()
    u, v = rng.normal(size=(9, 6)).astype(dtype), rng.normal(size=(9, 4)).astype(dtype)
    address = total.__array_interface__["data"][0]
    assert multiply_into(total, u, v) is total
    np.testing.assert_allclose(total, before + u.T @ v, rtol=1e-5 if dtype == np.float32 else 1e-14)
    assert total.__array_interface__["data"][0] == address
    total[...] = np.nan  # beta = 0 starts a new sum in a used buffer: what it held is never read
    np.testing.assert_allclose(multiply_into(total, u, v, beta=0.0), u.T @ v, rtol=1e-5 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_products_of_uneven_shapes_and_empty_blocks_add_up(dtype, gemm_path) -> None:
    """Shapes large enough for BLAS's threads, Du != Dv, and a block of no rows (the sum is unchanged); a sum in the
    wrong layout is refused, not written as its transpose."""
    rng = np.random.default_rng(7)
    u, v = rng.normal(size=(700, 300)).astype(dtype), rng.normal(size=(700, 130)).astype(dtype)
    total = multiply_into(None, u[:350], v[:350])
    multiply_into(total, u[350:], v[350:])
    multiply_into(total, u[:0], v[:0])
    want = u.astype(np.float64).T @ v.astype(np.float64)
    np.testing.assert_allclose(total, want, rtol=0, atol=(1e-4 if dtype == np.float32 else 1e-11) * np.abs(want).max())
    blocks = multiply_into(None, u, v, block=(128, 50))  # blocks that do not divide the total: the last ones narrower
    np.testing.assert_allclose(blocks, want, rtol=0, atol=(1e-4 if dtype == np.float32 else 1e-11) * np.abs(want).max())
    with pytest.raises(ValueError, match="Fortran"):
        multiply_into(np.zeros((300, 130), dtype=dtype), u, v)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_slot_of_a_wider_block_is_multiplied_in_place_as_its_copy_would_be(dtype, gemm_path) -> None:
    """A self product reads its state's columns of the stacked block in place (the block's row stride as BLAS's leading
    dimension): the sums are bit for bit those of a contiguous copy. Rows that are not contiguous are refused."""
    rng = np.random.default_rng(11)
    block = rng.normal(size=(700, 3 * 160)).astype(dtype)
    slot = block[:, 160:320]  # rows of 160 values, 480 apart
    assert not slot.flags.c_contiguous
    copy = np.ascontiguousarray(slot)
    for beta in (0.0, 1.0):
        in_place = multiply_into(np.ones((160, 160), dtype=dtype, order="F"), slot, slot, beta)
        copied = multiply_into(np.ones((160, 160), dtype=dtype, order="F"), copy, copy, beta)
        assert np.array_equal(in_place, copied)
    want = copy.astype(np.float64).T @ copy.astype(np.float64)
    np.testing.assert_allclose(in_place, 1.0 + want, rtol=0, atol=(1e-4 if dtype == np.float32 else 1e-11) * np.abs(want).max())
    with pytest.raises(ValueError, match="contiguous rows"):
        multiply_into(None, block[:, ::2], block[:, ::2])  # every other column
    with pytest.raises(ValueError, match="contiguous rows"):
        multiply_into(None, np.asfortranarray(copy), copy)  # columns contiguous, not rows


def test_merging_statistics_of_other_states_is_refused() -> None:
    with pytest.raises(ValueError, match="same states"):
        CrossTileMoments.empty(ROWS, COLS, DX, DY).merge(CrossTileMoments.empty(COLS, ROWS, DY, DX))


def test_read_only_totals_from_another_process_merge_into_a_copy() -> None:
    rng = np.random.default_rng(4)
    xs = states(rng, 200)
    a, b = fold(NumpyBackend(), xs, [0, 100]), fold(NumpyBackend(), {k: v[100:] for k, v in xs.items()}, [0, 100])
    for acc in (a, b):  # as Ray hands arrays out of its object store
        for array in (acc.c, acc.mean_x, acc.mean_y):
            array.flags.writeable = False
    merged = a.writable().merge(b)
    whole = fold(NumpyBackend(), xs, [0, 100, 200])
    np.testing.assert_allclose(merged.c, whole.c, rtol=0, atol=1e-12 * np.abs(whole.c).max())
    assert isinstance(next(merged.items())[1], CrossMoments)


def test_a_non_finite_block_is_refused_and_bfloat16_blocks_centre_exactly() -> None:
    import ml_dtypes
    from hrsa.analyze.accumulators.cross_tile import stack_centred

    bad = np.ones((4, 3), dtype=np.float32)
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        stack_centred([np.ones((4, 2), np.float32), bad], np.dtype(np.float32))
    x = (np.random.default_rng(5).normal(size=(64, 6)) + 1e4).astype(ml_dtypes.bfloat16)
    stacked, mean, offsets = stack_centred([x], np.dtype(np.float64))
    exact = x.astype(np.float64) - x.astype(np.float64).mean(0)
    assert offsets is None and np.array_equal(stacked, exact)  # float64: centred on the exact mean, one subtraction


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kept_stack_buffers_leak_nothing_from_one_block_into_the_next(dtype) -> None:
    """Blocks are stacked into buffers kept from block to block (see ``PendingBlocks.stack_buffer``): blocks that
    shrink (stale rows below them) and grow again, and self co-moments of two widths outside the rectangle that share
    one buffer (a self tile's), still equal float64 co-moments of the whole data; equal blocks reuse the memory."""
    rng = np.random.default_rng(6)
    xs = states(rng, 600)
    tile = PendingBlocks(CrossTileMoments.empty(ROWS[:2], COLS[:1], DX, DY), max_tokens=None)
    outside = (ROWS[2], COLS[1])  # a DX-wide state of A, a DY-wide one of B: not in the rectangle
    selfs = {k: PendingBlocks(CrossTileMoments.empty((k,), (k,), xs[k].shape[1], xs[k].shape[1]), max_tokens=None)
             for k in (*ROWS[:2], *outside)}
    backend, addresses = NumpyBackend(compute_dtype=dtype), []
    for lo, hi in zip([0, 100, 200, 230, 231, 400], [100, 200, 230, 231, 400, 600]):
        backend.fold_cross_tile(tile, {k: v[lo:hi] for k, v in xs.items()}, selfs)
        addresses.append(tile.scratch["x"].__array_interface__["data"][0])
    assert addresses[0] == addresses[1]  # the second block of the same size went into the first one's buffer
    want = reference(xs)
    centred = {k: np.asarray(v, np.float64) - np.asarray(v, np.float64).mean(0) for k, v in xs.items()}
    rtol = 1e-6 if dtype == "float32" else 1e-11
    for pair, moments in tile.finish().items():
        np.testing.assert_allclose(moments.c_xy, want[pair], rtol=rtol, atol=rtol * np.abs(want[pair]).max())
    for key, own in selfs.items():
        ((_, moments),) = own.finish().items()
        exact = centred[key].T @ centred[key]
        np.testing.assert_allclose(moments.c_xy, exact, rtol=rtol, atol=rtol * np.abs(exact).max())


def test_a_blas_binding_that_computes_wrong_products_is_not_used(monkeypatch) -> None:
    """A library whose GEMM disagrees with numpy's matmul (a wrong guess of its integer size) is passed over."""
    from hrsa.analyze.accumulators import gemm

    bound = gemm._numpy_openblas()
    if bound is None:
        pytest.skip("this numpy is not built on OpenBLAS")
    assert gemm._agrees_with_matmul(bound)

    class Transposed(gemm._Cblas):  # as a GEMM called with the wrong transpose flags or sizes would read its inputs
        def gemm(self, total, u, v, beta):
            total[...] = beta * total + (u.T @ v)[::-1]

    assert not gemm._agrees_with_matmul(Transposed(bound.path, bound.sgemm, bound.dgemm, bound.int_type))


@pytest.mark.parametrize("d", [16, 128])
def test_a_pair_s_float32_sums_do_not_depend_on_the_tile_around_it(gemm_path, d, verdicts, monkeypatch) -> None:
    """The same pair in a 2 x 2 tile, a 2 x 4 tile, a 3 x 1 tile and alone: bit for bit the same float32 sums (one
    GEMM of a whole tile put OpenBLAS's AVX2 edge kernels on different pairs: 2e-4 apart at D = 16). At D = 128 with
    this library's own verdict: one GEMM of the tile for its full blocks where its probe passed (here, if it did), else
    one per pair."""
    from hrsa.analyze.accumulators.gemm import blas_threads, prepare_tile_gemm

    whole = prepare_tile_gemm("float32", d, d, 256, threads=[blas_threads()])
    calls = _counted_gemm(monkeypatch)
    rng = np.random.default_rng(8)
    keys_a, keys_b = [("a", i) for i in range(3)], [("b", j) for j in range(4)]
    xs = {k: (rng.normal(size=(1000, d)) * 3 + 100).astype(np.float32) for k in (*keys_a, *keys_b)}
    backend = NumpyBackend(compute_dtype="float32")

    def pair_sum(rows, cols) -> np.ndarray:
        pending = PendingBlocks(CrossTileMoments.empty(rows, cols, d, d))
        for lo in range(0, 1000, 256):  # the last block of 232 rows is under the small-matrix size at D = 128
            backend.fold_cross_tile(pending, {k: v[lo : lo + 256] for k, v in xs.items()})
        return dict(pending.finish().items())[(("a", 0), ("b", 0))].c_xy

    alone = pair_sum(keys_a[:1], keys_b[:1])
    for rows, cols in ((keys_a[:2], keys_b[:2]), (keys_a[:2], keys_b), (keys_a, keys_b[:1])):
        assert np.array_equal(pair_sum(rows, cols), alone)
    assert ((2 * d, 4 * d) in calls) is whole  # the 2 x 4 tile as one GEMM where the probe passed


@pytest.fixture
def verdicts(monkeypatch):
    """multiply_into's verdicts, empty for the test (the process's own are left as they were)."""
    from hrsa.analyze.accumulators import gemm

    fresh: dict = {}
    monkeypatch.setattr(gemm, "_WHOLE_TILE", fresh)
    return fresh


def _counted_gemm(monkeypatch) -> list[tuple[int, int]]:
    from hrsa.analyze.accumulators import gemm

    calls: list[tuple[int, int]] = []
    real = gemm._gemm
    monkeypatch.setattr(gemm, "_gemm", lambda total, u, v, beta: (calls.append(total.shape), real(total, u, v, beta)))
    return calls


def test_one_gemm_of_the_tile_only_where_the_probe_passed_and_never_a_probe_of_its_own(monkeypatch, verdicts) -> None:
    """multiply_into reads the verdict prepare_tile_gemm left for exactly its product's rows and BLAS thread count (a
    GEMM per pair without one: it never probes, since the probe's arrays would fall inside a pass's measured memory)."""
    from hrsa.analyze.accumulators import gemm

    monkeypatch.setattr(gemm, "_same_sums", lambda *a: pytest.fail("multiply_into probed"))
    calls = _counted_gemm(monkeypatch)
    rng = np.random.default_rng(5)
    u, v = rng.standard_normal((256, 3 * 128), dtype=np.float32), rng.standard_normal((256, 2 * 128), dtype=np.float32)
    key = (gemm.gemm_library(), "f", 128, 128, 256, gemm.blas_threads())
    for verdict, rows, expected in ((None, 256, [(128, 128)] * 6), (True, 256, [(384, 256)]),
                                    (False, 256, [(128, 128)] * 6), (True, 200, [(128, 128)] * 6)):
        verdicts.clear()
        if verdict is not None:
            verdicts[key] = verdict
        calls.clear()
        total = multiply_into(None, u[:rows], v[:rows], block=(128, 128))
        assert calls == expected, (verdict, rows)
        np.testing.assert_allclose(total, u[:rows].T.astype(np.float64) @ v[:rows], rtol=1e-4, atol=1e-3)


def test_a_verdict_holds_for_its_thread_count_only(monkeypatch, verdicts) -> None:
    """OpenBLAS splits k differently on one thread and on several: a product on a thread count not probed is a GEMM
    per pair."""
    from hrsa.analyze.accumulators import gemm

    if gemm.gemm_library() == "torch" or gemm.blas_threads() < 2:
        pytest.skip("needs numpy's OpenBLAS on 2 threads or more")
    calls = _counted_gemm(monkeypatch)
    u = np.ones((256, 2 * 128), dtype=np.float32)
    verdicts[(gemm.gemm_library(), "f", 128, 128, 256, 1)] = True
    with gemm._threads_of_library().limit(limits=1):
        multiply_into(None, u, u, block=(128, 128))
    with gemm._threads_of_library().limit(limits=2):
        multiply_into(None, u, u, block=(128, 128))
    assert calls == [(256, 256)] + [(128, 128)] * 4


def test_the_probe_refuses_a_library_whose_sums_depend_on_the_product_around_them(monkeypatch, verdicts) -> None:
    from hrsa.analyze.accumulators import gemm

    real = gemm._gemm

    def shape_dependent(total, u, v, beta):  # as OpenBLAS's AVX2 kernels: a wider product sums a little differently
        real(total, u, v, beta)
        if total.shape[1] > 128:
            total += np.finfo(total.dtype).eps * np.abs(total)

    monkeypatch.setattr(gemm, "_gemm", shape_dependent)
    assert not gemm.prepare_tile_gemm("float32", 128, 128, 256, threads=[1, 2])
    assert list(verdicts.values()) == [False, False]


@pytest.mark.parametrize(("du", "rows", "limit", "torch", "probed"), [
    (128, 256, None, False, True), (96, 512, None, False, False), (2048, 256, None, False, False),
    (128, 128, None, False, False), (128, 256, 1_000_000, False, False), (128, 256, None, True, False)])
def test_the_probe_runs_only_at_sizes_it_tells_and_within_the_plan_s_memory(monkeypatch, verdicts, du, rows, limit,
                                                                           torch, probed) -> None:
    """Small products take other kernels, large blocks gain little, torch's GEMM takes no thread limit from here; a
    probe larger than the plan's peak is not run (it runs before the accumulators exist, so within the peak it never
    raises the process's)."""
    from hrsa.analyze.accumulators import gemm

    monkeypatch.setattr(gemm, "_same_sums", lambda *a: True)
    if torch:
        monkeypatch.setattr(gemm, "_numpy_openblas", lambda: None)
    assert gemm.prepare_tile_gemm("float32", du, du, rows, threads=[1], limit_bytes=limit) is probed
    assert bool(verdicts) is probed
    assert gemm.probe_bytes("float32", 128, 128, 256) > 1_000_000


def test_the_probe_measures_what_it_says_it_allocates(verdicts) -> None:
    import tracemalloc

    from hrsa.analyze.accumulators import gemm

    tracemalloc.start()
    try:
        gemm.prepare_tile_gemm("float64", 256, 128, 512, threads=[1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Beside the arrays: threadpoolctl's limits and the generator, 40-60 kB of Python objects (an extra block: 262 kB).
    assert gemm.probe_bytes("float64", 256, 128, 512) <= peak <= gemm.probe_bytes("float64", 256, 128, 512) + 100_000, peak


def test_a_device_sum_is_admitted_only_with_room_for_the_next_run_s_product(monkeypatch) -> None:
    """The device's free memory must hold the float64 sum beside the next run's product and its stacked blocks: the
    run's own product is let go once folded (it was kept, so the next run's product made a second one: 4 P held
    where the check had counted 3.25 P; P the float32 run sum)."""
    import hrsa.analyze.accumulators.cross_tile as cross_tile

    admitted, live, kept = [], [], []
    real = cross_tile._device_sum

    def recording(products, rows):
        held = products.numel() * products.element_size()
        headroom = cross_tile.device_sum_headroom(rows, products.shape[0] + products.shape[1], products.element_size())
        admitted.append(held + products.numel() * 8 + headroom)
        return real(products, rows)

    monkeypatch.setattr(cross_tile, "_device_sum", recording)
    monkeypatch.setattr(cross_tile, "DEVICE_HEADROOM", 0)  # the small tile here in the regime of large ones

    @dataclass(frozen=True)
    class Probe(DevicePathOnCpu):
        def _multiply(self, pending, u, v, block):
            if not pending.beta:  # a run's first product, made while the fields below are still referenced
                kept.append(pending.products is not None)
                sums = (pending.products, pending.device_sum)
                held = sum(t.numel() * t.element_size() for t in sums if t is not None)
                live.append(held + u.shape[1] * v.shape[1] * 4 + (u.numel() + v.numel()) * 4)  # and the stacks
            super()._multiply(pending, u, v, block)

    xs = states(np.random.default_rng(0), 600)
    pending = PendingBlocks(CrossTileMoments.empty(ROWS, COLS, DX, DY), max_tokens=100)
    for lo in range(0, 600, 100):
        Probe(device="cpu", compute_dtype="float32").fold_cross_tile(pending, {k: v[lo:lo + 100] for k, v in xs.items()})
    pending.finish()
    assert admitted and max(live) <= admitted[0], f"device bytes at a run's first product {max(live)} > {admitted[0]}"
    assert len(kept) == 6 and not any(kept), "a folded run's product was still held when the next run's was made"


def test_a_whole_pass_s_device_sum_reduces_to_the_summaries_of_the_host_s_total() -> None:
    """The summaries reduced on the device (|C|_F^2, the diagonal, the means) equal those of the host's float64 total
    under 1e5 offsets, the host's total untouched; with part of the sums on the host there are none (finish instead)."""
    rng = np.random.default_rng(5)
    xs = states(rng, 700)
    cuts = [0, 1, 40, 333, 512, 700]
    host = fold(NumpyBackend(), xs, cuts, run_tokens=100)
    pending = PendingBlocks(CrossTileMoments.empty(ROWS, COLS, DX, DY), max_tokens=100)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        DevicePathOnCpu(device="cpu", compute_dtype="float64").fold_cross_tile(pending, {k: v[lo:hi] for k, v in xs.items()})
    found = pending.device_summaries()
    assert found is not None and set(found) == {pair for pair, _ in host.items()}
    assert not pending.total.c.any() and pending.device_sum is None
    for pair, moments in host.items():
        want, got = moments.summary(), found[pair]
        assert got.n == want.n == 700
        assert got.sq_frobenius == pytest.approx(want.sq_frobenius, rel=1e-11)
        np.testing.assert_allclose(got.diagonal, want.diagonal, rtol=1e-11, atol=1e-9 * np.abs(want.diagonal).max())
        np.testing.assert_allclose(got.mean_x, want.mean_x, rtol=1e-13)
        np.testing.assert_allclose(got.mean_y, want.mean_y, rtol=1e-13)
    touched = PendingBlocks(CrossTileMoments.empty(ROWS, COLS, DX, DY), max_tokens=100, host_touched=True)
    DevicePathOnCpu(device="cpu", compute_dtype="float64").fold_cross_tile(touched, {k: v[:100] for k, v in xs.items()})
    assert touched.device_summaries() is None and touched.finish().n == 100


def test_a_whole_pass_s_summaries_do_not_merge() -> None:
    from hrsa.analyze.streaming.stream import CrossTileTotals

    whole = CrossTileTotals(None, {}, {"pair": object()})
    with pytest.raises(ValueError, match="do not merge"):
        CrossTileTotals(None, {}).merge(whole)


def test_a_numpy_pass_that_ends_whole_does_not_import_torch() -> None:
    """The end of a whole pass asks every accumulator for device summaries: one on the CPU answers without torch
    (importing it cost a numpy analysis 2.5 s and ~190 MB of resident memory)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from hrsa.analyze.accumulators.cross_tile import CrossTileMoments, PendingBlocks\n"
            "from hrsa.analyze.streaming.backends import NumpyBackend\n"
            "p = PendingBlocks(CrossTileMoments.empty(('x',), ('y',), 4, 4), None)\n"
            "NumpyBackend().fold_cross_tile(p, {'x': np.random.rand(10, 4), 'y': np.random.rand(10, 4)})\n"
            "assert p.device_summaries() is None and p.finish().n == 10\n"
            "assert 'torch' not in sys.modules, 'a numpy pass imported torch'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_float32_products_take_the_rounding_of_each_mean_out_of_a_small_spread_under_a_large_offset() -> None:
    """Float32 stacks are centred on each block's mean rounded to float32; that rounding (up to 4e-3 at 1e5) is the
    same order as a dimension's spread of 0.05, so the fold must take n o o^T out exactly. Checked entry by entry in
    units of sqrt(C_ii C_jj) (a correlation's scale) against float64 co-moments of the same float32 values."""
    rng = np.random.default_rng(5)
    n = 3000
    base = rng.normal(size=(n, 3))
    xs = {}
    for key in (*ROWS, *COLS):
        d = DX if key[0] == "a" else DY
        x = 0.05 * (base @ rng.normal(size=(3, d)) + 0.3 * rng.normal(size=(n, d)))
        xs[key] = (x + rng.uniform(-1e5, 1e5, d)).astype(np.float32)
    acc = fold(NumpyBackend(compute_dtype="float32"), xs, [0, 700, 1500, 3000])
    want = reference(xs)
    centred = {k: np.asarray(v, np.float64) - np.asarray(v, np.float64).mean(0) for k, v in xs.items()}
    for (kx, ky), moments in acc.items():
        scale = np.sqrt(np.outer((centred[kx] ** 2).sum(0), (centred[ky] ** 2).sum(0)))  # (Dx, Dy)
        assert np.abs((moments.c_xy - want[kx, ky]) / scale).max() <= 1e-6


def test_merging_a_one_token_segment_adds_its_chan_correction() -> None:
    """A segment of one token has no co-moments of its own: all it brings is Chan's n_a n_b / n term."""
    rng = np.random.default_rng(6)
    xs = states(rng, 400)
    for cut in (1, 399):
        first = fold(NumpyBackend(), {k: v[:cut] for k, v in xs.items()}, [0, cut])
        second = fold(NumpyBackend(), {k: v[cut:] for k, v in xs.items()}, [0, 400 - cut])
        merged = first.merge(second)
        want = reference(xs)
        assert merged.n == 400
        for pair, moments in merged.items():
            np.testing.assert_allclose(moments.c_xy, want[pair], rtol=0, atol=1e-9 * np.abs(want[pair]).max())
