"""The query verbs (`hrsa store ls/info/get`) and the reads under them at their edges: races with a reset, stray
done records, huge --docs ranges, a lost corpus, --docs beside --tokens, a float layer index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hrsa.cli import cli
from hrsa.store import ActivationStore
from hrsa.store.testing import expected_layer


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def url(tmp_path, filled_store: ActivationStore) -> str:
    return str(tmp_path / "store")


def test_get_never_writes_a_unit_reset_between_the_progress_check_and_the_read_as_zeros(
        url: str, tmp_path, filled_store: ActivationStore, monkeypatch) -> None:
    """`verify --reset-damaged` deletes a unit's shards, then its done record. A `get` whose progress check
    (model_info's listing of done/) ran before the reset, and whose done mask (a second, fresh listing) ran after it,
    took the model for complete and read the now pending unit through Zarr: its missing shard as zeros, written to
    --out as data. Simulated deterministically: the first listing is the one from before the reset."""
    import hrsa.store.activation_store as activation_store

    writer = filled_store.writer("m")
    before = list(range(writer.info.n_units))
    writer.reset_unit(writer.units()[1])  # what reset_damaged does to a damaged unit
    monkeypatch.setattr(activation_store, "done_units", lambda group: before)  # model_info's listing, pre-reset
    out = tmp_path / "x.npy"
    code, stdout, stderr = _run("store", "get", url, "m", "--layer", "2", "--out", str(out))
    if code == 0:
        got, want = np.load(out), expected_layer(filled_store, "m", 2)
        lo, hi = filled_store.model_info("m").layout.unit_range(1, want.shape[0])
        assert np.array_equal(got, want), f"rows {lo}:{hi} (the reset unit) read as {np.unique(got[lo:hi])[:5]}"
    else:
        assert not out.exists() and stderr.startswith("hrsa: error: ") and stderr.count("\n") == 1, stderr


def test_get_does_not_count_a_done_record_twice(url: str, tmp_path, filled_store: ActivationStore) -> None:
    """A stray second name of one unit's done record (`done/01` beside `done/1`: `str.isdigit` takes both) made
    model_info count the unit twice, so a model with a pending unit was "4/4 done" in ls and info, and `get` read the
    pending unit's missing shard as zeros."""
    writer = filled_store.writer("m")
    done = Path(url) / "models" / "m" / "done"
    (done / "01").write_bytes((done / "1").read_bytes())
    writer.reset_unit(writer.units()[3])
    code, stdout, _ = _run("store", "info", url, "m")
    assert code == 0 and "3/4 units done" in stdout, stdout
    out = tmp_path / "x.npy"
    code, _, stderr = _run("store", "get", url, "m", "--layer", "2", "--out", str(out))
    assert code == 2 and not out.exists() and "Re-run the same `hrsa extract`" in stderr, stderr


@pytest.mark.parametrize("docs", ["0-100000", "3,4,5-100000"])
def test_get_with_docs_past_the_corpus_is_refused_in_a_short_line(docs: str, url: str, tmp_path) -> None:
    """`--docs 0-100000` (a guess at "every document") on a 5-document corpus: the refusal listed every one of
    the ~100,000 indices out of range in its "one line" (about 700 kB), and a range of 10**9 is expanded into a
    Python list before any check (tens of GB)."""
    code, stdout, stderr = _run("store", "get", url, "m", "--layer", "1", "--docs", docs, "--out", str(tmp_path / "o.npy"))
    assert code == 2 and stderr.startswith("hrsa: error: ") and stderr.count("\n") == 1
    assert len(stderr) < 400, f"{len(stderr)} characters: {stderr[:200]}..."
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize("damage", ["deleted", "metadata unreadable"])
def test_info_describes_a_model_whose_corpus_is_gone_or_damaged(damage: str, url: str,
                                                                 filled_store: ActivationStore) -> None:
    """`hrsa store info` is where a user looks when something is wrong, and `ls` notes such a model and points at
    it; but with its corpus deleted (or its metadata unreadable) info printed nothing of the model, only "Expected a
    corpus of this store (none). Got 'corpus-…' instead" with exit 2, as if the user had typed a wrong corpus id."""
    import shutil

    cid = filled_store.model_info("m").corpus
    if damage == "deleted":
        shutil.rmtree(Path(url) / "corpora" / cid)
    else:
        (Path(url) / "corpora" / cid / "zarr.json").write_text("{ torn")
    code, stdout, stderr = _run("store", "info", url, "m")
    assert code == 0, stderr
    assert "model        m" in stdout and "progress     4/4 units done" in stdout and cid in stdout


def test_get_refuses_a_listed_document_that_the_token_range_leaves_out(url: str, tmp_path,
                                                                     filled_store: ActivationStore) -> None:
    """`--docs 0,4 --tokens 0:200`: document 4 (tokens 500..999) lies wholly outside the range. With every listed
    document outside, the read is refused ("the documents lie outside the token range"); with one of two outside,
    it silently wrote document 0's 130 rows and nothing of document 4, which the user named."""
    out = tmp_path / "o.npy"
    code, stdout, stderr = _run("store", "get", url, "m", "--layer", "1", "--docs", "0,4", "--tokens", "0:200",
                                "--out", str(out))
    assert code == 2 and not out.exists(), stdout
    assert stderr.startswith("hrsa: error: ") and stderr.count("\n") == 1 and "4" in stderr, stderr
    # A document the range cuts through keeps its tokens inside it, as before.
    code, _, stderr = _run("store", "get", url, "m", "--layer", "1", "--docs", "0,2", "--tokens", "100:200", "--out", str(out))
    full = expected_layer(filled_store, "m", 1)
    assert code == 0 and np.array_equal(np.load(out), np.concatenate([full[100:130], full[131:200]])), stderr


@pytest.mark.parametrize("layer", [2.0, np.float64(2.0), True])
def test_a_layer_index_that_is_not_an_integer_is_a_user_error_not_damage(layer: object,
                                                                          filled_store: ActivationStore) -> None:
    """`store.hidden_state("m", 2.0)` (a layer from np.linspace, say) passed the range check (2.0 in (0, 1, 2, 3))
    and then looked for the array `hidden/2.0`: a CorruptDataError telling the user to "delete the model and
    re-extract it", of a model that is whole; `True` likewise (`hidden/True`)."""
    from hrsa.store.errors import CorruptDataError, UserError

    with pytest.raises(UserError) as refused:
        filled_store.hidden_state("m", layer)  # type: ignore[arg-type]
    assert not isinstance(refused.value, CorruptDataError) and "re-extract" not in str(refused.value)
    assert filled_store.model_info("m").complete


def test_get_of_a_whole_layer_holds_a_few_shards_not_the_layer(tmp_path) -> None:
    """A 7B model's layer over a million tokens is 14 GB: computed whole, then saved, `get` held it twice (Dask's
    per-shard pieces and the joined array; measured 256 MiB for a 128 MiB layer). Written a group of shards at a
    time, the measured peak stays under half the output, and the file is the layer."""
    import tracemalloc

    from hrsa.store.testing import make_table

    store = ActivationStore.open(str(tmp_path / "store"), mode="a")
    cid = store.write_corpus(make_table((4096,) * 16), tokenizer={"name": "t", "fingerprint": "f"}, source="test")
    hidden = 256
    store.create_model("big", corpus=cid, n_hidden_states=1, hidden_size=hidden, dtype="float32", chunk_tokens=1024,
                       shard_tokens=1024)
    writer = store.writer("big")
    for unit in writer.units():
        writer.write_unit(unit, {0: np.full((unit.stop - unit.start, hidden), unit.index, np.float32)})
    out = tmp_path / "layer.npy"
    tracemalloc.start()
    try:
        code, _, err = _run("store", "get", store.url, "big", "--layer", "0", "--out", str(out))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 0, err
    layer = np.load(out)
    assert layer.shape == (4096 * 16, hidden) and np.array_equal(layer[:, 0], np.arange(4096 * 16) // 1024)
    assert peak < layer.nbytes / 2, (peak, layer.nbytes)


@pytest.mark.parametrize("stray", ["n_units", "far"])
def test_a_done_record_past_the_unit_grid_does_not_make_a_pending_model_complete(
        stray: str, url: str, tmp_path, filled_store: ActivationStore) -> None:
    """A done record named past the model's units (`done/4` of a 4-unit model: stale, from a copy, or forged) is no
    unit of this model. Counted, it made a model with a pending unit "4/4 done", complete in ls and info, and `get`
    read the pending unit's missing shard as zeros."""
    writer = filled_store.writer("m")
    n = writer.info.n_units
    done = Path(url) / "models" / "m" / "done"
    name = str(n if stray == "n_units" else n + 1000)
    (done / name).write_bytes((done / "1").read_bytes())
    writer.reset_unit(writer.units()[3])
    info = ActivationStore.open(url).model_info("m")
    assert (info.units_done, info.n_units, info.complete) == (n - 1, n, False)
    code, stdout, _ = _run("store", "info", url, "m")
    assert code == 0 and f"{n - 1}/{n} units done" in stdout, stdout
    out = tmp_path / "x.npy"
    code, _, stderr = _run("store", "get", url, "m", "--layer", "2", "--out", str(out))
    assert code == 2 and not out.exists() and "Re-run the same `hrsa extract`" in stderr, stderr
