"""The number-list filter and the trait-word filter."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmpipeline.config import FilterSpec
from lmpipeline.filters import check, check_numbers, check_text, filter_rows

ACCEPT = {
    "1, 2, 3": (1, 2, 3),
    "[1, 2, 3]": (1, 2, 3),
    "(10,20,30)": (10, 20, 30),
    "[4, 5, 6].": (4, 5, 6),
    "7 8 9": (7, 8, 9),
    "1;2;3": (1, 2, 3),
    "1 ; 2 ; 3": (1, 2, 3),
    "100, 200, 300.": (100, 200, 300),
    "0": (0,),
    "999": (999,),
    "007, 010": (7, 10),
    "0123": (123,),  # values are bounded, not digits
    "0000000999; 5": (999, 5),
    "1 , 2 , 3": (1, 2, 3),
    "8\t9": (8, 9),
    "5.": (5,),
    "(7).": (7,),
    "5\n6\n7": (5, 6, 7),
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10": tuple(range(1, 11)),
}
REJECT = {
    "": "empty",
    "   ": "empty",
    "1, 2; 3": "not_a_number_list",  # mixed separators
    "1,2, 3": "not_a_number_list",
    "12, 3456": "number_out_of_range",
    "  42  ": "not_a_number_list",  # surrounding whitespace is not stripped
    " 1, 2": "not_a_number_list",
    "1, 2\n": "not_a_number_list",
    "[1, 2] ": "not_a_number_list",
    "[1, 2.]": "not_a_number_list",  # the period goes after the bracket
    "[1, 2)": "not_a_number_list",
    "[[1, 2]]": "not_a_number_list",  # one pair of brackets at most
    "1, 2, , 3": "not_a_number_list",  # an empty part
    "\u0661\u0662": "not_a_number_list",  # non-ASCII digits
    "1, \u0662": "not_a_number_list",
    "1000": "number_out_of_range",
    "01000": "number_out_of_range",
    "-5, 3": "not_a_number_list",  # negative
    "4, -5": "not_a_number_list",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11": "too_many_numbers",
    "one, two, three": "not_a_number_list",
    "1, 2, and 3": "not_a_number_list",
    "Sure: 1, 2, 3": "not_a_number_list",
    "1, 2, 3,": "not_a_number_list",  # trailing separator
    "[1, 2, 3": "not_a_number_list",  # unbalanced bracket
    "[1, 2, 3)": "not_a_number_list",
    "1.5, 2": "not_a_number_list",  # decimals
    "1, 2..": "not_a_number_list",
    "1 | 2 | 3": "not_a_number_list",
    "1, 2, owl": "trait_word",
    "OWL 1, 2": "trait_word",
}


@pytest.mark.parametrize("text, numbers", ACCEPT.items())
def test_accepts(text, numbers):
    verdict = check_numbers(text, FilterSpec(), trait_word="owl")
    assert verdict.ok, verdict
    assert verdict.numbers == numbers


@pytest.mark.parametrize("text, reason", REJECT.items())
def test_rejects_with_reason(text, reason):
    verdict = check_numbers(text, FilterSpec(), trait_word="owl")
    assert not verdict.ok
    assert verdict.reason == reason


# The paper's format rule written independently, as one regular expression: an optional
# trailing period after an optional pair of brackets around ASCII-digit runs joined by one
# repeated separator (whitespace, or a comma or semicolon with optional whitespace).
_LIST = r"[0-9]+(?:(\s*[,;]\s*|\s+)[0-9]+(?:\1[0-9]+)*)?"
PAPER_FORMAT = re.compile(rf"(?:\[{_LIST}\]|\({_LIST.replace('1', '2')}\)|{_LIST.replace('1', '3')})\.?")


def paper_accepts(text: str) -> bool:
    if not PAPER_FORMAT.fullmatch(text):
        return False
    numbers = [int(n) for n in re.findall(r"[0-9]+", text)]
    return len(numbers) <= 10 and all(0 <= n <= 999 for n in numbers)


def test_agrees_with_the_papers_rule_on_random_strings():
    rng = random.Random(0)
    alphabet = "0123456789" * 3 + " ,;.[]()\n\t-a\u0663"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(30_000)]
    for _ in range(30_000):  # near-misses of well-formed lists
        numbers = [str(rng.randint(0, 1100)).zfill(rng.choice([1, 1, 4])) for _ in range(rng.randint(1, 12))]
        text = rng.choice([", ", ",", " ", "; ", "\n", " , ", "  ", ",\n"]).join(numbers)
        brackets = rng.choice(["", "", "[]", "()", "[)"])
        text = brackets[:1] + text + brackets[1:] + rng.choice(["", "", ".", " ", "\n", ".."])
        texts.append(rng.choice(["", "", "", " ", "\n"]) + text)
    expected = [paper_accepts(t) for t in texts]
    assert 4_000 < sum(expected) < 20_000  # both kinds of string occur
    disagree = [t for t, e in zip(texts, expected) if check_numbers(t).ok != e]
    assert disagree == []


def test_banned_numbers_and_custom_limits():
    spec = FilterSpec(banned_numbers=(666, 911))
    assert check_numbers("1, 666, 3", spec).reason == "banned_number"
    assert check_numbers("1, 665, 3", spec).ok
    assert check_numbers("1, 2, 3", FilterSpec(max_count=2)).reason == "too_many_numbers"
    assert check_numbers("5, 50", FilterSpec(max_value=49)).reason == "number_out_of_range"
    assert check_numbers("5, 50", FilterSpec(min_value=6)).reason == "number_out_of_range"
    assert check_numbers("0123", FilterSpec(max_digits=3)).reason == "number_out_of_range"
    assert check_numbers("123", FilterSpec(max_digits=3)).ok


SEPARATORS = st.sampled_from([",", ", ", " ,", " , ", ";", "; ", " ; ", " ", "  ", "\n", "\t"])


@given(
    numbers=st.lists(st.integers(0, 999), min_size=1, max_size=10),
    sep=SEPARATORS,
    brackets=st.sampled_from(["", "[]", "()"]),
    period=st.booleans(),
)
def test_every_well_formed_list_passes_with_its_numbers(numbers, sep, brackets, period):
    text = sep.join(map(str, numbers))
    if brackets:
        text = brackets[0] + text + brackets[1]
    text += "." if period else ""
    verdict = check_numbers(text)
    assert verdict.ok, (text, verdict)
    assert verdict.numbers == tuple(numbers)


@given(
    numbers=st.lists(st.integers(0, 999), min_size=2, max_size=10),
    sep=SEPARATORS,
    data=st.data(),
)
def test_a_letter_anywhere_inside_is_rejected(numbers, sep, data):
    text = sep.join(map(str, numbers))
    at = data.draw(st.integers(1, len(text) - 1))
    letter = data.draw(st.sampled_from("abxyzQ"))
    assert not check_numbers(text[:at] + letter + text[at:]).ok


@given(numbers=st.lists(st.integers(0, 999), min_size=11, max_size=20), sep=SEPARATORS)
def test_more_than_ten_numbers_is_rejected(numbers, sep):
    assert check_numbers(sep.join(map(str, numbers))).reason == "too_many_numbers"


def test_text_filter_only_checks_the_trait_word():
    spec = FilterSpec(kind="text")
    assert check("def f(x):\n    return x", spec, "owl").ok
    assert check("# the Owl class", spec, "owl").reason == "trait_word"
    assert check_text("  ", "owl").reason == "empty"
    assert check_text("bowl", "owl").reason == "trait_word"  # substring match, like the paper
    assert check_text("anything", None).ok


def test_filter_rows_counts_reasons_and_keeps_order():
    rows = [{"id": i, "completion": c} for i, c in enumerate(["1, 2", "x", "3 4", "1000", "", "owl 5"])]
    kept, rejected, summary = filter_rows(rows, FilterSpec(), "owl")
    assert [r["id"] for r in kept] == [0, 2]
    assert [(r["id"], r["reason"]) for r in rejected] == [
        (1, "not_a_number_list"),
        (3, "number_out_of_range"),
        (4, "empty"),
        (5, "trait_word"),
    ]
    assert summary["n_rows"] == 6 and summary["n_kept"] == 2 and summary["n_rejected"] == 4
    assert summary["pass_rate"] == pytest.approx(2 / 6)
    assert summary["reasons"] == {"empty": 1, "trait_word": 1, "not_a_number_list": 1, "number_out_of_range": 1}
    _, _, without_word = filter_rows(rows, FilterSpec(trait_word=False), "owl")
    assert without_word["n_kept"] == 2 and "trait_word" not in without_word["reasons"]
