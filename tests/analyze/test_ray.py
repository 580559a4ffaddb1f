"""Dask-on-Ray: the same results as the local scheduler, on a local Ray instance (integration tier)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from hrsa.analyze.pair import analyze_pair
from hrsa.analyze.streaming.backends import NumpyBackend


@pytest.mark.integration
def test_dask_on_ray_gives_the_local_results(pair_store) -> None:
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        store = pair_store.open()
        kwargs = {"cross_layer": True, "backend": "numpy", "block_tokens": 128, "workers": 2, "memory_budget": "400kB"}
        on_ray = analyze_pair(store, "a", "b", scheduler="ray", **kwargs)
        local = analyze_pair(store, "a", "b", scheduler="threads", **kwargs)
        assert on_ray.settings["scheduler"] == "ray" and on_ray.plan.passes > 3
        assert analyze_pair(store, "a", "b", metrics=("cka",), backend="numpy").settings["scheduler"] == "ray"  # auto
        np.testing.assert_allclose(on_ray.cka_matrix, local.cka_matrix, rtol=1e-10)
        np.testing.assert_allclose(on_ray.dimcorr_matrix, local.dimcorr_matrix, rtol=1e-10)
        np.testing.assert_allclose([p.h_inv for p in on_ray.procrustes], [p.h_inv for p in local.procrustes], rtol=1e-10)
    finally:
        if started:
            ray.shutdown()


def test_on_a_cluster_with_gpus_the_products_go_to_the_gpu_workers_and_none_there_is_refused(ray_local) -> None:
    from hrsa.analyze.streaming.backends import GpuWorkers, TorchBackend, resolve_backend
    from hrsa.analyze.streaming.ray_passes import task_resources
    from hrsa.runtime.placement import PlacementError

    # A CPU head (no CUDA in this process) driving GPU workers: auto means CUDA there, float32 products.
    workers = GpuWorkers(free_bytes=70 << 30, float64_at_full_rate=True)
    assert resolve_backend("auto", cluster_gpus=workers) == TorchBackend(device="cuda", compute_dtype="float32")
    assert task_resources(10**6, gpu=False) == {"num_cpus": 1, "memory": 10**6, "num_gpus": 0}
    import ray

    if not ray.cluster_resources().get("GPU"):  # this session's Ray has no GPU: refused at once, not queued for ever
        with pytest.raises(PlacementError, match="and a GPU for one analysis task"):
            task_resources(10**6, gpu=True)
    with pytest.raises(PlacementError, match="Lower --memory-budget"):
        task_resources(10**15, gpu=False)  # no node holds a petabyte


_PROBE = """
import sys, time
import ray
from hrsa.analyze.streaming.ray_passes import probe_gpu_workers
from hrsa.runtime.placement import PlacementError

ray.init(num_cpus=1, num_gpus=2, include_dashboard=False, log_to_driver=False)
try:  # the real probe: this node declares GPUs that torch there cannot use
    print("found", probe_gpu_workers())
except PlacementError as error:
    print("refused", error)
def measure():  # as a GPU node would answer: the least free bytes of its GPUs (1 GiB a GPU it holds), float64's
    import os  # rate, whether float32 GEMMs are float32 there
    return len(os.environ["CUDA_VISIBLE_DEVICES"].split(",")) << 30, False, True
print("found", probe_gpu_workers(measure))
import hrsa.analyze.streaming.ray_passes as ray_passes
ray_passes.ALL_GPUS_WAIT_S = 5.0  # the placing of a cold actor's worker (1 s was too short under a loaded CI)
def slow():  # measuring takes longer than the wait for the GPUs to be placed: all of them still measured
    time.sleep(7)
    return measure()
print("found", probe_gpu_workers(slow, timeout_s=20))
ray_passes.ALL_GPUS_WAIT_S = 60.0
def broken():  # a GPU torch was not built for: CUDA calls fail inside the task
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
try:
    print("found", probe_gpu_workers(broken))
except PlacementError as error:
    print("refused", error)
@ray.remote(num_gpus=1, num_cpus=0)
class Holder:
    def ping(self):
        return 1
holders = [Holder.remote()]  # one of the node's two GPUs held by another job: the free one is measured
ray.get(holders[0].ping.remote())
ray_passes.ALL_GPUS_WAIT_S = 2.0  # for both GPUs; then the rest of 20 s for a cold actor on the free one (2 s of 4
print("found", probe_gpu_workers(measure, timeout_s=20))  # failed in a clean-clone CI on a loaded machine)
holders.append(Holder.remote())
ray.get(holders[1].ping.remote())
start = time.monotonic()
try:  # every GPU held: refused after the wait, not queued for ever
    print("found", probe_gpu_workers(measure, timeout_s=4))
