"""``ActivationStore``: open a store, list and describe its corpora and models, read and write them.

The store is a Zarr v3 group at a local path or any fsspec URL (``s3://``, ``gs://``, ``memory://``).
Reads return lazy Dask arrays; nothing is loaded until computed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hrsa.store.alignment import (
    TokenPairs, align_corpora, alignment_key, alignment_problem, read_alignment, write_alignment,
)
from hrsa.store.corpus import (
    CorpusInfo,
    CorpusTable,
    CorpusTokens,
    content_hash,
    corpus_damage,
    differing_documents,
    read_corpus_info,
    read_corpus_tokens,
    read_token_table,
    write_corpus,
)
from hrsa.store.errors import (
    CorpusMismatchError,
    CorpusNotFoundError,
    CorruptDataError,
    HalfCreatedModelError,
    IncompleteDeletionError,
    IncompleteModelError,
    ModelInUseError,
    ModelNotFoundError,
    SelectionError,
    StoreReadOnlyError,
    UserError,
)
from hrsa.store.format import ATTRS_KEY, DEFAULT_CODEC, choose_layout, storage_dtype
from hrsa.store.ids import parse_id
from hrsa.store.model import (
    ModelInfo,
    array_mismatches,
    check_model_spec,
    create_model_group,
    hidden_array_mismatches,
    hidden_key,
    parse_model_attrs,
    read_model_info,
)
from hrsa.store.opening import open_root
from hrsa.store.reading import CheckedArray
from hrsa.store.result_records import ResultRecords
from hrsa.store.selection import TokenFilter, TokenSelection, resolve_selection
from hrsa.store.objects import check_create_if_absent, delete_key, delete_prefix, ensure_group, get_bytes, list_keys
from hrsa.store.unit_records import LEASE_S, LEASES, ModelLease
from hrsa.store.units import ModelWriter, done_units, holding_model, live_claims, live_leases

if TYPE_CHECKING:
    import dask.array as da
    import pandas as pd
    import zarr

__all__ = ["ActivationStore", "Mode"]

log = logging.getLogger(__name__)

Mode = Literal["r", "r+", "a", "w-"]
# What reading a node's metadata raises when it is absent or not Zarr's (a torn or edited zarr.json): a finding
# about that node. Network and permission errors are not in it, so they are never taken for damage.
_UNREADABLE = (KeyError, ValueError, TypeError)


class ActivationStore(ResultRecords):
    """A store of tokenised corpora and the per-token hidden states of models run on them.

    Open one with :meth:`open`; the constructor takes an already opened Zarr group.

    Example:
        >>> store = ActivationStore.open("memory://doc-example", mode="a")
        >>> store.models()
        []
    """

    def __init__(self, root: zarr.Group, *, url: str, read_only: bool) -> None:
        self._root = root
        self.url = url
        self.read_only = read_only
        self._exclusive_checked = False
        self._tops: dict[str, zarr.Group] = {}
        self._sound_corpora: set[str] = set()  # checked against their content hash in this process
        self._sound_arrays: set[tuple[str, int, str, str]] = set()  # hidden-state metadata checked against the model's

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str | os.PathLike[str], mode: Mode = "r", *, storage_options: Mapping[str, Any] | None = None) -> ActivationStore:
        """Open the store at ``url``.

        Args:
            url: a local path or an fsspec URL.
            mode: ``"r"`` read only; ``"r+"`` read and write an existing store; ``"a"`` create it if
                missing; ``"w-"`` create it, failing if anything is there.
            storage_options: passed to fsspec (credentials, ``endpoint_url``...).

        Raises:
            StoreNotFoundError: no store there (modes r and r+).
            StoreFormatError: something else is there, or a store of a newer format.
        """
        url = os.fspath(url)
        return cls(open_root(url, mode, storage_options), url=url, read_only=mode == "r")

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreReadOnlyError(f"Expected a writable store. Got {self.url} opened read-only. Open it with mode 'r+' or 'a'.")
        if not self._exclusive_checked:  # once per open store: exactly-once rests on it
            check_create_if_absent(self._root.store)
            self._exclusive_checked = True

    def __repr__(self) -> str:
        return f"ActivationStore({self.url!r}, read_only={self.read_only})"

    # -- listing -------------------------------------------------------------------------------
    def _top(self, name: str) -> zarr.Group:
        """``corpora``, ``models`` or ``results``; unreadable metadata there is damage, named in one line.

        Read once per open store: these groups never change after the store is created (a GET each time on S3).
        """
        if name in self._tops:
            return self._tops[name]
        try:
            self._tops[name] = self._root[name]
            return self._tops[name]
        except _UNREADABLE as error:
            raise CorruptDataError(
                f"Expected the {name} group's metadata in {self.url}/{name}/zarr.json. Got it missing or unreadable instead "
                f"({type(error).__name__}: {error}). Restore that file (an empty group's: "
                '{"zarr_format": 3, "node_type": "group", "attributes": {}}).'
            ) from None

    def _children(self, name: str) -> list[str]:
        """Names of the nodes under ``name``, from a listing of the store (without reading their metadata)."""
        from zarr.core.sync import sync

        group = self._top(name)

        async def names() -> list[str]:
            return [n async for n in group.store.list_dir(group.store_path.path)]

        return sorted(n for n in sync(names()) if n != "zarr.json")

    def _holds_objects(self, path: str) -> bool:
        from zarr.core.sync import sync

        async def first() -> bool:
            async for _ in self._root.store.list_prefix(self._key(path) + "/"):
                return True
            return False

        return sync(first())

    def _probe_model(self, mid: str) -> tuple[str, zarr.Group | None]:
        """("ready", group), ("half-created", group or None) or ("absent", None).

        A model group counts once its attributes, written last by :meth:`create_model`, are valid; a group
        without them, or whose metadata does not read, is what a kill during creation leaves.
        """
        import zarr

        parent = self._top("models")  # damage there is the store's, not this model's
        try:
            group = parent[mid]
        except _UNREADABLE:
            return ("half-created" if self._holds_objects(f"models/{mid}") else "absent"), None
        if not isinstance(group, zarr.Group):
            return "half-created", None
        try:
            read_model_info(mid, group, units_done=0)
        except ValueError:
            return "half-created", group
        return "ready", group

    def models(self) -> list[str]:
        """Ids of the models in the store, sorted; half-created ones (see :meth:`half_created_models`) are not models."""
        return [m for m in self._children("models") if self._probe_model(m)[0] == "ready"]

    def half_created_models(self) -> list[str]:
        """Ids of model groups whose creation was interrupted (no valid attributes): delete them, or re-run the
        extraction, which replaces them."""
        return [m for m in self._children("models") if self._probe_model(m)[0] == "half-created"]

    def corpora(self) -> list[str]:
        """Ids of the complete corpora in the store, sorted (a corpus whose metadata does not read is not complete)."""
        return [cid for cid, state in self.corpus_states().items() if state == "complete"]

    def corpus_states(self) -> dict[str, str]:
        """Every corpus folder of the store, sorted by id: ``"complete"``, ``"incomplete"`` (being written, or its
        writing was interrupted) or ``"unreadable"`` (its metadata is missing or does not read: damage). A corpus
        absent from it is absent from the store."""
        group = self._top("corpora")
        states = {}
        for cid in self._children("corpora"):
            try:
                meta = group[cid].attrs.get(ATTRS_KEY, {})
            except _UNREADABLE:
                states[cid] = "unreadable"
                continue
            states[cid] = "complete" if isinstance(meta, dict) and meta.get("complete") else "incomplete"
        return states

    def _model_group(self, mid: str) -> zarr.Group:
        parse_id(mid, kind="model id")
        state, group = self._probe_model(mid)
        if state == "absent":
            known = ", ".join(self.models()) or "none"
            raise ModelNotFoundError(
                f"Expected a model of this store ({known}). Got {mid!r} instead. List them with `hrsa store ls {self.url}`."
            )
        if state == "half-created" or group is None:
            raise HalfCreatedModelError(
                f"Expected model {mid}'s attributes in {self.url}. Got a model without valid attributes (its creation "
                f"was interrupted, or they were edited) instead. Restore them, delete it (`hrsa store rm {self.url} "
                f"{mid}`), or re-run the extraction, which replaces it."
            )
        return group

    def _corpus_group(self, cid: str, *, checked: bool = True) -> zarr.Group:
        """The corpus's group; ``checked``: its arrays checked once per opened store against its content hash first (a
        missing chunk reads as zeros: token 0, no special tokens, position 0 everywhere)."""
        parse_id(cid, kind="corpus id")
        if cid not in self.corpora():
            if self._holds_objects(f"corpora/{cid}"):  # there, but a write of it was cut short or its metadata was damaged
                raise CorruptDataError(
                    f"Expected corpus {cid} of {self.url} complete. Got one whose metadata does not read, or whose "
                    "writing was cut short, instead. Extract any model on it again (the extraction writes its corpus "
                    f"again), then run `hrsa store verify {self.url}`."
                )
            known = ", ".join(self.corpora()) or "none"
            raise CorpusNotFoundError(
                f"Expected a corpus of this store ({known}). Got {cid!r} instead. Extract a model on it (that writes "
                f"its corpus), or list the store with `hrsa store ls {self.url}`."
            )
        group = self._top("corpora")[cid]
        if checked and cid not in self._sound_corpora:
            damage = corpus_damage(group, read_corpus_info(cid, group))
            if damage:
                raise CorruptDataError(
                    f"Expected corpus {cid} of {self.url} as it was written. Got a damaged one instead: {damage}. "
                    "Extract any model on it again (the extraction writes its corpus again), then run "
                    f"`hrsa store verify {self.url}`."
                )
            self._sound_corpora.add(cid)
        return group

    def model_info(self, mid: str) -> ModelInfo:
        """Attributes and progress of model ``mid``."""
        group = self._model_group(mid)
        info = read_model_info(mid, group, units_done=0)
        done = sum(1 for u in done_units(group) if u < info.n_units)
        return read_model_info(mid, group, units_done=done)

    def model_damage(self, mid: str) -> str | None:
        """What is wrong with model ``mid``'s metadata, or None when it is whole: it is absent, half-created (its
        metadata deleted, torn, or without attributes), or a hidden state's array metadata is missing or is not what its
        attributes describe (as verify finds it; no shard is read). An extraction asks before it reports success: a
        model deleted (or damaged) while it wrote is not complete, whatever its done records say."""
        parse_id(mid, kind="model id")
        state, group = self._probe_model(mid)
        if state == "absent":
            return f"model {mid} absent"
        if state == "half-created" or group is None:
            return f"model {mid} without its metadata (zarr.json missing, unreadable or without attributes)"
        problems = array_mismatches(group, read_model_info(mid, group, units_done=0))
        return "; ".join(f"models/{mid}/{where}: {what}" for where, what in problems) or None

    def corpus_info(self, cid: str) -> CorpusInfo:
        return read_corpus_info(cid, self._corpus_group(cid, checked=False))

    def tokens(self, cid: str) -> pd.DataFrame:
        """The corpus's token table: token_id, doc_index, position, is_special, is_first."""
        return read_token_table(self._corpus_group(cid))

    def differing_documents(self, cid: str, table: CorpusTable) -> list[str]:
        """Record ids of the documents where ``table`` (another tokenizer's run on the same text) has other token
        ids than corpus ``cid``: empty when a model with that tokenizer can join the corpus."""
        return differing_documents(self._corpus_group(cid), table)

    def corpus_tokens(self, cid: str, *, checked: bool = True) -> CorpusTokens:
        """The corpus's token ids and document boundaries: what a model runs over (an extraction worker's input).

        ``checked=False`` skips the corpus's hash check (:meth:`check_corpus`): for an extraction worker, whose
        coordinator checked it (reading every array of a large corpus in each worker would cost its memory)."""
        return read_corpus_tokens(self._corpus_group(cid, checked=checked))

    def check_corpus(self, cid: str) -> None:
        """Hash the corpus's arrays against its content hash (once per opened store).

        Raises:
            CorruptDataError: a chunk is missing (Zarr would read zeros) or a value changed; one line naming the fix.
        """
        self._corpus_group(cid)

    def documents(self, cid: str) -> pd.DataFrame:
        """The corpus's document table: record_id, start, stop, n_tokens, truncated, original_length."""
        import pandas as pd

        group = self._corpus_group(cid)
        offsets = group["doc_offsets"][:]
        return pd.DataFrame(
            {
                "record_id": group["doc_record_id"][:],
                "start": offsets[:-1],
                "stop": offsets[1:],
                "n_tokens": np.diff(offsets),
                "truncated": group["doc_truncated"][:],
                "original_length": group["doc_original_length"][:],
            }
        )

    # -- reading activations -------------------------------------------------------------------
    def select(self, mid: str, selection: TokenSelection | None = None) -> slice | np.ndarray:
        """Resolve a token selection (default: every token) on ``mid``'s corpus: a slice, or an int64 index.

        The one resolver of selections: reads of hidden states, the pair analysis, k-NN overlap and probes all
        call it (see :mod:`hrsa.store.selection`).

        Raises:
            SelectionError: the range or documents are out of bounds, or nothing is left after filtering.
        """
        info = self.model_info(mid)
        return resolve_selection(self._corpus_group(info.corpus), selection)

    def same_tokens(self, cid_a: str, cid_b: str) -> bool:
        """Whether two corpora hold the same token ids in the same documents (one corpus, or two whose other
        attributes differ: special-token flags, content spans, an id from an earlier hrsa)."""
        if cid_a == cid_b:
            return True
        ga, gb = self._corpus_group(cid_a), self._corpus_group(cid_b)
        return all(np.array_equal(ga[name][:], gb[name][:]) for name in ("doc_offsets", "token_ids"))

    def token_pairs(self, a: str, b: str, selection: TokenSelection | None = None) -> TokenPairs:
        """The tokens models ``a`` and ``b`` are compared on: pairs of rows of their corpora.

        Models on the same tokens share the selection (``identical``; rows are the selection itself, a slice or an
        index). Otherwise their corpora's tokens are aligned by content span (:mod:`hrsa.store.alignment`; computed
        once and kept in a writable store), and the selection is applied to each side (its token range, which is in
        A's numbering, to A only): a pair counts when both its tokens are selected.

        Raises:
            CorpusMismatchError: the corpora hold different documents, or one has no content spans.
            SelectionError: as :meth:`select`, or no aligned token left.
        """
        info_a, info_b = self.model_info(a), self.model_info(b)
        selected_a = self.select(a, selection)
        if self.same_tokens(info_a.corpus, info_b.corpus):
            n = _count(selected_a)
            return TokenPairs(selected_a, selected_a, n, n, identical=True)
        rows_a, rows_b = self._alignment(a, info_a.corpus, b, info_b.corpus)
        selected_b = self.select(b, replace(selection, tokens=None) if selection is not None else None)
        keep = _mask(selected_a, info_a.n_tokens)[rows_a] & _mask(selected_b, info_b.n_tokens)[rows_b]
        if not keep.any():
            raise SelectionError(
                f"Expected tokens of {a} and {b} whose content spans coincide, after selection. Got none of "
                f"{_count(selected_a)} and {_count(selected_b)} selected tokens. Loosen the selection, or compare "
                "models whose tokenizers split the shared text alike."
            )
        return TokenPairs(rows_a[keep], rows_b[keep], _count(selected_a), _count(selected_b), identical=False)

    def _alignment(self, a: str, cid_a: str, b: str, cid_b: str) -> tuple[np.ndarray, np.ndarray]:
        """The aligned rows of two corpora: read from the store, else computed (and kept when it is writable).

        The corpora are checked first, even for a stored alignment: an earlier hrsa kept alignments of corpora that
        only had the same record ids, which this check now refuses."""
        corpus_a, corpus_b = self._corpus_group(cid_a), self._corpus_group(cid_b)
        problem = alignment_problem(corpus_a, cid_a, corpus_b, cid_b)
        if problem:
            raise CorpusMismatchError(
                f"Expected {a} and {b} extracted on the same text: one corpus, or corpora of the same documents whose "
                f"tokens align by content span. Got {a} on {cid_a} and {b} on {cid_b}, {problem[0]}, instead. "
                f"{problem[1]} (`hrsa store info` shows each model's corpus)."
            )
        key = alignment_key(cid_a, cid_b)
        parent = self._root["alignments"] if "alignments" in self._root else None
        stored = read_alignment(parent, key) if parent is not None else None
        if stored is not None:
            return stored
        rows = align_corpora(corpus_a, corpus_b)
        if not self.read_only:
            root = self._root.store_path.path
            write_alignment(ensure_group(self._root.store, f"{root}/alignments".lstrip("/")), key, *rows)
        return rows

    def hidden_state(
        self,
        mid: str,
        layer: int,
        *,
        tokens: tuple[int, int] | None = None,
        docs: Sequence[int] | None = None,
        token_filter: TokenFilter | None = None,
        chunk_tokens: int | None = None,
        allow_incomplete: bool = False,
    ) -> da.Array:
        """One hidden state as a lazy Dask array of shape (N, D), or (M, D) for a selection.

        Args:
            mid: model id.
            layer: hidden-state index, 0 (embedding output) to L; negative counts from the end.
            tokens: keep the global token range ``(start, stop)``.
            docs: keep these documents (indices into the corpus's document table), in this order.
            token_filter: drop special tokens, position 0, or positions outside a range.
            chunk_tokens: tokens per Dask chunk (default: one shard).
            allow_incomplete: read even if extraction has units not done (their rows read as 0).

        Returns:
            A Dask array in the model's dtype (``ml_dtypes.bfloat16`` for bf16 models).
        """
        import dask.array as da
        from dask.base import tokenize

        info = self.model_info(mid)
        array = self.hidden_state_array(mid, layer, allow_incomplete=allow_incomplete)
        chunks = (chunk_tokens or info.layout.shard_tokens, info.hidden_size)
        # Dask takes equal names for equal arrays: the name says everything that shapes this read, so two reads of one
        # hidden state in one graph (other chunks, or an incomplete model read before more of it was done) never merge.
        name = f"hrsa-{array.where}-{tokenize(chunks, allow_incomplete, info.units_done)}"
        lazy = da.from_array(array, chunks=chunks, name=name, asarray=False, fancy=False)
        selection = TokenSelection.of(tokens=tokens, docs=docs, token_filter=token_filter)
        return lazy if selection.is_everything else lazy[self.select(mid, selection)]

    def hidden_state_array(self, mid: str, layer: int, *, allow_incomplete: bool = False) -> CheckedArray:
        """One hidden state as an array of shape (N, D) read by slices of tokens (numpy's indexing), without Dask:
        what a streaming pass reads block by block (a Dask graph per block read cost more than the read). Each read
        is checked as :meth:`hidden_state`'s: its units done, its shards' checksums.

        Raises:
            IncompleteModelError: extraction has units not done (unless ``allow_incomplete``).
            CorruptDataError: the array's metadata is unreadable, or says another shape, data type, codec chain or
                shard/chunk layout than the model's attributes.
        """
        info = self.model_info(mid)
        k = info.resolve_hidden_state(layer)
        group = self._model_group(mid)
        writer = ModelWriter(group, info)
        done = writer.done_mask()
        if not (done.all() or allow_incomplete):  # the mask the read trusts, not model_info's earlier listing: a unit
            # reset since (`verify --reset-damaged`) read its missing shard through Zarr, as zeros
            raise IncompleteModelError(
                f"Expected a complete extraction of {mid}. Got {int(done.sum())}/{info.n_units} work units done "
                "instead. Re-run the same `hrsa extract` to finish it (it resumes)."
            )
        where = f"{self.url} models/{mid}/{hidden_key(k)}"
        try:
            stored = group[hidden_key(k)]
        except _UNREADABLE as error:
            raise CorruptDataError(
                f"Expected readable metadata of {where}. Got {type(error).__name__}: {error} instead. "
                f"Run `hrsa store verify {self.url}` for details; delete the model and re-extract it."
            ) from None
        if tuple(stored.shape) != (info.n_tokens, info.hidden_size):  # a reader would take its rows for all tokens
            raise CorruptDataError(
                f"Expected {where} of shape ({info.n_tokens}, {info.hidden_size}) (tokens, hidden size). Got "
                f"{tuple(stored.shape)} instead: its metadata is damaged. Run `hrsa store verify {self.url}` for "
                "details; delete the model and re-extract it."
            )
        self._check_hidden_metadata(mid, k, stored, info, settings=writer.settings, where=where)
        return CheckedArray(stored, info.dtype, where, done=done, shard_tokens=info.layout.shard_tokens,
                            model_prefix=group.store_path.path, layer=k, settings=writer.settings)

    def _check_hidden_metadata(self, mid: str, k: int, stored: zarr.Array, info: ModelInfo, *, settings: str,
                               where: str) -> None:
        """The array's metadata must say what the model's attributes say (data type, codec chain, shard and chunk
        layout), as verify checks it: every shard matches its record's hash whatever its zarr.json says, so an edited
        data type or endianness would decode the right bytes into wrong values. Checked once per opened store for
        each (array, metadata, model settings) seen; a read of many blocks of one array pays it once."""
        import json

        seen = (mid, k, settings, json.dumps(stored.metadata.to_dict(), sort_keys=True, default=str))
        if seen in self._sound_arrays:
            return
        problems = hidden_array_mismatches(stored, info)
        if problems:
            raise CorruptDataError(
                f"Expected {where} stored as model {mid}'s attributes say (data type {storage_dtype(info.dtype)}, codec "
                f"{info.codec}, shards of {info.layout.shard_tokens} tokens in chunks of {info.layout.chunk_tokens}). Got "
                f"{'; '.join(problems)} instead: its metadata was edited or damaged, and its bytes would read as other "
                f"values. Run `hrsa store verify {self.url}` for details; delete the model (`hrsa store rm {self.url} "
                f"{mid}`) and extract it again."
            )
        self._sound_arrays.add(seen)

    # -- writing -------------------------------------------------------------------------------
    def write_corpus(
        self,
        table: CorpusTable,
        *,
        tokenizer: Mapping[str, Any],
        source: str | None = None,
        fields: Sequence[str] = (),
        template: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """Store a tokenised corpus once and return its content-derived id.

        ``tokenizer`` must hold ``name`` and ``fingerprint`` (a hash of its vocabulary and settings).
        Writing a corpus that is already stored and complete changes nothing. A table without text digests
        (``text_sha256``) is stored too, but never aligned with another tokenizer's corpus.
        """
        self._check_writable()
        table.check()
        digest = content_hash(table)
        cid = f"corpus-{digest[:16]}"
        if cid in self.corpora():
            group = self._top("corpora")[cid]
            damage = corpus_damage(group, read_corpus_info(cid, group))
            if damage is None:
                self._sound_corpora.add(cid)
                return cid
            # The id is the content's hash: the table in hand is exactly what belongs there, so it is written again.
            log.warning("corpus %s of %s was damaged (%s): writing it again", cid, self.url, damage)
            self._sound_corpora.discard(cid)
        write_corpus(
            self._top("corpora"), cid, table, tokenizer=tokenizer, source=source, fields=fields,
            template=template, digest=digest, extra=extra,
        )
        return cid

    def create_model(
        self,
        mid: str,
        *,
        corpus: str,
        n_hidden_states: int,
        hidden_size: int,
        dtype: str,
        attention: str = "causal",
        hidden_states: Sequence[int] | None = None,
        source: Mapping[str, Any] | None = None,
        extraction: Mapping[str, Any] | None = None,
        codec: str | None = None,
        chunk_tokens: int | None = None,
        shard_tokens: int | None = None,
        exist_ok: bool = False,
    ) -> ModelInfo:
        """Allocate a model's arrays (the coordinator's job; workers then call :meth:`writer`).

        With ``exist_ok``, an existing model with the same settings is returned as is, so that a
        re-run resumes; different settings are an error, never an overwrite.
        """
        self._check_writable()
        parse_id(mid, kind="model id")
        n_tokens = self.corpus_info(corpus).n_tokens
        layers = tuple(range(n_hidden_states)) if hidden_states is None else tuple(int(k) for k in hidden_states)
        codec = codec or DEFAULT_CODEC.get(dtype, "none")
        check_model_spec(dtype=dtype, attention=attention, codec=codec, hidden_states=layers, n_hidden_states=n_hidden_states)
        info = ModelInfo(
            id=mid, corpus=corpus, n_tokens=n_tokens, hidden_size=int(hidden_size), n_hidden_states=int(n_hidden_states),
            hidden_states=layers, dtype=dtype, attention=attention,
            layout=choose_layout(hidden_size, dtype, chunk_tokens=chunk_tokens, shard_tokens=shard_tokens),
            codec=codec, source=dict(source or {}), extraction=dict(extraction or {}),
        )
        state, _ = self._probe_model(mid)
        if state == "half-created" and exist_ok:  # a creation killed before its attributes: start it again
            self._clear_half_created(mid, info)
        elif state == "half-created":
            raise UserError(
                f"Expected a new model id. Got {mid!r}, whose creation in this store was interrupted. Delete it first "
                f"(`hrsa store rm {self.url} {mid}`), or re-run with exist_ok (a re-run of the extraction replaces it)."
            )
        elif state == "ready":
            existing = self.model_info(mid)
            if exist_ok and existing.to_attrs() == info.to_attrs():
                return existing
            raise UserError(
                f"Expected a new model id. Got {mid!r}, which this store already holds"
                f"{' with different settings' if exist_ok else ''}. "
                f"Choose another --name, or delete it first (`hrsa store rm {self.url} {mid}`)."
            )
        if not create_model_group(self._top("models"), info):
            raise UserError(
                f"Expected to create model {mid!r}. Got one with different settings created by another extraction at the "
                f"same moment instead. Choose another --name, or delete it first (`hrsa store rm {self.url} {mid}`)."
            )
        return self.model_info(mid)

    def _clear_half_created(self, mid: str, info: ModelInfo) -> None:
        """Make room for ``info`` where a creation (or a deletion) was interrupted, deleting nothing that a
        coordinator creating this model at this very moment has written.

        What this process probed may be stale: another coordinator may have been between its arrays and its group
        metadata then, and have finished since. So the records (done records, claims, format 1's flags) are listed
        first and the group's metadata read after: records that exist while the metadata is absent or invalid are
        a dead model's (creators write the metadata before any record), and only those listed go. Metadata that
        reads as a model now is another coordinator's, kept with everything under it; invalid metadata (torn,
        without attributes: no creator writes that) is deleted unless it changed since it was read. Arrays of
        hidden states ``info`` does not store go; same-shaped arrays stay (a live creator's, or refilled).
        """
        prefix = self._key(f"models/{mid}")
        store = self._root.store
        keys = list_keys(store, prefix)
        records = [key for key in keys if key.split("/")[0] in ("done", "claims", "units")]
        metadata = get_bytes(store, f"{prefix}/zarr.json")
        if metadata is not None and _is_model_metadata(mid, metadata):
            return  # created by another coordinator since the probe: create_model_group compares its settings
        for key in records:
            delete_key(store, f"{prefix}/{key}")
        if metadata is not None and get_bytes(store, f"{prefix}/zarr.json") == metadata:
            delete_key(store, f"{prefix}/zarr.json")
        kept = {hidden_key(k) for k in info.hidden_states}
        stale = {f"hidden/{key.split('/')[1]}" for key in keys if key.startswith("hidden/") and key.count("/") >= 2}
        for path in sorted(stale - kept):
            delete_prefix(store, f"{prefix}/{path}")

    def writer(self, mid: str) -> ModelWriter:
        """A writer of ``mid``'s work units; cheap, and safe to create in every worker process."""
        self._check_writable()
        return ModelWriter(self._model_group(mid), self.model_info(mid))

    @contextmanager
    def extracting(self, mid: str, *, lease_s: float = LEASE_S) -> Iterator[ModelLease]:
        """Hold model ``mid`` for an extraction while the body runs: from before the model is created or opened for
        writing until the extraction ends, :meth:`delete_model` (``hrsa store rm``) refuses to delete it, between
        units (when no unit claim is live) too. The lease is renewed every ``lease_s / 4`` in a thread and released
        at the end; a killed holder's ends with its process on its machine, elsewhere after ``lease_s``. Any number
        of extractions of one model hold it at once.

        Raises:
            ModelInUseError: a deletion of the model is under way (nothing is held then): the model is half-deleted,
                and writing into it would be lost.
        """
        self._check_writable()
        parse_id(mid, kind="model id")
        with holding_model(self._root.store, self._key(f"models/{mid}"), "extract", lease_s=lease_s) as lease:
            # Taken first, then looked for a deletion: a deletion takes its lease before it looks for extractions, so
            # of the two that start at once one sees the other (a deletion that started first is seen here).
            changing = [held for held in self._model_leases(mid) if held.purpose != "extract"]
            if changing:
                held = changing[0]
                doing, verb = _CHANGES.get(held.purpose, (f"held to {held.purpose}", "another hrsa"))
                owners = ", ".join(sorted({_process(other.owner) for other in changing}))
                raise ModelInUseError(
                    f"Expected model {mid} of {self.url} free to extract. Got it {doing} ({verb} by {owners}) instead. "
                    "Run the same command again once that has ended: the extraction then starts anew, or resumes."
                )
            yield lease

    def _model_leases(self, mid: str) -> list[ModelLease]:
        return live_leases(self._root.store, self._key(f"models/{mid}"))

    def delete_model(self, mid: str, *, held: ModelLease | None = None) -> None:
        """Remove a model and all its hidden states; corpora and other models are untouched.

        Its metadata (``zarr.json``) goes first, so that from the first deleted object on, readers, resumes and
        extractions see the model half-created (absent for listing), never complete with objects missing. A lease
        of the deletion's own is held meanwhile: an extraction starting then is refused (:meth:`extracting`).

        Args:
            held: the caller's own lease (an extraction replacing the model it holds): it does not refuse the deletion,
                and it is kept.

        Raises:
            ModelNotFoundError: no such model.
            ModelInUseError: an extraction holds it (:meth:`extracting`), or is writing it now (live claims of units
                not done); nothing is deleted.
            IncompleteDeletionError: the storage failed part way (or a writer added objects meanwhile); what is left
                is a half-created model, which running the deletion again removes.
        """
        self._check_writable()
        parse_id(mid, kind="model id")
        if self._probe_model(mid)[0] == "absent":
            self._model_group(mid)  # raises ModelNotFoundError
        kept = {held.token} if held is not None else set()
        with self._holding_unused(mid, "delete", kept):
            self._delete_model_node(mid, keep_leases=True)
        self._delete_leases(mid, kept)

    @contextmanager
    def resetting(self, mid: str) -> Iterator[ModelWriter]:
        """Hold model ``mid`` to reset units of it (``hrsa store verify --reset-damaged``), yielding its writer: an
        extraction or a deletion holding it (or a live claim of a unit not done) refuses the reset, and either one
        starting meanwhile is refused.

        Raises:
            ModelNotFoundError, HalfCreatedModelError: no such model (deleted since), before anything is written.
            ModelInUseError: an extraction or a deletion holds it; nothing is changed.
        """
        self._check_writable()
        try:
            self.writer(mid)  # first: the lease would make the folder of a model deleted since (a half-created model)
        except HalfCreatedModelError:
            self._check_not_in_use(mid, set(), "reset")  # a deletion under way says so, not "creation interrupted"
            raise
        with self._holding_unused(mid, "reset", set()):
            yield self.writer(mid)

    @contextmanager
    def _holding_unused(self, mid: str, purpose: str, kept: set[str]) -> Iterator[None]:
        """Hold ``mid`` with a lease for ``purpose`` (a change an extraction must not run beside) while the body runs,
        once nothing else holds it (:meth:`_check_not_in_use`; leases in ``kept`` aside)."""
        self._check_not_in_use(mid, kept, purpose)  # before anything is written: a refusal leaves the store as it was
        with holding_model(self._root.store, self._key(f"models/{mid}"), purpose) as own:
            # Again, now that this lease is there: an extraction that took its lease since the check above is seen
            # here; one that takes it from now on sees this lease and stops (:meth:`extracting`).
            self._check_not_in_use(mid, kept | {own.token}, purpose)
            yield

    def _check_not_in_use(self, mid: str, kept: set[str], purpose: str) -> None:
        """Raise ModelInUseError when another process holds model ``mid`` for something else than ``purpose`` (a live
        lease not in ``kept``: an extraction, or a deletion beside a reset and the other way round) or writes a unit of
        it (a live claim of a unit not done); the message names the change (``purpose``) refused."""
        import time

        leases = [lease for lease in self._model_leases(mid) if lease.token not in kept and lease.purpose != purpose]
        claims = live_claims(self._root.store, self._key(f"models/{mid}"))
        if not leases and not claims:
            return
        held = []
        for holding in sorted({lease.purpose for lease in leases}):
            owners = ", ".join(sorted({_process(lease.owner) for lease in leases if lease.purpose == holding}))
            doing, verb = _CHANGES.get(holding, ("held", "another hrsa"))
            held.append(f"an extraction holding it (process {owners})" if holding == "extract" else
                        f"it {doing} ({verb} by {owners})")
        if claims:
            units = ", ".join(str(c.unit) for c in claims[:8]) + (f" and {len(claims) - 8} more" if len(claims) > 8 else "")
            owners = ", ".join(sorted({_process(c.owner) for c in claims}))
            held.append(f"live claims on units {units} (held by {owners})")
        until = time.strftime("%H:%M:%S", time.localtime(max([c.expires for c in claims] + [x.expires for x in leases])))
        doing, command = {"delete": ("delete it", f"hrsa store rm {self.url} {mid}"),
                          "reset": ("reset its damaged units",
                                    f"hrsa store verify {self.url} --model {mid} --reset-damaged")}[purpose]
        raise ModelInUseError(
            f"Expected no extraction writing model {mid} of {self.url} to {doing}. Got {' and '.join(held)}, renewed "
            f"while it runs (lease until {until}), instead. Wait for that to finish, or stop it (its lease ends with "
            f"its process on its machine, elsewhere when it runs out), then run `{command}` again."
        )

    def _delete_model_node(self, mid: str, *, keep_leases: bool = False) -> None:
        """Delete the model's objects: its metadata first, then the rest (its leases too unless ``keep_leases``)."""
        prefix = self._key(f"models/{mid}")
        store = self._root.store
        try:
            delete_key(store, f"{prefix}/zarr.json")  # first: what is left is half-created, never whole
            if not keep_leases:
                delete_prefix(store, prefix)
                return
            folders = {key.split("/")[0]: "/" in key for key in list_keys(store, prefix)}
            for name, folder in folders.items():
                if name != LEASES:
                    (delete_prefix if folder else delete_key)(store, f"{prefix}/{name}")
        except OSError as error:
            raise self._cut_short(mid, error) from None

    def _delete_leases(self, mid: str, kept: set[str]) -> None:
        """The last of a deletion: the leases left (expired ones, extractions that stopped on seeing the deletion),
        then the model's folder, but for the leases in ``kept`` (an extraction replacing the model holds on)."""
        prefix = self._key(f"models/{mid}")
        store = self._root.store
        try:
            if kept:
                for token in list_keys(store, f"{prefix}/{LEASES}"):
                    if token not in kept:
                        delete_key(store, f"{prefix}/{LEASES}/{token}")
            else:
                delete_prefix(store, prefix)
        except OSError as error:
            raise self._cut_short(mid, error) from None

    def _cut_short(self, mid: str, error: OSError) -> IncompleteDeletionError:
        return IncompleteDeletionError(
            f"Expected model {mid} of {self.url} deleted. Got {type(error).__name__}: {error} part way instead "
            f"(the storage refused, or a writer added objects meanwhile): what is left is half-created. Run "
            f"`hrsa store rm {self.url} {mid} --yes` again (after any extraction writing it has stopped)."
        )

    def _key(self, path: str) -> str:
        """Store key of ``path`` below the root."""
        return f"{self._root.store_path.path}/{path}".lstrip("/")

    # -- raw access ------------------------------------------------------------------------------
    def group(self, path: str) -> zarr.Group:
        """The Zarr group at ``path`` below the root (``"models/m"``...), for tests and debugging.

        Not for package code outside ``store/``: the layout of the hierarchy is this package's business; the
        methods above (``hidden_state``, ``create_results``...) are the interface to it.
        """
        return self._root[path]


# What an extraction finds a model held for, and by which command: a lease's purpose other than "extract".
_CHANGES = {"delete": ("being deleted", "`hrsa store rm`"),
            "reset": ("having damaged units reset", "`hrsa store verify --reset-damaged`")}


def _process(owner: str) -> str:
    """A lease's owner as a user finds it: ``host:pid`` (its kernel boot and PID namespace left out)."""
    where, _, pid = owner.rpartition(":")
    return f"{where.partition('@')[0]}:{pid}" if where else owner


def _is_model_metadata(mid: str, metadata: bytes) -> bool:
    """Whether ``zarr.json`` is a whole model's, as :meth:`ActivationStore._probe_model` judges it: a Zarr v3 group
    with a model's valid attributes."""
    import json

    try:
        meta = json.loads(metadata)
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
            return False
        parse_model_attrs(mid, meta.get("attributes", {}).get(ATTRS_KEY))
    except (ValueError, AttributeError):  # json's errors are ValueErrors; a document that is not an object
        return False
    return True


def _count(selected: slice | np.ndarray) -> int:
    return selected.stop - selected.start if isinstance(selected, slice) else int(np.unique(selected).size)


def _mask(selected: slice | np.ndarray, n_tokens: int) -> np.ndarray:
    """(n_tokens,) bool: the selected tokens."""
    mask = np.zeros(n_tokens, bool)
    mask[selected] = True
    return mask
