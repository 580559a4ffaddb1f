"""Training on Ray Train (2 workers, tiny bidirectional Llama): it learns, its checkpoints load in
`hrsa extract` bidirectionally, and a run interrupted (stopped, then a worker killed mid-run and restarted by Ray
Train) ends where one uninterrupted process does."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.integration

WORDS = "the quick brown fox jumps over the lazy dog".split()
TOPICS = 12


def _records(n: int, *, seed: int) -> list[dict[str, Any]]:
    """Query of topic t carries key letter t (upper case), its positive a different letter (a fixed shuffle of
    the lower case ones): nothing but training links them. Hard negatives share the query's filler words."""
    rng = random.Random(seed)
    doc_keys = [chr(97 + i) for i in range(TOPICS)]
    random.Random(123).shuffle(doc_keys)
    out = []
    for _ in range(n):
        t = rng.randrange(TOPICS)
        filler = " ".join(rng.choice(WORDS) for _ in range(3))
        others = rng.sample([j for j in range(TOPICS) if j != t], 2)
        out.append({"query": f"{filler} {chr(65 + t) * 3}",
                    "pos": f"{' '.join(rng.choice(WORDS) for _ in range(3))} {doc_keys[t] * 3}",
                    "negs": [f"{filler} {doc_keys[j] * 3}" for j in others], "topic": t})
    return out


def _accuracy(folder: Path, held_out: list[dict[str, Any]]) -> float:
    """Top-1 retrieval of each held-out query's topic document, with our own encoder."""
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.train.model import load_embedding_model, tokenize

    model, tok, _ = load_embedding_model(parse_model_spec(str(folder), attention="bidirectional"), device="cpu")
    model.eval()
    docs = {r["topic"]: r["pos"] for r in held_out}
    topics = sorted(docs)
    with torch.no_grad():
        q = model.embed(tokenize(tok, [r["query"] for r in held_out], max_length=32))
        d = model.embed(tokenize(tok, [docs[t] for t in topics], max_length=32))
    predicted = [topics[i] for i in (q @ d.T).argmax(dim=1).tolist()]
    return sum(p == r["topic"] for p, r in zip(predicted, held_out)) / len(held_out)


