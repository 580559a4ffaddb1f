"""A pipeline's ``out`` on S3 (moto): results, report and state uploaded as each stage finishes, so they outlive the
cluster, and a re-run from a new machine (a fresh local copy) finds every stage done there."""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from hrsa.cli import cli
from hrsa.cluster.pipeline import parse_pipeline
from hrsa.cluster.remote_out import PublishedOut
from hrsa.cluster.runner import run_pipeline
from hrsa.cluster.state import STATE_FILE, PipelineState
from hrsa.runtime.locations import Location, parse_location

pytestmark = pytest.mark.integration

TEXTS = ["the quick brown fox jumps over the lazy dog " * 3, "hidden states of a tiny model " * 4, "w1 w2 w3 " * 9,
         "the lazy dog " * 10, "jumps over " * 12, "tiny model " * 8]


@pytest.fixture
def remote(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Location]:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    yield parse_location(f"s3://hrsa-test/out-{uuid.uuid4().hex[:8]}")


def test_pushes_what_changed_with_the_state_last_and_mirrors_removals(remote: Location, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    published = PublishedOut.open(remote.url, state_file=STATE_FILE, local=tmp_path / "first")
    assert list(published.local.iterdir()) == []  # nothing there yet: an empty local copy
    (tmp_path / "used" / "old.html").parent.mkdir()
    (tmp_path / "used" / "old.html").write_text("left over")
    with pytest.raises(ValueError, match="empty folder"):  # its files would be uploaded as the stages' own
        PublishedOut.open(remote.url, state_file=STATE_FILE, local=tmp_path / "used")
    state = PipelineState(published.local / STATE_FILE, on_write=published.push)
    (published.local / "pairs" / "a--b").mkdir(parents=True)
    (published.local / "pairs" / "a--b" / "results.json").write_text('{"cka": 1}')
    state.finish("analyze:a--b", "k1", {"results": "pairs/a--b/results.json"})
    assert remote.files().keys() == {STATE_FILE, "pairs/a--b/results.json"}
    # Rewritten with the same size, its modification time restored (or within one tick of the file clock): sent.
    results = published.local / "pairs" / "a--b" / "results.json"
    stat = results.stat()
    results.write_text('{"cka": 2}')
    os.utime(results, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    state.finish("analyze:a--b", "k1", {"results": "pairs/a--b/results.json"})
    assert remote.child("pairs/a--b/results.json").read_text() == '{"cka": 2}'
    (published.local / "pairs" / "a--b" / "results.json").unlink()  # an analysis redone clears its folder
    (published.local / "report.html").write_text("<html/>")
    order: list[str] = []
    real_write = Location.write
    monkeypatch.setattr(Location, "write", lambda self, data: order.append(self.name) or real_write(self, data))
    state.finish("report", "k2", {})
    monkeypatch.setattr(Location, "write", real_write)
    assert order == ["report.html", STATE_FILE]  # the state never names an output not uploaded yet
    assert remote.files().keys() == {STATE_FILE, "report.html"}
    again = PublishedOut.open(remote.url, state_file=STATE_FILE, local=tmp_path / "second")  # a new machine
    assert again.local != published.local and (again.local / "report.html").read_text() == "<html/>"
    assert PipelineState(again.local / STATE_FILE).entry("report")["status"] == "done"  # type: ignore[index]


def test_nothing_is_pushed_once_the_outs_lease_is_lost(remote: Location, tmp_path: Path) -> None:
    """A run whose lease another run took over (this one could not renew it) went on uploading its files and state
    over the other's to its end."""
    from hrsa.runtime.folder_lock import FolderInUseError

    lost = False

    def still_held() -> None:
        if lost:
            raise FolderInUseError("Expected this `hrsa run` to hold the out to its end. Got its lease taken over.")

    published = PublishedOut.open(remote.url, state_file=STATE_FILE, local=tmp_path / "copy", check=still_held)
    state = PipelineState(published.local / STATE_FILE, on_write=published.push)
    state.finish("analyze:a--b", "k1", {})
    assert remote.files().keys() == {STATE_FILE}
    lost = True
    (published.local / "report.html").write_text("<html/>")
    with pytest.raises(FolderInUseError, match="lease taken over"):
        state.finish("report", "k2", {})
    assert remote.files().keys() == {STATE_FILE} and '"report"' not in remote.child(STATE_FILE).read_text()


def test_a_pipeline_with_an_s3_out_keeps_its_outputs_there_and_resumes_from_them(
        remote: Location, tmp_path: Path, tiny_models: Any, ray_local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "words.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    values = {"store": str(tmp_path / "store"), "out": remote.url, "corpora": {"words": {"path": str(corpus)}},
              "models": {"llama": {"model": str(tiny_models.dir("llama"))},
                         "qwen": {"model": str(tiny_models.dir("qwen2"))}},
              "pairs": [{"a": "llama", "b": "qwen", "corpus": "words", "metrics": ["cka"], "scheduler": "threads"}]}
    first = run_pipeline(parse_pipeline(values), console=Console(quiet=True), local_copy=tmp_path / "first")
    assert first.out == remote.url and first.ran == ("extract:llama", "extract:qwen", "analyze:llama--qwen", "report")
    files = remote.files()
    assert {STATE_FILE, "report.html", "pairs/llama--qwen/results.json"} <= files.keys()
    assert remote.child("pairs/llama--qwen/results.json").read_bytes() == first.results["llama--qwen"].read_bytes()
    stages = json.loads(remote.child(STATE_FILE).read_text())["stages"]
    assert all(s["status"] == "done" for s in stages.values())
    # A new cluster: nothing local, the same store; the remote out says every stage is done.
    second = run_pipeline(parse_pipeline(values), console=Console(quiet=True), local_copy=tmp_path / "second")
    assert second.ran == () and first.report is not None and second.report != first.report
    assert remote.files() == files
    # Two runs into one remote out at once: the second is refused before it copies anything (a lease on the out,
    # as a training's on S3), and the first's lease is gone when it ends (above: the same files as before).
    from hrsa.cluster.runner import PIPELINE_LOCK
    from hrsa.store.errors import UserError

    with PIPELINE_LOCK.exclusive(remote):
        with pytest.raises(UserError, match=r"Expected no other `hrsa run` running into s3://.*\. Got one \(pid"):
            run_pipeline(parse_pipeline(values), console=Console(quiet=True), local_copy=tmp_path / "third")
    assert not (tmp_path / "third").exists() and remote.files() == files
    # `hrsa run` names the remote files, and removes its local copy when it ends.
    (tmp_path / "pipeline.yaml").write_text(json.dumps(values))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "pipeline.yaml")])
    assert result.exit_code == 0, result.output
    assert f"report: {remote.url}/report.html" in " ".join(result.output.split()), result.output
    assert list(scratch.iterdir()) == [] and remote.files() == files
    # A report put elsewhere (report.path, a local file) is named where it is.
    (tmp_path / "pipeline.yaml").write_text(json.dumps({**values, "report": {"path": str(tmp_path / "mine.html")}}))
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "pipeline.yaml")])
    assert result.exit_code == 0, result.output
    assert f"report: {tmp_path / 'mine.html'}" in "".join(result.output.split("\n")), result.output
    assert (tmp_path / "mine.html").is_file() and list(scratch.iterdir()) == []


