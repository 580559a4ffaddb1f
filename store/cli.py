"""``hrsa store ...``: look inside a store. Thin: parse, call the library, print."""

from __future__ import annotations

import sys
from typing import Any

import click

__all__ = ["store_group"]


@click.group("store")
def store_group() -> None:
    """List, describe, read, verify and delete what a store holds."""


@store_group.command("ls")
@click.argument("url")
def ls(url: str) -> None:
    """List the corpora and models in the store at URL (a path or an fsspec URL such as s3://bucket/store)."""
    import sys

    from rich.console import Console
    from rich.table import Column, Table

    from hrsa.store import ActivationStore

    def ids(name: str) -> Column:  # never cut: these are what a user copies into the next command
        return Column(name, overflow="fold")

    store = ActivationStore.open(url, mode="r")
    # Off a terminal each row on one line, whatever its width (rich's default of 80 columns cut ids to "DeepSeek-…").
    console = Console(width=None if sys.stdout.isatty() else 100_000)
    corpora = Table(ids("corpus"), "documents", "tokens", "tokenizer", ids("source"), title="corpora",
                    title_justify="left")
    states = store.corpus_states()
    for cid in (cid for cid, state in states.items() if state == "complete"):
        c = store.corpus_info(cid)
        _add_row(corpora, cid, str(c.n_docs), str(c.n_tokens), str(c.tokenizer.get("name", "")), str(c.source or ""))
    notes = [f"note: corpus {cid}'s metadata does not read (damaged): `hrsa store verify {url}` names the damage; "
             f"`hrsa store rm` its models and extract them again" for cid, state in states.items() if state == "unreadable"]
    models = Table(ids("model"), ids("corpus"), "hidden states", "D", "dtype", "attention", "units done", title="models",
                   title_justify="left")
    for mid in store.models():
        m = store.model_info(mid)
        _add_row(
            models, mid, m.corpus, f"{len(m.hidden_states)}/{m.n_hidden_states}", str(m.hidden_size), m.dtype, m.attention,
            f"{m.units_done}/{m.n_units}" + ("" if m.complete else " (incomplete)"),
        )
        damage = store.model_damage(mid)  # the hidden states' array metadata, as reads check it (no shard is read)
        if damage:
            notes.append(f"note: model {mid} is damaged ({damage}): reads refuse it; `hrsa store verify {url}` names "
                         f"the damage; `hrsa store rm {url} {mid}` and extract it again")
        corpus = states.get(m.corpus, "absent")
        if corpus in ("unreadable", "absent"):
            what = "does not read" if corpus == "unreadable" else "is absent from the store"
            notes.append(f"note: model {mid}'s corpus {m.corpus} {what}: its hidden states cannot be read; "
                         f"`hrsa store verify {url}`, then `hrsa store rm {url} {mid}` and re-extract it")
    console.print(corpora)
    console.print(models)
    console.print(_results_table(store, ids))
    for line in notes:
        console.print(line, markup=False, emoji=False)
    for mid in store.half_created_models():
        console.print(f"note: model {mid} is half-created (its creation was interrupted): `hrsa store rm {url} {mid}`, "
                      "or re-run its extraction", markup=False, emoji=False)


def _results_table(store: Any, ids: Any) -> Any:
    """The result records (one per `hrsa analyze` run): each id is taken for good, so each is listed, a record
    without its document (a run cut short, or one writing now) as incomplete."""
    from rich.table import Table

    table = Table(ids("result"), ids("A"), ids("B"), "created", title="results", title_justify="left")
    damaged = set(store.damaged_results())
    for run_id, doc in store.results_documents().items():
        if run_id in damaged:
            _add_row(table, run_id, "", "", f"(damaged metadata: `hrsa store rm {store.url} {run_id} --results`)")
        elif doc is None:
            _add_row(table, run_id, "", "", "(incomplete: being written, or cut short)")
        else:
            _add_row(table, run_id, str(doc.get("a", "")), str(doc.get("b", "")), str(doc.get("created", "")))
    return table


def _add_row(table: Any, *cells: str) -> None:
    """A row of plain text: a cell is never read as rich markup (a source under `data [v2]/` lost `[v2]`, and an
    edited record's `[/]` was a MarkupError traceback)."""
    from rich.text import Text

    table.add_row(*(Text(cell) for cell in cells))


