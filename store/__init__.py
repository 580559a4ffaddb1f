"""The Zarr v3 activation store: format, exactly-once writing, reading and querying.

Example:
    >>> from hrsa.store import ActivationStore
    >>> store = ActivationStore.open("memory://store-init-example", mode="a")
    >>> store.corpora()
    []
"""

from hrsa.store import errors
from hrsa.store.activation_store import ActivationStore, Mode
from hrsa.store.corpus import CorpusInfo, CorpusTable, CorpusTokens
from hrsa.store.errors import *  # noqa: F403  (the error hierarchy is part of the public API)
from hrsa.store.format import FORMAT_VERSION, Layout
from hrsa.store.model import ModelInfo
from hrsa.store.selection import TokenFilter, TokenSelection
from hrsa.store.units import ModelWriter, WorkUnit

__all__ = [
    "ActivationStore",
    "Mode",
    "CorpusInfo",
    "CorpusTable",
    "CorpusTokens",
    "ModelInfo",
    "ModelWriter",
    "WorkUnit",
    "TokenFilter",
    "TokenSelection",
    "Layout",
    "FORMAT_VERSION",
    *errors.__all__,
]
