from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from hrsa.store.errors import InvalidIdError
from hrsa.store.format import CODEC_PRESETS, as_logical, as_storage, choose_layout, codec_chain
from hrsa.store.ids import parse_id, slugify


@pytest.mark.parametrize("good", ["m", "smollm2-135m", "Qwen2.5-1.5B_step.100", "0abc"])
def test_parse_id_accepts_slugs(good: str) -> None:
    assert parse_id(good) == good


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", ".hidden", "-x", "a..b", "x" * 129, "a b", None, 3])
def test_parse_id_rejects_anything_that_could_leave_the_root(bad: object) -> None:
    with pytest.raises(InvalidIdError, match="Expected a"):
        parse_id(bad)


def test_slugify_makes_valid_ids() -> None:
    for text in ["HuggingFaceTB/SmolLM2-135M-Instruct", "/tmp/ckpt/step_000100", "../../etc", "a  b"]:
        parse_id(slugify(text))
    assert slugify("Org/Model-1.5B") == "org--model-1.5b"


@pytest.mark.parametrize(("hidden", "dtype"), [(576, "float32"), (3584, "bfloat16"), (24, "float16")])
def test_layout_is_whole_chunks_per_shard(hidden: int, dtype: str) -> None:
    layout = choose_layout(hidden, dtype)
    assert layout.shard_tokens % layout.chunk_tokens == 0
    assert layout.chunk_tokens & (layout.chunk_tokens - 1) == 0  # a power of two
    row = hidden * (2 if dtype != "float32" else 4)
    assert layout.shard_tokens * row <= 32 << 20 or layout.shard_tokens == layout.chunk_tokens


def test_layout_units_cover_tokens_exactly() -> None:
    layout = choose_layout(8, "float32", chunk_tokens=4, shard_tokens=16)
    ranges = [layout.unit_range(i, 50) for i in range(layout.n_units(50))]
    assert ranges[0] == (0, 16) and ranges[-1] == (48, 50)
    assert sum(b - a for a, b in ranges) == 50


@pytest.mark.parametrize("preset", sorted(CODEC_PRESETS))
def test_every_codec_chain_ends_in_a_checksum(preset: str) -> None:
    from zarr.codecs import Crc32cCodec

    assert isinstance(codec_chain(preset, "bfloat16")[-1], Crc32cCodec)


def test_bf16_storage_keeps_bits_from_torch_and_numpy() -> None:
    t = torch.tensor([1.0, -0.0, 7e4, 3.0e38, float("inf"), float("nan")], dtype=torch.bfloat16)
    from_torch = as_storage(t, "bfloat16")
    assert from_torch.dtype == np.uint16
    assert np.array_equal(from_torch, t.view(torch.uint16).numpy())
    from_numpy = as_storage(t.float().numpy().astype(ml_dtypes.bfloat16), "bfloat16")
    assert np.array_equal(from_numpy, from_torch)
    back = as_logical(from_torch, "bfloat16").astype(np.float32)
    assert back[2] == np.float32(t[2].float()) and back[2] > 65504  # past fp16's maximum


def test_as_storage_refuses_a_silent_cast() -> None:
    with pytest.raises(TypeError, match="Expected bfloat16"):
        as_storage(np.zeros(3, np.float16), "bfloat16")
    with pytest.raises(TypeError, match="Expected float32"):
        as_storage(np.zeros(3, np.float64), "float32")


def test_small_shard_asked_for_is_kept() -> None:
    layout = choose_layout(32, "float32", shard_tokens=128)
    assert (layout.chunk_tokens, layout.shard_tokens) == (128, 128)