@store_group.command("info")
@click.argument("url")
@click.argument("model")
def info(url: str, model: str) -> None:
    """Describe MODEL in the store at URL: source, corpus, shape, dtype, layout and progress."""
    import json

    from hrsa.store import ActivationStore
    from hrsa.store.errors import CorpusNotFoundError, CorruptDataError

    store = ActivationStore.open(url, mode="r")
    m = store.model_info(model)
    try:
        c = store.corpus_info(m.corpus)
        corpus = f"{c.n_docs} documents, {c.n_tokens} tokens, tokenizer {c.tokenizer.get('name', '?')}"
    except (CorpusNotFoundError, CorruptDataError):  # the model is still described: info is where a user looks
        corpus = (f"absent from the store, or its metadata does not read: reads of a selection refuse it; "
                  f"`hrsa store verify {url}` names the damage")
    click.echo(f"model        {m.id}")
    click.echo(f"source       {json.dumps(m.source)}")
    click.echo(f"corpus       {m.corpus} ({corpus})")
    click.echo(f"shape        {len(m.hidden_states)} hidden states of (N={m.n_tokens}, D={m.hidden_size}); "
               f"indices {_ranges(m.hidden_states)} of 0..{m.n_hidden_states - 1}")
    click.echo(f"dtype        {m.dtype} ({'stored as uint16 bits' if m.dtype == 'bfloat16' else 'stored as is'}), codec {m.codec} + crc32c")
    click.echo(f"attention    {m.attention}")
    click.echo(f"layout       {m.layout.chunk_tokens} tokens per chunk, {m.layout.shard_tokens} per shard (work unit)")
    click.echo(f"progress     {m.units_done}/{m.n_units} units done{'' if m.complete else ' (incomplete: re-run the extraction to resume)'}")
    if m.extraction:
        click.echo(f"extraction   {json.dumps(m.extraction)}")


def _ranges(values: tuple[int, ...]) -> str:
    if values and list(values) == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ",".join(map(str, values))


@store_group.command("get")
@click.argument("url")
@click.argument("model")
@click.option("--layer", type=int, required=True, help="Hidden-state index: 0 is the embedding output, L the last layer; negative counts from the end.")
@click.option("--docs", default=None, help="Keep these documents, e.g. 0,3,5-9 (indices into the corpus's document table).")
@click.option("--tokens", "token_range", default=None, help="Keep the global token range A:B.")
@click.option("--exclude-special", is_flag=True, help="Drop special tokens (BOS, chat-template markers).")
@click.option("--exclude-first", is_flag=True, help="Drop position 0 of every document (attention sinks).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float64"]), default="auto", show_default=True,
              help="auto keeps the stored dtype; bf16, which .npy cannot hold, widens to float32 exactly.")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), required=True,
              help="Output .npy file (a regular file there is replaced; anything else, or a path inside an hrsa store, "
                   "is refused).")
def get(url: str, model: str, layer: int, docs: str | None, token_range: str | None, exclude_special: bool,
        exclude_first: bool, dtype: str, out: str) -> None:
    """Write one hidden state of MODEL (or a selection of its tokens) to a .npy file (its folder must exist)."""
    import os

    import numpy as np

    from hrsa.store import ActivationStore, TokenFilter
    from hrsa.store.errors import UserError
    from hrsa.store.local_files import atomic_file, check_output_file
    from hrsa.store.selection import parse_doc_ids, parse_token_range

    target = os.path.realpath(out)  # a symlink at --out is written through, as open() would
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):  # checked first: a typo in --out must not cost the whole read, nor create folders
        existing = folder
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise UserError(f"Expected an existing folder for --out. Got {out}, whose folder {existing} is a file, "
                            "instead. Choose another --out.")
        raise UserError(f"Expected an existing folder for --out. Got {out}, whose folder {folder} does not exist, "
                        f"instead. Create it first (mkdir -p {folder}), or choose another --out.")
    check_output_file(out, flag="--out")  # a FIFO, a device node or a path inside a store: refused before the read
    store = ActivationStore.open(url, mode="r")
    m = store.model_info(model)
    lazy = store.hidden_state(
        model, layer,
        tokens=parse_token_range(token_range, m.n_tokens) if token_range is not None else None,  # "" is refused
        # "" (an unset variable) is refused, not "all"; an index past the corpus before a range is expanded
        docs=parse_doc_ids(docs, store.corpus_info(m.corpus).n_docs) if docs is not None else None,
        token_filter=TokenFilter(exclude_special=exclude_special, exclude_first=exclude_first),
    )
    if dtype != "auto" or m.dtype == "bfloat16":
        lazy = lazy.astype(np.float64 if dtype == "float64" else np.float32)
    with atomic_file(target) as file:  # whole or not at all; exactly at --out
        _save_by_row_groups(file, lazy)
    click.echo(f"wrote {out}: {lazy.shape[0]} tokens x {lazy.shape[1]} ({lazy.dtype})")


