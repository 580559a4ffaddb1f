"""Which hidden states of a pair the local metrics (k-NN overlap, probes) look at."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hrsa.store.errors import UserError

if TYPE_CHECKING:
    from hrsa.store import ActivationStore

__all__ = ["shared_hidden_states"]


def shared_hidden_states(store: ActivationStore, a: str, b: str, wanted: Sequence[int] | None) -> tuple[int, ...]:
    """The hidden states both models store (``wanted``, in its order, when given).

    Raises:
        UserError: a wanted hidden state that one of them does not store (it was dropped without a word), or none
            shared.
    """
    shared = sorted(set(store.model_info(a).hidden_states) & set(store.model_info(b).hidden_states))
    missing = [k for k in wanted or () if k not in shared]
    if not shared or missing or (wanted is not None and not wanted):
        got = ", ".join(map(str, missing)) if missing else "none"
        raise UserError(f"Expected hidden states shared by {a} and {b} ({', '.join(map(str, shared)) or 'none'}). "
                        f"Got {got} instead. Pick --hidden-states among them.")
    return tuple(shared) if wanted is None else tuple(dict.fromkeys(int(k) for k in wanted))
