"""The CPU default: float32 products of centred blocks, summed in float64, where they keep every score within 1e-6
of float64 products; float64 where they would not (inverses of C_xx), and on request."""

from __future__ import annotations

import numpy as np
import pytest
from hrsa.analyze.pair import analyze_pair
from hrsa.analyze.streaming.backends import resolve_backend


def scores(results) -> dict[str, np.ndarray]:
    """Every score of the run that float32 products might move, by name."""
    out = {
        "cka": [r.value for r in results.cka],
        "cka_debiased": [r.value for r in results.cka_debiased],
        "dimcorr": [r.mean for r in results.dimcorr],
        "h_inv": [r.h_inv for r in results.procrustes],
        "similarity": [r.similarity for r in results.procrustes],
        "residual": [r.residual for r in results.procrustes],
        "cka_matrix": results.cka_matrix,
        "dimcorr_matrix": results.dimcorr_matrix,
    }
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def test_default_products_are_float32_and_stay_within_1e_6_of_float64_under_1e4_offsets(make_pair_store) -> None:
    # Offsets of 1e3-1e4 and outlier scales of 30-300 in six dimensions (conftest.activations), D = 32, 6,000 tokens.
    store = make_pair_store(doc_lengths=(1500, 700, 1800, 2000), d=32).open()
    common = dict(metrics=("cka", "dimcorr", "procrustes"), debiased=True, cross_layer=True, block_tokens=512)
    default = analyze_pair(store, "a", "b", backend="numpy", **common)
    reference = analyze_pair(store, "a", "b", backend="numpy", compute_dtype="float64", **common)
    assert default.settings["compute_dtype"] == "float32" and reference.settings["compute_dtype"] == "float64"
    assert default.settings["matched_compute_dtype"] == "float64"  # Procrustes reads C_xy's singular vectors
    got, want = scores(default), scores(reference)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)
    # Not vacuous: float32 products are not float64 ones, and the scores span a range.
    assert np.ptp(want["cka"]) > 0.05 and any(np.any(got[k] != want[k]) for k in want)


@pytest.mark.parametrize("metric", ["cca", "svcca", "pwcca", "regression"])
def test_inverse_based_measures_keep_float64_products_by_default(metric: str) -> None:
    # Their C_xx^-1 multiplies a float32 product's rounding by the condition number.
    assert resolve_backend("numpy", "auto", metrics=("cka", metric)).compute_dtype == "float64"
    assert resolve_backend("numpy", "auto", metrics=("cka", "dimcorr", "procrustes")).compute_dtype == "float32"
    assert resolve_backend("numpy", "float32", metrics=(metric,)).compute_dtype == "float32"  # asked for: as asked


@pytest.mark.parametrize(("workers", "budget", "scheduler"), [(3, None, "threads"), (1, "200kB", "threads"), (2, "250kB", "threads"),
                                                             (3, "280kB", "sync")])
def test_float32_matrices_do_not_depend_on_the_workers_or_the_plan(pair_store, monkeypatch, workers, budget, scheduler) -> None:
    """A float32 sum covers a run of blocks of the token grid (runs of 256 tokens here, 1,000 tokens in blocks of 32),
    the same runs whatever the segments and tiles: segments are cut between runs, and a state's self co-moments are
    summed alike in a cross-layer tile or a self tile. So the results equal one worker's, to float64 rounding."""
    from hrsa.analyze.accumulators import cross_tile

    monkeypatch.setattr(cross_tile, "FLOAT32_SUM_TOKENS", 256)
    store = pair_store.open()
    common = dict(metrics=("cka", "dimcorr"), cross_layer=True, backend="numpy", compute_dtype="float32", block_tokens=32)
    one = analyze_pair(store, "a", "b", workers=1, scheduler="threads", **common)  # the patch holds in this process
    other = analyze_pair(store, "a", "b", workers=workers, scheduler=scheduler, **common, **({"memory_budget": budget} if budget else {}))
    if budget:  # another plan: more tiles (with 200kB, self tiles besides the states riding along in cross-layer ones)
        assert other.plan.passes > one.plan.passes and (other.plan.count("self") >= 1 or budget != "200kB")
    else:  # three segments of runs, side by side
        assert other.plan.workers == 3
    np.testing.assert_allclose(other.cka_matrix, one.cka_matrix, rtol=1e-12)
    np.testing.assert_allclose(other.dimcorr_matrix, one.dimcorr_matrix, rtol=1e-12)
    reference = analyze_pair(store, "a", "b", scheduler="threads", **{**common, "compute_dtype": "float64"})
    np.testing.assert_allclose(other.cka_matrix, reference.cka_matrix, rtol=0, atol=1e-6)


