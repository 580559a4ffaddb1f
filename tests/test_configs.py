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


PAPER = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_configs_run_the_whole_study(path: Path) -> None:
    """Each paper config trains an embedding model from each backbone with one recipe (the paper's), compares the
    backbones and the embedding models (two Table 2s side by side, each on the CoT traces and with probes) and
    follows the runs from step 0; every name a stage needs resolves."""
    import json

    from hrsa.cluster.pipeline import load_pipeline
    from hrsa.store.ids import parse_id

    config = load_pipeline(path)
    runs = config.train
    assert len(runs) >= 2 and len({json.dumps(tc.recipe_settings(), sort_keys=True) for tc in runs.values()}) == 1
    recipe = next(iter(runs.values()))
    assert (recipe.attention, recipe.temperature, recipe.negatives, recipe.batch_size) == ("bidirectional", 0.02, 7, 512)
    assert recipe.instruction and recipe.max_steps % recipe.save_every == 0  # the last checkpoint is a saved step
    assert recipe.batch_size % recipe.workers == 0
    backbones = {m.model for m in config.models.values() if m.model is not None}
    assert {tc.backbone for tc in runs.values()} == backbones  # every backbone compared is trained, and only those
    assert {m.train for m in config.models.values() if m.train is not None} == set(runs)
    # Stages resolve: store ids of every extraction, the checkpoints of every series from step 0 to the last step.
    steps = range(0, recipe.max_steps + 1, recipe.save_every)
    ids = {config.store_id(m, p.corpus) for p in config.pairs for m in (p.a, p.b)}
    ids |= {config.checkpoint_id(run, s, d.corpus) for d in config.dynamics for run in (d.a, d.b) for s in steps}
    assert all(parse_id(i) == i for i in ids)  # valid ids in the store
    assert all(d.a in runs and d.b in runs and d.corpus in config.corpora for d in config.dynamics)
    assert any(d.a != d.b and d.b_step is None for d in config.dynamics)  # the two runs compared step by step
    # Table 2 side by side: a column for each pair of backbones and each pair of embedding models, each reading
    # representation and geometry on the CoT traces and function from probes.
    columns = config.table_2_columns()
    assert len(columns) == len(runs)
    for column in columns:
        corpora = {config.pairs[i].corpus for i in column.results}
        metrics = {m for i in column.results for m in config.pairs[i].metrics}
        assert corpora == {"cot", "agnews"} and {"dimcorr", "procrustes", "cka", "knn", "probe"} <= metrics