def test_training_runs_default_under_a_remote_out(tmp_path: Path) -> None:
    config = parse_pipeline({"store": str(tmp_path / "s"), "out": "s3://bucket/hrsa/out/",
                             "corpora": {"c": {"path": "c"}},
                             "train": {"r": {"backbone": "org/model", "data": "d.jsonl"}}})
    assert config.out == "s3://bucket/hrsa/out/" and config.train["r"].output == "s3://bucket/hrsa/out/train/r"
    local = parse_pipeline({"store": "s", "out": str(tmp_path / "o"), "corpora": {"c": {"path": "c"}},
                            "train": {"r": {"backbone": "org/model", "data": "d.jsonl"}}})
    assert local.out == tmp_path / "o" and local.train["r"].output == tmp_path / "o" / "train" / "r"


def test_the_rayjob_keeps_its_outputs_and_training_runs_on_s3() -> None:
    """The KubeRay job tears its cluster down: its out, and with it the training runs, must be on S3."""
    import shlex

    import yaml

    from hrsa.cluster.pipeline import load_pipeline

    root = Path(__file__).resolve().parents[2]
    job = yaml.safe_load((root / "cluster" / "manifests" / "rayjob.yaml").read_text())
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:4] == ["python", "-m", "hrsa", "run"] and args[5] == "--out" and args[6].startswith("s3://")
    config = load_pipeline(root / args[4], out=args[6])
    assert config.out == args[6] and config.store.startswith("s3://")
    assert config.train and all(str(tc.output).startswith(f"{args[6]}/train/") for tc in config.train.values())


