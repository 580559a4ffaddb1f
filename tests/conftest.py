"""Test tiers and shared fixtures.

Tiers (markers): unit (default), property, integration, slow (opt-in with --run-slow), gpu (skips
without CUDA), data (skips without ../shared/data), real_model (skips without the packaged models).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub is reachable; never wait on one
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray Train's controller polls its workers every 2 s by default, and each step of a run's life (start, schedule, run,
# finish, shut down) waits for a poll: ~10 s of every training (a tiny run of 2 steps: 31-35 s -> 23-25 s). Polling
# every 0.2 s changes when the controller looks, not what it sees or decides (a missed poll counts only after
# RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min). Propagated to the controller by Ray Train itself; clusters started
# with ray_node_env drop RAY_ variables and keep Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# What hrsa keeps between processes (copies of remote models, digests of weights) goes to this session's own folder,
# removed when it ends: a test never finds what another run (or the user's ~/.cache/hrsa) kept.
_CACHE = tempfile.TemporaryDirectory(prefix="hrsa-test-cache-")
os.environ.setdefault("HRSA_CACHE", _CACHE.name)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _slow_on_s3(item: pytest.Item) -> bool:
    """An S3 row of a test marked ``slow_on_s3`` (whose ``keep`` rows of ``fault`` still run by default)."""
    marker = item.get_closest_marker("slow_on_s3")
    params = getattr(getattr(item, "callspec", None), "params", {})
    return marker is not None and params.get("target") == "s3" and params.get("fault") not in marker.kwargs.get("keep", ())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    skip_gpu = pytest.mark.skip(reason="gpu: no CUDA device here")
    skip_data = pytest.mark.skip(reason=f"data: {SHARED_DATA} is absent")
    has_cuda = _has_cuda() if any("gpu" in item.keywords for item in items) else False
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if _slow_on_s3(item) and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow on S3 (moto): run with --run-slow; the local row runs"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(skip_data)
    if getattr(config.option, "numprocesses", None):
        # pytest-xdist (make test) hands whole files to its workers in collection order: the files that start Ray or
        # processes (integration: three quarters of the suite's time) go first, so that the last files handed out are
        # short and both workers end together (in collection order, one worker ran the trainings alone for minutes).
        heavy = {item.path for item in items if item.get_closest_marker("integration")}
        items.sort(key=lambda item: item.path not in heavy)  # stable: each file's tests stay together, in order


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository (tests using it are marked ``data``)."""
    return SHARED_DATA


def _wait_for_port(port: int, server: subprocess.Popen[bytes], log: Any, timeout: float = 60.0) -> None:
    """Until the server accepts connections on ``port``; raises with the end of its output if it exits or never
    does (the caller stops it)."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    log.seek(0)
    raise RuntimeError(f"moto's S3 server did not start on port {port}: {log.read()[-2000:].decode(errors='replace')}")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A local S3 (moto's server mode on 127.0.0.1 in a process of its own, as s3fs's own tests run it), with one
    bucket. Its own process, not moto's thread in this one: the server's request handling then stops competing with
    the client's for this process's GIL (the S3 rows of tests/store/test_faults.py ran 164 -> 144 s)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    port = free_port()
    # Its output to a file, not a pipe: moto logs every request, and a pipe nobody reads would fill and stop it.
    log = tempfile.TemporaryFile()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    try:
        _wait_for_port(port, server, log)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="hrsa-test")
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- A two-node Ray cluster on this machine (tests/train/test_multi_node.py) -----------------------------------------
from hrsa.cluster.local_cluster import LocalRayCluster as RayTestCluster  # noqa: E402
from hrsa.cluster.local_cluster import free_port, ray_node_env, start_ray_cluster  # noqa: E402


def hiding_command(folder: Path) -> list[str]:
    """A prefix that runs a command in its own mount namespace with ``folder`` covered by an empty tmpfs: a node
    started so has a node-local disk there. Skips the test where user namespaces are not allowed."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("unshare -rm (a user and mount namespace) is not allowed here")
    return ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"', str(folder)]