def _train_workers() -> list[Any]:
    """The Ray Train worker processes of this test session's embedded Ray (children of its raylet, a child of this
    process), not those of any other Ray on the machine."""
    import os

    import psutil

    found = []
    for process in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in process.cmdline()) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def _kill_a_worker_once_saved(checkpoint: Path, killed: list[int], done: threading.Event) -> threading.Thread:
    """A thread that SIGKILLs one Ray Train worker's process once ``checkpoint`` is complete, as a lost node would,
    after checking that the driver holds the run folder; it gives up (kills nothing) once ``done`` is set."""
    from hrsa.runtime.locations import parse_location
    from hrsa.train.run_lock import RunInUseError, exclusive_run

    def kill() -> None:
        while not (checkpoint / "hrsa_train.json").is_file():
            if done.wait(0.02):
                return
        try:  # the driver holds the folder for the whole run, not only at its start
            with exclusive_run(parse_location(checkpoint.parent)):
                return  # not held: nothing killed, the fixture fails
        except RunInUseError:
            pass
        for process in _train_workers()[:1]:
            process.kill()
            killed.append(process.pid)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def run(ray_local: Any, tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run interrupted after step 12, then resumed to step 24 with a worker killed once step 16 is saved."""
    from hrsa.train.config import TrainConfig
    from hrsa.train.trainer import run_training

    root = tmp_path_factory.mktemp("train")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(200, seed=1)))
    config = TrainConfig(backbone=str(tiny_models.dir("llama")), data=data, output=root / "run", workers=2,
                         batch_size=8, negatives=1, max_steps=24, save_every=8, lr=3e-3, temperature=0.05,
                         warmup_ratio=0.1, chunk_size=5, max_length=32)
    first = run_training(config, progress=False, stop_after=12)
    # Ray Train's own record of the run, gone as when a kill lands between a checkpoint's files and Ray's record:
    # the resume point is the latest complete checkpoint on storage, not what Ray recorded.
    (root / "run" / "checkpoint_manager_snapshot.json").unlink()
    # What a kill while step 16's checkpoint was being written leaves: a short weights file and a stray one.
    (root / "run" / "step_000016").mkdir()
    (root / "run" / "step_000016" / "model.safetensors").write_bytes(b"torn")
    (root / "run" / "step_000016" / "stray.bin").write_bytes(b"left by the killed run")
    # Ray Train restarts the worker group (max_failures, a scheduling setting: the same recipe); the new workers
    # resume from the latest complete checkpoint, step 16, not from where this call started (12).
    killed: list[int] = []
    done = threading.Event()
    killer = _kill_a_worker_once_saved(root / "run" / "step_000016", killed, done)
    try:
        second = run_training(config.model_copy(update={"max_failures": 1}), progress=False)
    finally:
        done.set()
        killer.join()
    assert killed, "no worker was killed (step 16 never saved, or the run folder not held by the driver)"
    return {"config": config, "first": first, "second": second, "held_out": _records(40, seed=2), "root": root}


def test_an_interrupted_run_resumes_from_its_last_checkpoint(run: dict[str, Any]) -> None:
    first, second = run["first"], run["second"]
    assert first.resumed_from is None and first.steps == tuple(range(1, 13)) and first.restarted_from == ()
    assert [p.name for p in first.checkpoints] == ["step_000008", "step_000012"]
    # The steps the final model went through, each once (steps after 16 that ran before the kill ran again).
    assert second.resumed_from == 12 and second.steps == tuple(range(13, 25))
    assert second.restarted_from == (16,)
    assert [p.name for p in second.checkpoints] == ["step_000008", "step_000012", "step_000016", "step_000024"]
    assert all(p.parent == run["config"].output.resolve() for p in second.checkpoints)
    # Step 16, written again over what the killed run left: its files and nothing else.
    step_16 = second.checkpoints[2]
    manifest = json.loads((step_16 / "hrsa_train.json").read_text())["files"]
    assert sorted(p.relative_to(step_16).as_posix() for p in step_16.rglob("*") if p.is_file()) == sorted([*manifest, "hrsa_train.json"])
    assert all((step_16 / name).stat().st_size == entry["size"] for name, entry in manifest.items())
    info = json.loads((second.checkpoints[-1] / "hrsa_train.json").read_text())
    assert info["step"] == 24 and info["loss"] == pytest.approx(second.final_loss)
    assert info["config"]["batch_size"] == 8 and info["backbone"]["kind"] == "local"


def test_resumed_two_worker_run_equals_one_uninterrupted_process(run: dict[str, Any]) -> None:
    """Oracle: the same 24 steps in this process, one worker holding the whole batch, plain backward."""
    from safetensors.torch import load_file

    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.train.worker import setup_session, train_step

    config = run["config"].model_copy(update={"workers": 1, "chunk_size": None})
    spec = parse_model_spec(config.backbone, attention="bidirectional").to_dict()
    session = setup_session(config, spec, 0, 1, torch.device("cpu"), None)
    losses = [train_step(session) for _ in range(24)]
    assert run["first"].losses + run["second"].losses == pytest.approx(losses, rel=2e-3, abs=2e-3)
    saved = load_file(run["second"].checkpoints[-1] / "model.safetensors")
    expected = session.model.backbone.state_dict()
    for name, value in saved.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-3, atol=1e-4, msg=name)


def test_training_lowers_the_loss_and_raises_retrieval_accuracy(run: dict[str, Any]) -> None:
    losses = run["first"].losses + run["second"].losses
    assert sum(losses[-4:]) / 4 < losses[0] / 3
    before = _accuracy(Path(run["config"].backbone), run["held_out"])
    after = _accuracy(run["second"].checkpoints[-1], run["held_out"])
    assert before < 0.35 and after > 0.8, (before, after)


def test_checkpoints_load_in_extract_bidirectionally(run: dict[str, Any]) -> None:
    from hrsa.extract.job import ExtractConfig, run_extraction
    from hrsa.extract.models import load_model, parse_model_spec
    from hrsa.store import ActivationStore

    checkpoint = run["second"].checkpoints[-1]
    assert load_model(parse_model_spec(str(checkpoint), attention="auto"), device="cpu").attention == "bidirectional"
    corpus = run["root"] / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": r["query"]}) + "\n" for r in run["held_out"][:5]))
    store = run["root"] / "store"
    result = run_extraction(ExtractConfig(store=str(store), model=str(checkpoint), corpus=str(corpus), workers=1))
    info = ActivationStore.open(str(store)).model_info(result.model_id)
    assert info.complete and info.attention == "bidirectional"


def _cli_run_until_saved(tiny_models: Any, tmp_path: Path, *, max_steps: int, save_every: int,
                         step: int) -> tuple[Any, list[str], dict[str, str], Path]:
    """`hrsa train` started in a session of its own (it and the Ray it embeds), once its checkpoint ``step`` is
    complete: the process, its command and environment (to run it again), and its run folder."""
    import os
    import subprocess
    import sys
    import time

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(100, seed=1)))
    output = tmp_path / "run"
    command = [sys.executable, "-m", "hrsa", "train", "--backbone", str(tiny_models.dir("llama")), "--data", str(data),
               "--output", str(output), "--workers", "1", "--batch-size", "4", "--max-steps", str(max_steps),
               "--save-every", str(save_every), "--lr", "1e-3", "--max-length", "32", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while not (output / f"step_{step:06d}" / "hrsa_train.json").is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, 9)
            pytest.fail(f"no checkpoint {step} before the deadline: {proc.communicate()[1]}")
        time.sleep(0.2)
    return proc, command, env, output


@pytest.mark.slow
def test_a_killed_cli_run_resumes(tiny_models: Any, tmp_path: Path) -> None:
    """`hrsa train` killed (SIGKILL, with its embedded Ray) after its second checkpoint; the same command resumes
    (the same command: another --max-steps is another recipe, refused in that folder)."""
    import os
    import re
    import signal
    import subprocess

    from hrsa.train.checkpoints import list_checkpoints

    proc, command, env, output = _cli_run_until_saved(tiny_models, tmp_path, max_steps=100, save_every=10, step=20)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and the Ray it started
    proc.communicate()
    last = list_checkpoints(output)[-1].step
    assert last < 100, "the run finished before it was killed"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    resumed = re.search(r"resumed from step (\d+)", done.stdout)
    # The latest complete checkpoint, whether or not Ray Train had recorded it before the kill (a worker that outlived
    # the kill for a moment may have completed a later one since it was listed).
    assert resumed and last <= int(resumed.group(1)) < 100, done.stdout
    assert (output / "step_000100" / "hrsa_train.json").is_file()


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_the_cli_run_with_a_checkpoint(tiny_models: Any, tmp_path: Path) -> None:
    """SIGINT to `hrsa train`'s whole process group, as a terminal's Ctrl-C sends it (its embedded Ray included):
    exit code 130, one line naming the step it stopped after, and that step saved (resuming from a stopped run is
    the in-process test's)."""
    import os
    import re
    import signal

    from hrsa.train.checkpoints import list_checkpoints

    proc, _, _, output = _cli_run_until_saved(tiny_models, tmp_path, max_steps=1000, save_every=5, step=5)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    stopped = re.search(r"stopped after step (\d+)", err)
    assert stopped and 5 <= int(stopped.group(1)) < 1000, err
    assert list_checkpoints(output)[-1].step == int(stopped.group(1))


def test_checkpoints_are_written_in_place_only_on_a_path_this_node_sees(tmp_path: Path) -> None:
    """Rank 0 writes in place on a local path whose run folder it sees (Ray Train's marker there); a run folder it
    does not see is Ray's own error, as the upload's check was; any other filesystem uploads."""
    import fsspec
    import pyarrow.fs
    from ray.train.v2._internal.execution.storage import StorageContext

    from hrsa.train.worker import _writes_in_place

    local = StorageContext(str(tmp_path), "run")
    assert _writes_in_place(local)
    for marker in (tmp_path / "run").glob(".validate*"):
        marker.unlink()  # what a node that does not share the path sees
    with pytest.raises(RuntimeError, match="Unable to set up cluster storage"):
        _writes_in_place(local)
    remote = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fsspec.filesystem("memory")))
    assert not _writes_in_place(StorageContext("/runs", "run", storage_filesystem=remote))


