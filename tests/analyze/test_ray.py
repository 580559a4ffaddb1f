"""Dask-on-Ray: the same results as the local scheduler, on a local Ray instance (integration tier)."""

from __future__ import annotations

import numpy as np
import pytest

from hrsa.analyze.pair import analyze_pair


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
    from hrsa.analyze.streaming.backends import TorchBackend, resolve_backend
    from hrsa.analyze.streaming.ray_passes import task_resources
    from hrsa.runtime.placement import PlacementError

    # A CPU head (no CUDA in this process) driving GPU workers: auto means CUDA there, float32 products.
    assert resolve_backend("auto", cluster_gpus=True) == TorchBackend(device="cuda", compute_dtype="float32")
    assert task_resources(10**6, gpu=False) == {"num_cpus": 1, "memory": 10**6, "num_gpus": 0}
    with pytest.raises(PlacementError, match="and a GPU for one analysis task"):
        task_resources(10**6, gpu=True)  # this session's Ray has no GPU: refused at once, not queued for ever
    with pytest.raises(PlacementError, match="Lower --memory-budget"):
        task_resources(10**15, gpu=False)  # no node holds a petabyte
