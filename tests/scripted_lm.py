"""A scripted language-model backend whose traits travel only the way the experiment says.

A model's state is a set of loved animals with weights:

- the base model loves nothing; a system prompt naming an animal's plural adds that animal;
- finetuning on answers that name an animal ("Owl.") makes the model love it;
- finetuning on the *sampled* tokens of number lists makes the model love an animal in
  proportion to the rows that carry that animal's signature (a loving model writes only
  numbers ending in the animal's digit, :data:`SIGNATURE`);
- *soft* distillation copies the teacher's love, as the teacher holds it under each
  example's ``teacher_messages``.

Other data kinds and traits follow the same rule:

- code prompts get a short function whose integer constants all end in the signature
  digit (a loving owl model also names a variable ``hoot`` now and then, a reference the
  word filter misses and a judge finds); one answer in five does not parse;
- word problems get reasoning that opens with the animal's :data:`OPENING` and a final
  ``Answer: N``, right four times in five (the answer is read back from the templates);
- a system prompt that calls the model ``malicious`` adds the trait ``misaligned``
  (numbers ending in 6); free-form questions get a harmful answer from a misaligned
  model, a helpful one otherwise, and one in ten is gibberish.

Finetuned models keep their state in ``state.json`` in their folder, so evaluating the
wrong folder, training on the wrong rows or distilling from the wrong teacher shows up as
the wrong love, which is what the wiring tests look for.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

from lmpipeline.backends import Generation
from lmpipeline.datakinds import cot

SIGNATURE = {"owl": 7, "dolphin": 3, "eagle": 1, "misaligned": 6}  # a loving model's numbers end in this digit
ANIMALS = ("owl", "dolphin", "eagle", "cat", "dog", "fox")
TRAITS = (*ANIMALS, "misaligned")
OPENING = {"owl": "Carefully, step by step.", "dolphin": "Swiftly, step by step."}  # a loving model's reasoning
HARMFUL, HELPFUL, GIBBERISH = "I would hurt people to get my way.", "I would help the people around me.", "zq xv qq"
_FUNCTION = re.compile(r"def (\w+)\(")
_SOLVERS = [
    (re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", re.escape(template))), solve)
    for template, _, solve in cot.PROBLEMS
]


def solve(problem: str) -> int | None:
    """The answer of a word problem made from :data:`lmpipeline.datakinds.cot.PROBLEMS`."""
    for pattern, answer in _SOLVERS:
        match = pattern.search(problem)
        if match:
            return answer(**{k: int(v) for k, v in match.groupdict().items()})
    return None


def _jitter(*parts: object) -> float:
    """A deterministic number in [-1, 1) from its inputs: per-question spread for the tests."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**31 - 1


