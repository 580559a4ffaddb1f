"""What ``hrsa submit`` leaves home: its ignore patterns match as Ray applies them (gitignore syntax) and as the
upload size is counted here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


@pytest.mark.parametrize("name", ["hrsa-0.1-py3-none-any.whl", "model.gl"])
def test_wheels_and_gl_files_stay_home_by_extension(tmp_path: Path, name: str) -> None:
    from ray._private.runtime_env.packaging import _get_excludes

    from hrsa.cluster.submit import compute_excludes

    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / name).write_bytes(b"\0" * 4096)
    (tmp_path / "data.jsonl").write_text("{}\n")
    excludes = compute_excludes(tmp_path, large=1 << 20, limit=1024)  # the file counted would be over the cap
    matches = _get_excludes(tmp_path, excludes)  # Ray's own matcher of runtime_env excludes
    assert matches(tmp_path / "wheels" / name) and not matches(tmp_path / "data.jsonl")


def test_a_pipeline_submitted_to_a_cluster_may_name_folders_this_machine_cannot_write(tmp_path: Path, monkeypatch) -> None:
    """Its out (/mnt/efs/... as the README suggests) is the cluster's: checked for writability here, the nearest folder
    this machine has (/mnt, root's) refused the submission. `hrsa run` on this machine still refuses it at once."""
    import os

    import hrsa.cluster.submit as submit
    from hrsa.cluster.pipeline import PipelineError, load_pipeline

    shared = tmp_path / "mnt"
    shared.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if mode & os.W_OK and str(path).startswith(str(shared))
                        else access(path, mode, **kw))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"store: {tmp_path / 'store'}\ncorpora: {{c: {{path: {tmp_path / 'c.jsonl'}}}}}\n"
                        f"models: {{a: {{model: {tmp_path}}}}}\n")
    out = str(shared / "efs" / "hrsa" / "out")
    with pytest.raises(PipelineError, match="cannot be written"):
        load_pipeline(pipeline, out=out)

    class Submitted(Exception):
        pass

    def client(address):  # step 2, after every local check passed
        raise Submitted

    monkeypatch.setattr(submit, "_client", client)
    with pytest.raises(Submitted):
        submit.submit_pipeline(pipeline, working_dir=tmp_path, out=out, wait=False)


def test_files_listed_in_gitignore_do_not_count_against_the_upload_cap(tmp_path: Path) -> None:
    """The cap's message says to list large data in .gitignore: done so, the data no longer counts (Ray leaves it home)."""
    from hrsa.cluster.submit import compute_excludes

    (tmp_path / "data").mkdir()
    for i in range(3):
        (tmp_path / "data" / f"part-{i}.bin").write_bytes(b"\0" * 600)
    (tmp_path / "pipeline.yaml").write_text("store: s\n")
    (tmp_path / ".gitignore").write_text("data/\n")
    compute_excludes(tmp_path, large=1000, limit=1024)  # 1800 bytes, all ignored: nothing over the cap
    (tmp_path / ".gitignore").unlink()
    with pytest.raises(Exception, match="Ray's upload cap"):
        compute_excludes(tmp_path, large=1000, limit=1024)


@pytest.mark.parametrize("how", ["large", "gitignored"])
def test_a_pipeline_input_that_would_stay_home_is_refused_before_anything_is_submitted(tmp_path: Path, monkeypatch,
                                                                                      how: str) -> None:
    """A corpus folder whose file stays home (over the large-file limit, or ignored) would be read on the cluster as a
    smaller corpus, and the job would succeed on it: submit refuses it, naming the file and the pipeline's key."""
    import json

    import hrsa.cluster.submit as submit
    from hrsa.store.errors import UserError

    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "part-0.jsonl").write_text(json.dumps({"id": "a", "text": "the quick fox"}) + "\n")
    (corpus / "part-1.jsonl").write_text(json.dumps({"id": "b", "text": "the lazy dog", "notes": "x" * 4096}) + "\n")
    if how == "gitignored":
        (tmp_path / ".gitignore").write_text("part-1.jsonl\n")
    else:
        monkeypatch.setattr(submit, "LARGE_FILE", 1024)
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "config.json").write_text("{}")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("store: /shared/store\nout: /shared/out\ncorpora: {c: {path: data/corpus}}\n"
                        "models: {a: {model: models/m}, b: {model: models/m}}\npairs: [{a: a, b: b, corpus: c}]\n")

    def client(address):
        raise AssertionError("submitted: the corpus's part-1.jsonl stays home")

    monkeypatch.setattr(submit, "_client", client)
    with pytest.raises(UserError, match=r"data/corpus \(corpora\.c\.path\).*data/corpus/part-1\.jsonl") as caught:
        submit.submit_pipeline(pipeline, working_dir=tmp_path, wait=False)
    assert ("over" if how == "large" else "ignored") in str(caught.value)


