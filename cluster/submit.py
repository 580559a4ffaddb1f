"""``hrsa submit``: run a pipeline on a Ray cluster through Ray's job submission API.

What travels with the job (its ``runtime_env``):

- ``working_dir``: the project folder (default: the current one) with the pipeline file inside it, so
  the pipeline's relative paths (corpora, training data) mean on the cluster what they mean here. Left
  out: version control, virtual environments, caches, build outputs, the pipeline's own local outputs
  (store, out, training runs), what .gitignore lists (Ray applies it), and any file over 16 MiB. Ray caps
  the upload at 100 MiB; larger data belongs on the shared store (s3://...) or a hub.
- ``py_modules``: this hrsa's own source, copied as a folder named ``hrsa``. The job therefore runs the
  code that was submitted, whether or not the cluster has hrsa installed: a package found there is
  shadowed, as ``py_modules`` come first on the path. Its dependencies (torch, transformers, zarr...)
  must be installed on the cluster's image: the manifests in cluster/manifests install them with hrsa.
  ``--pip-deps`` asks Ray to install them per job instead (slow: torch alone is gigabytes).
- the entrypoint ``python -m hrsa run <pipeline>``; inside a job Ray sets ``RAY_ADDRESS``, so every
  stage joins the cluster.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hrsa.store.errors import HrsaError, UserError

__all__ = ["DEFAULT_ADDRESS", "JobFailedError", "SubmitResult", "compute_excludes", "runtime_env", "submit_pipeline"]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
UPLOAD_LIMIT = 100 << 20  # Ray's cap on a working_dir package
LARGE_FILE = 16 << 20  # files above this stay home: data of that size belongs on the store or a hub
# gitignore syntax (Ray's matcher) and fnmatch on names (the size count here) alike: a bare ".whl" would match only
# a file literally so named, "*.whl" every wheel.
_ALWAYS_EXCLUDED = (".git", ".venv", "venv", ".tox", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".hypothesis",
                    ".ruff_cache", ".mypy_cache", "build", "dist", "hrsa-out", "*.whl", "*.gl")
_PACKAGE_SKIP = {"tests", "benchmarks", "configs", ".ci"}


class JobFailedError(HrsaError, RuntimeError):
    """The submitted job ended in FAILED or STOPPED (exit code 1: see its logs)."""


@dataclass(frozen=True)
class SubmitResult:
    """A submitted job: its id, the dashboard it went to, and its final status (None with ``wait=False``)."""

    job_id: str
    address: str
    status: str | None


def submit_pipeline(pipeline: str | Path, *, address: str | None = None, working_dir: str | Path | None = None,
                    env: Mapping[str, str] | None = None, pip_deps: bool = False, wait: bool = True,
                    out: str | None = None, echo: Callable[[str], None] = print) -> SubmitResult:
    """Submit ``hrsa run <pipeline>`` as a Ray job; by default follow its logs until it ends.

    Args:
        pipeline: the pipeline YAML, inside ``working_dir``; validated here before anything is uploaded.
        address: the dashboard URL (default ``RAY_ADDRESS``, else http://127.0.0.1:8265).
        working_dir: the folder shipped as the job's working directory (default: the current one).
        env: environment variables of the job (e.g. HF_TOKEN read from here, never from the pipeline).
        pip_deps: also have Ray pip-install hrsa's dependencies for the job.
        wait: follow the logs and return the final status; False returns once the job is accepted.
        out: the job's ``hrsa run --out`` (e.g. s3://bucket/hrsa/out, which outlives the cluster).
        echo: where lines go (job id, logs).

    Raises:
        UserError: an invalid pipeline, a pipeline outside the working directory, an upload over Ray's cap,
            or no dashboard at the address.
        JobFailedError: with ``wait``, the job failed or was stopped.
    """
    from hrsa.cluster.pipeline import load_pipeline
    from hrsa.runtime.settings import paths_elsewhere

    # Step 1: check everything here, before any upload.
    path, root = Path(pipeline).resolve(), Path(working_dir or Path.cwd()).resolve()
    with paths_elsewhere():  # its folders are the cluster's (/mnt/efs/...): writable there, checked by the job
        config = load_pipeline(path, out=out)
    if not path.is_relative_to(root):
        raise UserError(f"Expected the pipeline inside the working directory {root}. Got {path} instead. "
                        "Move it there, or pass --working-dir with a folder that holds it.")
    _check_outputs_outlive_the_job(config)
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    outputs = [config.store, str(config.out), *(str(tc.output) for tc in config.train.values())]
    # What stays home, checked before the cluster is contacted: the upload fits Ray's cap, and the job has its inputs.
    excludes = compute_excludes(root, outputs=outputs, inputs=_pipeline_inputs(config, root))
    # Step 2: the job, with this hrsa's source staged as a folder named hrsa.
    client = _client(address)
    with _staged_package() as package:
        job_id = client.submit_job(entrypoint=run_command(path.relative_to(root).as_posix(), out=out),
                                   runtime_env=runtime_env(root, package, excludes=excludes, env=env, pip_deps=pip_deps),
                                   metadata={"hrsa_pipeline": path.name})
    echo(f"submitted job {job_id} to {address}")
    if not wait:
        echo(f"follow it with: ray job logs --follow --address {address} {job_id}")
        return SubmitResult(job_id, address, None)
    # Step 3: follow the logs; the job's status decides the exit code.
    try:
        asyncio.run(_follow(client, job_id, echo))
    except KeyboardInterrupt:
        echo(f"\nstopped following; the job goes on (stop it with: ray job stop --address {address} {job_id})")
        raise
    status = str(client.get_job_status(job_id))
    if status != "SUCCEEDED":
        raise JobFailedError(f"Expected job {job_id} to succeed. Got {status} instead. Its logs are above "
                             f"(again: ray job logs --address {address} {job_id}).")
    echo(f"job {job_id} {status}")
    return SubmitResult(job_id, address, status)


def _check_outputs_outlive_the_job(config: Any) -> None:
    """Refuse a relative local store, out or training output: on the cluster it means a folder inside Ray's copy of
    the working directory, which Ray names by a digest of its content and deletes once no job uses it. A
    re-submission after any edit then found none of its state and ran every stage again (retraining from scratch
    under the default ``<out>/train/<run>``), and the results went with the copy."""
    named = {"store": config.store, "out": str(config.out),
             **{f"train.{run}.output": str(tc.output) for run, tc in config.train.items()}}
    for key, value in named.items():
        if "://" not in value and not Path(value).expanduser().is_absolute():
            raise UserError(
                f"Expected {key} of a submitted pipeline on storage that outlives the job: a URL (s3://BUCKET/...) or "
                f"an absolute path on the cluster. Got {value} instead, which on the cluster is a folder inside Ray's "
                "copy of the working directory (named by its content, deleted once unused): a re-submission would "
                "start over. "
                + ("Set store: in the pipeline file to s3://BUCKET/hrsa/store or an absolute path (--out does not move "
                   "the store)." if key == "store" else
                   "Pass --out s3://BUCKET/hrsa/out (training runs follow it), or give absolute paths.")
            )


def run_command(pipeline: str, *, out: str | None = None) -> str:
    """The job's entrypoint: ``python -m hrsa run PIPELINE [--out OUT]``."""
    return shlex.join(["python", "-m", "hrsa", "run", pipeline, *(["--out", out] if out else [])])


def runtime_env(root: Path, package: Path, *, outputs: Sequence[str] = (), excludes: Sequence[str] | None = None,
                env: Mapping[str, str] | None = None, pip_deps: bool = False) -> dict[str, Any]:
    """The job's runtime_env: ``root`` as working_dir (with ``excludes``, default :func:`compute_excludes` of
    ``outputs``), ``package`` as py_modules."""
    excludes = list(excludes) if excludes is not None else compute_excludes(root, outputs=outputs)
    out: dict[str, Any] = {"working_dir": str(root), "excludes": excludes,
                           "py_modules": [str(package)]}
    if env:
        out["env_vars"] = dict(env)
    if pip_deps:
        out["pip"] = _dependencies()
    return out


def compute_excludes(root: Path, *, outputs: Sequence[str] = (), inputs: Mapping[str, str] | None = None,
                     large: int | None = None, limit: int = UPLOAD_LIMIT) -> list[str]:
    """Patterns (gitignore syntax, relative to ``root``) of what stays home; checks the rest fits Ray's cap, and that
    every input the pipeline reads from inside ``root`` travels.

    What travels is counted as Ray walks the folder (:func:`_uploaded`: ``.gitignore`` and ``.rayignore`` applied), so
    a folder listed there, as the cap's message suggests, no longer counts.

    Args:
        root: the working directory.
        outputs: local paths the pipeline writes (store, out, training runs): excluded when inside ``root``.
        inputs: local paths the pipeline reads (corpora, labels, training data, model folders), relative ones meaning
            ``root``'s (the job's working directory), by the key that names each (``corpora.cot.path``).
        large: files above this many bytes are excluded one by one (default LARGE_FILE).
        limit: the most bytes the upload may hold.

    Raises:
        UserError: what remains is over ``limit``, or an input inside ``root`` (a file, or a file of a folder) stays
            home: the job would miss it, or read a folder without it.
    """
    large = LARGE_FILE if large is None else large
    excludes = list(_ALWAYS_EXCLUDED)
    for output in outputs:
        p = Path(output).expanduser()
        if "://" not in output and (p := p.resolve()).is_relative_to(root) and p != root:
            excludes.append("/" + p.relative_to(root).as_posix())
    total, biggest, kept, large_files = 0, [], set(), set()
    for path, size in _uploaded(root, excludes):
        if size > large:
            excludes.append("/" + path.relative_to(root).as_posix())
            large_files.add(path.resolve())
            continue
        total += size
        biggest.append((size, path))
        kept.add(path.resolve())
    _check_inputs_travel(root, inputs or {}, kept, large_files, large)
    if total > limit:
        top = ", ".join(f"{p.relative_to(root)} ({s >> 20} MiB)" for s, p in sorted(biggest, reverse=True)[:3])
        raise UserError(f"Expected at most {limit >> 20} MiB in the working directory {root} (Ray's upload cap). Got "
                        f"{total >> 20} MiB instead, largest: {top}. Move data to the store or a hub, list it in "
                        ".gitignore or .rayignore, or pass --working-dir with a smaller folder.")
    return excludes


def _pipeline_inputs(config: Any, root: Path) -> dict[str, str]:
    """The local paths the pipeline reads, by the key naming each: corpora and their labels, pairs' labels, training
    data and backbones, model folders, evaluations' task files (URLs, hub ids and ``packaged:`` names left out: only a
    path can stay home)."""
    found: dict[str, str] = {}
    for name, corpus in config.corpora.items():
        found[f"corpora.{name}.path"] = corpus.path
        if corpus.labels:
            found[f"corpora.{name}.labels"] = corpus.labels
    for i, pair in enumerate(config.pairs):
        if getattr(pair, "labels", None):
            found[f"pairs.{i}.labels"] = pair.labels
    for run, tc in config.train.items():
        found[f"train.{run}.data"] = str(tc.data)
        found[f"train.{run}.backbone"] = str(tc.backbone)
    for name, entry in config.models.items():
        if entry.model is not None:
            found[f"models.{name}.model"] = str(entry.model)
    for name, ec in config.eval.items():  # local task files (read on the driver; the task ships them on)
        paths = [path for path in (_task_file(t, root) for t in ec.tasks) if path is not None]
        found.update({f"eval.{name}.tasks" + (f"[{i}]" if len(paths) > 1 else ""): p for i, p in enumerate(paths)})
    return {key: value for key, value in found.items()
            if "://" not in value and not value.startswith(("hf:", "packaged:"))}


def _task_file(spec: str, root: Path) -> str | None:
    """The file of a local eval task (``retrieval:FILE``, ``classification:FILE[:TEXT[:LABEL]]``), as written (relative
    to ``root``, the job's working directory, not this process's); None for an MTEB name. A classification file whose
    name holds ``:`` is taken whole where it exists, as `hrsa eval` takes it."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("retrieval", "classification"):
        return None
    whole = Path(rest).expanduser()
    if kind == "retrieval" or (whole if whole.is_absolute() else root / whole).is_file():
        return rest
    return rest.split(":")[0]


def _check_inputs_travel(root: Path, inputs: Mapping[str, str], kept: set[Path], large_files: set[Path],
                         large: int) -> None:
    """Refuse an input inside ``root`` with a file that does not travel (see :func:`compute_excludes`)."""
    for key, value in inputs.items():
        path = Path(value).expanduser()
        path = (path if path.is_absolute() else root / path).resolve()
        if not path.is_relative_to(root) or not path.exists():  # elsewhere: the cluster's own path (checked there)
            continue
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        home = [p for p in files if p not in kept]
        if home:
            first = home[0]
            why = (f"over {large >> 20} MiB" if first in large_files else
                   "ignored: .gitignore, .rayignore or hrsa submit's own exclusions")
            raise UserError(
                f"Expected every file of {value} ({key}) to travel with the job: it is inside the working directory, "
                f"so the job reads it there. Got {len(home)} left home, first {first.relative_to(root)} ({why}) "
                "instead: the job would miss it, or read the rest as if it were all. Put it on the store or a hub, name "
                "a path on storage the cluster's head reaches, or un-ignore it.")


def _uploaded(root: Path, excludes: Sequence[str]) -> Iterator[tuple[Path, int]]:
    """(path, size) of every file Ray packs of ``root`` with these excludes: its own walk, which applies the
    ``.gitignore`` (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and ``.rayignore`` files of each folder."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    found: list[tuple[Path, int]] = []

    def handler(path: Path) -> None:
        if path.is_file():
            found.append((path, path.stat().st_size))

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    _dir_travel(root, [_get_excludes(root, list(excludes))], handler, include_gitignore=include_gitignore)
    yield from found


@contextmanager
def _staged_package() -> Iterator[Path]:
    """This hrsa's Python source, copied into a temporary folder named ``hrsa`` (the import name).

    The source tree's own folder may have any name (a checkout is the package itself), and py_modules
    imports a folder by its name; tests, benchmarks and configs stay out.
    """
    import hrsa

    source = Path(hrsa.__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="hrsa-submit-") as tmp:
        target = Path(tmp) / "hrsa"
        for folder, dirs, files in os.walk(source):
            here = Path(folder)
            # Subpackages only (folders with an __init__.py): no virtualenv, tests or data come along.
            dirs[:] = [d for d in dirs if d not in _PACKAGE_SKIP and (here / d / "__init__.py").is_file()]
            for name in files:
                if name.endswith(".py") or name == "py.typed":
                    dest = target / (here / name).relative_to(source)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(here / name, dest)
        yield target


def _dependencies() -> list[str]:
    """hrsa's declared dependencies (no extras), for ``runtime_env["pip"]``."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        return [r for r in requires("hrsa") or [] if "extra ==" not in r]
    except PackageNotFoundError:
        raise UserError("Expected hrsa installed (pip install -e .) to read its dependencies for --pip-deps. Got a source "
                        "tree only. Install it, or drop --pip-deps.") from None


def _client(address: str) -> Any:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from hrsa.runtime.connection import RayConnectionError

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise RayConnectionError(f"Expected access to the Ray dashboard at {address}. Got 'authentication required' "
                                 "instead: the cluster uses token authentication. Export RAY_AUTH_MODE=token and the "
                                 "cluster's token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token).") from None
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise RayConnectionError(f"Expected a Ray dashboard at {address}. Got {type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''} instead. Pass --address "
                                 "http://HEAD:8265 (or set RAY_ADDRESS), and check the dashboard port is reachable.") from None


async def _follow(client: Any, job_id: str, echo: Callable[[str], None]) -> None:
    async for lines in client.tail_job_logs(job_id):
        echo(lines.rstrip("\n"))
