"""The one atomic writer: a reader (or a crash) never sees half a file, and nothing of a failed write stays."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hrsa.runtime import files
from hrsa.runtime.files import write_atomic


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_text_and_bytes_and_creates_parents(tmp_path: Path) -> None:
    text = write_atomic(tmp_path / "a" / "b" / "x.json", '{"ok": true}\n')
    assert text == tmp_path / "a" / "b" / "x.json" and text.read_text() == '{"ok": true}\n'
    data = write_atomic(str(tmp_path / "x.bin"), b"\x00\xff")
    assert data.read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "x.bin"]  # no temporary file left


def test_replaces_an_existing_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("old and longer than the new one")
    write_atomic(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):  # fails while writing the temporary file
        write_atomic(path, "half \ud800 a lone surrogate")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_failing_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.json"
    path.write_text("old")

    def interrupted(src: str, dst: object) -> None:
        assert Path(src).read_text() == "new"  # the whole new file, beside the old one, until the rename
        raise KeyboardInterrupt  # BaseException: a Ctrl-C cleans up too

    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_mode_is_that_of_a_plain_open(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert mode(write_atomic(tmp_path / "atomic", "x")) == mode(plain)  # not mkstemp's 0600


@pytest.mark.parametrize("umask", [0o077, 0o002])
def test_mode_follows_the_umask(tmp_path: Path, umask: int) -> None:
    """In a process of its own: the umask is read once, at import, as a process starting under it does."""
    code = ("import os, sys, stat\n"
            f"os.umask({umask:#o})\n"
            "from hrsa.runtime.files import write_atomic\n"
            "atomic = write_atomic(os.path.join(sys.argv[1], 'atomic'), 'x')\n"
            "open(os.path.join(sys.argv[1], 'plain'), 'w').close()\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert mode(tmp_path / "atomic") == mode(tmp_path / "plain") == 0o666 & ~umask


def test_two_writers_do_not_share_a_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.json"
    seen: list[str] = []
    real = os.replace

    def record(src: str, dst: object) -> None:
        seen.append(src)
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", record)
    write_atomic(path, "1")
    write_atomic(path, "2")
    assert len(set(seen)) == 2 and all(Path(s).parent == tmp_path and Path(s).name.startswith(".hrsa-") for s in seen)
