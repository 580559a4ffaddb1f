"""Opening, listing, describing, selecting and deleting."""

from __future__ import annotations

import dataclasses
import io
import os
import json
from pathlib import Path

from typing import Any

import numpy as np
import pytest

from hrsa.store import (
    ActivationStore,
    CorpusNotFoundError,
    IncompleteModelError,
    LayerOutOfRangeError,
    ModelNotFoundError,
    SelectionError,
    StoreFormatError,
    StoreNotFoundError,
    StoreReadOnlyError,
    TokenFilter,
    TokenSelection,
    UserError,
)
from hrsa.store.testing import DOC_LENGTHS, HIDDEN, LAYERS, expected_layer, fill_model, make_table, new_model


def test_open_missing_store_in_read_mode_creates_nothing(tmp_path) -> None:
    for mode in ("r", "r+"):
        with pytest.raises(StoreNotFoundError, match="Expected an hrsa store"):
            ActivationStore.open(tmp_path / "nope", mode=mode)
    assert not (tmp_path / "nope").exists()


def test_open_refuses_a_folder_of_other_files(tmp_path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(StoreFormatError, match="other files"):
        ActivationStore.open(tmp_path, mode="a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


# What a location holds while another process creates the store there (`_create_root`): Zarr's local writes go
# through a temporary `zarr.<uuid hex>.partial` beside the key, so a racing opener can see those too.
CREATING = {
    "a group's write in flight": ["corpora/zarr.0123456789abcdef0123456789abcdef.partial"],
    "groups written, one in flight": ["corpora/zarr.json", "models/zarr.json",
                                      "results/zarr.0123456789abcdef0123456789abcdef.partial"],
    "the root's write in flight": ["corpora/zarr.json", "models/zarr.json", "results/zarr.json",
                                   "zarr.0123456789abcdef0123456789abcdef.partial"],
}


@pytest.mark.parametrize("seen", sorted(CREATING))
def test_open_joins_a_store_another_process_is_creating(tmp_path, seen: str) -> None:
    for key in CREATING[seen]:
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'[: 20 if "partial" in key else None])
    store = ActivationStore.open(tmp_path, mode="a")
    assert store.models() == [] and (tmp_path / "zarr.json").is_file()


@pytest.mark.parametrize("other", ["mine.partial", "corpora/zarr.json.bak", "corpora/notes.0123456789abcdef0123456789abcdef.partial"])
def test_open_refuses_other_files_that_look_like_a_store_being_created(tmp_path, other: str) -> None:
    for key in ["corpora/zarr.json", other]:
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_text("{}")
    with pytest.raises(StoreFormatError, match="other files"):
        ActivationStore.open(tmp_path, mode="a")
    assert not (tmp_path / "zarr.json").exists()


def test_open_refuses_a_newer_format(tmp_path, store: ActivationStore) -> None:
    root = tmp_path / "store"
    meta = json.loads((root / "zarr.json").read_text())
    meta["attributes"]["hrsa"]["format_version"] = 99
    (root / "zarr.json").write_text(json.dumps(meta))
    before = (root / "zarr.json").read_bytes()
    with pytest.raises(StoreFormatError, match="Upgrade hrsa"):
        ActivationStore.open(root, mode="a")
    assert (root / "zarr.json").read_bytes() == before


def test_open_refuses_a_plain_zarr_group(tmp_path) -> None:
    import zarr

    zarr.open_group(tmp_path / "plain", mode="w")
    with pytest.raises(StoreFormatError, match="without hrsa attributes"):
        ActivationStore.open(tmp_path / "plain")


def test_w_minus_refuses_an_existing_store(tmp_path, store: ActivationStore) -> None:
    with pytest.raises(StoreFormatError):
        ActivationStore.open(tmp_path / "store", mode="w-")


def test_read_only_store_refuses_writes(tmp_path, filled_store: ActivationStore) -> None:
    ro = ActivationStore.open(tmp_path / "store", mode="r")
    with pytest.raises(StoreReadOnlyError):
        ro.delete_model("m")
    with pytest.raises(StoreReadOnlyError):
        ro.writer("m")
    assert ro.models() == ["m"]


def test_lists_and_describes(filled_store: ActivationStore) -> None:
    (cid,) = filled_store.corpora()
    assert filled_store.models() == ["m"]
    info = filled_store.model_info("m")
    assert (info.corpus, info.n_tokens, info.hidden_size, info.n_hidden_states) == (cid, sum(DOC_LENGTHS), HIDDEN, LAYERS)
    assert info.complete and info.units_done == info.n_units == 4
    corpus = filled_store.corpus_info(cid)
    assert (corpus.n_docs, corpus.n_tokens, corpus.tokenizer["name"]) == (len(DOC_LENGTHS), sum(DOC_LENGTHS), "test-tok")


def test_corpus_id_derives_from_content(store: ActivationStore) -> None:
    tok = {"name": "t", "fingerprint": "f"}
    a = store.write_corpus(make_table(), tokenizer=tok)
    assert store.write_corpus(make_table(), tokenizer=tok) == a  # same content: same corpus, not rewritten
    # The tokenizer is not the corpus: another one that gives the same tokens joins it.
    assert store.write_corpus(make_table(), tokenizer={"name": "t", "fingerprint": "other"}) == a
    assert store.write_corpus(make_table((5, 6)), tokenizer=tok) != a
    table = make_table()
    spans = dataclasses.replace(table, span_fields=("text",), token_field=np.zeros(table.n_tokens, np.int16),
                                char_start=np.arange(table.n_tokens, dtype=np.int32), char_end=np.arange(table.n_tokens, dtype=np.int32) + 1)
    assert store.write_corpus(spans, tokenizer=tok) != a  # content spans are content
    assert len(store.corpora()) == 3


def test_text_digests_and_original_lengths_are_content_and_checked(tmp_path) -> None:
    """Two texts that give the same tokens and spans (a cut, a case-folding tokenizer) are two corpora, each with its
    own documents; a text digest that lost its chunks (read as zeros) is damage that verify names."""
    import shutil

    from hrsa.store.corpus import document_text_sha256, read_corpus_table
    from hrsa.store.verify import verify_store

    store = ActivationStore.open(tmp_path / "s", mode="a")
    tok = {"name": "t", "fingerprint": "f"}
    table = make_table()
    bare = store.write_corpus(table, tokenizer=tok)
    written = {}
    for text, longer in (("x", 0), ("y", 0), ("y", 5)):
        digested = dataclasses.replace(table, original_length=np.diff(table.doc_offsets) + longer,
                                       truncated=np.full(table.n_docs, longer > 0), text_fields=("text",),
                                       text_sha256=document_text_sha256([{"text": text}] * table.n_docs, ("text",)))
        written[text, longer] = cid = store.write_corpus(digested, tokenizer=tok)
        stored = read_corpus_table(store.group(f"corpora/{cid}"))
        assert stored.text_fields == ("text",) and np.array_equal(stored.text_sha256, digested.text_sha256)
        assert store.documents(cid)["original_length"].tolist() == digested.original_length.tolist()
    assert len({bare, *written.values()}) == 4
    cid = written["x", 0]
    shutil.rmtree(tmp_path / "s" / "corpora" / cid / "doc_text_sha256" / "c")
    problems = verify_store(ActivationStore.open(tmp_path / "s", mode="r")).problems
    assert [p.where for p in problems] == [f"corpora/{cid}"]


def test_corpora_without_content_spans_are_refused_where_spans_are_needed(store: ActivationStore) -> None:
    """Corpora stored without spans (an earlier hrsa, a slow tokenizer) read and compare as before; aligning two of
    them, or selecting tokens by field, is one line that says why."""
    from hrsa.store.errors import CorpusMismatchError, SelectionError
    from hrsa.store.selection import TokenSelection

    tok = {"name": "t", "fingerprint": "f"}
    cids = [store.write_corpus(make_table(vocab=v), tokenizer=tok) for v in (97, 89)]  # same documents, other ids
    for mid, cid in zip(("ma", "mb"), cids):
        store.create_model(mid, corpus=cid, n_hidden_states=2, hidden_size=8, dtype="float32")
    with pytest.raises(CorpusMismatchError, match=rf"ma and mb .* {cids[0]} and {cids[1]} stored without content spans") as error:
        store.token_pairs("ma", "mb")
    assert "\n" not in str(error.value)
    with pytest.raises(SelectionError, match="Expected a corpus with content spans to select tokens by field"):
        store.select("ma", TokenSelection(fields=("text",)))
    assert store.token_pairs("ma", "ma").identical

def test_a_field_no_stored_token_lies_in_is_named_with_the_cut_that_left_it_out(store: ActivationStore) -> None:
    """Documents cut at extraction's --max-tokens before their reasoning field: `--fields reasoning` said only
    "Expected at least one token after selection and filters. Got none."."""
    from hrsa.store.errors import SelectionError
    from hrsa.store.selection import TokenSelection

    table = make_table()
    cut = dataclasses.replace(table, span_fields=("prompt", "reasoning"), token_field=np.zeros(table.n_tokens, np.int16),
                              char_start=np.arange(table.n_tokens, dtype=np.int32),
                              char_end=np.arange(table.n_tokens, dtype=np.int32) + 1,
                              original_length=np.diff(table.doc_offsets) + 50, truncated=np.ones(table.n_docs, bool))
    cid = store.write_corpus(cut, tokenizer={"name": "t", "fingerprint": "f"})
    store.create_model("ma", corpus=cid, n_hidden_states=2, hidden_size=8, dtype="float32")
    with pytest.raises(SelectionError) as refused:
        store.select("ma", TokenSelection(fields=("reasoning",)))
    message = str(refused.value)
    assert f"no stored token of field reasoning" in message and f"{table.n_docs} of {table.n_docs} documents" in message
    assert "--max-tokens" in message and "\n" not in message, message
    kept = store.select("ma", TokenSelection(fields=("prompt",), exclude_first=True))  # each filter alone keeps some
    with pytest.raises(SelectionError, match="no token passes all of them"):
        store.select("ma", TokenSelection(fields=("prompt",), positions=(0, 1), exclude_first=True))
    assert kept is not None
    # Judged on the selected documents' tokens, not on the range between them (document 2, between 1 and 3, is long)
    with pytest.raises(SelectionError, match=r"Got none: --positions 100:120 keeps nothing of the selected tokens\."):
        store.select("ma", TokenSelection(docs=(1, 3), positions=(100, 120)))
    with pytest.raises(SelectionError, match="Got none: the documents lie outside the token range"):
        store.select("ma", TokenSelection(docs=(4,), tokens=(0, 100), exclude_first=True))


def test_token_and_document_tables(filled_store: ActivationStore) -> None:
    (cid,) = filled_store.corpora()
    table = filled_store.tokens(cid)
    assert list(table.columns) == ["token_id", "doc_index", "position", "is_special", "is_first"]
    assert len(table) == sum(DOC_LENGTHS)
    assert table.groupby("doc_index").size().tolist() == list(DOC_LENGTHS)
    assert (table.is_first == (table.position == 0)).all() and table.is_special.sum() == len(DOC_LENGTHS)
    docs = filled_store.documents(cid)
    assert docs.n_tokens.tolist() == list(DOC_LENGTHS) and docs.record_id.tolist()[0] == "rec-0"


def test_hidden_state_is_lazy_and_shaped(filled_store: ActivationStore) -> None:
    x = filled_store.hidden_state("m", 2)
    assert x.shape == (sum(DOC_LENGTHS), HIDDEN)
    assert x.chunks[0][0] == filled_store.model_info("m").layout.shard_tokens
    assert np.array_equal(filled_store.hidden_state("m", -1).compute(), expected_layer(filled_store, "m", LAYERS - 1))


def test_token_range_docs_and_filters(filled_store: ActivationStore) -> None:
    full = expected_layer(filled_store, "m", 1)
    offsets = np.concatenate([[0], np.cumsum(DOC_LENGTHS)])
    got = filled_store.hidden_state("m", 1, tokens=(250, 700)).compute()
    assert np.array_equal(got, full[250:700])
    got = filled_store.hidden_state("m", 1, docs=[3, 0]).compute()  # the order asked for
    assert np.array_equal(got, np.concatenate([full[offsets[3] : offsets[4]], full[: offsets[1]]]))
    got = filled_store.hidden_state("m", 1, token_filter=TokenFilter(exclude_first=True)).compute()
    keep = np.ones(len(full), bool)
    keep[offsets[:-1]] = False
    assert np.array_equal(got, full[keep])
    got = filled_store.hidden_state("m", 1, docs=[2], token_filter=TokenFilter(positions=(10, 20))).compute()
    assert np.array_equal(got, full[offsets[2] + 10 : offsets[2] + 20])
    special = filled_store.hidden_state("m", 1, token_filter=TokenFilter(exclude_special=True))
    assert special.shape[0] == len(full) - len(DOC_LENGTHS)


def test_select_resolves_a_token_selection_to_the_cheapest_form(filled_store: ActivationStore) -> None:
    offsets = np.concatenate([[0], np.cumsum(DOC_LENGTHS)])
    assert filled_store.select("m") == slice(0, sum(DOC_LENGTHS))  # everything: a slice, no table read
    contiguous = slice(int(offsets[1]), int(offsets[3]))
    assert filled_store.select("m", TokenSelection(docs=(1, 2))) == contiguous
    index = filled_store.select("m", TokenSelection(exclude_first=True, docs=(3, 0)))
    assert index.tolist() == [*range(offsets[3] + 1, offsets[4]), *range(1, offsets[1])]  # document order, no 0s
    # The keyword arguments of a read are the same selection.
    both = TokenSelection.of(tokens=(5, 600), docs=[0, 1], token_filter=TokenFilter(positions=(2, 50)))
    assert both == TokenSelection(positions=(2, 50), docs=(0, 1), tokens=(5, 600))
    got = filled_store.hidden_state("m", 1, tokens=(5, 600), docs=[0, 1], token_filter=TokenFilter(positions=(2, 50)))
    assert np.array_equal(got.compute(), expected_layer(filled_store, "m", 1)[filled_store.select("m", both)])
    assert TokenSelection().is_everything and not TokenSelection(exclude_special=True).is_everything


def test_corpus_tokens_are_the_token_ids_and_document_offsets(filled_store: ActivationStore) -> None:
    cid = filled_store.model_info("m").corpus
    tokens = filled_store.corpus_tokens(cid)
    assert tokens.doc_offsets.tolist() == [0, *np.cumsum(DOC_LENGTHS).tolist()]
    assert np.array_equal(tokens.token_ids, filled_store.tokens(cid)["token_id"].to_numpy())
    assert tokens.document(1).tolist() == tokens.token_ids[DOC_LENGTHS[0] : DOC_LENGTHS[0] + DOC_LENGTHS[1]].tolist()


def test_bad_selections_are_user_errors(filled_store: ActivationStore) -> None:
    with pytest.raises(SelectionError):
        filled_store.hidden_state("m", 1, tokens=(10, 5))
    with pytest.raises(SelectionError):
        filled_store.hidden_state("m", 1, docs=[99])
    with pytest.raises(SelectionError):
        filled_store.hidden_state("m", 1, docs=[1, 1])
    with pytest.raises(SelectionError, match="at least one token"):
        filled_store.hidden_state("m", 1, docs=[1], token_filter=TokenFilter(exclude_first=True))  # a 1-token doc
    with pytest.raises(LayerOutOfRangeError):
        filled_store.hidden_state("m", LAYERS)
    with pytest.raises(ModelNotFoundError, match="hrsa store ls"):
        filled_store.hidden_state("nope", 0)
    with pytest.raises(CorpusNotFoundError):
        filled_store.corpus_info("corpus-0000")


def test_subset_of_hidden_states(store: ActivationStore) -> None:
    new_model(store, "m", hidden_states=[0, 3])
    fill_model(store, "m")
    assert store.model_info("m").hidden_states == (0, 3)
    with pytest.raises(LayerOutOfRangeError, match=r"\[0, 3\]"):
        store.hidden_state("m", 1)


def test_incomplete_model_refuses_reads_unless_asked(store: ActivationStore) -> None:
    new_model(store, "m")
    writer = store.writer("m")
    first = writer.units()[0]
    writer.write_unit(first, {k: np.ones((first.n_tokens, HIDDEN), np.float32) for k in range(LAYERS)})
    with pytest.raises(IncompleteModelError, match="1/4 work units"):
        store.hidden_state("m", 0)
    x = store.hidden_state("m", 0, allow_incomplete=True).compute()
    assert x[: first.stop].min() == 1 and x[first.stop :].max() == 0


def test_create_model_resumes_or_refuses(store: ActivationStore) -> None:
    cid = new_model(store, "m")
    again = store.create_model("m", corpus=cid, n_hidden_states=LAYERS, hidden_size=HIDDEN, dtype="float32",
                               chunk_tokens=64, shard_tokens=256, exist_ok=True)
    assert again.id == "m"
    with pytest.raises(UserError, match="different settings"):
        store.create_model("m", corpus=cid, n_hidden_states=LAYERS, hidden_size=HIDDEN, dtype="bfloat16",
                           chunk_tokens=64, shard_tokens=256, exist_ok=True)
    with pytest.raises(UserError, match="already holds"):
        store.create_model("m", corpus=cid, n_hidden_states=LAYERS, hidden_size=HIDDEN, dtype="float32")


def test_delete_model_leaves_everything_else(filled_store: ActivationStore) -> None:
    cid = filled_store.corpora()[0]
    new_model(filled_store, "other")
    fill_model(filled_store, "other")
    filled_store.delete_model("m")
    assert filled_store.models() == ["other"] and filled_store.corpora() == [cid]
    assert np.array_equal(filled_store.hidden_state("other", 0).compute(), expected_layer(filled_store, "other", 0))
    with pytest.raises(ModelNotFoundError):
        filled_store.delete_model("m")


def test_memory_url(tmp_path) -> None:
    store = ActivationStore.open("memory://hrsa-test-memory", mode="a")
    new_model(store, "m")
    fill_model(store, "m")
    assert np.array_equal(store.hidden_state("m", 0).compute(), expected_layer(store, "m", 0))


def test_local_objects_are_read_whole_as_zarrs_store_reads_them(tmp_path, filled_store: ActivationStore, monkeypatch) -> None:
    """get_buffer reads a local store's objects itself (in the calling thread, into one array): the same bytes as
    LocalStore.get, None where there is no object (missing, a folder), a short read completed, and any other store,
    a wrapper included, through its own get."""
    import zarr.storage

    from hrsa.store import objects
    from hrsa.store.model import hidden_key
    from hrsa.store.units import shard_key

    array = filled_store.group("models/m")[hidden_key(0)]
    local = array.store_path.store
    assert type(local) is zarr.storage.LocalStore
    key = shard_key(array, 0)
    theirs = objects._sync(local.get(key, prototype=zarr.core.buffer.default_buffer_prototype())).to_bytes()
    assert objects.get_buffer(local, key).to_bytes() == theirs and len(theirs) > 1000
    assert objects.get_buffer(local, "models/m/no-such-object") is None
    assert objects.get_buffer(local, "models/m") is None  # a folder
    assert objects.get_buffer(local, f"{key}/below") is None  # below a file

    class Trickling(io.FileIO):  # a file that hands out at most 100 bytes a call, as readinto may
        calls = 0

        def readinto(self, buffer):
            Trickling.calls += 1
            return super().readinto(memoryview(buffer)[:100])

    monkeypatch.setattr(objects, "open", lambda path, *args, **kwargs: Trickling(path), raising=False)
    assert objects.get_buffer(local, key).to_bytes() == theirs
    assert Trickling.calls == -(-len(theirs) // 100)  # read here, not by Zarr's event loop
    monkeypatch.undo()
    assert not objects.get_buffer(local, key).as_numpy_array().flags.writeable  # cached verified bytes stay as read

    real_fstat = os.fstat  # a file system that reports a stale size: the object is still read whole, to EOF
    for reported in (len(theirs) - 1000, 0, len(theirs) + 1000):
        monkeypatch.setattr(os, "fstat", lambda fd, size=reported: os.stat_result((0,) * 6 + (size,) + (0,) * 3))
        assert objects.get_buffer(local, key).to_bytes() == theirs
        monkeypatch.setattr(os, "fstat", real_fstat)

    class Counting(zarr.storage.WrapperStore):  # type: ignore[type-arg]
        gets = 0

        async def get(self, *args, **kwargs):
            Counting.gets += 1
            return await self._store.get(*args, **kwargs)

    assert objects.get_buffer(Counting(local), key).to_bytes() == theirs and Counting.gets == 1


def _spanned_table(first_span: int) -> Any:
    """5 documents of 40 characters, one token a character, except that the first ``first_span`` characters of each
    are one token (another tokenizer's split of the same text)."""
    from hrsa.store.corpus import CorpusTable, document_text_sha256

    spans = [(0, first_span)] + [(i, i + 1) for i in range(first_span, 40)]
    n = 5 * len(spans)
    texts = [{"text": f"document {d} ".ljust(40, ".")} for d in range(5)]
    return CorpusTable(np.arange(n, dtype=np.int32) % 50, np.arange(6, dtype=np.int64) * len(spans), np.zeros(n, bool),
                       [f"r{d}" for d in range(5)], span_fields=("text",), token_field=np.zeros(n, np.int16),
                       char_start=np.array([a for _ in range(5) for a, _ in spans], np.int32),
                       char_end=np.array([b for _ in range(5) for _, b in spans], np.int32),
                       text_fields=("text",), text_sha256=document_text_sha256(texts, ("text",)))


def test_a_damaged_stored_alignment_is_named_by_verify_and_computed_again(tmp_path) -> None:
    """A missing chunk of a kept alignment reads as zeros (every pair's row 0): its digest tells, verify names it,
    and token_pairs computes the alignment again (and keeps it again where the store is writable)."""
    import shutil

    from hrsa.store.verify import verify_store

    store = ActivationStore.open(tmp_path / "s", mode="a")
    cids = [store.write_corpus(_spanned_table(n), tokenizer={"name": f"t{n}", "fingerprint": f"f{n}"}) for n in (1, 2)]
    for mid, cid in zip(("a", "b"), cids):
        store.create_model(mid, corpus=cid, n_hidden_states=LAYERS, hidden_size=HIDDEN, dtype="float32", chunk_tokens=16,
                           shard_tokens=64)
        fill_model(store, mid)
    pairs = store.token_pairs("a", "b")
    assert pairs.n_pairs == 5 * 38 and np.unique(pairs.rows_a).size == pairs.n_pairs
    from hrsa.store.alignment import alignment_key

    shutil.rmtree(tmp_path / "s" / "alignments" / alignment_key(*cids) / "rows_a" / "c")
    read_only = ActivationStore.open(tmp_path / "s", mode="r")
    assert [p.where for p in verify_store(read_only).problems] == [f"alignments/{alignment_key(*cids)}"]
    again = read_only.token_pairs("a", "b")
    assert np.array_equal(again.rows_a, pairs.rows_a) and np.array_equal(again.rows_b, pairs.rows_b)
    ActivationStore.open(tmp_path / "s", mode="r+").token_pairs("a", "b")  # kept again, whole
    assert verify_store(ActivationStore.open(tmp_path / "s", mode="r")).ok


def test_two_reads_of_one_hidden_state_in_one_graph_stay_apart(filled_store: ActivationStore) -> None:
    """Dask merges tasks of equal names: reads of one hidden state in other chunks must not share one."""
    import dask

    want = expected_layer(filled_store, "m", 2).astype(np.float64)
    for first, second in ((None, 64), (64, None)):
        sums = dask.compute(*(filled_store.hidden_state("m", 2, chunk_tokens=c).astype(np.float64).sum(0)
                              for c in (first, second)))
        for got in sums:
            np.testing.assert_allclose(got, want.sum(0), rtol=1e-12)


def test_a_hidden_state_whose_shape_metadata_was_forged_is_refused_not_read_short(filled_store: ActivationStore,
                                                                                  tmp_path: Path) -> None:
    """`shape: [5, D]` in a hidden state's zarr.json: `hrsa store get` wrote 5 rows with exit 0 (the model has more),
    and an analysis failed on a traceback."""
    from click.testing import CliRunner

    from hrsa.cli import cli
    from hrsa.store import CorruptDataError
    from hrsa.store.model import hidden_key

    meta = Path(filled_store.url) / "models" / "m" / hidden_key(1) / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"] = [5, doc["shape"][1]]
    meta.write_text(json.dumps(doc))
    with pytest.raises(CorruptDataError, match=r"Expected .*models/m/.* of shape \(\d+, \d+\) \(tokens, hidden size\)\. "
                                               r"Got \(5, \d+\) instead"):
        filled_store.hidden_state("m", 1)
    result = CliRunner().invoke(cli, ["store", "get", filled_store.url, "m", "--layer", "1", "--out",
                                      str(tmp_path / "x.npy")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "of shape" in result.stderr, result.output
    assert not (tmp_path / "x.npy").exists()