except PlacementError as error:
    print("busy", round(time.monotonic() - start), error)
for holder in holders:
    ray.kill(holder)  # asynchronous: their GPUs come free once they are gone
ray_passes.ALL_GPUS_WAIT_S = 60.0  # the default (2 s: under a loaded CI the kills and a cold actor took longer)
print("found", probe_gpu_workers(measure))  # the cancelled probes hold nothing: both GPUs are free again
"""


@pytest.mark.integration
def test_the_gpu_workers_are_probed_for_their_memory_and_a_gpu_torch_cannot_use_or_none_free_is_refused() -> None:
    """Ray does not know a GPU's memory: the plan takes it from a task on each GPU node holding all its GPUs (their
    least free bytes, float64's rate against float32, measured), or one that comes free where others hold some. A node
    whose GPUs torch cannot use, and GPUs all held by others, are refused with one line, not waited on; the probe's own
    tasks are cancelled then and hold nothing."""
    import shutil
    import subprocess
    import sys
    import tempfile

    pytest.importorskip("ray")  # the lent GPU machine runs this file without it
    from hrsa.cluster.local_cluster import ray_node_env

    temp = Path(tempfile.mkdtemp(prefix="hr-", dir="/tmp"))  # Ray's socket paths must stay short
    try:
        env = ray_node_env({"RAY_TMPDIR": str(temp)})
        done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=240,
                              check=False)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.split(" ")[0] in ("found", "refused", "busy")]
    assert len(lines) == 7, done.stdout
    assert lines.pop(2) == lines[1]  # the slow measurement: every GPU of the node, not one
    assert lines[0].startswith("refused Expected a CUDA device torch can use on every Ray node that declares a GPU")
    # The probe holds every GPU of the node (a task holding one would measure whichever Ray hands it).
    assert lines[1] == "found GpuWorkers(free_bytes=2147483648, float64_at_full_rate=False, float32_exact=True)"
    assert lines[2].startswith("refused Expected the GPU probe to run on every Ray node") and lines[2].endswith(
        ": RuntimeError: CUDA error: no kernel image is available for execution on the device. Check that hrsa, "
        "torch and CUDA work there, or pass --backend numpy."), lines[2]
    assert lines[3] == "found GpuWorkers(free_bytes=1073741824, float64_at_full_rate=False, float32_exact=True)"
    busy, seconds, message = lines[4].split(" ", 2)
    assert busy == "busy" and 4 <= int(seconds) < 30 and "all held" in message, lines[4]
    assert lines[5] == lines[1]


def test_on_a_gpu_cluster_the_plan_fits_each_tile_in_the_gpu_workers_memory(pair_store, ray_local, monkeypatch) -> None:
    """The driver does not see the workers' GPUs: their probe's free bytes (less the margin) bound the tiles as a local
    GPU's do, so a tile whose float64 sums would not fit there is split before any task starts."""
    from hrsa.analyze.local.knn import KnnOptions
    from hrsa.analyze.pair import analysis
    from hrsa.analyze.streaming.backends import GpuWorkers
    from hrsa.store.errors import UserError

    plans = []

    class Planned(Exception):
        pass

    def stop(plan):
        plans.append(plan)
        raise Planned

    store = pair_store.open()
    kwargs = {"cross_layer": True, "metrics": ("cka",), "scheduler": "ray", "block_tokens": 128,
              "memory_budget": "1GB", "on_plan": stop, "compute_dtype": "float64"}  # float32's sum needs 1 GiB beside
    monkeypatch.setattr(analysis, "_cluster_gpus", lambda: True)
    for free in (80 << 30, analysis.DEVICE_MARGIN + (100 << 10)):
        monkeypatch.setattr(analysis, "probe_gpu_workers", lambda free=free: GpuWorkers(free, True))
        with pytest.raises(Planned):
            analysis.analyze_pair(store, "a", "b", **kwargs)
    roomy, tight = plans
    assert roomy.inputs.device_budget == (80 << 30) - analysis.DEVICE_MARGIN and roomy.passes == 1
    assert tight.inputs.device_budget == 100 << 10 and tight.passes > 1
    # A model that is not there is named at once, before the GPUs are probed (which may wait for them)
    monkeypatch.setattr(analysis, "probe_gpu_workers", lambda: pytest.fail("probed before the pair was checked"))
    with pytest.raises(UserError, match="no-such-model"):
        analysis.analyze_pair(store, "a", "no-such-model", metrics=("cka",), scheduler="ray")
    # k-NN alone multiplies no co-moments: no GPU is probed for it (busy GPUs would refuse it for nothing)
    monkeypatch.setattr(analysis, "probe_gpu_workers", lambda: pytest.fail("probed for k-NN"))
    knn = analysis.analyze_pair(store, "a", "b", metrics=("knn",), scheduler="ray", knn_options=KnnOptions(ks=(5,)))
    assert knn.knn


