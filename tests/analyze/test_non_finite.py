"""A NaN or inf in stored activations is refused in one line naming the model, hidden state and tokens (it was a
54-line traceback that named neither: with 2 x 29 hidden states a user had to bisect by hand)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hrsa.analyze.streaming.stream import NonFiniteError
from hrsa.analyze.local.knn import knn_pair
from hrsa.analyze.pair import analyze_pair
from hrsa.cli import cli
from hrsa.store import ActivationStore
from hrsa.store.errors import UserError
from hrsa.store.testing import make_table
from tests.analyze.conftest import write_model


@pytest.fixture(scope="module", params=[np.nan, np.inf])
def poisoned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = np.random.default_rng(0)
    url = str(tmp_path_factory.mktemp("nonfinite") / "store")
    store = ActivationStore.open(url, mode="a")
    cid = store.write_corpus(make_table((100,) * 6), tokenizer={"name": "tok", "fingerprint": "fp"})
    states = {k: rng.normal(size=(600, 8)) for k in range(3)}
    bad = {k: v.copy() for k, v in states.items()}
    bad[1][437, 5] = request.param
    write_model(store, "clean", cid, states)
    write_model(store, "broken", cid, bad)
    return url


@pytest.mark.parametrize("metrics", [("cka",), ("cka", "dimcorr", "procrustes")])
@pytest.mark.parametrize("cross_layer", [False, True])
def test_the_streaming_passes_name_the_array_and_its_tokens(poisoned: str, metrics: tuple[str, ...],
                                                            cross_layer: bool) -> None:
    store = ActivationStore.open(poisoned)
    with pytest.raises(NonFiniteError, match=r"^Expected finite activations\. Got NaN or inf in .*models/broken/hidden/1.*, "
                                             r"in 1 of the tokens 384-\d+ instead: .*Re-extract that model") as error:
        analyze_pair(store, "clean", "broken", metrics=metrics, cross_layer=cross_layer, backend="numpy",
                     scheduler="sync", block_tokens=128)
    assert isinstance(error.value, UserError) and "\n" not in str(error.value)


def test_knn_names_the_model_and_hidden_state(poisoned: str) -> None:
    with pytest.raises(NonFiniteError, match=r"^Expected finite activations\. Got NaN or inf in hidden state 1 of "
                                             r"model broken \(store .*\) among the k-NN sample's tokens"):
        knn_pair(ActivationStore.open(poisoned), "clean", "broken", ks=(5,), n_sample=None)


def test_the_cli_says_it_in_one_line_and_writes_nothing(poisoned: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["analyze", "--store", poisoned, "--pair", "clean", "broken", "--metrics", "cka",
                                       "--out", str(out), "--no-store-results"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "models/broken" in result.output and not out.exists()
