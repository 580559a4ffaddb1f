"""What ``hrsa submit`` leaves home: its ignore patterns match as Ray applies them (gitignore syntax) and as the
upload size is counted here."""

from __future__ import annotations

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
