"""encode_shard gives the bytes Zarr itself writes for a shard, for every codec preset and stored dtype: whole
shards, and the last shard with a padded edge chunk and chunks past the array's end (not stored); decode_rows reads
back what Zarr reads, a chunk not stored as the fill value, and refuses a chunk whose checksum fails."""

from __future__ import annotations

import numpy as np
import pytest
from hrsa.store import ActivationStore
from hrsa.store.format import CODEC_PRESETS, as_storage
from hrsa.store.model import hidden_key
from hrsa.store.objects import get_bytes
from hrsa.store.shard_encoding import decode_rows, encode_shard
from hrsa.store.testing import HIDDEN, make_table, unit_values
from hrsa.store.units import shard_key


def empty_array(tmp_path, codec: str, dtype: str):
    """One hidden state of 600 tokens in shards of 512 (unit 1 holds 88: one chunk, one partial) and chunks of 64."""
    store = ActivationStore.open(tmp_path / "store", mode="a")
    cid = store.write_corpus(make_table((300, 1, 299)), tokenizer={"name": "t", "fingerprint": "f"}, source="t")
    store.create_model("m", corpus=cid, n_hidden_states=1, hidden_size=HIDDEN, dtype=dtype, codec=codec,
                       chunk_tokens=64, shard_tokens=512)
    return store.group("models/m")[hidden_key(0)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("codec", sorted(CODEC_PRESETS))
def test_encoded_shard_equals_zarrs_own(tmp_path, codec: str, dtype: str) -> None:
    array = empty_array(tmp_path, codec, dtype).with_config({"write_empty_chunks": True})
    for unit, (start, stop) in enumerate([(0, 512), (512, 600)]):
        values = as_storage(unit_values(unit, start, stop, 0, dtype), dtype)
        array[start:stop] = values  # Zarr's own encoding
        assert encode_shard(array, unit, values) == get_bytes(array.store_path.store, shard_key(array, unit))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("codec", sorted(CODEC_PRESETS))
def test_decoded_rows_equal_zarrs_reads(tmp_path, codec: str, dtype: str) -> None:
    array = empty_array(tmp_path, codec, dtype)
    values = np.concatenate([as_storage(unit_values(u, a, b, 0, dtype), dtype) for u, (a, b) in enumerate([(0, 512), (512, 600)])])
    values[128:192] = 0  # an inner chunk of fill values: Zarr does not store it
    array[:] = values
    shard = np.frombuffer(get_bytes(array.store_path.store, shard_key(array, 0)), dtype=np.uint8)
    for lo, hi in [(0, 512), (5, 6), (60, 70), (100, 300), (511, 512)]:  # in a chunk, across chunks, the empty one
        np.testing.assert_array_equal(decode_rows(array, 0, shard, lo, hi).view(np.uint8), array[lo:hi].view(np.uint8))
        np.testing.assert_array_equal(decode_rows(array, 0, shard, lo, hi, verified=True).view(np.uint8),
                                      array[lo:hi].view(np.uint8))
    last = np.frombuffer(get_bytes(array.store_path.store, shard_key(array, 1)), dtype=np.uint8)
    np.testing.assert_array_equal(decode_rows(array, 1, last, 0, 88).view(np.uint8), array[512:600].view(np.uint8))
    forged = shard.copy()
    forged[10] ^= 1  # a flipped bit in the first chunk's values
    with pytest.raises(ValueError, match="checksum"):
        decode_rows(array, 0, forged, 0, 8)


def test_values_of_another_shape_are_refused(filled_store: ActivationStore) -> None:
    array = filled_store.group("models/m")[hidden_key(0)]
    with pytest.raises(ValueError, match="Expected shard 0's values"):
        encode_shard(array, 0, np.zeros((10, HIDDEN), np.float32))


def test_a_model_stored_under_the_former_default_codec_reads_and_resumes(tmp_path) -> None:
    """float32 stores were zstd-1 before the default became none: the codec lives in each array's zarr.json, so such
    a model reads back, and a resumed extraction writes its missing units with that codec, not the new default."""
    from hrsa.store.format import DEFAULT_CODEC
    from hrsa.store.testing import LAYERS, expected_layer, fill_model, new_model
    from hrsa.store.verify import verify_store

    assert DEFAULT_CODEC["float32"] == "none"
    store = ActivationStore.open(tmp_path / "store", mode="a")
    new_model(store, "m", codec="zstd-1")
    writer = store.writer("m")
    for unit in writer.units()[:2]:
        writer.write_unit(unit, {k: unit_values(unit.index, unit.start, unit.stop, k, "float32") for k in range(LAYERS)})
    reopened = ActivationStore.open(tmp_path / "store", mode="r+")
    fill_model(reopened, "m")  # the resume
    array = reopened.group("models/m")[hidden_key(0)]
    assert [type(c).__name__ for c in array.metadata.codecs[0].codecs] == ["BytesCodec", "ZstdCodec", "Crc32cCodec"]
    assert reopened.model_info("m").codec == "zstd-1"
    for k in range(LAYERS):
        assert np.array_equal(reopened.hidden_state("m", k).compute(), expected_layer(reopened, "m", k))
    assert verify_store(reopened).ok


def test_checked_reads_decode_the_verified_bytes_directly_through_dask_too(filled_store: ActivationStore, monkeypatch) -> None:
    """Slices of done units, as a pass reads them and as Dask asks (rows, slice(0, D)), are cut from the verified shard
    bytes by decode_rows, and equal what Zarr itself reads."""
    from hrsa.store import reading

    decoded: list[int] = []
    real = reading.decode_rows
    monkeypatch.setattr(reading, "decode_rows", lambda array, unit, *rest, **kw: decoded.append(unit) or real(array, unit, *rest, **kw))
    info = filled_store.model_info("m")
    stored = filled_store.group("models/m")[hidden_key(0)][:]
    want = np.asarray(filled_store.hidden_state("m", 0).compute())  # warm: every shard read once
    decoded.clear()
    via_dask = np.asarray(filled_store.hidden_state("m", 0, chunk_tokens=100).compute())
    assert len(decoded) >= -(-info.n_tokens // 100)  # every Dask block decoded directly
    one = filled_store.hidden_state_array("m", 0)[37 : info.n_tokens - 5]
    for got in (via_dask, want):
        np.testing.assert_array_equal(got.view(np.uint8), stored.view(np.uint8))
    np.testing.assert_array_equal(one.view(np.uint8), stored[37 : info.n_tokens - 5].view(np.uint8))


@pytest.mark.parametrize("endian", ["little", "big"])
def test_a_chain_of_bytes_alone_decodes_as_zarr_reads_it(tmp_path, endian: str) -> None:
    """A shard whose chunks carry no checksum (a store written by another tool): decoded without Zarr's per-chunk
    calls, in either byte order, the fill value where a chunk is not stored."""
    import zarr
    from zarr.codecs import BytesCodec

    array = zarr.create_array(tmp_path / "plain.zarr", shape=(600, 8), chunks=(64, 8), shards=(512, 8), dtype="float32",
                              compressors=None, serializer=BytesCodec(endian=endian), fill_value=-1.5)
    values = np.arange(600 * 8, dtype=np.float32).reshape(600, 8) / 7
    values[128:192] = -1.5  # the fill value: not stored
    array[:] = values
    assert [type(c).__name__ for c in array.metadata.codecs[0].codecs] == ["BytesCodec"]
    shard = np.frombuffer(get_bytes(array.store_path.store, "c/0/0"), dtype=np.uint8)
    for lo, hi in [(0, 512), (60, 70), (100, 300)]:
        np.testing.assert_array_equal(decode_rows(array, 0, shard, lo, hi), array[lo:hi])
        np.testing.assert_array_equal(decode_rows(array, 0, shard, lo, hi, verified=True), values[lo:hi])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("codec", ["none", "zstd-1"])
def test_a_unit_written_stores_zarrs_own_bytes_and_hashes_them(tmp_path, codec: str, dtype: str) -> None:
    """write_unit stores each shard as its encoded pieces (no joined copy on a local path): the object is Zarr's own
    bytes, and the done record's xxh3 is the hash of those bytes."""
    from hrsa.store.unit_records import xxh3

    array = empty_array(tmp_path, codec, dtype).with_config({"write_empty_chunks": True})
    store = ActivationStore.open(tmp_path / "store", mode="r+")
    writer = store.writer("m")
    for unit in writer.units():
        values = as_storage(unit_values(unit.index, unit.start, unit.stop, 0, dtype), dtype)
        assert writer.write_unit(unit, {0: values})
        stored = get_bytes(array.store_path.store, shard_key(array, unit.index))
        array[unit.start : unit.stop] = values  # Zarr's own encoding, over it
        assert stored == get_bytes(array.store_path.store, shard_key(array, unit.index))
        (record,) = writer.record(unit).shards.values()
        assert record.xxh3 == xxh3(stored) and record.size == len(stored)


def test_writing_a_unit_holds_no_joined_copy_of_a_shard(tmp_path) -> None:
    """Uncompressed float32 (a CPU extraction's default): the shard's chunks are views of the values, so writing it
    takes no copy of them; joining them into one object first held the whole shard again (and, on a GPU worker's
    14 writing threads, 14 shards of fresh pages). Measured with tracemalloc, which sees numpy's and bytes' memory."""
    import tracemalloc

    store = ActivationStore.open(tmp_path / "store", mode="a")
    cid = store.write_corpus(make_table((4096,)), tokenizer={"name": "t", "fingerprint": "f"}, source="t")
    store.create_model("m", corpus=cid, n_hidden_states=1, hidden_size=256, dtype="float32", codec="none",
                       chunk_tokens=256, shard_tokens=4096)
    writer = store.writer("m")
    (unit,) = writer.units()
    values = np.random.default_rng(0).standard_normal((4096, 256), dtype=np.float32)  # 4 MB
    writer.write_unit(unit, {0: values})  # warm: imports, codec objects
    writer.reset_unit(unit)
    tracemalloc.start()
    try:
        assert writer.write_unit(unit, {0: values})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < values.nbytes / 4, f"peak {peak / 1e6:.1f} MB while writing a {values.nbytes / 1e6:.1f} MB shard"


def test_a_shard_whose_write_fails_leaves_the_object_before_it_and_no_partial_file(tmp_path, monkeypatch) -> None:
    """The pieces go to a temporary file renamed over the key: a failure before the rename (a full disk, here the
    rename itself) leaves what was at the key whole, and no temporary file behind."""
    import pathlib

    from hrsa.store.objects import put_pieces

    from zarr.storage import LocalStore

    zarr_store = LocalStore(tmp_path / "objects")
    put_pieces(zarr_store, "x/0", [memoryview(b"old "), memoryview(b"object")])
    assert get_bytes(zarr_store, "x/0") == b"old object"

    def refused(self, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "replace", refused)
    with pytest.raises(OSError, match="No space"):
        put_pieces(zarr_store, "x/0", [memoryview(b"new "), memoryview(b"bytes")])
    monkeypatch.undo()
    assert get_bytes(zarr_store, "x/0") == b"old object"
    assert sorted(p.name for p in (tmp_path / "objects" / "x").iterdir()) == ["0"]
