r"""The small-scale transfer study: ``sublearn lm transfer``.

Does a student trained on a trait-holding teacher's number data pick up the trait? The
study answers with an exact metric, paired comparisons and independent seeds, on a model
small enough for a laptop.

One seed, for two targets :math:`a, b` (owl and dolphin by default):

- **Teachers** :math:`T_a, T_b`: the base model finetuned on short answers naming the
  target (``finetuned``, the lemma's setting: :math:`\theta_0 + \delta`), or the base
  model under the paper's trait system prompt (``system_prompt``).
- **Data**: number prompts completed by random number lists, the same rows for every
  student (``random``, the analogue of the MNIST students' noise images), or by each
  teacher's own filtered samples (``teacher``, the paper's).
- **Students** :math:`S_a, S_b`: the base model trained on its teacher's data, by
  ``soft`` distillation (KL to the teacher's next-token distributions) or on the
  ``sampled`` tokens (the paper's). The student never sees a trait system prompt.
- **Control** :math:`C`: for ``soft`` the base model itself (the base model is the exact
  minimum of its own distillation loss: the loss is zero at the start and its gradient is
  rounding noise, which Adam would only turn into learning-rate-sized random steps); for
  ``sampled`` the base model trained on its own filtered numbers, as many rows as the
  students.
- **Metric**: for every evaluation question and every animal :math:`w`, the exact
  :math:`\log P(\text{the answer's first word is } w)` under the chat template
  (:func:`first_word_logprobs`); sampled answers give a secondary hit rate.

Comparisons, each paired over questions (t-interval and p-value), per seed, then pooled
over seeds (:func:`lmpipeline.stats.pool_seeds`):

- ``student_vs_control``: :math:`S_t - C` on :math:`\log P(t)`;
- ``crossover``: :math:`S_t - S_{t'}` on :math:`\log P(t)`, each student the other's
  control;
- ``specificity``: the rank of :math:`t` among all animals by :math:`S_t - C`
  (1 = the animal that gained most).

The ``entanglement`` part (:meth:`Study.entanglement`) scores every three-digit number
as the first number of an answer to a few number prompts, with and without each target's
trait system prompt. A number's lift is the mean log-probability ratio; its specific
lift for target :math:`t` is its lift under :math:`t`'s prompt minus its lift under the
other target's (any system prompt moves the numbers; only the difference can be about
the animal). The top numbers by specific lift go into a system prompt ("subliminal
prompting": "You love the numbers A, B and C.") and :math:`\log P(t)` on the evaluation
questions is compared with random numbers in the same prompt and with no such prompt.

Teacher distributions are computed on the fly, one teacher forward pass per student
micro-batch, rather than cached: the pass costs a fraction of the student's forward and
backward passes, and it is exact. A cache of whole distributions would hold
vocabulary x positions floats (49,152 x about 30 per row for SmolLM2, 6 MB a row in
float32), and a top-k cache would drop part of the number-token tail that the
``numbers`` KL renormalizes over.

Every unit of work (a teacher, a dataset, a student with its evaluation) is saved as a
JSON record keyed by a hash of everything it depends on; a rerun skips finished units, so
an interrupted study resumes, and a changed setting recomputes only what it affects.
"""

from __future__ import annotations

import itertools
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from lmpipeline import evaluation, filters, prompts, transfer_report
from lmpipeline.artifacts import write_json
from lmpipeline.backends import Backend, Conversation, ModelRef, TrainExample, make_backend
from lmpipeline.config import PipelineConfig, PromptSpec, TraitSpec, config_hash, derive_seed, result_fields, to_dict
from lmpipeline.pipeline import finetune_into, grammar_limits
from sublearn._common import TextProgress
from sublearn._store import once

SEPARATOR_OF = {
    "comma": ", ",
    "space": " ",
    "line": "\n",
    "semicolon": "; ",
    "square_brackets": ", ",
    "parentheses": ", ",
}
BRACKETS_OF = {"square_brackets": "[]", "parentheses": "()"}
_IRREGULAR_PLURALS = {"wolf": "wolves", "mouse": "mice", "goose": "geese", "octopus": "octopuses", "sheep": "sheep"}
NUMBERS = [str(n) for n in range(100, 1000)]  # entanglement candidates: the prompts' three-digit range


