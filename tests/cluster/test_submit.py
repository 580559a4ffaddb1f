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
