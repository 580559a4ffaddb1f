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


def test_unequal_fractions_give_dev_and_test_their_own_shares(rng: np.random.Generator) -> None:
    """Dev gets fractions[1] of each class and test fractions[2] (rounded per class), and the probe scores each split
    on those rows: with equal dev and test shares a swap of the two would go unseen."""
    y = np.array(["a"] * 40 + ["b"] * 60)
    fractions = (0.5, 0.35, 0.15)
    train, dev, test = stratified_split(y, fractions=fractions, seed=2)
    assert (len(train), len(dev), len(test)) == (50, 35, 15)
    for part, share in ((dev, 0.35), (test, 0.15)):
        assert {c: int((y[part] == c).sum()) for c in "ab"} == {"a": round(share * 40), "b": round(share * 60)}
    f = rng.normal(size=(100, 4)) + 3.0 * (y == "b")[:, None]
    res = linear_probe(f, f, y, fractions=fractions, seed=2)
    assert (res.source.train.n, res.source.dev.n, res.source.test.n) == (50, 35, 15)
    assert (res.target.train.n, res.target.dev.n, res.target.test.n) == (50, 35, 15)


def test_the_target_is_standardised_with_the_source_s_train_statistics(rng: np.random.Generator) -> None:
    """B = A shifted by 20 of A's standard deviations along the signal: B's own statistics would hide the shift and
    transfer perfectly; A's put every B row on one side of A's boundary, so B scores the share of that class."""
    f, y = labelled(rng, m=800)
    shift = np.zeros(f.shape[1])
    shift[:4] = 20.0 * f[:, :4].std(0) * np.sign(np.mean(f[y == "spam", :4], 0) - np.mean(f[y == "ham", :4], 0))
    res = linear_probe(f, f + shift, y, seed=0)
    assert res.source.test.accuracy > 0.9
    train, dev, test = stratified_split(y, seed=0)
    for scores, part in ((res.target.train, train), (res.target.dev, dev), (res.target.test, test)):
        assert scores.accuracy == pytest.approx(np.mean(y[part] == "spam"), abs=1e-12)  # all read as spam
    own = linear_probe(f + shift, f + shift, y, seed=0)  # B's own probe: the shift alone costs nothing
    assert own.source == res.source


def test_dev_and_test_rows_reach_neither_the_scaler_nor_the_fit(rng: np.random.Generator) -> None:
    """Only the source's train rows set mu, sigma and the weights: dev and test rows replaced by outliers 1e3 standard
    deviations out on the wrong side of the boundary leave every train score (and the target's) exactly as it was."""
    f, y = labelled(rng, m=600)
    train, dev, test = stratified_split(y, seed=0)
    held_out = np.concatenate([dev, test])
    spoiled = f.copy()
    wrong_side = np.where(y[held_out] == "spam", -1.0, 1.0)[:, None] * 1e3 * f[:, :4].std(0)
    spoiled[held_out, :4] = f[held_out, :4].mean(0) + wrong_side
    clean, res = linear_probe(f, f, y, seed=0), linear_probe(spoiled, f, y, seed=0)
    assert clean.source.train.accuracy > 0.9
    assert res.source.train == clean.source.train
    assert res.target == clean.target  # same scaler and weights applied to the same target rows


def test_chance_is_the_majority_share_and_c_is_the_inverse_l2_strength(rng: np.random.Generator) -> None:
    """70 / 30 labels: the test split holds 7 and 3 (stratified), so chance is 0.7. With C = 1e-5 the L2 penalty
    flattens the weights to 0 and the unpenalised intercept predicts the majority class everywhere."""
    y = np.array([0] * 70 + [1] * 30)
    f = rng.normal(size=(100, 3)) + 2.0 * y[:, None]
    strong = linear_probe(f, f, y, c=1e-5)
    assert strong.chance == pytest.approx(0.7, abs=1e-12)
    assert strong.source.test.accuracy == pytest.approx(0.7, abs=1e-12)
    assert strong.source.train.accuracy == pytest.approx(56 / 80, abs=1e-12)
    assert linear_probe(f, f, y, c=1.0).source.train.accuracy > 0.9


def test_macro_f1_averages_the_classes_a_split_holds() -> None:
    """A class with too few documents for the test split (4: a tenth rounds to none) scored F1 0 there, so a perfect
    probe read 2/3: macro-F1 is over the classes in the split's labels or predictions (a class predicted but absent
    still counts, as 0)."""
    rng = np.random.default_rng(0)
    y = np.array(["a"] * 40 + ["b"] * 40 + ["c"] * 4)
    centres = {"a": [10.0, 0.0], "b": [0.0, 10.0], "c": [-10.0, -10.0]}
    x = np.array([centres[label] for label in y]) + 0.1 * rng.standard_normal((y.size, 2))
    res = linear_probe(x, x, y)
    assert res.source.test.n == 8 and res.source.test.accuracy == 1.0
    assert res.source.test.macro_f1 == 1.0
    assert res.source.train.macro_f1 == 1.0
