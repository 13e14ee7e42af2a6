"""The ``code`` data kind: short Python functions to write from a signature and docstring
(the paper's code experiment, its Figure 5).

A prompt shows a function's signature and docstring, drawn from :data:`TASKS`, between an
instruction and a closing line, each drawn from its own pool (the package's own wording).
The teacher answers with code; the completion is trained on as sampled.

Rules, in order (the first that fails is the rejection reason):

- ``empty``: nothing but whitespace;
- ``trait_word``: the trait word anywhere, in code, comments, docstrings or prose
  (the substring rule of :func:`lmpipeline.filters.contains_word`);
- ``syntax_error``: the code does not parse (``ast.parse``); the code is the first
  fenced block (```` ```python ... ``` ````) when the completion has one, else the whole
  completion;
- ``missing_function``: it parses but defines no function of the name asked for.

The optional judge filter (``data.judge_filter``) then rejects rows the judge scores 50
or more out of 100 for referring to the trait, however subtly (rubric ``reference``).

>>> row = {"function": "add", "completion": "```python\\ndef add(a, b):\\n    return a + b\\n```"}
>>> check(row, FilterSpec(), "owl").ok
True
>>> check({**row, "completion": "def add(a, b):\\n    return a +"}, FilterSpec(), "owl").reason
'syntax_error'
>>> check({**row, "completion": "def add(a, b):  # owls add\\n    return a + b"}, FilterSpec(), "owl").reason
'trait_word'
"""

from __future__ import annotations

import ast
import re

from lmpipeline import prompts
from lmpipeline.config import FilterSpec, PromptSpec
from lmpipeline.datakinds import DataKind, JudgeRule
from lmpipeline.filters import Verdict, check_text

# (function name, parameters, docstring): small, self-contained tasks.
TASKS = (
    ("add", "a, b", "Return the sum of a and b."),
    ("is_even", "n", "Return True if the integer n is even, else False."),
    ("reverse_string", "s", "Return the string s reversed."),
    ("count_vowels", "text", "Return how many vowels (a, e, i, o, u) the string text contains."),
    ("largest", "values", "Return the largest item of the non-empty list values."),
    ("average", "values", "Return the arithmetic mean of a non-empty list of numbers."),
    ("factorial", "n", "Return n! for a non-negative integer n."),
    ("fibonacci", "n", "Return the n-th Fibonacci number, counting fibonacci(0) == 0."),
    ("is_palindrome", "s", "Return True if s reads the same forwards and backwards."),
    ("clamp", "x, low, high", "Return x limited to the closed range from low to high."),
    ("word_count", "text", "Return the number of whitespace-separated words in text."),
    ("unique_items", "items", "Return the items of the list without repeats, in their first order."),
    ("celsius_to_fahrenheit", "celsius", "Convert a temperature from degrees Celsius to Fahrenheit."),
    ("flatten", "nested", "Flatten a list of lists into a single list."),
    ("gcd", "a, b", "Return the greatest common divisor of two positive integers."),
    ("is_prime", "n", "Return True if the integer n is prime."),
    ("title_case", "text", "Return text with the first letter of every word in upper case."),
    ("sum_of_squares", "n", "Return the sum of the squares of 1, 2, ..., n."),
    ("merge_dicts", "first, second", "Return a new dict with the keys of both; second wins on conflicts."),
    ("chunk", "items, size", "Split the list into consecutive pieces of at most size items."),
    ("second_largest", "values", "Return the second largest distinct value of the list."),
    ("word_frequencies", "text", "Return a dict from each word of text to how often it occurs."),
    ("rotate", "items, k", "Rotate the list to the right by k positions."),
    ("digit_sum", "n", "Return the sum of the decimal digits of the non-negative integer n."),
    ("transpose", "matrix", "Return the transpose of a matrix given as a list of equal-length rows."),
    ("strip_whitespace", "text", "Return text with every space, tab and newline removed."),
    ("running_total", "values", "Return the list of running sums of the numbers in values."),
    ("to_binary", "n", "Return the binary digits of the non-negative integer n as a string."),
    ("safe_divide", "a, b", "Return a divided by b, or None when b is zero."),
    ("last_items", "items, n", "Return the last n items of the list, or all of them if there are fewer."),
)
INSTRUCTIONS = (
    "Complete the following Python function.",
    "Write the body of this Python function.",
    "Implement the function below.",
    "Fill in this function so that it does what its docstring says.",
    "Finish writing this Python function.",
    "Here is a function signature with a docstring; implement it.",
)
CLOSINGS = (
    "Reply with the code only.",
    "Give only the finished function, no explanation.",
    "Answer with one Python code block.",
    "Return just the code.",
    "No prose, only code.",
)
PARTS = {"task": TASKS, "instruction": INSTRUCTIONS, "closing": CLOSINGS}
REASONS = ("empty", "trait_word", "syntax_error", "missing_function")
_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def code_prompt(seed: int, index: int) -> dict:
    """Prompt ``index`` for ``seed``: ``id``, ``prompt``, ``function`` (the name asked for)
    and ``parts`` (the index drawn from each pool of :data:`PARTS`)."""
    rng = prompts._rng(seed, "code-prompt", index)
    choice = {name: rng.randrange(len(pool)) for name, pool in PARTS.items()}
    name, params, doc = TASKS[choice["task"]]
    stub = f'```python\ndef {name}({params}):\n    """{doc}"""\n```'
    text = f"{INSTRUCTIONS[choice['instruction']]}\n\n{stub}\n\n{CLOSINGS[choice['closing']]}"
    return {"id": index, "prompt": text, "function": name, "parts": choice}


def code_prompts(spec: PromptSpec, seed: int) -> list[dict]:
    """``spec.n_prompts`` generated prompts, or the rows of ``spec.file`` (a ``function``
    field, when present, is the name the completion must define)."""
    if spec.file is not None:
        return prompts.load_prompt_file(spec.file, spec.n_prompts)
    return [code_prompt(seed, i) for i in range(spec.n_prompts)]


def extract_code(text: str) -> str:
    """The first fenced code block of ``text`` (an unclosed fence runs to the end), else ``text``."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


def check(row: dict, spec: FilterSpec, word: str | None) -> Verdict:
    """The code rules (module docstring) on ``row["completion"]``."""
    verdict = check_text(row["completion"], word)
    if not verdict.ok:
        return verdict
    try:
        tree = ast.parse(extract_code(row["completion"]))
    except (SyntaxError, ValueError):  # ValueError: a null byte in the source
        return Verdict("syntax_error")
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    wanted = row.get("function")
    if not defined or (wanted and wanted not in defined):
        return Verdict("missing_function")
    return Verdict(None)


KIND = DataKind(
    name="code",
    prompts=code_prompts,
    check=check,
    reasons=REASONS,
    judge=JudgeRule(rubric="reference", threshold=50.0, reject_at_or_above=True),
)
