"""Every verb's flags generated from its pydantic config model, so defaults and help live in one place.

A field ``cross_layer: bool = Field(False, description="...")`` becomes ``--cross-layer/--no-cross-layer``
with that help and ``[default: False]``; a ``Literal`` becomes a choice; ``X | None`` unwraps to X; tuples and
lists are given as text (``5,10,50``) that the model's own validators split. Flags left out are None, so
:func:`hrsa.runtime.settings.load_settings` can tell "not given" (take the YAML's or the default) from a value.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel

__all__ = ["config_file_option", "config_options"]

F = typing.TypeVar("F", bound=Callable[..., Any])


def config_file_option(command: F) -> F:
    """``--config FILE.yaml``: settings named like the flags (underscores), which flags given here override."""
    return click.option(
        "--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="YAML file of settings named like these flags (with underscores); flags given here win.",
    )(command)


def config_options(model: type[BaseModel], *, exclude: Iterable[str] = (), metavars: dict[str, str] | None = None) -> Callable[[F], F]:
    """A decorator adding one flag per field of ``model`` (in field order), with the field's description as help.

    Args:
        model: the verb's pydantic config; every field needs a ``description``.
        exclude: fields that are not flags (e.g. set by the verb itself).
        metavars: text shown for a field's value in --help (e.g. ``{"layers": "0,12,24-28"}``).
    """
    skip, shown = set(exclude), metavars or {}

    def decorate(command: F) -> F:
        for name, field in reversed(list(model.model_fields.items())):
            if name not in skip:
                command = _option(name, field, shown.get(name))(command)
        return command

    return decorate


def _option(name: str, field: Any, metavar: str | None) -> Callable[[F], F]:
    flag = "--" + name.replace("_", "-")
    if not field.description:
        raise TypeError(f"Expected a description for config field {name!r} (it is the flag's help). Got none.")
    help_text = field.description + _default_text(field)
    if _unwrap(field.annotation) is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
    return click.option(flag, name, type=_click_type(field.annotation), default=None, help=help_text, metavar=metavar)


def _default_text(field: Any) -> str:
    if field.is_required() or field.default is None or field.default == ():
        return ""
    default = field.default
    if isinstance(default, (tuple, list)):
        default = ",".join(map(str, default))
    return f"  [default: {default}]"


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> X."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType")) and len(args) == 1:
        return args[0]
    return annotation


def _click_type(annotation: Any) -> Any:
    """A choice for a Literal, int/float/Path for those, else text (tuples and lists are parsed by the model)."""
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)])
    return {int: int, float: float, Path: click.Path(path_type=Path)}.get(annotation, str)
