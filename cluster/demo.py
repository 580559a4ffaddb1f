"""The demo: the paper's study at CPU size, offline, on the real SmolLM2-135M-Instruct.

The paper asks whether an embedding model trained from an RLVR-tuned backbone differs from one trained from its
base: it trains both with the same recipe, compares the backbones and the embedding models level by level (HRSA,
two Table 2s), and follows the two runs from the backbones on (Figure 5: do they realign?). The demo does the
same with what this machine has:

1. SmolLM2 (from its package's GGUF) as a Hugging Face folder, and a perturbed copy of it, the stand-in for an
   RLVR-tuned child (:mod:`hrsa.cluster.demo_models`).
2. Word-problem retrieval pairs with a hard negative each, mined by all-MiniLM-L6-v2 on FAISS; two InfoNCE runs
   on Ray Train that differ only in their initialisation, with the paper's recipe at CPU size (bidirectional
   attention, mean pooling, temperature 0.02, instruction-formatted queries).
3. A pipeline (:mod:`hrsa.cluster.runner`): every HRSA metric for the two backbones and for the two embedding
   models on the CoT traces, cross-model probes on labelled mail (hard ham vs spam), the dynamics from step 0 (the
   two runs against each other, and the base run against its own backbone), the report with both Table 2s side
   by side, and every checkpoint of both runs scored on held-out word problems (retrieval, nDCG@10, as `hrsa eval`
   scores them). Each stage is skipped when its outputs are up to date, so re-running resumes.
4. What it found, in a few lines (:func:`outcome_lines`), on screen and at the top of the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.console import Console

from hrsa.cluster.demo_models import DEMO_MODEL, materialize_backbone, perturbed_copy
from hrsa.runtime.settings import FolderPath

if TYPE_CHECKING:
    from hrsa.cluster.runner import PipelineResult

__all__ = ["COT_TEMPLATE", "DEMO_MODEL", "DemoConfig", "DemoResult", "demo_pipeline", "outcome_lines", "run_demo"]

COT_TEMPLATE = "{chat:messages}{reasoning}"  # the problem as the model saw it, then its reasoning
INSTRUCTION = "Given a math word problem, retrieve its worked solution"
REALIGN, DRIFT = "realignment", "drift-from-backbone"  # the dynamics series
BACKBONES = ("smollm2", "smollm2-perturbed")
EMBEDDERS = ("smollm2-emb", "smollm2-perturbed-emb")  # training runs and models alike
ABOUT = ("The paper's study at CPU size. SmolLM2-135M-Instruct stands for the base model, and a copy with seeded noise "
         "on its weight matrices for its RLVR-tuned child. Both are trained into embedding models with the same InfoNCE "
         "recipe (bidirectional attention, mean pooling, temperature 0.02, instruction-formatted queries) and data; the "
         "runs differ only in where they start. Table 2, side by side, compares the two backbones and the two embedding "
         "models level by level on the CoT traces (representation, geometry) and on labelled mail (function: probes of "
         "hard ham vs spam). The dynamics start at step 0, the two backbones: 'realignment' compares the two runs step "
         "by step (rising curves: the embedding models grow more alike than their backbones were), 'drift-from-"
         "backbone' compares the base run with its own backbone (how far training moved it).")


class DemoConfig(BaseModel):
    """The demo's settings, equal to the flags of ``hrsa demo`` and to its ``--config`` YAML."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: FolderPath = Field(Path("hrsa-out"), description="Folder for the store and everything the demo writes; re-running "
                                                     "resumes there.")
    corpus: Path | None = Field(None, description="A CoT corpus (.jsonl file or folder, fields messages + reasoning), "
                                                  "e.g. ../shared/data/cot/samples. Default: word problems the demo writes "
                                                  "itself.")
    probe_corpus: Path | None = Field(None, description="The SpamAssassin jsonl (e.g. ../shared/data/spam-assassin/"
                                      "spam-assassin.jsonl): probes of hard ham vs spam. Default: word problems labelled "
                                      "by kind, which every hidden state separates from the words alone.")
    max_docs: int = Field(16, ge=1, description="Use at most N CoT documents.")
    max_tokens: int = Field(256, ge=1, description="Cut CoT documents to N tokens.")
    probe_docs: int = Field(480, ge=20, description="Labelled documents for the probes (a tenth are the test split).")
    probe_tokens: int = Field(40, ge=4, description="Cut probe documents to N tokens.")
    train_steps: int = Field(12, ge=2, description="InfoNCE steps of each run (checkpoints at the half and the end).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate of both runs (high: a few CPU steps must move them).")
    perturbation: float = Field(0.15, ge=0, description="Noise of the perturbed backbone, as a share of each weight "
                                                        "matrix's standard deviation.")
    address: str | None = Field(None, description="Ray address (default RAY_ADDRESS, else an embedded local Ray).")

    @field_validator("corpus", "probe_corpus")
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.exists():
            raise ValueError(f"expected an existing file or folder, got {str(value)!r}")
        return value


