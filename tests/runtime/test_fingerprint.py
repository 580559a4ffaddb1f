"""Content digests: a large file (model weights) is read once per machine, not once per process, and no kept digest
ever stands for other bytes: not after a rewrite that restores the size and modification time, not after a
rewrite within the clock tick of the hashing, not when the cache holds broken entries or cannot be written.""" 

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xxhash

import hrsa.runtime.fingerprint as fingerprint
from hrsa.runtime.fingerprint import file_digest

LARGE = fingerprint.KEPT_FROM  # files from this size up keep their digest across processes


def _weights(path: Path, fill: bytes) -> Path:
    """A file of LARGE bytes, all ``fill`` but its last."""
    path.write_bytes(fill * (LARGE - 1) + b"\x00")
    return path


def _settled(*paths: Path) -> None:
    """Wait until the files' last change is a tick in the past (a checkpoint written minutes ago): only then is a
    digest kept."""
    newest = max(p.stat().st_ctime_ns for p in paths)
    time.sleep(max(0.0, (newest + fingerprint._TICK_NS - time.time_ns()) / 1e9) + 0.05)


def _expected(path: Path) -> str:
    return xxhash.xxh3_128(path.read_bytes()).hexdigest()


def _in_a_fresh_process(path: Path, cache: Path) -> str:
    """The digest another process computes (no memo of this one's), with its reads of ``path`` counted."""
    code = ("import builtins, io, sys\n"
            "from pathlib import Path\n"
            "reads = []\n"
            "real = io.open\n"
            "def counting(file, *a, **k):\n"
            "    reads.append(str(file)) if str(file) == sys.argv[1] else None\n"
            "    return real(file, *a, **k)\n"
            "io.open = builtins.open = counting\n"
            "from hrsa.runtime.fingerprint import file_digest\n"
            "print(file_digest(sys.argv[1]), len(reads))\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                          env={**os.environ, "HRSA_CACHE": str(cache)})
    return done.stdout.strip()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HRSA_CACHE", str(tmp_path / "cache"))
    fingerprint._memo.clear()
    return tmp_path / "cache"


def test_a_large_file_is_read_once_per_machine(tmp_path: Path, cache: Path) -> None:
    weights = _weights(tmp_path / "model.safetensors", b"\x01")
    _settled(weights)
    assert _in_a_fresh_process(weights, cache) == f"{_expected(weights)} 1"
    assert _in_a_fresh_process(weights, cache) == f"{_expected(weights)} 0"  # kept: not read again


def test_a_small_file_keeps_nothing(tmp_path: Path, cache: Path) -> None:
    """Corpora and configs cost nothing to hash; keeping their digests would only grow the cache."""
    small = tmp_path / "corpus.jsonl"
    small.write_text('{"text": "one"}\n')
    os.utime(small, ns=(0, 0))
    assert file_digest(small) == _expected(small) and not cache.exists()


def test_a_rewrite_that_restores_size_and_modification_time_is_read_again(tmp_path: Path, cache: Path) -> None:
    """`cp -p`, rsync -a or a tar extract give other bytes the old size and time; the change time they cannot."""
    weights = _weights(tmp_path / "model.safetensors", b"\x01")
    _settled(weights)
    assert file_digest(weights) == _expected(weights)
    before = weights.stat()
    weights.write_bytes(b"\x02" * (LARGE - 1) + b"\x00")
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert file_digest(weights) == _expected(weights)
    fingerprint._memo.clear()
    assert file_digest(weights) == _expected(weights)


class _CoarseStat:
    """A stat result with times in whole seconds, as FAT, ext3 and some NFS servers keep them (ext4 and tmpfs on
    recent kernels never give two changes one time once it was read: they would not show the race)."""

    def __init__(self, stat: os.stat_result) -> None:
        self._stat = stat

    def __getattr__(self, name: str) -> object:
        value = getattr(self._stat, name)
        return value // 10**9 * 10**9 if name in ("st_mtime_ns", "st_ctime_ns") else value


def test_a_file_changed_within_the_clock_tick_of_its_hashing_is_read_again(
        tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A digest taken within a tick of the file's last change is not kept, even by this process (git's "racily
    clean" entries): a rewrite in the same tick leaves the same size and times."""
    real_stat = Path.stat
    monkeypatch.setattr(Path, "stat", lambda self, **kwargs: _CoarseStat(real_stat(self, **kwargs)))
    config = tmp_path / "config.json"
    for round in range(3):
        config.write_bytes(bytes([65 + round]) * 64)
        stat = real_stat(config)
        assert file_digest(config) == _expected(config)
        config.write_bytes(bytes([97 + round]) * 64)
        os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert file_digest(config) == _expected(config), round


def test_broken_or_misplaced_cache_entries_are_not_believed(tmp_path: Path, cache: Path) -> None:
    """An entry cut short, not an entry, or another file's entry moved under this file's name is read past."""
    weights = _weights(tmp_path / "model.safetensors", b"\x01")
    other = _weights(tmp_path / "other.safetensors", b"\x02")
    _settled(weights, other)
    file_digest(weights)
    (entry,) = [p for p in cache.rglob("*") if p.is_file()]
    file_digest(other)
    (other_entry,) = [p for p in cache.rglob("*") if p.is_file() and p != entry]
    for broken in (other_entry.read_text(), entry.read_text()[:20], "", "not an entry\n",
                   entry.read_text().replace(_expected(weights), "xyz")):
        entry.write_text(broken)
        fingerprint._memo.clear()
        assert file_digest(weights) == _expected(weights), broken


def test_entries_another_user_wrote_are_not_believed(tmp_path: Path, cache: Path) -> None:
    """A cache folder shared with others (a group's $HRSA_CACHE) could hand this user any digest."""
    weights = _weights(tmp_path / "model.safetensors", b"\x01")
    _settled(weights)
    file_digest(weights)
    (entry,) = [p for p in cache.rglob("*") if p.is_file()]
    entry.write_text(entry.read_text().replace(_expected(weights), "0" * 32))
    fingerprint._memo.clear()
    assert file_digest(weights) == "0" * 32  # this user's own entry is believed: the cache is a cache
    os.chown(entry, 12345, 12345)
    fingerprint._memo.clear()
    assert file_digest(weights) == _expected(weights)
    assert (cache / "digests").stat().st_mode & 0o077 == 0  # made readable by this user alone


def test_an_unwritable_cache_costs_time_not_correctness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("HRSA_CACHE", str(blocker / "cache"))  # below a file: nothing can be made there
    fingerprint._memo.clear()
    weights = _weights(tmp_path / "model.safetensors", b"\x01")
    assert file_digest(weights) == _expected(weights)


def test_a_cache_on_a_read_only_filesystem_costs_time_not_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check that refuses an unwritable output a user named (before the work) also refused hrsa's own cache
    write, as an error its quiet fallback did not expect: extract, train and eval failed on a read-only home.
    (access(2) answers as a read-only filesystem does: mounting one needs privileges the test machine may lack.)"""
    cache = tmp_path / "cache"
    (cache / "digests").mkdir(parents=True)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if mode & os.W_OK and str(path).startswith(str(cache))
                        else access(path, mode, **kw))
    monkeypatch.setenv("HRSA_CACHE", str(cache))
    fingerprint._memo.clear()
    weights = _weights(tmp_path / "model.safetensors", b"\x02")
    _settled(weights)
    assert file_digest(weights) == _expected(weights)


@pytest.mark.parametrize("size", [100, fingerprint._BLOCK + 3])
def test_a_digest_holds_at_most_one_buffer_of_the_file_s_size_or_the_read_size(tmp_path: Path, cache: Path,
                                                                               size: int) -> None:
    """``f.read(16 MiB)`` allocates 16 MiB before it reads, whatever the file: every labels file digested by a probe
    put a 16 MB peak beside the pass its memory budget planned (seen by the probe's measured-peak test)."""
    import tracemalloc

    path = tmp_path / "labels.jsonl"
    path.write_bytes(b"x" * size)
    tracemalloc.start()
    try:
        digest = fingerprint._read_digest(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert digest == _expected(path)
    assert peak <= min(size, fingerprint._BLOCK) + 64 * 1024, peak
