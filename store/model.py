"""Models in the store: their attributes, and the preallocated hidden-state arrays.

Only a coordinator creates a model (writes metadata and allocates arrays); workers then fill whole
shards through :mod:`hrsa.store.units`. Zarr metadata edited from several processes is unsafe, so no
worker ever touches it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from hrsa.store.format import ATTRS_KEY, CODEC_PRESETS, STORED_DTYPES, Layout, codec_chain, storage_dtype

if TYPE_CHECKING:
    import zarr

__all__ = ["ModelInfo", "create_model_group", "read_model_info", "hidden_key"]


def hidden_key(layer: int) -> str:
    """Array path of hidden state ``layer`` inside its model group."""
    return f"hidden/{layer}"


@dataclass(frozen=True)
class ModelInfo:
    """What the store records about one model's extraction.

    Attributes:
        id: the model id in the store.
        corpus: id of the corpus whose tokens the rows are.
        n_tokens: N, rows of every hidden-state array.
        hidden_size: D.
        n_hidden_states: L + 1 of the network (index 0 the embedding output, L the last layer).
        hidden_states: which of them are stored (all, unless a subset was asked for).
        dtype: the dtype the model computed in, kept bit for bit ("bfloat16", "float16", "float32").
        attention: "causal" or "bidirectional".
        source: where the weights came from (kind, hub id and revision, local path, GGUF file).
        extraction: the settings of the extraction that wrote it.
        layout: tokens per chunk and per shard; a shard is one work unit.
        codec: the compression preset of the hidden-state arrays.
        units_done, n_units: progress of the extraction; the model is complete when they are equal.
    """

    id: str
    corpus: str
    n_tokens: int
    hidden_size: int
    n_hidden_states: int
    hidden_states: tuple[int, ...]
    dtype: str
    attention: str
    layout: Layout
    codec: str
    source: dict[str, Any] = field(default_factory=dict)
    extraction: dict[str, Any] = field(default_factory=dict)
    units_done: int = 0
    n_units: int = 0

    @property
    def complete(self) -> bool:
        return self.units_done == self.n_units

    def to_attrs(self) -> dict[str, Any]:
        attrs = asdict(self)
        for volatile in ("id", "units_done", "n_units"):
            attrs.pop(volatile)
        attrs["hidden_states"] = list(self.hidden_states)
        attrs["kind"] = "model"
        return attrs


def read_model_info(mid: str, group: zarr.Group, *, units_done: int) -> ModelInfo:
    a = dict(group.attrs[ATTRS_KEY])
    layout = Layout(**a.pop("layout"))
    a.pop("kind", None)
    a["hidden_states"] = tuple(a["hidden_states"])
    return ModelInfo(
        id=mid, layout=layout, units_done=units_done, n_units=layout.n_units(int(a["n_tokens"])), **a
    )


def check_model_spec(*, dtype: str, attention: str, codec: str, hidden_states: Sequence[int], n_hidden_states: int) -> None:
    from hrsa.store.errors import UserError

    if dtype not in STORED_DTYPES:
        raise UserError(f"Expected a dtype in {sorted(STORED_DTYPES)}. Got {dtype!r} instead.")
    if attention not in ("causal", "bidirectional"):
        raise UserError(f"Expected attention 'causal' or 'bidirectional'. Got {attention!r} instead.")
    if codec not in CODEC_PRESETS:
        raise UserError(f"Expected a codec in {sorted(CODEC_PRESETS)}. Got {codec!r} instead.")
    bad = [k for k in hidden_states if not 0 <= k < n_hidden_states]
    if bad or not hidden_states or len(set(hidden_states)) != len(hidden_states):
        raise UserError(
            f"Expected distinct hidden-state indices in 0..{n_hidden_states - 1}. Got {list(hidden_states)} instead."
        )


def create_model_group(parent: zarr.Group, info: ModelInfo) -> zarr.Group:
    """Allocate ``parent/<id>``: every hidden-state array (no data yet) and the unit-done flags.

    Metadata is written here and only here; the ``units`` array has one chunk per unit, so workers
    flag their own unit without touching each other's objects.
    """
    group = parent.create_group(info.id, overwrite=True)
    layout = info.layout
    compressors = codec_chain(info.codec, info.dtype)
    for layer in info.hidden_states:
        group.create_array(
            hidden_key(layer),
            shape=(info.n_tokens, info.hidden_size),
            dtype=storage_dtype(info.dtype),
            chunks=(layout.chunk_tokens, info.hidden_size),
            shards=(layout.shard_tokens, info.hidden_size),
            compressors=compressors,
            fill_value=0,
        )
    group.create_array(
        "units", shape=(layout.n_units(info.n_tokens),), dtype="uint8", chunks=(1,), compressors=None, fill_value=0
    )
    group.attrs[ATTRS_KEY] = info.to_attrs()
    return group