def test_hrsa_submit_hands_out_to_the_job() -> None:
    from hrsa.cluster.submit import run_command

    assert run_command("configs/a b.yaml") == "python -m hrsa run 'configs/a b.yaml'"
    assert run_command("p.yaml", out="s3://bucket/hrsa/out") == "python -m hrsa run p.yaml --out s3://bucket/hrsa/out"


def test_training_runs_and_a_store_under_a_remote_out_stay_remote(remote: Location, tmp_path: Path, tiny_models: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Training writes its runs straight to <out>/train/<run> (the default under a remote out), a store may live under
    the out too: a re-run downloaded every checkpoint of every recipe there into the local copy, each object whole
    in memory (a 7B run's optimizer state is tens of GB), and hashed them all at each push."""
    import hrsa.cluster.runner as runner

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": f"q {i}", "pos": t, "negs": [TEXTS[i - 1]]}) + "\n"
                            for i, t in enumerate(TEXTS)))
    corpus = tmp_path / "words.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    weights = "train/r/recipe-0123456789abcdef/step_000001/trainer_state.pt"
    for name in (weights, "store/zarr.json", "pairs/a--b/results.json", "trainer/kept.txt"):
        remote.child(name).write(b"x")
    seen: dict[str, Any] = {}

    def stages(config: Any, console: Any, published: PublishedOut | None, out: Any) -> None:
        local = published.local
        seen["local"] = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        published.push()  # what it did not copy is not taken for removed either

    monkeypatch.setattr(runner, "_run_stages", stages)
    values = {"store": f"{remote.url}/store", "out": remote.url, "corpora": {"words": {"path": str(corpus)}},
              "train": {"r": {"backbone": str(tiny_models.dir("llama")), "data": str(data), "batch_size": 4}}}
    run_pipeline(parse_pipeline(values), console=Console(quiet=True), local_copy=tmp_path / "copy")
    assert seen["local"] == ["pairs/a--b/results.json", "trainer/kept.txt"]
    assert {weights, "store/zarr.json", "pairs/a--b/results.json", "trainer/kept.txt"} <= remote.files().keys()


