"""One training at a time per run folder: a second one is refused while another process holds the folder, and the
folder is free again the moment that process dies, however it dies."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from hrsa.runtime.locations import parse_location
from hrsa.train.run_lock import LOCK_FILE, RunInUseError, exclusive_run

_HOLD = textwrap.dedent("""
    import sys, time
    from hrsa.runtime.locations import parse_location
    from hrsa.train.run_lock import exclusive_run
    with exclusive_run(parse_location(sys.argv[1])):
        print("held", flush=True)
        time.sleep(600)
""")


def _hold(folder: Path) -> subprocess.Popen[str]:
    """Another process holding ``folder``, as a running `hrsa train` driver does."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_held_run_folder_is_refused_and_freed_when_its_holder_is_killed(tmp_path: Path) -> None:
    run = parse_location(tmp_path / "run")
    holder = _hold(tmp_path / "run")
    try:
        with pytest.raises(RunInUseError, match=rf"pid {holder.pid} on .*Wait for it to end, or train into another"):
            with exclusive_run(run):
                pytest.fail("entered a folder another process holds")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive_run(run):  # no stale lock: the kernel dropped it with the process
        assert (tmp_path / "run" / LOCK_FILE).read_text().startswith("pid ")


def test_one_process_holds_a_folder_once(tmp_path: Path) -> None:
    """Two holds in one process conflict as well (flock is per open file, not per process): a pipeline that started
    the same training twice at once would be refused too."""
    run = parse_location(tmp_path / "run")
    with exclusive_run(run), pytest.raises(RunInUseError), exclusive_run(run):
        pass


@pytest.mark.integration
def test_a_training_into_a_folder_another_one_runs_into_is_refused_untouched(ray_local: Any, tiny_models: Any,
                                                                             tmp_path: Path) -> None:
    from hrsa.train.config import TrainConfig
    from hrsa.train.trainer import run_training

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"query": f"q{i}", "pos": f"d{i}", "negs": [f"n{i}"]}) + "\n" for i in range(8)))
    output = tmp_path / "run"
    config = TrainConfig(backbone=str(tiny_models.dir("llama")), data=data, output=output, batch_size=4, max_steps=2,
                         max_length=16)
    holder = _hold(output)
    try:
        before = _contents(output)
        with pytest.raises(RunInUseError):
            run_training(config, progress=False)
        # Refused before anything else is looked at (a recipe, a backbone to hash, Ray to start).
        with pytest.raises(RunInUseError):
            run_training(config.model_copy(update={"backbone": str(tmp_path / "no-such-model"), "lr": 0.5}),
                         progress=False)
        assert _contents(output) == before  # no recipe recorded, no checkpoint, nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_the_early_check_creates_nothing_and_refuses_a_held_folder(tmp_path: Path) -> None:
    from hrsa.train.run_lock import refuse_if_in_use

    refuse_if_in_use(parse_location(tmp_path / "new"))
    assert not (tmp_path / "new").exists()
    holder = _hold(tmp_path / "run")
    try:
        with pytest.raises(RunInUseError, match="delete .*hrsa_train.lock"):
            refuse_if_in_use(parse_location(tmp_path / "run"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    refuse_if_in_use(parse_location(tmp_path / "run"))


def test_a_filesystem_without_flock_trains_unguarded_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Lustre without -o flock answers ENOSYS, NFS without a lock daemon ENOLCK: a warning, not a failed run."""
    import errno

    from hrsa.train import run_lock

    def no_flock(fd: Any, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    with caplog.at_level("WARNING"), exclusive_run(parse_location(tmp_path / "run")):
        pass
    assert "not guarded" in caplog.text
