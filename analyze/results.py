"""The results of ``hrsa analyze``: ``DIR/results.json`` and the store's ``results/<run>``, written and read back.

This module owns the file's schema, its writer (:func:`save_results`) and its reader (:func:`read_results`,
:func:`find_results`): everything presentation draws (figures, the terminal table, the HTML report, training
dynamics; :mod:`hrsa.analyze.report`) starts from the mapping that :func:`read_results` returns, or that
:func:`save_results` hands back as ``SavedResults.doc``. Nothing here draws.

Schema of ``results.json`` (``"schema": "hrsa.analyze/1"``; later metrics add keys under ``metrics``,
never change existing ones). NaN (a metric undefined on constant data) is written as ``null``::

    {
      "schema": "hrsa.analyze/1",
      "run_id": str,                        # also the store's results/<run_id>
      "a": str, "b": str,                   # model ids; A's states are the rows of every matrix
      "models": {"a": {...}, "b": {...}},   # what the store knew of each (ModelInfo.record): "source" (kind, id or
                                            # path, revision, "content": its weights files' digest or null), dtype,
                                            # attention, corpus, n_tokens, hidden_size, n_hidden_states, hidden_states,
                                            # extraction, units_done, n_units, complete, and "identity" (a digest of
                                            # all but the progress). Absent in results of hrsa before it (still read).
      "corpus": str, "n_tokens": int,       # tokens actually compared on, after the selection
      "alignment": null | {"corpus_b": str, "aligned": int, "tokens_a": int, "tokens_b": int},
                                            # B on another corpus: tokens aligned by content span, of each's selection
      "token_filter": {"exclude_special": bool, "exclude_first": bool, "positions": [a, b] | null,
                       "fields": [str] | null, "docs": [int] | null, "tokens": [start, stop] | null},
      "hidden_states_a": [int],             # rows of every "matrix"
      "hidden_states_b": [int],             # columns of every "matrix"
      "matched_hidden_states": [int],       # k of A against k of B: every per-layer list follows these
      "metrics": {
        "cka": {"estimator": "biased",
                "diagonal": [float],                 # per matched layer
                "matrix": [[float]],                 # with --cross-layer
                "debiased_diagonal": [float]},       # with --debiased
        "dimcorr": {"diagonal": [float],             # mean r over non-degenerate dimensions, per layer
                    "median": [float], "q25": [float], "q75": [float], "min": [float], "max": [float],
                    "n_degenerate": [int], "n_dims": int,
                    "matrix": [[float]]},            # mean r, with --cross-layer
        "procrustes": {"h_inv": [float], "residual": [float], "similarity": [float],
                       "underdetermined": [bool],
                       "rotations": [str]},          # .npy files beside results.json, with --save-rotation
        "procrustes_distance": {"distance": [float], "similarity": [float]},  # arccos(similarity), Williams et al. 2021
        "cca": {"r2": [float], "mean_rho": [float], "rank_a": [int], "rank_b": [int], "underdetermined": [bool]},
        "svcca": {"value": [float], "kept_a": [int], "kept_b": [int], "variance_kept": float, "underdetermined": [bool]},
        "pwcca": {"value": [float], "underdetermined": [bool]},
        "regression": {"r2_b_from_a": [float], "r2_a_from_b": [float],     # linear readout of one from the other
                       "underdetermined_b_from_a": [bool], "underdetermined_a_from_b": [bool]},
        "effective_rank": {"a": [float], "b": [float], "participation_ratio_a": [float], "participation_ratio_b": [float]},
                                                    # the last six only when asked for with --metrics
        "knn": {"k": {"5": [float], ...},            # mean per-token Jaccard, per hidden state below
                "median": {"5": [float]}, "std": {"5": [float]},
                "hidden_states": [int], "n_tokens": int, "seed": int, "search": "exact" | "hnsw",
                "chance": {"5": float},              # the mean overlap of unrelated models on this sample
                "ties": {"5": [float]},              # share of tokens whose k-th neighbour ties the next in both
                "recall": {"5": [[float, float]]},   # A's and B's recall@k against exact, with hnsw
                "intervals": {"5": [[low, high]]}, "se": {"5": [float]}, "n_docs": int},
                                                     # 95% bootstrap over the sampled tokens' documents; none (NaN) under 4
        "probe": {"<hidden state>": {                # fitted on A (source), applied to B (target)
                    "source": {"train": {"accuracy": float, "macro_f1": float, "n": int}, "dev": {...}, "test": {...}},
                    "target": {...}, "chance": float, # majority-class share of the test split
                    "test_accuracy_interval": {"source": [low, high], "target": [low, high]},
                                                      # 95% Wilson score interval over the test documents
                    "reverse": {"source": {...}, "target": {...}}}}  # fitted on B, with both directions
      },
      "uncertainty": {"method": "jackknife" | null, "unit": "documents", "groups": int, "groups_asked": int, "level": 0.95,
                      "null": str, "null_z": 3.0},
                                            # beside a metric's per-layer list KEY (cka's "diagonal", procrustes'
                                            # "h_inv", ...): "intervals": {KEY: [[low, high]]} and "se": {KEY: [float]}
                                            # (delete-a-group jackknife over `groups` groups of whole documents),
                                            # and for cka and dimcorr "null": {"diagonal": {"mean": [float],
                                            # "std": [float]}} (exact moments over permutations of B's tokens); a
                                            # score below mean + null_z * std is indistinguishable from unrelated tokens
      "plan": {"passes": int, "tiles": {...}, "workers": int, "block_tokens": int, "memory_budget": int,
               "estimated_peak": int},
      "settings": {"scheduler": str, "backend": str, "compute_dtype": str, ...},
      "config": {...},                      # the resolved AnalyzeConfig, when run from the CLI
      "hrsa_version": str, "created": str   # ISO 8601, UTC
    }

In the store, ``results/<run_id>`` holds this document as its ``hrsa`` attribute and the numbers as
small arrays: ``<metric>/<key>`` for every list and matrix above (``cka/matrix``, ``procrustes/h_inv``,
...), and ``procrustes/rotation/<k>`` (D, D) with ``--save-rotation``.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from hrsa.analyze.metrics.uncertainty import DEFAULT_LEVEL, NULL_Z
from hrsa.runtime.files import write_atomic
from hrsa.runtime.locations import is_url, parse_location, read_text
from hrsa.store.errors import RunIdTakenError, UserError
from hrsa.store.format import ATTRS_KEY
from hrsa.store.ids import parse_id, slugify

if TYPE_CHECKING:
    from hrsa.analyze.local.knn import KnnPairResult
    from hrsa.analyze.local.probe import ProbePairResult
    from hrsa.analyze.metrics.linear_probe import ProbeResult
    from hrsa.analyze.pair import PairResults
    from hrsa.store import ActivationStore

__all__ = [
    "SCHEMA",
    "ResultsFile",
    "ResultsFileError",
    "SavedResults",
    "check_run_id_free",
    "find_results",
    "new_run_id",
    "pick_run_id",
    "reserve_record",
    "read_results",
    "results_dict",
    "save_results",
    "write_files",
    "write_json",
    "write_to_store",
]

SCHEMA = "hrsa.analyze/1"


class ResultsFileError(UserError, ValueError):
    """A path that holds no readable ``hrsa analyze`` results (or a bad file built on them, e.g. a dynamics file)."""


@dataclass(frozen=True)
class SavedResults:
    """Where one run's results went, and the document written.

    Attributes:
        run_id: the run's id; json_path: ``results.json``; rotations: the ``.npy`` rotations beside it;
        store_path: ``results/<run_id>`` in the store, or None; doc: the results.json mapping (what figures,
        the terminal table and the report are drawn from).
    """

    run_id: str
    json_path: Path
    rotations: tuple[Path, ...]
    store_path: str | None
    doc: Mapping[str, Any]


_ID_ROOM = 124  # of the 128 characters an id may have: 4 left for the "-<n>" of a second run in the same second


def new_run_id(results: PairResults, *, now: datetime | None = None) -> str:
    """``<a>--<b>--<UTC time>``, cut to a valid id (slug of at most 128 characters, room kept for a "-<n>")."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    pair = slugify(f"{results.a}--{results.b}")[: _ID_ROOM - len(stamp) - 2].rstrip("._-")
    return f"{pair}--{stamp}"


