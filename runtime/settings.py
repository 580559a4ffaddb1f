"""A verb's settings: a YAML file (``--config``) merged with the flags given, validated by pydantic.

Shared by every verb whose config is a pydantic model (``hrsa extract``, ``analyze``, ``train``, ``report``...)
and by the pipeline, so they all take the same precedence (flag > YAML > default) and report every problem at
once, in one line, through one formatter (:func:`validation_problems`).
"""

from __future__ import annotations

import contextvars
import functools
import os
import re
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ValidationError, ValidationInfo

from hrsa.runtime.locations import is_url
from hrsa.store.errors import UserError
from hrsa.store.local_files import check_output_file, check_outside_stores, check_writable

__all__ = ["EXPLICIT_NONE", "SETTING_NAMES", "FilePath", "FolderLocation", "FolderPath", "InputLocation",
           "LocalFilePath", "Problems", "SettingNames", "paths_elsewhere", "flag_name", "load_settings", "parse_settings",
           "read_yaml_mapping", "renamed_flags", "validation_problems"]

M = TypeVar("M", bound=BaseModel)

SettingNames = Callable[[str], str]
"""How a message names a setting, given its field: a verb's flag, or in a pipeline its key in the YAML."""
SETTING_NAMES = "setting_names"
"""The key of a :data:`SettingNames` in the validation context of a verb's config (default :func:`flag_name`)."""


def flag_name(field: str) -> str:
    """A verb's flag of a setting, as its messages name it: ``batch_size`` is ``--batch-size``."""
    return f"--{field.replace('_', '-')}"


_FLAG = re.compile(r"--(no-)?([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")


def renamed_flags(message: str, fields: Collection[str], names: SettingNames) -> str:
    """``message`` with each flag of one of ``fields`` (:func:`flag_name`'s ``--memory-budget``; a switch's
    ``--no-use-gpu`` as ``<name>: false``) named by ``names`` instead: for messages from code that names settings by
    the flags of the verb it serves (the streaming plan, the k-NN pass, training's placement), raised where a pipeline
    calls it. The CLI's own names leave it as it is (a switch's ``--no-store-results`` read ``--store-results: false``)."""
    if names is flag_name:
        return message

    def name(match: re.Match[str]) -> str:
        field = match[2].replace("-", "_")
        if field not in fields:
            return match[0]
        return f"{names(field)}: false" if match[1] else names(field)

    return _FLAG.sub(name, message)


class _ExplicitNone:
    """A flag given as ``none`` (``--max-grad-norm none``): None as a value, where a flag's None means "not given"."""

    def __repr__(self) -> str:
        return "none"


EXPLICIT_NONE = _ExplicitNone()


def _not_a_file(path: Path, info: ValidationInfo) -> Path:
    # ~ as a shell would expand it: a YAML value is not (`out: ~/runs/a` wrote into ./~/runs/a, while the pipeline's
    # lock and its cleanup of a refused run used ~/runs/a).
    path = path.expanduser()
    # Checked with the settings, before any work: a job that computes for an hour and then cannot write its
    # folder has wasted the hour (and may have written half its outputs elsewhere).
    if path.exists() and not path.is_dir():  # a file, a device node (/dev/null), a FIFO
        what = "the file" if path.is_file() else "something other than a folder,"
        raise ValueError(f"expected a folder, got {what} {str(path)!r}; name a folder (it is created if missing)")
    # Nor inside a local hrsa store: a run folder under STORE/models/ was listed as a half-created model there,
    # whose repair (`hrsa store rm`) deletes it.
    check_outside_stores(path, flag=_flag_of(info))
    _under_folders(path)
    if _PATHS_HERE.get():  # an OutputPathError is a ValueError: gathered with the others
        check_writable(path, flag=_flag_of(info))
    return path


