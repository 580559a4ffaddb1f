"""``hrsa analyze``: compare two models of a store. Thin: parse, call ``analyze_pair``, save, print."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from hrsa.analyze.streaming.plan import AnalysisPlan

__all__ = ["analyze"]


@click.command("analyze")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML file of settings named like these flags; flags given here win.")
@click.option("--store", help="Store URL: a path or an fsspec URL such as s3://bucket/store.")
@click.option("--pair", nargs=2, default=None, help="Model ids A and B (A's hidden states are the rows of matrices).")
@click.option("--metrics", help="Comma-separated, among dimcorr,cka,procrustes,knn,probe.  [default: dimcorr,cka,procrustes]")
@click.option("--debiased", is_flag=True, default=None, help="Also debiased CKA (unbiased HSIC) on the matched layers.")
@click.option("--cross-layer", is_flag=True, default=None, help="Also every hidden state of A against every one of B (CKA and dimcorr matrices).")
@click.option("--memory-budget", help="Memory for accumulators held at once, e.g. 4GB or 512MiB; sets the tiles.  [default: 4GB]")
@click.option("--exclude-special", is_flag=True, default=None, help="Drop special tokens (BOS, chat-template markers).")
@click.option("--exclude-first", is_flag=True, default=None, help="Drop position 0 of every document (attention sinks carry huge norms).")
@click.option("--docs", help="Keep only these documents, e.g. 0,3,5-9 (indices into the corpus's document table).")
@click.option("--positions", help="Keep only positions A:B inside each document (A included, B not), e.g. 1:512.")
@click.option("--save-rotation", is_flag=True, default=None, help="Save Procrustes' rotation O* (D x D) of every matched layer.")
@click.option("--block-tokens", type=int, help="Tokens per block read and multiplied.  [default: ~32 MB of float64 per state]")
@click.option("--workers", type=int, help="At most this many token segments at once; each holds its own accumulators, so the plan may "
                   "use fewer.  [default: cores, up to 4]")
@click.option("--scheduler", type=click.Choice(["auto", "threads", "sync", "ray"]),
              help="Dask scheduler; auto = Ray when connected (RAY_ADDRESS), else local threads.  [default: auto]")
@click.option("--backend", type=click.Choice(["auto", "numpy", "torch", "cuda"]),
              help="Where matrix products run; auto = CUDA when torch sees a GPU, else numpy.  [default: auto]")
@click.option("--compute-dtype", type=click.Choice(["auto", "float32", "float64"]),
              help="dtype of the products of centred blocks (sums are float64); auto = float32 on GPU.  [default: auto]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for results.json and figures.  [default: hrsa-analysis]")
@click.option("--run-id", help="Name of the run in the store's results/.  [default: A--B--<UTC time>]")
@click.option("--store-results/--no-store-results", default=None,
              help="Also write results into the store's results/ (opens it writable).  [default: yes]")
@click.option("--k", help="k-NN overlap: neighbour counts, comma-separated.  [default: 5,10,50]")
@click.option("--knn-sample", type=int, help="k-NN overlap: tokens in the seeded sample shared by both models (all when fewer).  [default: 50000]")
@click.option("--knn-search", type=click.Choice(["exact", "hnsw"]),
              help="k-NN search: exact (blocked FAISS flat index) or hnsw (approximate; recall against exact is reported).  [default: exact]")
@click.option("--seed", type=int, help="Seed of the k-NN token sample and of the probes' train/dev/test split.  [default: 0]")
@click.option("--hidden-states", help="k-NN and probes: only these hidden states, e.g. 0,6,12.  [default: all shared]")
@click.option("--label-field", help="Probe: the record field holding each document's label (required with --metrics probe).")
@click.option("--labels", help="Probe: read labels from this .jsonl/.csv/.parquet instead of the corpus's source file.")
@click.option("--id-field", help="Probe: the id field of --labels (default: id, else FILE:LINE as extraction does).")
@click.option("--pool", type=click.Choice(["mean", "last"]), help="Probe: pool each document's tokens by mean or take the last.  [default: mean]")
@click.option("--probe-both-directions", is_flag=True, default=None, help="Probe: also fit on B and test on A.")
def analyze(config_file: Path | None, **flags: Any) -> None:
    """Compare hidden states of models A and B of a store with HRSA (CKA, dimension-wise correlation, Procrustes,
    k-NN overlap, cross-model linear probes).

    Flags left out take their value from --config, else their default (flags default to None for that).
    """
    import warnings

    from rich.console import Console
    from rich.progress import Progress

    from hrsa.analyze.config import load_config
    from hrsa.analyze.pair import analyze_pair
    from hrsa.analyze.results import check_run_id_free, save_results, summary_table
    from hrsa.store import ActivationStore

    cfg = load_config(config_file, flags)
    store = ActivationStore.open(cfg.store, mode="r+" if cfg.store_results else "r")
    if cfg.store_results and cfg.run_id:
        check_run_id_free(store, cfg.run_id)  # before the passes, not after
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # each warning once, printed below the progress bar, not through it
        task = progress.add_task("tokens x passes", total=None)

        def on_plan(plan: AnalysisPlan) -> None:
            console.print(plan.describe())
            progress.update(task, total=plan.passes * plan.inputs.n_tokens)

        results = analyze_pair(store, *cfg.pair, **cfg.api_kwargs(), on_plan=on_plan, on_block=lambda n: progress.advance(task, n))
    for w in caught:  # hrsa's own warnings as one line each, others as Python shows them
        if w.category.__module__.startswith("hrsa"):
            click.echo(f"hrsa: warning: {w.message}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    saved = save_results(results, cfg.out, store=store if cfg.store_results else None, run_id=cfg.run_id,
                         config=cfg.model_dump(mode="json"))
    Console().print(summary_table(results))
    click.echo(f"wrote {saved.json_path}" + "".join(f", {p.name}" for p in saved.figures)
               + (f"; store: {saved.store_path}" if saved.store_path else ""))
