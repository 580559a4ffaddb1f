"""Bits are kept: every dtype round-trips through every codec bit for bit."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from hrsa.store import ActivationStore
from hrsa.store.format import CODEC_PRESETS
from hrsa.store.testing import HIDDEN, expected_layer, fill_model, new_model


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.dtype(f"u{a.dtype.itemsize}"))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("codec", sorted(CODEC_PRESETS))
def test_round_trip_is_bit_exact(store: ActivationStore, dtype: str, codec: str) -> None:
    new_model(store, "m", dtype=dtype, codec=codec, hidden_states=[0, 3])
    fill_model(store, "m")
    for layer in (0, 3):
        got = store.hidden_state("m", layer).compute()
        want = expected_layer(store, "m", layer)
        assert got.dtype == want.dtype
        assert np.array_equal(_bits(got), _bits(want))


def test_bf16_is_stored_as_bf16_not_fp16(store: ActivationStore) -> None:
    new_model(store, "m", dtype="bfloat16")
    fill_model(store, "m")
    got = store.hidden_state("m", 1).compute()
    assert got.dtype == ml_dtypes.bfloat16
    assert float(got[:, 2].astype(np.float32).min()) > 65504  # would be inf in fp16
    assert store.group("models/m")["hidden/1"].dtype == np.uint16


def test_special_values_survive(store: ActivationStore) -> None:
    new_model(store, "m", dtype="float32", hidden_states=[0])
    writer = store.writer("m")
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3.4e38], np.float32)
    written = {}
    for unit in writer.units():
        values = np.resize(special, (unit.n_tokens, HIDDEN)).astype(np.float32)
        values[:, -1] = np.frombuffer(np.uint32(0x7FC00001).tobytes(), np.float32)[0]  # a NaN payload
        written[unit.index] = values
        writer.write_unit(unit, {0: values})
    got = store.hidden_state("m", 0).compute()
    assert np.array_equal(_bits(got), _bits(np.concatenate([written[i] for i in sorted(written)])))
