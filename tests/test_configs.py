"""Every YAML shipped in configs/ validates against its verb's config, and starts with its launch command."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

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


ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
SEVEN_B = ROOT / "configs" / "paper" / "r1-distill-qwen-7b--polaris-7b.yaml"


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
    # Every embedding model scored on MTEB at its last saved step, each task name one mteb knows (offline)
    from hrsa.train.eval_tasks import mteb_tasks, parse_task_spec

    assert {e.model for e in config.eval.values()} == set(runs)
    for e in config.eval.values():
        assert e.steps == (recipe.max_steps,)
        assert all(mteb_tasks(parse_task_spec(task)) for task in e.tasks)


# Decoder layers of each backbone (config.json num_hidden_layers): hidden states 0..L. Architecture facts of the
# public checkpoints, not paper facts (Qwen2.5-0.5B: 24; the Qwen2.5 1.5B and 7B family, and their children: 28).
LAYERS = {
    "Qwen/Qwen2.5-0.5B": 24, "hkust-nlp/Qwen-2.5-0.5B-SimpleRL-Zoo": 24,
    "Qwen/Qwen2.5-1.5B": 28, "hkust-nlp/Qwen-2.5-1.5B-SimpleRL-Zoo": 28,
    "Qwen/Qwen2.5-Math-1.5B": 28, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": 28,
    "nvidia/Nemotron-Research-Reasoning-Qwen-1.5B": 28,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": 28, "POLARIS-Project/Polaris-7B-Preview": 28,
}


def _submit_line(path: Path) -> list[str]:
    header = "\n".join(line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#"))
    lines = header.replace("\\\n", " ").splitlines()  # a command continued with a backslash is one line
    found = [line for line in lines if line.startswith("hrsa submit ")]
    assert found, f"{path.name}: no `hrsa submit` line in its header"
    return shlex.split(found[0])


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_config_header_submit_command_is_accepted(path: Path) -> None:
    """The header's launch command (`hrsa submit <config> --address ...`) must pass submit's own checks: without
    --out, the config's relative `out: hrsa-out/...` (and the training outputs under it) are refused."""
    from hrsa.cluster.pipeline import load_pipeline
    from hrsa.cluster.submit import _check_outputs_outlive_the_job
    from hrsa.runtime.settings import paths_elsewhere

    argv = _submit_line(path)
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    with paths_elsewhere():
        config = load_pipeline(path, out=out)
    _check_outputs_outlive_the_job(config)  # raises UserError for the command as written


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_dynamics_layers_reach_each_backbones_last_hidden_state(path: Path) -> None:
    """"every fourth hidden state": the series' layers must include the last hidden state (L, after the final
    norm: the one mean-pooled into the embedding) of both runs' backbones, and stay within 0..L."""
    from hrsa.cluster.pipeline import load_pipeline

    config = load_pipeline(path)
    for d in config.dynamics:
        layers = set(d.extract.layers or ())
        for run in (d.a, d.b):
            last = LAYERS[config.train[run].backbone]
            assert layers <= set(range(last + 1)), (d.label, run, sorted(layers))
            assert last in layers, f"{path.name}: dynamics {d.label} leaves out {run}'s last hidden state {last}"