@dataclass
class RayClusters:
    """Starts two-node test clusters (:func:`start_ray_cluster`) and stops each at the end of the session."""

    started: list[RayTestCluster] = field(default_factory=list)
    env = staticmethod(ray_node_env)
    hiding_command = staticmethod(hiding_command)

    def start(self, env: dict[str, str], *, second_node_prefix: list[str] | None = None) -> RayTestCluster:
        self.started.append(start_ray_cluster(env, second_node_prefix=second_node_prefix))
        return self.started[-1]


@pytest.fixture(scope="session")
def ray_clusters() -> Iterator[RayClusters]:
    clusters = RayClusters()
    yield clusters
    for cluster in clusters.started:
        cluster.stop()


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole test session (starting one costs ~5 s), via hrsa's own connect."""
    ray = pytest.importorskip("ray")
    from hrsa.runtime.connection import connect

    connection = connect(num_cpus=2)
    yield connection
    ray.shutdown()


# --- Tiny models (tests/extract, tests/train): randomly initialised, saved as local Hugging Face folders,
# so no hub is ever needed. ``tiny_models.dir(kind)`` builds (once per session) a 2-layer Llama, Qwen2 or
# BERT with a tiny byte-level BPE tokenizer (300 tokens, ids 0-3 special).

TINY_LAYERS = 2
TINY_HIDDEN = 32
TINY_VOCAB = 300
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0..3
_TRAINING_TEXT = ["the quick brown fox jumps over the lazy dog"] * 10 + ["hidden states of a tiny model", "w1 w2 w3"]


def build_tiny_tokenizer(extra_words: tuple[str, ...] = ()) -> object:
    """A byte-level BPE fast tokenizer of 300 tokens, trained here on a few sentences.

    Byte-level BPE, not a word-level toy: transformers 5 swaps in the model type's own tokenizer class
    for some types (a Qwen2 folder loads as Qwen2Tokenizer), and that class reads a BPE tokenizer.json
    correctly but a word-level one as garbage.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(_TRAINING_TEXT, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_tokens(list(extra_words))
    return tokenizer


def _tiny_config(kind: str) -> object:
    from transformers import BertConfig, LlamaConfig, Qwen2Config

    common = {
        "vocab_size": TINY_VOCAB, "hidden_size": TINY_HIDDEN, "num_hidden_layers": TINY_LAYERS, "num_attention_heads": 4
    }
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if kind == "llama":
        return LlamaConfig(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=128, **ids, **common)
    if kind == "qwen2":
        return Qwen2Config(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=128, **ids, **common)
    if kind == "bert":
        return BertConfig(intermediate_size=64, max_position_embeddings=128, pad_token_id=0, **common)
    raise ValueError(kind)


def save_tiny_model(folder: Path, kind: str, *, seed: int = 0) -> Path:
    """Save a tiny ``kind`` model and the tiny tokenizer into ``folder``."""
    import torch
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_config(_tiny_config(kind))
    model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


BANKING77 = ("Banking77Classification", "mteb/banking77", "0fd18e25b25c072e09e0d92ab615fda904d66300")  # task, data, pin


def cache_hub_dataset(cache: Path, repo: str, revision: str, splits: dict[str, dict[str, list[Any]]]) -> Path:
    """A hub dataset in the datasets cache as ``datasets.load_dataset(repo, revision=revision)`` leaves it, the data
    made here: the arrow files and dataset_info.json that datasets' Parquet builder writes, in
    ``<namespace>___<name>/default/0.0.0/<revision>/`` (what an offline load reads; no hub is reachable here)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    work = Path(tempfile.mkdtemp(prefix="hub-dataset-"))
    files = {split: str(work / f"{split}.parquet") for split in splits}
    for split, columns in splits.items():
        pq.write_table(pa.table(columns), files[split])
    namespace, name = repo.split("/")
    builder = Parquet(cache_dir=str(work / "cache"), dataset_name=name, hash=revision, config_name="default",
                      data_files=files)
    builder.download_and_prepare()
    target = cache / f"{namespace}___{builder.dataset_name}" / "default" / "0.0.0" / revision  # the name snake_cased
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.cache_dir, target)
    shutil.rmtree(work)
    return target