#: Whether the settings name paths on this machine (False while `hrsa submit` checks a pipeline that runs on a
#: cluster: its paths, /mnt/efs/..., need not exist nor be writable here; the job checks them there).
_PATHS_HERE: contextvars.ContextVar[bool] = contextvars.ContextVar("hrsa_paths_here", default=True)


@contextmanager
def paths_elsewhere() -> Iterator[None]:
    """Settings validated inside are for another machine: output folders are not checked for writability here."""
    token = _PATHS_HERE.set(False)
    try:
        yield
    finally:
        _PATHS_HERE.reset(token)


def _flag_of(info: ValidationInfo) -> str | None:
    names: SettingNames = (info.context or {}).get(SETTING_NAMES, flag_name)
    return names(info.field_name) if info.field_name else None


def _not_a_folder(path: Path, info: ValidationInfo) -> Path:
    path = path.expanduser()  # as _not_a_file
    if path.is_dir():
        raise ValueError(f"expected a file name, got the folder {str(path)!r}; name a file inside it")
    # Before any work too: a FIFO or a device node there would be replaced by the file, a path inside an hrsa store
    # would overwrite its metadata or records (an OutputPathError is a ValueError: gathered with the others).
    check_output_file(path, flag=_flag_of(info), writable=_PATHS_HERE.get())
    return _under_folders(path)


def _under_folders(path: Path) -> Path:
    """``path`` if the nearest of its parents that exists is a folder (missing ones are created when written)."""
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"expected a path inside folders, got {str(path)!r} under the file {str(parent)!r}; "
                         "name a path inside a folder")
    return path


FolderPath = Annotated[Path, AfterValidator(_not_a_file)]
"""An output folder: refused at validation when a file stands at that path."""
FilePath = Annotated[Path, AfterValidator(_not_a_folder)]
"""An output file: refused at validation when a folder, or anything but a regular file, stands at that path, or
when it lies inside an hrsa store (:func:`hrsa.store.local_files.check_output_file`); a regular file there is
replaced."""


def _path_unless_url(value: Any) -> Any:
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    return text if not isinstance(text, str) or is_url(text) else Path(text)


def _local_not_a_file(value: Path | str, info: ValidationInfo) -> Path | str:
    return _not_a_file(value, info) if isinstance(value, Path) else value


def _local_store_under_folders(value: str) -> str:
    if not is_url(value) and value:
        value = os.path.expanduser(value)  # YAML does not expand ~ as a shell does: ./~/store was opened
        _under_folders(Path(value))
    return value


StoreUrl = Annotated[str, AfterValidator(_local_store_under_folders)]
"""A store: a URL (checked when opened), or a local path refused at validation when a file stands above it."""

def _not_a_url(value: Path | str) -> Path:
    if isinstance(value, str):  # a local path is a Path by now
        raise ValueError(f"expected a local file, got the URL {value}; write to a local file and copy it there "
                         "(aws s3 cp...)")
    return value


LocalFilePath = Annotated[FilePath | str, BeforeValidator(_path_unless_url), AfterValidator(_not_a_url)]
"""An output file (:data:`FilePath`) where users may type a URL: refused by name (as a Path, ``s3://b/r.html`` was
the local file ./s3:/b/r.html, written there)."""

InputLocation = Annotated[Path | str, BeforeValidator(_path_unless_url)]
"""A file or folder to read that may be remote: a URL stays a string (``s3://bucket/out/report``: a Path would read
it as the local path ./s3:/bucket/...), a local path becomes a Path."""

FolderLocation = Annotated[Path | str, BeforeValidator(_path_unless_url), AfterValidator(_local_not_a_file)]
"""An output folder that may be remote: a URL stays a string (``s3://bucket/runs/a``, checked when it is opened,
see :mod:`hrsa.runtime.locations`); a local path becomes a Path, refused when a file stands there."""


