"""Linear probes, pure math: split, perfect self-transfer, rotation sends transfer towards chance."""

from __future__ import annotations

import numpy as np
import pytest

from hrsa.analyze.metrics.linear_probe import linear_probe, stratified_split


def labelled(rng: np.random.Generator, m: int = 600, d: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Two classes separated along a few coordinates, with large per-dimension offsets and scales."""
    y = rng.integers(0, 2, size=m)
    f = rng.normal(size=(m, d))
    f[:, :4] += 1.5 * (2 * y[:, None] - 1)  # (m, 4): the signal
    return f * rng.uniform(0.1, 10.0, size=d) + rng.normal(scale=100.0, size=d), np.where(y == 1, "spam", "ham")


def test_split_stratified_and_seeded(rng: np.random.Generator) -> None:
    y = np.array(["a"] * 50 + ["b"] * 30 + ["c"] * 20)
    train, dev, test = stratified_split(y, seed=4)
    assert sorted(np.concatenate([train, dev, test]).tolist()) == list(range(100))
    assert (len(train), len(dev), len(test)) == (80, 10, 10)
    for part, share in ((train, 0.8), (test, 0.1)):
        assert {c: int((y[part] == c).sum()) for c in "abc"} == {c: round(share * n) for c, n in zip("abc", (50, 30, 20))}
    np.testing.assert_array_equal(stratified_split(y, seed=4)[2], test)
    assert not np.array_equal(stratified_split(y, seed=5)[2], test)


def test_self_transfer_is_perfect(rng: np.random.Generator) -> None:
    f, y = labelled(rng)
    res = linear_probe(f, f, y, seed=0)
    assert res.source == res.target
    assert res.source.test.accuracy > 0.9 and res.source.train.macro_f1 > 0.9
    assert res.source.train.n + res.source.dev.n + res.source.test.n == 600 and res.n_classes == 2


def test_rotation_keeps_self_accuracy_and_breaks_transfer(rng: np.random.Generator) -> None:
    f, y = labelled(rng, m=2000)
    f = (f - f.mean(0)) / f.std(0)
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    g = f @ q  # a rotated copy: the same information in other coordinates
    forward, own = linear_probe(f, g, y, seed=0), linear_probe(g, g, y, seed=0)
    assert own.source.test.accuracy == pytest.approx(forward.source.test.accuracy, abs=0.03)  # self accuracy holds
    assert forward.target.test.accuracy < forward.source.test.accuracy - 0.2
    assert abs(forward.target.test.accuracy - 0.5) < 0.2  # towards chance (0.5)


def test_invalid(rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match="two label values"):
        linear_probe(rng.normal(size=(10, 3)), rng.normal(size=(10, 3)), ["a"] * 10)
    with pytest.raises(ValueError, match="features"):
        linear_probe(rng.normal(size=(10, 3)), rng.normal(size=(10, 4)), ["a", "b"] * 5)
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(["a", "b"], fractions=(0.5, 0.5, 0.5))


def test_a_constant_feature_is_not_scaled_by_its_rounding_residue() -> None:
    """A pooled feature constant on the source's train split (0.1 in float64: std 1.4e-17, not 0) and another
    constant in the target (0.3): scaled by that std, the target's would be 1.4e16 and swamp the readout."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    informative = labels[:, None] * 2.0 + rng.normal(size=(200, 3)) * 0.3
    source = np.hstack([informative, np.full((200, 1), 0.1)])
    target = np.hstack([informative, np.full((200, 1), 0.3)])
    res = linear_probe(source, target, labels)
    assert res.target.test.accuracy == res.source.test.accuracy == 1.0
