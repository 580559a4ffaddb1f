"""Training-step benchmark: samples/s per worker, and what the chunked (GradCache) backward costs.

Run (from the repository root):

    .venv/bin/python benchmarks/train.py                                   # a small random Llama built here, CPU
    .venv/bin/python benchmarks/train.py --quick                           # smoke size (~15 s)
    .venv/bin/python benchmarks/train.py --model packaged:all-minilm-l6-v2 # a real model (folder, .gguf, packaged:)

What it measures, side by side in one process (one worker's share of a step; no Ray, no all-reduce):

(a) a plain contrastive step: queries and their [pos, neg] documents embedded in one forward each, InfoNCE,
    one backward, an AdamW step;
(b) the same step with the chunked backward (``chunk_size`` sequences per forward: a no-grad pass, the
    loss, then a second forward per chunk with the cached embedding gradients).

Reported: median seconds per step of both, samples/s per worker (queries per second), the overhead ratio
(b)/(a) (about 4/3 when the backward costs twice a forward: one extra forward), and the peak RSS of each
(Linux resets the high-water mark before each mode via /proc/self/clear_refs; elsewhere ru_maxrss, which
only grows) plus peak traced Python allocations (tracemalloc). Repeats alternate which mode runs first so
drift on a shared machine hits both alike. On a GPU, CUDA is synchronised and its peak memory printed too.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub is reachable: never try
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from hrsa.extract.model_spec import parse_model_spec  # noqa: E402
from hrsa.train.gradcache import contrastive_backward  # noqa: E402
from hrsa.train.loss import info_nce  # noqa: E402
from hrsa.train.model import load_embedding_model, tokenize  # noqa: E402

WORDS = "the quick brown fox jumps over the lazy dog while hidden states of a tiny model drift".split()


@dataclass(frozen=True)
class BenchConfig:
    model: str | None = None  # None: a random Llama built here (hidden 128, 4 layers)
    batch: int = 32  # queries per step (one worker's share)
    negatives: int = 1
    words: int = 48  # words per text
    chunk_size: int = 8
    repeats: int = 5
    burn_in: int = 1


QUICK = BenchConfig(batch=8, words=16, chunk_size=3, repeats=2)


def _build_tiny(folder: Path) -> Path:
    """A random 4-layer Llama (hidden 128) with a byte-level BPE tokenizer, saved as a model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModel, LlamaConfig, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=400, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _texts(n: int, words: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _step(model: Any, optimizer: Any, inputs: list[Any], cfg: BenchConfig, chunk_size: int | None) -> float:
    device = next(model.parameters()).device
    start = time.perf_counter()
    contrastive_backward(model, inputs, lambda e: info_nce(e[0], e[1], temperature=0.02,
                                                           group_size=cfg.negatives + 1, gather=False),
                         chunk_size=chunk_size)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(cfg: BenchConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model_text = cfg.model or str(_build_tiny(Path(tmp) / "tiny-llama"))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        autocast = torch.bfloat16 if device == "cuda" else None
        model, tok, loaded = load_embedding_model(parse_model_spec(model_text, attention="bidirectional"),
                                                  device=device, autocast_dtype=autocast)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rng = random.Random(0)
    inputs = [tokenize(tok, _texts(cfg.batch, cfg.words, rng), max_length=512),
              tokenize(tok, _texts(cfg.batch * (cfg.negatives + 1), cfg.words, rng), max_length=512)]
    modes = {"plain": None, "chunked": cfg.chunk_size}
    times: dict[str, list[float]] = {m: [] for m in modes}
    peaks: dict[str, dict[str, float]] = {m: {"rss": 0.0, "traced": 0.0, "cuda": 0.0} for m in modes}
    for m in modes:  # burn-in
        for _ in range(cfg.burn_in):
            _step(model, optimizer, inputs, cfg, modes[m])
    reset_ok = _reset_peak_rss()
    for r in range(cfg.repeats):
        for m in (list(modes) if r % 2 == 0 else list(reversed(modes))):
            _reset_peak_rss()
            tracemalloc.start()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[m].append(_step(model, optimizer, inputs, cfg, modes[m]))
            peaks[m]["traced"] = max(peaks[m]["traced"], tracemalloc.get_traced_memory()[1] / 2**20)
            tracemalloc.stop()
            peaks[m]["rss"] = max(peaks[m]["rss"], _peak_rss_mib())
            if device == "cuda":
                peaks[m]["cuda"] = max(peaks[m]["cuda"], torch.cuda.max_memory_allocated() / 2**20)
    medians = {m: statistics.median(t) for m, t in times.items()}
    return {"model": loaded.spec.name, "device": device, "medians": medians, "peaks": peaks,
            "rss_reset": reset_ok, "n_tokens": int(inputs[0].attention_mask.sum() + inputs[1].attention_mask.sum())}


def report(cfg: BenchConfig, out: dict[str, Any]) -> None:
    plain, chunked = out["medians"]["plain"], out["medians"]["chunked"]
    print(f"model {out['model']} on {out['device']}: {cfg.batch} queries x {cfg.negatives + 1} documents per step, "
          f"{out['n_tokens']} tokens, chunk_size {cfg.chunk_size}, {cfg.repeats} repeats (medians)")
    print(f"step seconds: plain {plain:.4f}, chunked {chunked:.4f}")
    print(f"samples/s per worker: plain {cfg.batch / plain:.1f}, chunked {cfg.batch / chunked:.1f}")
    print(f"overhead ratio (chunked / plain): {chunked / plain:.2f}")
    how = "high-water mark reset per mode" if out["rss_reset"] else "ru_maxrss, cumulative"
    for m, p in out["peaks"].items():
        cuda = f", CUDA {p['cuda']:.0f} MiB" if out["device"] == "cuda" else ""
        print(f"peak memory {m}: RSS {p['rss']:.0f} MiB ({how}), traced Python {p['traced']:.1f} MiB{cuda}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size")
    parser.add_argument("--model", help="a model folder, .gguf file or packaged:<name> (default: a tiny Llama)")
    parser.add_argument("--batch", type=int, help="queries per step")
    parser.add_argument("--chunk-size", type=int, help="sequences per forward in the chunked backward")
    parser.add_argument("--repeats", type=int, help="measured repeats of each mode")
    args = parser.parse_args()
    cfg = QUICK if args.quick else BenchConfig()
    overrides = {k: v for k, v in {"model": args.model, "batch": args.batch, "chunk_size": args.chunk_size,
                                   "repeats": args.repeats}.items() if v is not None}
    cfg = replace(cfg, **overrides)
    report(cfg, run(cfg))


if __name__ == "__main__":
    main()