@dataclass(frozen=True)
class DemoResult:
    """Where the demo's outputs are: the store, the report, each pair's results.json and each series' dynamics file,
    each model's store id, how many stages ran, what it found (:func:`outcome_lines`), and each run's eval.json."""

    store_url: str
    report: Path
    results: dict[str, Path]
    dynamics: dict[str, Path]
    models: dict[str, str]
    stages_run: int
    outcome: tuple[str, ...]
    evals: dict[str, Path]


def _training_data(out: Path, console: Console) -> tuple[Path, Path]:
    """Word problem -> solution pairs with one MiniLM-mined hard negative each, and held-out pairs to score the
    embedding models on (retrieval, nDCG@10)."""
    from hrsa.cluster.demo_corpus import write_dev_pairs, write_training_pairs
    from hrsa.train.mine import MineConfig, mine_negatives

    mined, pairs, dev = out / "data" / "pairs.mined.jsonl", out / "data" / "pairs.jsonl", out / "data" / "dev-pairs.jsonl"
    if mined.exists():
        return mined, dev if dev.exists() else write_dev_pairs(dev, training=mined)
    pairs = write_training_pairs(pairs, n=256)
    console.print(f"[bold]setup[/] mining hard negatives for {pairs} with all-MiniLM-L6-v2 on FAISS")
    result = mine_negatives(MineConfig(input=pairs, out=mined, k=2, max_length=128, device="cpu", overwrite=True))
    console.print(f"      {result.summary()}")
    return mined, write_dev_pairs(dev, training=mined)  # none of the queries trained on


def _corpora(config: DemoConfig, mails: list[dict[str, Any]] | None, console: Console) -> tuple[Path, dict[str, Any]]:
    """The CoT corpus, and the probe corpus as a pipeline entry (hard ham vs spam, or word problems by kind)."""
    from hrsa.cluster.demo_corpus import write_mail_probes, write_word_problems

    cot = config.corpus
    if cot is None:
        cot = write_word_problems(config.out / "data" / "word-problems.jsonl", n=max(config.max_docs, 24))
        console.print(f"no --corpus given: wrote {cot} (arithmetic word problems answered step by step)")
    if mails is not None:
        mail = write_mail_probes(mails, config.out / "data" / "mail-probes.jsonl")
        return cot, {"path": str(mail), "text": "text", "id_field": "id", "label_field": "label"}
    problems = write_word_problems(config.out / "data" / "word-problems-labelled.jsonl", n=config.probe_docs, seed=7)
    console.print("[yellow]no --probe-corpus given: the probes use word problems labelled by kind, which the words alone "
                  "give away (transfer says little); pass ../shared/data/spam-assassin/spam-assassin.jsonl[/]")
    return cot, {"path": str(problems), "text": "problem", "id_field": "id", "label_field": "kind"}


