"""Streamed reads (CheckedArray.streamed): a hidden state read forward block by block, one block's bytes of a shard
held instead of the whole shard, every value from bytes whose chunks' crc32c matched, and every shard compared whole
with its done record (size and xxh3) when its last row is read or when the reader closes.

The fault matrix attacks what that moves: a shard's values are folded before its whole-object check, so every fault
must surface as the one-line CorruptDataError by close() at the latest, wherever the reads start and stop."""

from __future__ import annotations

import os
import shutil
import sys
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hrsa.store import ActivationStore
from hrsa.store.errors import CorruptDataError
from hrsa.store.model import hidden_key
from hrsa.store.reading import ReadScratch
from hrsa.store.testing import expected_layer, fill_model, new_model
from hrsa.store.units import shard_key

from .conftest import Target


def read_forward(array, start: int, stop: int, block: int, reuse: bool = False) -> np.ndarray:
    """Rows start:stop read forward in blocks through one streamed reader, closed at the end. ``reuse``: into arrays
    the reader keeps (ReadScratch), each read's values checked still as read after the next read."""
    rows = array.streamed(ReadScratch() if reuse else None)
    parts, before = [], None
    for a in range(start, stop, block):
        got = rows[a : min(a + block, stop)]
        if before is not None:  # the read before this one, as a pass folds it while it reads ahead
            np.testing.assert_array_equal(before[0].view(np.uint8), before[1].view(np.uint8))
        parts.append(got.copy())
        before = (got, parts[-1])
    rows.close()
    return np.concatenate(parts)


def test_reads_into_kept_arrays_reuse_two_by_turns() -> None:
    """What makes reading page-fault free (next test): the third read's values are in the first read's array."""
    store = ActivationStore.open("memory://turns", mode="w-")
    new_model(store, "m")
    fill_model(store, "m")
    rows = store.hidden_state_array("m", 1).streamed(ReadScratch())
    first, second, third = rows[0:64], rows[64:128], rows[128:192]
    rows.close()
    assert np.shares_memory(first, third) and not np.shares_memory(first, second)
    np.testing.assert_array_equal(third, expected_layer(store, "m", 1)[128:192])


FAULTS_PER_PAGE = """
import resource
import numpy as np
from hrsa.runtime.resident import map_large_allocations
from hrsa.store import ActivationStore
from hrsa.store.reading import ReadScratch
from hrsa.store.testing import make_table

assert map_large_allocations()  # as every analysis sets it: blocks of 1 MB and more mapped, returned when freed
store = ActivationStore.open({path!r}, mode="a")
cid = store.write_corpus(make_table((16384,)), tokenizer={{"name": "t", "fingerprint": "f"}}, source="t")
store.create_model("big", corpus=cid, n_hidden_states=1, hidden_size=512, dtype="float32", codec="none",
                   chunk_tokens=256, shard_tokens=4096)
writer = store.writer("big")
for unit in writer.pending_units():
    writer.write_unit(unit, {{0: np.ones((unit.n_tokens, 512), dtype=np.float32)}})
for reuse in (False, True):
    rows = store.hidden_state_array("big", 0).streamed(ReadScratch() if reuse else None)
    rows[0:2048], rows[2048:4096]  # the first blocks: any arrays kept are made here
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for a in range(4096, 16384, 1024):  # 2 MB blocks
        rows[a : a + 1024]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    rows.close()
    print(faults / (12288 * 512 * 4 / 4096))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ
                    or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""),
                    reason="the analysis's allocator setting is glibc's, and the environment has set it")
def test_reads_into_kept_arrays_fault_in_no_pages(tmp_path) -> None:
    """Measured: minor page faults per 4 kB page of values read, in a fresh process with the analysis's allocator
    setting. A new array per read faults every page in, twice (its bytes, its values); reading into kept arrays
    (ReadScratch), none after the first blocks."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", FAULTS_PER_PAGE.format(path=str(tmp_path / "store"))],
                         capture_output=True, text=True, check=True).stdout.split()
    fresh, kept = (float(v) for v in out)
    assert fresh >= 1.0, f"fresh arrays should fault their pages in (the measurement's control): {fresh:.2f} a page"
    assert kept < 0.05, f"{kept:.2f} faults a page read into kept arrays"