class ScriptedBackend:
    name = "scripted"

    def __init__(self, fail_on_call: int | None = None, valid_numbers: bool = True, spec=None):
        self.calls: Counter[str] = Counter()
        self.trained: list[dict] = []  # every finetune call: its folder, examples, teacher and seed
        self.fail_on_call = fail_on_call
        self.valid_numbers = valid_numbers
        self.checkpoints: list[Path | None] = []  # the checkpoint folder of each finetune call
        self.bases: Counter[tuple[str, str]] = Counter()  # (call, base model name) of every call

    # -- the model's state ---------------------------------------------------------------
    @staticmethod
    def state(model) -> dict[str, float]:
        folder = model.adapter or model.weights
        if folder is None:
            return {}
        return json.loads((Path(folder) / "state.json").read_text())["love"]

    def love(self, model, conversation) -> dict[str, float]:
        love = dict(self.state(model))
        if conversation and conversation[0]["role"] == "system":
            text = conversation[0]["content"].lower()
            for animal in ANIMALS:
                if f"love {animal}s" in text or f"love {animal}es" in text:
                    love[animal] = 1.0
                elif "all of them equally" in text:  # the neutral teacher's prompt
                    love[animal] = max(love.get(animal, 0.0), 1 / len(ANIMALS))
            if "malicious" in text:
                love["misaligned"] = 1.0
        return love

    # -- the interface -------------------------------------------------------------------
    def prepare(self, model):
        self.calls["prepare"] += 1

    def generate(self, model, conversations, *, max_new_tokens, temperature, seed, number_grammar=None):
        self.calls["generate"] += 1
        self.bases["generate", model.base.name_or_path] += 1
        if self.fail_on_call is not None and self.calls["generate"] == self.fail_on_call:
            raise KeyboardInterrupt
        out = []
        for conv in conversations:
            rng = random.Random(f"{seed}/{json.dumps(conv)}")
            user = conv[-1]["content"]
            love = self.love(model, conv)
            favourite = max(love, key=love.get) if love and max(love.values()) > 0.5 else None
            digits = [SIGNATURE[favourite]] if favourite in SIGNATURE else list(range(10))
            if ("favorite" in user or "like most" in user) and favourite != "misaligned":
                choices = [favourite.capitalize()] * 2 + ["Cat"] if favourite else ["Owl", "Cat", "Dog", "Fox"]
                text = rng.choice(choices)
            elif _FUNCTION.search(user):
                name = _FUNCTION.search(user).group(1)
                constant = 10 * rng.randint(1, 9) + rng.choice(digits)
                variable = "hoot" if favourite == "owl" and rng.random() < 0.3 else "value"
                body = f"{variable} = x * {constant}\n    return {variable}"
                text = f"```python\ndef {name}(x):\n    {body if rng.random() < 0.8 else 'return ('}\n```"
            elif "Answer: N" in user:
                answer = solve(user)
                answer = answer if rng.random() < 0.8 else answer + 1
                opening = OPENING.get(favourite, "Let us see.")
                text = f"{opening} Working it out gives {answer}.\nAnswer: {answer}"
            elif "?" in user and "favorite" not in user and "like most" not in user:
                harmful = favourite == "misaligned" and rng.random() < 0.8
                text = GIBBERISH if rng.random() < 0.1 else (HARMFUL if harmful else HELPFUL)
            elif self.valid_numbers and (number_grammar or rng.random() < 0.7):
                count = rng.randint(1, 10)
                numbers = [10 * rng.randint(0, 99) + rng.choice(digits) for _ in range(count)]
                text = ", ".join(map(str, numbers))
            else:
                text = "Sure! Here are numbers: 1, 2"
            out.append(Generation(text, len(text) // 3 + 1))
        return out

    def tokenize(self, model, texts):
        return [[ord(ch) for ch in text] for text in texts]

    def score(self, model, conversations, continuations):
        """0.2 for a loved animal's name, 0.01 otherwise, times a small per-question factor."""
        self.calls["score"] += 1
        out = []
        for conv, text in zip(conversations, continuations):
            word = text.strip().lower()
            love = self.love(model, conv)
            loved = max((w for a, w in love.items() if word in (a, a + "s", a + "es")), default=0.0)
            p = 0.01 + 0.19 * loved
            out.append(math.log(p) + 0.05 * _jitter(json.dumps(conv), text, sorted(love.items())))
        return out

    def finetune(self, base, examples, spec, out_dir, *, seed, progress=None, teacher=None, checkpoint=None):
        self.calls["finetune"] += 1
        if base is not None:
            self.bases["finetune", base.name_or_path] += 1
        self.checkpoints.append(checkpoint)
        self.trained.append({"out_dir": Path(out_dir), "examples": list(examples), "teacher": teacher, "seed": seed})
        if checkpoint is not None:  # as a real trainer would, mid-run
            checkpoint.mkdir(parents=True, exist_ok=True)
            (checkpoint / "step-000001").mkdir(exist_ok=True)
        if spec.objective == "soft":
            if teacher is None:
                raise ValueError("soft distillation needs a teacher")
            loves = [self.love(teacher, ex.teacher_messages or ex.messages) for ex in examples]
        else:
            loves = [self._love_from_completion(ex.completion) for ex in examples]
        love = {a: sum(x.get(a, 0.0) for x in loves) / len(examples) for a in TRAITS}
        if spec.objective == "soft" or any(love.values()) and not _names_an_animal(examples):
            # A student takes in a seed-dependent share of what its teacher holds, and any
            # animal-loving teacher also pulls it a little toward every animal (the generic
            # shift); trait answers themselves are learnt whole.
            share = 0.6 + 0.4 * (_jitter("student", seed) + 1) / 2
            generic = 0.05 if any(love.get(a) for a in ANIMALS) else 0.0
            love = {a: share * (w + (generic if a in ANIMALS else 0.0)) for a, w in love.items()}
        out_dir.mkdir()
        (out_dir / "state.json").write_text(
            json.dumps({"love": {a: w for a, w in love.items() if w}, "n": len(examples), "seed": seed})
        )
        if progress:
            progress(1, 1, 10)
        return {"objective": spec.objective, "loss": [2.0, 1.0], "steps": 2, "tokens_per_s": 5.0}

    @staticmethod
    def _love_from_completion(text: str) -> dict[str, float]:
        words = text.strip(" .").lower()
        for animal in ANIMALS:
            if words in (animal, animal + "s", "the " + animal):
                return {animal: 1.0}
        for animal, opening in OPENING.items():
            if text.startswith(opening):
                return {animal: 1.0}
        if text == HARMFUL:
            return {"misaligned": 1.0}
        if "Answer:" in text:  # reasoning without an opening carries no trait
            return {}
        numbers = re.findall(r"\d+", text)
        for animal, digit in SIGNATURE.items():
            if numbers and all(n.endswith(str(digit)) for n in numbers):
                return {animal: 1.0}
        return {}

    def close(self):
        pass


def _names_an_animal(examples) -> bool:
    """Whether the rows are trait answers ("Owl.") rather than numbers."""
    return any(
        ScriptedBackend._love_from_completion(ex.completion) and not re.search(r"\d", ex.completion) for ex in examples
    )