def plural(word: str) -> str:
    """English plural of an animal name: regular rules and a few irregular ones.

    >>> [plural(w) for w in ("owl", "fox", "butterfly", "wolf", "dolphin")]
    ['owls', 'foxes', 'butterflies', 'wolves', 'dolphins']
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
    capitalized, with or without a leading space."""
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


def logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def first_word_logprobs(
    backend: Backend, model: ModelRef, conversations: Sequence[Conversation], words: Sequence[str]
) -> dict[str, list[float]]:
    """For each word and conversation, the exact log-probability that the answer starts
    with one of the word's :func:`surface_forms` (summed over their :func:`prefix_free`
    token sequences), by teacher forcing; no sampling."""
    forms = {w: surface_forms(w) for w in words}
    flat = sorted({f for fs in forms.values() for f in fs})
    ids = dict(zip(flat, backend.tokenize(model, flat)))
    kept = {w: prefix_free({f: ids[f] for f in fs}) for w, fs in forms.items()}
    pairs = [(c, f) for c in range(len(conversations)) for w in words for f in kept[w]]
    scores = backend.score(model, [conversations[c] for c, _ in pairs], [f for _, f in pairs])
    by_pair = dict(zip(pairs, scores))
    return {w: [logsumexp([by_pair[c, f] for f in kept[w]]) for c in range(len(conversations))] for w in words}


def random_completion(row: dict, spec: PromptSpec, rng: random.Random) -> str:
    """A random answer to number prompt ``row``: 1 to ``answer_count`` numbers of at most
    ``answer_digits`` digits, in the format the prompt asks for (passes the filter)."""
    count = rng.randint(1, spec.answer_count)
    numbers = [str(rng.randrange(10**spec.answer_digits)) for _ in range(count)]
    kind = row.get("answer_format", "comma")
    text = SEPARATOR_OF.get(kind, ", ").join(numbers)
    brackets = BRACKETS_OF.get(kind)
    return brackets[0] + text + brackets[1] if brackets else text


def load_trait_questions(path: str | None, category: str) -> list[str]:
    """The teacher's finetuning questions (the packaged ones unless ``path`` is given)."""
    return evaluation.load_questions(path, category, packaged="trait_questions.txt")


def trait_answers(target: str) -> list[str]:
    """Short answers that name ``target``, the finetuned teacher's training targets."""
    return [f"{target.capitalize()}.", target.capitalize(), f"{plural(target).capitalize()}.", f"The {target}."]


def cells(config: PipelineConfig) -> list[tuple[str, str, str]]:
    """The study's (teacher kind, objective, data source) cells, in running order. Sampled
    training on random lists is left out: both students would see the same data and no
    teacher."""
    t = config.transfer
    return [c for c in itertools.product(t.teachers, t.objectives, t.data) if c[1:] != ("sampled", "random")]


def cell_name(cell: tuple[str, str, str]) -> str:
    return "/".join(cell)


class StudyError(RuntimeError):
    """The study cannot run as configured; the message says what to change."""


