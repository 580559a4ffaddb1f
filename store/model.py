"""Models in the store: their attributes, and the preallocated hidden-state arrays.

Only a coordinator creates a model (writes metadata and allocates arrays); workers then fill whole
shards through :mod:`hrsa.store.units`. Zarr metadata edited from several processes is unsafe, so no
worker ever touches it.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from hrsa.store.errors import LayerOutOfRangeError
from hrsa.store.format import ATTRS_KEY, CODEC_PRESETS, STORED_DTYPES, Layout, codec_chain, storage_dtype
from hrsa.store.objects import create_if_absent, delete_prefix, get_bytes, put_bytes

if TYPE_CHECKING:
    import zarr

__all__ = ["ModelInfo", "create_model_group", "describe_source", "read_model_info", "parse_model_attrs", "array_mismatches",
           "hidden_array_mismatches", "expected_hidden_metadata", "hidden_key"]


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

    def resolve_hidden_state(self, index: int) -> int:
        """The stored hidden state that ``index`` names: a negative index counts from the end, as in Python
        (-1 is the last layer, L), whichever hidden states are stored.

        Raises:
            LayerOutOfRangeError: no stored hidden state of that index, naming those stored.
        """
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):  # 2.0 passed `in` and named the
            # array hidden/2.0: "damaged, re-extract it" of a whole model
            raise LayerOutOfRangeError(
                f"Expected an integer hidden-state index of {self.id}. Got {index!r} ({type(index).__name__}) instead. "
                "Pass an int (e.g. int(layer))."
            )
        k = int(index) + self.n_hidden_states if index < 0 else int(index)
        if k not in self.hidden_states:
            raise LayerOutOfRangeError(
                f"Expected a hidden state of {self.id} in {list(self.hidden_states)} "
                f"(0 is the embedding output, {self.n_hidden_states - 1} the last layer). Got {index} instead."
            )
        return k

    def record(self) -> dict[str, Any]:
        """What the store knows of this model that identifies its hidden states, for the results that compare it:
        its source (kind, hub id and revision or path, ``content``: the digest of its weights files where recorded),
        dtype, attention, corpus, shape, hidden states and extraction settings; its progress (``units_done``,
        ``n_units``, ``complete``); and ``identity``, a digest of all but the progress: two records of one id with
        different identities are two models (one deleted and another extracted under its id)."""
        ident = {"source": dict(self.source), "dtype": self.dtype, "attention": self.attention, "corpus": self.corpus,
                 "n_tokens": self.n_tokens, "hidden_size": self.hidden_size, "n_hidden_states": self.n_hidden_states,
                 "hidden_states": list(self.hidden_states), "extraction": dict(self.extraction)}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]
        return {"id": self.id, **ident, "units_done": self.units_done, "n_units": self.n_units, "complete": self.complete,
                "identity": digest}

    def to_attrs(self) -> dict[str, Any]:
        attrs = asdict(self)
        for volatile in ("id", "units_done", "n_units"):
            attrs.pop(volatile)
        attrs["hidden_states"] = list(self.hidden_states)
        attrs["kind"] = "model"
        return attrs


def describe_source(source: Mapping[str, Any]) -> str:
    """A model's source in one phrase: ``kind:id-or-path@revision (gguf FILE)``, or "unrecorded"."""
    where = source.get("id") or source.get("path")
    revision = f"@{source['revision']}" if source.get("revision") else ""
    gguf = f" (gguf {source['gguf_file']})" if source.get("gguf_file") else ""
    return f"{source.get('kind')}:{where}{revision}{gguf}" if where else "unrecorded"


def read_model_info(mid: str, group: zarr.Group, *, units_done: int) -> ModelInfo:
    return parse_model_attrs(mid, group.attrs.get(ATTRS_KEY), units_done=units_done)


def parse_model_attrs(mid: str, attrs: Any, *, units_done: int = 0) -> ModelInfo:
    """A model's ``hrsa`` attributes as a :class:`ModelInfo`.

    Raises:
        ValueError: the attributes are missing (a creation that was interrupted: they are written last) or not a
            model's (edited, or from another tool).
    """
    if not isinstance(attrs, dict) or attrs.get("kind") != "model":
        raise ValueError(f"no model attributes (got {type(attrs).__name__})")
    a = dict(attrs)
    a.pop("kind")
    try:
        layout = Layout(**a.pop("layout"))
        a["hidden_states"] = tuple(a["hidden_states"])
        info = ModelInfo(id=mid, layout=layout, units_done=units_done, n_units=layout.n_units(int(a["n_tokens"])), **a)
        storage_dtype(info.dtype)
        _check_types(info)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"malformed model attributes ({type(error).__name__}: {error})") from error
    return info


