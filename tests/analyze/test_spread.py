"""spread: a fold's memory-bound steps on the cores its GEMMs own: every step once, no more threads than the fold's BLAS
threads, and an error raised only once every step under way has ended."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from hrsa.analyze.accumulators import spread as spread_module
from hrsa.analyze.accumulators.cross_tile import stack_centred
from hrsa.analyze.accumulators.spread import spread


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_step_runs_once_on_at_most_the_fold_s_threads(monkeypatch, threads) -> None:
    monkeypatch.setattr(spread_module, "blas_threads", lambda: threads)
    ran: list[int] = []
    names: set[str] = set()
    lock = threading.Lock()

    def step(i: int) -> None:
        time.sleep(0.002)  # long enough for the pool's threads to take their shares
        with lock:
            ran.append(i)
            names.add(threading.current_thread().name)

    spread(step, 10)
    assert sorted(ran) == list(range(10))
    assert len(names) == threads and threading.current_thread().name in names


@pytest.mark.parametrize(("failing", "finished"), [(1, [0, 2]), (0, [1, 3])], ids=["the pool's step", "the caller's step"])
def test_an_error_is_raised_after_the_other_steps_have_ended(monkeypatch, failing: int, finished: list[int]) -> None:
    """A step fails at once (one of the pool's share 1, 3, or of the caller's 0, 2): spread raises it only after the
    other share's steps (which may write into the same arrays) have ended."""
    monkeypatch.setattr(spread_module, "blas_threads", lambda: 2)
    done: list[int] = []

    def step(i: int) -> None:
        if i == failing:
            raise ValueError(f"step {i} failed")
        time.sleep(0.05)
        done.append(i)

    with pytest.raises(ValueError, match=f"step {failing} failed"):
        spread(step, 4)
    assert sorted(done) == finished  # the other share ran to its end; the failing share stopped at its error


def test_a_stacked_block_is_the_same_on_one_thread_and_on_several(monkeypatch) -> None:
    """Each state's slot and mean are its own: spreading the states over threads changes no bit."""
    rng = np.random.default_rng(5)
    blocks = [(rng.standard_normal((300, d)) * s + o).astype(np.float32)
              for d, s, o in ((24, 1.0, 1e4), (40, 3.0, -2e3), (8, 0.1, 0.0), (24, 2.0, 1e5))]
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(spread_module, "blas_threads", lambda threads=threads: threads)
        stacked, means, offsets = stack_centred(blocks, np.dtype(np.float32))
        results.append((stacked.copy(), means, offsets))
    (one, means_one, offsets_one), (several, means_several, offsets_several) = results
    assert np.array_equal(one, several) and np.array_equal(means_one, means_several)
    assert np.array_equal(offsets_one, offsets_several)
    np.testing.assert_allclose(means_one[:24], blocks[0].astype(np.float64).mean(0), rtol=1e-15)
    bad = [b.copy() for b in blocks]
    bad[2][7, 3] = np.nan
    monkeypatch.setattr(spread_module, "blas_threads", lambda: 3)
    with pytest.raises(ValueError):
        stack_centred(bad, np.dtype(np.float32))
