"""Labels of source records as classes: the one rule of the probes of ``hrsa analyze`` and of ``hrsa eval``'s local
classification tasks, so that one labels file makes the same classes in both.

A class is a label's value written as text, an integral float as its integer (1 and 1.0 are the class "1": JSON
writes 1.0 for a float column, and a CSV column of numbers with a gap reads as floats). Labels of different kinds in
one file (numbers, strings, booleans: 1, "1" and true) are refused, not made classes apart: their texts can be the
same ("1") or not ("True" against 1), and either way the classes would not be the ones the file means.

Here, below both analyze/ and train/ (which may not import each other), beside the record reader
(:mod:`hrsa.store.records`) that both read labels with.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from hrsa.store.errors import UserError

__all__ = ["check_one_kind", "class_name", "label_kind"]


def class_name(label: Any) -> str:
    """The class a label names: its str(), an integral float written as the integer (1.0 from JSON or a CSV column of
    floats is the class of 1, not another one).

    Example:
        >>> [class_name(v) for v in (1, 1.0, "1", 2.5, "spam")]
        ['1', '1', '1', '2.5', 'spam']
    """
    if isinstance(label, (float, np.floating)) and float(label).is_integer():
        return str(int(label))
    return str(label)


def label_kind(label: Any) -> str:
    """"a boolean", "a number", "a string" or "a <type>": a boolean before a number (Python's bool is an int)."""
    if isinstance(label, (bool, np.bool_)):
        return "a boolean"
    if isinstance(label, numbers.Real):
        return "a number"
    return "a string" if isinstance(label, str) else f"a {type(label).__name__}"


def check_one_kind(first_of_kind: dict[str, Any], label: Any, label_field: str, source: Any) -> None:
    """Refuse a label of another kind than those before it (``first_of_kind``: the first label of each kind seen, which
    this adds to): 1, "1" and true would each be a class of their own, silently.

    Raises:
        UserError: the second kind, naming the first label of each of the two kinds.
    """
    kind = label_kind(label)
    first_of_kind.setdefault(kind, label)
    if len(first_of_kind) > 1:
        (kind_a, a), (kind_b, b) = list(first_of_kind.items())[:2]
        raise UserError(f"Expected the labels of {label_field!r} in {source} to be of one type. Got {a!r} ({kind_a}) "
                        f"and {b!r} ({kind_b}) instead. Make the labels one type (e.g. all strings).")
