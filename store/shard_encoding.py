"""One whole shard object of a hidden-state array, encoded (and rows of it decoded) in the calling thread with the
array's own codecs.

A unit writes every stored hidden state's shard whole. Going through ``array[start:stop] = values`` costs about
five copies of the values on Zarr's event-loop thread (each inner chunk filled, assigned, checksummed by
concatenation, the shard combined, the bytes copied again to hash them): for SmolLM2's 31 states that was most
of a unit's write time, and it ran on threads the worker cannot schedule. Here the shard is built from the same
codec objects Zarr reads it with (the sharding codec's inner chain and index chain, taken from the array's
metadata, so any preset encodes as Zarr would), chunk by chunk, and joined once; the caller hashes and stores
the bytes. ``tests/store/test_shard_encoding.py`` checks the bytes equal Zarr's own for every preset.

Reading back, :func:`decode_rows` cuts rows out of a shard's bytes already in memory (verified whole by the reader)
with the same codec objects: a streaming pass reads a block of each of ~60 hidden states, and Zarr's path (an
event-loop round trip and a task per inner chunk) cost more than the decoding itself. It equals Zarr's reads for
every preset (the same test file).

Layout of a shard (Zarr v3 sharding codec): the inner chunks that hold data, in Morton order, each encoded by
the inner chain (bytes, compressor, crc32c); then the index, (offset, length) uint64 per chunk in C order, with
(2**64-1, 2**64-1) for a chunk not stored, encoded by the index chain (bytes, crc32c). Only the last unit can
cover part of its shard: its last inner chunk is padded with the fill value, chunks past the array's end are
not stored, as Zarr does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import zarr

__all__ = ["ShardCodec", "decode_rows", "encode_shard", "encode_shard_pieces"]

_EMPTY = 2**64 - 1  # an index entry of a chunk that is not stored


def encode_shard(array: zarr.Array, unit: int, values: np.ndarray) -> bytes:
    """The bytes of shard ``unit`` of a (N, D) array sharded along tokens, holding ``values`` (n, D) from token
    ``unit * shard_tokens`` on (n = shard_tokens, or fewer for the array's last shard): :func:`encode_shard_pieces`
    joined.

    Raises:
        ValueError: ``values`` does not fill the shard up to the array's end, or the array is not sharded.
    """
    return b"".join(encode_shard_pieces(array, unit, values))


def encode_shard_pieces(array: zarr.Array, unit: int, values: np.ndarray) -> list[memoryview]:
    """The bytes of shard ``unit`` (see :func:`encode_shard`) as pieces in order, not joined: a writer stores and
    hashes them one after another. Joining cost a copy of the shard (a quarter of its encoding time with zstd-1, and
    the only copy of an uncompressed one, whose pieces are views of ``values``)."""
    from zarr.codecs import ShardingCodec
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.indexing import morton_order_iter

    sharding = array.metadata.codecs[0]
    if len(array.metadata.codecs) != 1 or not isinstance(sharding, ShardingCodec):
        raise ValueError(f"Expected an array sharded along tokens. Got codecs {array.metadata.codecs} instead.")
    shard_tokens, chunk_tokens = array.metadata.chunk_grid.chunk_shape[0], sharding.chunk_shape[0]
    start = unit * shard_tokens
    if values.shape != (min(shard_tokens, array.shape[0] - start), array.shape[1]):
        raise ValueError(f"Expected shard {unit}'s values of the array's shape {array.shape}. Got {values.shape}.")
    shard_spec = array.metadata.get_chunk_spec((unit, 0), array.async_array.config, default_buffer_prototype())
    chunk_spec = sharding._get_chunk_spec(shard_spec)  # the spec Zarr encodes inner chunks with)
    chunks_per_shard = shard_tokens // chunk_tokens
    index = np.full((chunks_per_shard, 1, 2), _EMPTY, dtype="<u8")  # (offset, length) per chunk, C order
    pieces: list[Any] = []
    offset = 0
    for coords in morton_order_iter((chunks_per_shard, 1)):
        rows = values[coords[0] * chunk_tokens : (coords[0] + 1) * chunk_tokens]
        if len(rows) == 0:
            continue  # past the array's end: not stored
        encoded = _encode_chunk(sharding.codecs, _padded(rows, chunk_tokens, chunk_spec.fill_value), chunk_spec)
        pieces += encoded
        size = sum(len(piece) for piece in encoded)
        index[coords] = (offset, size)
        offset += size
    index_spec = sharding._get_index_chunk_spec((chunks_per_shard, 1))
    return [*pieces, *_encode_chunk(sharding.index_codecs, index, index_spec)]


def decode_rows(array: zarr.Array, unit: int, shard: np.ndarray, lo: int, hi: int, *, verified: bool = False) -> np.ndarray:
    """Rows ``lo:hi`` (counted from the shard's first token) of shard ``unit`` of a (N, D) array sharded along tokens,
    decoded from the shard's bytes ``shard`` (uint8): only the inner chunks those rows fall in, each through the
    array's inner codec chain, a chunk not stored as the fill value. Returns a new (hi - lo, D) array of the stored
    dtype. A crc32c in the chain is checked as Zarr checks it, unless ``verified``: the whole object's bytes already
    matched their recorded xxh3, so a chunk's crc32c can tell nothing more.

    Raises:
        ValueError: a chunk's checksum does not match, or the array is not sharded with its index at the end.
    """
    codec = ShardCodec.of(array, unit, verified=verified)
    index = codec.decode_index(shard[len(shard) - codec.index_size :])
    return codec.rows(index, lambda offset, length: shard[offset : offset + length], lo, hi)


@dataclass(frozen=True)
class ShardCodec:
    """How a shard of a (N, D) array sharded along tokens, index at the end, is decoded: its index (chunks x 1 x
    (offset, length), a chunk not stored at offset 2**64 - 1) and its chunks, through the array's codecs."""

    chunk_tokens: int
    index_size: int
    width: int
    dtype: np.dtype
    fill_value: Any
    decode_index: Callable[[np.ndarray], np.ndarray]
    decode_chunk: Callable[[np.ndarray], np.ndarray]

    @classmethod
    def of(cls, array: zarr.Array, unit: int, *, verified: bool = False) -> ShardCodec:
        """The codec of shard ``unit``; crc32c codecs checked unless ``verified`` (see :func:`decode_rows`).

        Raises:
            ValueError: the array is not sharded along tokens with its index at the end.
        """
        from zarr.codecs import ShardingCodec
        from zarr.codecs.sharding import ShardingCodecIndexLocation
        from zarr.core.buffer import default_buffer_prototype

        sharding = array.metadata.codecs[0]
        if (len(array.metadata.codecs) != 1 or not isinstance(sharding, ShardingCodec)
                or sharding.index_location != ShardingCodecIndexLocation.end):
            raise ValueError(f"Expected an array sharded along tokens, index at the end. Got codecs {array.metadata.codecs}.")
        shard_tokens, chunk_tokens = array.metadata.chunk_grid.chunk_shape[0], sharding.chunk_shape[0]
        per_shard = (shard_tokens // chunk_tokens, 1)
        index_spec = sharding._get_index_chunk_spec(per_shard)
        chunk_spec = sharding._get_chunk_spec(
            array.metadata.get_chunk_spec((unit, 0), array.async_array.config, default_buffer_prototype()))
        return cls(chunk_tokens, sharding._shard_index_size(per_shard), array.shape[1], array.dtype, chunk_spec.fill_value,
                   _chunk_decoder(sharding.index_codecs, index_spec, verified),
                   _chunk_decoder(sharding.codecs, chunk_spec, verified))

    def rows(self, index: np.ndarray, chunk_bytes: Callable[[int, int], np.ndarray], lo: int, hi: int,
             out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``lo:hi`` of the shard, in ``out`` ((hi - lo, width) of the stored dtype) or a new array;
        ``chunk_bytes(offset, length)``: a stored chunk's bytes."""
        size = self.chunk_tokens
        if out is None:
            out = np.empty((hi - lo, self.width), dtype=self.dtype)
        elif out.shape != (hi - lo, self.width) or out.dtype != self.dtype:  # a caller's mistake, not the shard's
            raise TypeError(f"Expected {(hi - lo, self.width)} {self.dtype} to decode into. Got {out.shape} {out.dtype} instead.")
        for c in range(lo // size, -(-hi // size)):
            first, last = max(lo, c * size), min(hi, (c + 1) * size)  # rows of chunk c wanted
            offset, length = (int(v) for v in index[c, 0])
            if offset == _EMPTY:
                out[first - lo : last - lo] = self.fill_value
                continue
            values = self.decode_chunk(chunk_bytes(offset, length))  # (chunk_tokens, D)
            out[first - lo : last - lo] = values[first - c * size : last - c * size]
        return out

    def stored_span(self, index: np.ndarray, lo: int, hi: int) -> tuple[int, int] | None:
        """The bytes ``(start, stop)`` that hold the chunks of rows ``lo:hi``, None where none of them is stored."""
        entries = index[lo // self.chunk_tokens : -(-hi // self.chunk_tokens), 0]
        stored = entries[entries[:, 0] != _EMPTY]
        if not len(stored):
            return None
        return int(stored[:, 0].min()), int((stored[:, 0] + stored[:, 1]).max())


def _chunk_decoder(codecs: tuple[Any, ...], spec: Any, verified: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """Encoded chunks (uint8) of one spec back through a codec chain, synchronously, as :func:`_encode_chunk` encoded
    them (a crc32c codec only strips its 4 bytes when the bytes are ``verified``), the codecs' specs resolved once.
    Uncompressed chunks (a chain of bytes alone, or bytes and a crc32c whose shard was ``verified``) are views of
    their bytes in the stored dtype, as Zarr's ``BytesCodec`` makes them, without its per-chunk calls (~0.1 ms a chunk:
    a 1,024-token block of 62 states was 0.6 s of a 1.7 s decode)."""
    from zarr.codecs import BytesCodec, Crc32cCodec
    from zarr.core.buffer import default_buffer_prototype

    crc = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
    if verified and crc:
        codecs = codecs[:-1]
    if len(codecs) == 1 and isinstance(codecs[0], BytesCodec):
        dtype = codecs[0]._decode_sync(default_buffer_prototype().buffer.from_bytes(b""), replace(spec, shape=(0,))).dtype
        shape, trim = spec.shape, 4 if verified and crc else 0
        return lambda data: np.frombuffer(data[: len(data) - trim], dtype=dtype).reshape(shape)

    specs = []
    for codec in codecs:  # the spec each codec saw when encoding
        specs.append(spec)
        spec = codec.resolve_metadata(spec)
    prototype = default_buffer_prototype()

    def decode(data: np.ndarray) -> np.ndarray:
        if verified and crc:
            data = data[:-4]
        buffer: Any = prototype.buffer.from_array_like(data)
        for codec, codec_spec in zip(reversed(codecs), reversed(specs)):
            buffer = codec._decode_sync(buffer, codec_spec)  # private, but every codec of the presets has it
        return buffer.as_numpy_array()

    return decode


def _padded(rows: np.ndarray, chunk_tokens: int, fill_value: Any) -> np.ndarray:
    """An edge chunk is stored whole, its rows past the array's end holding the fill value (as Zarr stores it)."""
    if len(rows) == chunk_tokens:
        return np.ascontiguousarray(rows)
    chunk = np.full((chunk_tokens, rows.shape[1]), fill_value, dtype=rows.dtype)
    chunk[: len(rows)] = rows
    return chunk


def _encode_chunk(codecs: tuple[Any, ...], values: np.ndarray, spec: Any) -> list[memoryview]:
    """One chunk through a codec chain (array-to-bytes, then bytes-to-bytes), synchronously: its pieces, in order.

    A trailing crc32c is its own 4-byte piece: Zarr's codec appends it by copying the whole chunk (``np.append``),
    and the shard's join copies every piece once anyway. For the uncompressed preset the chunk's bytes are then a
    view of ``values`` until that join, one copy in all where there were two (benchmarks/extract.py, (f))."""
    import google_crc32c
    from zarr.codecs import Crc32cCodec
    from zarr.core.buffer import default_buffer_prototype

    checksum = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
    data: Any = default_buffer_prototype().nd_buffer.from_numpy_array(values)
    for codec in codecs[:-1] if checksum else codecs:
        data = codec._encode_sync(data, spec)  # private, but every codec of the presets has it
        spec = codec.resolve_metadata(spec)
    body = data.as_numpy_array()
    if not checksum:
        return [memoryview(body)]
    crc = np.array([google_crc32c.value(body)], dtype="<u4")  # as Zarr's codec appends it
    return [memoryview(body), memoryview(crc.view("B"))]
