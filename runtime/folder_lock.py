"""One writer at a time per folder: a training's run folder (:mod:`hrsa.train.run_lock`), a pipeline's ``out``
(:mod:`hrsa.cluster.runner`). A :class:`FolderLock` names the lock file and what holds it; the writer holds an
exclusive lock on that file (:meth:`FolderLock.exclusive`). A second writer is refused in one line, with exit code
2: at its start by :meth:`FolderLock.refuse_if_in_use` (it creates nothing), and for certain when it takes the lock
itself, which closes the race between two starts.

On a local or shared folder the lock is ``flock`` on the file: the kernel drops it when the holder exits, however
it ends (a SIGKILLed driver leaves no stale lock to clear by hand). Linux's NFS client maps it onto NFS locks where
the mount has locking on (not ``nolock`` nor ``local_lock=flock``), so drivers on different nodes exclude each other
there; a driver whose whole node died holds an NFS lock until the server's lease expires (NFSv4: ~90 s). A
filesystem that refuses flock (Lustre without ``-o flock``) is not guarded (a warning says so).

On S3 (``s3://...``) the lock is a lease: the lock file as an object, created with a conditional PUT
(``If-None-Match: *``, as the store's exactly-once records are) and renewed by the holder every
:data:`RENEW_SECONDS` with ``If-Match`` on its own ETag. A holder that stopped renewing for :data:`LEASE_SECONDS`
(by the server's clock: its ``Date`` against the object's ``Last-Modified``) is gone, and the next writer takes the
lease over, again conditionally. A holder that finds its lease taken (it could not renew for that long) logs it at
once and raises :class:`FolderInUseError` when its block ends: what it wrote since may mix two writers' work. Other
object stores (``gs://``...) are not guarded.
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
from dataclasses import dataclass
from typing import IO, Any

from hrsa.runtime.locations import Location
from hrsa.store.errors import UserError
from hrsa.store.objects import is_precondition_failure

__all__ = ["LEASE_SECONDS", "RENEW_SECONDS", "FolderInUseError", "FolderLock"]

LEASE_SECONDS = 60.0  # an S3 lease not renewed for this long is its holder's no more (its driver or node is gone)
RENEW_SECONDS = 15.0  # the holder renews it this often: three renewals may fail (a slow request) before it lapses
_TAKE_ATTEMPTS = 20  # rounds of create / read / take over before a start that keeps conflicting gives up
# A filesystem without flock; EBADF: NFS, asked for an exclusive lock through a file opened for reading only.
_UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}

log = logging.getLogger(__name__)


class FolderInUseError(UserError, RuntimeError):
    """Another process is writing into the same folder."""


@dataclass(frozen=True)
class FolderLock:
    """The lock of one kind of writer.

    Attributes:
        lock_file: its name in the folder (``.hrsa_train.lock``).
        holder: what holds it, as messages name it ("training").
        elsewhere: what a refused writer may do instead ("train into another --output").
    """

    lock_file: str
    holder: str
    elsewhere: str

    def refuse_if_in_use(self, folder: Location) -> None:
        """Raise :class:`FolderInUseError` when another process holds ``folder`` now; creates nothing (a folder or
        lock file that is not there is not held)."""
        if not folder.is_local:
            if folder.url.startswith("s3://"):
                _S3Lease(self, folder).refuse_if_held()
            return
        try:
            lock = _open_lock(folder.local_path() / self.lock_file, "r+")
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        with lock:
            self._take(lock, folder, warn=False)

    @contextmanager
    def exclusive(self, folder: Location) -> Iterator[threading.Event]:
        """Hold ``folder`` (a local or shared folder, created if absent, or an S3 folder) for this process until the
        block ends. Yields an Event set if the hold is lost meanwhile (an S3 lease taken over): stop writing then.

        Raises:
            FolderInUseError: another process holds it (the message names its pid and host), or, at the end, the S3
                lease was taken over while the block ran.
        """
        never = threading.Event()  # a kernel's lock is not lost while its holder lives
        if not folder.is_local:
            if not folder.url.startswith("s3://"):
                log.warning("%s is not on S3 nor a local or shared folder: this %s is not guarded against another "
                            "into it", folder.url, self.holder)
                yield never
                return
            with _S3Lease(self, folder).held() as lost:
                yield lost
            return
        path = folder.local_path()
        path.mkdir(parents=True, exist_ok=True)
        try:
            lock = _open_lock(path / self.lock_file, "a+")
        except PermissionError:  # not even readable: nothing to lock with
            log.warning("cannot open %s: this %s is not guarded against another into the same folder",
                        path / self.lock_file, self.holder)
            yield never
            return
        with lock:
            if self._take(lock, folder) and lock.writable():
                lock.truncate(0)  # who holds it, for the message of a refused writer; the lock itself is the kernel's
                lock.write(_holder())
                lock.flush()
            yield never

    def lost(self, folder: Location) -> FolderInUseError:
        """The error of a holder whose S3 lease was taken over while it wrote."""
        return FolderInUseError(f"Expected this {self.holder} to hold {folder.url} to its end. Got its lease taken "
                                f"over by another {self.holder} instead (this one could not renew it for "
                                f"{LEASE_SECONDS:.0f} s): what it wrote since may mix with the other's. Run again "
                                "into a new folder.")

    def in_use(self, folder: Location, holder: str, how_to_free: str) -> FolderInUseError:
        return FolderInUseError(f"Expected no other {self.holder} running into {folder.url}. Got one ({holder}) "
                                f"instead. Wait for it to end, or {self.elsewhere} ({how_to_free}).")

    def _take(self, lock: IO[str], folder: Location, *, warn: bool = True) -> bool:
        """flock ``lock`` exclusively without waiting: True once held, False where the filesystem has no flock
        (warned).

        Raises:
            FolderInUseError: another process holds it.
        """
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise self.in_use(folder, holder, "if its host is gone for good, delete "
                                              f"{folder.local_path() / self.lock_file}") from None
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                raise
            if warn:
                log.warning("the filesystem of %s has no flock (%s): this %s is not guarded against another into "
                            "the same folder", folder.url, error.strerror, self.holder)
            return False


def _open_lock(path: Any, mode: str) -> IO[str]:
    """The lock file opened for writing (NFS grants an exclusive lock to writers only), or for reading where it
    is another user's (in a group's shared folder): a local disk's flock excludes through either."""
    try:
        return open(path, mode)
    except PermissionError:
        return open(path)


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