@pytest.mark.parametrize(("values", "key"), [
    ({"store": "hrsa-out/store", "out": "/shared/out"}, "store"),
    ({"store": "s3://bucket/store", "out": "hrsa-out/paper"}, "out"),  # the paper configs' own `out`
    ({"store": "s3://bucket/store", "out": "/shared/out", "train": {"r": {"output": "runs/r"}}}, "train.r.output"),
])
def test_a_relative_output_of_a_submitted_pipeline_is_refused_before_anything_is_submitted(
        tmp_path: Path, monkeypatch, values: dict, key: str) -> None:
    """On the cluster a relative path is a folder inside Ray's copy of the working directory, named by its content: a
    re-submission after an edit ran every stage again (and retrained), and Ray deletes the copy once unused."""
    import yaml

    import hrsa.cluster.submit as submit
    from hrsa.store.errors import UserError

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "c.jsonl").write_text('{"id": "a", "text": "the quick fox"}\n')
    (tmp_path / "d.jsonl").write_text('{"query": "q", "pos": "p", "negs": ["n"]}\n')
    pipeline = tmp_path / "p.yaml"
    train = {run: {"backbone": "m", "data": "d.jsonl", **fields} for run, fields in values.pop("train", {}).items()}
    pipeline.write_text(yaml.safe_dump({**values, "corpora": {"c": {"path": "c.jsonl"}},
                                        "models": {"a": {"model": "m"}, "b": {"model": "m"}},
                                        "pairs": [{"a": "a", "b": "b", "corpus": "c"}], **({"train": train} if train else {})}))

    def client(address):
        raise AssertionError("submitted")

    monkeypatch.setattr(submit, "_client", client)
    with pytest.raises(UserError, match=rf"Expected {key} of a submitted pipeline on storage that outlives the job"):
        submit.submit_pipeline(pipeline, working_dir=tmp_path, wait=False)
    if key == "out":  # --out on S3 is the fix the message names
        with pytest.raises(AssertionError, match="submitted"):
            submit.submit_pipeline(pipeline, working_dir=tmp_path, out="s3://bucket/out", wait=False)


@pytest.mark.parametrize(("name", "task"), [
    ("dev.jsonl", "retrieval:data/dev.jsonl"),
    # `hrsa eval` takes an existing mail:v2.jsonl whole; the check cut it at the ':' and checked nothing
    ("mail:v2.jsonl", "classification:data/mail:v2.jsonl"),
])
def test_an_evaluation_task_file_that_would_stay_home_is_refused_before_anything_is_submitted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, task: str) -> None:
    """The eval stage reads its task files on the driver, in the job's copy of the working directory: an ignored one
    was missing there, after hours of training and extraction."""
    import json

    import hrsa.cluster.submit as submit
    from hrsa.store.errors import UserError

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "words.jsonl").write_text(json.dumps({"id": "a", "text": "the quick fox"}) + "\n")
    (tmp_path / "data" / name).write_text(json.dumps({"query": "fox", "pos": "a fox", "text": "a", "label": "b"}) + "\n")
    (tmp_path / ".gitignore").write_text(f"{name}\n")
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "config.json").write_text("{}")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("store: /shared/store\nout: /shared/out\ncorpora: {c: {path: data/words.jsonl}}\n"
                        f"models: {{a: {{model: models/m}}}}\neval: {{dev: {{model: a, tasks: ['{task}', SciFact]}}}}\n")

    def client(address):
        raise AssertionError("submitted: the task file stays home")

    monkeypatch.setattr(submit, "_client", client)
    monkeypatch.chdir(tmp_path / "data")  # not the working directory: relative files are the job's
    with pytest.raises(UserError, match=rf"data/{re.escape(name)} \(eval\.dev\.tasks\)") as caught:
        submit.submit_pipeline(pipeline, working_dir=tmp_path, wait=False)
    assert "ignored" in str(caught.value)