class Problems(ValueError):
    """Several problems found by one validator; :func:`validation_problems` lists them one by one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def load_settings(model: type[M], path: Path | None, flags: Mapping[str, Any], *, verb: str,
                  error: type[UserError] = UserError) -> M:
    """Merge the YAML file at ``path`` (if any) with the flags that were given (not None) and validate.

    Args:
        model: the verb's pydantic config class.
        path: the ``--config`` file, or None.
        flags: flag values by field name; None (and an empty tuple) means "not given", :data:`EXPLICIT_NONE` the
            value None (it overrides the file's value).
        verb: names the settings in the message ("Expected valid <verb> settings").
        error: the :class:`UserError` subclass to raise.

    Raises:
        UserError: an unreadable file, or every problem of the merged settings at once, in one line.
    """
    values: dict[str, Any] = dict(read_yaml_mapping(path, error=error)) if path is not None else {}
    values.update({k: None if v is EXPLICIT_NONE else v for k, v in flags.items() if v is not None and v != ()})
    return parse_settings(model, values, verb=verb, error=error)


def parse_settings(model: type[M], values: Mapping[str, Any], *, verb: str, error: type[UserError] = UserError) -> M:
    """Validate ``values`` as ``model``; every problem at once, in one line.

    Raises:
        UserError: ``error`` with "Expected valid <verb> settings. Got N problem(s) instead: ...".
    """
    try:
        return model.model_validate(dict(values))
    except ValidationError as e:
        problems = validation_problems(e)
        raise error(f"Expected valid {verb} settings. Got {len(problems)} problem(s) instead: {'; '.join(problems)}.") from None


def read_yaml_mapping(path: Path | str, *, error: type[UserError] = UserError, what: str = "settings") -> dict[str, Any]:
    """The mapping in the YAML file at ``path`` (empty file: empty mapping).

    Raises:
        error: the file is unreadable, is not YAML, or holds something other than a mapping.
    """
    import yaml

    try:
        loaded = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_unique_keys_loader()) or {}
    except _DuplicateKey as e:
        raise error(f"Expected each key once in a mapping. Got {e.args[0]!r} twice (line {e.args[1]}) instead in {path}. "
                    "Remove or rename one (YAML would keep the last without a word).") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise error(f"Expected a readable YAML config at {path}. Got an error instead: {e}".replace("\n", " ")) from None
    if not isinstance(loaded, dict):
        raise error(f"Expected a YAML mapping of {what} in {path}. Got {type(loaded).__name__} instead.")
    return loaded


class _DuplicateKey(Exception):
    """A key given twice in one YAML mapping: (key, line)."""


@functools.cache
def _unique_keys_loader() -> type:
    """yaml's SafeLoader, refusing a mapping that gives one key twice (safe_load keeps the last, silently: a second
    model of the same name replaced the first)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):  # yaml refuses it below, in its own words
                    continue
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def validation_problems(error: ValidationError, *, flags: bool = True) -> list[str]:
    """Every problem of a pydantic error as ``where: what``, without pydantic's "Value error, " prefix.

    With ``flags``, a missing top-level field reads ``--flag is required (as a flag or in --config)`` (a verb's
    settings); without, ``field is required`` (a file's sections, such as a pipeline). The problems a validator
    gathered in :class:`Problems` are listed one by one under its location.
    """
    return [p for e in error.errors() for p in _describe(e, flags)]


def _describe(error: Any, flags: bool) -> list[str]:
    loc = [str(part) for part in error["loc"] if part != "[key]"]
    where = ".".join(loc)
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, Problems):
        return [f"{where}.{p}" if where else p for p in cause.problems]
    if error["type"] == "missing":
        if flags and len(loc) == 1:
            return [f"--{loc[0].replace('_', '-')} is required (as a flag or in --config)"]
        return [f"{where} is required"]
    if error["type"] == "extra_forbidden":
        return [f"{where}: unknown field (a typo?)"]
    return [f"{where or 'config'}: {str(error['msg']).removeprefix('Value error, ').rstrip('.')}"]
