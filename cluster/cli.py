"""``hrsa demo``, ``hrsa run``, ``hrsa submit``: thin verbs of the cluster package."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import click

from hrsa.cluster.demo import DemoConfig
from hrsa.runtime.cli_options import config_file_option, config_options
from hrsa.runtime.settings import load_settings

__all__ = ["demo", "run", "submit"]


@click.command("demo")
@config_file_option
@config_options(DemoConfig)
def demo(config_file: Path | None, **flags: Any) -> None:
    """Run the demo offline: the paper's study at CPU size. SmolLM2 and a perturbed copy (the stand-in for an
    RLVR-tuned child) trained into embedding models with the same InfoNCE recipe; HRSA of both pairs, Table 2 side
    by side, the dynamics from step 0, the report."""
    from rich.console import Console

    from hrsa.cluster.demo import run_demo

    console = Console()
    config = load_settings(DemoConfig, config_file, flags, verb="demo")  # every problem at once, one line
    result = run_demo(config, console)
    console.print("\n[bold]what it shows:[/]")
    for line in result.outcome:
        console.print(f"  {line}", highlight=False)
    console.print(f"\n[bold]report:[/] {result.report.resolve()}")
    console.print(f"store:  {result.store_url} (look inside: hrsa store ls {result.store_url})")
    for name, path in {**result.results, **result.dynamics}.items():
        console.print(f"results of {name}: {path}")
    for name, path in result.evals.items():
        console.print(f"scores of {name}: {path}")


@click.command("run")
@click.argument("pipeline", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--address", default=None, help="Ray address; overrides the pipeline's address (default RAY_ADDRESS, "
                                              "else an embedded local Ray).")
@click.option("--out", default=None, help="Overrides the pipeline's out: a folder, or a URL such as "
                                          "s3://bucket/hrsa/out that outlives the cluster (training runs default to "
                                          "OUT/train/RUN).")
def run(pipeline: Path, address: str | None, out: str | None) -> None:
    """Run a pipeline YAML: train -> extract -> analyze -> dynamics -> eval -> report.

    Each stage is skipped when its outputs exist and match its inputs; a re-run after a failure resumes
    where it stopped. See configs/examples/pipeline.yaml for every field.
    """
    from rich.console import Console

    from hrsa.cluster.pipeline import load_pipeline
    from hrsa.cluster.runner import run_pipeline
    from hrsa.runtime.locations import is_url
    from hrsa.train.trainer import TrainingStopped

    config = load_pipeline(pipeline, out=out)
    if address:
        config = config.model_copy(update={"address": address})
    console = Console()
    with tempfile.TemporaryDirectory(prefix="hrsa-out-") as scratch:  # a remote out's local copy, removed at the end
        try:
            result = run_pipeline(config, console=console, local_copy=Path(scratch))
        except TrainingStopped as stopped:  # Ctrl-C in a training stage: its workers saved their last step
            click.echo(f"hrsa: {stopped}. Re-run the same pipeline to resume.", err=True)
            raise SystemExit(130) from None
        report = result.report
        if report is not None and is_url(result.out) and report.is_relative_to(scratch):  # uploaded: name it there
            report = f"{str(result.out).rstrip('/')}/{report.relative_to(scratch).as_posix()}"
    console.print(f"\n{len(result.ran)} stage(s) run, {len(result.skipped)} skipped; store: {result.store}; "
                  f"results in {result.out}" + (f"; report: {report}" if report else ""))


@click.command("submit")
@click.argument("pipeline", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--address", default=None, help="Ray dashboard URL, e.g. http://head:8265 (default RAY_ADDRESS, "
                                              "else http://127.0.0.1:8265).")
@click.option("--working-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder shipped as the job's working directory; must hold the pipeline (default: the current one).")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="An environment variable of the job (repeatable).")
@click.option("--pip-deps", is_flag=True, help="Have Ray pip-install hrsa's dependencies for the job (for clusters "
                                               "without them; slow).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Follow the job's logs until it ends and exit non-zero if it fails; --no-wait returns once it is accepted.")
@click.option("--out", default=None, help="The job's out, overriding the pipeline's: a URL such as s3://bucket/hrsa/out "
                                          "keeps results, report and training runs when the cluster goes.")
def submit(pipeline: Path, address: str | None, working_dir: Path | None, env: tuple[str, ...], pip_deps: bool,
           wait: bool, out: str | None) -> None:
    """Submit `hrsa run PIPELINE` to a Ray cluster as a job (Ray's job submission API); prints the job id."""
    from hrsa.cluster.submit import submit_pipeline
    from hrsa.store.errors import UserError

    bad = [e for e in env if "=" not in e or not e.partition("=")[0]]
    if bad:
        raise UserError(f"Expected --env KEY=VALUE. Got {', '.join(map(repr, bad))} instead.")
    submit_pipeline(pipeline, address=address, working_dir=working_dir, env=dict(e.split("=", 1) for e in env),
                    pip_deps=pip_deps, wait=wait, out=out, echo=click.echo)