def demo_pipeline(config: DemoConfig, *, backbones: tuple[Path, Path], train_data: Path, dev_pairs: Path, cot: Path,
                  probes: dict[str, Any]) -> dict[str, Any]:
    """The demo as a pipeline mapping (what ``hrsa run`` reads from YAML)."""
    # Every third hidden state (11 of SmolLM2's 31): the heatmaps and curves keep their shape, and the store, the
    # analyses and the disk (~9 GB, most of it the four checkpoints) shrink threefold.
    extract = {"attention": "bidirectional", "dtype": "float32", "workers": 1, "shard_tokens": 2048,
               "layers": list(range(0, 31, 3))}
    recipe = {"data": str(train_data), "workers": 1, "batch_size": 8, "negatives": 1, "max_steps": config.train_steps,
              "save_every": max(1, config.train_steps // 2), "lr": config.lr, "warmup_ratio": 0.1, "temperature": 0.02,
              "instruction": INSTRUCTION, "max_length": 64, "attention": "bidirectional", "seed": 0}
    geometry = {"metrics": ["dimcorr", "cka", "procrustes", "knn"], "cross_layer": True, "k": [5, 10, 50]}
    probe = {"metrics": ["probe"], "pool": "mean", "probe_both_directions": True}
    series = {"corpus": "cot", "metrics": ["cka", "dimcorr", "knn"], "k": [10], "extract": extract}
    return {
        "store": str(config.out / "store"), "out": str(config.out), "address": config.address,
        "corpora": {"cot": {"path": str(cot), "template": COT_TEMPLATE, "max_docs": config.max_docs,
                            "max_tokens": config.max_tokens},
                    "mail": {**probes, "max_tokens": config.probe_tokens}},
        "train": {run: {**recipe, "backbone": str(path)} for run, path in zip(EMBEDDERS, backbones)},
        "models": {**{name: {"model": str(path), **extract} for name, path in zip(BACKBONES, backbones)},
                   **{name: {"train": name, **extract} for name in EMBEDDERS}},
        "pairs": [{"a": a, "b": b, "corpus": corpus, "name": f"{kind}{suffix}", **settings}
                  for kind, (a, b) in (("backbones", BACKBONES), ("embedding-models", EMBEDDERS))
                  for corpus, suffix, settings in (("cot", "", geometry), ("mail", "-probes", probe))],
        "dynamics": [{"name": REALIGN, "a": EMBEDDERS[0], "b": EMBEDDERS[1], **series},
                     {"name": DRIFT, "a": EMBEDDERS[0], "b": EMBEDDERS[0], "b_step": 0, **series}],
        # Every checkpoint of both runs on held-out word problems, with the queries' instruction of training
        "eval": {run: {"model": run, "tasks": [f"retrieval:{dev_pairs}"], "instruction": INSTRUCTION, "max_length": 64,
                       "batch_size": 16} for run in EMBEDDERS},
        "report": {"title": "SmolLM2 and a perturbed copy, before and after the same InfoNCE training (the paper's "
                            "study at CPU size)", "description": ABOUT},
    }


def outcome_lines(result: PipelineResult) -> list[str]:
    """What the demo found: each Table 2 column's verdicts, and how far each dynamics series moved from step 0."""
    from hrsa.analyze.report.dynamics import load_dynamics, mean_changes
    from hrsa.analyze.report.summary import merge_levels, summarize
    from hrsa.analyze.results import read_results

    lines = []
    for kind in ("backbones", "embedding-models"):
        summaries = [summarize(read_results(result.results[name])[1]) for name in (kind, f"{kind}-probes")]
        verdicts = ", ".join(f"{level.level} {level.verdict}" for level, _ in merge_levels(summaries))
        lines.append(f"{kind.replace('-', ' ')}: {verdicts}")
    for series, rising, falling in ((REALIGN, "the two runs grew more alike than their backbones were",
                                     "the two runs drifted further apart than their backbones were"),
                                    (DRIFT, "", "training moved the base run away from its backbone")):
        changes = mean_changes(load_dynamics(result.dynamics[series]))
        if not changes:
            lines.append(f"{series}: one step only")
            continue
        moves = ", ".join(f"{c.label} {c.first:.3f} -> {c.last:.3f}" for c in changes)
        cka = changes[0]  # the headline: linear CKA, the paper's measure of realignment
        verdict = rising if cka.change > 0 else falling if cka.change < 0 else "no change"
        lines.append(f"{series}, step 0 -> {cka.last_step}: {moves} ({verdict or 'no change'})")
    scores = [f"{run} {_last_main_score(result.evals[run])}" for run in EMBEDDERS if run in result.evals]
    if scores:
        lines.append(f"held-out retrieval (nDCG@10, last step): {', '.join(scores)}")
    return lines


def _last_main_score(path: Path) -> str:
    """The main score of the last step in an eval.json, as ``0.123 at step N``."""
    import json

    last = max(json.loads(path.read_text())["checkpoints"], key=lambda row: row["step"] or 0)
    (result,) = last["results"].values()
    return f"{result['main_score']:.3f} at step {last['step']}"


def run_demo(config: DemoConfig, console: Console | None = None) -> DemoResult:
    """Run the demo; every stage reports to ``console``. Re-running skips what is up to date."""
    from transformers.utils import logging as hf_logging

    from hrsa.cluster.pipeline import parse_pipeline
    from hrsa.cluster.runner import run_pipeline

    hf_logging.disable_progress_bar()  # the demo's own lines say what runs; per-file loading bars are noise
    from hrsa.cluster.demo_corpus import read_mail_probes

    console = console or Console()
    # Step 0: the probe mails, read before anything is written (a wrong file is one line, not a minute of setup).
    mails = read_mail_probes(config.probe_corpus, n=config.probe_docs) if config.probe_corpus is not None else None
    config.out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]hrsa demo[/]: {ABOUT}", highlight=False)
    # Step 1: the two backbones; Step 2: the training data and the corpora; Step 3: the pipeline.
    base = materialize_backbone(config.out, console)
    child = perturbed_copy(base, config.out / "models" / "smollm2-perturbed", scale=config.perturbation, seed=0,
                           console=console)
    train_data, dev_pairs = _training_data(config.out, console)
    cot, probes = _corpora(config, mails, console)
    values = demo_pipeline(config, backbones=(base, child), train_data=train_data, dev_pairs=dev_pairs, cot=cot,
                           probes=probes)
    result = run_pipeline(parse_pipeline(values), console=console)
    assert result.report is not None  # the demo always asks for one
    # Step 4: what it found.
    outcome = tuple(outcome_lines(result))
    return DemoResult(result.store, result.report, dict(result.results), dict(result.dynamics), dict(result.models),
                      sum(stage.ran for stage in result.stages), outcome, dict(result.evals))
