"""A training run's recipe: everything that changes its weights, recorded in its folder when it starts.

The recipe (:class:`TrainingRecipe`) is the backbone (:func:`hrsa.extract.identity.model_identity`: a local
folder, .gguf file or packaged model by its content; a hub model by its id and revision), the training data by its
content digest, and every setting of :meth:`~hrsa.train.config.TrainConfig.recipe_settings` (lr, seed, batch,
steps, temperature, negatives, length, attention, dtype...). Worker counts and other pure scheduling are not
in it, nor are paths: the same bytes elsewhere are the same recipe.

A run folder records its recipe in ``hrsa_recipe.json`` (:func:`claim_run_folder`, before any worker starts).
The same recipe resumes from the latest checkpoint; a different one into a folder that has trained is refused
with one line that names what differs and the fix, because Ray Train would resume the old run's checkpoint
and silently ignore the new inputs. A folder that has not trained yet (a start that failed) takes the new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hrsa.runtime.locations import Location, parse_location
from hrsa.store.errors import UserError
from hrsa.train.checkpoints import step_folders
from hrsa.train.config import TrainConfig

__all__ = ["RECIPE_FILE", "RecipeMismatchError", "TrainingRecipe", "check_run_folder", "claim_run_folder",
           "read_recipe", "training_recipe"]

RECIPE_FILE = "hrsa_recipe.json"
_SCHEMA = "hrsa.train-recipe/1"


class RecipeMismatchError(UserError, ValueError):
    """A run folder that holds a run of another recipe (or checkpoints without a recorded recipe)."""


@dataclass(frozen=True)
class TrainingRecipe:
    """What a run's weights are a function of.

    Attributes:
        settings: :meth:`TrainConfig.recipe_settings` (JSON values).
        backbone: the backbone's kind, id, revision and file, and ``content``: the digest of its files (None
            for a hub model, which its id and revision name).
        data: the content digest of the training data file.
    """

    settings: dict[str, Any]
    backbone: dict[str, Any]
    data: str

    @property
    def key(self) -> str:
        """16 hex digits of the hash of the whole recipe (canonical JSON)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def on_device(self, use_gpu: bool) -> TrainingRecipe:
        """This recipe as run on GPU workers (their forward runs under bf16 autocast, so their weights differ from a
        CPU run's: a run resumed on the other kind would mix them) or on CPU workers (the recipe as it is, so the
        keys of CPU runs stay what they were)."""
        return replace(self, settings={**self.settings, "autocast": "bfloat16"}) if use_gpu else self

    @property
    def folder_name(self) -> str:
        """The run folder a pipeline gives this recipe: ``recipe-<key>``."""
        return f"recipe-{self.key}"

    def differences(self, recorded: TrainingRecipe) -> list[str]:
        """What this recipe has that ``recorded`` does not, as ``lr 0.05 (the run has 0.001)``."""
        workers = {True: "GPU workers (bf16 autocast)", False: "CPU workers"}
        if ("autocast" in self.settings) != ("autocast" in recorded.settings):  # --use-gpu chooses, where both exist
            out = [f"{workers['autocast' in self.settings]} (the run has {workers['autocast' in recorded.settings]})"]
        else:
            out = []
        out += [f"{name} {_text(value)} (the run has {_had(recorded.settings, name)})"
                for name, value in self.settings.items() if name != "autocast" and recorded.settings.get(name) != value]
        out += [f"{name} {_text(recorded.settings[name])} (the run's; here {_had(self.settings, name)})"
                for name in recorded.settings if name not in self.settings and name != "autocast"]
        if self.backbone != recorded.backbone:
            out.append("another backbone (or other backbone files)")
        if self.data != recorded.data:
            out.append("other training data (by content)")
        return out


#: The layout a backbone with dropout keeps out of its recipe (its runs' keys stay what they were): 1 worker, no chunks.
_LAYOUT_DEFAULTS: dict[str, Any] = {"workers": 1, "chunk_size": None}


def _had(settings: dict[str, Any], name: str) -> str:
    """A setting's value as a recipe holds it; workers and chunks, held only for a backbone with dropout outside the
    default layout, as that default."""
    if name in settings:
        return _text(settings[name])
    return _text(_LAYOUT_DEFAULTS.get(name))


def _text(value: Any) -> str:
    return "none" if value is None else str(value)


