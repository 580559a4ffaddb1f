"""The Zarr v3 activation store: format, exactly-once writing, reading and querying.

Example:
    >>> from hrsa.store import ActivationStore
    >>> store = ActivationStore.open("memory://store-init-example", mode="a")
    >>> store.corpora()
    []
"""

from hrsa.store.activation_store import ActivationStore, Mode
from hrsa.store.corpus import CorpusInfo, CorpusTable
from hrsa.store.errors import (
    CorpusMismatchError,
    CorpusNotFoundError,
    CorruptDataError,
    HrsaError,
    IncompleteModelError,
    InvalidIdError,
    LayerOutOfRangeError,
    ModelNotFoundError,
    SelectionError,
    StoreFormatError,
    StoreNotFoundError,
    StoreReadOnlyError,
    UserError,
)
from hrsa.store.format import FORMAT_VERSION, Layout
from hrsa.store.model import ModelInfo
from hrsa.store.selection import TokenFilter
from hrsa.store.units import ModelWriter, WorkUnit

__all__ = [
    "ActivationStore",
    "Mode",
    "CorpusInfo",
    "CorpusTable",
    "ModelInfo",
    "ModelWriter",
    "WorkUnit",
    "TokenFilter",
    "Layout",
    "FORMAT_VERSION",
    "HrsaError",
    "UserError",
    "StoreNotFoundError",
    "StoreFormatError",
    "StoreReadOnlyError",
    "InvalidIdError",
    "ModelNotFoundError",
    "CorpusNotFoundError",
    "LayerOutOfRangeError",
    "IncompleteModelError",
    "SelectionError",
    "CorpusMismatchError",
    "CorruptDataError",
]