def test_float32_products_that_cannot_resolve_the_rotation_warn_and_float64_ones_match_scipy(tmp_path) -> None:
    """Two nearly duplicated columns of B give C_xy two singular values ~1e-5 of its largest: above float32's rank
    threshold (D eps), but a float32 product's rounding moves O*'s last singular vectors, and h_inv by ~1e-5.
    Asked for float32 products, that is said (with the fix); by default Procrustes takes float64 ones and matches
    scipy's orthogonal Procrustes on the stored values."""
    import warnings

    from scipy.linalg import orthogonal_procrustes

    from hrsa.analyze.metrics._common import PrecisionWarning
    from hrsa.analyze.metrics.procrustes import inverse_row_entropy
    from hrsa.store import ActivationStore
    from hrsa.store.testing import make_table
    from tests.analyze.conftest import write_model

    rng = np.random.default_rng(5)
    n, d = 4000, 32
    x = rng.normal(size=(n, d))
    y = x @ (np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)) + 0.3 * rng.normal(size=(n, d))
    y[:, 7] = y[:, 6] + 2.5e-3 * rng.normal(size=n)
    y[:, 9] = y[:, 8] + 2.5e-3 * rng.normal(size=n)
    store = ActivationStore.open(tmp_path / "s", mode="a")
    cid = store.write_corpus(make_table((2000, 2000)), tokenizer={"name": "t", "fingerprint": "f"}, source="test")
    xs, ys = write_model(store, "a", cid, {0: x})[0], write_model(store, "b", cid, {0: y})[0]
    rotation, _ = orthogonal_procrustes(xs - xs.mean(0), ys - ys.mean(0))
    reference = inverse_row_entropy(rotation)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asked = analyze_pair(store, "a", "b", metrics=["procrustes"], backend="numpy", compute_dtype="float32")
        default = analyze_pair(store, "a", "b", metrics=["procrustes"], backend="numpy")
    said = [str(w.message) for w in caught if issubclass(w.category, PrecisionWarning)]
    assert len(said) == 1 and "--compute-dtype float64" in said[0], said
    assert abs(asked.procrustes[0].h_inv - reference) > 1e-6  # what the warning is about (not vacuous)
    assert abs(default.procrustes[0].h_inv - reference) < 1e-9


def test_float32_products_never_sum_more_tokens_than_float32_sum_tokens_in_one_gemm(tmp_path) -> None:
    """A narrow model's default block is a whole shard (~32 MB of float64 per state): 64K tokens at D = 2, 2M with
    large shards, summed in float32 in one GEMM. With
    float32 products a block holds at most FLOAT32_SUM_TOKENS tokens, what the running float32 sums are cut at;
    float64 products keep the larger blocks."""
    from hrsa.analyze.accumulators.cross_tile import FLOAT32_SUM_TOKENS
    from hrsa.store import ActivationStore
    from hrsa.store.testing import make_table

    n = 65536
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2))
    store = ActivationStore.open(tmp_path / "s", mode="a")
    cid = store.write_corpus(make_table((n,)), tokenizer={"name": "t", "fingerprint": "f"}, source="test")
    for mid, values in (("a", x), ("b", x + 1e-3 * rng.normal(size=(n, 2)))):
        store.create_model(mid, corpus=cid, n_hidden_states=1, hidden_size=2, dtype="float32", hidden_states=[0])
        writer = store.writer(mid)  # the layout an extraction gets at D = 2: chunks of 131,072 tokens, past the cap
        for unit in writer.units():
            writer.write_unit(unit, {0: values[unit.start : unit.stop].astype(np.float32)})
    assert store.model_info("a").layout.chunk_tokens > FLOAT32_SUM_TOKENS
    common = dict(metrics=("cka", "dimcorr"), backend="numpy", groups=0)
    f32 = analyze_pair(store, "a", "b", compute_dtype="float32", **common)
    f64 = analyze_pair(store, "a", "b", compute_dtype="float64", **common)
    assert f32.settings["block_tokens"] <= FLOAT32_SUM_TOKENS and f64.settings["block_tokens"] >= n
    # Nearly identical models (1 - r ~ 5e-7), float32's hardest case: 5e-7 and 1.1e-6 off in blocks of 8,192 tokens,
    # 9e-6 and 1.8e-5 in one 65,536-token GEMM (measured).
    assert abs(f32.dimcorr[0].mean - f64.dimcorr[0].mean) < 2e-6 and abs(f32.cka[0].value - f64.cka[0].value) < 4e-6