@dataclass(frozen=True)
class _DiesMidPass(NumpyBackend):
    """The numpy backend, but the worker process running the first segment dies (os._exit, as an OOM kill or a lost
    node ends it) after folding its first block; its retry, and every other segment, runs normally."""

    marker: str = ""
    always: bool = False

    def fold_cross_tile(self, pending, xs, selfs={}):  # noqa: B006 (the base's signature)
        super().fold_cross_tile(pending, xs, selfs)
        if self.always:
            os._exit(1)
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # the first fold anywhere: exactly once
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)


@pytest.mark.integration
def test_a_worker_killed_mid_pass_is_retried_and_the_results_equal_one_process(pair_store, ray_local, monkeypatch,
                                                                                tmp_path) -> None:
    """An analysis task whose process dies mid-pass (a node lost, an OOM kill) runs again from its segment's first
    block: the accumulators it had built die with it, so nothing is counted twice or lost."""
    import cloudpickle

    from hrsa.analyze.pair import analysis

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the backend travels to Ray's workers by value
    store = pair_store.open()
    kwargs = {"cross_layer": True, "metrics": ("cka", "dimcorr"), "block_tokens": 128, "workers": 2,
              "compute_dtype": "float64"}
    local = analyze_pair(store, "a", "b", scheduler="threads", backend="numpy", **kwargs)
    marker = tmp_path / "died"
    monkeypatch.setattr(analysis, "resolve_backend",
                        lambda *a, **k: _DiesMidPass(compute_dtype="float64", marker=str(marker)))
    on_ray = analyze_pair(store, "a", "b", scheduler="ray", **kwargs)
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a Ray worker died, not this process
    assert on_ray.settings["scheduler"] == "ray" and on_ray.plan.workers == 2
    np.testing.assert_allclose(on_ray.cka_matrix, local.cka_matrix, rtol=1e-12)
    np.testing.assert_allclose(on_ray.dimcorr_matrix, local.dimcorr_matrix, rtol=1e-12)


@pytest.mark.integration
@pytest.mark.parametrize("forgery", ["a flipped byte", "another unit's shard, every checksum valid"])
def test_a_forged_shard_read_in_a_ray_task_is_the_same_one_line_error_as_in_this_process(make_pair_store, ray_local,
                                                                                        forgery: str) -> None:
    # Passes read shards forward a block at a time (store.reading.ShardStream): a chunk's crc32c fails as it is
    # decoded, a substituted shard when its last row is read, before the pass returns anything.
    from hrsa.store.errors import CorruptDataError

    pair = make_pair_store()
    shards = sorted(p for p in Path(pair.url).rglob("*") if p.is_file() and "/a/hidden/1/c/" in p.as_posix())
    same_size = [p for p in shards[1:] if p.stat().st_size == shards[0].stat().st_size]
    data = bytearray(shards[0].read_bytes())
    if forgery == "a flipped byte":
        data[100] ^= 0xFF
    else:
        data = bytearray(same_size[0].read_bytes())
    shards[0].write_bytes(bytes(data))
    kwargs = {"cross_layer": True, "metrics": ("cka",), "backend": "numpy", "block_tokens": 128, "workers": 2}
    with pytest.raises(CorruptDataError) as local:
        analyze_pair(pair.open(), "a", "b", scheduler="threads", **kwargs)
    with pytest.raises(CorruptDataError) as on_ray:
        analyze_pair(pair.open(), "a", "b", scheduler="ray", **kwargs)
    assert str(on_ray.value) == str(local.value) and len(str(on_ray.value).splitlines()) == 1


@pytest.mark.integration
def test_a_task_whose_worker_dies_on_every_retry_is_one_line(pair_store, ray_local, monkeypatch) -> None:
    import cloudpickle

    from hrsa.analyze.pair import analysis
    from hrsa.analyze.streaming.ray_passes import RETRIES, AnalysisFailedError

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(analysis, "resolve_backend", lambda *a, **k: _DiesMidPass(compute_dtype="float64", always=True))
    with pytest.raises(AnalysisFailedError) as failed:
        analyze_pair(pair_store.open(), "a", "b", scheduler="ray", cross_layer=True, metrics=("cka",), workers=1)
    message = str(failed.value)
    assert len(message.splitlines()) == 1 and "WorkerCrashedError" in message and f"after {RETRIES} retries" in message
    assert "--memory-budget" in message


