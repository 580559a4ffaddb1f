"""The tasks of ``hrsa eval``: parsing ``--tasks`` specs, checking the Hugging Face hub, building mteb tasks.

Task specs (``--tasks``, repeatable or comma-separated):

- ``retrieval:FILE``: JSON lines with query, pos (optional negs, instruction); nDCG@10 over all pos + negs.
- ``classification:FILE[:TEXT_FIELD[:LABEL_FIELD]]``: JSON lines with a text and a label (default fields
  ``text`` and ``label``); accuracy of a logistic regression fitted on a stratified half.
- ``NAME`` or ``mteb:NAME``: an MTEB task (``SciFact``) or benchmark (``MTEB(eng, v2)``); its data comes
  from the Hugging Face hub, or, where the hub cannot be used (offline, no connection), from the local datasets
  cache at the revision mteb pins (a clear error when it is not there, or when another revision is there too).

Every mistake here is an :class:`EvalError` raised before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from hrsa.store.errors import UserError

__all__ = ["EvalError", "TaskKind", "TaskSpec", "build_tasks", "check_cached_mteb_data", "hub_unreachable", "mteb_tasks",
           "parse_task_spec", "safe_name", "split_task_list", "task_identity"]

TaskKind = Literal["retrieval", "classification", "mteb"]


class EvalError(UserError, ValueError):
    """A task spec, model folder or hub state that ``hrsa eval`` cannot work with."""


def split_task_list(text: str) -> list[str]:
    """Split on commas outside parentheses: ``"SciFact,MTEB(eng, v2)"`` is two specs."""
    return [part.strip() for part in re.split(r",(?![^()]*\))", text) if part.strip()]


@dataclass(frozen=True)
class TaskSpec:
    """One parsed ``--tasks`` entry: its text, kind, task name and (local tasks) file and fields."""

    text: str
    kind: TaskKind
    name: str
    path: Path | None = None
    text_field: str = "text"
    label_field: str = "label"


def parse_task_spec(text: str) -> TaskSpec:
    """Parse ``retrieval:FILE``, ``classification:FILE[:TEXT_FIELD[:LABEL_FIELD]]``, ``mteb:NAME`` or ``NAME``.

    Raises:
        EvalError: a local task whose file does not exist.
    """
    kind, sep, rest = text.partition(":")
    if sep and kind == "mteb":
        return TaskSpec(text=text, kind="mteb", name=rest.strip())
    if not sep or kind not in ("retrieval", "classification"):
        return TaskSpec(text=text, kind="mteb", name=text.strip())
    fields: list[str] = []
    path_text = rest
    if kind == "classification" and not Path(rest).expanduser().is_file():
        path_text, *fields = rest.split(":")  # FILE:TEXT:LABEL (a file name with ':' is taken whole when it exists)
    path = Path(path_text).expanduser()
    if len(fields) > 2 or not path.is_file():
        form = "retrieval:FILE" if kind == "retrieval" else "classification:FILE[:TEXT_FIELD[:LABEL_FIELD]]"
        got = f"no file at {path}" if not path.is_file() else f"{len(fields)} fields"
        raise EvalError(f"Expected a task {form} naming an existing JSON-lines file. Got {got} in {text!r} instead. "
                        "Check the path.")
    name = f"local-{kind}-{safe_name(path.stem)}"
    extra = dict(zip(("text_field", "label_field"), fields))
    return TaskSpec(text=text, kind=kind, name=name, path=path, **{k: v for k, v in extra.items() if v})  # type: ignore[arg-type]


def safe_name(text: str) -> str:
    """``text`` with each run of characters other than letters, digits, ``_``, ``.`` and ``-`` as one ``-``: a local
    task's name from its file's stem (and the name of a task file's copy on a cluster node, so both agree)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def task_identity(spec: TaskSpec, task: Any) -> str:
    """What a task's scores are a function of, as a digest: a local task's kind, fields and file content (not its
    path or spec text: the same file elsewhere is the same task, an edited one is not); an MTEB task's name and
    dataset revision."""
    from hrsa.runtime.fingerprint import file_digest

    if spec.kind == "mteb":
        dataset = getattr(task.metadata, "dataset", None) or {}
        what: dict[str, Any] = {"mteb": task.metadata.name, "revision": dataset.get("revision")}
    else:
        what = {"kind": spec.kind, "text_field": spec.text_field, "label_field": spec.label_field,
                "content": file_digest(spec.path or "")}
        if spec.kind == "retrieval":  # the lines of one query are one query with all their positives (since 2026-12)
            what["queries"] = "grouped"
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used, or None when it answers (checked fast: offline flag, 5 s connect)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "offline mode (HF_HUB_OFFLINE is set)"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=5).close()
    except OSError as error:
        return f"no connection to {url.hostname} ({error})"
    return None


