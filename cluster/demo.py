"""The demo: the whole of hrsa on a laptop, offline, on the real SmolLM2-135M-Instruct.

1. SmolLM2 from its package's GGUF file, saved once as a Hugging Face folder (a GGUF load costs ~30 s
   of dequantising; every later stage loads the folder in ~2 s).
2. Retrieval pairs (word problem -> worked solution) with hard negatives mined by all-MiniLM-L6-v2 on
   FAISS, for a short InfoNCE run on Ray Train that turns SmolLM2 into SmolLM2-Emb.
3. A pipeline (:mod:`hrsa.cluster.runner`): train, extract both models bidirectionally (as the paper
   runs them) over a CoT corpus and a labelled corpus, analyse the pair with every HRSA metric, write
   the report. Each stage is skipped when its outputs are up to date, so re-running resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.console import Console

from hrsa.runtime.settings import FolderPath

__all__ = ["DemoConfig", "DemoResult", "run_demo", "demo_pipeline", "DEMO_MODEL", "COT_TEMPLATE"]

DEMO_MODEL = "packaged:smollm2-135m-instruct"
COT_TEMPLATE = "{chat:messages}{reasoning}"  # the problem as the model saw it, then its reasoning
_DONE = ".hrsa-materialized"  # written last into the saved backbone folder: a torn save is redone


class DemoConfig(BaseModel):
    """The demo's settings, equal to the flags of ``hrsa demo`` and to its ``--config`` YAML."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: FolderPath = Field(Path("hrsa-out"), description="Folder for the store and everything the demo writes; re-running "
                                                     "resumes there.")
    corpus: Path | None = Field(None, description="A CoT corpus (.jsonl file or folder, fields messages + reasoning), "
                                                  "e.g. ../shared/data/cot/samples. Default: word problems the demo writes "
                                                  "itself.")
    max_docs: int = Field(16, ge=1, description="Use at most N documents.")
    max_tokens: int = Field(384, ge=1, description="Cut documents to N tokens.")
    train_steps: int = Field(16, ge=1, description="InfoNCE steps that turn SmolLM2 into SmolLM2-Emb (about 8 s each on "
                                                   "2 CPU cores).")
    probe_docs: int = Field(96, ge=4, description="Labelled word problems of the probe corpus.")
    address: str | None = Field(None, description="Ray address (default RAY_ADDRESS, else an embedded local Ray).")

    @field_validator("corpus")
    @classmethod
    def _corpus_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.exists():
            raise ValueError(f"expected an existing file or folder, got {str(value)!r}")
        return value


@dataclass(frozen=True)
class DemoResult:
    """Where the demo's outputs are: the store, the report, each pair's results.json, each model's store id."""

    store_url: str
    report: Path
    results: dict[str, Path]
    models: dict[str, str]
    stages_run: int


def _materialize_backbone(out: Path, console: Console) -> Path:
    """SmolLM2 as a Hugging Face folder (float32, dequantised from its GGUF), written once."""
    folder = out / "models" / "smollm2-135m-instruct"
    if (folder / _DONE).exists():
        return folder
    from hrsa.extract.models import load_model, parse_model_spec

    console.print(f"[bold]setup[/] saving {DEMO_MODEL} (GGUF, dequantised) as a Hugging Face folder: {folder}")
    loaded = load_model(parse_model_spec(DEMO_MODEL, dtype="float32"), device="cpu")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    (folder / _DONE).write_text(DEMO_MODEL + "\n")  # last: a torn save is redone
    return folder


def _training_data(out: Path, console: Console) -> Path:
    """Word problem -> solution pairs with one MiniLM-mined hard negative each."""
    from hrsa.cluster.demo_corpus import write_training_pairs
    from hrsa.train.mine import MineConfig, mine_negatives

    mined = out / "data" / "pairs.mined.jsonl"
    if mined.exists():
        return mined
    pairs = write_training_pairs(out / "data" / "pairs.jsonl", n=256)
    console.print(f"[bold]setup[/] mining hard negatives for {pairs} with all-MiniLM-L6-v2 on FAISS")
    result = mine_negatives(MineConfig(input=pairs, out=mined, k=2, max_length=128, device="cpu", overwrite=True))
    console.print(f"      {result.summary()}")
    return mined


