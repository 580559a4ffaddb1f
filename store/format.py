"""Store format version 4: layout constants, dtypes as stored, chunk and shard sizing, codecs.

Layout (one Zarr v3 group)::

    <root>/                       attrs {"hrsa": {"format_version": 4}}
      corpora/<cid>/              token table: token_ids, doc_index, position, is_special (N,); content spans
                                  token_field, char_start, char_end (N,) and attrs span_fields (corpus.py)
                                  documents: doc_offsets (n_docs+1,), doc_record_id, doc_truncated,
                                  doc_original_length (n_docs,); doc_text_sha256 (n_docs, fields, 32) and
                                  attrs text_fields: each document's text digest, field by field
      models/<mid>/               attrs {"hrsa": ModelInfo fields}, written last (one create-if-absent object)
        hidden/<k>                one hidden state, (N, D), chunked along tokens, sharded: one shard per unit
        claims/<u>/<attempt>      raw JSON objects: who is writing unit u, until when (unit_records.py)
        done/<u>                  raw JSON object: unit u's manifest; its existence makes the unit done
        leases/<token>            raw JSON objects: an extraction (or a deletion, a reset) holding the whole model (units.py)
      results/<run>/              metric outputs
      alignments/<cidA>--<cidB>/  rows_a, rows_b (M,): tokens of two corpora with equal content spans
                                  (alignment.py; made on first use, so absent from stores that never needed one)

Corpora stored before content spans were kept have no span arrays: they read and compare as before, and a use
of spans (``--fields``, aligning two tokenizers) is refused in one line. Corpora stored before text digests were
kept read and compare as before too, and aligning one with another is refused in one line (nothing tells that
their documents hold the same text). Format 1 kept a (n_units,) uint8 ``units`` array of done flags instead of claims and done records; ``hrsa store
upgrade`` turns a format-1 store into the current one (done records from the flags).

This module knows the format, not the math or the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from zarr.abc.codec import BytesBytesCodec

__all__ = [
    "FORMAT_VERSION",
    "ATTRS_KEY",
    "STORED_DTYPES",
    "CODEC_PRESETS",
    "DEFAULT_CODEC",
    "Layout",
    "choose_layout",
    "codec_chain",
    "storage_dtype",
    "as_logical",
    "as_storage",
]

# 4: corpora hold each document's text digests and original length in their ids (hrsa before format 4 would
# recompute such an id without them and call the corpus damaged). 3 -> 4 raises the version only: a format-3 corpus,
# without digests, keeps its id and reads (it is not aligned with another tokenizer's corpus: re-extract for that).
# 3: done records list one hash a shard, its xxh3 (format 2 listed a sha256 beside it, which hrsa before format 3
# requires: it would call every record of a format-3 store unreadable, and `verify --reset-damaged` would delete the
# units). 2 -> 3 raises the version only; format 2's records are read as they are. 1 -> 2: done records.
FORMAT_VERSION = 4
ATTRS_KEY = "hrsa"  # every hrsa attribute lives under this one key of a node's attributes

# Logical dtype -> numpy dtype written to Zarr. Zarr v3 has no bfloat16, so bf16 is kept as its raw
# uint16 bit pattern and flagged by the model's "dtype" attribute; it is never cast to fp16, whose
# 65,504 maximum LLM activations exceed.
STORED_DTYPES: dict[str, str] = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}

# Candidate codecs, measured by benchmarks/store_io.py on real hidden states. Byte shuffling groups
# the high (sign/exponent) bytes of every value, the only part of an activation that compresses.
CODEC_PRESETS: dict[str, dict[str, object] | None] = {
    "none": None,
    "zstd-1": {"kind": "zstd", "level": 1},
    "zstd-3": {"kind": "zstd", "level": 3},
    "blosc-lz4-shuffle": {"kind": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "shuffle"},
    "blosc-zstd-1-shuffle": {"kind": "blosc", "cname": "zstd", "clevel": 1, "shuffle": "shuffle"},
    "blosc-zstd-1-bitshuffle": {"kind": "blosc", "cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"},
}
# Chosen by measured write throughput (benchmarks/extract.py's codec table: real SmolLM2 activations encoded
# shard by shard as a unit's write encodes them, hashes included, against the bare forward pass on 2 CPU cores).
# float32 (CPU extraction): activations' mantissas are noise, so the best preset saves 9% of the bytes (zstd-1,
# 1.09x) for 8% of the forward pass's CPU, which alone breaks the 5% that extraction may add to the forward
# passes; none costs 4% (crc32c and the hashes), and decoding is free for every later read. bfloat16 (GPU
# extraction) keeps zstd-1: 1.28x smaller at ~360 MB/s a thread (benchmarks/store_io.py: ~0.8 s/GB decode), where
# the forward runs on the GPU and the CPU cores are free. Reading never looks here: each array's zarr.json names
# its codec, so stores written under another default read and resume as they were written.
DEFAULT_CODEC: dict[str, str] = {"float32": "none", "float16": "zstd-1", "bfloat16": "zstd-1"}

_CHUNK_BYTES = 1 << 20  # ~1 MiB inner chunks: cheap partial reads, good compression blocks
_SHARD_BYTES = 32 << 20  # ~32 MiB shards: few objects on S3, and one unit's buffer stays small


@dataclass(frozen=True)
class Layout:
    """How one model's (N, D) hidden states are cut: tokens per inner chunk and per shard (= unit)."""

    chunk_tokens: int
    shard_tokens: int

    def n_units(self, n_tokens: int) -> int:
        return max(1, -(-n_tokens // self.shard_tokens))

    def unit_range(self, index: int, n_tokens: int) -> tuple[int, int]:
        start = index * self.shard_tokens
        return start, min(start + self.shard_tokens, n_tokens)


def _floor_pow2(x: float) -> int:
    return 1 << max(0, int(np.floor(np.log2(max(x, 1.0)))))


def choose_layout(
    hidden_size: int,
    dtype: str,
    *,
    chunk_tokens: int | None = None,
    shard_tokens: int | None = None,
) -> Layout:
    """Pick power-of-two token counts so a chunk is ~1 MiB and a shard ~32 MiB, unless given.

    The shard is always a whole number of chunks, as Zarr's sharding codec requires.
    """
    row_bytes = hidden_size * np.dtype(STORED_DTYPES[dtype]).itemsize
    chunk = chunk_tokens or max(16, _floor_pow2(_CHUNK_BYTES / row_bytes))
    if shard_tokens and not chunk_tokens:
        chunk = min(chunk, shard_tokens)  # a small unit asked for is one chunk, not rounded up to the default
    shard = shard_tokens or max(chunk, _floor_pow2(_SHARD_BYTES / row_bytes))
    shard = max(chunk, shard // chunk * chunk)
    return Layout(chunk_tokens=chunk, shard_tokens=shard)


def codec_chain(preset: str, dtype: str) -> list[BytesBytesCodec]:
    """Zarr compressors for one inner chunk: the preset's compressor, then a crc32c checksum.

    The checksum sits after compression so that a flipped bit anywhere in the stored bytes is caught
    on read, before decompression can turn it into plausible-looking numbers.
    """
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    spec = CODEC_PRESETS[preset]
    chain: list[BytesBytesCodec] = []
    if spec is not None and spec["kind"] == "zstd":
        chain.append(ZstdCodec(level=int(spec["level"])))  # type: ignore[call-overload]
    elif spec is not None:
        typesize = np.dtype(STORED_DTYPES[dtype]).itemsize
        chain.append(
            BloscCodec(
                cname=spec["cname"], clevel=spec["clevel"], shuffle=spec["shuffle"], typesize=typesize
            )  # type: ignore[arg-type]
        )
    chain.append(Crc32cCodec())
    return chain


def storage_dtype(dtype: str) -> np.dtype:
    return np.dtype(STORED_DTYPES[dtype])


def as_storage(values: object, dtype: str) -> np.ndarray:
    """Bring a numpy array or torch tensor of the model's dtype to the dtype written to Zarr, bit for bit."""
    if hasattr(values, "detach"):  # a torch tensor: view bf16 as its uint16 bits before leaving torch
        import torch

        tensor = values.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.uint16)
        values = tensor.numpy()
    array = np.asarray(values)
    if dtype == "bfloat16":
        import ml_dtypes

        if array.dtype == ml_dtypes.bfloat16:
            return array.view(np.uint16)
        if array.dtype == np.uint16:
            return array
        raise TypeError(f"Expected bfloat16 values (torch.bfloat16, ml_dtypes.bfloat16 or their uint16 bits). Got {array.dtype} instead.")
    if array.dtype != np.dtype(dtype):
        raise TypeError(f"Expected {dtype} values for a {dtype} model. Got {array.dtype} instead.")
    return array


def as_logical(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Undo :func:`as_storage`: a view, no copy, no rounding."""
    if dtype == "bfloat16":
        import ml_dtypes

        return stored.view(ml_dtypes.bfloat16)
    return stored
