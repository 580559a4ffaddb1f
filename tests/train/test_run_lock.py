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
from hrsa.train.run_lock import LOCK_FILE, RunInUseError, exclusive_run, refuse_if_in_use

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


def test_a_lock_file_this_user_cannot_write_still_excludes(tmp_path: Path) -> None:
    """Another user's lock file in a group's shared folder (made immutable here: root may write any file): opened
    for reading, its flock still excludes. It went unguarded with a warning, and two runs went on at once."""
    (tmp_path / "run").mkdir()
    lock = tmp_path / "run" / LOCK_FILE
    lock.write_text("pid 1 on another-user's-host")
    if subprocess.run(["chattr", "+i", str(lock)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not supported on this filesystem")
    try:
        holder = _hold(tmp_path / "run")
        try:
            with pytest.raises(RunInUseError, match="Wait for it to end"), exclusive_run(parse_location(tmp_path / "run")):
                pytest.fail("entered a folder another process holds")
            with pytest.raises(RunInUseError):
                refuse_if_in_use(parse_location(tmp_path / "run"))
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
    finally:
        subprocess.run(["chattr", "-i", str(lock)], check=True)


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

    from hrsa.runtime import folder_lock

    def no_flock(fd: Any, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(folder_lock.fcntl, "flock", no_flock)
    with caplog.at_level("WARNING"), exclusive_run(parse_location(tmp_path / "run")):
        pass
    assert "not guarded" in caplog.text


# -- On S3 (moto's server): a lease renewed by its holder ------------------------------------------------------------
_HOLD_S3 = textwrap.dedent("""
    import sys, time
    from hrsa.cli import exit_on_sigterm
    from hrsa.runtime.locations import parse_location
    from hrsa.runtime import folder_lock
    from hrsa.train import run_lock
    folder_lock.LEASE_SECONDS, folder_lock.RENEW_SECONDS = float(sys.argv[2]), float(sys.argv[3])
    exit_on_sigterm()  # as `hrsa` does
    with run_lock.exclusive_run(parse_location(sys.argv[1])):
        print("held", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def s3_run(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    import uuid

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    return parse_location(f"s3://hrsa-test/runs/{uuid.uuid4().hex}")


def _s3_keys(run: Any) -> list[str]:
    return sorted(run.files())


def _hold_s3(run: Any, lease: float, renew: float) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_S3, run.url, str(lease), str(renew)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_an_s3_run_is_refused_while_its_holder_renews_and_taken_over_once_it_stops(s3_run: Any,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A live holder (renewing every 0.5 s) is refused past several lease lengths; once SIGKILLed, its lease lapses
    and the next training takes it over; a run that ends lets go of the lease (nothing left in the folder)."""
    import time

    from hrsa.runtime import folder_lock

    refuse_if_in_use(s3_run)
    assert _s3_keys(s3_run) == []  # the early check creates nothing
    monkeypatch.setattr(folder_lock, "LEASE_SECONDS", 2.0)
    holder = _hold_s3(s3_run, 2.0, 0.5)
    try:
        for _ in range(3):  # 4.5 s: longer than the lease, so only the renewals keep it
            time.sleep(1.5)
            with pytest.raises(RunInUseError, match=rf"pid {holder.pid} on .*Wait for it to end"):
                refuse_if_in_use(s3_run)
            with pytest.raises(RunInUseError, match=rf"pid {holder.pid} on "), exclusive_run(s3_run):
                pytest.fail("entered a folder another process holds")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with pytest.raises(RunInUseError):  # a lease lapses only after LEASE_SECONDS without renewal
        refuse_if_in_use(s3_run)
    time.sleep(3.5)  # Last-Modified has a resolution of 1 s
    with exclusive_run(s3_run):
        assert _s3_keys(s3_run) == [LOCK_FILE]
    assert _s3_keys(s3_run) == []


def test_a_holder_stopped_with_sigterm_lets_go_of_its_lease_at_once(s3_run: Any) -> None:
    """`ray job stop`, scancel and Kubernetes stop a driver with SIGTERM: its lease was left to lapse (60 s), and
    an immediate re-run was refused."""
    holder = _hold_s3(s3_run, 60.0, 15.0)
    assert _s3_keys(s3_run) == [LOCK_FILE]
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(timeout=30) == 128 + signal.SIGTERM
    assert _s3_keys(s3_run) == []
    refuse_if_in_use(s3_run)


def test_an_s3_lease_taken_over_stops_its_first_holder_and_fails_it_at_the_end(
        s3_run: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A holder that cannot renew (a partition, expired credentials) stops as if it had lost its lease once it has
    not renewed for nearly a lease (another may take it over any moment, and nothing may tell it): the Event it
    handed out is set then (the trainer stops its workers on it, without a save), and the block ends with an error,
    not with a run whose checkpoints may mix two trainings; the lease the other took over is left alone."""
    import time

    from hrsa.runtime import folder_lock
    from hrsa.store.errors import UserError
    from hrsa.train import run_lock

    monkeypatch.setattr(folder_lock, "LEASE_SECONDS", 1.0)
    monkeypatch.setattr(folder_lock, "RENEW_SECONDS", 0.3)
    put = folder_lock._S3Lease._put
    with pytest.raises(RunInUseError, match="lease taken over by another training"), exclusive_run(s3_run) as lost:
        def unreachable(self: Any, body: bytes, **condition: str) -> str:
            raise UserError("Expected to reach the training lock. Got a partition instead.")

        monkeypatch.setattr(folder_lock._S3Lease, "_put", unreachable)  # its renewals fail: the lease lapses
        time.sleep(2.5)
        holder = _hold_s3(s3_run, 1.0, 0.3)  # takes the lapsed lease over, and keeps it
        monkeypatch.setattr(folder_lock._S3Lease, "_put", put)  # reachable again: its next renewal finds it taken
        assert lost.wait(5), "the lost lease was not told while the block ran"
    try:
        assert "lost the lease" in caplog.text and "could not renew" in caplog.text
        monkeypatch.setattr(folder_lock, "LEASE_SECONDS", 60.0)  # the server's times have a resolution of 1 s
        with pytest.raises(RunInUseError, match=rf"pid {holder.pid} on "):
            run_lock.refuse_if_in_use(s3_run)  # the first holder's exit left the new holder's lease alone
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_an_s3_lock_that_cannot_be_reached_is_one_line(s3_run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials (botocore's own error, which s3fs passes through): one line naming the lock, not a traceback."""
    from botocore.exceptions import NoCredentialsError
    from s3fs import S3FileSystem

    from hrsa.store.errors import UserError

    def no_credentials(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        raise NoCredentialsError()

    monkeypatch.setattr(S3FileSystem, "call_s3", no_credentials)
    with pytest.raises(UserError, match=r"Expected to reach the training lock s3://.*/\.hrsa_train\.lock\. Got "
                                        "NoCredentialsError") as error:
        refuse_if_in_use(s3_run)
    assert "\\n" not in str(error.value)


def test_a_renewal_that_races_a_refused_start_keeps_the_lease(s3_run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 answers 409 to a conditional write racing another (a second training's If-None-Match create, refused):
    the lease is still this holder's, so the training goes on."""
    import time

    from hrsa.runtime import folder_lock as run_lock

    monkeypatch.setattr(run_lock, "RENEW_SECONDS", 0.2)
    put, raced = run_lock._S3Lease._put, []

    def once_409(self: Any, body: bytes, **condition: str) -> str:
        if "IfMatch" in condition and not raced:
            raced.append(True)
            raise run_lock._Conflict("ConditionalRequestConflict")
        return put(self, body, **condition)

    monkeypatch.setattr(run_lock._S3Lease, "_put", once_409)
    with exclusive_run(s3_run) as lost:
        time.sleep(1.5)
        assert raced and not lost.is_set()
    assert _s3_keys(s3_run) == []  # let go as usual