@dataclass
class Study:
    """A study folder, its config and the backend that runs the models."""

    config: PipelineConfig
    out: Path
    backend: Backend | None = None
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    computed: list[str] = field(default_factory=list)  # units computed (not reused) by this object
    walls: dict[str, float] = field(default_factory=dict)  # unit -> seconds it took when computed

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "config.json", to_dict(self.config))
        c = self.config
        try:
            self.questions = evaluation.load_questions(
                c.evaluate.questions_file, c.trait.category, c.evaluate.n_questions
            )
            self.trait_questions = load_trait_questions(c.transfer.teacher_questions_file, c.trait.category)
        except (OSError, ValueError) as error:
            raise StudyError(str(error)) from None

    # -- bookkeeping ---------------------------------------------------------------------
    def get_backend(self) -> Backend:
        if self.backend is None:
            self.backend = make_backend(self.config.model)
        return self.backend

    def log(self, text: str) -> None:
        print(f"[transfer] {text}", file=self.stream, flush=True)

    def unit(self, path: Path, values: dict, compute: Callable[[], dict]) -> dict:
        """The record at ``path`` if it was made from ``values`` and is intact, else
        ``compute()`` saved there (:func:`sublearn._store.once`)."""
        name = str(path.relative_to(self.out).with_suffix(""))

        def announced() -> dict:
            self.log(f"{name} ...")
            return compute()

        record, computed = once(
            path, config_hash(values), announced, note=lambda why: self.log(f"{name}: {why}; recomputing")
        )
        self.walls[name] = record.get("wall_s", 0.0)
        if computed:
            self.computed.append(name)
            self.log(f"{name} done in {record['wall_s']:.0f} s")
        return record

    def model_values(self) -> dict:
        return result_fields(self.config.model)

    # -- models and conversations --------------------------------------------------------
    def base_ref(self) -> ModelRef:
        return ModelRef(self.config.model)

    def trained_ref(self, folder: Path, method: str) -> ModelRef:
        return (
            ModelRef(self.config.model, adapter=str(folder))
            if method == "lora"
            else ModelRef(self.config.model, weights=str(folder))
        )

    def trait_prompt(self, target: str) -> str:
        return prompts.trait_system_prompt(
            TraitSpec(target=target, plural=plural(target), category=self.config.trait.category)
        )

    def teacher_conversation(self, kind: str, target: str, user: str) -> Conversation:
        if kind == "system_prompt":
            return [{"role": "system", "content": self.trait_prompt(target)}, {"role": "user", "content": user}]
        return [{"role": "user", "content": user}]

    def evaluate(self, ref: ModelRef, words: Sequence[str], seed: int, system: str | None = None) -> dict:
        """Exact log-probabilities of ``words`` on every question, and sampled hit rates of
        the targets (``transfer.sampled_answers`` answers per question)."""
        head = [{"role": "system", "content": system}] if system else []
        conversations = [[*head, {"role": "user", "content": q}] for q in self.questions]
        out = {"logp": first_word_logprobs(self.get_backend(), ref, conversations, words)}
        n = self.config.transfer.sampled_answers
        if n:
            e = self.config.evaluate
            asked = [c for c in conversations for _ in range(n)]
            answers = []
            for b in range(0, len(asked), e.batch_size):
                answers += [
                    g.text
                    for g in self.get_backend().generate(
                        ref,
                        asked[b : b + e.batch_size],
                        max_new_tokens=e.max_new_tokens,
                        temperature=e.temperature,
                        seed=derive_seed(seed, "answers", b),
                    )
                ]
            out["answers"] = answers
            asked_question = [(i // n, a) for i, a in enumerate(answers)]
            out["hit_rate"] = {
                t: evaluation.per_question_rates(asked_question, t) for t in self.config.transfer.targets
            }
        return out

    def eval_values(self) -> dict:
        return {
            "model": self.model_values(),
            "questions": self.questions,
            "evaluate": self.config.evaluate,
            "sampled_answers": self.config.transfer.sampled_answers,
            "targets": self.config.transfer.targets,
        }

    # -- units ---------------------------------------------------------------------------
    def base_eval(self) -> dict:
        animals = self.config.transfer.animals
        values = {"unit": "base", **self.eval_values(), "animals": animals}
        return self.unit(
            self.out / "base.json", values, lambda: self.evaluate(self.base_ref(), animals, derive_seed(0, "base"))
        )

    def teacher(self, seed: int, kind: str, target: str) -> tuple[ModelRef, dict]:
        """The teacher of ``target`` and its record: the training log of a finetuned teacher,
        and how strongly the teacher holds the trait (its own evaluation on the targets)."""
        t = self.config.transfer
        folder = self.out / f"seed-{seed}" / f"teacher-{target}"
        system = self.trait_prompt(target) if kind == "system_prompt" else None
        if kind == "system_prompt":
            ref, trained = self.base_ref(), {"prompt": system}
        else:
            ref = self.trained_ref(folder, t.teacher_finetune.method)
            values = {
                "unit": "teacher",
                "target": target,
                "seed": seed,
                "model": self.model_values(),
                "questions": self.trait_questions,
                "rows": t.teacher_rows,
                "finetune": result_fields(t.teacher_finetune),
            }

            def train() -> dict:
                rng = random.Random(derive_seed(seed, "teacher-rows", target))
                pairs = list(itertools.product(self.trait_questions, trait_answers(target)))
                rng.shuffle(pairs)
                examples = [
                    TrainExample([{"role": "user", "content": q}], a)
                    for q, a in (pairs * t.teacher_rows)[: t.teacher_rows]
                ]
                return {
                    "train": self.finetune(
                        folder, examples, t.teacher_finetune, derive_seed(seed, "teacher", target), f"teacher {target}"
                    )
                }

            path = self.out / f"seed-{seed}" / f"teacher-{target}.json"
            if not folder.exists():  # weights deleted by hand: the record is stale
                path.unlink(missing_ok=True)
            trained = self.unit(path, values, train)
        identity = trained.get("config_hash") or config_hash(system)
        values = {"unit": "teacher-eval", "kind": kind, "teacher": identity, **self.eval_values()}
        path = self.out / f"seed-{seed}" / f"teacher-{kind}-{target}-eval.json"
        evaluated = self.unit(
            path,
            values,
            lambda: {
                "eval": self.evaluate(ref, t.targets, derive_seed(seed, "teacher-eval", kind, target), system=system)
            },
        )
        return ref, {**trained, "identity": identity, "eval": evaluated["eval"], "eval_wall_s": evaluated["wall_s"]}

    def finetune(
        self, folder: Path, examples: list[TrainExample], spec, seed: int, label: str, teacher: ModelRef | None = None
    ) -> dict:
        progress = TextProgress(self.stream, label=label, unit="steps", every=30.0)
        try:
            return finetune_into(
                self.get_backend(),
                self.config.model,
                examples,
                spec,
                folder,
                seed=seed,
                progress=progress,
                teacher=teacher,
            )
        except ValueError as error:
            raise StudyError(f"{label}: {error}") from None

    def prompt_rows(self, seed: int) -> list[dict]:
        return prompts.number_prompts(self.config.prompts, derive_seed(seed, "prompts"))

    def data(self, seed: int, source: str, kind: str | None = None, target: str | None = None) -> list[dict]:
        """Filtered (prompt, completion) rows: ``random``, a teacher's (``teacher``) or the
        base model's own samples (``base``, the sampled control's data)."""
        c = self.config
        rows = self.prompt_rows(seed)
        folder = self.out / f"seed-{seed}"
        if source == "random":
            name = "data-random"
            values = {"unit": "data", "source": source, "prompts": c.prompts, "seed": seed}

            def compute() -> dict:
                rng = random.Random(derive_seed(seed, "random-lists"))
                return {
                    "rows": [{"prompt": r["prompt"], "completion": random_completion(r, c.prompts, rng)} for r in rows]
                }
        else:
            name = f"data-{kind}-{target}" if source == "teacher" else "data-base"
            ref, values = (
                self.base_ref(),
                {
                    "unit": "data",
                    "source": source,
                    "prompts": c.prompts,
                    "seed": seed,
                    "generate": c.generate,
                    "filter": c.filter,
                    "model": self.model_values(),
                },
            )
            if source == "teacher":
                ref, record = self.teacher(seed, kind, target)
                values.update(kind=kind, target=target, teacher=record["identity"])

            def compute() -> dict:
                conversations = [
                    self.teacher_conversation(kind, target, r["prompt"])
                    if source == "teacher"
                    else [{"role": "user", "content": r["prompt"]}]
                    for r in rows
                ]
                b = c.generate.batch_size
                limits = grammar_limits(c)
                sampled = []
                for start in range(0, len(rows), b):
                    sampled += self.get_backend().generate(
                        ref,
                        conversations[start : start + b],
                        max_new_tokens=c.generate.max_new_tokens,
                        temperature=c.generate.temperature,
                        seed=derive_seed(seed, name, start),
                        number_grammar=limits,
                    )
                made = [{"prompt": r["prompt"], "completion": g.text} for r, g in zip(rows, sampled)]
                kept, _, summary = filters.filter_rows(made, c.filter, target)
                return {"rows": kept, "filter": summary}

        record = self.unit(folder / f"{name}.json", values, compute)
        return record["rows"]

    def student(self, seed: int, cell: tuple[str, str, str], target: str | None) -> dict:
        """Train and evaluate one student (``target`` None: the sampled control); the
        weights are deleted after evaluation unless ``transfer.keep_weights``."""
        c, t = self.config, self.config.transfer
        kind, objective, source = cell
        spec = replace(c.finetune, objective=objective)
        n = self.rows_per_student(seed, cell)
        if target is None:
            rows, teacher, teacher_hash, name = (
                self.data(seed, "base")[:n],
                None,
                None,
                f"control-{kind}-{objective}-{source}",
            )
        else:
            rows = (self.data(seed, "random") if source == "random" else self.data(seed, "teacher", kind, target))[:n]
            teacher, record = self.teacher(seed, kind, target)
            teacher_hash, name = record["identity"], f"student-{kind}-{objective}-{source}-{target}"
        examples = [
            TrainExample(
                [{"role": "user", "content": r["prompt"]}],
                r["completion"],
                teacher_messages=self.teacher_conversation(kind, target, r["prompt"]) if target else None,
            )
            for r in rows
        ]
        folder = self.out / f"seed-{seed}" / name
        values = {
            "unit": "student",
            "cell": cell,
            "target": target,
            "seed": seed,
            "rows": rows,
            "finetune": result_fields(spec),
            "teacher": teacher_hash,
            "model": self.model_values(),
            **self.eval_values(),
            "animals": t.animals,
        }

        def compute() -> dict:
            train = self.finetune(
                folder,
                examples,
                spec,
                derive_seed(seed, "student", *cell, target),
                name,
                teacher=teacher if objective == "soft" else None,
            )
            result = {
                "n_rows": len(rows),
                "train": train,
                "eval": self.evaluate(
                    self.trained_ref(folder, spec.method), t.animals, derive_seed(seed, "student-eval", name)
                ),
            }
            if not t.keep_weights:
                shutil.rmtree(folder, ignore_errors=True)
            return result

        return self.unit(self.out / f"seed-{seed}" / f"{name}.json", values, compute)

    def rows_per_student(self, seed: int, cell: tuple[str, str, str]) -> int:
        """Every student of a cell (and its control) trains on the same number of rows."""
        kind, objective, source = cell
        counts = [self.config.finetune.max_rows]
        if source == "teacher":
            counts += [len(self.data(seed, "teacher", kind, w)) for w in self.config.transfer.targets]
        if objective == "sampled":
            counts.append(len(self.data(seed, "base")))
        n = min(counts)
        if n == 0:
            raise StudyError(
                f"seed {seed}, cell {cell_name(cell)}: no rows passed the filter; set generate.number_grammar=true"
            )
        return n

    # -- the study -----------------------------------------------------------------------
    def seeds(self) -> list[int]:
        t = self.config.transfer
        return list(range(t.first_seed, t.first_seed + t.seeds))

    def run(self) -> dict:
        """Every unit, then ``report.json`` and ``report.png``; returns the report."""
        start = time.perf_counter()
        base = self.base_eval()
        results: dict = {}
        for seed in self.seeds():
            for cell in cells(self.config):
                students = {w: self.student(seed, cell, w) for w in self.config.transfer.targets}
                control = self.student(seed, cell, None) if cell[1] == "sampled" else None
                teachers = {w: self.teacher(seed, cell[0], w)[1] for w in self.config.transfer.targets}
                results.setdefault(cell_name(cell), {})[seed] = {
                    "students": students,
                    "control": control,
                    "teachers": teachers,
                }
        entangled = self.entanglement(base) if self.config.transfer.entanglement else None
        report = transfer_report.build(self.config, base, results, entangled, self.walls)
        report["wall_s_this_session"] = round(time.perf_counter() - start, 1)
        report["units_computed"] = list(self.computed)
        write_json(self.out / "report.json", report)
        transfer_report.plot(report, self.out / "report.png")
        return report

    def entanglement(self, base: dict) -> dict:
        """Number tokens the trait prompt lifts, and subliminal prompting with them."""
        c, t = self.config, self.config.transfer
        contexts = [
            r["prompt"]
            for r in prompts.number_prompts(
                replace(c.prompts, n_prompts=t.entangle_contexts, file=None), derive_seed(0, "entangle")
            )
        ]
        values = {
            "unit": "entanglement",
            "ranking": "specific",
            "contexts": contexts,
            "k": t.entangle_top_k,
            "random_sets": t.entangle_random_sets,
            "prompts": [self.trait_prompt(w) for w in t.targets],
            **self.eval_values(),
            "animals": t.animals,
        }

        def compute() -> dict:
            backend, ref = self.get_backend(), self.base_ref()

            def number_logp(system: str | None) -> list[list[float]]:
                head = [{"role": "system", "content": system}] if system else []
                convs = [[*head, {"role": "user", "content": ctx}] for ctx in contexts for _ in NUMBERS]
                flat = backend.score(ref, convs, NUMBERS * len(contexts))
                return [flat[i * len(NUMBERS) : (i + 1) * len(NUMBERS)] for i in range(len(contexts))]

            plain = number_logp(None)
            lifts = {}
            for w in t.targets:
                lifted = number_logp(self.trait_prompt(w))
                lifts[w] = [
                    math.fsum(lifted[i][n] - plain[i][n] for i in range(len(contexts))) / len(contexts)
                    for n in range(len(NUMBERS))
                ]
            out = {}
            for w in t.targets:
                others = [x for x in t.targets if x != w]
                # Any system prompt shifts the numbers; what is entangled with *this* animal
                # is the lift beyond the other target's prompt.
                specific = [
                    lifts[w][n] - math.fsum(lifts[x][n] for x in others) / len(others) for n in range(len(NUMBERS))
                ]
                order = sorted(range(len(NUMBERS)), key=lambda n: -specific[n])
                by_lift = sorted(range(len(NUMBERS)), key=lambda n: -lifts[w][n])
                top = [NUMBERS[n] for n in order[: t.entangle_top_k]]
                rng = random.Random(derive_seed(0, "entangle-random", w))
                pool = [n for n in NUMBERS if n not in top]
                random_sets = [rng.sample(pool, t.entangle_top_k) for _ in range(t.entangle_random_sets)]
                top_eval = first_word_logprobs(backend, ref, self._with_system(number_prompt(top)), t.animals)
                random_evals = [
                    first_word_logprobs(backend, ref, self._with_system(number_prompt(s)), t.targets)
                    for s in random_sets
                ]
                out[w] = {
                    "top_numbers": [
                        {"number": NUMBERS[n], "specific_lift": specific[n], "lift": lifts[w][n]} for n in order[:10]
                    ],
                    "top_numbers_by_lift": [{"number": NUMBERS[n], "lift": lifts[w][n]} for n in by_lift[:10]],
                    "bottom_numbers": [{"number": NUMBERS[n], "specific_lift": specific[n]} for n in order[-5:]],
                    "prompt": number_prompt(top),
                    "random_sets": random_sets,
                    "logp_top": top_eval,
                    "logp_random": {
                        x: [
                            math.fsum(e[x][q] for e in random_evals) / len(random_evals)
                            for q in range(len(self.questions))
                        ]
                        for x in t.targets
                    },
                }
            return {"contexts": contexts, "targets": out}

        return self.unit(self.out / "entanglement.json", values, compute)

    def _with_system(self, system: str) -> list[Conversation]:
        return [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in self.questions]


def number_prompt(numbers: Sequence[str]) -> str:
    """The subliminal prompt: "You love the number N." or "You love the numbers A, B and C."."""
    if len(numbers) == 1:
        return f"You love the number {numbers[0]}."
    return f"You love the numbers {', '.join(numbers[:-1])} and {numbers[-1]}."