def training_recipe(config: TrainConfig) -> TrainingRecipe:
    """The recipe of ``config``: its weight-changing settings, its backbone and data by content.

    Raises:
        UserError: a backbone that does not resolve, or a data file that cannot be read.
    """
    from hrsa.runtime.fingerprint import file_digest

    if not Path(config.data).is_file():
        raise UserError(f"Expected the training data file {config.data}. Got no such file instead. Check --data.")
    settings = config.recipe_settings()
    if (config.workers != 1 or config.chunk_size is not None) and _draws_dropout(config):
        # Masks are drawn per worker (seeded by rank) and chunk by chunk in the chunked backward: other workers or
        # chunks give other weights (a tiny BERT's moved by 2 lr in 2 steps), so here they are the recipe's too. Only
        # where not the default layout (1 worker, no chunks): the keys of such runs stay what they were.
        settings.update({name: value for name, value in (("workers", config.workers), ("chunk_size", config.chunk_size))
                         if value != _LAYOUT_DEFAULTS[name]})
    return TrainingRecipe(settings, _backbone_identity(config), file_digest(config.data))


def _draws_dropout(config: TrainConfig) -> bool:
    """Whether the backbone trains with dropout: a probability above 0 in its config, class defaults filled in (BERT
    and MiniLM: 0.1; Llama and Qwen, the paper's backbones: none). Read from the backbone's own files, so every
    machine answers alike; a hub model is not read (its config may or may not be cached here: the answer, and the key,
    would change with it), nor a config that does not read: counted as without."""
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.models import load_config

    spec = parse_model_spec(config.backbone, dtype=config.dtype, attention=config.attention)
    if spec.kind == "hub":
        return False
    try:
        if spec.kind == "remote":  # its config.json alone (the folder is not copied here for it)
            from transformers import AutoConfig

            raw = json.loads(parse_location(str(spec.path)).child("config.json").read_text())
            settings = AutoConfig.for_model(raw.pop("model_type"), **raw).to_dict()
        else:
            settings = load_config(spec).to_dict()
    except Exception:  # unreadable here: training fails on it anyway, with its own message
        return False
    return any(isinstance(value, float) and value > 0 for key, value in _flat(settings)
               if "dropout" in key or "pdrop" in key)


def _flat(settings: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every (key, value) of a config dict, nested ones (a text_config's) included."""
    for key, value in settings.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _backbone_identity(config: TrainConfig) -> dict[str, Any]:
    from hrsa.extract.model_spec import parse_model_spec
    from hrsa.extract.identity import model_identity

    return model_identity(parse_model_spec(config.backbone, dtype=config.dtype, attention=config.attention))


def read_recipe(output: Location | Path | str) -> TrainingRecipe | None:
    """The recipe recorded in a run folder (a path, a URL or a :class:`Location`), or None when it records none.

    Raises:
        RecipeMismatchError: the file is there but is not a recipe.
    """
    file = _location(output).child(RECIPE_FILE)
    if file.kind() != "file":
        return None
    try:
        doc = json.loads(file.read_text())
        return TrainingRecipe(**doc["recipe"]) if doc.get("schema") == _SCHEMA else None
    except (ValueError, KeyError, TypeError):
        raise RecipeMismatchError(f"Expected a training recipe in {file.url}. Got an unreadable file instead. Train "
                                  "into a new --output, or delete the run folder to start over.") from None


def check_run_folder(output: Location | Path | str, recipe: TrainingRecipe) -> bool:
    """Whether ``output`` already records ``recipe`` (False: it records none, or has not trained yet), writing nothing.

    Raises:
        RecipeMismatchError: the folder has trained (holds ``step_N`` folders) with another recipe, or without a
            recorded one.
    """
    run = _location(output)
    recorded = read_recipe(run)
    if recorded is not None and recorded.key == recipe.key:
        return True
    if step_folders(run):
        fix = f"Train into a new --output, or delete {run.url} to start over."
        if recorded is None:
            raise RecipeMismatchError(f"Expected a run folder that records its training recipe ({RECIPE_FILE}). Got "
                                      f"checkpoints with no recorded recipe in {run.url} instead. {fix}")
        raise RecipeMismatchError(f"Expected the training recipe {run.url} was started with. Got "
                                  f"{', '.join(recipe.differences(recorded))} instead. {fix}")
    return False


def claim_run_folder(output: Location | Path | str, recipe: TrainingRecipe) -> None:
    """Record ``recipe`` in the run folder ``output`` (a path, a URL or a :class:`Location`), or check that it is
    the one recorded there.

    Raises:
        RecipeMismatchError: the folder has trained with another recipe, or without a recorded one; nothing in it
            is changed.
    """
    run = _location(output)
    if not check_run_folder(run, recipe):
        run.child(RECIPE_FILE).write(json.dumps({"schema": _SCHEMA, "key": recipe.key, "recipe": asdict(recipe)},
                                                indent=2, sort_keys=True) + "\n")


def _location(output: Location | Path | str) -> Location:
    return output if isinstance(output, Location) else parse_location(output)
