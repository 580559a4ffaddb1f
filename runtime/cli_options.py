"""Every verb's flags generated from its pydantic config model, so defaults and help live in one place.

A field ``cross_layer: bool = Field(False, description="...")`` becomes ``--cross-layer/--no-cross-layer``
with that help and ``[default: False]``; a ``Literal`` becomes a choice; ``X | None`` unwraps to X (a number whose
default is not None also takes ``none``, e.g. ``--max-grad-norm none``); tuples and lists are given as text
(``5,10,50``) that the model's own validators split. Flags left out are None, so
:func:`hrsa.runtime.settings.load_settings` can tell "not given" (take the YAML's or the default) from a value.
Two shapes a verb may ask for by field name: a repeatable flag (``repeatable``), and a bool whose off switch is
not ``--no-<flag>`` (``switches``). A flag written by hand takes its help from :func:`field_help`.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel

from hrsa.runtime.settings import EXPLICIT_NONE

__all__ = ["config_file_option", "config_options", "field_help"]

F = typing.TypeVar("F", bound=Callable[..., Any])


def config_file_option(command: F) -> F:
    """``--config FILE.yaml``: settings named like the flags (underscores), which flags given here override."""
    return click.option(
        "--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="YAML file of settings named like these flags (with underscores); flags given here win.",
    )(command)


def config_options(
    model: type[BaseModel],
    *,
    exclude: Iterable[str] = (),
    metavars: Mapping[str, str] | None = None,
    switches: Mapping[str, str] | None = None,
    repeatable: Iterable[str] = (),
) -> Callable[[F], F]:
    """A decorator adding one flag per field of ``model``, with the field's description as help.

    Flags come in field order, the model's own fields first and then those it inherits from shared option
    groups (e.g. ``EncoderOptions``), so a verb's --help starts with what is particular to it.

    Args:
        model: the verb's pydantic config; every field needs a ``description``.
        exclude: fields that are not flags (e.g. set by the verb itself).
        metavars: text shown for a field's value in --help (e.g. ``{"layers": "0,12,24-28"}``).
        switches: the off switch of a bool field, when it is not ``--no-<flag>`` (e.g.
            ``{"keep_existing": "--replace-existing"}`` gives ``--keep-existing/--replace-existing``).
        repeatable: tuple fields given as a repeatable flag (``--tasks A --tasks B``); the values come as a tuple
            of texts, which the model's own validator may split further.
    """
    skip, shown, offs, repeated = set(exclude), metavars or {}, switches or {}, set(repeatable)

    def decorate(command: F) -> F:
        for name, field in reversed(_in_flag_order(model)):
            if name not in skip:
                command = _option(name, field, shown.get(name), offs.get(name), name in repeated)(command)
        return command

    return decorate


def _in_flag_order(model: type[BaseModel]) -> list[tuple[str, Any]]:
    """``model``'s fields, its own first, then those of its bases (each group in field order)."""
    inherited = {name for base in model.__mro__[1:] if issubclass(base, BaseModel) for name in base.model_fields}
    fields = list(model.model_fields.items())
    return [f for f in fields if f[0] not in inherited] + [f for f in fields if f[0] in inherited]


def field_help(model: type[BaseModel], name: str) -> str:
    """The help of the flag of ``model``'s field ``name``: its description and its default (``[default: ...]``),
    for a flag a verb writes by hand (e.g. one taking two values), as a generated one would have it.

    Raises:
        TypeError: the field has no description (every flag has help).
    """
    return _help(name, model.model_fields[name])


def _help(name: str, field: Any, switch: str | None = None) -> str:
    if not field.description:
        raise TypeError(f"Expected a description for config field {name!r} (it is the flag's help). Got none.")
    return field.description + _default_text(field, switch)


def _option(name: str, field: Any, metavar: str | None, switch: str | None, multiple: bool) -> Callable[[F], F]:
    flag = "--" + name.replace("_", "-")
    help_text = _help(name, field, switch)
    if _unwrap(field.annotation) is bool:
        return click.option(f"{flag}/{switch or '--no-' + flag[2:]}", name, default=None, help=help_text)
    if multiple:  # not given: an empty tuple, which load_settings also takes for "not given"
        return click.option(flag, name, multiple=True, help=help_text, metavar=metavar)
    return click.option(flag, name, type=_click_type(field), default=None, help=help_text, metavar=metavar)


def _default_text(field: Any, switch: str | None = None) -> str:
    if field.is_required() or field.default is None or field.default == ():
        return ""
    default = field.default
    if isinstance(default, (tuple, list)):
        default = ",".join(map(str, default))
    if switch is not None and default is False:  # the off switch has its own name: show it
        default = switch
    return f"  [default: {default}]"


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> X."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _click_type(field: Any) -> Any:
    """A choice for a Literal, int/float/Path for those, else text (tuples and lists are parsed by the model). A
    number that may be None but defaults to another value also takes ``none``: there None is a setting of its own."""
    annotation = _unwrap(field.annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)])
    if annotation in (int, float) and annotation is not field.annotation and field.default is not None:
        return _NumberOrNone(annotation)
    return {int: int, float: float, Path: click.Path(path_type=Path)}.get(annotation, str)


class _NumberOrNone(click.ParamType):
    """An int or float, or ``none`` (any case) for the value None: :data:`EXPLICIT_NONE`, since a flag's None means
    "not given"."""

    def __init__(self, number: type) -> None:
        self.number = number
        self.name = f"{'integer' if number is int else 'float'}|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is EXPLICIT_NONE or isinstance(value, self.number):
            return value
        if str(value).strip().lower() == "none":
            return EXPLICIT_NONE
        try:
            return self.number(value)
        except ValueError:
            self.fail(f"expected {'an integer' if self.number is int else 'a number'} or 'none', got {value!r}", param, ctx)