def banking77_splits(per_label: int = 10, *, test_shift: int = 0) -> dict[str, dict[str, list[Any]]]:
    """Four intents, ``per_label`` questions each, for both splits of Banking77Classification; the test split's labels
    moved on by ``test_shift`` (1: every test label is the next intent's, so a classifier right on the train split is
    wrong on every test row, an accuracy only these rows give)."""
    intents = ["card arrived late", "exchange rate charged", "cash withdrawal declined", "top up failed"]
    rows = [(f"why was my {intent} again, case {i}", k) for k, intent in enumerate(intents) for i in range(per_label)]
    texts, labels = [t for t, _ in rows], [k for _, k in rows]
    return {"train": {"text": texts, "label": labels},
            "test": {"text": texts, "label": [(k + test_shift) % len(intents) for k in labels]}}


@pytest.fixture
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty datasets cache (``cache_hub_dataset`` fills it), with the hub offline."""
    import datasets

    cache = tmp_path / "datasets-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


@dataclass
class TinyModels:
    """Tiny model folders built on demand, once per session, plus their sizes and tokenizer builder."""

    root: pytest.TempPathFactory
    layers: int = TINY_LAYERS
    hidden: int = TINY_HIDDEN
    built: dict[str, Path] = field(default_factory=dict)

    def dir(self, kind: str) -> Path:
        """The folder of the tiny ``kind`` ("llama", "qwen2" or "bert") model."""
        if kind not in self.built:
            self.built[kind] = save_tiny_model(self.root.mktemp(f"tiny-{kind}"), kind)
        return self.built[kind]

    @staticmethod
    def tokenizer(extra_words: tuple[str, ...] = ()) -> object:
        return build_tiny_tokenizer(extra_words)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return TinyModels(tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2() -> object:
    """The packaged SmolLM2-135M-Instruct, loaded once per session on CPU (20-30 s from its GGUF).

    Tests that use it are marked ``real_model`` and skip when the package is missing (``requires_packaged``).
    """
    from hrsa.extract.models import load_model, parse_model_spec

    return load_model(parse_model_spec("packaged:smollm2-135m-instruct"), device="cpu")


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory, smollm2: object) -> Path:
    """The packaged SmolLM2 saved once per session as a Hugging Face folder (float32, dequantised from its GGUF) by
    the demo's own :func:`materialize_backbone`: ``<root>/models/smollm2-135m-instruct``, where the demo puts it under
    its ``out``. Its GGUF load is the session's ``smollm2`` (the same load: packaged, float32 on CPU), so the folder
    costs a save (~3 s) where loading the GGUF again would take ~30 s; loading the folder takes ~2 s. Tests that read
    it must not write into it (link it, as tests/cluster/test_demo.py does). Marked ``real_model`` by its users."""
    from rich.console import Console

    import hrsa.extract.models as models
    from hrsa.cluster.demo_models import DEMO_MODEL, materialize_backbone

    want = models.parse_model_spec(DEMO_MODEL, dtype="float32")

    def session_model(spec: object, *, device: object = None) -> object:
        assert spec == want and device == "cpu" and smollm2.dtype == "float32", (spec, device)  # type: ignore[attr-defined]
        return smollm2

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "load_model", session_model)
        return materialize_backbone(tmp_path_factory.mktemp("smollm2-hf"), Console(quiet=True))


_TOKENIZERS: dict[str, tuple[object, object]] = {}


@pytest.fixture(scope="module")
def cached_tokenizers() -> object:
    """``load_tokenizer`` once per spec for the whole session (SmolLM2's from its GGUF takes 10-16 s), patched in
    for one module: each call still gets its own deep copy, so a test that changes its tokenizer changes no other."""
    import copy
    import json

    import hrsa.extract.models as models

    real = models.load_tokenizer

    def load(spec: object) -> tuple[object, object]:
        key = json.dumps(spec.to_dict(), sort_keys=True, default=str)  # type: ignore[attr-defined]
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = real(spec)
        tokenizer, context = _TOKENIZERS[key]
        return copy.deepcopy(tokenizer), context

    patch = pytest.MonkeyPatch()
    patch.setattr(models, "load_tokenizer", load)
    yield load
    patch.undo()
