"""Loading a verb's settings: a YAML file (``--config``) merged with the flags given, validated by pydantic.

Shared by every verb whose config is a pydantic model (``hrsa analyze``, ``hrsa train``...), so they
all take the same precedence (flag > YAML > default) and report every problem at once, in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from hrsa.store.errors import UserError

__all__ = ["load_settings", "describe_problem", "read_yaml_mapping"]

M = TypeVar("M", bound=BaseModel)


def load_settings(model: type[M], path: Path | None, flags: Mapping[str, Any], *, verb: str,
                  error: type[UserError] = UserError) -> M:
    """Merge the YAML file at ``path`` (if any) with the flags that were given (not None) and validate.

    Args:
        model: the verb's pydantic config class.
        path: the ``--config`` file, or None.
        flags: flag values by field name; None (and an empty tuple) means "not given".
        verb: names the settings in the message ("Expected valid <verb> settings").
        error: the :class:`UserError` subclass to raise.

    Raises:
        UserError: an unreadable file, or every problem of the merged settings at once, in one line.
    """
    values: dict[str, Any] = dict(read_yaml_mapping(path, error=error)) if path is not None else {}
    values.update({k: v for k, v in flags.items() if v is not None and v != ()})
    try:
        return model.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(describe_problem(p) for p in e.errors())
        raise error(f"Expected valid {verb} settings. Got {e.error_count()} problem(s) instead: {problems}.") from None


def read_yaml_mapping(path: Path | str, *, error: type[UserError] = UserError, what: str = "settings") -> dict[str, Any]:
    """The mapping in the YAML file at ``path`` (empty file: empty mapping).

    Raises:
        error: the file is unreadable, is not YAML, or holds something other than a mapping.
    """
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise error(f"Expected a readable YAML config at {path}. Got an error instead: {e}".replace("\n", " ")) from None
    if not isinstance(loaded, dict):
        raise error(f"Expected a YAML mapping of {what} in {path}. Got {type(loaded).__name__} instead.")
    return loaded


def describe_problem(error: Any) -> str:
    """One pydantic error as ``--flag: what is wrong``, without pydantic's "Value error, " prefix."""
    where = ".".join(map(str, error["loc"])) or "config"
    flag = "--" + str(error["loc"][0]).replace("_", "-") if error["loc"] else "config"
    if error["type"] == "missing":
        return f"{flag} is required (as a flag or in --config)"
    message = str(error["msg"]).removeprefix("Value error, ").rstrip(".")
    return f"{where}: {message}"
