"""The number-list grammar: character automaton, regex, and the token-level view."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmpipeline.config import FilterSpec
from lmpipeline.filters import check_numbers
from lmpipeline.grammar import SEPARATORS, NumberListGrammar, TokenGrammar

G = NumberListGrammar()
GP = NumberListGrammar(final_period=True)


def valid_lists(max_count=10, max_digits=3, period=False):
    digits = st.text("0123456789", min_size=1, max_size=max_digits)

    def build(nums, sep, brackets, period):
        text = sep.join(nums)
        return (brackets[:1] + text + brackets[1:]) + ("." if period else "")

    return st.builds(
        build,
        st.lists(digits, min_size=1, max_size=max_count),
        st.sampled_from(SEPARATORS),
        st.sampled_from(["", "[]", "()"]),
        st.booleans() if period else st.just(False),
    )


@given(valid_lists())
def test_every_valid_list_and_each_prefix_is_accepted(text):
    assert G.accepts(text)
    for end in range(1, len(text)):
        assert G.feed(G.start, text[:end]) is not None, text[:end]


@given(valid_lists(period=True))
def test_with_a_final_period_every_valid_list_is_accepted(text):
    assert GP.accepts(text)
    assert G.accepts(text) == (not text.endswith("."))


@given(valid_lists(period=True))
def test_accepted_lists_pass_the_filter(text):
    verdict = check_numbers(text, FilterSpec())
    assert verdict.ok, (text, verdict)


ALPHABET = "0123456789,; \n[]()."


@given(st.text(alphabet=ALPHABET, max_size=40))
def test_regex_matches_exactly_the_accepted_strings(text):
    assert bool(re.fullmatch(G.regex(), text)) == G.accepts(text)
    assert bool(re.fullmatch(GP.regex(), text)) == GP.accepts(text)


@given(st.text(alphabet=ALPHABET, max_size=40))
def test_accepted_strings_always_pass_the_filter(text):
    if GP.accepts(text):
        assert check_numbers(text).ok, repr(text)


def test_random_strings_the_grammar_accepts_pass_the_filter():
    # Many short strings over the list alphabet: the grammar with a final period accepts
    # about 5,000 of them, a few dozen bracketed and a few hundred with a period, and the
    # filter keeps every one; the default grammar accepts the same ones without a period.
    rng = random.Random(0)
    texts = {
        "".join(rng.choice("0123456789" * 3 + ALPHABET[10:]) for _ in range(rng.randint(1, 9))) for _ in range(100_000)
    }
    accepted = [t for t in texts if GP.accepts(t)]
    assert len(accepted) > 4_000
    assert sum(t[0] in "[(" for t in accepted) > 20 and sum(t.endswith(".") for t in accepted) > 200
    assert [t for t in accepted if not check_numbers(t).ok] == []
    assert all(bool(re.fullmatch(GP.regex(), t)) for t in accepted)
    assert sorted(t for t in texts if G.accepts(t)) == sorted(t for t in accepted if not t.endswith("."))


@pytest.mark.parametrize(
    "text",
    [
        "",
        ",1",
        " 1",
        "1,",
        "1, ",
        "1234",
        "1,2;3",
        "1, 2,3",
        "1  2",
        "1,,2",
        ",",
        "1 ,2",
        "1a",
        "[",
        "[1",
        "[1, 2",
        "[1, 2)",
        "(1]",
        "1]",
        "[]",
        "[1,]",
        "1..",
        "[1.]",
        ".",
        "[1].5",
        "[[1]]",
        "1.2",
        "1.",
        "[1].",  # a final period only with final_period=True
    ],
)
def test_rejected_or_incomplete(text):
    assert not G.accepts(text)


def test_count_and_digit_limits():
    assert G.accepts(", ".join(["1"] * 10))
    assert G.feed(G.start, ", ".join(["1"] * 10) + ",") is None  # no separator after the 10th
    small = NumberListGrammar(max_count=2, max_digits=2)
    assert small.accepts("12 34") and not small.accepts("123") and not small.accepts("1 2 3")
    assert G.max_chars == 10 * 3 + 9 * 2 + 2  # and two brackets
    longest = "[" + ", ".join(["123"] * 10) + "]"
    assert G.accepts(longest) and len(longest) == G.max_chars
    assert GP.accepts(longest + ".") and GP.max_chars == G.max_chars + 1
    with pytest.raises(ValueError):
        NumberListGrammar(max_count=0)


# A toy vocabulary with multi-character tokens, separators, junk and one end token (id 0).
TOY = [
    "<eos>",
    "1",
    "23",
    "456",
    "7890",
    ", ",
    ",",
    " ",
    "; ",
    ";",
    "\n",
    "a",
    "1,",
    ", 5",
    "  ",
    "8 9",
    "",
    "[",
    "]",
    "].",
    ".",
    "(",
]


def test_token_grammar_allows_exactly_the_tokens_that_keep_a_prefix():
    tg = TokenGrammar(G, TOY, eos_ids=[0])
    start = tg.allowed(G.start)
    # No end and no separator first; no "(" either, as no token closes it.
    assert {TOY[i] for i in start} == {"1", "23", "456", "1,", "8 9", "["}
    after_one = G.feed(G.start, "1")
    allowed = {TOY[i] for i in tg.allowed(after_one)}
    assert "<eos>" in allowed and "7890" not in allowed and "a" not in allowed and "  " not in allowed
    assert {", ", ",", " ", "; ", ";", "\n", ", 5", "23", "1,", "8 9"} <= allowed
    assert "]." not in allowed and "[" not in allowed and "." not in allowed
    period = TokenGrammar(GP, TOY, eos_ids=[0])
    assert "." in {TOY[i] for i in period.allowed(after_one)}
    in_brackets = GP.feed(GP.start, "[1")
    assert "]." in {TOY[i] for i in period.allowed(in_brackets)} and "<eos>" not in {
        TOY[i] for i in period.allowed(in_brackets)
    }
    assert {TOY[i] for i in period.allowed(GP.feed(GP.start, "[1]."))} == {"<eos>"}
    assert tg.allowed(None) == (0,)
    assert tg.advance(after_one, 0) is None


@pytest.mark.parametrize("grammar", [G, GP], ids=["default", "final_period"])
@given(seed=st.integers(0, 2**32))
def test_random_walks_over_allowed_tokens_end_in_lists_that_pass_the_filter(grammar, seed):
    rng = random.Random(seed)
    tg = TokenGrammar(grammar, TOY, eos_ids=[0])
    state, text = grammar.start, ""
    for _ in range(grammar.max_chars + 1):  # the bound the decoder relies on
        token = rng.choice(tg.allowed(state))
        if token == 0:
            break
        text += TOY[token]
        state = tg.advance(state, token)
    else:
        pytest.fail(f"no end after {grammar.max_chars + 1} tokens: {text!r}")
    assert check_numbers(text).ok, repr(text)