def _cached_copies(repo: str) -> tuple[Path, dict[str, Path]]:
    """Where the datasets cache keeps hub dataset ``repo`` (as datasets names it: ``org___snake_name``), and each
    revision it holds there (``<config>/<version>/<revision>/`` folders; a revision's commit hash names its folder)."""
    import datasets
    from datasets.naming import camelcase_to_snakecase

    parts = repo.split("/")
    root = Path(datasets.config.HF_DATASETS_CACHE).expanduser() / "___".join([*parts[:-1], camelcase_to_snakecase(parts[-1])])
    return root, {folder.name: folder for folder in sorted(root.glob("*/*/*")) if folder.is_dir()}


def _datasets_of(task: Any) -> list[tuple[str, dict[str, Any]]]:
    """(task name, its dataset) for each dataset an MTEB task loads: an aggregate task's are its tasks'."""
    parts = getattr(task.metadata, "tasks", None)  # AbsTaskAggregate (CQADupstackRetrieval) has no dataset of its own
    if parts:
        return [pair for part in parts for pair in _datasets_of(part)]
    return [(task.metadata.name, task.metadata.dataset)]


def _pinned_commit(repo: str, revision: str | None, copies: dict[str, Path]) -> str | None:
    """The commit of ``repo`` that a pinned ``revision`` names, as far as it can be told offline: a full commit is
    itself; a branch, tag or short commit is what huggingface_hub recorded for it when the data was fetched
    (``refs/<revision>`` in its cache), else a short commit is the one cached copy it begins; None: not known."""
    if revision is None or re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}" / "refs" / revision
    if ref.is_file():
        return ref.read_text().strip()
    begun = [commit for commit in copies if commit.startswith(revision)] if re.fullmatch(r"[0-9a-f]{7,39}", revision) else []
    return begun[0] if len(begun) == 1 else None


def check_cached_mteb_data(tasks: list[Any], unreachable: str) -> None:
    """Check that the local datasets cache can stand in for the hub (``unreachable`` says why the hub cannot be used)
    for MTEB ``tasks``: it holds each task's dataset at the revision mteb pins, and no other revision of it. Offline,
    datasets reads the most recently written revision it has cached whatever revision is asked for: another one there
    would be scored under the pinned revision's name.

    Raises:
        EvalError: a task whose pinned revision is not cached (or cannot be told offline: a branch whose commit was
            never recorded), or whose dataset is cached at another revision too.
    """
    for name, dataset in (pair for task in tasks for pair in _datasets_of(task)):
        repo, revision = str(dataset["path"]), dataset.get("revision")
        root, copies = _cached_copies(repo)
        commit = _pinned_commit(repo, revision, copies)
        if commit not in copies and not (revision is None and copies):
            known = (f" (commit {commit})" if commit and commit != revision else
                     " (its commit is not known offline: huggingface_hub records it when the data is fetched)"
                     if commit is None else "")
            raise EvalError(f"Expected the Hugging Face hub, or the data of MTEB task {name} in the local datasets cache. "
                            f"Got {unreachable}, and no copy of {repo} at revision {revision}{known} in {root.parent} "
                            "instead. Connect to the hub (an evaluation there caches the data), or evaluate on local "
                            "tasks: retrieval:FILE or classification:FILE.")
        others = sorted(set(copies) - {commit}) if revision else []
        if others:
            raise EvalError(f"Expected only revision {revision} of {repo} (MTEB task {name}) in the local datasets cache "
                            f"that stands in for the hub ({unreachable}). Got a cache that also holds revision "
                            f"{others[0]} of {repo} instead, which datasets reads offline in its place. Remove "
                            f"{copies[others[0]]}, or connect to the hub.")


