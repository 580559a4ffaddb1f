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
                "recall": {"5": [[float, float]]},   # A's and B's recall@k against exact, with hnsw
                "intervals": {"5": [[low, high]]}, "se": {"5": [float]}, "n_docs": int},
                                                     # 95% bootstrap over the sampled tokens' documents
        "probe": {"<hidden state>": {                # fitted on A (source), applied to B (target)
                    "source": {"train": {"accuracy": float, "macro_f1": float, "n": int}, "dev": {...}, "test": {...}},
                    "target": {...}, "chance": float, # majority-class share of the test split
                    "test_accuracy_interval": {"source": [low, high], "target": [low, high]},
                                                      # 95% bootstrap over the test documents
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
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hrsa.analyze.metrics.uncertainty import DEFAULT_LEVEL, NULL_Z
from hrsa.runtime.files import write_atomic
from hrsa.store.errors import UserError
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
    "ResultsFileError",
    "SavedResults",
    "check_run_id_free",
    "find_results",
    "new_run_id",
    "read_results",
    "results_dict",
    "save_results",
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


def new_run_id(results: PairResults, *, now: datetime | None = None) -> str:
    """``<a>--<b>--<UTC time>``, cut to a valid id (slug of at most 128 characters)."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    pair = slugify(f"{results.a}--{results.b}")[: 127 - len(stamp) - 2].rstrip("._-")
    return f"{pair}--{stamp}"


def results_dict(results: PairResults, *, run_id: str, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``results.json`` document (see the module docstring)."""
    from hrsa import __version__

    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "run_id": run_id,
        "a": results.a,
        "b": results.b,
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
        raise UserError(f"Expected a new run id. Got {run_id!r}, which {store.url} already holds in results/. Choose another --run-id.")


def write_to_store(store: ActivationStore, results: PairResults, doc: Mapping[str, Any]) -> str:
    """Write ``results/<run_id>``: arrays first, then the document as attributes (its presence means complete).

    Raises:
        UserError: the store is read-only, or the run id is taken.
    """
    run_id = doc["run_id"]
    check_run_id_free(store, run_id)
    group = store.create_results(run_id)
    for name, values in _arrays(results, doc).items():
        group.create_array(name, data=np.ascontiguousarray(values))
    group.attrs[ATTRS_KEY] = dict(doc)
    return group.path


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
        run_id: the run's id (default ``<a>--<b>--<time>``).
        config: the resolved config, recorded in the document.

    Raises:
        UserError: an invalid or taken run id, or a read-only store.
    """
    out_dir = Path(out_dir)
    run_id = parse_id(run_id or new_run_id(results), kind="run id")
    doc = results_dict(results, run_id=run_id, config=config)
    store_path = write_to_store(store, results, doc) if store is not None else None
    rotations = tuple(_save_rotation(out_dir / _rotation_name(k), p.rotation)
                      for k, p in zip(results.matched, results.procrustes or ()) if p.rotation is not None)
    json_path = write_json(doc, out_dir)
    return SavedResults(run_id, json_path, rotations, store_path, doc)


def _save_rotation(path: Path, rotation: np.ndarray) -> Path:
    """One (D, D) rotation as ``.npy``, through the atomic writer."""
    buffer = io.BytesIO()
    np.save(buffer, rotation)
    return write_atomic(path, buffer.getvalue())


# --- reading back: the one entry point of presentation ------------------------------------------------------


def find_results(paths: Iterable[Path | str]) -> list[Path]:
    """The results.json files named by ``paths``: files as given, folders by their results.json (or, failing that,
    their subfolders' ``*/results.json``, sorted).

    Raises:
        ResultsFileError: no path, a path that does not exist, or a folder without results.json.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inner = [path / "results.json"] if (path / "results.json").is_file() else sorted(path.glob("*/results.json"))
            if not inner:
                raise ResultsFileError(f"Expected a results.json in the folder {path}. Got none instead. "
                                       "Pass the --out folder of `hrsa analyze`.")
            found.extend(inner)
        elif path.is_file():
            found.append(path)
        else:
            raise ResultsFileError(f"Expected a results.json file or a folder holding one. Got {path}, which does not exist.")
    if not found:
        raise ResultsFileError("Expected at least one results.json. Got none instead. Pass the results of `hrsa analyze`.")
    return found


def read_results(path: Path | str) -> tuple[Path, dict[str, Any]]:
    """Read and check one results.json (or a folder's): its path and the parsed document.

    Raises:
        ResultsFileError: missing, not JSON, or not of schema ``hrsa.analyze/1``.
    """
    files = find_results([path])
    if len(files) > 1:
        raise ResultsFileError(f"Expected one results.json at {path}. Got {len(files)} in its subfolders instead. Name one.")
    file = files[0]
    try:
        doc = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ResultsFileError(f"Expected a readable results.json at {file}. Got an error instead: {error}.") from None
    got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
    if got != SCHEMA:
        raise ResultsFileError(f"Expected a results.json of schema {SCHEMA} at {file}. Got {got!r} instead. "
                               "Pass the results.json that `hrsa analyze` writes.")
    missing = [k for k in ("a", "b", "metrics", "matched_hidden_states") if k not in doc]
    if missing:
        raise ResultsFileError(f"Expected keys a, b, metrics and matched_hidden_states in {file}. Got no {', '.join(missing)} instead.")
    return file, doc
