"""Every YAML shipped in configs/ validates against its verb's config, and starts with its launch command."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# hrsa "), "a shipped config begins with the command that runs it"
    verb = first.split()[2]
    if verb == "analyze":
        from hrsa.analyze.config import load_config

        load_config(path, {})
    elif verb == "extract":
        from hrsa.extract.config import load_extract_config

        load_extract_config(path, {})
    elif verb == "train":
        from hrsa.train.config import load_train_config

        load_train_config(path, {})
    elif verb == "run":
        from hrsa.cluster.pipeline import load_pipeline

        load_pipeline(path)
    elif verb in ("mine-negatives", "eval"):
        from hrsa.runtime.settings import load_settings
        from hrsa.train.evaluate import EvalConfig
        from hrsa.train.mine import MineConfig

        load_settings(MineConfig if verb == "mine-negatives" else EvalConfig, path, {}, verb=verb)
    elif verb == "report":
        from hrsa.analyze.report.cli import ReportConfig
        from hrsa.runtime.settings import load_settings

        load_settings(ReportConfig, path, {}, verb=verb)
    elif verb == "demo":
        from hrsa.cluster.demo import DemoConfig
        from hrsa.runtime.settings import load_settings

        load_settings(DemoConfig, path, {}, verb=verb)
    else:
        pytest.fail(f"no validator for `hrsa {verb}` configs yet")


def test_there_are_configs() -> None:
    assert CONFIGS


@pytest.mark.parametrize(("verb", "flag", "what"), [
    ("analyze", "k", "neighbour counts"),
    ("analyze", "hidden_states", "hidden-state indices"),
    ("extract", "layers", "hidden-state indices"),
    ("eval", "steps", "checkpoint steps"),
])
def test_integer_lists_share_one_parser_and_message(verb: str, flag: str, what: str) -> None:
    from hrsa.analyze.config import AnalyzeConfig
    from hrsa.extract.config import ExtractConfig
    from hrsa.runtime.settings import parse_settings
    from hrsa.store.errors import UserError
    from hrsa.train.evaluate import EvalConfig

    model, required = {"analyze": (AnalyzeConfig, {"store": "s", "pair": ("a", "b")}),
                       "extract": (ExtractConfig, {"store": "s", "model": "m", "corpus": "c"}),
                       "eval": (EvalConfig, {"model": "m", "tasks": "SciFact"})}[verb]
    assert getattr(parse_settings(model, {**required, flag: "1, 2,3"}, verb=verb), flag) in ((1, 2, 3), [1, 2, 3])
    with pytest.raises(UserError, match=f"{flag}: Expected {what} such as .*. Got '1,x' instead. Write integers"):
        parse_settings(model, {**required, flag: "1,x"}, verb=verb)