def test_removals_go_up_before_the_state(remote: Location, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state went up before the removals: a run killed between them left the figures of an earlier setting beside
    the new results for good (the next run found the stage up to date, and its local copy pulled them back)."""
    published = PublishedOut.open(remote.url, state_file=STATE_FILE, local=tmp_path / "copy")
    state = PipelineState(published.local / STATE_FILE, on_write=published.push)
    pair = published.local / "pairs" / "a--b"
    pair.mkdir(parents=True)
    (pair / "results.json").write_text('{"metrics": ["cka", "probe"]}')
    (pair / "probe.png").write_text("probe")
    state.finish("analyze:a--b", "k1", {})
    (pair / "probe.png").unlink()  # the pair re-run without probes
    (pair / "results.json").write_text('{"metrics": ["cka"]}')
    order: list[str] = []
    real_write, real_delete = Location.write, Location.delete
    monkeypatch.setattr(Location, "write",
                        lambda self, data: order.append(f"write {self.name}") or real_write(self, data))
    monkeypatch.setattr(Location, "delete", lambda self: order.append(f"delete {self.name}") or real_delete(self))
    state.finish("analyze:a--b", "k2", {})
    assert order == ["write results.json", "delete probe.png", f"write {STATE_FILE}"]
    assert remote.files().keys() == {STATE_FILE, "pairs/a--b/results.json"}


def test_a_file_pulled_from_the_out_and_removed_by_a_stage_is_removed_there(remote: Location, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-run on a new machine: the figures of an earlier setting came down with the pull; the stage that removes
    them must remove them remotely too, and what it left as it was is not sent again (were the pulled files not known
    as sent, the remote out kept the old figures beside the new results for good)."""
    remote.child("pairs/a--b/results.json").write(b'{"metrics": ["cka", "probe"]}')
    remote.child("pairs/a--b/probe.png").write(b"probe")
    remote.child("report.html").write(b"<html/>")
    published = PublishedOut.open(remote.url, state_file=STATE_FILE, local=tmp_path / "copy")
    state = PipelineState(published.local / STATE_FILE, on_write=published.push)
    (published.local / "pairs" / "a--b" / "probe.png").unlink()  # the pair re-run without probes
    (published.local / "pairs" / "a--b" / "results.json").write_text('{"metrics": ["cka"]}')
    sent: list[str] = []
    real_write = Location.write
    monkeypatch.setattr(Location, "write", lambda self, data: sent.append(self.name) or real_write(self, data))
    state.finish("analyze:a--b", "k2", {})
    assert sent == ["results.json", STATE_FILE]  # report.html, pulled and unchanged, is not sent again
    assert remote.files().keys() == {STATE_FILE, "pairs/a--b/results.json", "report.html"}


@pytest.mark.parametrize("content", [
    '{"schema": "hrsa.pipeline-state/4", "stages": {"report": {"key"',  # truncated
    "[1, 2]", '{"schema": "hrsa.pipeline-state/4", "stages": {"report": {"status": "done"}}}',
    '{"schema": "hrsa.pipeline-state/4", "stages": []}', "\xff\xfe",
    '{"schema": "hrsa.pipeline-state/9", "stages": {}}'])
def test_a_damaged_remote_state_is_one_line_naming_its_url(remote: Location, tmp_path: Path, content: str) -> None:
    """A truncated or edited state was a traceback (JSONDecodeError, AttributeError, KeyError), and one of another
    schema said to move away the local copy's file, a temporary folder gone once the run ended."""
    from hrsa.store.errors import UserError

    corpus = tmp_path / "words.jsonl"
    corpus.write_text(json.dumps({"id": "d0", "text": TEXTS[0]}) + "\n")
    remote.child(STATE_FILE).write(content.encode("latin-1"))
    values = {"store": str(tmp_path / "store"), "out": remote.url, "corpora": {"words": {"path": str(corpus)}}}
    shown = re.escape(f"{remote.url}/{STATE_FILE}")
    with pytest.raises(UserError, match=rf"in {shown}\b.* Move the file away to start over\.$"):
        run_pipeline(parse_pipeline(values), console=Console(quiet=True), local_copy=tmp_path / "copy")
    assert remote.child(STATE_FILE).read_bytes() == content.encode("latin-1")


def test_an_object_that_is_also_a_folder_in_the_out_is_one_line_naming_both(remote: Location, tmp_path: Path) -> None:
    """Object storage holds `pairs/x` and `pairs/x/results.json` side by side (a stray upload); the pull failed with a
    raw NotADirectoryError naming the temporary local copy."""
    from hrsa.cluster.remote_out import RemoteOutError

    remote.child("pairs/x").write(b"stray")
    remote.child("pairs/x/results.json").write(b"{}")
    with pytest.raises(RemoteOutError) as refused:
        PublishedOut.open(remote.url, state_file=STATE_FILE, local=tmp_path / "copy")
    message = str(refused.value)
    assert f"{remote.url}/pairs/x" in message and "pairs/x/results.json" in message and str(tmp_path) not in message
    assert "\n" not in message and "Delete" in message, message


def test_a_report_path_that_is_a_url_is_refused() -> None:
    """report.path: s3://... was read as the local path ./s3:/..., written on the driver (lost with the cluster) and
    named as "report: s3:/..." like a URL."""
    from hrsa.cluster.pipeline import PipelineError

    with pytest.raises(PipelineError, match=r"report\.path: expected a local file, got the URL s3://b/r\.html"):
        parse_pipeline({"store": "s", "out": "s3://b/out", "corpora": {"c": {"path": "c"}},
                        "report": {"path": "s3://b/r.html"}})


@pytest.mark.parametrize("step", ["pull", "push"])
def test_a_storage_error_reaching_the_remote_out_is_one_line_naming_it(remote: Location, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """A network error while uploading (or downloading) the out was a full traceback."""
    from hrsa.cluster.remote_out import RemoteOutError

    remote.child("pairs/a--b/results.json").write(b"{}")

    def down(self: Location, *args: Any) -> Any:
        raise OSError("When uploading part for key 'x': AWS Error NETWORK_CONNECTION")

    if step == "pull":
        monkeypatch.setattr(Location, "read_bytes", down)
        with pytest.raises(RemoteOutError) as caught:
            PublishedOut.open(remote.url, state_file=STATE_FILE, local=tmp_path / "copy")
    else:
        published = PublishedOut.open(remote.url, state_file=STATE_FILE, local=tmp_path / "copy")
        (published.local / STATE_FILE).write_text("{}")
        monkeypatch.setattr(Location, "write", down)
        with pytest.raises(RemoteOutError) as caught:
            published.push()
    message = str(caught.value)
    assert "\n" not in message and remote.url in message and "NETWORK_CONNECTION" in message, message
    assert "Re-run the same pipeline" in message


# --- one pipeline run into an S3 out, read by the tests below ------------------------------------------------------

@pytest.fixture(scope="module")
def s3_run(s3_endpoint: str, tiny_models: Any, ray_local: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Location, dict[str, Any], Path]]:
    """(the S3 out, its pipeline, the local copy the run wrote) of one run of a pair into S3 (CKA and Procrustes: its
    folder holds results.json and figures)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        remote = parse_location(f"s3://hrsa-test/out-{uuid.uuid4().hex[:8]}")
        root = tmp_path_factory.mktemp("s3-run")
        corpus = root / "words.jsonl"
        corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
        values = {"store": str(root / "store"), "out": remote.url, "corpora": {"words": {"path": str(corpus)}},
                  "models": {"llama": {"model": str(tiny_models.dir("llama"))},
                             "qwen": {"model": str(tiny_models.dir("qwen2"))}},
                  "pairs": [{"a": "llama", "b": "qwen", "corpus": "words", "metrics": ["cka", "procrustes"],
                             "scheduler": "threads"}]}
        run_pipeline(parse_pipeline(values), console=Console(quiet=True), local_copy=root / "copy")
        yield remote, values, root / "copy"


def test_an_s3_outs_state_and_report_name_no_local_copy(s3_run: tuple[Location, dict[str, Any], Path]) -> None:
    """The state recorded the results, dynamics and report at their paths in the run's local copy (a temporary folder,
    gone once the run ended), and the report's page named the results files there."""
    remote, _, local_copy = s3_run
    state = remote.child(STATE_FILE).read_text()
    assert str(local_copy) not in state and "hrsa-out-" not in state, state
    stages = json.loads(state)["stages"]
    assert stages["analyze:llama--qwen"]["outputs"]["results"] == "pairs/llama--qwen/results.json"
    assert stages["report"]["outputs"]["report"] == "report.html"
    page = remote.child("report.html").read_text()
    assert str(local_copy) not in page and f"{remote.url}/pairs/llama--qwen/results.json" in page