def _corpora(config: DemoConfig, console: Console) -> tuple[Path, Path]:
    from hrsa.cluster.demo_corpus import write_word_problems

    probes = write_word_problems(config.out / "data" / "word-problems-labelled.jsonl", n=config.probe_docs, seed=7)
    if config.corpus is not None:
        return config.corpus, probes
    cot = write_word_problems(config.out / "data" / "word-problems.jsonl", n=max(config.max_docs, 24))
    console.print(f"no --corpus given: wrote {cot} (arithmetic word problems answered step by step)")
    return cot, probes


def demo_pipeline(config: DemoConfig, *, backbone: Path, train_data: Path, cot: Path, probes: Path) -> dict[str, Any]:
    """The demo as a pipeline mapping (what ``hrsa run`` reads from YAML)."""
    extract_options = {"attention": "bidirectional", "dtype": "float32", "workers": 1, "shard_tokens": 2048}
    return {
        "store": str(config.out / "store"), "out": str(config.out), "address": config.address,
        "corpora": {
            "cot": {"path": str(cot), "template": COT_TEMPLATE, "max_docs": config.max_docs,
                    "max_tokens": config.max_tokens},
            "problems": {"path": str(probes), "text": "problem", "id_field": "id", "max_tokens": 96,
                         "label_field": "kind"},
        },
        "train": {"smollm2-emb": {
            "backbone": str(backbone), "data": str(train_data), "output": str(config.out / "train" / "smollm2-emb"),
            "workers": 1, "batch_size": 8, "negatives": 1, "max_steps": config.train_steps,
            "save_every": config.train_steps, "lr": 2e-5, "warmup_ratio": 0.1, "temperature": 0.02,
            "max_length": 64, "attention": "bidirectional",
        }},
        "models": {
            "smollm2": {"model": str(backbone), **extract_options},
            "smollm2-emb": {"train": "smollm2-emb", **extract_options},
        },
        "pairs": [
            {"a": "smollm2", "b": "smollm2-emb", "corpus": "cot", "name": "smollm2-vs-emb",
             "metrics": ["dimcorr", "cka", "procrustes", "knn"], "cross_layer": True, "k": [5, 10, 50]},
            {"a": "smollm2", "b": "smollm2-emb", "corpus": "problems", "name": "smollm2-vs-emb-probes",
             "metrics": ["probe"], "pool": "mean"},
        ],
        "report": {"title": "SmolLM2-135M-Instruct vs SmolLM2-Emb (InfoNCE, trained by hrsa)"},
    }


def run_demo(config: DemoConfig, console: Console | None = None) -> DemoResult:
    """Run the demo; every stage reports to ``console``. Re-running skips what is up to date."""
    from transformers.utils import logging as hf_logging

    from hrsa.cluster.pipeline import parse_pipeline
    from hrsa.cluster.runner import run_pipeline

    hf_logging.disable_progress_bar()  # the demo's own bars say what runs; per-file loading bars are noise
    console = console or Console()
    config.out.mkdir(parents=True, exist_ok=True)
    backbone = _materialize_backbone(config.out, console)
    train_data = _training_data(config.out, console)
    cot, probes = _corpora(config, console)
    pipeline = parse_pipeline(demo_pipeline(config, backbone=backbone, train_data=train_data, cot=cot, probes=probes))
    result = run_pipeline(pipeline, console=console)
    assert result.report is not None  # the demo always asks for one
    return DemoResult(result.store, result.report, dict(result.results), dict(result.models),
                      sum(stage.ran for stage in result.stages))
