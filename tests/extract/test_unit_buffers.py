"""A worker's kept unit buffers: reused for units of one shape, never more than two sets kept, let go with the model
or for another shape (a 7B unit's set is ~1.9 GB: four sets alive on each GPU worker of a node add up)."""

from __future__ import annotations

import torch
from hrsa.extract.worker import UnitBuffers


def _ptrs(buffers: dict[int, torch.Tensor]) -> set[int]:
    return {t.data_ptr() for t in buffers.values()}


def test_a_set_is_reused_for_the_same_shape_and_at_most_two_are_kept() -> None:
    pool = UnitBuffers()
    sets = [pool.take((0, 1), (64, 8), torch.bfloat16) for _ in range(3)]  # three in flight: all new
    assert len({frozenset(_ptrs(s)) for s in sets}) == 3
    for held in sets:
        pool.give(held)
    again = [pool.take((0, 1), (64, 8), torch.bfloat16) for _ in range(3)]
    reused = [any(_ptrs(a) == _ptrs(s) for s in sets) for a in again]
    assert reused == [True, True, False]  # two kept, the third new


def test_another_shape_or_model_lets_the_kept_sets_go() -> None:
    pool = UnitBuffers()
    full = pool.take((0, 1), (64, 8), torch.bfloat16)
    pool.give(full)
    last = pool.take((0, 1), (40, 8), torch.bfloat16)  # the model's shorter last unit
    assert _ptrs(last) != _ptrs(full) and pool._free == []
    pool.give(last)
    pool.clear()  # the worker lets its model go
    assert pool._free == []