def reserve_record(store: ActivationStore, results: PairResults, run_id: str | None = None) -> tuple[str, Any]:
    """``(run_id, record)``: ``results/<run_id>`` created for this run alone, empty. ``run_id``, else the first of
    ``<a>--<b>--<time>``, ``-2``, ``-3``, ... that this call creates: runs of one pair in the same second (a script
    running analyses back to back, or at once) each get their own id, none failing after its passes. Each id is tried
    by creating it (a listing taken before gave two runs at once the same id, and the second failed after its passes).

    Raises:
        UserError: an invalid or taken ``run_id`` (a default one: all 999 taken), or a read-only store.
    """
    if run_id is not None:
        return run_id, store.create_results(parse_id(run_id, kind="run id"))
    default = new_run_id(results)
    for candidate in (default, *(f"{default}-{n}" for n in range(2, 999))):
        try:
            return candidate, store.create_results(candidate)
        except RunIdTakenError:
            continue
    return f"{default}-999", store.create_results(f"{default}-999")  # taken too: names the clash


def results_dict(results: PairResults, *, run_id: str, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``results.json`` document (see the module docstring)."""
    from hrsa import __version__

    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "run_id": run_id,
        "a": results.a,
        "b": results.b,
        **({"models": {side: dict(record) for side, record in results.models.items()}} if results.models else {}),
        "corpus": results.corpus,
        "n_tokens": results.n_tokens,
        "alignment": dict(results.alignment) if results.alignment else None,
        "token_filter": results.selection.to_dict(),
        "hidden_states_a": list(results.hidden_states_a),
        "hidden_states_b": list(results.hidden_states_b),
        "matched_hidden_states": list(results.matched),
        "metrics": _metrics(results),
        "uncertainty": _uncertainty(results),
        "plan": results.plan.to_dict(),
        "settings": dict(results.settings),
        "hrsa_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if config is not None:
        doc["config"] = dict(config)
    return _jsonable(doc)


def _metrics(r: PairResults) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if r.cka is not None:
        out["cka"] = {"estimator": "biased", "diagonal": [c.value for c in r.cka]}
        if r.cka_matrix is not None:
            out["cka"]["matrix"] = r.cka_matrix.tolist()
        if r.cka_debiased is not None:
            out["cka"]["debiased_diagonal"] = [c.value for c in r.cka_debiased]
    if r.dimcorr is not None:
        d = r.dimcorr
        out["dimcorr"] = {"diagonal": [x.mean for x in d], **{k: [getattr(x, k) for x in d] for k in ("median", "q25", "q75", "min", "max")},
                          "n_degenerate": [x.n_degenerate for x in d], "n_dims": d[0].n_dims if d else 0}
        if r.dimcorr_matrix is not None:
            out["dimcorr"]["matrix"] = r.dimcorr_matrix.tolist()
    if r.procrustes is not None:
        p = r.procrustes
        out["procrustes"] = {k: [getattr(x, k) for x in p] for k in ("h_inv", "residual", "similarity", "underdetermined")}
        if p and p[0].rotation is not None:
            out["procrustes"]["rotations"] = [_rotation_name(k) for k in r.matched]
    out.update(_more_measures(r))
    for name, intervals in r.intervals.items():
        metric, key = name.split("/")
        out[metric].setdefault("intervals", {})[key] = [[i.low, i.high] for i in intervals]
        out[metric].setdefault("se", {})[key] = [i.se for i in intervals]
    for name, nulls in r.nulls.items():
        metric, key = name.split("/")
        out[metric].setdefault("null", {})[key] = {"mean": [z.mean for z in nulls], "std": [z.std for z in nulls]}
    if r.knn is not None:
        out["knn"] = _knn(r.knn)
    if r.probe is not None:
        out["probe"] = _probe(r.probe)
    return out


#: The measures beyond the paper's, per matched layer: results.json key -> attribute of the result.
_MORE_MEASURES: dict[str, dict[str, str]] = {
    "procrustes_distance": {"distance": "distance", "similarity": "similarity"},
    "cca": {"r2": "r2_cca", "mean_rho": "mean_rho", "rank_a": "rank_x", "rank_b": "rank_y",
            "underdetermined": "underdetermined"},
    "svcca": {"value": "value", "kept_a": "kept_x", "kept_b": "kept_y", "underdetermined": "underdetermined"},
    "pwcca": {"value": "value", "underdetermined": "underdetermined"},
    "regression": {"r2_b_from_a": "r2_y_from_x", "r2_a_from_b": "r2_x_from_y",
                   "underdetermined_b_from_a": "underdetermined_y_from_x",
                   "underdetermined_a_from_b": "underdetermined_x_from_y"},
    "effective_rank": {"a": "effective_rank_x", "b": "effective_rank_y", "participation_ratio_a": "participation_ratio_x",
                       "participation_ratio_b": "participation_ratio_y"},
}


def _more_measures(r: PairResults) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric, keys in _MORE_MEASURES.items():
        results = getattr(r, metric)
        if results is not None:
            out[metric] = {key: [getattr(x, attr) for x in results] for key, attr in keys.items()}
    if r.svcca:
        out["svcca"]["variance_kept"] = r.svcca[0].variance_kept
    return out


def _uncertainty(r: PairResults) -> dict[str, Any]:
    """How the intervals and nulls beside the scores were made (the module docstring's ``uncertainty``)."""
    asked = max(r.n_groups, r.plan.groups_wanted if r.plan else 0)  # --groups: more than the documents make
    return {"method": "jackknife" if r.intervals else None, "unit": "documents", "groups": r.n_groups, "groups_asked": asked,
            "level": DEFAULT_LEVEL, "null": "permutation of B's tokens against A's (closed form)", "null_z": NULL_Z}


def _knn(knn: KnnPairResult) -> dict[str, Any]:
    per_k = {stat: {str(k): [getattr(v, stat) for v in values] for k, values in knn.overlap.items()} for stat in ("mean", "median", "std")}
    out: dict[str, Any] = {"k": per_k["mean"], "median": per_k["median"], "std": per_k["std"],
                           "hidden_states": list(knn.hidden_states), "n_tokens": knn.n_tokens, "seed": knn.seed, "search": knn.search}
    if knn.chance:
        out["chance"] = {str(k): v for k, v in knn.chance.items()}
    if knn.ties:
        out["ties"] = {str(k): list(v) for k, v in knn.ties.items()}
    if knn.recall:
        out["recall"] = {str(k): [list(pair) for pair in values] for k, values in knn.recall.items()}
    if knn.overlap_interval:  # bootstrap over the sample's documents
        out["intervals"] = {str(k): [[i.low, i.high] for i in values] for k, values in knn.overlap_interval.items()}
        out["se"] = {str(k): [i.se for i in values] for k, values in knn.overlap_interval.items()}
        out["n_docs"] = knn.n_docs
    return out


def _probe(probe: ProbePairResult) -> dict[str, Any]:
    def scores(res: ProbeResult) -> dict[str, Any]:
        return {side: {split: asdict(getattr(getattr(res, side), split)) for split in ("train", "dev", "test")} for side in ("source", "target")}

    def intervals(found: Any) -> dict[str, Any]:  # ProbeIntervals of the test accuracies, bootstrap over test documents
        return {side: [getattr(found, side).low, getattr(found, side).high] for side in ("source", "target")}

    out: dict[str, Any] = {}
    for k, res in probe.a_to_b.items():
        out[str(k)] = {**scores(res), "chance": res.chance}
        if k in probe.a_to_b_interval:
            out[str(k)]["test_accuracy_interval"] = intervals(probe.a_to_b_interval[k])
        if k in probe.b_to_a:
            out[str(k)]["reverse"] = scores(probe.b_to_a[k])
            if k in probe.b_to_a_interval:
                out[str(k)]["reverse"]["test_accuracy_interval"] = intervals(probe.b_to_a_interval[k])
    return out


def _rotation_name(k: int) -> str:
    return f"procrustes_rotation_{k}.npy"


def _jsonable(value: Any) -> Any:
    """NaN and inf to None (JSON has neither); numpy scalars to Python ones."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(doc: Mapping[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/results.json`` (atomically: a reader never sees half a file; ``out_dir`` is created)."""
    return write_atomic(Path(out_dir) / "results.json", json.dumps(doc, indent=1, allow_nan=False) + "\n")


def check_run_id_free(store: ActivationStore, run_id: str) -> None:
    """Fail early (before any pass) when ``results/<run_id>`` cannot be written.

    Raises:
        UserError: the store is read-only, or the run id is invalid or taken.
    """
    parse_id(run_id, kind="run id")
    if store.read_only:
        raise UserError(f"Expected a writable store to save results in. Got {store.url} opened read-only. Open it with mode 'r+'.")
    if run_id in store.results_ids():
        raise UserError(f"Expected a new run id. Got {run_id!r}, which {store.url} already holds in results/. Choose another --run-id, "
                        f"or delete that record first (`hrsa store rm {store.url} {run_id} --results`).")


def write_to_store(store: ActivationStore, results: PairResults, doc: Mapping[str, Any], record: Any = None) -> str:
    """Write ``results/<run_id>``: arrays first, then the document as attributes (its presence means complete), into
    ``record`` (the run's, from :func:`reserve_record`), else into a record created now.

    Raises:
        UserError: the store is read-only, or the run id is taken.
    """
    group = store.create_results(doc["run_id"]) if record is None else record
    names = []
    for name, values in _arrays(results, doc).items():
        group.create_array(name, data=np.ascontiguousarray(values))
        names.append(name)
    _check_still_there(store, group, names)
    group.attrs[ATTRS_KEY] = dict(doc)
    return group.path


def _check_still_there(store: ActivationStore, group: Any, names: list[str]) -> None:
    """Refuse to write the document of a record that was deleted while its arrays were written (``hrsa store rm
    --results`` of a record ``store ls`` lists as incomplete): writing it recreated the record's metadata, and the
    store held a complete-looking record without the arrays written before the deletion.

    Raises:
        UserError: the record's metadata or one of its arrays is gone.
    """
    from hrsa.store.objects import get_bytes

    prefix = group.store_path.path
    gone = [name for name in ("", *names) if get_bytes(group.store, f"{prefix}/{name}/zarr.json".replace("//", "/")) is None]
    if gone:
        # What this run wrote after the deletion (Zarr recreated the record's metadata with the next array's parents)
        # goes too: the user deleted that record, and it is no record of this run either.
        if group.basename in store.results_ids():
            store.delete_results(group.basename)
        raise UserError(f"Expected the result record {group.basename} of {store.url} to hold what this run wrote. Got it "
                        "deleted while being written (`hrsa store rm ... --results`?) instead: its document is not "
                        "written. Run the analysis again.")


def _arrays(results: PairResults, doc: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every list and matrix of the document's metrics, as float64 (bool/int kept), plus rotations."""
    out: dict[str, np.ndarray] = {}
    for key, value in _leaves(doc["metrics"]):  # nested keys as paths: knn/k/5, cka/intervals/diagonal, ...
        if isinstance(value, list) and value and not isinstance(value[0], str):
            out[key] = np.array([np.nan if v is None else v for v in _flat_none(value)]).reshape(np.shape(value))
    for k, p in zip(results.matched, results.procrustes or ()):
        if p.rotation is not None:
            out[f"procrustes/rotation/{k}"] = p.rotation
    return out


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.extend(_leaves(value, path + "/") if isinstance(value, Mapping) else [(path, value)])
    return out


def _flat_none(value: list[Any]) -> list[Any]:
    return [v for row in value for v in row] if value and isinstance(value[0], list) else value


def save_results(
    results: PairResults,
    out_dir: str | Path,
    *,
    store: ActivationStore | None = None,
    run_id: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> SavedResults:
    """Write everything of one run: results.json, rotations (.npy), and ``results/<run>`` in ``store``.

    Figures are not drawn here: :func:`hrsa.analyze.report.figures.plot_figures` draws them from ``.doc``.

    Args:
        results: what :func:`hrsa.analyze.analyze_pair` returned.
        out_dir: folder for results.json and rotations (created).
        store: write ``results/<run_id>`` there too (it must be open writable); None to skip.
        run_id: the run's id (default ``<a>--<b>--<time>``, ``-2``, ``-3``, ... added when the store holds it);
            an id given that the store holds is refused.
        config: the resolved config, recorded in the document.

    Raises:
        UserError: an invalid or taken run id, or a read-only store.
    """
    run_id, record = reserve_record(store, results, run_id) if store is not None else (pick_run_id(results, run_id), None)
    doc = results_dict(results, run_id=run_id, config=config)
    store_path = write_to_store(store, results, doc, record) if store is not None else None
    json_path, rotations = write_files(results, doc, Path(out_dir))
    return SavedResults(run_id, json_path, rotations, store_path, doc)


def pick_run_id(results: PairResults, run_id: str | None = None) -> str:
    """``run_id`` checked, else ``<a>--<b>--<time>``, for results kept outside a store (a store's: :func:`reserve_record`).

    Raises:
        InvalidIdError: ``run_id`` is not a valid id.
    """
    return parse_id(new_run_id(results) if run_id is None else run_id, kind="run id")


def write_files(results: PairResults, doc: Mapping[str, Any], out_dir: Path) -> tuple[Path, tuple[Path, ...]]:
    """The files of one run in ``out_dir`` (created): the rotations (.npy), then ``results.json`` holding ``doc``.

    Returns:
        (results.json, the rotations).
    """
    rotations = tuple(_save_rotation(out_dir / _rotation_name(k), p.rotation)
                      for k, p in zip(results.matched, results.procrustes or ()) if p.rotation is not None)
    return write_json(doc, out_dir), rotations


def _save_rotation(path: Path, rotation: np.ndarray) -> Path:
    """One (D, D) rotation as ``.npy``, through the atomic writer."""
    buffer = io.BytesIO()
    np.save(buffer, rotation)
    return write_atomic(path, buffer.getvalue())


# --- reading back: the one entry point of presentation ------------------------------------------------------


ResultsFile = Path | str
"""A results.json as read and named: a local path, or the URL of one on remote storage (a pipeline's S3 out)."""


def find_results(paths: Iterable[Path | str]) -> list[ResultsFile]:
    """The results.json files named by ``paths``: files as given, folders by their results.json (or, failing that,
    their subfolders' ``*/results.json``, sorted). A URL (``s3://bucket/out/pairs``) is looked up where it is and
    its files are named by their URLs.

    Raises:
        ResultsFileError: no path, a path that does not exist, or a folder without results.json.
    """
    found: list[ResultsFile] = []
    for raw in paths:
        if is_url(raw):  # Path() would read s3://b/x as the local path ./s3:/b/x
            found.extend(_remote_results(str(raw)))
            continue
        path = Path(raw)
        if path.is_dir():
            inner = [path / "results.json"] if (path / "results.json").is_file() else sorted(path.glob("*/results.json"))
            if not inner:
                raise _no_results_in(path)
            found.extend(inner)
        elif path.is_file():
            found.append(path)
        else:
            raise _nothing_at(path)
    if not found:
        raise ResultsFileError("Expected at least one results.json. Got none instead. Pass the results of `hrsa analyze`.")
    return found


def _remote_results(url: str) -> list[str]:
    """:func:`find_results` of one URL: one listing of a folder (not a request per subfolder)."""
    where = parse_location(url)
    try:
        kind = where.kind()
        names = where.files() if kind == "folder" else {}
    except OSError as error:  # the storage's own error (credentials, network): one line naming the URL
        raise ResultsFileError(f"Expected to read {where.url}. Got {type(error).__name__}: {_one_line(error)} instead. "
                               "Check the URL and the credentials (for S3: AWS_* variables).") from None
    if kind == "file":
        return [where.url]
    if kind is None:
        raise _nothing_at(url)
    inner = ["results.json"] if "results.json" in names else sorted(
        n for n in names if n.count("/") == 1 and n.endswith("/results.json"))
    if not inner:
        raise _no_results_in(url)
    return [where.child(name).url for name in inner]


def _no_results_in(folder: ResultsFile) -> ResultsFileError:
    return ResultsFileError(f"Expected a results.json in the folder {folder}. Got none instead. "
                            "Pass the --out folder of `hrsa analyze`.")


def _nothing_at(path: ResultsFile) -> ResultsFileError:
    return ResultsFileError(f"Expected a results.json file or a folder holding one. Got {path}, which does not exist.")


def _one_line(error: BaseException) -> str:
    """An error's message on one line (a storage's error may span several)."""
    return " ".join(str(error).split())


def read_results(path: Path | str) -> tuple[ResultsFile, dict[str, Any]]:
    """Read and check one results.json (or a folder's), local or at a URL: its path (or URL) and the parsed document.

    Raises:
        ResultsFileError: missing, not JSON, or not of schema ``hrsa.analyze/1``.
    """
    files = find_results([path])
    if len(files) > 1:
        raise ResultsFileError(f"Expected one results.json at {path}. Got {len(files)} in its subfolders instead. Name one.")
    file = files[0]
    try:
        doc = json.loads(read_text(file))
    except (OSError, ValueError) as error:
        raise ResultsFileError(f"Expected a readable results.json at {file}. Got an error instead: "
                               f"{_one_line(error)}.") from None
    got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
    if got != SCHEMA:
        raise ResultsFileError(f"Expected a results.json of schema {SCHEMA} at {file}. Got {got!r} instead. "
                               "Pass the results.json that `hrsa analyze` writes"
                               + (" (a dynamics file goes to --dynamics)." if got == "hrsa.dynamics/1" else "."))
    missing = [k for k in ("a", "b", "metrics", "matched_hidden_states") if k not in doc]
    if missing:
        raise ResultsFileError(f"Expected keys a, b, metrics and matched_hidden_states in {file}. Got no {', '.join(missing)} instead.")
    _check_document(doc, file)
    return file, doc


# --- what presentation reads, checked: types (pydantic), then lengths and ranges ------------------------------------
# Only the parts the report, figures and dynamics read are described; other keys pass as they are. The document is
# returned as read (these models only check it). A number may be null (NaN, an undefined metric).

_Num = float | None
_Spread = Annotated[float, Field(ge=0)] | None  # a standard deviation or error
_Count = Annotated[int, Field(ge=0)]
_IntKey = Annotated[str, StringConstraints(pattern=r"^[0-9]+$")]  # a k or a hidden state, as a JSON key
_Ends = Annotated[list[_Num], Field(min_length=2, max_length=2)]  # an interval's (low, high), a recall's (A's, B's)


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Null(_Part):
    mean: list[_Num]
    std: list[_Spread]


class _PerLayer(_Part):
    """Per matched hidden state lists, with their jackknife intervals and permutation nulls where recorded."""

    intervals: dict[str, list[_Ends]] | None = None
    se: dict[str, list[_Spread]] | None = None
    null: dict[str, _Null] | None = None


class _Cka(_PerLayer):
    diagonal: list[_Num]
    matrix: list[list[_Num]] | None = None
    debiased_diagonal: list[_Num] | None = None


class _Dimcorr(_PerLayer):
    diagonal: list[_Num]
    n_degenerate: list[_Count]
    matrix: list[list[_Num]] | None = None
    median: list[_Num] | None = None
    q25: list[_Num] | None = None
    q75: list[_Num] | None = None
    min: list[_Num] | None = None
    max: list[_Num] | None = None


class _Procrustes(_PerLayer):
    h_inv: list[_Num]
    residual: list[_Num]
    similarity: list[_Num] | None = None
    underdetermined: list[bool] | None = None


class _Knn(_Part):
    k: dict[_IntKey, list[_Num]]
    hidden_states: list[int]
    median: dict[_IntKey, list[_Num]] | None = None
    std: dict[_IntKey, list[_Spread]] | None = None
    intervals: dict[_IntKey, list[_Ends]] | None = None
    se: dict[_IntKey, list[_Spread]] | None = None
    recall: dict[_IntKey, list[_Ends]] | None = None
    chance: dict[_IntKey, _Num] | None = None
    ties: dict[_IntKey, list[_Num]] | None = None
    n_tokens: _Count | None = None


class _Split(_Part):
    accuracy: _Num
    macro_f1: _Num = None
    n: _Count | None = None


class _Side(_Part):
    train: _Split
    dev: _Split
    test: _Split


class _Direction(_Part):
    source: _Side
    target: _Side
    test_accuracy_interval: dict[Literal["source", "target"], _Ends] | None = None


class _ProbeEntry(_Direction):
    chance: _Num = None
    reverse: _Direction | None = None


class _Metrics(_Part):
    cka: _Cka | None = None
    dimcorr: _Dimcorr | None = None
    procrustes: _Procrustes | None = None
    knn: _Knn | None = None
    probe: dict[_IntKey, _ProbeEntry] | None = None


class _Alignment(_Part):
    corpus_b: str
    aligned: _Count
    tokens_a: _Count
    tokens_b: _Count


class _Uncertainty(_Part):
    method: str | None = None
    null_z: float | None = None


class _ModelRecord(_Part):
    """What the store knew of one compared model (``ModelInfo.record``); only what the report reads is described."""

    id: str
    source: dict[str, Any]
    identity: str
    dtype: str | None = None


class _Document(_Part):
    a: str
    b: str
    run_id: str | None = None
    corpus: str | None = None
    n_tokens: _Count | None = None
    alignment: _Alignment | None = None
    hidden_states_a: list[int] | None = None
    hidden_states_b: list[int] | None = None
    matched_hidden_states: list[int]
    metrics: _Metrics
    uncertainty: _Uncertainty | None = None
    settings: dict[str, Any] | None = None
    token_filter: dict[str, Any] | None = None
    models: dict[Literal["a", "b"], _ModelRecord] | None = None


#: Metrics whose values lie in a range (up to rounding): (metric, key) -> (low, high, what it is).
_RANGES: dict[tuple[str, str], tuple[float, float, str]] = {
    ("cka", "diagonal"): (0.0, 1.0, "linear CKA"), ("cka", "matrix"): (0.0, 1.0, "linear CKA"),
    ("dimcorr", "diagonal"): (-1.0, 1.0, "a mean correlation"), ("dimcorr", "matrix"): (-1.0, 1.0, "a mean correlation"),
    ("knn", "k"): (0.0, 1.0, "a mean Jaccard overlap"), ("knn", "chance"): (0.0, 1.0, "a chance overlap"),
    ("procrustes", "h_inv"): (0.0, 1.0, "H_inv"),  # forged out of range, they flipped verdicts unseen
}
_ROUNDING = 1e-4


def _check_document(doc: dict[str, Any], file: ResultsFile) -> None:
    """Check the parts of a results document that presentation reads: types, then every per-layer list as long as
    the hidden states it follows, cross-layer matrices of their shape, and bounded metrics in their range.

    Raises:
        ResultsFileError: the first problem, naming ``file`` and the field.
    """
    try:
        checked = _Document.model_validate(doc)
    except ValidationError as error:
        problems = error.errors()
        first = problems[0]
        where = ".".join(str(part) for part in first["loc"] if part != "[key]") or "the document"
        what = re.sub(r" or instance of \w+", "", str(first["msg"])).lower()  # a mapping: a JSON object
        got = "nothing" if first["type"] == "missing" else _short(first.get("input"))
        more = f" ({len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ResultsFileError(f"Expected {where} in {file} to be as `hrsa analyze` writes it: "
                               f"{what}. Got {got} instead{more}. "
                               "Pass an unedited results.json.") from None
    for where, expected, got in _shape_problems(checked, doc["metrics"]):
        raise ResultsFileError(f"Expected {where} in {file} to hold {expected}. Got {got} instead. "
                               "Pass an unedited results.json.")


def _shape_problems(doc: _Document, metrics: Mapping[str, Any]) -> Iterable[tuple[str, str, str]]:
    """(field, what it should hold, what it holds) of every length, shape or range problem, in document order."""
    n = len(doc.matched_hidden_states)
    per_layer = {"cka": ("diagonal", "debiased_diagonal"), "dimcorr": ("diagonal", "n_degenerate", "median", "q25", "q75",
                                                                       "min", "max"),
                 "procrustes": ("h_inv", "residual", "similarity", "underdetermined")}
    for metric, keys in per_layer.items():
        part = metrics.get(metric)
        if part is None:
            continue
        lists = {key: part[key] for key in keys if part.get(key) is not None}
        for group in ("intervals", "se"):
            lists |= {f"{group}.{key}": v for key, v in (part.get(group) or {}).items()}
        lists |= {f"null.{key}.{stat}": v for key, null in (part.get("null") or {}).items() for stat, v in null.items()
                  if stat in ("mean", "std")}
        for key, values in lists.items():
            if len(values) != n:
                yield (f"metrics.{metric}.{key}", f"one value per matched hidden state ({n})", f"{len(values)} values")
        rows, cols = doc.hidden_states_a, doc.hidden_states_b
        matrix = part.get("matrix")
        if matrix is not None and rows is not None and cols is not None:
            widths = sorted({len(r) for r in matrix})
            if len(matrix) != len(rows) or widths != [len(cols)]:
                yield (f"metrics.{metric}.matrix", f"a {len(rows)} x {len(cols)} matrix (hidden states of A by B's)",
                       f"{len(matrix)} rows of {' or '.join(map(str, widths)) or 0} values")
    knn = metrics.get("knn")
    if knn is not None:
        m = len(knn["hidden_states"])
        for group in ("k", "median", "std", "intervals", "se", "recall"):
            for k, values in (knn.get(group) or {}).items():
                if len(values) != m:
                    yield (f"metrics.knn.{group}.{k}", f"one value per k-NN hidden state ({m})", f"{len(values)} values")
    for (metric, key), (low, high, what) in _RANGES.items():
        value = (metrics.get(metric) or {}).get(key)
        if value is None:
            continue
        for name, values in (value.items() if isinstance(value, dict) else [(None, value)]):
            rows = values if isinstance(values, list) else [values]  # knn.chance: one number per k
            flat = [v for row in rows for v in (row if isinstance(row, list) else [row])]
            bad = [v for v in flat if v is not None and not math.isnan(v) and not low - _ROUNDING <= v <= high + _ROUNDING]
            if bad:
                field = f"metrics.{metric}.{key}" + (f".{name}" if name is not None else "")
                yield field, f"{what} in [{low:g}, {high:g}] (null where undefined)", _short(bad[0])
    for k, entry in (metrics.get("probe") or {}).items():
        for path, value in _probe_scores(entry):
            if value is not None and not math.isnan(value) and not 0.0 <= value <= 1.0:
                yield f"metrics.probe.{k}.{path}", "an accuracy in [0, 1]", _short(value)
    yield from _interval_problems(metrics)


def _interval_problems(metrics: Mapping[str, Any]) -> Iterable[tuple[str, str, str]]:
    """Intervals whose ends are reversed or, where the interval is built around its score (a jackknife's score +- t se,
    a Wilson interval), that leave their score out. A k-NN percentile bootstrap interval may leave its mean out."""
    for metric in ("cka", "dimcorr", "procrustes"):
        part = metrics.get(metric) or {}
        for key, ends in (part.get("intervals") or {}).items():
            yield from _ends_problems(f"metrics.{metric}.intervals.{key}", ends, part.get(key))
    for k, ends in ((metrics.get("knn") or {}).get("intervals") or {}).items():
        yield from _ends_problems(f"metrics.knn.intervals.{k}", ends, None)
    for k, entry in (metrics.get("probe") or {}).items():
        for prefix, direction in (("", entry), ("reverse.", entry.get("reverse"))):
            for side, ends in ((direction or {}).get("test_accuracy_interval") or {}).items():
                yield from _ends_problems(f"metrics.probe.{k}.{prefix}test_accuracy_interval.{side}", [ends],
                                          [direction[side]["test"]["accuracy"]])


def _ends_problems(field: str, intervals: list[list[Any]], scores: list[Any] | None) -> Iterable[tuple[str, str, str]]:
    """The first of ``intervals`` (one (low, high) per score) that is reversed or leaves its score out."""
    for i, (low, high) in enumerate(intervals):
        if not _finite(low) or not _finite(high):
            continue  # undefined (null, NaN): no interval
        score = scores[i] if scores is not None else None
        if high < low - _ROUNDING:
            yield field, "intervals as (low, high), low <= high", _short([low, high])
            return
        if _finite(score) and not low - _ROUNDING <= score <= high + _ROUNDING:
            yield field, "intervals that hold their score", f"{_short([low, high])} around {_short(score)}"
            return


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _probe_scores(entry: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    """(path, value) of each accuracy and the chance level of one probe entry (both directions)."""
    yield "chance", entry.get("chance")
    for prefix, direction in (("", entry), ("reverse.", entry.get("reverse"))):
        if direction is None:
            continue
        for side in ("source", "target"):
            for split in ("train", "dev", "test"):
                yield f"{prefix}{side}.{split}.accuracy", direction[side][split]["accuracy"]


def _short(value: Any) -> str:
    """A value as it reads in a one-line message: its repr, cut."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
