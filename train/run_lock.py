"""One training at a time per run folder: the driver holds an exclusive lock on ``OUTPUT/.hrsa_train.lock``.

Two runs of one recipe into one folder at once would both resume from the same checkpoint and write the same
step folders over each other (each save swaps its folder in whole, so the survivor is one run's, but which steps
came from which run nobody could say). The second is refused in one line, with exit code 2: at its start by
:func:`refuse_if_in_use` (before it hashes the backbone or starts Ray; it creates nothing), and for certain when it
takes the lock itself (:func:`exclusive_run`), which closes the race between two starts.

On a local or shared folder the lock is ``flock`` on a file in the run folder: the kernel drops it when the holder
exits, however it ends (a SIGKILLed driver leaves no stale lock to clear by hand). Linux's NFS client maps it onto NFS
locks where the mount has locking on (not ``nolock`` nor ``local_lock=flock``), so drivers on different nodes exclude
each other there; a driver whose whole node died holds an NFS lock until the server's lease expires (NFSv4: ~90 s). A
filesystem that refuses flock (Lustre without ``-o flock``) is not guarded (a warning says so).

On S3 (``s3://...``) the lock is a lease: the object ``.hrsa_train.lock``, created with a conditional PUT
(``If-None-Match: *``, as the store's exactly-once records are) and renewed by the holder every
:data:`RENEW_SECONDS` with ``If-Match`` on its own ETag. A holder that stopped renewing for :data:`LEASE_SECONDS`
(by the server's clock: its ``Date`` against the object's ``Last-Modified``) is gone, and the next training takes the
lease over, again conditionally. A holder that finds its lease taken (it could not renew for that long) logs it at
once and raises :class:`RunInUseError` when its training ends: its checkpoints since may mix two runs. Other object
stores (``gs://``...) are not guarded.
"""

from __future__ import annotations

import email.utils
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from hrsa.runtime.locations import Location
from hrsa.store.errors import UserError
from hrsa.store.objects import is_precondition_failure

__all__ = ["LEASE_SECONDS", "LOCK_FILE", "RENEW_SECONDS", "RunInUseError", "exclusive_run", "refuse_if_in_use"]

LOCK_FILE = ".hrsa_train.lock"
LEASE_SECONDS = 60.0  # an S3 lease not renewed for this long is its holder's no more (its driver or node is gone)
RENEW_SECONDS = 15.0  # the holder renews it this often: three renewals may fail (a slow request) before it lapses
_TAKE_ATTEMPTS = 20  # rounds of create / read / take over before a start that keeps conflicting gives up
_UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}  # a filesystem without flock

log = logging.getLogger(__name__)


class RunInUseError(UserError, RuntimeError):
    """Another training is running into the same run folder."""


def refuse_if_in_use(run: Location) -> None:
    """Raise :class:`RunInUseError` when another process holds ``run`` now; creates nothing (a folder or lock file
    that is not there is not held)."""
    if not run.is_local:
        if run.url.startswith("s3://"):
            _S3Lease(run).refuse_if_held()
        return
    try:
        lock = open(run.local_path() / LOCK_FILE, "r+")  # for writing: NFS grants an exclusive lock to writers only
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    with lock:
        _take(lock, run, warn=False)


@contextmanager
def exclusive_run(run: Location) -> Iterator[threading.Event]:
    """Hold ``run`` (a local or shared folder, created if absent, or an S3 folder) for this process until the block
    ends. Yields an Event set if the hold is lost meanwhile (an S3 lease taken over): stop the training then.

    Raises:
        RunInUseError: another process holds it (the message names its pid and host), or, at the end, the S3
            lease was taken over while the block ran.
    """
    never = threading.Event()  # a kernel's lock is not lost while its holder lives
    if not run.is_local:
        if not run.url.startswith("s3://"):
            log.warning("%s is not on S3 nor a local or shared folder: this training is not guarded against another "
                        "into it", run.url)
            yield never
            return
        with _S3Lease(run).held() as lost:
            yield lost
        return
    folder = run.local_path()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        lock = open(folder / LOCK_FILE, "a+")
    except PermissionError:  # another user's lock file in a shared folder: that user's run is not ours to judge
        log.warning("cannot open %s: this training is not guarded against another into the same folder",
                    folder / LOCK_FILE)
        yield never
        return
    with lock:
        if _take(lock, run):
            lock.truncate(0)  # who holds it, for the message of a refused run; the lock itself is the kernel's
            lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
            lock.flush()
        yield never