def test_a_figure_deleted_from_an_s3_out_is_drawn_again(s3_run: tuple[Location, dict[str, Any], Path],
                                                        tmp_path: Path) -> None:
    """A figure deleted from the out after a run stayed missing: the analysis was up to date while its results.json
    read. Now the stage's record holds every file it wrote, by digest: that one stage runs again."""
    remote, values, _ = s3_run
    figure = next(n for n in sorted(remote.files()) if n.startswith("pairs/") and n.endswith(".png"))
    remote.child(figure).delete()
    again = run_pipeline(parse_pipeline(values), console=Console(quiet=True), local_copy=tmp_path / "again")
    assert again.ran == ("analyze:llama--qwen",), {s.name: s.reason for s in again.stages}
    assert {s.name: s.reason for s in again.stages}["analyze:llama--qwen"] == "its outputs are missing"
    assert figure in remote.files()
    again = run_pipeline(parse_pipeline(values), console=Console(quiet=True), local_copy=tmp_path / "third")
    assert again.ran == ()


def _s3_dynamics(remote: Location, local: Path, results: Path) -> str:
    """A dynamics series of two steps (copies of ``results``) in ``local``, uploaded beside ``remote``: its URL."""
    from hrsa.analyze.report.dynamics import write_dynamics

    steps = [local / f"step-{s}" / "results.json" for s in (0, 1)]
    for step in steps:
        step.parent.mkdir(parents=True)
        step.write_bytes(results.read_bytes())
    write_dynamics(local / "dynamics.json", runs=("ra", "rb"), steps=[0, 1], results=steps)
    url = f"{remote.url}-dynamics"
    for path in (local / "dynamics.json", *steps):
        parse_location(f"{url}/{path.relative_to(local).as_posix()}").write(path.read_bytes())
    return url


