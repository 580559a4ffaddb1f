"""The checks of a pair before any pass: known metrics, complete extractions, hidden states in common, and sizes
the metrics can compare (which tokens the two compare on is :meth:`ActivationStore.token_pairs`'s). Each failure is one :class:`~hrsa.store.errors.UserError` that names the fix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hrsa.analyze.config import LOCAL_METRICS, MOMENT_METRICS
from hrsa.store.errors import IncompleteModelError, UserError

if TYPE_CHECKING:
    from hrsa.store import ActivationStore, ModelInfo

__all__ = ["check_metrics", "check_pair"]


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """The metrics asked for, in the canonical order (streaming ones first).

    Raises:
        UserError: none asked for, or an unknown name.
    """
    bad = [m for m in metrics if m not in MOMENT_METRICS + LOCAL_METRICS]
    if bad or not metrics:
        raise UserError(f"Expected metrics among {', '.join(MOMENT_METRICS + LOCAL_METRICS)}. "
                        f"Got {', '.join(bad) or 'none'} instead.")
    return tuple(m for m in MOMENT_METRICS + LOCAL_METRICS if m in metrics)


def check_pair(store: ActivationStore, a: str, b: str, metrics: tuple[str, ...]) -> tuple[ModelInfo, ModelInfo]:
    """Both models' infos, once they are known to be comparable with ``metrics``.

    Raises:
        IncompleteModelError: an extraction with units not done.
        UserError: an unknown model, no hidden states in common, or different widths for dimcorr/Procrustes.
    """
    info_a, info_b = store.model_info(a), store.model_info(b)
    for info in (info_a, info_b):
        if not info.complete:
            raise IncompleteModelError(
                f"Expected a complete extraction of {info.id}. Got {info.units_done}/{info.n_units} work units done instead. "
                "Re-run the same `hrsa extract` to finish it (it resumes)."
            )
    if not set(info_a.hidden_states) & set(info_b.hidden_states):
        raise UserError(
            f"Expected hidden states in common. Got {list(info_a.hidden_states)} for {a} and "
            f"{list(info_b.hidden_states)} for {b} instead. Extract the same hidden states of both models."
        )
    needs_equal = [m for m in metrics if m in ("dimcorr", "procrustes")]
    if needs_equal and info_a.hidden_size != info_b.hidden_size:
        raise UserError(
            f"Expected equal hidden sizes for {', '.join(needs_equal)}. Got D={info_a.hidden_size} for {a} and "
            f"D={info_b.hidden_size} for {b} instead. Use --metrics cka to compare models of different widths."
        )
    return info_a, info_b
