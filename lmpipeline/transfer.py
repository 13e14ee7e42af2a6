r"""The small-scale transfer study: ``sublearn lm transfer``.

Does a student trained on a trait-holding teacher's number data pick up the teacher's
*own* trait, beyond a general pull toward the kind of answer the teacher gives? The study
answers with an exact metric, a neutral control, a panel of targets and independent seeds,
on a model small enough for a laptop.

One seed, for targets :math:`t_1, \dots, t_k` (the paper's five animals by default):

- **Teachers** :math:`T_t`: the base model finetuned on short answers naming :math:`t`
  (``finetuned``, the lemma's setting: :math:`\theta_0 + \delta`), or the base model
  under the paper's trait system prompt (``system_prompt``).
- **The neutral teacher** :math:`T_\varnothing`: made exactly like the target teachers
  (the same questions in the same order, the same answer forms, rows, steps, learning rate
  and seeds), its answers naming every animal of ``transfer.animals`` equally often; for
  the system-prompt kind, a system prompt that loves animals with no favourite. It holds
  "answer with an animal" without any one animal. Answers spread evenly, rather than drawn
  from the base model's own preferences, treat every reported animal alike, so the
  neutral student is the same control for every target, including targets of a user's
  own choosing.
- **Data**: number prompts completed by random number lists, the same rows for every
  student of a seed (``random``, the analogue of the MNIST students' noise images), or by
  each teacher's own filtered samples (``teacher``, the paper's).
- **Students** :math:`S_t, S_\varnothing`: the base model trained on its teacher's data,
  by ``soft`` distillation (KL to the teacher's next-token distributions) or on the
  ``sampled`` tokens (the paper's). The student never sees a trait system prompt.
- **Base control** :math:`C`: for ``soft`` the base model itself (the exact minimum of its
  own distillation loss); for ``sampled`` the base model trained on its own filtered
  numbers, as many rows as the students.
- **Metric**: for every evaluation question and every animal :math:`a`, the exact
  :math:`\log P(\text{the answer's first word is } a)` under the chat template
  (:func:`first_word_logprobs`); sampled answers give a secondary hit rate.

Comparisons, for each target :math:`t` (all on :math:`\log P`, natural log):

- ``vs_neutral``: :math:`S_t(t) - S_\varnothing(t)`, the headline;
- ``vs_control``: :math:`S_t(t) - C(t)`;
- ``crossover``: :math:`S_t(t) - \frac{1}{k-1}\sum_{u \ne t} S_u(t)`, the k-way crossover;
- ``specificity``: the target's gain minus the mean gain of every other animal,
  :math:`g(t) - \frac{1}{|A|-1}\sum_{a \ne t} g(a)` with
  :math:`g(a) = S_t(a) - S_\varnothing(a)`; with its rank among the animals.

The seed is the unit: each comparison is one number per seed (its mean over questions),
and the headline is the mean over seeds with a t-interval and a t-test over seeds
(:mod:`lmpipeline.transfer_report`).

The ``entanglement`` part (:meth:`Study.entanglement`) scores every three-digit number
as the first number of an answer to a few number prompts, with and without each target's
trait system prompt. A number's lift is the mean log-probability ratio; its specific
lift for target :math:`t` is its lift under :math:`t`'s prompt minus its mean lift under
the other targets' (any system prompt moves the numbers; only the difference can be about
the animal). The top numbers by specific lift go into a system prompt ("subliminal
prompting": "You love the numbers A, B and C.") and :math:`\log P(t)` on the evaluation
questions is compared with random numbers in the same prompt and with no such prompt.

Teacher distributions are computed on the fly, one teacher forward pass per student
micro-batch, rather than cached: it is exact, and the teacher sees each row once per
epoch either way.

Every unit of work (a teacher, a dataset, a student with its evaluation) is saved as a
JSON record keyed by a hash of everything it depends on; a rerun skips finished units, so
an interrupted study resumes, and a changed setting recomputes only what it affects.
Units are grouped into jobs (a teacher with its evaluation and data; a teacher's
students), which ``transfer.workers`` processes run at once, each with its own model.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from lmpipeline import datakinds, evaluation, prompts, transfer_report
from lmpipeline.artifacts import write_json
from lmpipeline.backends import Backend, Conversation, ModelRef, TrainExample, make_backend
from lmpipeline.config import (
    NEUTRAL,
    PipelineConfig,
    PromptSpec,
    TraitSpec,
    config_hash,
    derive_seed,
    from_dict,
    result_fields,
    to_dict,
)
from lmpipeline.evaluation import first_word_logprobs
from lmpipeline.pipeline import finetune_into, grammar_limits
from lmpipeline.words import plural
from sublearn._common import TextProgress, UserError
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
NUMBERS = [str(n) for n in range(100, 1000)]  # entanglement candidates: the prompts' three-digit range
CONTROL = "control"  # the sampled objective's base control, in job names


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


def teacher_rows(
    questions: Sequence[str], who: str, animals: Sequence[str], n_rows: int, seed: int
) -> list[tuple[str, str]]:
    """A finetuned teacher's (question, answer) rows.

    Every teacher of a seed gets the same questions in the same order with the same answer
    forms; only the animal differs: ``who`` for a target's teacher, and for the
    :data:`~lmpipeline.config.NEUTRAL` teacher every animal of ``animals`` in turn (a
    seeded order), so each is named ``n_rows / len(animals)`` times, give or take one.

    >>> rows = teacher_rows(["Q1?", "Q2?"], "neutral", ["owl", "cat"], 4, seed=0)
    >>> sorted(a.rstrip(".").lower().removeprefix("the ") for _, a in rows)
    ['cat', 'cat', 'owl', 'owl']
    >>> [q for q, _ in rows] == [q for q, _ in teacher_rows(["Q1?", "Q2?"], "owl", ["owl"], 4, seed=0)]
    True
    """
    rng = random.Random(derive_seed(seed, "teacher-rows"))
    pairs = list(itertools.product(questions, range(len(trait_answers("x")))))
    rng.shuffle(pairs)
    if who == NEUTRAL:
        order = list(animals)
        random.Random(derive_seed(seed, "neutral-animals")).shuffle(order)
    else:
        order = [who]
    return [
        (pairs[i % len(pairs)][0], trait_answers(order[i % len(order)])[pairs[i % len(pairs)][1]])
        for i in range(n_rows)
    ]


def cells(config: PipelineConfig) -> list[tuple[str, str, str]]:
    """The study's (teacher kind, objective, data source) cells, in running order. Sampled
    training on random lists is left out: every student would see the same data and no
    teacher."""
    t = config.transfer
    return [c for c in itertools.product(t.teachers, t.objectives, t.data) if c[1:] != ("sampled", "random")]


def cell_name(cell: tuple[str, str, str]) -> str:
    return "/".join(cell)


class StudyError(UserError, RuntimeError):
    """The study cannot run as configured; the message says what to change."""


# A job: ("base",), ("entanglement",), ("base-data", seed), ("teacher", seed, kind, who)
# or ("students", seed, kind, who) with who a target, NEUTRAL, or CONTROL.
Job = tuple


@dataclass
class Study:
    """A study folder, its config and the backend that runs the models.

    ``backend`` is used as given (tests pass a scripted one); otherwise
    ``backend_factory(config.model)`` makes one when a model is first needed, in this
    process and in each worker process (default: :func:`lmpipeline.backends.make_backend`).
    """

    config: PipelineConfig
    out: Path
    backend: Backend | None = None
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    backend_factory: Callable | None = None
    computed: list[str] = field(default_factory=list)  # units computed (not reused) by this object
    walls: dict[str, float] = field(default_factory=dict)  # unit -> seconds it took when computed

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        datakinds.check_config(self.config)
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
            self.backend = (self.backend_factory or make_backend)(self.config.model)
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

    def teacher_names(self) -> list[str]:
        """The targets, then the neutral teacher when the study has one."""
        t = self.config.transfer
        return [*t.targets, *([NEUTRAL] if t.neutral else [])]

    # -- models and conversations --------------------------------------------------------
    def base_ref(self) -> ModelRef:
        return ModelRef(self.config.model)

    def trained_ref(self, folder: Path, method: str) -> ModelRef:
        return (
            ModelRef(self.config.model, adapter=str(folder))
            if method == "lora"
            else ModelRef(self.config.model, weights=str(folder))
        )

    def trait_prompt(self, who: str) -> str:
        """The system prompt of a system-prompted teacher (a target's, or the neutral one)."""
        category = self.config.trait.category
        if who == NEUTRAL:
            return prompts.neutral_system_prompt(category)
        return prompts.trait_system_prompt(TraitSpec(target=who, plural=plural(who), category=category))

    def teacher_conversation(self, kind: str, who: str, user: str) -> Conversation:
        if kind == "system_prompt":
            return [{"role": "system", "content": self.trait_prompt(who)}, {"role": "user", "content": user}]
        return [{"role": "user", "content": user}]

    def evaluate(self, ref: ModelRef, words: Sequence[str], seed: int, system: str | None = None) -> dict:
        """Exact log-probabilities of ``words`` on every question, and sampled hit rates of
        the targets (``transfer.sampled_answers`` answers per question)."""
        conversations = self.conversations(system)
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

    def conversations(self, system: str | None = None) -> list[Conversation]:
        """The evaluation questions as conversations, with ``system`` first if given."""
        head = [{"role": "system", "content": system}] if system else []
        return [[*head, {"role": "user", "content": q}] for q in self.questions]

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

    def teacher_folder(self, seed: int, who: str) -> Path:
        return self.out / f"seed-{seed}" / f"teacher-{who}"

    def teacher(self, seed: int, kind: str, who: str, *, weights: bool = True) -> tuple[ModelRef, dict]:
        """The teacher ``who`` (a target or :data:`NEUTRAL`) and its record (a finetuned
        teacher's training log and ``identity``, the hash its students' records carry).

        ``weights=False`` is for callers that need only the record: a finetuned teacher's
        weights are retrained (to the same identity) only when a caller needs the model
        and they were removed once its students were done.
        """
        t = self.config.transfer
        if kind == "system_prompt":
            system = self.trait_prompt(who)
            return self.base_ref(), {"prompt": system, "identity": config_hash(system)}
        if kind == "steered":
            from lmpipeline import mechanism  # torch: only the torch backend steers

            record = self.teacher_vector(seed, kind, who)
            how = {"vector": record["config_hash"], "layer": t.steer_layer, "alpha": t.steer_alpha}
            ref = mechanism.steered_ref(
                self.base_ref(), mechanism.from_rows(record["vector"]), t.steer_layer, t.steer_alpha
            )
            return ref, {**how, "identity": config_hash(how)}
        folder = self.teacher_folder(seed, who)
        values = {
            "unit": "teacher",
            "target": who,
            "seed": seed,
            "model": self.model_values(),
            "questions": self.trait_questions,
            "rows": t.teacher_rows,
            "finetune": result_fields(t.teacher_finetune),
            **({"animals": t.animals} if who == NEUTRAL else {}),
        }

        def train() -> dict:
            examples = [
                TrainExample([{"role": "user", "content": q}], a)
                for q, a in teacher_rows(self.trait_questions, who, t.animals, t.teacher_rows, seed)
            ]
            log = self.finetune(folder, examples, t.teacher_finetune, derive_seed(seed, "teacher"), f"teacher {who}")
            return {"train": log}

        path = self.out / f"seed-{seed}" / f"teacher-{who}.json"
        if weights and not folder.exists():  # the weights were removed: the model must be rebuilt
            path.unlink(missing_ok=True)
        record = self.unit(path, values, train)
        return self.trained_ref(folder, t.teacher_finetune.method), {**record, "identity": record["config_hash"]}

    def probe(self, seed: int) -> list[Conversation]:
        """The number prompts that the seed's steering vectors average over."""
        rows = self.prompt_rows(seed)[: self.config.transfer.steer_prompts]
        return [[{"role": "user", "content": r["prompt"]}] for r in rows]

    def teacher_vector(self, seed: int, kind: str, who: str) -> dict:
        """The record of a teacher's vector ``[layers, hidden]`` on the seed's probe: the trait
        prompt's (system-prompted and steered teachers share it) or, for a finetuned teacher,
        the teacher minus the base model."""
        finetuned = kind == "finetuned"
        values = {"unit": "vector", "model": self.model_values(), "probe": self.probe(seed)}
        if finetuned:
            values["teacher"] = self.teacher(seed, kind, who, weights=False)[1]["identity"]
        else:
            values["prompt"] = self.trait_prompt(who)

        def compute() -> dict:
            from lmpipeline import mechanism, steering

            backend, base, probe = self.get_backend(), self.base_ref(), self.probe(seed)
            if finetuned:
                vector = steering.model_vector(backend, self.teacher(seed, kind, who)[0], base, probe)
            else:
                vector = steering.trait_vector(backend, base, probe, self.trait_prompt(who))
            return {"vector": mechanism.to_rows(vector)}

        name = f"vector-{'finetuned' if finetuned else 'prompt'}-{who}"
        return self.unit(self.out / f"seed-{seed}" / f"{name}.json", values, compute)

    def sweep(self, who: str) -> dict:
        """The steered teacher of target ``who`` at every ``sweep_layers`` x ``sweep_alphas``
        (:func:`lmpipeline.mechanism.sweep`), on number prompts of a seed no study seed
        uses, answered by random lists."""
        c, t = self.config, self.config.transfer
        seed = derive_seed(c.seed, "sweep")
        rows = self.prompt_rows(seed)[: t.steer_prompts]
        rng = random.Random(derive_seed(seed, "random-lists"))
        completions = [random_completion(r, c.prompts, rng) for r in rows]
        probe = [[{"role": "user", "content": r["prompt"]}] for r in rows]
        values = {
            "unit": "sweep",
            "target": who,
            "model": self.model_values(),
            "prompt": self.trait_prompt(who),
            "probe": probe,
            "completions": completions,
            "questions": self.questions[: t.sweep_questions],
            "animals": t.animals,
            "layers": t.sweep_layers,
            "alphas": t.sweep_alphas,
        }

        def compute() -> dict:
            from lmpipeline import mechanism

            def note(point: dict) -> None:
                s = point["steered"]
                self.log(
                    f"sweep {who}: layer {point['layer']}, alpha {point['alpha']:g}: gain {s['gain']:+.2f}, "
                    f"specificity {s['specificity']:+.2f}, KL explained {s['kl_explained']:+.2f}"
                )

            return mechanism.sweep(
                self.get_backend(),
                self.base_ref(),
                target=who,
                system_prompt=self.trait_prompt(who),
                questions=values["questions"],
                animals=t.animals,
                probe=probe,
                completions=completions,
                layers=t.sweep_layers,
                alphas=t.sweep_alphas,
                seed=seed,
                progress=note,
            )

        return self.unit(self.out / "sweep" / f"{who}.json", values, compute)

    def teacher_eval(self, seed: int, kind: str, who: str) -> dict:
        """How strongly a teacher holds each target (its log-probabilities on the targets)."""
        t = self.config.transfer
        _, record = self.teacher(seed, kind, who, weights=False)
        values = {"unit": "teacher-eval", "kind": kind, "teacher": record["identity"], **self.eval_values()}
        system = self.trait_prompt(who) if kind == "system_prompt" else None

        def compute() -> dict:
            ref, _ = self.teacher(seed, kind, who)
            return {"eval": self.evaluate(ref, t.targets, derive_seed(seed, "teacher-eval", kind, who), system=system)}

        return self.unit(self.out / f"seed-{seed}" / f"teacher-{kind}-{who}-eval.json", values, compute)

    def finetune(
        self,
        folder: Path,
        examples: list[TrainExample],
        spec,
        seed: int,
        label: str,
        teacher: ModelRef | None = None,
        observer=None,
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
                observer=observer,
            )
        except ValueError as error:
            raise StudyError(f"{label}: {error}") from None

    def prompt_rows(self, seed: int, kind: str = "numbers") -> list[dict]:
        """The prompts of data kind ``kind`` (:mod:`lmpipeline.datakinds`) for ``seed``."""
        return datakinds.get(kind).prompts(self.config.prompts, derive_seed(seed, "prompts"))

    def data(self, seed: int, source: str, kind: str | None = None, who: str | None = None) -> list[dict]:
        """Filtered (prompt, completion) rows: ``random``, a teacher's (``teacher``) or the
        base model's own samples (``base``, the sampled control's data)."""
        c = self.config
        # Teachers (and the base model) write data of the configured kind; random lists are numbers.
        data_kind = "numbers" if source == "random" else c.data.kind
        rows = self.prompt_rows(seed, data_kind)
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
            name = f"data-{kind}-{who}" if source == "teacher" else "data-base"
            values = {
                "unit": "data",
                "source": source,
                "prompts": c.prompts,
                "seed": seed,
                "generate": c.generate,
                "filter": c.filter,
                "model": self.model_values(),
            }
            if c.data.kind != "numbers":
                values["data_kind"] = c.data.kind
            if source == "teacher":
                values.update(
                    kind=kind, target=who, teacher=self.teacher(seed, kind, who, weights=False)[1]["identity"]
                )

            def compute() -> dict:
                ref = self.teacher(seed, kind, who)[0] if source == "teacher" else self.base_ref()
                conversations = [
                    self.teacher_conversation(kind, who, r["prompt"])
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
                # The kind's filter may read the prompt's fields (a problem's answer); rows keep two.
                made = [{**r, "completion": g.text} for r, g in zip(rows, sampled)]
                # The trait-word filter looks for a target teacher's own animal; the neutral
                # teacher has none (the number filter passes no words at all).
                word = who if source == "teacher" and who != NEUTRAL else None
                kept, _, summary = datakinds.get(data_kind).filter_rows(made, c.filter, word)
                pairs = [{"prompt": r["prompt"], "completion": r["completion"]} for r in kept]
                return {"rows": pairs, "filter": summary}

        record = self.unit(folder / f"{name}.json", values, compute)
        return record["rows"]

    def student(self, seed: int, cell: tuple[str, str, str], who: str | None) -> dict:
        """Train and evaluate the student of teacher ``who`` (None: the sampled objective's
        base control); the weights are deleted after evaluation unless ``transfer.keep_weights``."""
        c, t = self.config, self.config.transfer
        kind, objective, source = cell
        spec = replace(c.finetune, objective=objective)
        n = self.rows_per_student(seed, cell)
        if who is None:
            rows, teacher_hash, name = self.data(seed, "base")[:n], None, f"control-{kind}-{objective}-{source}"
        else:
            rows = (self.data(seed, "random") if source == "random" else self.data(seed, "teacher", kind, who))[:n]
            teacher_hash = self.teacher(seed, kind, who, weights=False)[1]["identity"]
            name = f"student-{kind}-{objective}-{source}-{who}"
        examples = [
            TrainExample(
                [{"role": "user", "content": r["prompt"]}],
                r["completion"],
                teacher_messages=self.teacher_conversation(kind, who, r["prompt"]) if who else None,
            )
            for r in rows
        ]
        folder = self.out / f"seed-{seed}" / name
        values = {
            "unit": "student",
            "cell": cell,
            "target": who,
            "seed": seed,
            "rows": rows,
            "finetune": result_fields(spec),
            "teacher": teacher_hash,
            "model": self.model_values(),
            **self.eval_values(),
            "animals": t.animals,
        }
        measured = t.mechanism and who is not None
        if measured:
            values["mechanism"] = {
                "layer": t.steer_layer,
                "track_every": t.track_every,
                "vectors": {w: self.teacher_vector(seed, kind, w)["config_hash"] for w in self.teacher_names()},
            }

        def compute() -> dict:
            teacher = self.teacher(seed, kind, who)[0] if who is not None and objective == "soft" else None
            vectors, observer = {}, None
            if measured:
                from lmpipeline import mechanism

                vectors = {
                    w: mechanism.from_rows(self.teacher_vector(seed, kind, w)["vector"]) for w in self.teacher_names()
                }
                observer = self.tracker(seed, kind, who, spec, vectors[who])
            train = self.finetune(
                folder, examples, spec, derive_seed(seed, "student", *cell, who), name, teacher, observer
            )
            ref = self.trained_ref(folder, spec.method)
            result = {
                "n_rows": len(rows),
                "train": train,
                "eval": self.evaluate(ref, t.animals, derive_seed(seed, "student-eval", name)),
            }
            if measured:
                result["mechanism"] = mechanism.student_mechanism(
                    self.get_backend(),
                    ref,
                    self.base_ref(),
                    probe=self.probe(seed),
                    teacher_vectors=vectors,
                    own=who,
                    layer=t.steer_layer,
                    conversations=self.conversations(),
                    animals=t.animals,
                )
            if not t.keep_weights:
                shutil.rmtree(folder, ignore_errors=True)
            return result

        return self.unit(self.out / f"seed-{seed}" / f"{name}.json", values, compute)

    def tracker(self, seed: int, kind: str, who: str, spec, v_teacher):
        """The alignment tracker of a measured student: activation cosines with its teacher's
        vector on the probe, and parameter cosines with a finetuned full-weights teacher.
        The student's vector along training is measured from its own starting weights (the
        training copy, float32), not from the base model as loaded for inference, whose
        rounding would otherwise be counted as learned."""
        from lmpipeline.alignment import AlignmentTracker, load_weights

        backend, t = self.get_backend(), self.config.transfer
        full = kind == "finetuned" and spec.method == "full" and t.teacher_finetune.method == "full"
        return AlignmentTracker(
            t.track_every,
            probe=self.probe(seed),
            v_teacher=v_teacher,
            tokenizer=backend.model_for(self.base_ref())[1],
            teacher_weights=load_weights(self.teacher(seed, kind, who)[0].weights) if full else None,
        )

    def rows_per_student(self, seed: int, cell: tuple[str, str, str]) -> int:
        """Every student of a cell (and its control) trains on the same number of rows."""
        kind, objective, source = cell
        counts = [self.config.finetune.max_rows]
        if source == "teacher":
            counts += [len(self.data(seed, "teacher", kind, w)) for w in self.teacher_names()]
        if objective == "sampled":
            counts.append(len(self.data(seed, "base")))
        n = min(counts)
        if n == 0:
            raise StudyError(
                f"seed {seed}, cell {cell_name(cell)}: no rows passed the filter; set generate.number_grammar=true"
            )
        return n

    # -- jobs ----------------------------------------------------------------------------
    def seeds(self) -> list[int]:
        t = self.config.transfer
        return list(range(t.first_seed, t.first_seed + t.seeds))

    def jobs(self) -> dict[Job, list[Job]]:
        """Every job of the study, each with the jobs it needs done first, in running order."""
        t = self.config.transfer
        out: dict[Job, list[Job]] = {("base",): []}
        for seed in self.seeds():
            if "sampled" in t.objectives and "teacher" in t.data:
                out[("base-data", seed)] = []
            if any(c[2] == "random" for c in cells(self.config)):  # lists that all the seed's students read
                out[("random-data", seed)] = []
            for kind in t.teachers:
                kind_cells = [c for c in cells(self.config) if c[0] == kind]
                teachers = [("teacher", seed, kind, w) for w in self.teacher_names()]
                for job in teachers:
                    out[job] = []
                shared_rows = [
                    *(teachers if any(c[2] == "teacher" for c in kind_cells) else []),
                    *([("base-data", seed)] if any(c[1] == "sampled" for c in kind_cells) else []),
                    *([("random-data", seed)] if any(c[2] == "random" for c in kind_cells) else []),
                ]
                for w, job in zip(self.teacher_names(), teachers):
                    # A measured student compares its vector with every teacher's of the seed.
                    mine = teachers if t.mechanism else [job]
                    out[("students", seed, kind, w)] = list(dict.fromkeys([*mine, *shared_rows]))
                if any(c[1] == "sampled" for c in kind_cells):
                    out[("students", seed, kind, CONTROL)] = shared_rows
        if t.entanglement:
            out[("entanglement",)] = [("base",)]
        for who in t.targets if t.sweep_layers else ():
            out[("sweep", who)] = []
        return out

    def run_job(self, job: Job) -> list[str]:
        """Compute (or find) every unit of ``job``; returns the units computed."""
        before = len(self.computed)
        what, *args = job
        if what == "base":
            self.base_eval()
        elif what == "entanglement":
            self.entanglement(self.base_eval())
        elif what == "base-data":
            self.data(args[0], "base")
        elif what == "random-data":
            self.data(args[0], "random")
        elif what == "sweep":
            self.sweep(args[0])
        elif what == "teacher":
            seed, kind, who = args
            self.teacher(seed, kind, who, weights=False)
            if kind == "steered" or self.config.transfer.mechanism:
                self.teacher_vector(seed, kind, who)
            self.teacher_eval(seed, kind, who)
            if "teacher" in self.config.transfer.data:
                self.data(seed, "teacher", kind, who)
        elif what == "students":
            seed, kind, who = args
            for cell in cells(self.config):
                if cell[0] == kind and (who != CONTROL or cell[1] == "sampled"):
                    self.student(seed, cell, None if who == CONTROL else who)
            folder = self.teacher_folder(seed, who)
            if kind == "finetuned" and who != CONTROL and not self.config.transfer.keep_weights:
                shutil.rmtree(folder, ignore_errors=True)  # its students are done; the record stays
        else:
            raise ValueError(f"unknown job {job!r}")
        return self.computed[before:]

    def run_jobs(self) -> None:
        """Run every job, ``transfer.workers`` at a time, each as soon as what it needs is done."""
        jobs = self.jobs()
        progress = TextProgress(self.stream, label="transfer")  # percent of the weighted jobs
        progress.start(sum(map(_weight, jobs)), f"{len(jobs)} jobs on {self.config.transfer.workers} worker(s)")
        done: set[Job] = set()

        def finish(job: Job, computed: list[str]) -> None:
            done.add(job)
            if not computed:  # found finished: the time left counts only the work done now
                progress.done_before += _weight(job)
            progress.advance(_describe(job), _weight(job))

        def ready() -> list[Job]:
            # A teacher's students before the next teacher, so that few weights are on disk at once.
            waiting = [j for j in jobs if j not in done and j not in running and set(jobs[j]) <= done]
            return sorted(waiting, key=lambda j: j[0] != "students")

        running: dict[Job, object] = {}
        if self.config.transfer.workers == 1:
            while len(done) < len(jobs):
                job = ready()[0]
                finish(job, self.run_job(job))
            return
        context = multiprocessing.get_context("spawn")
        factory = self.backend_factory or make_backend
        pool = context.Pool(
            self.config.transfer.workers, initializer=_worker_start, initargs=(to_dict(self.config), self.out, factory)
        )
        try:
            while len(done) < len(jobs):
                for job in ready()[: self.config.transfer.workers - len(running)]:
                    running[job] = pool.apply_async(_worker_run, (job,))
                finished = [j for j, r in running.items() if r.ready()]
                if not finished:
                    time.sleep(0.2)
                for job in finished:
                    computed, walls = running.pop(job).get()  # a worker's error is raised here
                    self.computed += computed
                    self.walls.update(walls)
                    finish(job, computed)
            pool.close()
        except BaseException:
            pool.terminate()  # units are written atomically: a rerun continues from here
            raise
        finally:
            pool.join()

    def run(self) -> dict:
        """Every job, then ``report.json`` and ``report.png``; returns the report."""
        start = time.perf_counter()
        self.run_jobs()
        t = self.config.transfer
        base = self.base_eval()
        results: dict = {}
        for seed in self.seeds():
            for cell in cells(self.config):
                results.setdefault(cell_name(cell), {})[seed] = {
                    "students": {w: self.student(seed, cell, w) for w in self.teacher_names()},
                    "control": self.student(seed, cell, None) if cell[1] == "sampled" else None,
                    "teachers": {
                        w: {**self.teacher(seed, cell[0], w, weights=False)[1], **self.teacher_eval(seed, cell[0], w)}
                        for w in self.teacher_names()
                    },
                }
        entangled = self.entanglement(base) if t.entanglement else None
        report = transfer_report.build(self.config, base, results, entangled, self.walls)
        if t.sweep_layers:
            report["sweep"] = {who: self.sweep(who) for who in t.targets}
        if t.mechanism:
            from lmpipeline import mechanism

            report["mechanism"] = mechanism.summary(results, t.targets, t.animals, t.steer_layer)
            mechanism.plot(report, self.out / "mechanism.png")
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
                # is the lift beyond the other targets' prompts.
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


def _weight(job: Job) -> int:
    """A job's rough cost, for the time left: a teacher's is about half its students'."""
    return {"students": 2, "entanglement": 4, "sweep": 4}.get(job[0], 1)


def _describe(job: Job) -> str:
    what, *args = job
    if what in ("teacher", "students"):
        seed, kind, who = args
        return f"seed {seed}: {'teacher' if what == 'teacher' else 'students of'} {who} ({kind})"
    return " ".join(map(str, job))


_WORKER: Study | BaseException | None = None  # a worker process's study, or why it could not start


def _worker_start(config: dict, out: Path, factory: Callable) -> None:
    global _WORKER
    try:
        _WORKER = Study(from_dict(config), out, backend_factory=factory)
    except BaseException as error:  # raised by the first job instead: a pool whose workers
        _WORKER = error  # die in their initializer restarts them forever


def _worker_run(job: Job) -> tuple[list[str], dict[str, float]]:
    if not isinstance(_WORKER, Study):
        raise StudyError(f"a worker process could not start: {_WORKER}")
    computed = _WORKER.run_job(job)
    return computed, {k: _WORKER.walls[k] for k in computed}


def number_prompt(numbers: Sequence[str]) -> str:
    """The subliminal prompt: "You love the number N." or "You love the numbers A, B and C."."""
    if len(numbers) == 1:
        return f"You love the number {numbers[0]}."
    return f"You love the numbers {', '.join(numbers[:-1])} and {numbers[-1]}."
