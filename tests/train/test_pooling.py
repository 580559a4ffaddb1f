"""Query formatting and mean pooling, against their definitions written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hrsa.train.pooling import format_query, mean_pool


def test_a_query_is_formatted_as_the_paper_says_and_bare_without_an_instruction() -> None:
    assert format_query("what is a cat", "Find the passage") == "Instruct: Find the passage\nQuery: what is a cat"
    assert format_query("what is a cat", None) == "what is a cat"
    assert format_query("what is a cat", "") == "what is a cat"  # an empty instruction is none, not "Instruct: \n"


def test_mean_pool_averages_the_unmasked_tokens_only() -> None:
    """Float64 loops over the tokens whose mask is 1: right padding, left padding and a full row; padding holds huge
    values, so counting it (in the sum or in the count) shows."""
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 5, 4))
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    hidden[mask == 0] = 1e3
    want = np.array([[sum(hidden[b, t, d] for t in range(5) if mask[b, t]) / mask[b].sum() for d in range(4)]
                     for b in range(3)])
    got = mean_pool(torch.from_numpy(hidden).float(), torch.from_numpy(mask))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_mean_pool_of_bf16_states_sums_in_float32() -> None:
    """4096 bf16 values summed in bf16 lose the mean to rounding (8 bits of mantissa); the float64 mean of the same
    bf16 values is the oracle."""
    rng = np.random.default_rng(1)
    hidden = torch.from_numpy(1.0 + 0.01 * rng.standard_normal((2, 4096, 3))).to(torch.bfloat16)
    mask = torch.ones(2, 4096, dtype=torch.long)
    mask[1, 3000:] = 0
    exact = hidden.double()
    want = torch.stack([exact[0].mean(dim=0), exact[1, :3000].mean(dim=0)])
    got = mean_pool(hidden, mask)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=0)
