"""One error hierarchy for hrsa.

A :class:`UserError` is a mistake the user can fix (bad path, unknown model, bad id); the CLI prints
it as one line and exits with code 2. Each domain error also inherits the builtin it refines, so
``except FileNotFoundError`` keeps working for callers who do not know hrsa's types.
Messages follow "Expected <what>. Got <value> instead. <How to fix>."
"""

from __future__ import annotations

__all__ = [
    "HrsaError",
    "UserError",
    "StoreNotFoundError",
    "StoreFormatError",
    "StoreReadOnlyError",
    "InvalidIdError",
    "RunIdTakenError",
    "ModelNotFoundError",
    "CorpusNotFoundError",
    "LayerOutOfRangeError",
    "IncompleteModelError",
    "HalfCreatedModelError",
    "SelectionError",
    "CorpusMismatchError",
    "CorruptDataError",
    "ModelInUseError",
    "IncompleteDeletionError",
]


class HrsaError(Exception):
    """Base of every error hrsa raises on purpose."""

    #: What the failed run warned of before it failed (one line each): the CLI prints them before the error line.
    warnings: tuple[str, ...] = ()


class UserError(HrsaError):
    """A mistake in what the user asked for; the message names the fix."""


class StoreNotFoundError(UserError, FileNotFoundError):
    """No hrsa store at the URL."""


class StoreFormatError(UserError, ValueError):
    """The URL holds something that is not a store this hrsa can read (or a newer format)."""


class StoreReadOnlyError(UserError, PermissionError):
    """A write was attempted on a store opened read-only."""


class InvalidIdError(UserError, ValueError):
    """A model, corpus or result id that is not a safe slug."""


class RunIdTakenError(UserError):
    """A result record of that id exists (or another writer created it a moment before)."""


class ModelNotFoundError(UserError, KeyError):
    """No model of that id in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CorpusNotFoundError(UserError, KeyError):
    """No corpus of that id in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LayerOutOfRangeError(UserError, IndexError):
    """A hidden-state index the model does not have."""


class IncompleteModelError(UserError, RuntimeError):
    """Reading a model whose extraction has work units not done."""


class HalfCreatedModelError(UserError, RuntimeError):
    """A model group without valid attributes: its creation was interrupted (they are written last)."""


class SelectionError(UserError, ValueError):
    """A token range, document list or filter that selects nothing valid."""


class CorpusMismatchError(UserError, ValueError):
    """Two things that must share a corpus (identical token ids) do not."""


class CorruptDataError(HrsaError, ValueError):
    """Stored bytes that fail their checksum, a done unit's missing or empty shard, or unreadable metadata:
    not the user's mistake, but it has a fix (``hrsa store verify``, then re-extract)."""


class ModelInUseError(UserError, RuntimeError):
    """Deleting a model that an extraction holds (its live model lease, or live claims of units not done), or
    extracting a model whose deletion is under way."""


class IncompleteDeletionError(HrsaError, OSError):
    """A deletion that failed part way (the storage refused, or a writer added objects meanwhile): what is left is a
    half-created model, deleted by running the deletion again."""
