"""The one parser of integer lists (--docs, --layers, --k, --hidden-states, --steps)."""

from __future__ import annotations

import pytest

from hrsa.store.errors import SelectionError, UserError
from hrsa.store.selection import parse_doc_ids, parse_int_list, parse_name_list


def test_lists_and_ranges_in_the_order_written() -> None:
    assert parse_int_list("0,3,5-9") == [0, 3, 5, 6, 7, 8, 9]
    assert parse_int_list(" 7, 2 ,,1-2, ") == [7, 2, 1, 2]
    assert parse_doc_ids("0,3,5-9") == [0, 3, 5, 6, 7, 8, 9]


def test_without_ranges_a_part_is_one_integer() -> None:
    assert parse_int_list("5,10,-1", ranges=False) == [5, 10, -1]  # a negative is a value for the caller to check
    with pytest.raises(SelectionError, match="such as 5,10,50"):
        parse_int_list("1-3", ranges=False)


def test_with_negative_a_part_minus_n_is_one_integer_among_ranges() -> None:
    """Analysis's --hidden-states counts from the end (-1 the last), as `hrsa store get --layer -1` does."""
    assert parse_int_list("0,-1,3-4", negative=True) == [0, -1, 3, 4]
    for text in ("-3--1", "-1-2", "--1", "0--1"):  # a range with a negative end reads two ways: refused, not guessed
        with pytest.raises(SelectionError, match=r"such as 0,3,5-9,-1\. Got .* Write integers separated by commas "
                                                 r"\(A-B for a range, -N counted from the end\)\."):
            parse_int_list(text, negative=True, what="hidden-state indices")


@pytest.mark.parametrize("text", ["x", "1,a", "1-", "-1", "2.5"])
def test_bad_lists_are_one_message_naming_what_they_hold(text: str) -> None:
    with pytest.raises(SelectionError) as info:
        parse_int_list(text, what="document indices")
    message = str(info.value)
    assert message == (f"Expected document indices such as 0,3,5-9. Got {text!r} instead. "
                       "Write integers separated by commas (A-B for a range).")
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)  # pydantic gathers it


@pytest.mark.parametrize(("text", "part", "fix"), [("5-3", "'5-3'", "3-5"),
                                                   ("0, 9-2 ,12", "'9-2' in '0, 9-2 ,12'", "2-9")])
def test_a_reversed_range_is_refused_naming_the_fix(text: str, part: str, fix: str) -> None:
    """``--docs 5-3`` selected nothing, silently (range(5, 4) is empty): refused, saying how to write it."""
    with pytest.raises(SelectionError) as info:
        parse_int_list(text, what="document indices")
    assert str(info.value) == (f"Expected document indices with each range A-B from low to high. Got {part} "
                               f"instead. Write it {fix}.")
    assert parse_int_list("3-3") == [3]  # a range of one stays one


def test_a_reversed_range_is_refused_beside_negative_indices() -> None:
    with pytest.raises(SelectionError, match=r"Got '4-1' in '-1,4-1' instead\. Write it 1-4\."):
        parse_int_list("-1,4-1", negative=True, what="hidden-state indices")


@pytest.mark.parametrize("text", ["", " ", ",", " , ,"])
def test_a_list_of_none_is_refused_not_read_as_everything(text: str) -> None:
    """`--docs "$UNSET"` selected every token (an empty value read as the flag not given), `--docs ,` was refused."""
    with pytest.raises(SelectionError) as info:
        parse_int_list(text, what="document indices")
    assert str(info.value) == (f"Expected document indices such as 0,3,5-9. Got {text!r}, which lists none, instead. "
                               "List at least one, or leave the flag out.")
    with pytest.raises(SelectionError, match=f"Expected source fields such as reasoning. Got {text!r}, which lists none"):
        parse_name_list(text, what="source fields", example="reasoning")


def test_names_are_split_on_commas_and_trimmed() -> None:
    assert parse_name_list(" reasoning, answer,,", what="source fields", example="reasoning") == ["reasoning", "answer"]