def test_a_checkpoint_saved_again_replaces_the_whole_folder_and_a_killed_save_leaves_nothing(tmp_path: Path) -> None:
    from hrsa.train.worker import publish_in_place

    folder = tmp_path / "step_000016"

    def save(files: dict[str, bytes]) -> Any:
        def write(staging: Path) -> None:
            assert not staging.name.startswith("step_")  # not a step folder while it is written: never listed
            staging.mkdir()
            for name, data in files.items():
                (staging / name).write_bytes(data)
        return write

    publish_in_place(folder, save({"model.safetensors": b"first", "stray.bin": b"of the first save"}))
    publish_in_place(folder, save({"model.safetensors": b"second"}))
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"] and (folder / "model.safetensors").read_bytes() == b"second"

    def killed(staging: Path) -> None:
        save({"model.safetensors": b"tor"})(staging)
        raise KeyboardInterrupt  # killed while writing

    with pytest.raises(KeyboardInterrupt):
        publish_in_place(folder, killed)
    assert (folder / "model.safetensors").read_bytes() == b"second"  # the save before stays whole
    (tmp_path / ".step_000016.new-deadbeef").mkdir()  # what a SIGKILL leaves: no finally ran
    publish_in_place(folder, save({"model.safetensors": b"third"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000016"]


def test_a_calls_result_counts_each_step_once_as_it_last_ran() -> None:
    """Rank 0's events of a call resumed at step 4 whose workers died after step 7 and restarted from step 6: steps 7
    and after ran twice, and the result holds the second run of each."""
    from hrsa.runtime.locations import parse_location
    from hrsa.train.trainer import _result

    events = [{"started": 4}, *({"step": s, "loss": 1.0} for s in (5, 6, 7, 8)), {"started": 6},
              *({"step": s, "loss": 2.0} for s in (7, 8, 9))]
    result = _result(parse_location("/tmp/run"), (), events)
    assert result.steps == (5, 6, 7, 8, 9) and result.losses == (1.0, 1.0, 2.0, 2.0, 2.0)
    assert result.resumed_from == 4 and result.restarted_from == (6,) and result.final_loss == 2.0
    fresh = _result(parse_location("/tmp/run"), (), [{"started": 0}, {"step": 1, "loss": 3.0}])
    assert fresh.resumed_from is None and fresh.restarted_from == () and fresh.steps == (1,)


def test_a_stopped_training_pickles_whole() -> None:
    """It crosses process boundaries (a pipeline run as a Ray job, a Ray task calling run_training) whole."""
    import pickle

    from hrsa.runtime.locations import parse_location
    from hrsa.train.trainer import TrainingStopped, _result

    stopped = TrainingStopped(_result(parse_location("/tmp/run"), (), [{"started": 0}, {"step": 1, "loss": 3.0}]), 1)
    again = pickle.loads(pickle.dumps(stopped))
    assert again.step == 1 and again.result == stopped.result and str(again) == "training stopped after step 1"


def test_an_interrupted_driver_stops_its_workers_with_a_checkpoint_before_it_lets_go(
        ray_local: Any, tiny_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the driver (a KeyboardInterrupt in its main thread, as in a notebook, where nothing else would stop
    Ray Train's workers): every rank stops after the same step, that step is saved, and only then is the run folder
    let go; the same command again resumes from it."""
    import os
    import signal
    import time

    import hrsa.train.trainer as trainer_module
    from hrsa.runtime.locations import parse_location
    from hrsa.train.checkpoints import list_checkpoints
    from hrsa.train.config import TrainConfig
    from hrsa.train.run_lock import exclusive_run

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(100, seed=1)))
    config = TrainConfig(backbone=str(tiny_models.dir("llama")), data=data, output=tmp_path / "run", workers=2,
                         batch_size=4, max_steps=400, save_every=200, lr=1e-3, max_length=32)
    drain, steps_seen, interrupts = trainer_module._drain, [], []
    assert not _train_workers()

    def drain_then_interrupt(queue: Any, *, wait: bool) -> list[dict[str, Any]]:
        """The progress loop's drain; once 3 steps are reported, a real SIGINT to this process (once), which lands
        wherever the main thread is then (a queue read included)."""
        events = drain(queue, wait=wait)
        steps_seen.extend(e["step"] for e in events if "step" in e)
        if len(steps_seen) >= 3 and not interrupts:
            interrupts.append(len(steps_seen))
            os.kill(os.getpid(), signal.SIGINT)
        return events

    monkeypatch.setattr(trainer_module, "_drain", drain_then_interrupt)
    with pytest.raises(trainer_module.TrainingStopped) as stopped:
        trainer_module.run_training(config, progress=False)
    monkeypatch.setattr(trainer_module, "_drain", drain)
    result, last = stopped.value.result, stopped.value.step
    assert 3 <= last < 200 and result.steps == tuple(range(1, last + 1))  # every step's event, none lost
    assert [c.step for c in list_checkpoints(tmp_path / "run")] == [last]  # the step every rank stopped after, saved
    with exclusive_run(parse_location(tmp_path / "run")):  # let go once no worker was left to write into it
        gone_by = time.monotonic() + 10  # Ray Train's shutdown kills its workers without waiting for them
        while _train_workers() and time.monotonic() < gone_by:
            time.sleep(0.1)
        assert not _train_workers()
    again = trainer_module.run_training(config, progress=False, stop_after=last + 2)
    assert again.resumed_from == last and again.steps == (last + 1, last + 2)


def test_the_drivers_own_actors_are_placed_on_its_node(ray_local: Any) -> None:
    """The progress queue and the stop flag live on the driver's node (hard affinity): a restart after the loss of
    a worker's node still finds them."""
    import ray

    from hrsa.train.trainer import on_driver_node

    strategy = on_driver_node()
    assert strategy.node_id == ray.get_runtime_context().get_node_id() and strategy.soft is False


def test_a_lost_lease_stops_the_workers_without_a_save_and_ctrl_c_with_one() -> None:
    """The driver's loop, with a stand-in trainer whose 'workers' read the stop flag as rank 0 does: Ctrl-C asks for a
    stop that saves the last step; a lease found taken asks for one that writes nothing more into the folder (another
    training holds it), and wins over a Ctrl-C asked before it."""
    import queue as queue_module
    import threading
    import time

    from ray.util.queue import Empty

    from hrsa.train.trainer import StopRequest, _fit_with_progress
    from hrsa.train.worker import STOP_AND_SAVE, STOP_NOW

    class Queue:  # ray.util.queue.Queue's calls, in process
        def __init__(self) -> None:
            self.q: queue_module.Queue[dict[str, Any]] = queue_module.Queue()

        def put(self, item: dict[str, Any]) -> None:
            self.q.put(item)

        def empty(self) -> bool:
            return self.q.empty()

        def qsize(self) -> int:
            return self.q.qsize()

        def get(self, block: bool = True, timeout: float | None = None) -> dict[str, Any]:
            try:
                return self.q.get(block=block, timeout=timeout)
            except queue_module.Empty:
                raise Empty from None

        def get_nowait_batch(self, n: int) -> list[dict[str, Any]]:
            return [self.q.get_nowait() for _ in range(n)]

    class Remote:  # stop_request.request.remote(...) in process
        def __init__(self, flag: StopRequest) -> None:
            self.request = type("M", (), {"remote": staticmethod(flag.request)})()

    for lose, want in ((False, 0), (True, STOP_NOW)):
        flag, events, lost = StopRequest(), Queue(), threading.Event()

        class Trainer:
            @staticmethod
            def fit() -> None:  # rank 0: a step every 20 ms until asked, then what a worker does when asked
                for step in range(1, 200):
                    if flag.get():
                        events.put({"halted": step - 1, "asked": flag.get()})
                        return
                    events.put({"step": step, "loss": 1.0})
                    if step == 5 and lose:
                        lost.set()
                    time.sleep(0.02)

        got = _fit_with_progress(Trainer(), events, Remote(flag), 200, progress=False, lost=lost)
        halted = [e for e in got if "halted" in e]
        assert (halted[0]["asked"] if halted else 0) == want, got
    flag = StopRequest()
    flag.request()
    assert flag.get() == STOP_AND_SAVE
    flag.request(save=False)
    flag.request()
    assert flag.get() == STOP_NOW  # a lost lease is not undone by a later Ctrl-C


def test_a_start_that_fails_in_the_workers_leaves_no_run_folder(tiny_models: Any, tmp_path: Path, ray_local: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A backbone no worker could load failed after Ray started and left OUTPUT with hrsa_recipe.json and the lock: a
    command that fails creates nothing. A folder that held a run before is left as it was."""
    import hrsa.train.trainer as trainer
    from hrsa.store.errors import UserError
    from hrsa.train.config import TrainConfig

    def fail(*args: Any, **kwargs: Any) -> None:
        raise UserError("Expected a backbone the workers load. Got none.")

    monkeypatch.setattr(trainer, "_run_workers", fail)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(8, seed=1)))
    config = TrainConfig(backbone=str(tiny_models.dir("llama")), data=data, output=tmp_path / "run", batch_size=4,
                         negatives=1, max_steps=2)
    with pytest.raises(UserError, match="Got none"):
        trainer.run_training(config, progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="Got none"):
        trainer.run_training(config.model_copy(update={"output": tmp_path / "kept"}), progress=False)
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"


def test_a_start_refused_by_the_lock_leaves_the_holders_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another start took the folder between this one's look (nothing there) and its lock: the refused start removed
    the folder it had not created, the holder's lock and recipe with it (found in review)."""
    from contextlib import ExitStack
    from types import SimpleNamespace

    import hrsa.train.run_lock as run_lock
    from hrsa.runtime.folder_lock import FolderInUseError
    from hrsa.runtime.locations import parse_location
    from hrsa.train import trainer

    run = parse_location(str(tmp_path / "run"))
    recipe = SimpleNamespace(on_device=lambda gpu: recipe)
    monkeypatch.setattr(trainer, "_prepare", lambda c: trainer._Prepared(c, {}, [], run, recipe))
    monkeypatch.setattr("hrsa.runtime.connection.connect", lambda address: SimpleNamespace(nodes=[]))
    monkeypatch.setattr("hrsa.train.placement.plan_workers", lambda *a, **k: SimpleNamespace(use_gpu=False))
    monkeypatch.setattr("hrsa.train.placement.check_every_node_reaches", lambda *a: None)
    monkeypatch.setattr(trainer, "_wait_for_room", lambda *a: None)  # no Ray here
    real, holder = run_lock.exclusive_run, ExitStack()

    def taken_meanwhile(location: Any) -> Any:
        holder.enter_context(real(location))  # the other start: it holds the folder and has claimed it
        (tmp_path / "run" / "hrsa_recipe.json").write_text("the holder's recipe")
        return real(location)  # this start's own attempt: refused

    monkeypatch.setattr(run_lock, "exclusive_run", taken_meanwhile)
    with holder, pytest.raises(FolderInUseError):
        trainer.run_training(SimpleNamespace(address=None, workers=1, use_gpu=False, output=str(tmp_path / "run")))
    assert (tmp_path / "run" / "hrsa_recipe.json").read_text() == "the holder's recipe"


def _added_token_backbone(tiny_models: Any, folder: Path) -> Path:
    """The tiny Llama (300 token embeddings) with a tokenizer that adds 'zzyzx' as id 300, which it has none for."""
    import shutil

    shutil.copytree(tiny_models.dir("llama"), folder)
    tiny_models.tokenizer(("zzyzx",)).save_pretrained(folder)
    return folder


def test_training_texts_with_a_token_past_the_backbones_vocabulary_are_refused_before_a_step(
        tiny_models: Any, tmp_path: Path, ray_local: Any) -> None:
    """A backbone whose tokenizer has tokens past its embeddings failed in a worker with IndexError: one line now,
    naming the token and its record, before any step, and no run folder is left."""
    from hrsa.store.errors import UserError
    from hrsa.train.config import TrainConfig
    from hrsa.train.trainer import run_training

    records = _records(8, seed=1)
    records[5]["negs"][1] = "the zzyzx dog"
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = TrainConfig(backbone=str(_added_token_backbone(tiny_models, tmp_path / "added")), data=data,
                         output=tmp_path / "run", batch_size=4, negatives=1, max_steps=2)
    with pytest.raises(UserError) as info:
        run_training(config, progress=False)
    message = str(info.value)
    assert "\n" not in message and "Expected token ids below 300 (the model's vocabulary)" in message, message
    assert "300 ('zzyzx') in record 6" in message and "resize_token_embeddings" in message, message
    assert not (tmp_path / "run").exists()


def test_an_encoder_refuses_texts_with_a_token_past_its_vocabulary(tiny_models: Any, tmp_path: Path) -> None:
    """Evaluation and mining embed texts with TextEncoder: the same token failed there in an IndexError traceback."""
    from hrsa.store.errors import UserError
    from hrsa.train.encode import TextEncoder

    encoder = TextEncoder.load(str(_added_token_backbone(tiny_models, tmp_path / "added")), device="cpu")
    assert encoder.encode(["the lazy dog"]).shape == (1, 32)
    with pytest.raises(UserError, match=r"Got 300 \('zzyzx'\) in text 2 \('the zzyzx dog'\)"):
        encoder.encode(["the lazy dog", "the zzyzx dog"])


class _Holder:
    def ready(self) -> bool:
        return True


def test_training_on_a_cluster_whose_cpus_another_job_holds_is_refused_not_a_hang(
        tiny_models: Any, tmp_path: Path, ray_local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train waited without end, printing nothing, for workers the cluster had room for but another job held
    (extraction gave up after its wait): refused after the same wait, before anything is written."""
    import ray

    import hrsa.runtime.placement as placement
    from hrsa.runtime.placement import PlacementError
    from hrsa.train.config import TrainConfig
    from hrsa.train.trainer import run_training

    monkeypatch.setattr(placement, "ROOM_TIMEOUT_S", 3.0)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(8, seed=1)))
    config = TrainConfig(backbone=str(tiny_models.dir("llama")), data=data, output=tmp_path / "run", batch_size=4,
                         negatives=1, max_steps=2)
    holder = ray.remote(num_cpus=2)(_Holder).remote()  # another job's actor on both CPUs of this test's Ray
    try:
        assert ray.get(holder.ready.remote(), timeout=60)
        with pytest.raises(PlacementError, match=r"Expected room for 1 worker\(s\) .* within 3 s.*other jobs hold"):
            run_training(config, progress=False)
    finally:
        ray.kill(holder)
    assert not (tmp_path / "run").exists()