class _Conflict(Exception):
    """A conditional request lost: the lease is not as this process last saw it."""


class _S3Lease:
    """The lease on an S3 folder: the lock file, holding who has it and a token of its own."""

    def __init__(self, kind: FolderLock, run: Location) -> None:
        import fsspec

        self.kind, self.run = kind, run
        self.fs = fsspec.filesystem("s3", use_listings_cache=False)
        bucket, _, prefix = run.path.partition("/")
        self.bucket, self.key = bucket, f"{prefix.rstrip('/')}/{kind.lock_file}"

    def refuse_if_held(self) -> None:
        """Raise :class:`FolderInUseError` when a live lease is on the folder; creates nothing."""
        found = self._read()
        if found is not None and found["age"] < LEASE_SECONDS:
            raise self._in_use(found)

    @contextmanager
    def held(self) -> Iterator[threading.Event]:
        """Hold the lease, renewed in a thread, until the block ends; then let it go. Yields an Event set the
        moment the lease is found taken (the writer should stop then)."""
        body = json.dumps({"holder": _holder(), "token": uuid.uuid4().hex}).encode()
        etag = self._take(body)
        lost, done = threading.Event(), threading.Event()
        renewer = threading.Thread(target=self._renew, args=(body, etag, lost, done), daemon=True,
                                   name=f"hrsa-lease{self.kind.lock_file}")
        renewer.start()
        try:
            yield lost
        finally:
            done.set()
            renewer.join()
            self._let_go(body, lost)
        if lost.is_set():
            raise self.kind.lost(self.run)

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
                continue  # another writer took it over first: it is now a live lease, refused on the next round
            if self._etag_if_ours(body) != etag:  # a server that ignored the condition: the last writer has it
                raise self._in_use(self._read() or found)
            return etag
        raise UserError(f"Expected to take the {self.kind.holder} lock {self._url}. Got {_TAKE_ATTEMPTS} conflicting "
                        f"attempts instead (others starting at the same moment). Try again.")

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
            log.error("lost the lease on %s, %s: stopping this %s (what it writes from now on could mix with "
                      "another's)", self.run.url, why, self.kind.holder)
            return

    def _let_go(self, body: bytes, lost: threading.Event) -> None:
        """Delete the lease if it is still ours; set ``lost`` where it is not (taken over since the last renewal)."""
        if lost.is_set():
            return
        try:
            etag = self._etag_if_ours(body)
            if etag is None:
                log.error("lost the lease on %s during this %s (taken over, or deleted)", self.run.url,
                          self.kind.holder)
                lost.set()
                return
            self._s3("delete_object", IfMatch=etag)
        except _Conflict:  # taken over between the read and the delete
            log.error("lost the lease on %s during this %s (taken over)", self.run.url, self.kind.holder)
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
            raise UserError(f"Expected to reach the {self.kind.holder} lock {self._url}. Got "
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

    @property
    def _url(self) -> str:
        return self.run.child(self.kind.lock_file).url

    def _in_use(self, found: dict[str, Any]) -> FolderInUseError:
        return self.kind.in_use(self.run, f"{found['holder']}, lease renewed {found['age']:.0f} s ago",
                                f"a lease not renewed for {LEASE_SECONDS:.0f} s is taken over; if its driver is gone "
                                f"for good, delete {self._url}")