def _check_types(info: ModelInfo) -> None:
    """Every field of the type and range its readers take for granted (edited attributes: ``"hidden_size": "32"``
    failed in `hrsa store verify` on a traceback, a negative count in numpy)."""
    def count(name: str, value: Any, least: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} {value!r} (expected a whole number >= {least})")

    count("n_tokens", info.n_tokens, 0)
    count("hidden_size", info.hidden_size, 1)
    count("n_hidden_states", info.n_hidden_states, 1)
    for k in info.hidden_states:
        count("hidden state", k, 0)
        if k >= info.n_hidden_states:
            raise ValueError(f"hidden state {k} (expected < n_hidden_states {info.n_hidden_states})")
    for name in ("corpus", "dtype", "attention", "codec"):
        if not isinstance(getattr(info, name), str):
            raise ValueError(f"{name} {getattr(info, name)!r} (expected text)")
    for name in ("source", "extraction"):
        if not isinstance(getattr(info, name), dict):
            raise ValueError(f"{name} {getattr(info, name)!r} (expected a mapping)")


def _child_names(group: zarr.Group) -> list[str]:
    """Names under ``group`` from a listing of the store, without reading (possibly damaged) child metadata."""
    from zarr.core.sync import sync

    async def names() -> list[str]:
        return [n async for n in group.store.list_dir(group.store_path.path)]

    return [n for n in sync(names()) if n != "zarr.json"]


def array_mismatches(group: zarr.Group, info: ModelInfo) -> list[tuple[str, str]]:
    """(array path, what differs) for every array of ``group`` that its attributes do not describe.

    The attributes promise: one array per stored hidden state of data type ``storage_dtype(dtype)``, shape
    (N, D), shards of (shard_tokens, D) holding chunks of (chunk_tokens, D).
    """
    problems: list[tuple[str, str]] = []
    try:
        # Only digit names are hidden states: a SIGKILLed Zarr write leaves a ``zarr.<hex>.partial`` beside them.
        stored = {int(k) for k in _child_names(group["hidden"]) if k.isdigit()}
    except Exception as error:  # a finding: unreadable or absent metadata
        return [("hidden", f"unreadable group metadata ({type(error).__name__}: {error})")]
    if stored != set(info.hidden_states):
        problems.append(("hidden", f"holds hidden states {sorted(stored)}, but the attributes list {sorted(info.hidden_states)}"))
    expected = expected_hidden_metadata(info)

    def open_array(where: str) -> zarr.Array | Exception:
        try:
            return group[where]
        except Exception as error:
            return error

    # All at once: one round trip each, which on S3 made a 29-state model's check take a second one after another.
    wheres = [hidden_key(k) for k in sorted(stored & set(info.hidden_states))]
    with ThreadPoolExecutor(min(16, max(1, len(wheres))), thread_name_prefix="hrsa-metadata") as pool:
        opened = list(pool.map(open_array, wheres))
    for where, array in zip(wheres, opened):
        if isinstance(array, Exception):
            problems.append((where, f"unreadable array metadata ({type(array).__name__}: {array})"))
        else:
            problems.extend((where, what) for what in hidden_array_mismatches(array, info, expected))
    return problems


def expected_hidden_metadata(info: ModelInfo) -> dict[str, Any]:
    """The zarr.json document every hidden-state array of ``info`` holds, as a dict (for :func:`hidden_array_mismatches`)."""
    return dict(json.loads(_hidden_array_metadata(info)))


def hidden_array_mismatches(array: zarr.Array, info: ModelInfo, expected: dict[str, Any] | None = None) -> list[str]:
    """What differs between one hidden-state array's metadata and what the model's attributes promise: its data
    type (``storage_dtype(dtype)``), codec chain, shape (N, D), and shards of (shard_tokens, D) holding chunks of
    (chunk_tokens, D). Empty when they agree. ``expected``: :func:`expected_hidden_metadata` of ``info``, when the
    caller has it already."""
    expected = expected_hidden_metadata(info) if expected is None else expected
    problems: list[str] = []
    # The codec chain decides what the stored bytes mean (a flipped endianness reads every value wrong, yet
    # every shard still matches its hash): it must be the one the model was created with.
    codecs = json.loads(json.dumps(array.metadata.to_dict().get("codecs")))  # tuples as JSON's lists
    if not _same_settings(codecs, expected.get("codecs")):
        problems.append(f"codecs {json.dumps(codecs)} are not the model's {json.dumps(expected.get('codecs'))}")
    want_dtype = storage_dtype(info.dtype)
    if array.dtype != want_dtype:
        problems.append(f"data type {array.dtype} does not match the model's dtype {info.dtype} (stored as {want_dtype})")
    if array.shape != (info.n_tokens, info.hidden_size):
        problems.append(f"shape {array.shape} does not match (n_tokens, hidden_size) = {(info.n_tokens, info.hidden_size)}")
    if array.shards != (info.layout.shard_tokens, info.hidden_size) or array.chunks != (info.layout.chunk_tokens, info.hidden_size):
        problems.append(f"shards {array.shards} of chunks {array.chunks} do not match the layout "
                        f"{(info.layout.shard_tokens, info.hidden_size)} of {(info.layout.chunk_tokens, info.hidden_size)}")
    return problems


