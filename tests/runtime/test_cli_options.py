"""A verb's flags generated from its pydantic config: one flag per field, help from the description."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, Field

from hrsa.runtime.cli_options import config_file_option, config_options


class Settings(BaseModel):
    store: str = Field(description="Store URL.")
    backend: Literal["numpy", "torch"] = Field("numpy", description="Where products run.")
    cross_layer: bool = Field(False, description="Every layer against every layer.")
    workers: int | None = Field(None, description="Parallel segments.")
    budget: float = Field(0.5, description="A share.")
    out: Path = Field(Path("out"), description="Output folder.")
    k: tuple[int, ...] = Field((5, 10), description="Neighbour counts.")
    secret: str = Field("x", description="Set by the verb, not a flag.")


def command(model: type[BaseModel] = Settings, *, seen: list[dict[str, Any]] | None = None, **kw: Any) -> click.Command:
    """A verb with ``model``'s flags that appends the flags it was called with to ``seen``."""

    @click.command()
    @config_file_option
    @config_options(model, **kw)
    def verb(config_file: Path | None, **flags: Any) -> None:
        (seen if seen is not None else []).append(flags)

    return verb


def invoke(*args: str, cmd: click.Command | None = None) -> click.testing.Result:
    return CliRunner().invoke(cmd or command(exclude=("secret",)), list(args))


def flags_of(*args: str) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []
    result = invoke(*args, cmd=command(seen=seen, exclude=("secret",)))
    assert result.exit_code == 0, result.output
    return seen[0]


def test_unset_flags_are_none() -> None:
    """None means "not given", so the YAML or the default applies (load_settings drops Nones)."""
    assert flags_of() == {"store": None, "backend": None, "cross_layer": None, "workers": None, "budget": None,
                          "out": None, "k": None}


def test_values_take_the_fields_types() -> None:
    got = flags_of("--store", "s3://b/s", "--workers", "3", "--budget", "0.25", "--out", "o", "--k", "5,50")
    assert got["store"] == "s3://b/s" and got["workers"] == 3 and got["budget"] == 0.25
    assert got["out"] == Path("o") and got["k"] == "5,50"  # text: the model's own validator splits it


def test_a_literal_becomes_a_choice() -> None:
    assert flags_of("--backend", "torch")["backend"] == "torch"
    result = invoke("--backend", "cuda")
    assert result.exit_code == 2 and "'cuda' is not one of 'numpy', 'torch'" in result.output


def test_a_bool_gets_an_on_and_an_off_flag() -> None:
    assert flags_of("--cross-layer")["cross_layer"] is True
    assert flags_of("--no-cross-layer")["cross_layer"] is False


def test_help_shows_each_description_and_default_and_no_excluded_field() -> None:
    out = invoke("--help").output
    for text in ("--store TEXT", "Store URL.", "--backend [numpy|torch]", "[default: numpy]",
                 "--cross-layer / --no-cross-layer",
                 "--k TEXT", "[default: 5,10]", "--config FILE"):
        assert text in out, text
    workers = next(line for line in out.splitlines() if "--workers" in line)
    assert "--secret" not in out and workers.split() == ["--workers", "INTEGER", "Parallel", "segments."]  # no default


def test_metavars_replace_the_type_in_help() -> None:
    out = invoke("--help", cmd=command(metavars={"k": "5,10,50"})).output
    assert "--k 5,10,50" in out and "--secret" in out


def test_a_field_without_description_is_a_type_error() -> None:
    class Bare(BaseModel):
        store: str = Field(description="Store URL.")
        n: int = 1

    with pytest.raises(TypeError, match="Expected a description for config field 'n'"):
        command(Bare)
    command(Bare, exclude=("n",))  # a field set by the verb needs none


class Clipped(BaseModel):
    clip: float | None = Field(1.0, description="Clip to this (none: never).")


@pytest.mark.parametrize(("args", "expected"), [(["--clip", "none"], None), (["--clip", "NONE"], None),
                                                (["--clip", "0.5"], 0.5), ([], 1.0)])
def test_a_number_that_defaults_to_a_value_also_takes_none(args: list[str], expected: float | None) -> None:
    from hrsa.runtime.settings import load_settings

    seen: list[dict[str, Any]] = []
    result = CliRunner().invoke(command(Clipped, seen=seen), args)
    assert result.exit_code == 0, result.output
    assert load_settings(Clipped, None, seen[0], verb="v").clip == expected
    assert "--clip FLOAT|NONE" in CliRunner().invoke(command(Clipped), ["--help"]).output
    bad = CliRunner().invoke(command(Clipped), ["--clip", "never"])
    assert bad.exit_code == 2 and "expected a number or 'none', got 'never'" in bad.output
