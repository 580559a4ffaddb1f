"""A pipeline knows a model folder by the files a load reads (:func:`hrsa.extract.identity.model_files`): what tools
write beside them (``hrsa eval``'s ``eval/``) and a checkpoint's bookkeeping (``hrsa_train.json``,
``trainer_state.pt``) are not the model, so writing them does not re-extract and re-analyse it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def test_eval_into_a_checkpoint_leaves_its_fingerprint_alone(tmp_path: Path, tiny_models) -> None:
    """`hrsa eval` on a checkpoint writes <checkpoint>/eval by default; the pipeline's key of the checkpoint hashed
    the folder recursively, so the next `hrsa run` re-extracted and re-analysed it."""
    from hrsa.cluster.stage_keys import source_fingerprint
    from hrsa.train.evaluate import EvalConfig, evaluate

    checkpoint = tmp_path / "run" / "step_000001"
    shutil.copytree(tiny_models.dir("bert"), checkpoint)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"fox {i}", "pos": f"the lazy dog {i} " * 3}) + "\n"
                             for i in range(8)))
    before = source_fingerprint(str(checkpoint))
    evaluate(EvalConfig(model=str(checkpoint), tasks=(f"retrieval:{pairs}",), instructions=False))
    assert (checkpoint / "eval" / "eval.json").is_file()
    assert source_fingerprint(str(checkpoint)) == before


def test_a_model_folder_is_known_by_the_files_a_load_reads(tmp_path: Path) -> None:
    from hrsa.cluster.stage_keys import source_fingerprint
    from hrsa.extract.identity import model_content, model_files
    from hrsa.extract.model_spec import parse_model_spec

    folder = tmp_path / "step_000002"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "hrsa_train.json").write_text('{"step": 2, "loss": 1.0}')
    (folder / "trainer_state.pt").write_bytes(b"optimizer")
    assert [p.name for p in model_files(folder)] == ["config.json", "model.safetensors"]
    before, content = source_fingerprint(str(folder)), model_content(parse_model_spec(str(folder)))
    assert [name for name, _ in before["folder"]] == ["config.json", "model.safetensors"]

    (folder / "eval").mkdir()
    (folder / "eval" / "eval.json").write_text("{}")
    (folder / "hrsa_train.json").write_text('{"step": 2, "loss": 0.5}')
    (folder / "trainer_state.pt").write_bytes(b"other optimizer state")
    assert source_fingerprint(str(folder)) == before
    assert model_content(parse_model_spec(str(folder))) == content

    (folder / "model.safetensors").write_bytes(b"other weights")
    assert source_fingerprint(str(folder)) != before
    assert model_content(parse_model_spec(str(folder))) != content
