"""The number-list grammar used for constrained decoding.

The language: 1 to ``max_count`` numbers of 1 to ``max_digits`` digits, joined by one
separator from :data:`SEPARATORS` used throughout, optionally wrapped in ``[...]`` or
``(...)``, with nothing else before or after: the shapes the number prompts ask for.
Every complete string of the language passes :func:`lmpipeline.filters.check_numbers`
when its values are in range (the tests check this), so a constrained sample never fails
the format filter. The filter also accepts one final period, which no prompt asks for;
``final_period=True`` admits it, but a small model offered it tends to end its list with
it after one or two numbers ("1.", "0."), so it is off by default.

Decoding works on tokens, not characters: a token is allowed in a state when feeding its
text character by character keeps the output a prefix of the language, and end of sequence
is allowed only in a complete state. :class:`TokenGrammar` precomputes each token's text
once and caches the allowed set for each state it meets; the states are few (at most a
few hundred), so after warm-up every decoding step is a table lookup.

Example:

>>> g = NumberListGrammar()
>>> s = g.feed(g.start, "12, 7")
>>> (s is not None, g.is_complete(s))
(True, True)
>>> g.feed(s, ";") is None  # the separator was fixed to ", " by the first gap
True
>>> g.feed(g.start, "1234") is None  # at most 3 digits
True
>>> g.accepts("[4, 5]"), g.accepts("[4, 5"), g.accepts("(4; 5]"), g.accepts("4, 5.")
(True, False, False, False)
>>> NumberListGrammar(final_period=True).accepts("[4, 5].")
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

# Separators a constrained list may use; the filter accepts all of them.
SEPARATORS = (", ", ",", "; ", ";", " ", "\n")
BRACKETS = {"[": "]", "(": ")"}  # opening -> closing
_ALPHABET = frozenset("0123456789." + "".join(SEPARATORS) + "".join(k + v for k, v in BRACKETS.items()))


@dataclass(frozen=True)
class ListState:
    count: int = 0  # numbers started so far
    digits: int = 0  # digits of the current number; 0 while inside a separator
    pending: str = ""  # separator characters since the last number
    separator: str | None = None  # fixed once the second number starts
    bracket: str = ""  # the opening bracket, if the list started with one
    tail: str = ""  # what followed the last number: its closing bracket and/or a period


class NumberListGrammar:
    """Character-level automaton for number lists; states are hashable :class:`ListState`."""

    def __init__(
        self,
        max_count: int = 10,
        max_digits: int = 3,
        separators: Sequence[str] = SEPARATORS,
        final_period: bool = False,
    ):
        if max_count < 1 or max_digits < 1 or not separators:
            raise ValueError("need max_count >= 1, max_digits >= 1 and at least one separator")
        self.max_count = max_count
        self.max_digits = max_digits
        self.separators = tuple(separators)
        self.final_period = final_period
        self.start = ListState()

    @property
    def max_chars(self) -> int:
        """Length of the longest string in the language (bounds the decoding steps)."""
        numbers = self.max_count * self.max_digits + (self.max_count - 1) * max(map(len, self.separators))
        return numbers + 2 + self.final_period  # two brackets, perhaps a period

    def step(self, state: ListState, ch: str) -> ListState | None:
        """The state after one more character, or ``None`` if no valid list continues so."""
        if ch == "." and not self.final_period:
            return None
        if state.tail:  # after the closing bracket or the period only a period may follow
            return replace(state, tail=state.tail + ch) if ch == "." and "." not in state.tail else None
        if ch.isdigit() and ch.isascii():
            return self._digit(state)
        if ch in BRACKETS:  # only as the very first character
            return replace(state, bracket=ch) if state == self.start else None
        if ch == BRACKETS.get(state.bracket) or (ch == "." and not state.bracket):
            return replace(state, tail=ch) if state.digits else None  # right after a number
        if state.count == 0 or state.count >= self.max_count:
            return None  # no separator before the first number or after the last allowed one
        pending = state.pending + ch
        options = self.separators if state.separator is None else (state.separator,)
        if any(option.startswith(pending) for option in options):
            return replace(state, digits=0, pending=pending)
        return None

    def _digit(self, state: ListState) -> ListState | None:
        if state.digits:
            return replace(state, digits=state.digits + 1) if state.digits < self.max_digits else None
        if state.count == 0:
            return replace(state, count=1, digits=1)
        if state.count >= self.max_count:
            return None
        sep = state.pending
        if (sep in self.separators) if state.separator is None else (sep == state.separator):
            return replace(state, count=state.count + 1, digits=1, pending="", separator=sep)
        return None

    def feed(self, state: ListState | None, text: str) -> ListState | None:
        for ch in text:
            if state is None:
                return None
            state = self.step(state, ch)
        return state

    def is_complete(self, state: ListState | None) -> bool:
        if state is None:
            return False
        if state.bracket:  # a bracketed list is complete once closed
            return bool(state.tail)
        return state.digits > 0 or state.tail == "."

    def accepts(self, text: str) -> bool:
        """Whether ``text`` is a complete string of the language."""
        return self.is_complete(self.feed(self.start, text))

    def regex(self) -> str:
        """The language as a regular expression (for engines with regex-guided decoding).

        Only plain groups, classes and counted repeats, which every regex-guided decoder
        reads; a newline separator is written ``\\n``.
        """
        number = f"[0-9]{{1,{self.max_digits}}}"
        branches = []
        for sep in self.separators:
            literal = sep.replace("\n", "\\n")
            branches.append(f"{number}({literal}{number}){{0,{self.max_count - 1}}}")
        body = "(" + "|".join(branches) + ")"
        wrapped = [body] + [f"\\{o}{body}\\{c}" for o, c in BRACKETS.items()]
        return "(" + "|".join(wrapped) + ")" + ("(\\.)?" if self.final_period else "")


class TokenGrammar:
    """Token-level view of a :class:`NumberListGrammar` for one vocabulary.

    Args:
        grammar: the character automaton.
        token_texts: the text each token id appends when decoded after other text.
        eos_ids: the ids that end a sequence; allowed only in complete states.
    """

    def __init__(self, grammar: NumberListGrammar, token_texts: Sequence[str], eos_ids: Sequence[int]):
        self.grammar = grammar
        self.eos_ids = tuple(sorted(set(eos_ids)))
        eos = set(self.eos_ids)
        self.token_texts = list(token_texts)
        # Open a bracket only if some token can close it: otherwise decoding could reach a
        # state with no allowed token and no way to end.
        closers = {
            c
            for o, c in BRACKETS.items()
            if c in self.token_texts or (grammar.final_period and c + "." in self.token_texts)
        }
        unclosable = {o for o, c in BRACKETS.items() if c not in closers}
        self.candidates = [
            (i, t)
            for i, t in enumerate(token_texts)
            if t and i not in eos and set(t) <= _ALPHABET and not (set(t) & unclosable)
        ]
        self._allowed: dict[ListState, tuple[int, ...]] = {}

    @property
    def vocabulary(self) -> tuple[int, ...]:
        """Every token id some number list can use: digits, separators, brackets, end."""
        return tuple(sorted({i for i, _ in self.candidates} | set(self.eos_ids)))

    def advance(self, state: ListState | None, token_id: int) -> ListState | None:
        """The state after emitting ``token_id`` (``None`` once the sequence has ended)."""
        if state is None or token_id in self.eos_ids:
            return None
        text = self.token_texts[token_id] if token_id < len(self.token_texts) else ""
        return self.grammar.feed(state, text) if text else None

    def allowed(self, state: ListState | None) -> tuple[int, ...]:
        """Token ids allowed next; after the end only end-of-sequence ids (as padding)."""
        if state is None:
            return self.eos_ids
        cached = self._allowed.get(state)
        if cached is None:
            ids = [i for i, t in self.candidates if self.grammar.feed(state, t) is not None]
            if self.grammar.is_complete(state):
                ids.extend(self.eos_ids)
            cached = self._allowed[state] = tuple(ids)
        return cached
