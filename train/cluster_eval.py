"""`hrsa eval` as one Ray task on a cluster node, a GPU one where the cluster has GPUs: what a pipeline's eval stage runs
on a cluster, so that scoring a run's checkpoints uses the cluster's GPUs, not the driver's CPU.

The task sees nothing of the driver's disk. The local task files and the earlier ``eval.json`` travel with it (its
scores of the same checkpoints, tasks and settings are reused there as `hrsa eval` reuses them, keyed by content);
it evaluates into a folder of its own, and every file it wrote comes back and is written into the driver's out,
with each result's task spec as the driver named it (not the task's copy). The model must be where that node reads
it: a hub id, a URL (a training run on ``s3://``), or a folder every node sees (checked first). Room for the task is
reserved first: a cluster whose GPUs other jobs hold is an error after the placement timeout, not a wait.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hrsa.runtime.files import write_atomic
from hrsa.runtime.task_errors import one_line, root_cause
from hrsa.store.errors import HrsaError
from hrsa.train.eval_tasks import EvalError, TaskSpec, parse_task_spec, safe_name
from hrsa.train.evaluate import EvalConfig

__all__ = ["ClusterEvalResult", "evaluate_on_cluster"]


@dataclass(frozen=True)
class ClusterEvalResult:
    """``eval.json`` as written into the driver's out, the notes the evaluation made, and the node that ran it."""

    json_path: Path
    notes: tuple[str, ...]
    node_id: str


def evaluate_on_cluster(config: EvalConfig, *, gpu: bool, nodes: tuple[Any, ...] = (),
                        own_out: bool = False) -> ClusterEvalResult:
    """Evaluate ``config`` in one Ray task (1 CPU, and 1 GPU with ``gpu``) and write what it wrote into
    ``config.out_dir()``.

    Args:
        config: the evaluation, as `hrsa eval` takes it (its task specs and model as the driver names them).
        gpu: ask the task for a GPU (the cluster has some).
        nodes: the cluster's nodes (:class:`hrsa.runtime.connection.NodeResources`): a local model folder must be seen
            by every one of them.
        own_out: the out folder is the caller's own (:func:`hrsa.train.evaluate.evaluate`'s ``own_out``).

    Raises:
        PlacementError: a model folder some node does not see, or no room for the task within the timeout.
        UserError: what `hrsa eval` refuses (raised in the task, re-raised here as it was).
    """
    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from hrsa.runtime.placement import check_every_node_sees, reserve_room

    local = Path(config.model).expanduser()
    if local.exists():  # a hub id or a URL is read where the task runs; a folder here must be seen there too
        check_every_node_sees(str(local if local.is_dir() else local.parent), nodes, flag="the evaluated model",
                              use_instead="Train into storage every node reaches (a training run's output on s3://...), "
                                          "or put the model there.")
    out = config.out_dir()
    specs = [parse_task_spec(text) for text in config.tasks]
    files = {f"{i}/{_copy_name(spec.path)}": spec.path.read_bytes() for i, spec in enumerate(specs) if spec.path is not None}
    earlier = (out / "eval.json").read_bytes() if (out / "eval.json").is_file() else None
    group = reserve_room([{"CPU": 1.0, **({"GPU": 1.0} if gpu else {})}], strategy="PACK")
    try:
        task = ray.remote(_evaluate_here).options(
            num_cpus=1, num_gpus=1 if gpu else 0, max_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0))
        shipped = [_shipped(spec, i) for i, spec in enumerate(specs)]
        written, notes, node_id = ray.get(task.remote(config.model_dump(mode="json"), shipped, files, earlier,
                                                       own_out))
    except ray.exceptions.RayError as error:
        raise _failure(error) from None
    finally:
        remove_placement_group(group)
    for name, data in written.items():
        write_atomic(out / name, data)
    if "eval_curve.png" not in written:  # `hrsa eval` removed it in the task's out (fewer than two steps): here too
        (out / "eval_curve.png").unlink(missing_ok=True)
    return ClusterEvalResult(out / "eval.json", tuple(notes), node_id)


def _failure(error: Exception) -> Exception:
    """hrsa's own error raised in the task as itself (a task file `hrsa eval` refuses); anything else (the worker
    died: out of memory) as one line."""
    cause = root_cause(error)
    if isinstance(cause, HrsaError):
        return cause
    return EvalError(f"Expected the evaluation's Ray task to finish. Got {one_line(cause)} instead. A worker killed for "
                     "memory: lower batch_size or max_length; otherwise the worker logs under /tmp/ray/session_latest/logs "
                     "on its node hold its traceback.")


_HERE = "@TASK_FILES@"  # where the task's copies of the task files are, in the specs shipped to it


def _shipped(spec: TaskSpec, index: int) -> str:
    """The spec as the task runs it: a local task's file at its copy, fields explicit; an MTEB task as it was."""
    if spec.path is None:
        return spec.text
    fields = f":{spec.text_field}:{spec.label_field}" if spec.kind == "classification" else ""
    return f"{spec.kind}:{_HERE}/{index}/{_copy_name(spec.path)}{fields}"


def _copy_name(path: Path) -> str:
    """The name of a task file's copy: its name with what a task name leaves out (``:`` above all, which the shipped
    spec's fields follow) as a task name writes it, so the copy gives the task the name the file gives it here."""
    return safe_name(path.name)


def _evaluate_here(values: dict[str, Any], shipped: list[str], files: dict[str, bytes],
                   earlier: bytes | None, own_out: bool = False) -> tuple[dict[str, bytes], list[str], str]:
    """In the task: the task files and the earlier eval.json written into a folder of its own, `hrsa eval` run there,
    and every file it wrote returned (relative name -> bytes; eval.json with the driver's specs), with its notes and
    this node's id."""
    import ray

    from hrsa.train.evaluate import evaluate

    config = EvalConfig.model_validate(values)
    with tempfile.TemporaryDirectory(prefix="hrsa-eval-") as temp:
        root = Path(temp)
        for name, data in files.items():
            write_atomic(root / "tasks" / name, data)
        here = [text.replace(_HERE, str(root / "tasks")) for text in shipped]
        out = root / "out"
        if earlier is not None:  # as the driver names the specs: reused by content, whatever the spec text
            write_atomic(out / "eval.json", earlier)
        notes: list[str] = []
        evaluate(config.model_copy(update={"tasks": tuple(here), "out": out}), on_note=notes.append, own_out=own_out)
        written = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
                   if p.is_file() and not p.name.startswith(".")}
    written["eval.json"] = _named_as(written["eval.json"], dict(zip(here, config.tasks)), values)
    return written, notes, ray.get_runtime_context().get_node_id()


def _named_as(data: bytes, names: dict[str, str], config: dict[str, Any]) -> bytes:
    """eval.json with each task spec and its settings as the driver named them (the task's copies of the task files
    are gone with its folder)."""
    doc = json.loads(data)
    doc["config"] = config
    for task in doc.get("tasks", []):
        task["spec"] = names.get(task.get("spec"), task.get("spec"))
    for row in doc.get("checkpoints", []):
        for result in row.get("results", {}).values():
            result["spec"] = names.get(result.get("spec"), result.get("spec"))
    return json.dumps(doc, indent=2, allow_nan=False).encode()
