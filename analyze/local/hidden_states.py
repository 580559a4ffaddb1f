"""Which hidden states of a pair the local metrics (k-NN overlap, probes) look at.

An index counts as in ``hrsa store get --layer``: a negative one from the end of each model's hidden states (-1 the
last layer), resolved by :meth:`hrsa.store.model.ModelInfo.resolve_hidden_state`; the metrics and their results
only ever see the resolved, non-negative index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hrsa.runtime.settings import SettingNames, flag_name
from hrsa.store.errors import LayerOutOfRangeError, UserError

if TYPE_CHECKING:
    from hrsa.store import ActivationStore
    from hrsa.store.model import ModelInfo

__all__ = ["shared_hidden_states"]


def shared_hidden_states(store: ActivationStore, a: str, b: str, wanted: Sequence[int] | None, *,
                         names: SettingNames = flag_name) -> tuple[int, ...]:
    """The hidden states both models store (``wanted``, resolved, in its order, when given); messages name the setting
    by ``names`` (`hrsa analyze`'s --hidden-states; a pipeline's YAML key).

    Raises:
        UserError: a wanted hidden state that one of them does not store (it was dropped without a word), a negative
            index that names different hidden states of models of different depths, or none shared.
    """
    info_a, info_b = store.model_info(a), store.model_info(b)
    shared = sorted(set(info_a.hidden_states) & set(info_b.hidden_states))
    resolved = [_resolve_in_both(info_a, info_b, int(k), shared, names) for k in wanted or ()]
    missing = [int(k) for k, found in zip(wanted or (), resolved) if found is None]
    if not shared or missing or (wanted is not None and not wanted):
        got = ", ".join(map(str, missing)) if missing else "none"
        raise UserError(f"Expected hidden states shared by {a} and {b} ({_named(info_a, info_b, shared)}). "
                        f"Got {got} instead. Pick {names('hidden_states')} among them.")
    return tuple(shared) if wanted is None else tuple(dict.fromkeys(k for k in resolved if k is not None))


def _resolve_in_both(info_a: ModelInfo, info_b: ModelInfo, index: int, shared: list[int],
                     names: SettingNames) -> int | None:
    """The hidden state ``index`` names in both models, None where one of them stores none of that index.

    Raises:
        UserError: a negative index naming different hidden states of the two (their depths differ): the local
            metrics compare one index of both, and neither reading would be the other's "last".
    """
    try:
        k_a, k_b = info_a.resolve_hidden_state(index), info_b.resolve_hidden_state(index)
    except LayerOutOfRangeError:
        return None
    if k_a != k_b:
        raise UserError(f"Expected hidden-state indices naming the same hidden state of {info_a.id} and {info_b.id}. "
                        f"Got {index} instead, which is {k_a} of {info_a.id} ({info_a.n_hidden_states} hidden states) "
                        f"but {k_b} of {info_b.id} ({info_b.n_hidden_states}). Pick {names('hidden_states')} among "
                        f"the shared ones counted from 0 ({', '.join(map(str, shared))}).")
    return k_a


def _named(info_a: ModelInfo, info_b: ModelInfo, shared: list[int]) -> str:
    """The shared hidden states as a message lists them; also counted from the end where both have one end."""
    listed = ", ".join(map(str, shared)) or "none"
    if not shared or info_a.n_hidden_states != info_b.n_hidden_states:
        return listed
    return f"{listed}; from the end {', '.join(str(k - info_a.n_hidden_states) for k in shared)}"