def _take(lock: IO[str], run: Location, *, warn: bool = True) -> bool:
    """flock ``lock`` exclusively without waiting: True once held, False where the filesystem has no flock (warned).

    Raises:
        RunInUseError: another process holds it.
    """
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        raise RunInUseError(f"Expected no other training running into {run.url}. Got one ({holder}) instead. Wait "
                            f"for it to end, or train into another --output (if its host is gone for good, delete "
                            f"{run.local_path() / LOCK_FILE}).") from None
    except OSError as error:
        if error.errno not in _UNSUPPORTED:
            raise
        if warn:
            log.warning("the filesystem of %s has no flock (%s): this training is not guarded against another into "
                        "the same folder", run.url, error.strerror)
        return False


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


class _Conflict(Exception):
    """A conditional request lost: the lease is not as this process last saw it."""


class _S3Lease:
    """The lease on an S3 run folder: ``.hrsa_train.lock`` holding who has it and a token of its own."""

    def __init__(self, run: Location) -> None:
        import fsspec

        self.run = run
        self.fs = fsspec.filesystem("s3", use_listings_cache=False)
        bucket, _, prefix = run.path.partition("/")
        self.bucket, self.key = bucket, f"{prefix.rstrip('/')}/{LOCK_FILE}"

    def refuse_if_held(self) -> None:
        """Raise :class:`RunInUseError` when a live lease is on the folder; creates nothing."""
        found = self._read()
        if found is not None and found["age"] < LEASE_SECONDS:
            raise self._in_use(found)

    @contextmanager
    def held(self) -> Iterator[threading.Event]:
        """Hold the lease, renewed in a thread, until the block ends; then let it go. Yields an Event set the
        moment the lease is found taken (the training should stop then)."""
        body = json.dumps({"holder": _holder(), "token": uuid.uuid4().hex}).encode()
        etag = self._take(body)
        lost, done = threading.Event(), threading.Event()
        renewer = threading.Thread(target=self._renew, args=(body, etag, lost, done), daemon=True,
                                   name="hrsa-train-lease")
        renewer.start()
        try:
            yield lost
        finally:
            done.set()
            renewer.join()
            self._let_go(body, lost)
        if lost.is_set():
            raise RunInUseError(f"Expected this training to hold {self.run.url} to its end. Got its lease taken over "
                                "by another training instead (this one could not renew it for "
                                f"{LEASE_SECONDS:.0f} s): its checkpoints since may mix both runs. Train again into "
                                "a new --output.")

    def _take(self, body: bytes) -> str:
        """Create the lease object, or take over one whose holder stopped renewing it; its ETag."""
        for attempt in range(_TAKE_ATTEMPTS):
            if attempt:
                time.sleep(min(0.1 * 2**attempt, 2.0))  # a racing write still landing, or just released
            try:
                return self._put(body, IfNoneMatch="*")
            except _Conflict:
                pass
            found = self._read()
            if found is None:  # released between the create and the read (or S3's 409 for a racing create)
                continue
            if found["age"] < LEASE_SECONDS:
                raise self._in_use(found)
            log.warning("taking over %s: its holder (%s) has not renewed it for %.0f s", self.run.url,
                        found["holder"], found["age"])
            try:
                etag = self._put(body, IfMatch=found["etag"])
            except _Conflict:
                continue  # another training took it over first: it is now a live lease, refused on the next round
            if self._etag_if_ours(body) != etag:  # a server that ignored the condition: the last writer has it
                raise self._in_use(self._read() or found)
            return etag
        raise UserError(f"Expected to take the training lock {self.run.child(LOCK_FILE).url}. Got {_TAKE_ATTEMPTS} "
                        "conflicting attempts instead (other trainings starting at the same moment). Try again.")

    def _renew(self, body: bytes, etag: str, lost: threading.Event, done: threading.Event) -> None:
        """Every RENEW_SECONDS, rewrite the lease if it is still ours. A failed renewal is retried next round, but a
        holder that has not renewed for nearly a lease stops as if it had lost it: another may take it over any
        moment, and nothing may tell this one (a partition, expired credentials)."""
        renewed = time.monotonic()
        while not done.wait(RENEW_SECONDS):
            try:
                etag = self._put(body, IfMatch=etag)
                renewed = time.monotonic()
                continue
            except (_Conflict, FileNotFoundError):
                ours = self._quietly(lambda: self._etag_if_ours(body))
                if ours:  # S3's 409 for a racing conditional write (a refused start): still ours
                    etag, renewed = ours, time.monotonic()
                    continue
                why = "taken over (or deleted)"
            except UserError as error:
                if time.monotonic() - renewed < LEASE_SECONDS - RENEW_SECONDS:
                    log.warning("could not renew the lease on %s (%s): retrying in %.0f s", self.run.url, error,
                                RENEW_SECONDS)
                    continue
                why = f"not renewed for {time.monotonic() - renewed:.0f} s ({error})"
            lost.set()
            log.error("lost the lease on %s, %s: stopping this training (its checkpoints from now on could mix with "
                      "another run's)", self.run.url, why)
            return

    def _let_go(self, body: bytes, lost: threading.Event) -> None:
        """Delete the lease if it is still ours; set ``lost`` where it is not (taken over since the last renewal)."""
        if lost.is_set():
            return
        try:
            etag = self._etag_if_ours(body)
            if etag is None:
                log.error("lost the lease on %s during this training (taken over, or deleted)", self.run.url)
                lost.set()
                return
            self._s3("delete_object", IfMatch=etag)
        except _Conflict:  # taken over between the read and the delete
            log.error("lost the lease on %s during this training (taken over)", self.run.url)
            lost.set()
        except UserError as error:  # unreachable: the lease lapses
            log.warning("could not let go of the lease on %s (%s): it lapses in %.0f s", self.run.url, error,
                        LEASE_SECONDS)

    def _etag_if_ours(self, body: bytes) -> str | None:
        """The lease's ETag if it holds ``body`` (this holder's token), else None."""
        got = self._get()
        return got[1] if got is not None and got[0] == body else None

    def _get(self, **condition: str) -> tuple[bytes, str] | None:
        """The lease's bytes and ETag; None when there is none."""
        from fsspec.asyn import sync

        def read() -> tuple[bytes, str]:
            got = self.fs.call_s3("get_object", Bucket=self.bucket, Key=self.key, **condition)
            return bytes(sync(self.fs.loop, got["Body"].read)), str(got["ETag"])

        try:
            return self._mapped(read)
        except FileNotFoundError:
            return None

    def _put(self, body: bytes, **condition: str) -> str:
        return str(self._s3("put_object", Body=body, **condition)["ETag"])

    def _s3(self, method: str, **kwargs: Any) -> Any:
        """One request on the lease object (see :meth:`_mapped` for its errors)."""
        return self._mapped(lambda: self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs))

    def _mapped(self, request: Any) -> Any:
        """``request()``, its errors mapped: a lost condition (412, or S3's 409 for a conditional request racing
        another) is :class:`_Conflict`; an absent object FileNotFoundError; any other storage error one line."""
        from hrsa.store.opening import from_storage

        try:
            return request()
        except FileNotFoundError:
            raise
        except Exception as error:
            if is_precondition_failure(error) or "ConditionalRequestConflict" in f"{error} {error.__cause__}":
                raise _Conflict(str(error)) from error
            if not from_storage(error):
                raise
            raise UserError(f"Expected to reach the training lock {self.run.child(LOCK_FILE).url}. Got "
                            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} instead. "
                            "Check the credentials and endpoint (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL...).") from error

    def _read(self) -> dict[str, Any] | None:
        """The lease's holder, ETag and age in seconds by the server's clock; None when there is none."""
        try:
            head = self._s3("head_object")
            got = self._get(IfMatch=head["ETag"])
        except FileNotFoundError:
            return None
        except _Conflict:  # renewed between the two requests: alive
            return {"holder": "another process", "etag": "", "age": 0.0}
        if got is None:
            return None
        try:
            holder = str(json.loads(got[0])["holder"])
        except (ValueError, KeyError, TypeError):
            holder = "another process"
        date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
        return {"holder": holder, "etag": head["ETag"], "age": now - head["LastModified"].timestamp()}

    @staticmethod
    def _quietly(read: Any) -> Any:
        """``read()``, or None whatever goes wrong (for a thread that must not die before it reports)."""
        try:
            return read()
        except Exception:
            return None

    def _in_use(self, found: dict[str, Any]) -> RunInUseError:
        return RunInUseError(f"Expected no other training running into {self.run.url}. Got one ({found['holder']}, "
                             f"lease renewed {found['age']:.0f} s ago) instead. Wait for it to end, or train into "
                             f"another --output (a lease not renewed for {LEASE_SECONDS:.0f} s is taken over; if its driver is gone "
                             f"for good, delete {self.run.child(LOCK_FILE).url}).")
