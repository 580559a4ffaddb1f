"""A model folder behind a URL (a training checkpoint on S3, moto here): the same model as the local folder, loaded
from one cached copy per machine, identified by its files."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from hrsa.extract.model_spec import ModelSpecError, parse_model_spec
from hrsa.extract.models import forward_hidden_states, load_model
from hrsa.runtime.locations import Location, parse_location

pytestmark = pytest.mark.integration


@pytest.fixture
def uploaded(tiny_models: Any, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Location:
    """The tiny Llama's folder on S3, and a fresh cache for its copies."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("HRSA_CACHE", str(tmp_path / "cache"))
    folder = parse_location(f"s3://hrsa-test/models-{uuid.uuid4().hex[:8]}/step_000002")
    for file in Path(tiny_models.dir("llama")).iterdir():
        folder.child(file.name).write(file.read_bytes())
    return folder


def test_a_remote_folder_loads_as_the_local_one(uploaded: Location, tiny_models: Any, tmp_path: Path) -> None:
    from hrsa.extract.identity import model_identity

    spec = parse_model_spec(uploaded.url + "/", attention="bidirectional")
    assert (spec.kind, spec.path, spec.name) == ("remote", uploaded.url, "step_000002")
    remote, local = load_model(spec, device="cpu"), load_model(
        parse_model_spec(str(tiny_models.dir("llama")), attention="bidirectional"), device="cpu")
    ids = local.tokenizer("w1 w2 the quick fox").input_ids
    assert remote.tokenizer("w1 w2 the quick fox").input_ids == ids
    torch.testing.assert_close(forward_hidden_states(remote, [ids])[0], forward_hidden_states(local, [ids])[0],
                               rtol=0, atol=0)
    copies = list((tmp_path / "cache" / "remote").iterdir())
    assert len(copies) == 1 and copies[0].name.endswith("-step_000002")  # one whole copy, no partial left
    load_model(spec, device="cpu")
    assert list((tmp_path / "cache" / "remote").iterdir()) == copies  # reused
    assert model_identity(spec)["content"] == model_identity(parse_model_spec(str(tiny_models.dir("llama"))))["content"]


def test_a_url_without_a_model_is_one_clear_error(uploaded: Location) -> None:
    with pytest.raises(ModelSpecError, match=r"Expected a model folder holding config\.json at s3://.*/nothing\. "):
        parse_model_spec(uploaded.parent.url + "/nothing")
    with pytest.raises(ModelSpecError, match="Expected no revision or gguf_file for the URL"):
        parse_model_spec(uploaded.url, revision="main")


def test_a_remote_folder_rewritten_with_weights_of_the_same_size_is_copied_again(
        uploaded: Location, tiny_models: Any, tmp_path: Path) -> None:
    """A run re-trained into the same URL writes checkpoints of the same sizes, within the second on a fast writer
    (S3 lists modification times in whole seconds): the cached copy of the old weights must not stand in for them."""
    from safetensors.torch import load_file, save_file

    from hrsa.extract.identity import model_identity

    spec = parse_model_spec(uploaded.url, attention="bidirectional")
    load_model(spec, device="cpu")  # cached
    weights = load_file(tiny_models.dir("llama") / "model.safetensors")
    changed = {name: tensor * 1.25 for name, tensor in weights.items()}
    other = tmp_path / "other"
    shutil.copytree(tiny_models.dir("llama"), other)
    save_file(changed, other / "model.safetensors", metadata={"format": "pt"})
    assert (other / "model.safetensors").stat().st_size == (tiny_models.dir("llama") / "model.safetensors").stat().st_size
    uploaded.child("model.safetensors").write((other / "model.safetensors").read_bytes())

    assert model_identity(spec)["content"] == model_identity(parse_model_spec(str(other)))["content"]
    local = load_model(parse_model_spec(str(other), attention="bidirectional"), device="cpu")
    ids = local.tokenizer("w1 w2 the quick fox").input_ids
    torch.testing.assert_close(forward_hidden_states(load_model(spec, device="cpu"), [ids])[0],
                               forward_hidden_states(local, [ids])[0], rtol=0, atol=0)


def test_a_remote_models_changed_weights_are_told_by_the_rerun_check(uploaded: Location, tiny_models: Any,
                                                                     tmp_path: Path) -> None:
    """A re-run of a complete model compared local weights only ("a remote one is compared by the workers that load
    it"), but with the model complete no worker loads it: other weights at the URL read as nothing to do."""
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    from hrsa.extract.identity import model_content
    from hrsa.extract.rerun import _weights_changed

    spec = parse_model_spec(uploaded.url)
    stored = SimpleNamespace(source={"content": model_content(spec)})  # what a complete extraction recorded
    assert not _weights_changed(spec, stored)  # type: ignore[arg-type]
    weights = load_file(tiny_models.dir("llama") / "model.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({name: tensor * 1.25 for name, tensor in weights.items()}, other, metadata={"format": "pt"})
    uploaded.child("model.safetensors").write(other.read_bytes())
    assert _weights_changed(spec, stored)  # type: ignore[arg-type]


def test_a_listing_the_storage_refuses_is_one_line(uploaded: Location, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import NoCredentialsError
    from s3fs import S3FileSystem

    from hrsa.runtime.locations import LocationError

    def no_credentials(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise NoCredentialsError()

    monkeypatch.setattr(S3FileSystem, "find", no_credentials)
    with pytest.raises(LocationError, match=r"Expected to list s3://.*\. Got NoCredentialsError: ") as error:
        uploaded.versions()
    assert "\n" not in str(error.value)


def test_a_folder_rewritten_while_it_is_copied_is_copied_again(uploaded: Location, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Files re-uploaded between the listing and the end of the copy: the copy (the new bytes, or a mix) was kept
    under the old listing's key, and stood for the old files from then on."""
    import hrsa.runtime.locations as locations

    real_copy, copies = locations._copy_files, []

    def rewritten_during_the_first_copy(folder: Location, to: Path) -> None:
        real_copy(folder, to)
        if not copies:
            folder.child("config.json").write((to / "config.json").read_text().replace("{", "{\n", 1))
        copies.append(to)

    monkeypatch.setattr(locations, "_copy_files", rewritten_during_the_first_copy)
    copy = uploaded.local_folder()
    assert len(copies) == 2 and (copy / "config.json").read_bytes() == uploaded.child("config.json").read_bytes()
    assert [p.name for p in copy.parent.iterdir()] == [copy.name]  # the first copy was not kept
