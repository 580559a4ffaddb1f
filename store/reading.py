"""Reading a hidden state through Zarr without trusting what is (not) there.

:class:`CheckedArray` is what :meth:`ActivationStore.hidden_state` wraps in Dask. A done unit's shard is decoded
only from bytes whose size and xxh3 (of the whole object) are those its done record lists: Zarr would read a
missing shard's fill values (zeros) as data, and another shard of the same byte count as this one.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.storage import WrapperStore

from hrsa.store.errors import CorruptDataError
from hrsa.store.format import as_logical
from hrsa.store.objects import get_buffer, get_range, object_size
from hrsa.store.shard_encoding import ShardCodec, decode_rows
from hrsa.store.unit_records import ShardRecord, differs, size_problem
from hrsa.store.units import array_through, checked_record, recorded_shard, shard_key

if TYPE_CHECKING:
    import zarr
    from zarr.abc.store import ByteRequest
    from zarr.core.buffer import Buffer, BufferPrototype

__all__ = ["CheckedArray", "ReadScratch", "ShardStream", "StreamedRows", "cache_bound", "streamed_bound"]

#: Verified shard objects kept per array at most, so that Dask blocks smaller than a shard cost no second GET when
#: several threads read blocks of neighbouring shards at once; a shard whose rows have all been read is dropped at
#: once (``CheckedArray._read_whole``). The analysis plan counts the bound (:func:`cache_bound`).
CACHED_SHARDS = 4


class _ShardMismatch(Exception):
    """A shard object that is not the bytes its done record lists."""


class _VerifiedShards(WrapperStore):  # type: ignore[type-arg]
    """A store that serves each listed shard object from one whole-object GET whose size and xxh3 match.

    Zarr's sharding codec asks for byte ranges (the index, then each inner chunk); every range of a listed key is
    cut from verified bytes, so nothing decoded was not checked first. Other keys (metadata, shards of units not
    done) pass through. :meth:`load` fetches and checks a shard in the reading thread, once however many Dask
    blocks of it are read at once; a shard evicted meanwhile is fetched and checked again here.
    """

    def __init__(self, store: Any, expected: dict[str, ShardRecord]) -> None:
        super().__init__(store)
        self._expected = expected  # shared with the CheckedArray that fills it from the done records
        self._cache: OrderedDict[str, Buffer] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def _with_store(self, store: Any) -> _VerifiedShards:
        return type(self)(store, self._expected)

    def __getstate__(self) -> dict[str, Any]:  # pickled to Dask or Ray workers: no locks, no cached bytes
        return {"_store": self._store, "_expected": self._expected}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_store"], state["_expected"])  # type: ignore[misc]

    def load(self, key: str) -> None:
        """Fetch and check shard ``key`` unless it is cached. Raises _ShardMismatch."""
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            if self._cached(key) is None:
                self._remember(key, _checked(key, get_buffer(self._store, key), self._expected[key]))

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        expected = self._expected.get(key)
        if expected is None:
            return await self._store.get(key, prototype, byte_range)
        buffer = self._cached(key)
        if buffer is None:
            buffer = await asyncio.to_thread(_checked, key, await self._store.get(key, prototype), expected)
            self._remember(key, buffer)
        return _cut(buffer, byte_range)

    def cached_bytes(self, key: str) -> np.ndarray | None:
        """Shard ``key``'s verified bytes (uint8) if cached (:meth:`load` put them there), else None."""
        buffer = self._cached(key)
        return None if buffer is None else buffer.as_numpy_array()

    def forget(self, key: str) -> None:
        """Drop shard ``key`` from the cache: its reader has read its last rows."""
        with self._lock:
            self._cache.pop(key, None)

    def _cached(self, key: str) -> Buffer | None:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
            return self._cache.get(key)

    def _remember(self, key: str, buffer: Buffer) -> None:
        with self._lock:
            self._cache[key] = buffer
            while len(self._cache) > CACHED_SHARDS:
                self._cache.popitem(last=False)


