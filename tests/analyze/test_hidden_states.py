"""Which hidden states the local metrics look at: negative indices count from the end of each model's hidden states,
as ``hrsa store get --layer -1`` does; the index a result reports is the resolved, non-negative one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hrsa.analyze.config import AnalyzeConfig
from hrsa.analyze.local.hidden_states import shared_hidden_states
from hrsa.store import ActivationStore
from hrsa.store.errors import UserError
from hrsa.store.testing import make_table

from tests.analyze.conftest import write_model


def test_negative_indices_count_from_the_end(labelled_store) -> None:
    store, _, _ = labelled_store  # two hidden states, 0 and 1
    assert shared_hidden_states(store, "a", "c", [-1]) == (1,)
    assert shared_hidden_states(store, "a", "c", [0, -1]) == (0, 1)
    assert shared_hidden_states(store, "a", "c", [-2, 1, -1]) == (0, 1)  # -1 is 1: once, where first named


@pytest.mark.parametrize("index", [-3, 2])
def test_an_index_out_of_range_either_way_names_the_valid_ones(labelled_store, index: int) -> None:
    store, _, _ = labelled_store
    with pytest.raises(UserError) as refused:
        shared_hidden_states(store, "a", "c", [0, index])
    assert str(refused.value) == (f"Expected hidden states shared by a and c (0, 1; from the end -2, -1). Got {index} "
                                  "instead. Pick --hidden-states among them.")


@pytest.fixture(scope="module")
def two_depths(tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    """"short" stores its 3 hidden states, "deep" its 5: they share 0, 1 and 2."""
    store = ActivationStore.open(str(tmp_path_factory.mktemp("depths") / "store"), mode="a")
    cid = store.write_corpus(make_table((20, 20)), tokenizer={"name": "t", "fingerprint": "f"})
    rng = np.random.default_rng(0)
    for mid, n in (("short", 3), ("deep", 5)):
        write_model(store, mid, cid, {k: rng.normal(size=(40, 4)) for k in range(n)})
    return store


def test_a_negative_index_naming_other_states_of_two_depths_is_refused(two_depths: ActivationStore) -> None:
    """-1 is 2 of short but 4 of deep: comparing the same index of both has no answer."""
    with pytest.raises(UserError) as refused:
        shared_hidden_states(two_depths, "short", "deep", [-1])
    assert str(refused.value) == ("Expected hidden-state indices naming the same hidden state of short and deep. Got "
                                  "-1 instead, which is 2 of short (3 hidden states) but 4 of deep (5). Pick "
                                  "--hidden-states among the shared ones counted from 0 (0, 1, 2).")
    assert shared_hidden_states(two_depths, "short", "deep", [2, 0]) == (2, 0)


def test_the_flag_reads_negative_indices(tmp_path: Path) -> None:
    """"-1" read as a broken range A-B: the flag refused what `hrsa store get --layer -1` takes."""
    config = AnalyzeConfig(store=str(tmp_path / "s"), pair=("a", "b"), hidden_states="0,-1,3-4")
    assert config.hidden_states == (0, -1, 3, 4)