@pytest.mark.gpu
@pytest.mark.integration
def test_on_a_ray_with_a_gpu_the_products_run_there_and_equal_one_process(pair_store, ray_local) -> None:
    """Where Ray has a GPU: the probe measures it (free memory, float64's rate), the tiles' tasks run there with the
    torch backend, a one-segment tile reduces its sums on the GPU, and the results equal the local numpy pass's to
    1e-12 in float64 (float32 products within 1e-5)."""
    from hrsa.analyze.pair import analysis

    store = pair_store.open()
    common = {"metrics": ("cka", "dimcorr"), "cross_layer": True, "block_tokens": 128, "groups": 0}
    local = analyze_pair(store, "a", "b", scheduler="threads", backend="numpy", compute_dtype="float64", **common)
    workers = analysis.probe_gpu_workers()
    assert workers.free_bytes > 1 << 30
    # float32 asked for is refused where TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 forces TF32 (test_compute_dtype.py)
    dtypes = (("float64", 1e-12), ("float32", 1e-5)) if workers.float32_exact else (("float64", 1e-12),)
    for dtype, tolerance in dtypes:
        on_gpu = analyze_pair(store, "a", "b", scheduler="ray", backend="auto", compute_dtype=dtype, **common)
        assert (on_gpu.settings["backend"], on_gpu.settings["compute_dtype"]) == ("torch", dtype)
        assert on_gpu.plan.inputs.device_budget is not None and on_gpu.plan.inputs.per_worker
        np.testing.assert_allclose(on_gpu.cka_matrix, local.cka_matrix, rtol=0, atol=tolerance)
        np.testing.assert_allclose(on_gpu.dimcorr_matrix, local.dimcorr_matrix, rtol=0, atol=tolerance)


def test_a_probe_whose_worker_died_is_one_line_without_colour_codes() -> None:
    """Ray tells an actor's failed creation (hrsa or torch not importable on a node) in several coloured lines ending
    in the cause; the refusal keeps that last line, plain. A task's error keeps its root cause."""
    ray = pytest.importorskip("ray")
    from hrsa.analyze.streaming.ray_passes import _probe_failure

    class Died(ray.exceptions.ActorDiedError):
        def __str__(self) -> str:
            return ("The actor died because of an error raised in its creation task, \x1b[36mray::_GpuProbe.__init__()"
                    "\x1b[39m (pid=1)\n  File \"x.py\", line 1\nModuleNotFoundError: No module named 'hrsa'\n")

    assert _probe_failure(Died()) == "Died: ModuleNotFoundError: No module named 'hrsa'"
    assert _probe_failure(ray.exceptions.ActorDiedError()) == (
        "ActorDiedError: The actor died unexpectedly before finishing this task.")


def test_on_ray_activations_beyond_float32_get_float64_products_and_float32_is_refused(make_pair_store, store_model,
                                                                                          oracle, ray_local) -> None:
    """The range error raised in a Ray task did not unpickle (its text passed for its magnitude) and was wrapped as a
    worker killed for memory ("lower --memory-budget"): auto never fell back to float64 on a cluster."""
    from hrsa.analyze.metrics._common import PrecisionWarning
    from hrsa.store.errors import UserError

    pair = make_pair_store(doc_lengths=(300, 250, 450), d=16)
    store = pair.open("r+")
    x = store_model(store, "tiny", store.model_info("a").corpus, {k: v * 1e-23 for k, v in pair.x.items()})
    common = dict(metrics=("cka",), cross_layer=True, backend="numpy", block_tokens=256, workers=2, scheduler="ray")
    with pytest.warns(PrecisionWarning, match="float64 products"):
        res = analyze_pair(store, "tiny", "b", **common)
    assert res.settings["compute_dtype"] == "float64" and res.settings["scheduler"] == "ray"
    for i in res.hidden_states_a:
        for j in res.hidden_states_b:
            assert res.cka_matrix[i, j] == pytest.approx(oracle.cka(x[i], pair.y[j]), abs=1e-9)
    with pytest.raises(UserError, match="--compute-dtype float64") as refused:
        analyze_pair(store, "tiny", "b", compute_dtype="float32", **common)
    assert "\n" not in str(refused.value)