def streamed_bound(*, shard_tokens: int, chunk_tokens: int, row_bytes: int, readers: int) -> int:
    """The most bytes one array's streamed readers (:class:`StreamedRows`, one per reader) hold between blocks: each
    open shard's index, and the chunk a block ended inside (kept for the next block), one shard open per reader
    (a shard closes when its last row is read), and the piece being hashed where no block asked for the bytes (a
    segment that starts or stops inside a shard reads them a chunk's worth at a time). A block's bytes beside its
    decoded values are a read's own buffers, counted apart by the plan: held while the block is read, or between
    blocks in a :class:`ReadScratch` (one block's bytes of the largest state, for all of a segment's readers).

    Example:
        >>> streamed_bound(shard_tokens=8192, chunk_tokens=256, row_bytes=576 * 4, readers=1)  # the shard: 19 MB
        1193112
    """
    chunk = _chunk_bound(chunk_tokens * row_bytes)
    index = 16 * -(-shard_tokens // chunk_tokens) + 4
    return readers * (index + 2 * chunk + 1024)


def _chunk_bound(raw_bytes: int) -> int:
    """The most bytes a chunk of ``raw_bytes`` values takes stored (codecs do not grow activations by more than 1%)."""
    return raw_bytes * 101 // 100 + 64


def cache_bound(*, shard_tokens: int, chunk_tokens: int, n_tokens: int, row_bytes: int, readers: int,
                block_tokens: int = 0, every_block: bool = False) -> int:
    """The most bytes one array's reader holds in shard objects, each at most a whole shard's raw values (codecs do
    not grow activations by more than 1%) plus its index and each chunk's checksum and codec header.

    Blocks of exactly one shard (``block_tokens == shard_tokens``) read each shard once and drop it at once: one
    shard per concurrent reader. Other blocks, read forward by each reader: a shard stays until all its rows are
    read, so a reader keeps at most the shard it is in and the next (a block may straddle both), up to
    ``CACHED_SHARDS`` in all, and fetches one more. One reader that reads every block of the grid in order
    (``every_block``: no block skipped by the selection, no segment starting inside a shard that another reader
    finishes) reads every row of each shard, so a shard is dropped as soon as the block that ends it is read: it
    holds the shard it is in, and the next while a block straddles both; with blocks that divide the shard, none
    straddles, and it holds one.

    Example:
        >>> cache_bound(shard_tokens=256, chunk_tokens=64, n_tokens=10_000, row_bytes=64, readers=1)
        53481
        >>> cache_bound(shard_tokens=256, chunk_tokens=64, n_tokens=10_000, row_bytes=64, readers=1, block_tokens=256)
        17827
        >>> cache_bound(shard_tokens=256, chunk_tokens=64, n_tokens=10_000, row_bytes=64, readers=1, every_block=True)
        35654
        >>> cache_bound(shard_tokens=256, chunk_tokens=64, n_tokens=10_000, row_bytes=64, readers=1, every_block=True,
        ...             block_tokens=128)
        17827
        >>> cache_bound(shard_tokens=65_536, chunk_tokens=64, n_tokens=100, row_bytes=64, readers=1)  # one short shard
        7616
    """
    shards = -(-n_tokens // shard_tokens)
    rows = min(shard_tokens, n_tokens)  # an array shorter than a shard stores only its own chunks
    one = rows * row_bytes * 101 // 100 + 64 * (-(-rows // chunk_tokens)) + 1024
    if block_tokens == shard_tokens:
        held = readers
    elif every_block and readers == 1:
        held = 1 if block_tokens and shard_tokens % block_tokens == 0 else 2  # a block never straddles two shards
    else:
        held = min(CACHED_SHARDS, 2 * readers) + readers
    return min(shards, held) * one


def _checked(key: str, buffer: Buffer | None, expected: ShardRecord) -> Buffer:
    """``buffer`` if it holds the shard object ``expected`` lists (size and whole-object xxh3), hashed in place.
    Raises _ShardMismatch."""
    problem = expected.problem(None if buffer is None else memoryview(buffer.as_numpy_array()))
    if problem or buffer is None:
        raise _ShardMismatch(key, problem)
    return buffer


def _cut(buffer: Buffer, byte_range: ByteRequest | None) -> Buffer:
    """The bytes of ``buffer`` a byte range asks for, as a view."""
    size = len(buffer)
    if byte_range is None:
        return buffer
    if isinstance(byte_range, RangeByteRequest):
        return buffer[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return buffer[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return buffer[max(0, size - byte_range.suffix) :]
    raise TypeError(f"Unexpected byte range {byte_range!r}")


class ShardStream:
    """One done shard of a hidden state read forward, block by block, holding one block's bytes instead of the
    whole object: what a streaming pass reads (:meth:`CheckedArray.streamed`).

    Each block's rows come from one ranged read of the bytes that hold its chunks, decoded with their crc32c checked
    (a damaged chunk fails before its values are used); the whole object's size and xxh3 (sha256 for older records)
    are computed as the ranges go by, and :meth:`close` reads what no block asked for and compares them with the done
    record. So a shard that is another unit's, stale or substituted (valid crc32c, wrong bytes) is found when the
    stream closes: its values have been folded by then, and the pass must not return before every stream it opened
    has closed (:meth:`StreamedRows.close`).
    """

    def __init__(self, store: Any, key: str, codec: Any, record: ShardRecord, scratch: ReadScratch | None = None) -> None:
        import hashlib

        import xxhash

        self._store, self._key, self._codec, self._record = store, key, codec, record
        self._scratch = scratch  # where a block's bytes are read (None: a new array each block)
        self._hash = xxhash.xxh3_64() if record.checksum[0] == "xxh3" else hashlib.sha256()
        self._data_end = record.size - codec.index_size  # where the chunks end and the index begins
        # The index and one byte more: an object longer than its record (bytes appended) is caught here, for free.
        index_bytes = self._read(self._data_end, record.size + 1) if self._data_end >= 0 else None
        if index_bytes is None or len(index_bytes) != codec.index_size:
            raise _ShardMismatch(key, size_problem(object_size(store, key), record.size))
        self._index_bytes = index_bytes
        try:
            self._index = codec.decode_index(index_bytes)  # its crc32c checked
        except ValueError as error:
            raise _ShardMismatch(key, f"shard index unreadable ({error})") from None
        self._hashed = 0  # bytes of the object hashed so far, from its start
        self._piece, self._piece_start = np.empty(0, dtype=np.uint8), 0  # the last range read, kept for the next block
        self.closed = False

    def rows(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """Rows ``lo:hi`` of the shard (in ``out`` when given: (hi - lo, D) of the stored dtype), or None where they lie
        before what the stream has read (read them otherwise)."""
        span = self._codec.stored_span(self._index, lo, hi)
        if span is not None:
            start, stop = span
            if stop > self._data_end:
                self._damaged("shard index points past its chunks")
            if start < self._piece_start:
                return None  # before the bytes kept (chunks out of order): the caller reads the whole shard instead
            if stop > self._hashed:  # the kept piece ends where the hash is: keep its part from start, read the rest
                self._hash_up_to(start)
                kept = self._piece[start - self._piece_start :] if start < self._hashed else self._piece[:0]
                self._piece, self._piece_start = self._read_piece(kept, stop), start
        try:
            values = self._codec.rows(self._index, self._chunk, lo, hi, out)
        except ValueError as error:  # a chunk's crc32c: the bytes are damaged
            raise _ShardMismatch(self._key, f"chunk checksum mismatch ({error})") from None
        self._keep_last_chunk(hi)
        return values

    def _keep_last_chunk(self, hi: int) -> None:
        """Keep of the piece only the chunk the next block may start in (none where this block ended a chunk)."""
        size = self._codec.chunk_tokens
        offset = int(self._index[(hi - 1) // size, 0, 0]) if hi % size else None
        if offset is None or not self._piece_start <= offset < self._piece_start + len(self._piece):
            self._piece, self._piece_start = np.empty(0, dtype=np.uint8), self._hashed
        else:  # a copy: a view would keep the whole block's bytes alive between blocks
            self._piece, self._piece_start = self._piece[offset - self._piece_start :].copy(), offset

    def close(self) -> None:
        """Hash what no block asked for and compare the whole object with its done record. Raises _ShardMismatch."""
        if self.closed:
            return
        self._hash_up_to(self._data_end)
        hashed = self._hash.copy()  # a second close compares again: it never passes what the first one failed
        hashed.update(self._index_bytes)
        self._piece = np.empty(0, dtype=np.uint8)
        name, digest = self._record.checksum
        if hashed.hexdigest() != digest:
            size = object_size(self._store, self._key)
            problem = size_problem(size, self._record.size) if size != self._record.size else differs(name)
            raise _ShardMismatch(self._key, problem)
        self.closed = True

    def _chunk(self, offset: int, length: int) -> np.ndarray:
        start = offset - self._piece_start
        if start < 0 or start + length > len(self._piece):
            self._damaged("shard index points outside the bytes read")
        return self._piece[start : start + length]

    def _hash_up_to(self, stop: int) -> None:
        """Hash the bytes from what is hashed up to ``stop``, read in pieces and dropped."""
        codec = self._codec
        piece = _chunk_bound(codec.chunk_tokens * codec.width * codec.dtype.itemsize)  # what streamed_bound counts
        while self._hashed < stop:
            self._take(self._hashed, min(stop, self._hashed + piece))

    def _read_piece(self, kept: np.ndarray, stop: int) -> np.ndarray:
        """``kept`` (the bytes of the chunk the block before ended inside, or none) followed by the bytes from what is
        hashed up to ``stop``, read and hashed: in the scratch when there is one (``kept`` is never in it: the piece
        kept between blocks is a copy, see :meth:`_keep_last_chunk`)."""
        if self._scratch is None:
            fresh = self._take(self._hashed, stop)
            return np.concatenate([kept, fresh]) if len(kept) else fresh
        piece = self._scratch.bytes(len(kept) + stop - self._hashed)
        piece[: len(kept)] = kept
        self._take(self._hashed, stop, out=piece[len(kept) :])
        return piece

    def _take(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Read bytes ``start:stop`` (``start`` is what is hashed so far; into ``out`` when given) and hash them."""
        data = get_range(self._store, self._key, start, stop, out)
        if data is None or len(data) != stop - start:
            self._damaged(size_problem(object_size(self._store, self._key), self._record.size))
        self._hash.update(data)
        self._hashed = stop
        return data

    def _read(self, start: int, stop: int) -> np.ndarray | None:
        return get_range(self._store, self._key, start, stop)

    def _damaged(self, problem: str) -> NoReturn:
        raise _ShardMismatch(self._key, problem)


class ReadScratch:
    """Arrays that streamed readers reuse read after read, where each read would otherwise get new ones: the bytes of
    a block's chunks (one array, for every reader of one thread) and, per reader, two arrays its values go in by turns.

    A new array per read costs a page fault per 4 kB page it is written to, for the kernel to map and zero: the
    analysis has glibc map large arrays on their own so that freeing them returns their memory
    (:func:`~hrsa.runtime.resident.map_large_allocations`), so every block's bytes and values were fresh pages. Reading
    (e)'s 62 states of D = 576 float32 a block of 1,024 tokens at a time ran at 0.7 GB/s with 1.3 million faults a
    pass over them, at 2.5 GB/s with 72 thousand with these arrays kept (an AMD EPYC VM; benchmarks/analyze.py (e)).
    Local stores read straight into the scratch; other stores' responses are copied into it.

    Not thread-safe: one per reading thread.
    """

    def __init__(self) -> None:
        self._bytes = np.empty(0, dtype=np.uint8)

    def bytes(self, n: int) -> np.ndarray:
        """``n`` bytes to read into, valid until the next call (the one array, grown when too small)."""
        if self._bytes.size < n:
            self._bytes = np.empty(n, dtype=np.uint8)
        return self._bytes[:n]


class _Turns:
    """Two arrays a reader's values go in by turns, so that a read's values stay as read until the read after next."""

    def __init__(self) -> None:
        self._arrays: list[np.ndarray | None] = [None, None]
        self._turn = 0

    def next(self, rows: int, width: int, dtype: np.dtype) -> np.ndarray:
        self._turn ^= 1
        held = self._arrays[self._turn]
        if held is None or held.shape[0] < rows or held.shape[1] != width or held.dtype != dtype:
            held = self._arrays[self._turn] = np.empty((rows, width), dtype=dtype)
        return held[:rows]


class StreamedRows:
    """A hidden state read forward by slices of rows, each done shard through a :class:`ShardStream` (one block's
    bytes held, not the shard's); slices a stream cannot serve (rows before what it has read, shards not done) are
    read as :class:`CheckedArray` reads them. :meth:`close` verifies every shard opened and not yet closed: a
    shard's stream also closes as soon as its last row is read.

    With a :class:`ReadScratch`, a block's bytes are read into the scratch and its values decoded into two arrays this
    reader keeps, by turns: the values a slice returns are overwritten by the slice after next (a pass folds one block
    while it reads the next, then drops it).
    """

    def __init__(self, array: CheckedArray, scratch: ReadScratch | None = None) -> None:
        self._array = array
        self._streams: dict[int, ShardStream] = {}
        self._scratch = scratch
        self._turns = _Turns() if scratch is not None else None

    def __getitem__(self, rows: slice) -> np.ndarray:
        array = self._array
        start, stop, step = rows.indices(array.shape[0])
        size = array._shard_tokens
        units = range(start // size, -(-stop // size))
        if step != 1 or stop <= start or not all(array._done[u] for u in units):
            return array[rows]
        array._check_records(rows)  # each shard's done record read once: what its stream must match
        stored = array._stored
        out = None if self._turns is None else self._turns.next(stop - start, stored.shape[1], stored.dtype)
        parts = []
        for u in units:
            lo, hi = max(start, u * size) - u * size, min(stop, (u + 1) * size) - u * size
            into = None if out is None else out[u * size + lo - start : u * size + hi - start]
            try:
                stream = self._streams.get(u) or self._open(u)
                part = stream.rows(lo, hi, into)
                if hi == min(size, array.shape[0] - u * size):  # its last row: verify it now, hold nothing of it
                    self._streams.pop(u).close()
            except _ShardMismatch as error:
                self._streams.pop(u, None)
                raise array._damaged(u, error.args[1]) from None
            if part is None:
                return array[rows]
            parts.append(part)
        values = out if out is not None else parts[0] if len(parts) == 1 else np.concatenate(parts)
        return as_logical(values, array._dtype)

    def close(self) -> None:
        """Verify the shards still open (their rest read and hashed). Raises CorruptDataError."""
        while self._streams:
            unit, stream = self._streams.popitem()
            try:
                stream.close()
            except _ShardMismatch as error:
                raise self._array._damaged(unit, error.args[1]) from None

    def _open(self, unit: int) -> ShardStream:
        array = self._array
        key = shard_key(array._stored, unit)
        stream = ShardStream(array._stored.store_path.store, key, ShardCodec.of(array._stored, unit), array._expected[key],
                             self._scratch)
        self._streams[unit] = stream
        return stream


class CheckedArray:
    """A Zarr array seen in the model's dtype, read only through done records and verified shard bytes.

    Dask indexes it like an array (``from_array``); it pickles, so Ray workers can read from it.
    """

    def __init__(self, array: zarr.Array, dtype: str, where: str, *, done: np.ndarray, shard_tokens: int,
                 model_prefix: str, layer: int, settings: str) -> None:
        self._stored, self._dtype, self._where = array, dtype, where
        self._done, self._shard_tokens = done, shard_tokens
        self._model_prefix, self._layer, self._settings = model_prefix, layer, settings
        self._expected: dict[str, ShardRecord] = {}  # done shards whose record was read: a record is read once
        self._shards = _VerifiedShards(array.store_path.store, self._expected)
        self._array = array_through(array, self._shards)
        self._lock = threading.Lock()  # Dask's threads read blocks of one shard at once: one of them reads its record
        self._rows_read: dict[str, int] = {}  # per shard, rows read by slices since it was last dropped from the cache
        self.shape, self.ndim = array.shape, array.ndim
        self.dtype = as_logical(np.empty(0, array.dtype), dtype).dtype

    @property
    def where(self) -> str:
        """The store and array this reads, as error messages name it."""
        return self._where

    def _units(self, selection: Any) -> np.ndarray:
        """The shards (work units) a selection's rows fall in."""
        rows = selection[0] if isinstance(selection, tuple) else selection
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(self.shape[0])
            return np.arange(start // self._shard_tokens, -(-stop // self._shard_tokens))
        return np.unique(np.asarray(rows).reshape(-1) // self._shard_tokens)

    def _check_records(self, selection: Any) -> list[str]:
        """Each done unit the selection touches must have an intact record of this model's settings listing its
        shard of this hidden state; the record's size and xxh3 are then what the shard's bytes must match.

        One record read per shard (one GET on S3), the first time a read touches it. Returns the done shards' keys.
        """
        done = [u for u in self._units(selection).tolist() if self._done[u]]
        unseen = [u for u in done if shard_key(self._stored, u) not in self._expected]
        with self._lock:
            for u in unseen:
                key = shard_key(self._stored, u)
                if key in self._expected:
                    continue
                try:
                    record = checked_record(self._stored.store_path.store, self._model_prefix, u, self._settings)
                    self._expected[key] = recorded_shard(self._stored, self._model_prefix, self._layer, record)
                except ValueError as error:
                    raise self._damaged(u, str(error)) from None
        return [shard_key(self._stored, u) for u in done]

    def _read_whole(self, selection: Any) -> list[str]:
        """The shards whose rows slices have now read as many times as they hold rows (in any order, as Dask's threads
        read a shard's blocks); index selections count nothing (k-NN samples rows, and may come back)."""
        rows = selection[0] if isinstance(selection, tuple) else selection
        if not isinstance(rows, slice):
            return []
        start, stop, _ = rows.indices(self.shape[0])
        done = []
        with self._lock:
            for u in range(start // self._shard_tokens, -(-stop // self._shard_tokens)):
                lo, hi = u * self._shard_tokens, min((u + 1) * self._shard_tokens, self.shape[0])
                key = shard_key(self._stored, u)
                self._rows_read[key] = self._rows_read.get(key, 0) + min(hi, stop) - max(lo, start)
                if self._rows_read[key] >= hi - lo:
                    done.append(key)
                    del self._rows_read[key]
        return done

    def _decoded(self, selection: Any) -> np.ndarray | None:
        """Rows of a slice of done units cut from their verified shard bytes in this thread (no round trip through
        Zarr's event loop: :func:`~hrsa.store.shard_encoding.decode_rows`); None where Zarr reads instead (index
        selections, units not done, a shard evicted from the cache meanwhile)."""
        rows, rest = (selection[0], selection[1:]) if isinstance(selection, tuple) else (selection, ())
        whole = (0, self.shape[1], 1)  # Dask asks for every column as slice(0, D)
        if not isinstance(rows, slice) or any(not isinstance(r, slice) or r.indices(self.shape[1]) != whole for r in rest):
            return None
        start, stop, step = rows.indices(self.shape[0])
        if step != 1 or stop <= start:
            return None
        parts, size = [], self._shard_tokens
        for u in range(start // size, -(-stop // size)):
            shard = self._shards.cached_bytes(shard_key(self._stored, u)) if self._done[u] else None
            if shard is None:
                return None
            lo, hi = max(start, u * size) - u * size, min(stop, (u + 1) * size) - u * size
            parts.append(decode_rows(self._stored, u, shard, lo, hi, verified=True))  # xxh3-checked whole by load
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def streamed(self, scratch: ReadScratch | None = None) -> StreamedRows:
        """This array read forward by slices, holding one block's bytes of each shard instead of the whole shard: what
        one segment of a streaming pass reads. Its values are checked as they are decoded (each chunk's crc32c) and
        each shard whole when its last row is read or at :meth:`StreamedRows.close`, which the reader must call before
        anything computed from the values leaves it. With ``scratch``, reads reuse arrays (see :class:`StreamedRows`:
        a slice's values last until the slice after next)."""
        return StreamedRows(self, scratch)

    def _damaged(self, unit: int, problem: str) -> CorruptDataError:
        return CorruptDataError(
            f"Expected an intact shard {unit} in {self._where} (its unit is done). Got: {problem}. "
            "Run `hrsa store verify --reset-damaged` to list and reset the damaged units, then re-extract them."
        )

    def __getstate__(self) -> dict[str, Any]:  # pickled to Ray or Dask workers: a lock does not travel
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_array", "_shards", "_rows_read")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._shards = _VerifiedShards(self._stored.store_path.store, self._expected)
        self._array = array_through(self._stored, self._shards)
        self._lock = threading.Lock()
        self._rows_read = {}

    def __getitem__(self, selection: Any) -> np.ndarray:
        try:
            keys = self._check_records(selection)
            for key in keys:
                self._shards.load(key)
            decoded = self._decoded(selection)
            values = as_logical(self._array[selection] if decoded is None else decoded, self._dtype)
            for key in self._read_whole(selection):  # every row of these shards was read: they are done with
                self._shards.forget(key)
            return values
        except _ShardMismatch as error:
            key, problem = error.args
            raise self._damaged(int(key.split("/")[-2]), problem) from None
        except ValueError as error:
            if "checksum" not in str(error):
                raise
            raise CorruptDataError(
                f"Expected intact chunks in {self._where}. Got a checksum mismatch instead ({error}). "
                "Run `hrsa store verify` to list the damaged shards, then re-extract them."
            ) from error