def test_7b_pairs_plan_within_the_manifest_gpu_nodes_memory() -> None:
    """README ("A 7B pair on a cluster") runs this config on cluster/manifests/ray-cluster.yaml, whose GPU workers are
    g6.2xlarge (32 GiB; Ray's default `memory` resource is ~70% of it, the rest its object store). Each analysis task
    asks Ray for the plan's estimated peak (analyze/streaming/ray_passes.task_resources) and products go to GPU nodes:
    a peak above that is refused (PlacementError) after every extraction has run."""
    from hrsa.analyze.streaming.plan import PlanInputs, parse_memory_budget, plan_analysis
    from hrsa.cluster.pipeline import load_pipeline

    manifest = (ROOT / "cluster" / "manifests" / "ray-cluster.yaml").read_text()
    assert "g6.2xlarge" in manifest and "32 GiB" in manifest
    ray_memory = int(0.7 * 32 * 2**30)
    config = load_pipeline(SEVEN_B)
    d, states = 3584, 29  # Qwen2.5-7B shape (tests/analyze/test_plan.py uses the same)
    for pair in config.pairs:
        if not {"dimcorr", "cka", "procrustes"} & set(pair.metrics):
            continue
        everything = tuple(range(states))
        plan = plan_analysis(PlanInputs(
            matched=everything, rows=everything if pair.cross_layer else (), cols=everything if pair.cross_layer else (),
            dx=d, dy=d, read_bytes_a=2, read_bytes_b=2, compute_bytes=8, n_tokens=1_000_000, block_tokens=4096,
            n_blocks=245, workers=16, memory_budget=parse_memory_budget(pair.memory_budget), groups=pair.groups,
            per_worker=True, device_budget=21_000_000_000))
        assert plan.estimated_peak <= ray_memory, (
            f"{pair.label}: each task asks Ray for {plan.estimated_peak / 1e9:.1f} GB, the GPU nodes have "
            f"~{ray_memory / 1e9:.1f} GB")


def _rayjob() -> dict:
    return yaml.safe_load((ROOT / "cluster" / "manifests" / "rayjob.yaml").read_text())


def test_rayjob_holds_the_gpus_its_pipeline_trains_on() -> None:
    """The shipped RayJob runs configs/paper/r1-distill-qwen-7b--polaris-7b.yaml, whose first stage trains with
    `workers: 8` (one GPU each): the job's GPU group must hold them, or `hrsa run` is refused at its first stage."""
    from hrsa.cluster.pipeline import load_pipeline

    job = _rayjob()
    assert "configs/paper/r1-distill-qwen-7b--polaris-7b.yaml" in job["spec"]["entrypoint"]
    gpus = sum(int(g["replicas"]) * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    workers = max(tc.workers for tc in load_pipeline(SEVEN_B).train.values())
    assert gpus >= workers, f"the RayJob has {gpus} GPUs; the pipeline's training asks for {workers}"


def test_rayjob_stages_the_training_data_its_pipeline_reads() -> None:
    """`hrsa run` checks `train.<run>.data` (/data/hrsa/paper-train.jsonl) on the head before any stage
    (runner._check_inputs_exist); README says to stage it in "the RayJob's init container", which the shipped RayJob
    does not have (nor a volume at /data)."""
    head = _rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    staged = bool(head.get("initContainers")) or any(
        str(m.get("mountPath", "")).startswith("/data") for c in head["containers"] for m in c.get("volumeMounts", []))
    assert staged, "the RayJob's head has no init container or volume providing /data/hrsa/paper-train.jsonl"


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_the_documented_cot_copy_gives_the_corpus_every_trace(path: Path, tmp_path: Path) -> None:
    """The paper's repository keeps its traces in datasets/cot-datasets/outputs/{easy,moderate,hard}/ beside a
    README and a report; the corpus reader reads a folder's top level, so a copy of outputs/ as it is held no record.
    The command the config gives, run on that layout, makes data/cot hold every trace."""
    import subprocess

    from hrsa.store.records import read_records

    outputs = tmp_path / "REPO" / "datasets" / "cot-datasets" / "outputs"
    record = '{"messages": [{"role": "user", "content": "1+1?"}], "reasoning": "2"}\n'
    for level, name in (("easy", "gsm8k"), ("moderate", "MATH-500"), ("hard", "LiveMathbench")):
        (outputs / level).mkdir(parents=True)
        (outputs / level / f"qwen3_32b_{name}_outputs_evaluated.jsonl").write_text(record)
    (outputs / "README.md").write_text("# outputs\n")
    (command,) = [line.lstrip("# ").strip() for line in path.read_text().splitlines() if "cp REPO/" in line]
    subprocess.run(["bash", "-c", command.replace("REPO/", f"{tmp_path / 'REPO'}/")], cwd=tmp_path, check=True)
    assert len(list(read_records(str(tmp_path / "data" / "cot")))) == 3
