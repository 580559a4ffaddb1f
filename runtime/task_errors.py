"""A failed Ray task as what went wrong in it: the error raised inside, unwrapped from Ray's wrappers.

A task whose input was another task's failed output raises a ``RayTaskError`` whose ``cause`` is that task's
``RayTaskError``, and so on down the chain; the innermost cause is the error the code raised (or Ray's own, such as
``WorkerCrashedError`` when a worker died). ``RayTaskError`` subclasses the cause's type, so ``except UserError``
catches it, but its text is Ray's multi-line traceback: callers raise the cause itself, or one line naming it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["one_line", "root_cause"]


def root_cause(error: BaseException) -> BaseException:
    """The innermost cause of a Ray task error (``error`` itself for any other error)."""
    import ray

    cause: Any = error
    while isinstance(cause, ray.exceptions.RayTaskError) and getattr(cause, "cause", None) is not None:
        cause = cause.cause
    return cause


def one_line(error: BaseException) -> str:
    """``"TypeName: first line of its text"`` (no trailing colon for an error without text)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