@pytest.mark.parametrize("reuse", [False, True], ids=["new arrays", "kept arrays"])
@pytest.mark.parametrize(("dtype", "codec"), [("float32", "none"), ("bfloat16", "zstd-1"), ("float32", "blosc-lz4-shuffle")])
def test_streamed_reads_equal_the_stored_values_whatever_the_blocks(store: ActivationStore, dtype: str, codec: str,
                                                                    reuse: bool) -> None:
    new_model(store, "m", dtype=dtype, codec=codec)
    fill_model(store, "m")
    array = store.hidden_state_array("m", 2)
    want = expected_layer(store, "m", 2)
    # Blocks of whole chunks, of parts of chunks (a block starts inside the chunk the one before ended in), of whole
    # shards and more; reads that start and stop inside a shard (the segments of a pass split by workers).
    for block in (64, 100, 128, 37, 256, 1000):
        for start, stop in ((0, 1000), (37, 1000), (300, 700), (0, 1)):
            np.testing.assert_array_equal(read_forward(array, start, stop, block, reuse).view(np.uint8),
                                          want[start:stop].view(np.uint8))


def test_a_read_behind_the_stream_is_served_from_the_whole_shard(filled_store: ActivationStore) -> None:
    array = filled_store.hidden_state_array("m", 1)
    want = expected_layer(filled_store, "m", 1)
    rows = array.streamed()
    np.testing.assert_array_equal(rows[0:200], want[0:200])
    np.testing.assert_array_equal(rows[10:20], want[10:20])  # behind what the stream has read: a whole-shard read
    np.testing.assert_array_equal(rows[200:256], want[200:256])
    rows.close()


def _unit_shard(store: ActivationStore, layer: int, unit: int) -> Path:
    array = store.group("models/m")[hidden_key(layer)]
    return Path(str(store.url)) / shard_key(array, unit)


def _flip(offset: Callable[[int], int]) -> Callable[[Path, Path], None]:
    def fault(shard: Path, other: Path) -> None:
        data = bytearray(shard.read_bytes())
        data[offset(len(data))] ^= 0x40
        shard.write_bytes(bytes(data))
    return fault


FAULTS: dict[str, Callable[[Path, Path], None]] = {
    "a value's byte flipped in the first chunk": _flip(lambda n: 10),
    "a value's byte flipped in the last chunk": _flip(lambda n: n - 200),
    "a byte of the index flipped": _flip(lambda n: n - 20),
    "the index's checksum flipped": _flip(lambda n: n - 2),
    "another unit's shard put in its place (every checksum valid)": lambda shard, other: shutil.copyfile(other, shard),
    "truncated": lambda shard, other: shard.write_bytes(shard.read_bytes()[:-100]),
    "cut to its first half": lambda shard, other: shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2]),
    "grown by a byte": lambda shard, other: shard.write_bytes(shard.read_bytes() + b"\0"),
    "deleted": lambda shard, other: shard.unlink(),
}

#: Forward reads of unit 1's shard (tokens 256-511): all of it, its start only, its end only, a span inside it.
READS = {"whole": (256, 512), "its first rows": (256, 300), "its last rows": (400, 512), "inside": (300, 400),
         "across units": (100, 700)}


