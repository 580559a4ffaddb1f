"""A pipeline's ``out`` on remote storage (``out: s3://bucket/hrsa/out``), so that a cluster that tears down (a
KubeRay RayJob) keeps the results, the dynamics, the report and ``pipeline-state.json``.

The stages write into a local folder as always (the analysis and the report know files, not URLs);
:class:`PublishedOut` mirrors that folder to the remote ``out``. It starts from the remote copy, so a re-run on a new
cluster finds what is done there and skips it, and it uploads what changed every time the pipeline's state file is
written: a stage writes its outputs before it records itself done, and the state file goes up last, so the remote
state never names an output that is not there yet. A file the stages removed locally (figures of an earlier
setting) is removed remotely too: the remote ``out`` is what one local ``out`` would hold.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hrsa.runtime.locations import Location, parse_location
from hrsa.store.errors import HrsaError

__all__ = ["PublishedOut", "RemoteOutError"]


class RemoteOutError(HrsaError, OSError):
    """The remote ``out`` could not be read or written (a network or storage error): exit code 1, re-run to resume."""


@contextmanager
def _reaching(remote: Location, what: str) -> Iterator[None]:
    """An error of the storage while ``what`` is one line naming the out and what a re-run does, not a traceback (the
    remote state is still whole: it goes up last)."""
    try:
        yield
    except OSError as error:
        raise RemoteOutError(f"Expected to {what} the pipeline's out at {remote.url}. Got {type(error).__name__}: "
                             f"{error} instead. Re-run the same pipeline: it resumes from what reached {remote.url}."
                             ) from None


@dataclass
class PublishedOut:
    """A local working copy of a remote ``out``.

    Attributes:
        remote: the pipeline's ``out`` (``s3://...``).
        local: the folder the stages write into (a fresh temporary one, filled from ``remote``).
        state_file: the name of the file uploaded last (the pipeline's state).
    """

    remote: Location
    local: Path
    state_file: str
    skip: tuple[str, ...] = ()  # names never mirrored (the out's lock, which lives on the remote side only)
    # Folders never mirrored: what the stages write straight to the remote side (training runs under the out, a store
    # under it). A re-run downloaded every checkpoint of every recipe ever trained there, each object whole in memory
    # (a 7B run's optimizer state is tens of GB), and hashed all of them again at each push.
    skip_under: tuple[str, ...] = ()
    check: Callable[[], None] | None = None  # called before each push: raises to stop it (the out's lease lost)
    _sent: dict[str, str] = field(default_factory=dict)  # name -> digest of the content last uploaded

    @classmethod
    def open(cls, url: str, *, state_file: str, local: Path | None = None, skip: tuple[str, ...] = (),
             check: Callable[[], None] | None = None, skip_under: tuple[str, ...] = ()) -> PublishedOut:
        """A fresh local copy of the remote ``out`` at ``url`` (empty when nothing is there yet), in folder ``local``
        (created; default: a new temporary folder, left for the caller to read and remove).

        Raises:
            LocationError: a URL whose filesystem does not answer.
        """
        if local is None:
            local = Path(tempfile.mkdtemp(prefix="hrsa-out-"))
        local.mkdir(parents=True, exist_ok=True)
        if any(local.iterdir()):  # its files would be uploaded as the stages' own
            raise ValueError(f"Expected an empty folder for the local copy of {url}. Got {local} with files in it.")
        skip_under = tuple(f"{folder.strip('/')}/" for folder in skip_under if folder.strip("/"))
        published = cls(parse_location(url), local, state_file, skip=skip, skip_under=skip_under, check=check)
        published.pull()
        return published

    def pull(self) -> None:
        """Download every file of the remote ``out`` into the local copy (but those skipped)."""
        with _reaching(self.remote, "read"):
            names = self.remote.files()
        self._refuse_files_under_files(names)
        for name in names:
            if self._skipped(name):
                continue
            path = self.local / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with _reaching(self.remote, "read"):
                data = self.remote.child(name).read_bytes()
            path.write_bytes(data)
            self._sent[name] = _signature(path)

    def _refuse_files_under_files(self, names: list[str]) -> None:
        """Object storage holds ``a`` beside ``a/b`` (a stray upload); a folder cannot be both here: one line naming
        the two URLs, not an OSError about the temporary copy."""
        present = set(names)
        for name in names:
            parts = name.split("/")
            clash = next(("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) in present), None)
            if clash is not None:
                raise RemoteOutError(
                    f"Expected the pipeline's out at {self.remote.url} to hold each name as a file or a folder. Got both "
                    f"{self.remote.child(clash).url} and {self.remote.child(name).url} instead. Delete the stray one.")

    def push(self) -> None:
        """Upload what changed locally since the last push (the state file last), and remove remotely what the
        stages removed here.

        Raises:
            Exception: what ``check`` raises, before anything is uploaded (another run now holds the out).
        """
        if self.check is not None:
            self.check()
        with _reaching(self.remote, "write"):
            self._upload()

    def _upload(self) -> None:
        local = {name: p for p in self.local.rglob("*")
                 if p.is_file() and not self._skipped(name := p.relative_to(self.local).as_posix())}
        changed = [name for name, path in local.items() if self._sent.get(name) != _signature(path)]
        for name in sorted(n for n in changed if n != self.state_file):
            self.remote.child(name).write(local[name].read_bytes())
            self._sent[name] = _signature(local[name])
        # Removals before the state too: a run killed after the state went up left the figures of an earlier setting
        # beside the new results for good (the next run found the stage up to date and pulled them back).
        for name in [n for n in self._sent if n not in local]:
            self.remote.child(name).delete()
            del self._sent[name]
        if self.state_file in changed:  # last: the remote state never names an output that is not there yet
            self.remote.child(self.state_file).write(local[self.state_file].read_bytes())
            self._sent[self.state_file] = _signature(local[self.state_file])

    def _skipped(self, name: str) -> bool:
        return name in self.skip or name.startswith(self.skip_under)

    def url_of(self, path: Path | str) -> Path | str:
        """A file of the local copy by its URL in the remote ``out`` (what outlives the run); any other as it is."""
        if isinstance(path, Path) and path.is_relative_to(self.local):
            return self.remote.child(path.relative_to(self.local).as_posix()).url
        return path

    def shown(self, text: str) -> str:
        """``text`` (a message, a warning) with the local copy's paths written as the remote ``out``'s URLs: the copy
        is a temporary folder, gone once the run ends, and moving or fixing a file there fixes nothing."""
        for local in sorted({str(self.local), str(self.local.resolve())}, key=len, reverse=True):
            text = re.sub(re.escape(local) + r"(?![\w.-])", lambda _: self.remote.url, text)  # not /tmp/x in /tmp/x2
        return text

    @contextmanager
    def naming_urls(self) -> Iterator[None]:
        """hrsa's errors raised inside (and the warnings they carry) name the out's files by their URLs."""
        try:
            yield
        except HrsaError as error:
            error.args = tuple(self.shown(a) if isinstance(a, str) else a for a in error.args)
            error.warnings = tuple(self.shown(w) for w in error.warnings)
            raise


def _signature(path: Path) -> str:
    """The content's digest: a stage that rewrites a file with the same size within one tick of the file clock
    leaves size and modification time alike, and the remote copy would keep the old content."""
    from hrsa.runtime.fingerprint import file_digest

    return file_digest(path)