def test_hrsa_report_reads_results_and_dynamics_on_s3_as_it_reads_local_ones(
        s3_run: tuple[Location, dict[str, Any], Path], tmp_path: Path) -> None:
    """`hrsa report s3://...` read the URL as the local path ./s3:/...: a pipeline's results on S3 could not be
    reported without copying them down by hand. Folders, files and dynamics files on S3 read as local ones do; the
    page names them by their URLs."""
    remote, _, _ = s3_run
    local = tmp_path / "local"  # the same files, on this machine
    for name in remote.files():
        if name.startswith("pairs/"):
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_bytes(remote.child(name).read_bytes())
    dynamics = _s3_dynamics(remote, tmp_path / "dyn", local / "pairs" / "llama--qwen" / "results.json")
    pair = "pairs/llama--qwen/results.json"
    runs = {}
    for where, results, series in (("local", [str(local / "pairs"), str(local / pair)], tmp_path / "dyn"),
                                   ("s3", [f"{remote.url}/pairs", f"{remote.url}/{pair}"], dynamics)):
        runs[where] = CliRunner().invoke(cli, ["report", *results, "--dynamics", f"{series}/dynamics.json",
                                               "--out", str(tmp_path / f"{where}.html")])
        assert runs[where].exit_code == 0, runs[where].output
    assert runs["s3"].stdout.replace("s3.html", "local.html") == runs["local"].stdout and not runs["s3"].stderr
    pages = {w: re.sub(r" on \S+ from ", " on NOW from ", (tmp_path / f"{w}.html").read_text()) for w in runs}
    assert f"{remote.url}/{pair}" in pages["s3"] and f"{dynamics}/step-1/results.json" in pages["s3"]
    assert pages["s3"].replace(dynamics, str(tmp_path / "dyn")).replace(remote.url, str(local)) == pages["local"]


@pytest.mark.parametrize("damage", ["missing", "truncated", "missing folder", "damaged dynamics", "missing step"])
def test_a_missing_or_damaged_remote_report_input_is_one_line_naming_its_url(
        s3_run: tuple[Location, dict[str, Any], Path], tmp_path: Path, damage: str) -> None:
    """As for a local file: one line naming the URL, exit code 2, no report written."""
    remote, _, _ = s3_run
    base = f"{remote.url}-bad-{uuid.uuid4().hex[:6]}"
    good = remote.child("pairs/llama--qwen/results.json").read_bytes()
    args, named = [f"{remote.url}/pairs/llama--qwen"], f"{base}/results.json"
    if damage == "missing":
        args = [named]
    elif damage == "truncated":
        parse_location(named).write(good[: len(good) // 2])
        args = [named]
    elif damage == "missing folder":
        args, named = [base], base
    elif damage == "damaged dynamics":
        parse_location(f"{base}/dynamics.json").write(b'{"schema": "hrsa.dynamics/1", "runs": ')
        args, named = [*args, "--dynamics", f"{base}/dynamics.json"], f"{base}/dynamics.json"
    else:
        url = _s3_dynamics(parse_location(base), tmp_path / "dyn", _local_copy(good, tmp_path))
        parse_location(f"{url}/step-1/results.json").delete()
        args, named = [*args, "--dynamics", url], f"{url}/step-1/results.json"
    result = CliRunner().invoke(cli, ["report", *args, "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("hrsa: error: Expected") and named in result.stderr, result.stderr
    assert not (tmp_path / "r.html").exists()


def _local_copy(data: bytes, tmp_path: Path) -> Path:
    path = tmp_path / "copy" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


def test_an_error_about_a_damaged_remote_file_names_its_url(s3_run: tuple[Location, dict[str, Any], Path],
                                                           tmp_path: Path) -> None:
    """A folder where the out's report.html goes (objects under report.html/): the refusal named the file in the run's
    local copy, a temporary folder gone once the run ended, instead of the URL where it is."""
    from hrsa.cluster.runner import PIPELINE_LOCK
    from hrsa.store.errors import UserError

    remote, values, _ = s3_run
    out = parse_location(f"{remote.url}-damaged")
    for name in remote.files():  # the run's out, up to date but for its report
        if name not in ("report.html", PIPELINE_LOCK.lock_file):
            out.child(name).write(remote.child(name).read_bytes())
    out.child("report.html/index.html").write(b"<html/>")
    with pytest.raises(UserError) as caught:
        run_pipeline(parse_pipeline({**values, "out": out.url}), console=Console(quiet=True),
                     local_copy=tmp_path / "copy")
    message = str(caught.value)
    assert f"{out.url}/report.html" in message and str(tmp_path / "copy") not in message, message


def test_a_report_out_that_is_a_url_is_refused(s3_run: tuple[Location, dict[str, Any], Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`hrsa report s3://... --out s3://b/r.html` wrote the local file ./s3:/b/r.html and said "wrote s3:/b/r.html"."""
    remote, _, _ = s3_run
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["report", f"{remote.url}/pairs", "--out", f"{remote.url}/r.html"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert f"{remote.url}/r.html" in result.stderr and "local file" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == [] and "r.html" not in remote.files()