@pytest.fixture(scope="module")
def pristine_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One filled store for the whole matrix, built once; each case damages a copy of it (copying is ~100x faster
    than writing it again, and the 180 cases each built their own before)."""
    path = tmp_path_factory.mktemp("pristine") / "store"
    store = ActivationStore.open(path, mode="a")
    new_model(store, "m")
    fill_model(store, "m")
    return path


@pytest.fixture
def copied_store(pristine_store: Path, tmp_path: Path) -> ActivationStore:
    shutil.copytree(pristine_store, tmp_path / "store")
    return ActivationStore.open(tmp_path / "store", mode="a")


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("read", sorted(READS))
@pytest.mark.parametrize(("block", "reuse"), [(64, False), (50, False), (64, True), (50, True)])
def test_every_fault_of_a_shard_is_one_line_by_close_wherever_the_reads_start_and_stop(copied_store: ActivationStore,
                                                                                       fault: str, read: str, block: int,
                                                                                       reuse: bool) -> None:
    store = copied_store
    FAULTS[fault](_unit_shard(store, 1, 1), _unit_shard(store, 1, 2))
    array = store.hidden_state_array("m", 1)
    start, stop = READS[read]
    with pytest.raises(CorruptDataError) as error:
        read_forward(array, start, stop, block, reuse)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "Expected an intact shard 1 in" in message and "hrsa store verify" in message


def test_a_shard_is_checked_when_its_last_row_is_read_not_later(filled_store: ActivationStore) -> None:
    """A substituted shard (checksums valid) fails at the read of its last row: a pass that reads on has not folded
    the next shard's values by then."""
    shutil.copyfile(_unit_shard(filled_store, 1, 2), _unit_shard(filled_store, 1, 1))
    rows = filled_store.hidden_state_array("m", 1).streamed()
    rows[256:448]  # noqa: B018: its rows decode (their chunks are intact), the shard is not whole yet
    with pytest.raises(CorruptDataError, match="xxh3 differs"):
        rows[448:512]


@pytest.mark.parametrize("where", ["first chunk", "last chunk"])
def test_a_damaged_chunk_fails_as_it_is_decoded_before_the_shard_is_whole(filled_store: ActivationStore, where: str) -> None:
    """A flipped value byte fails its chunk's crc32c on the read that decodes it: the damaged values are never
    handed out, whole-object check or not."""
    shard = _unit_shard(filled_store, 1, 1)
    data = bytearray(shard.read_bytes())
    data[10 if where == "first chunk" else 3 * 64 * 24 * 4 + 40] ^= 0x40  # inside chunk 0, or inside chunk 3 (of 4)
    shard.write_bytes(bytes(data))
    rows = filled_store.hidden_state_array("m", 1).streamed()
    if where == "last chunk":
        np.testing.assert_array_equal(rows[256:448], expected_layer(filled_store, "m", 1)[256:448])  # chunks 0-2 intact
    with pytest.raises(CorruptDataError, match="checksum"):
        rows[448:512] if where == "last chunk" else rows[256:320]


def test_the_other_states_and_shards_read_on_unharmed(filled_store: ActivationStore) -> None:
    FAULTS["another unit's shard put in its place (every checksum valid)"](_unit_shard(filled_store, 1, 1),
                                                                          _unit_shard(filled_store, 1, 2))
    for layer in (0, 2):
        np.testing.assert_array_equal(read_forward(filled_store.hidden_state_array("m", layer), 0, 1000, 128),
                                      expected_layer(filled_store, "m", layer))
    np.testing.assert_array_equal(read_forward(filled_store.hidden_state_array("m", 1), 512, 1000, 128),
                                  expected_layer(filled_store, "m", 1)[512:])