def _bf16_massive_activation_pair(tmp_path, n: int = 8192, d: int = 64) -> object:
    """A bf16 pair whose channel 0 carries a massive activation (3000 + small noise, as LLMs' do, shared by both
    models): bf16's spacing of 16 there leaves two stored levels, 2992 and 3008, so the centred channel is +-8 on
    every token. Channel 1 sits at 1000 (spacing 8: a few levels). The rest is a related pair of unit scale."""
    from hrsa.store import ActivationStore
    from hrsa.store.testing import make_table

    from .conftest import write_model

    rng = np.random.default_rng(5)
    store = ActivationStore.open(str(tmp_path / "bf16-massive"), mode="a")
    cid = store.write_corpus(make_table((n // 2, n // 2)), tokenizer={"name": "test-tok", "fingerprint": "fp-1"})
    x = {0: rng.normal(size=(n, d))}
    x[1] = x[0] + 0.7 * rng.normal(size=(n, d))
    massive = 3000 + 2 * rng.normal(size=n), 1000 + 4 * rng.normal(size=n)  # shared, as a base and its child share them
    y = {k: v + 0.5 * rng.normal(size=(n, d)) for k, v in x.items()}
    for states in (x, y):
        for v in states.values():
            v[:, 0], v[:, 1] = massive[0] + 0.5 * rng.normal(size=n), massive[1] + rng.normal(size=n)
    write_model(store, "a", cid, x, dtype="bfloat16", chunk_tokens=1024, shard_tokens=n // 2)
    write_model(store, "b", cid, y, dtype="bfloat16", chunk_tokens=1024, shard_tokens=n // 2)
    return store


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_default_products_of_a_bf16_store_are_float64_where_float32_sums_drift(tmp_path, backend: str) -> None:
    """Found on the GPU benchmark's data: a float32 GEMM sums near-equal squares (+-8 on every token) with roundings
    that do not average out; one float32 sum of 8,192 tokens moved CKA by 5e-6 (and slicing it into GEMMs of 256
    tokens, summed in float32, still 4e-6). So a bf16 store gets float64 products by default, and its scores equal an
    independent float64 computation on the whole arrays."""
    store = _bf16_massive_activation_pair(tmp_path)
    common = dict(metrics=("cka", "dimcorr"), cross_layer=True, backend=backend, block_tokens=8192, groups=0,
                  scheduler="threads")
    default = analyze_pair(store, "a", "b", **common)
    assert default.settings["compute_dtype"] == "float64"
    xs = [np.asarray(store.hidden_state("a", k).compute(), dtype=np.float64) for k in (0, 1)]
    ys = [np.asarray(store.hidden_state("b", k).compute(), dtype=np.float64) for k in (0, 1)]
    xs, ys = [x - x.mean(0) for x in xs], [y - y.mean(0) for y in ys]
    exact = np.array([[np.sum((x.T @ y) ** 2) / np.linalg.norm(x.T @ x) / np.linalg.norm(y.T @ y) for y in ys] for x in xs])
    np.testing.assert_allclose(default.cka_matrix, exact, rtol=0, atol=1e-10)
    # Not vacuous: float32 products, asked for, drift past 1e-6 on this data (5e-6 here, 1.04e-5 with another seed;
    # the bound says how far, which depends on the data and the GEMM's kernel).
    asked = analyze_pair(store, "a", "b", compute_dtype="float32", **common)
    assert 1e-6 < np.abs(asked.cka_matrix - exact).max() < 1e-4


#: Seconds of a float64 and a float32 GEMM of one size, as measured on: an H200 (54 and 51 TFLOP/s), an A10G (1/32),
#: an H800 (compute capability 9.0 as the H200, float64 cut to ~1 TFLOP/s against ~60 in float32).
_GEMM_SECONDS = {"h200": (0.95, 1.0), "a10g": (32.0, 1.0), "h800": (60.0, 1.0)}


@pytest.mark.parametrize(("gpu", "expected"), [("h200", "float64"), ("a10g", "float32"), ("h800", "float32")])
def test_a_bf16_store_on_a_local_gpu_gets_float64_where_its_float64_is_fast_and_a_warning_where_not(
        monkeypatch, gpu, expected) -> None:
    """An H200 runs float64 GEMMs at its float32 rate; an A10G or RTX at 1/32-1/64, and an H800 (whose compute
    capability is the H200's) at ~1/60: there auto keeps float32 products and says so. The rate is measured on the
    device, not looked up. On the CPU, float64."""
    import warnings

    import torch
    from hrsa.analyze.metrics._common import PrecisionWarning
    from hrsa.analyze.pair.analysis import warn_float32_on_few_levels
    from hrsa.analyze.streaming import backends
    from hrsa.analyze.streaming.backends import GpuWorkers, float64_at_full_rate, matched_backend

    assert resolve_backend("numpy", "auto", ("cka",), stored_dtypes=("bfloat16",)).compute_dtype == "float64"
    assert resolve_backend("numpy", "auto", ("cka",), stored_dtypes=("float32", "float16")).compute_dtype == "float64"
    assert resolve_backend("numpy", "auto", ("cka",), stored_dtypes=("float32",)).compute_dtype == "float32"
    seconds = dict(zip(("float64", "float32"), _GEMM_SECONDS[gpu]))
    monkeypatch.setattr(backends, "_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(backends, "gemm_seconds", lambda device, dtype: seconds[str(dtype).removeprefix("torch.")])
    backends.local_float64_at_full_rate.cache_clear()
    backend = resolve_backend("auto", "auto", ("cka",), stored_dtypes=("bfloat16", "bfloat16"))
    backends.local_float64_at_full_rate.cache_clear()
    assert (backend.name, backend.compute_dtype) == ("torch", expected)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_float32_on_few_levels("auto", ("bfloat16",), [backend])
        warn_float32_on_few_levels("float32", ("bfloat16",), [resolve_backend("auto", "float32", ("cka",))])  # asked for
        warn_float32_on_few_levels("auto", ("bfloat16",), [])  # k-NN, probes alone: no co-moment products, nothing off
        # Procrustes alone, matched layers only: its matched tiles' products are float64 (found by review)
        warn_float32_on_few_levels("auto", ("bfloat16",), [matched_backend(backend, "auto", ("procrustes",))])
    assert [w.category for w in caught] == ([PrecisionWarning] if expected == "float32" else [])
    # A cluster's GPU workers, as their probe measured them: the rate there decides, not the one here.
    full_rate = float64_at_full_rate(*_GEMM_SECONDS[gpu])
    workers = GpuWorkers(free_bytes=40 << 30, float64_at_full_rate=full_rate)
    on_cluster = resolve_backend("auto", "auto", ("cka",), cluster_gpus=workers, stored_dtypes=("bfloat16",))
    assert (on_cluster.name, on_cluster.compute_dtype) == ("torch", expected)


def test_float64_counts_as_full_rate_within_a_quarter_of_float32s_and_a_real_gemm_is_timed() -> None:
    """The rule between the measured GEMMs: V100 and P100 (1/2), A100 and H200 (1/1) are full rate; A10G, L4, RTX
    (1/32-1/64), H800 and H20 (~1/60) are not. The timing itself runs on the CPU here (no threshold asserted on it)."""
    import torch
    from hrsa.analyze.streaming.backends import float64_at_full_rate, gemm_seconds

    assert float64_at_full_rate(2.0, 1.0) and float64_at_full_rate(1.0, 1.0) and float64_at_full_rate(3.9, 1.0)
    assert not float64_at_full_rate(4.1, 1.0) and not float64_at_full_rate(32.0, 1.0)
    assert gemm_seconds(torch.device("cpu"), torch.float64) > 0


def test_float32_products_that_would_run_as_tf32_are_float64_under_auto_and_refused_when_asked(monkeypatch) -> None:
    """NVIDIA's PyTorch containers set TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, which makes every float32 cuBLAS GEMM a
    TF32 one (10 bits of mantissa: ~1e-3 relative), whatever torch's flags say, in that process. There auto's products
    are float64 (exact, whatever the float64 rate), and float32 asked for is refused in one line naming the variable;
    the same for a Ray cluster's GPU workers whose probe found it set. The timed float64 rate cannot be fooled into
    float32 there either."""
    from hrsa.analyze.streaming import backends
    from hrsa.analyze.streaming.backends import GpuWorkers
    from hrsa.store.errors import UserError

    monkeypatch.setattr(backends, "_cuda_available", lambda: True)
    monkeypatch.setattr(backends, "local_float64_at_full_rate", lambda: False)  # an A10G: auto would keep float32
    assert resolve_backend("auto", "auto", ("cka",), stored_dtypes=("float32",)).compute_dtype == "float32"
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    assert resolve_backend("auto", "auto", ("cka",), stored_dtypes=("float32",)).compute_dtype == "float64"
    assert resolve_backend("auto", "auto", ("cka",), stored_dtypes=("bfloat16",)).compute_dtype == "float64"
    with pytest.raises(UserError, match="TORCH_ALLOW_TF32_CUBLAS_OVERRIDE") as refused:
        resolve_backend("cuda", "float32", ("cka",))
    assert "\n" not in str(refused.value) and "--compute-dtype float64" in str(refused.value)
    assert resolve_backend("numpy", "float32", ("cka",)).compute_dtype == "float32"  # BLAS on the CPU: no TF32
    # k-NN or probes alone multiply no co-moments: nothing to refuse
    assert resolve_backend("cuda", "float32", ("knn",), multiplies=False).compute_dtype == "float32"
    for ignored in ("0", "true", "yes", " 1"):  # torch takes exactly "1" (c10::utils::check_env), else ignores it
        monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", ignored)
        assert resolve_backend("cuda", "float32", ("cka",)).compute_dtype == "float32"
    # A cluster's workers, as their probe found them (the driver's environment is not theirs).
    tf32 = GpuWorkers(free_bytes=40 << 30, float64_at_full_rate=False, float32_exact=False)
    assert resolve_backend("auto", "auto", ("cka",), cluster_gpus=tf32).compute_dtype == "float64"
    with pytest.raises(UserError, match="TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"):
        resolve_backend("auto", "float32", ("cka",), cluster_gpus=tf32)


_ASK_TF32 = {  # the ways a process asks torch for TF32 matmuls, and how to read each back
    "legacy": ("allow_tf32", True), "precision": ("float32_matmul_precision", "high"),
    "generic": ("fp32_precision", "tf32"), "matmul": ("matmul.fp32_precision", "tf32"),
}


def _tf32_setting(name: str) -> tuple:
    import torch

    owner = {"allow_tf32": torch.backends.cuda.matmul, "fp32_precision": torch.backends,
             "matmul.fp32_precision": torch.backends.cuda.matmul}.get(name)
    if name == "float32_matmul_precision":
        return torch.get_float32_matmul_precision, torch.set_float32_matmul_precision
    attr = name.rsplit(".", 1)[-1]
    return (lambda: getattr(owner, attr)), (lambda value: setattr(owner, attr, value))


@pytest.mark.parametrize("asked", list(_ASK_TF32))
def test_a_process_that_asked_for_tf32_gets_float64_products_and_its_settings_untouched(monkeypatch, asked) -> None:
    """A process that asked for TF32 (``allow_tf32``, ``set_float32_matmul_precision("high")``, torch 2.9's
    ``fp32_precision = "tf32"``, generic or the matmul's) would run float32 products as TF32 (~1e-3): auto gives float64
    there, float32 asked for is refused in one line, and hrsa changes none of the process's settings (an earlier
    version set them around its GEMMs and, found by review, left torch's two APIs in states that raise or changed
    oneDNN's)."""
    import torch
    from hrsa.analyze.streaming import backends
    from hrsa.store.errors import UserError

    name, value = _ASK_TF32[asked]
    if "fp32_precision" in name and not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision")
    monkeypatch.setattr(backends, "_cuda_available", lambda: True)
    monkeypatch.setattr(backends, "local_float64_at_full_rate", lambda: True)
    monkeypatch.delenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", raising=False)
    assert resolve_backend("auto", "auto", ("cka",)).compute_dtype == "float32"  # as torch starts: float32 is float32
    get, set_ = _tf32_setting(name)
    before = get()
    set_(value)
    try:
        snapshot = get()
        assert resolve_backend("auto", "auto", ("cka",)).compute_dtype == "float64"
        with pytest.raises(UserError, match="asked for TF32") as refused:
            resolve_backend("cuda", "float32", ("cka",))
        assert "\n" not in str(refused.value)
        assert get() == snapshot  # untouched
    finally:
        set_(before)
        torch.set_float32_matmul_precision("highest")
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = "none"
            torch.backends.fp32_precision = "none"


def _scaled(states: dict[int, np.ndarray], scale: float | tuple[int, float]) -> dict[int, np.ndarray]:
    """Every state times ``scale``, or one dimension of each times a factor: ``(dimension, factor)``."""
    if isinstance(scale, tuple):
        dim, factor = scale
        return {k: v * np.where(np.arange(v.shape[1]) == dim, factor, 1.0) for k, v in states.items()}
    return {k: v * scale for k, v in states.items()}


@pytest.mark.parametrize(("scale_a", "scale_b"), [(1e-23, 1.0), (1e-21, 1e-21), (1e19, 1e19), ((3, 1e-25), 1.0)],
                         ids=["a-at-1e-23", "both-at-1e-21", "both-at-1e19", "one-dimension-at-1e-25"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_activations_whose_squares_float32_cannot_hold_get_float64_products(make_pair_store, store_model, oracle,
                                                                            scale_a, scale_b, backend) -> None:
    """CKA and r do not depend on the activations' scale, but float32 squares do: values near 1e-23 square below
    float32's smallest normal, so C_xx shrank while C_xy held, and CKA read 5.87 (r 1.0 for 0.895); near 1e19 the
    squares overflowed and every dimension read as constant. Auto gives those blocks float64 products (said in a
    warning); float32 asked for is refused in one line. Checked against float64 formulas on the stored values."""
    from hrsa.analyze.metrics._common import PrecisionWarning
    from hrsa.store.errors import UserError

    pair = make_pair_store(doc_lengths=(300, 250, 450), d=16)
    store = pair.open("r+")
    cid = store.model_info("a").corpus
    x = store_model(store, "sa", cid, _scaled(pair.x, scale_a))
    y = store_model(store, "sb", cid, _scaled(pair.y, scale_b))
    common = dict(metrics=("cka", "dimcorr"), cross_layer=True, backend=backend, block_tokens=256)
    with pytest.warns(PrecisionWarning, match=r"magnitude .* in sa or sb, whose squares float32 does not hold.*float64 products"):
        res = analyze_pair(store, "sa", "sb", **common)
    assert res.settings["compute_dtype"] == "float64"
    for i, k in enumerate(res.matched):
        assert res.cka[i].value == pytest.approx(oracle.cka(x[k], y[k]), abs=1e-9)
        np.testing.assert_allclose(res.dimcorr[i].per_dim, oracle.dimcorr(x[k], y[k]), rtol=0, atol=1e-9)
    for i in res.hidden_states_a:
        for j in res.hidden_states_b:
            assert res.cka_matrix[i, j] == pytest.approx(oracle.cka(x[i], y[j]), abs=1e-9)
    with pytest.raises(UserError, match="--compute-dtype float64") as refused:
        analyze_pair(store, "sa", "sb", compute_dtype="float32", **common)
    assert "\n" not in str(refused.value)