#: Rows decoded and written at once by ``store get``: a few shards, read side by side by Dask's threads.
GET_GROUP_BYTES = 8 << 20


def _save_by_row_groups(file: Any, values: Any) -> None:
    """``np.save`` of a Dask array of shape (N, D), a group of row blocks at a time: a 7B model's layer over a
    million tokens is 14 GB, and computing it whole before the save held it twice (Dask's per-shard pieces and the
    joined array). A C-order .npy is its header, then its rows in order: each group's bytes are appended."""
    import dask
    import numpy as np

    values = values.rechunk({1: -1})  # whole rows in each block
    header = {"descr": np.lib.format.dtype_to_descr(values.dtype), "fortran_order": False, "shape": values.shape}
    np.lib.format.write_array_header_1_0(file, header)
    row_bytes = max(1, values.shape[1] * values.dtype.itemsize)
    group: list[Any] = []
    rows = 0
    for i, n in enumerate(values.chunks[0]):
        group.append(values.blocks[i])
        rows += n
        if rows * row_bytes >= GET_GROUP_BYTES or i == values.numblocks[0] - 1:
            for block in dask.compute(*group):
                file.write(np.ascontiguousarray(block).data)
            group, rows = [], 0


@store_group.command("verify")
@click.argument("url")
@click.option("--model", "models", multiple=True, help="Check only this model (repeatable); default all.")
@click.option("--reset-damaged", "reset", is_flag=True,
              help="Mark the units of damaged shards not done, so re-running the extraction rewrites exactly them. "
              "Refused (exit 2) for a model an extraction or a deletion holds: that model is left as it was, and the "
              "models reset before it are listed.")
def verify(url: str, models: tuple[str, ...], reset: bool) -> None:
    """Check that every work unit is done and every shard is the one its done record lists (size and xxh3).

    Exit code 0 when all is well, 1 when a problem was found (each is listed).
    """
    from rich.progress import Progress

    from hrsa.store import ActivationStore
    from hrsa.store.verify import count_shards, reset_damaged, verify_store

    store = ActivationStore.open(url, mode="r+" if reset else "r")
    selected = list(models) or None
    with Progress(transient=True) as progress:
        task = progress.add_task("reading shards", total=count_shards(store, selected))
        report = verify_store(store, models=selected, on_shard=lambda n: progress.advance(task, n))
    for problem in report.problems:
        click.echo(f"PROBLEM {problem.where}: {problem.what}")
    summary = f"{len(report.corpora_checked)} corpora, {len(report.models_checked)} models, {report.shards_read} shards read"
    if report.ok:
        click.echo(f"ok: {summary}")
        return
    click.echo(f"{len(report.problems)} problem(s): {summary}")
    for mid, units in report.damaged_units().items() if reset else ():
        _print_reset(reset_damaged(store, mid, units), url)  # each as it ends: a later model's refusal hides none
    raise SystemExit(1)


def _print_reset(outcome: Any, url: str) -> None:
    """One line for what ``verify --reset-damaged`` did to a model (a :class:`~hrsa.store.verify.ResetOutcome`)."""
    mid = outcome.model
    if outcome.skipped:
        click.echo(f"not reset: model {mid}: {outcome.skipped}; `hrsa store rm {url} {mid}` and extract it again")
        return
    left = [f"{len(units)} {what}" for units, what in (
        (outcome.whole, "whole when checked again (rewritten since)"), (outcome.not_done, "no longer done (reset or "
                                                                        "replaced since)")) if units]
    click.echo(f"reset {len(outcome.reset)} damaged unit(s) of {mid}: re-run its extraction to rewrite them"
               + (f"; left as they are: {', '.join(left)}" if left else ""))