def test_a_stream_holds_one_blocks_bytes_where_a_whole_shard_read_holds_the_shard(tmp_path) -> None:
    """Measured with tracemalloc: reading a shard of 4 MB forward in blocks of 128 tokens (256 KB) peaks at the
    shard's size through whole-shard reads and at a few blocks through a stream."""
    from hrsa.store.testing import make_table

    store = ActivationStore.open(tmp_path / "store", mode="a")
    cid = store.write_corpus(make_table((2048,)), tokenizer={"name": "t", "fingerprint": "f"}, source="t")
    store.create_model("big", corpus=cid, n_hidden_states=1, hidden_size=512, dtype="float32", codec="none",
                       chunk_tokens=64, shard_tokens=2048)
    writer = store.writer("big")
    rng = np.random.default_rng(0)
    for unit in writer.pending_units():
        writer.write_unit(unit, {0: rng.standard_normal((unit.n_tokens, 512), dtype=np.float32)})
    shard_bytes = 2048 * 512 * 4

    def peak(read: Callable[[], None]) -> int:
        tracemalloc.start()
        try:
            read()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def whole() -> None:
        array = store.hidden_state_array("big", 0)
        for a in range(0, 2048, 128):
            array[a : a + 128]

    def streamed() -> None:
        rows = store.hidden_state_array("big", 0).streamed()
        for a in range(0, 2048, 128):
            rows[a : a + 128]
        rows.close()

    assert peak(whole) >= shard_bytes
    assert peak(streamed) < shard_bytes / 4
    # Between blocks a stream holds what streamed_bound counts (its index, and the chunk a block ended inside), not the
    # last block's bytes: blocks of 100 tokens end inside chunks of 64.
    from hrsa.store.reading import streamed_bound

    bound = streamed_bound(shard_tokens=2048, chunk_tokens=64, row_bytes=512 * 4, readers=1)
    rows = store.hidden_state_array("big", 0).streamed()
    rows[0:1]  # noqa: B018: the shard's record and codec read, the stream open
    tracemalloc.start()
    held = []
    for a in range(1, 2000, 100):
        rows[a : a + 100]
        held.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.stop()
    rows.close()
    assert 0 < max(held) <= bound and max(held) < 100 * 512 * 4  # a chunk, not the block just read


@pytest.fixture(scope="module", params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def filled_target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Target:
    """One filled store per backend for the backend matrix (filling one on moto costs ~2 s); each case damages unit
    1's shard of state 1 and puts its bytes back after."""
    if request.param == "local":
        target = Target(str(tmp_path_factory.mktemp("backend") / "store"), None, {})
    else:
        options = {"endpoint_url": request.getfixturevalue("s3_endpoint"), "key": "testing", "secret": "testing"}
        target = Target(f"s3://hrsa-test/streamed-{uuid.uuid4().hex[:8]}", options, {})
    store = target.open("a")
    new_model(store, "m")
    fill_model(store, "m")
    return target


@pytest.mark.parametrize("reuse", [False, True], ids=["new arrays", "kept arrays"])
@pytest.mark.parametrize("fault", ["none", "substituted", "truncated", "grown", "deleted"])
def test_streamed_reads_on_each_backend(filled_target: Target, fault: str, reuse: bool) -> None:
    """The same on S3 (ranged GETs, moto) as on a local path: values equal, and a substituted, truncated, grown or
    deleted shard object is the one-line error by close() at the latest."""
    from hrsa.store.objects import delete_key, get_bytes, put_bytes

    store = filled_target.open("r+")
    array = store.group("models/m")[hidden_key(1)]
    objects, key = array.store_path.store, shard_key(array, 1)
    data, other = get_bytes(objects, key), get_bytes(objects, shard_key(array, 2))
    damaged = {"none": data, "substituted": other, "truncated": data[:-50], "grown": data + b"\0", "deleted": None}[fault]
    try:
        if damaged is None:
            delete_key(objects, key)
        elif damaged != data:
            put_bytes(objects, key, damaged)
        reader = filled_target.open("r").hidden_state_array("m", 1)
        if fault == "none":
            np.testing.assert_array_equal(read_forward(reader, 30, 1000, 100, reuse), expected_layer(store, "m", 1)[30:])
            return
        with pytest.raises(CorruptDataError, match="Expected an intact shard 1 in"):
            read_forward(reader, 300, 400, 64, reuse)
    finally:
        put_bytes(objects, key, data)  # the next case starts from the intact store


def test_decoding_into_an_array_of_the_wrong_shape_is_a_callers_error_not_a_damaged_shard(filled_store) -> None:
    """ShardStream.rows turns a codec's ValueError into "damaged shard": a wrong ``out`` must not read as one."""
    from hrsa.store.shard_encoding import ShardCodec

    array = filled_store.group("models/m")[hidden_key(1)]
    codec = ShardCodec.of(array, 0)
    with pytest.raises(TypeError, match="to decode into"):
        codec.rows(None, None, 0, 10, out=np.empty((10, array.shape[1]), dtype=np.float64))