_CODEC_DEFAULTS = {"bytes": {"endian": "little"}, "sharding_indexed": {"index_location": "end"}}  # Zarr v3's


def _same_settings(stored: Any, expected: Any) -> bool:
    """Whether a stored codec chain says what the expected one says: the same codecs in the same order, and equal
    values wherever both name a setting, once the spec's defaults fill what one leaves out (a field that another
    Zarr release adds or drops is not a difference; an endianness or index place on one side only is)."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        if "name" in stored and isinstance(stored.get("configuration", {}), dict):
            defaults = _CODEC_DEFAULTS.get(str(stored["name"]), {})
            stored = {**stored, "configuration": {**defaults, **stored.get("configuration", {})}}
            expected = {**expected, "configuration": {**defaults, **(expected.get("configuration") or {})}}
        return all(_same_settings(stored[k], expected[k]) for k in stored.keys() & expected.keys())
    if isinstance(stored, list) and isinstance(expected, list):
        return len(stored) == len(expected) and all(map(_same_settings, stored, expected))
    return bool(stored == expected)


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


def create_model_group(parent: zarr.Group, info: ModelInfo) -> bool:
    """Allocate ``parent/<id>``: every hidden-state array (no data yet), then the group with the model's attributes.

    Returns whether the group holds ``info``'s attributes afterwards: False when another coordinator created this
    model with other settings at the same instant.

    Safe against kills and against any number of coordinators creating the same model: arrays' metadata is written
    where it differs (no shard is ever deleted), the group's metadata, attributes included, is one object created
    last with create-if-absent, and a coordinator that loses that race to other settings writes the winner's arrays'
    metadata back before it returns. Before it exists the model is half-created
    (absent for listing, deletable, replaced by a re-run); after, it is whole. Workers write nothing before.
    """


    store = parent.store
    prefix = f"{parent.store_path.path}/{info.id}".lstrip("/")
    # Zarr's own create_array would write every missing parent's metadata first, the model group's included (with
    # no attributes), and that object must be the last one written: so the metadata documents are written here.
    _ensure_object(store, f"{prefix}/hidden/zarr.json", _GROUP_METADATA)
    array_metadata = _hidden_array_metadata(info)
    for layer in info.hidden_states:
        _ensure_object(store, f"{prefix}/{hidden_key(layer)}/zarr.json", array_metadata)
    meta = json.loads(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {ATTRS_KEY: info.to_attrs()}}))
    create_if_absent(store, f"{prefix}/zarr.json", json.dumps(meta, indent=2).encode())
    stored = json.loads(get_bytes(store, f"{prefix}/zarr.json") or b"{}")
    winner = stored.get("attributes", {}).get(ATTRS_KEY, {})
    if winner == meta["attributes"][ATTRS_KEY]:
        return True
    # Lost to a coordinator of other settings, after this one wrote its arrays' metadata over the winner's: put the
    # winner's back (every loser ends so, so the last word on each array is the winner's).
    import zarr

    won = read_model_info(info.id, zarr.open_group(store, path=prefix, mode="r"), units_done=0)
    for layer in won.hidden_states:
        _ensure_object(store, f"{prefix}/{hidden_key(layer)}/zarr.json", _hidden_array_metadata(won))
    for layer in set(info.hidden_states) - set(won.hidden_states):  # arrays of this one's alone: no data yet
        delete_prefix(store, f"{prefix}/{hidden_key(layer)}")
    return False


_GROUP_METADATA = b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'


def _ensure_object(store: Any, key: str, data: bytes) -> None:
    """Write ``data`` at ``key`` unless it holds that already (a concurrent creator of the same model wrote it)."""
    if get_bytes(store, key) != data:
        put_bytes(store, key, data)


def _hidden_array_metadata(info: ModelInfo) -> bytes:
    """The zarr.json of every hidden-state array of ``info``, as Zarr itself writes it."""
    import zarr
    from zarr.core.buffer import default_buffer_prototype

    layout = info.layout
    reference = zarr.create_array(
        zarr.storage.MemoryStore(), shape=(info.n_tokens, info.hidden_size), dtype=storage_dtype(info.dtype),
        chunks=(layout.chunk_tokens, info.hidden_size), shards=(layout.shard_tokens, info.hidden_size),
        compressors=codec_chain(info.codec, info.dtype), fill_value=0,
    )
    return reference.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