@store_group.command("rm")
@click.argument("url")
@click.argument("model")
@click.option("--results", "results", is_flag=True, help="MODEL is the id of a result record (an `hrsa analyze` run, "
              "listed by `hrsa store ls`): delete that record only.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def rm(url: str, model: str, results: bool, yes: bool) -> None:
    """Delete MODEL and all its hidden states from the store at URL (corpora are kept), or with --results one result
    record. Refused (exit 2) while an extraction of MODEL runs; a killed one's hold ends with its process (after 120 s
    when it ran on another machine)."""
    from hrsa.store import ActivationStore
    from hrsa.store.errors import CorruptDataError

    store = ActivationStore.open(url, mode="r+")
    if results:
        store.known_results(model)  # fail on an unknown id before asking anything (a damaged record is deleted too)
        _confirm(yes, f"result record {model}", url)
        store.delete_results(model)
        click.echo(f"deleted result record {model}")
        return
    if model not in store.half_created_models():  # a half-created model has no info, but rm is its repair
        _known_model(store, model, url)
    _confirm(yes, f"model {model}", url)
    try:
        records: list[str] | None = store.results_naming(model)
    except CorruptDataError:  # the results group's metadata is damaged: not this model's, nor a reason to keep it
        records = None
    store.delete_model(model)
    click.echo(f"deleted {model}")
    if records is None:
        click.echo(f"result records naming {model} not counted: the results group's metadata does not read "
                   f"(`hrsa store verify {url}` names the damage)")
    if records:  # kept: they are the analyses' output, deleted one by one with --results
        click.echo(f"{len(records)} result record(s) name {model} ({', '.join(records)}): kept as they were; their numbers "
                   "are of the deleted model (each records its source and identity for `hrsa report` to tell them apart; "
                   f"`hrsa store rm {url} RUN --results` deletes one)")


def _known_model(store: Any, model: str, url: str) -> None:
    """Fail on an id that names no model; one that names a result record says so, with the flag that deletes it."""
    from hrsa.store.errors import UserError

    if model not in store.models() and model in store.results_ids():
        raise UserError(f"Expected a model of {url}. Got {model!r}, a result record, instead. Pass --results to "
                        "delete that record.")
    store.model_info(model)


def _confirm(yes: bool, what: str, url: str) -> None:
    """Ask before deleting ``what`` (unless --yes)."""
    from hrsa.store.errors import UserError

    if yes:
        return
    if not sys.stdin.isatty():  # a pipe or a job: nobody to answer, and a pipe held open would wait forever
        raise UserError(f"Expected --yes to delete {what} from {url} without a terminal to ask at. Got none. Pass --yes.")
    click.confirm(f"Delete {what} from {url}?", abort=True)


@store_group.command("upgrade")
@click.argument("url")
def upgrade(url: str) -> None:
    """Bring the store at URL (format 1, 2 or 3) to this version's format in place; nothing is re-extracted.

    From format 1, each done unit's shards are read back (checksums checked) and recorded; a damaged unit gets no
    record, and re-running its extraction rewrites it. From formats 2 and 3 only the version is raised. A killed
    upgrade is finished by running it again.
    """
    from hrsa.store.format import FORMAT_VERSION
    from hrsa.store.upgrade import upgrade_store

    report = upgrade_store(url)
    for mid, recorded in report.units_recorded.items():
        damaged = report.units_left_pending[mid]
        note = f"; units {damaged} were damaged and are left pending: re-run its extraction" if damaged else ""
        click.echo(f"{mid}: {recorded} done unit(s) recorded{note}")
    if report.from_version == FORMAT_VERSION and not report.units_recorded:
        click.echo(f"store format {FORMAT_VERSION} already: nothing to do: {url}")
    else:
        click.echo(f"store format {report.from_version} -> {FORMAT_VERSION}: {url}")
