"""Cross-model linear probe: does a classifier fitted on model A's features work on model B's?

Given per-document features F_A, F_B in R^{M x D} of the same M labelled documents (pooled from one
hidden state of each model), a stratified, seeded split S = train u dev u test (0.8 / 0.1 / 0.1), and
A's train statistics mu, sigma (per dimension), the probe is the L2-regularised logistic regression

    w, b = argmin  sum_{i in train} CE(softmax(W z_i + b), y_i) + |W|^2 / (2C),   z_i = (F_A[i] - mu) / sigma,

fitted on the source (A) only. It is then scored (accuracy and macro-F1) on train, dev and test of
the source, and, with the *same* mu, sigma and W, of the target, z_i = (F_B[i] - mu) / sigma. A split's macro-F1
averages the classes that split holds or predicts (a class too small to reach it is not scored 0 there).

Reading: the source scores say how linearly decodable the label is from A; the target scores say
whether B encodes it in the same coordinates. Invariances: for B = A the target scores equal the
source's (perfect transfer), and the source scores are invariant to any per-dimension affine map of A
(standardisation absorbs it). The transfer is *not* rotation invariant: for B = A Q with a random
rotation Q, B's own decodability is unchanged while the transfer falls towards chance (the point of the
probe). Dimensions with zero train variance get sigma = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hrsa.analyze.accumulators.centring import SPREAD_RTOL

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = ["ProbeResult", "ProbeScores", "SplitScores", "linear_probe", "stratified_split"]


@dataclass(frozen=True)
class ProbeScores:
    """Accuracy and macro-F1 of one model on one split."""

    accuracy: float
    macro_f1: float
    n: int


@dataclass(frozen=True)
class SplitScores:
    """Scores of one model on the train, dev and test splits."""

    train: ProbeScores
    dev: ProbeScores
    test: ProbeScores


@dataclass(frozen=True)
class ProbeResult:
    """A probe fitted on the source model and applied to the target.

    Attributes:
        source, target: scores of the source features and of the target features (same scaler, weights).
        n_classes: number of label values; chance: the majority-class frequency on the test split.
    """

    source: SplitScores
    target: SplitScores
    n_classes: int
    chance: float


def stratified_split(
    labels: ArrayLike, *, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Seeded stratified train/dev/test indices: each class split by ``fractions`` (rounded per class).

    Args:
        labels: (M,) label of each document.
        fractions: train, dev, test shares (summing to 1).
        seed: seed of the shuffle.

    Returns:
        Sorted (train, dev, test) index arrays covering 0..M-1 once.

    Example:
        >>> train, dev, test = stratified_split(["a"] * 10 + ["b"] * 10, seed=0)
        >>> len(train), len(dev), len(test)
        (16, 2, 2)
    """
    y = np.asarray(labels)
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"Expected three non-negative split fractions summing to 1. Got {fractions} instead.")
    rng = np.random.default_rng(seed)
    parts: list[list[NDArray[np.int64]]] = [[], [], []]
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_dev, n_test = round(fractions[1] * idx.size), round(fractions[2] * idx.size)
        n_train = idx.size - n_dev - n_test
        for part, chunk in zip(parts, np.split(idx, [n_train, n_train + n_dev])):
            part.append(chunk)
    train, dev, test = (np.sort(np.concatenate(p)).astype(np.int64) for p in parts)
    return train, dev, test


def _scores(model: object, z: NDArray, y: NDArray) -> ProbeScores:
    from sklearn.metrics import accuracy_score, f1_score

    if y.size == 0:
        return ProbeScores(float("nan"), float("nan"), 0)
    pred = model.predict(z)  # type: ignore[attr-defined]
    # Over the classes this split holds or predicts: a class too small to reach the split (4 documents: a tenth rounds
    # to none) scored F1 0 when every class the model knows was listed, and a perfect probe read 2/3
    macro_f1 = f1_score(y, pred, average="macro", zero_division=0)
    return ProbeScores(float(accuracy_score(y, pred)), float(macro_f1), int(y.size))


def linear_probe(
    source: ArrayLike,
    target: ArrayLike,
    labels: ArrayLike,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    c: float = 1.0,
    max_iter: int = 2000,
) -> ProbeResult:
    """Fit an L2 logistic regression on the source features and score it on source and target.

    Args:
        source: (M, D) features of the source model (one row per document).
        target: (M, D) features of the target model, same documents in the same order.
        labels: (M,) labels (any hashable values; at least two classes).
        fractions: train/dev/test shares of the stratified split.
        seed: seed of the split (and of the solver).
        c: inverse L2 strength of scikit-learn's LogisticRegression.
        max_iter: solver iterations.

    Returns:
        A ProbeResult.

    Raises:
        ValueError: shapes differ, or fewer than two classes.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> y = rng.integers(0, 2, size=400)
        >>> f = rng.normal(size=(400, 8)) + 2.0 * y[:, None]
        >>> res = linear_probe(f, f, y)
        >>> res.source.test.accuracy > 0.9, res.target.test == res.source.test
        (True, True)
    """
    from sklearn.linear_model import LogisticRegression

    xs, xt, y = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64), np.asarray(labels)
    if xs.ndim != 2 or xs.shape != xt.shape or y.shape != (xs.shape[0],):
        raise ValueError(f"Expected (M, D) source and target features and (M,) labels. Got {xs.shape}, {xt.shape} "
                         f"and {y.shape} instead.")
    classes = np.unique(y)
    if classes.size < 2:
        raise ValueError(f"Expected at least two label values for a probe. Got {classes.tolist()} instead.")
    # Step 1: the split, and the source model's train statistics (used for both models).
    train, dev, test = stratified_split(y, fractions=fractions, seed=seed)
    mu, sigma = xs[train].mean(0), xs[train].std(0)  # (D,), (D,)
    # A constant feature's std is a rounding residue (1e-17 of a float64 0.1): dividing by it would blow the other
    # model's differing constant up to 1e16. It is left unscaled, as an all-zero one is.
    sigma = np.where(sigma > SPREAD_RTOL * np.sqrt(mu**2 + sigma**2), sigma, 1.0)
    zs, zt = (xs - mu) / sigma, (xt - mu) / sigma  # (M, D) each
    # Step 2: fit on the source's train split only.
    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(zs[train], y[train])
    # Step 3: the same weights score both models on every split.
    scores = [SplitScores(*(_scores(model, z[part], y[part]) for part in (train, dev, test))) for z in (zs, zt)]
    _, counts = np.unique(y[test], return_counts=True)
    chance = float(counts.max() / test.size) if test.size else float("nan")
    return ProbeResult(scores[0], scores[1], int(classes.size), chance)
