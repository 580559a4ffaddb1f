"""Fixtures for the metric tests: seeded generators and activations shaped like real LLM hidden states.

The metric tests keep their own plain float64 oracles in each file; the streaming tests (several files,
one pair store) share :class:`Oracle` here, which uses numpy/scipy formulas only, independent of hrsa.
"""

from __future__ import annotations

from collections.abc import Callable
import json
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from hrsa.analyze.accumulators.moments import Moments
from hrsa.analyze.accumulators.testing import merge_tree
from hrsa.store import ActivationStore
from hrsa.store.testing import make_table

# Shape of "real" activations: a few massive-offset dimensions (LLMs carry 1e3-1e4 in some channels)
# and a few outlier-scale dimensions, on top of a unit-scale bulk.
OFFSETS = (1e3, 3e3, 1e4)
OUTLIER_SCALES = (30.0, 100.0, 300.0)

MakePair = Callable[..., tuple[np.ndarray, np.ndarray]]


@pytest.fixture(autouse=True)
def _seed_legacy_numpy() -> None:
    """Seed numpy's global generator, so any code that uses it is reproducible."""
    np.random.seed(0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20260121)


def activations(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """(n, d) float64 values: outlier scales in dimensions 0-2, large offsets in dimensions 3-5 (d >= 6)."""
    if d < 6:
        raise ValueError(f"Expected d >= 6 for activation-like data. Got {d} instead.")
    x = rng.normal(size=(n, d))  # (n, d)
    x[:, :3] *= OUTLIER_SCALES
    x[:, 3:6] += OFFSETS
    return x


@pytest.fixture
def make_pair(rng: np.random.Generator) -> MakePair:
    """Factory: (x, y) of shape (n, d), y a noisy mix of x; float32 by default, as stored activations are."""

    def make(n: int, d: int, *, dtype: type = np.float32, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        x = activations(rng, n, d)
        mix = np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)  # (d, d), close to the identity
        y = x @ mix + noise * activations(rng, n, d)
        return x.astype(dtype), y.astype(dtype)

    return make


def streamed(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, n_chunks: int = 7) -> Moments:
    """Moments of random contiguous chunks, merged in a random tree order with random operand swaps."""
    cuts = np.sort(rng.choice(np.arange(1, x.shape[0]), n_chunks - 1, replace=False))
    parts = [Moments.from_chunk(a, b) for a, b in zip(np.split(x, cuts), np.split(y, cuts), strict=True)]
    return merge_tree(parts, lambda hi: int(rng.integers(0, hi + 1)), lambda: bool(rng.integers(2)))


def random_rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    """(d, d) orthogonal, from the QR of a Gaussian matrix."""
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


# --- stores of model pairs, for the streaming, CLI and results tests ---------------------------------------

# Documents of the synthetic corpus: 1000 tokens, crossing block boundaries, one single-token document.
PAIR_DOCS = (130, 1, 300, 69, 500)
PAIR_STATES = 4  # hidden states per model (L + 1)


@dataclass(frozen=True)
class PairStore:
    """A store holding models "a" and "b" on one corpus, and the float64 values of what was stored.

    Attributes:
        x, y: hidden state k of a and of b, (N, D) float64 copies of the stored values.
        is_special, position, doc_offsets: the corpus's token table, for oracles on filtered rows.
    """

    url: str
    x: dict[int, np.ndarray]
    y: dict[int, np.ndarray]
    is_special: np.ndarray
    position: np.ndarray
    doc_offsets: np.ndarray

    def open(self, mode: str = "r") -> ActivationStore:
        return ActivationStore.open(self.url, mode=mode)


def write_model(store: ActivationStore, mid: str, cid: str, states: dict[int, np.ndarray], *, dtype: str = "float32",
                chunk_tokens: int = 64, shard_tokens: int = 256) -> dict[int, np.ndarray]:
    """Store ``states`` as model ``mid`` on corpus ``cid``; return the stored values as float64."""
    d = next(iter(states.values())).shape[1]
    n_states = max(states) + 1
    store.create_model(mid, corpus=cid, n_hidden_states=n_states, hidden_size=d, dtype=dtype,
                       hidden_states=sorted(states), chunk_tokens=chunk_tokens, shard_tokens=shard_tokens)
    logical = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    cast = {k: v.astype(logical) for k, v in states.items()}
    writer = store.writer(mid)
    for unit in writer.units():
        writer.write_unit(unit, {k: v[unit.start : unit.stop] for k, v in cast.items()})
    return {k: v.astype(np.float64) for k, v in cast.items()}


def related_states(rng: np.random.Generator, n: int, d: int, n_states: int = PAIR_STATES) -> tuple[dict, dict]:
    """Hidden states of two related models: a residual stream for A, a noisy near-identity mix of it for B."""
    x = {0: activations(rng, n, d)}
    for k in range(1, n_states):
        x[k] = x[k - 1] + 0.7 * rng.normal(size=(n, d)) * x[0].std(0)  # (n, d): each layer drifts a bit
    y = {}
    for k, xk in x.items():
        mix = np.eye(d) + (0.1 + 0.2 * k) * rng.normal(size=(d, d)) / np.sqrt(d)  # (d, d)
        y[k] = xk @ mix + 0.5 * activations(rng, n, d)
    return x, y


def build_pair_store(
    url: str, *, doc_lengths: tuple[int, ...] = PAIR_DOCS, d: int = 16, seed: int = 7, dtype: str = "float32"
) -> PairStore:
    """Models "a" and "b" (``related_states``) on a corpus of ``doc_lengths`` documents at ``url``."""
    store = ActivationStore.open(url, mode="a")
    table = make_table(doc_lengths)
    cid = store.write_corpus(table, tokenizer={"name": "test-tok", "fingerprint": "fp-1"}, source="test")
    x, y = related_states(np.random.default_rng(seed), table.n_tokens, d)
    return PairStore(url, write_model(store, "a", cid, x, dtype=dtype), write_model(store, "b", cid, y, dtype=dtype),
                     table.is_special, table.position(), table.doc_offsets)


@pytest.fixture
def make_pair_store(tmp_path: Path) -> Callable[..., PairStore]:
    """Factory: ``make_pair_store(name, **build_pair_store options)`` -> a new PairStore under tmp_path."""
    return lambda name="store", **kw: build_pair_store(str(tmp_path / name), **kw)


@pytest.fixture(scope="session")
def pair_store(tmp_path_factory: pytest.TempPathFactory) -> PairStore:
    """N = 1000 >> D = 16; read-only by convention (tests that write results use ``fresh_pair_store``)."""
    return build_pair_store(str(tmp_path_factory.mktemp("analyze") / "pair-store"))


@pytest.fixture(scope="session")
def narrow_store(tmp_path_factory: pytest.TempPathFactory) -> PairStore:
    """N = 40 < D = 48: Procrustes is underdetermined there."""
    return build_pair_store(str(tmp_path_factory.mktemp("analyze") / "narrow-store"), doc_lengths=(20, 13, 7), d=48, seed=11)


@pytest.fixture
def fresh_pair_store(make_pair_store: Callable[..., PairStore]) -> PairStore:
    """A pair store of this test's own, to write results into."""
    return make_pair_store()


class Oracle:
    """In-memory float64 formulas on whole arrays, written independently of hrsa's accumulators."""

    @staticmethod
    def cka(x: np.ndarray, y: np.ndarray) -> float:
        """Linear CKA from explicit N x N Gram matrices of the centred data (Kornblith et al. 2019)."""
        xc, yc = x - x.mean(0), y - y.mean(0)
        k, l_ = xc @ xc.T, yc @ yc.T  # (N, N)
        return float((k * l_).sum() / (np.linalg.norm(k) * np.linalg.norm(l_)))

    @staticmethod
    def debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
        """CKA with Song et al.'s unbiased HSIC on zero-diagonal Gram matrices."""

        def hsic(k: np.ndarray, l_: np.ndarray) -> float:
            n = k.shape[0]
            k, l_ = k - np.diag(np.diag(k)), l_ - np.diag(np.diag(l_))
            ones = np.ones(n)
            trace_kl = float((k * l_.T).sum())  # tr(K L) without the O(N^3) product
            return float(trace_kl + ones @ k @ ones * (ones @ l_ @ ones) / ((n - 1) * (n - 2))
                         - 2 / (n - 2) * (ones @ k) @ (l_ @ ones)) / (n * (n - 3))

        xc, yc = x - x.mean(0), y - y.mean(0)
        k, l_ = xc @ xc.T, yc @ yc.T
        return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))

    @staticmethod
    def dimcorr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(D,) Pearson r per dimension with np.corrcoef; NaN where a dimension is constant."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.array([np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(x.shape[1])])

    @staticmethod
    def procrustes(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(H_inv, residual) of scipy's orthogonal Procrustes fit of centred x onto centred y."""
        from scipy.linalg import orthogonal_procrustes

        xc, yc = x - x.mean(0), y - y.mean(0)
        rotation, _ = orthogonal_procrustes(xc, yc)  # (D, D)
        p = rotation**2
        d = p.shape[0]
        h_inv = 1.0 + float(np.sum(p * np.log(np.where(p > 0, p, 1.0)))) / (d * np.log(d))
        residual = float(np.linalg.norm(xc @ rotation - yc) ** 2 / np.linalg.norm(yc) ** 2)
        return h_inv, residual


@pytest.fixture(scope="session")
def oracle() -> type[Oracle]:
    return Oracle


@pytest.fixture(scope="session")
def store_model() -> Callable[..., dict[int, np.ndarray]]:
    """``write_model`` as a fixture: store extra models next to a pair store's."""
    return write_model


@pytest.fixture(scope="session")
def build_store() -> Callable[..., PairStore]:
    """``build_pair_store`` as a fixture, for module-scoped stores of a test file's own."""
    return build_pair_store


# --- a labelled corpus, for the probe tests ----------------------------------------------------------------

PROBE_D = 16


def _write_probe_model(store: ActivationStore, mid: str, cid: str, x: np.ndarray) -> None:
    store.create_model(mid, corpus=cid, n_hidden_states=2, hidden_size=PROBE_D, dtype="float32", chunk_tokens=64, shard_tokens=256)
    writer = store.writer(mid)
    for unit in writer.units():
        writer.write_unit(unit, {k: x[unit.start : unit.stop] * (k + 1) for k in (0, 1)})


@pytest.fixture(scope="session")
def labelled_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[ActivationStore, np.ndarray, list[str]]:
    """400 documents labelled ham/spam in a jsonl source; a = signal + noise, b = a rotated, c = a copy."""
    root = tmp_path_factory.mktemp("probe")
    rng = np.random.default_rng(5)
    lengths = tuple(int(n) for n in rng.integers(2, 12, size=400))
    labels = [str(v) for v in rng.choice(["ham", "spam"], size=400)]
    source = root / "mail.jsonl"
    source.write_text("".join(json.dumps({"id": f"rec-{i}", "label": v, "text": "t"}) + "\n" for i, v in enumerate(labels)))
    table = make_table(lengths)
    store = ActivationStore.open(str(root / "store"), mode="a")
    cid = store.write_corpus(table, tokenizer={"name": "tok", "fingerprint": "fp"}, source=str(source),
                             extra={"corpus_spec": {"source": str(source), "text": "text", "id_field": None}})
    sign = np.repeat(np.where(np.array(labels) == "spam", 1.0, -1.0), lengths)  # (N,)
    x = rng.normal(size=(table.n_tokens, PROBE_D))
    x[:, :2] += 0.8 * sign[:, None]
    x[table.doc_offsets[:-1]] = 50.0 * rng.normal(size=(400, PROBE_D))  # BOS rows: loud noise, as attention sinks
    q, _ = np.linalg.qr(rng.normal(size=(PROBE_D, PROBE_D)))
    for mid, values in (("a", x), ("b", x @ q), ("c", x.copy())):
        _write_probe_model(store, mid, cid, values.astype(np.float32))
    return store, x, labels