@contextmanager
def _hub_off() -> Iterator[None]:
    """datasets and huggingface_hub in offline mode while the cache stands in for an unreachable hub: each of their
    attempts to reach it would wait on the network first (a firewalled node waits out every timeout)."""
    import datasets
    import huggingface_hub.constants as hub

    kept = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = kept


def _offline_error(names: list[str], why: str) -> EvalError:
    return EvalError(f"Expected a reachable Hugging Face hub for the data of MTEB task(s) {', '.join(names)}. Got {why} "
                     "instead. Connect to the hub, or evaluate on local tasks: retrieval:FILE or classification:FILE.")


def mteb_tasks(spec: TaskSpec) -> list[Any]:
    """The MTEB tasks a name stands for (a task, or every task of a benchmark); unknown names are errors."""
    import mteb

    try:
        return list(mteb.get_tasks(tasks=[spec.name]))
    except KeyError:
        pass
    try:
        return list(mteb.get_benchmark(spec.name).tasks)
    except KeyError:
        raise EvalError(f"Expected an MTEB task or benchmark name, or a local task (retrieval:FILE, "
                        f"classification:FILE[:TEXT:LABEL]). Got {spec.name!r} instead. Check the spelling "
                        "(mteb.get_tasks() lists the names).") from None


def _unused_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``... the first not in ``taken``: scores are keyed by task name, so two files
    with the same stem (``a/x.jsonl``, ``b/x.jsonl``) or a stem that looks suffixed (``x-2.jsonl``) never share one."""
    candidate, counter = name, 1
    while candidate in taken:
        counter += 1
        candidate = f"{name}-{counter}"
    return candidate


def build_tasks(specs: list[TaskSpec], *, instruction: str | None, limit: int | None,
                seed: int) -> list[tuple[TaskSpec, Any]]:
    """The mteb task objects for ``specs``, data loaded (local files read and checked, hub data downloaded).

    Args:
        specs: the parsed ``--tasks``.
        instruction: the instruction of local tasks (None: mteb's default for the task type).
        limit: local tasks keep a seeded sample of at most this many records (None: all).
        seed: seeds that sample and the classification split.

    Returns:
        ``(spec, task)`` pairs in the order of ``specs`` (a benchmark gives one pair per task).

    Raises:
        EvalError / JsonlError: unknown names, unreadable files or missing fields, an unreachable hub.
    """
    # The adapter imports mteb with its result cache kept out of the home folder: import it before mteb is.
    from hrsa.train.mteb_adapter import LocalClassificationTask, LocalRetrievalTask

    named = [(spec, task) for spec in specs if spec.kind == "mteb" for task in mteb_tasks(spec)]
    cached = bool(named) and (why := hub_unreachable()) is not None
    if cached:
        check_cached_mteb_data([task for _, task in named], why)
    built: list[tuple[TaskSpec, Any]] = []
    names = {task.metadata.name for _, task in named}  # a local task's name never shadows an MTEB task's either
    for spec in specs:
        if spec.kind == "mteb":
            built.extend(pair for pair in named if pair[0] is spec)
            continue
        name = _unused_name(spec.name, names)
        options = {"name": name, "instruction": instruction, "limit": limit, "seed": seed}
        task = (LocalRetrievalTask(spec.path, **options) if spec.kind == "retrieval" else
                LocalClassificationTask(spec.path, text_field=spec.text_field, label_field=spec.label_field, **options))
        built.append((spec, task))
        names.add(name)
    for spec, task in built:
        try:
            with _hub_off() if cached and spec.kind == "mteb" else nullcontext():
                task.load_data()
        except (ConnectionError, TimeoutError) as error:
            raise _offline_error([task.metadata.name], f"{type(error).__name__}: {str(error).splitlines()[0]}") from None
        except (ValueError, FileNotFoundError) as error:
            if not (cached and spec.kind == "mteb"):
                raise
            # datasets' own words for a cached copy that lacks a config or split the task reads (a subset not cached)
            raise EvalError(f"Expected the local datasets cache to hold all the data of MTEB task {task.metadata.name}. "
                            f"Got {str(error).splitlines()[0]} instead. Connect to the hub, which caches it.") from None
    return built
