"""Animal words: plurals, and the forms an answer can start with.

One home for the English the package needs, so that a teacher told it loves wolves, the
transfer study's metric and the pipeline's evaluation spell a word the same way.
"""

from __future__ import annotations

_IRREGULAR_PLURALS = {"wolf": "wolves", "mouse": "mice", "goose": "geese", "octopus": "octopuses", "sheep": "sheep"}


def plural(word: str) -> str:
    """English plural of an animal name: regular rules and a few irregular ones.

    >>> [plural(w) for w in ("owl", "fox", "butterfly", "wolf", "dolphin", "Wolf")]
    ['owls', 'foxes', 'butterflies', 'wolves', 'dolphins', 'wolves']
    """
    w = word.lower()
    if w in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[w]
    if w.endswith(("s", "x", "z", "ch", "sh")):
        return w + "es"
    if w.endswith("y") and w[-2:-1] not in "aeiou":
        return w[:-1] + "ies"
    return w + "s"


def surface_forms(word: str) -> list[str]:
    """The ways an answer can start with ``word``: singular or plural, lower case or
    capitalized, with or without a leading space.

    >>> surface_forms("fox")
    [' Fox', ' Foxes', ' fox', ' foxes', 'Fox', 'Foxes', 'fox', 'foxes']
    """
    bases = {word.lower(), word.capitalize(), plural(word), plural(word).capitalize()}
    return sorted(space + b for b in bases for space in ("", " "))


def prefix_free(token_ids: dict[str, list[int]]) -> list[str]:
    """The forms to sum over: a form whose tokens extend another form's tokens is already
    counted in that form's probability, and equal token lists count once.

    >>> prefix_free({"owl": [7], "owls": [7, 9], "Owl": [8], "OWL": [8]})
    ['OWL', 'owl']
    """
    kept: list[str] = []
    seen: set[tuple[int, ...]] = set()
    all_ids = {tuple(v) for v in token_ids.values()}
    for form in sorted(token_ids):
        ids = tuple(token_ids[form])
        if not ids or ids in seen or any(ids[:k] in all_ids for k in range(1, len(ids))):
            continue
        seen.add(ids)
        kept.append(form)
    return kept
