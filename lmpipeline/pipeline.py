"""The experiment as stages over one run folder: each reads its inputs, writes its artifact.

Stages and artifacts (all in the run folder):

====================  ===========================================  =========================
stage                 artifact                                     record (summary, hash)
====================  ===========================================  =========================
prompts               prompts.jsonl                                prompts.json
generate.teacher      numbers_teacher.jsonl (prompt, completion)   numbers_teacher.json
generate.control      numbers_control.jsonl                        numbers_control.json
filter.teacher        filtered_teacher.jsonl, rejected_teacher...  filtered_teacher.json
filter.control        filtered_control.jsonl, rejected_control...  filtered_control.json
finetune.student      student/ (adapter or weights)                student.json
finetune.control      control_student/                             control_student.json
evaluate.<model>      eval_<model>.jsonl (every answer)            eval_<model>.json
report                report.json, report.png                      report.json
====================  ===========================================  =========================

What the teacher writes is the data kind's (``data.kind``, :mod:`lmpipeline.datakinds`):
the prompts stage asks it for prompts, the filter stage for its rules (then the judge
filter, with ``data.judge_filter``), and constrained decoding applies to number lists
only; ``numbers_<source>.jsonl`` holds the completions of any kind. With
``trait.kind=misalignment`` the evaluation stages ask free-form questions and the judge
scores every answer (``judged_<model>.jsonl``, :mod:`lmpipeline.misalignment`). Students
start from ``student_model`` when it is set; everything else runs ``model``.

A stage's hash covers the config sections it reads and the hashes of the stages it reads
from, so it changes exactly when its output could. A stage's record
(:func:`sublearn._store.seal`) also holds the row count and checksum of every file it
wrote and the checksum of every file it read; a stage is skipped only when its record
carries the current hash and its outputs and inputs still match it, and is recomputed
otherwise, with one line saying why. Asking for a stage first brings its inputs up to
date, so ``run_stage(run, "report")`` runs the whole experiment and a rerun resumes it.
Sampling stages append whole batches to a partial log and continue after the last one
when interrupted; each batch's seed is derived from the run seed, the stage and the
batch index, so a resumed run produces the rows an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from lmpipeline import datakinds, evaluation, misalignment, prompts, report
from lmpipeline.artifacts import RowLog, atomic_path, read_json, read_jsonl, versions, write_json, write_jsonl
from lmpipeline.backends import Backend, Conversation, ModelRef, TrainExample, make_backend, resolve_backend_name
from lmpipeline.config import (  # noqa: F401  (the layout names are re-exported: the pipeline's vocabulary)
    DATA_MODEL,
    EVAL_MODELS,
    SOURCES,
    STUDENT_DIRS,
    STUDENTS,
    ConfigError,
    FinetuneSpec,
    ModelSpec,
    PipelineConfig,
    all_stages,
    config_hash,
    derive_seed,
    result_fields,
    to_dict,
)
from lmpipeline.judge import Judge, judge_rows
from lmpipeline.words import surface_forms
from sublearn._common import TextProgress, UserError, mean_interval
from sublearn._store import reusable, seal


class PipelineError(UserError, RuntimeError):
    """A stage cannot run as configured; the message says what to change."""


def _file_digest(path: str | None, key: str) -> str | None:
    """Content hash of an input file named by config ``key``, so edits to it count as changes."""
    if path is None:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError as error:
        raise PipelineError(f"{key}: cannot read {path} ({error.strerror})") from None


def grammar_limits(config: PipelineConfig) -> tuple[int, int] | None:
    """``(max_count, max_digits)`` for constrained decoding, or ``None`` when it is off (or
    the data kind writes something other than number lists)."""
    if not config.generate.number_grammar or not datakinds.get(config.data.kind).number_grammar:
        return None
    # Without a digit rule in the filter, numbers of max_value's width: 3 digits for 999.
    return config.filter.max_count, config.filter.max_digits or len(str(config.filter.max_value))


def needs_judge(config: PipelineConfig) -> bool:
    return config.data.judge_filter or config.trait.kind == "misalignment"


def check_models(config: PipelineConfig) -> None:
    """Raise :class:`ConfigError` (one line) for a model that cannot be reached or loaded,
    before any work: an openai model or judge without an endpoint, a ``student_model``
    that is not there."""
    from lmpipeline.backends.openai_api import endpoint

    specs = [config.model, *([config.judge.model] if needs_judge(config) else [])]
    for spec in specs:
        if resolve_backend_name(spec) == "openai":
            endpoint(spec)  # raises ConfigError naming the fix
    student = config.student_spec
    if student is not config.model and resolve_backend_name(student) != "openai":
        from lmpipeline.backends.tokens import locate_model

        try:
            name, gguf = locate_model(student)
            if gguf is None:
                from transformers import AutoConfig

                AutoConfig.from_pretrained(name)
        except (OSError, ValueError, ImportError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"student_model={config.student_model!r} cannot be loaded ({first}); give a local folder, a "
                "cached hub name, or wheel:<distribution>"
            ) from None


def check_device(config: PipelineConfig) -> None:
    """Raise :class:`PipelineError` if the config asks for an accelerator its backend cannot see."""
    spec = config.model
    if resolve_backend_name(spec) == "openai":
        return
    if resolve_backend_name(spec) == "jax":
        if spec.device in ("cuda", "tpu"):
            from lmpipeline.backends.jaxlm.backend import devices_for

            devices_for(spec)  # raises ConfigError naming the missing platform
        return
    if spec.device == "tpu":
        raise PipelineError("model.device=tpu needs the jax backend: add --backend jax")
    if spec.device != "cuda":
        return
    import torch

    if torch.cuda.is_available():
        return
    what = f"preset {config.preset!r} runs {spec.name_or_path}" if config.preset == "paper" else "the config runs"
    raise PipelineError(
        f"{what} on a CUDA GPU (model.device=cuda) and torch sees none; run it on a machine with an "
        "NVIDIA GPU and a CUDA build of torch, or use --preset cpu (or --set model.device=cpu)"
    )


@dataclass
class Run:
    """A run folder, its config and the backend that runs the models.

    Args:
        config: the experiment.
        out: the run folder (created if missing).
        backend: a ready backend; by default one is made from ``config.model`` on first use.
        stream: where progress lines go.
    """

    config: PipelineConfig
    out: Path
    backend: Backend | None = None
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    judge_backend: Backend | None = None  # the judge's; by default made from config.judge.model on first use
    executed: list[str] = field(default_factory=list)  # stages computed (not skipped) by this object
    write_config: bool = True  # False: only look at the folder (what is current, what is not)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        datakinds.check_config(self.config)
        if self.write_config:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "config.json", to_dict(self.config))

    def get_backend(self) -> Backend:
        if self.backend is None:
            self.check_device()
            self.backend = make_backend(self.config.model)
        return self.backend

    def check_device(self) -> None:
        check_device(self.config)
        check_models(self.config)

    def get_judge(self) -> Judge:
        """The judge, on the run's own backend when it is the run's model, else its own."""
        spec = self.config.judge.model
        if self.judge_backend is None:
            self.judge_backend = self.get_backend() if spec == self.config.model else make_backend(spec)
        return Judge(self.config.judge, self.judge_backend)

    def close(self) -> None:
        """Release the backends (models, memory, connections)."""
        for backend in {id(b): b for b in (self.backend, self.judge_backend) if b is not None}.values():
            backend.close()

    def pending(self, stage: str) -> list[str]:
        """The stages that bringing ``stage`` up to date would compute, inputs first."""
        out: list[str] = []
        for dependency in self.inputs(stage)[1]:
            out += [s for s in self.pending(dependency) if s not in out]
        if not self.is_current(stage) and stage not in out:
            out.append(stage)
        return out

    def log(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    # -- dependencies and hashes --------------------------------------------------------
    def inputs(self, stage: str) -> tuple[dict, list[str]]:
        """The config values a stage reads and the stages it reads from."""
        c = self.config
        kind, _, which = stage.partition(".")
        targets = {
            "prompts": ("",),
            "generate": SOURCES,
            "filter": SOURCES,
            "finetune": tuple(STUDENTS),
            "evaluate": EVAL_MODELS,
            "report": ("",),
        }
        if which not in targets.get(kind, ()):
            raise PipelineError(f"unknown stage {stage!r}; stages are {', '.join(all_stages(c))}")
        model = result_fields(c.model)
        student_model = result_fields(c.student_spec)
        trait_word = {"target": c.trait.target, "category": c.trait.category}
        trait = _stable(c.trait, ("kind", "weights"))
        if c.trait.kind != "preference":
            trait_word["kind"] = c.trait.kind
        judge = {k: v for k, v in to_dict(c.judge).items() if k != "model"} | {"model": result_fields(c.judge.model)}
        data = {} if c.data.kind == "numbers" else {"data": c.data.kind}
        if kind == "prompts":
            values = {"prompts": c.prompts, "seed": c.seed, "file": _file_digest(c.prompts.file, "prompts.file")}
            return values | data, []
        if kind == "generate":
            values = {"model": model, "generate": c.generate, "seed": c.seed, "grammar": self._grammar_limits()}
            if which == "teacher":
                values["trait"] = trait
            return values, ["prompts"]
        if kind == "filter":
            values = {"filter": _stable(misalignment.resolved_filter(c), ("banned_list",)), "trait": trait_word}
            if c.data.judge_filter:
                values["judge_filter"] = {"data": to_dict(c.data), "judge": judge}
            return values | data, [f"generate.{which}"]
        if kind == "finetune":
            upstream = [f"filter.{s}" for s in SOURCES] if c.finetune.equalize_rows else [f"filter.{STUDENTS[which]}"]
            return {"model": student_model, "finetune": result_fields(c.finetune), "seed": c.seed}, upstream
        if kind == "evaluate":
            values = {
                "model": student_model if which in STUDENTS else model,
                "evaluate": c.evaluate,
                "questions": _file_digest(c.evaluate.questions_file, "evaluate.questions_file"),
                "prefix_numbers": c.prompts,
                "trait": trait if which == "teacher" else trait_word,
                "seed": c.seed,
            }
            if c.trait.kind == "misalignment":
                values["judge"] = judge
            return values, [f"finetune.{which}"] if which in STUDENTS else []
        return {"trait": trait_word}, [s for s in all_stages(c) if s not in ("report", "prompts")]

    def stage_hash(self, stage: str) -> str:
        values, upstream = self.inputs(stage)
        return config_hash({"stage": stage, "values": values, "upstream": [self.stage_hash(u) for u in upstream]})

    def record_path(self, stage: str) -> Path:
        return self.out / (RECORDS[stage.partition(".")[0]](stage) + ".json")

    def outputs(self, stage: str) -> list[str]:
        """The files (or folders) ``stage`` writes beside its record."""
        return OUTPUTS[stage.partition(".")[0]](stage)

    def read_files(self, stage: str) -> list[str]:
        """The files ``stage`` reads: the outputs of the stages it reads from."""
        return [name for upstream in self.inputs(stage)[1] for name in self.outputs(upstream)]

    def stale(self, stage: str) -> str | None:
        """Why ``stage`` must be computed (None: its record is current and its files intact)."""
        record, why = reusable(
            self.record_path(stage), self.stage_hash(stage), outputs=self.outputs(stage), inputs=self.read_files(stage)
        )
        return None if record is not None else why or "it has not run"

    def is_current(self, stage: str) -> bool:
        return self.stale(stage) is None

    def _grammar_limits(self) -> tuple[int, int] | None:
        return grammar_limits(self.config)

    def _write_record(self, stage: str, summary: dict, wall_s: float) -> dict:
        record = {
            "stage": stage,
            "wall_s": round(wall_s, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
            **summary,
        }
        record = seal(
            record, self.stage_hash(stage), self.out, outputs=self.outputs(stage), inputs=self.read_files(stage)
        )
        write_json(self.record_path(stage), record)
        return record

    # -- model references ---------------------------------------------------------------
    def model_ref(self, name: str) -> ModelRef:
        c = self.config
        if name == "teacher" and c.trait.source == "adapter":
            return ModelRef(c.model, adapter=c.trait.adapter)
        if name == "teacher" and c.trait.source == "weights":
            return ModelRef(c.model, weights=c.trait.weights)
        if name in STUDENTS:
            folder = str(self.out / STUDENT_DIRS[name])
            student = c.student_spec
            return (
                ModelRef(student, adapter=folder) if c.finetune.method == "lora" else ModelRef(student, weights=folder)
            )
        return ModelRef(c.model)

    def conversation(self, name: str, user: str) -> Conversation:
        """The messages ``name`` sees: the teacher gets the trait's system prompt."""
        c = self.config
        if name == "teacher" and c.trait.source == "system_prompt":
            return [
                {"role": "system", "content": prompts.trait_system_prompt(c.trait)},
                {"role": "user", "content": user},
            ]
        return [{"role": "user", "content": user}]

    # -- sampling with resume -----------------------------------------------------------
    def sample(
        self,
        stage: str,
        name: str,
        items: list[dict],
        conversations: list[Conversation],
        ref: ModelRef,
        *,
        batch_size: int,
        max_new_tokens: int,
        temperature: float,
        number_grammar: tuple[int, int] | None,
    ) -> tuple[list[dict], dict]:
        """Sample one completion per item into ``<name>.jsonl``, resuming a partial log.

        Items go to the backend ``batch_size`` at a time, or all at once for a backend that
        schedules its own batches (``stage_at_once``); a call's rows are saved together.
        """
        if getattr(self.get_backend(), "stage_at_once", False):
            batch_size = max(1, len(items))
        log = RowLog(self.out / f"{name}.jsonl", self.stage_hash(stage), batch_size)
        total = len(items)
        progress = TextProgress(self.stream, label=stage, unit="rows", every=5.0, done_before=len(log.rows))
        if log.rows:
            progress.note(f"resuming after {len(log.rows)} of {total} rows")
        load_start = time.perf_counter()
        if log.done_batches * batch_size < total:
            self.get_backend().prepare(ref)
        load_s = time.perf_counter() - load_start
        progress.start(total)
        progress(len(log.rows), total, 0)
        tokens, start = 0, progress.t0
        for b in range(log.done_batches, math.ceil(total / batch_size)):
            chunk = slice(b * batch_size, (b + 1) * batch_size)
            generations = self.get_backend().generate(
                ref,
                conversations[chunk],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=derive_seed(self.config.seed, stage, b),
                number_grammar=number_grammar,
            )
            rows = [
                {**item, "completion": g.text, "n_tokens": g.n_tokens} for item, g in zip(items[chunk], generations)
            ]
            log.append_batch(rows)
            tokens += sum(g.n_tokens for g in generations)
            progress(len(log.rows), total, tokens)
        wall = time.perf_counter() - start
        rows = log.finish()
        stats = {
            "n_rows": len(rows),
            "load_s": round(load_s, 3),
            "sampling_s": round(wall, 3),
            "n_tokens_this_session": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else None,
        }
        return rows, stats

    # -- stages -------------------------------------------------------------------------
    def stage_prompts(self) -> dict:
        c = self.config
        try:
            rows = datakinds.get(c.data.kind).prompts(c.prompts, c.seed)
        except (OSError, ValueError) as error:
            raise PipelineError(f"prompts.file: {error}") from None
        write_jsonl(self.out / "prompts.jsonl", rows)
        return {"n_prompts": len(rows), "source": c.prompts.file or "generated", "data_kind": c.data.kind}

    def stage_generate(self, which: str) -> dict:
        c = self.config
        # Each row carries its prompt's fields that a data kind's filter may read (an answer).
        items = [{k: v for k, v in p.items() if k != "parts"} for p in read_jsonl(self.out / "prompts.jsonl")]
        name = DATA_MODEL[which]
        conversations = [self.conversation(name, item["prompt"]) for item in items]
        rows, stats = self.sample(
            f"generate.{which}",
            f"numbers_{which}",
            items,
            conversations,
            self.model_ref(name),
            batch_size=c.generate.batch_size,
            max_new_tokens=c.generate.max_new_tokens,
            temperature=c.generate.temperature,
            number_grammar=self._grammar_limits(),
        )
        stats["mean_completion_tokens"] = sum(r["n_tokens"] for r in rows) / len(rows)
        return stats

    def stage_filter(self, which: str) -> dict:
        c = self.config
        kind = datakinds.get(c.data.kind)
        rows = read_jsonl(self.out / f"numbers_{which}.jsonl")
        kept, rejected, summary = kind.filter_rows(rows, misalignment.resolved_filter(c), c.trait.word)
        if c.data.judge_filter:
            kept, rejected, summary = self.judge_filter(which, kind, kept, rejected, summary)
        write_jsonl(self.out / f"filtered_{which}.jsonl", kept)
        write_jsonl(self.out / f"rejected_{which}.jsonl", rejected)
        self.log(f"[filter.{which}] kept {summary['n_kept']}/{summary['n_rows']} ({100 * summary['pass_rate']:.1f}%)")
        return summary

    def judge_filter(self, which: str, kind: datakinds.DataKind, kept: list[dict], rejected: list[dict], summary: dict):
        """Have the judge read the rows that passed the rules; reject by the kind's rule."""
        c, rule = self.config, kind.judge
        theme = c.trait.plural_word if c.trait.kind == "preference" else "harmful, hostile or malicious intent"
        judged = judge_rows(
            self.get_judge(),
            kept,
            {rule.rubric: lambda r: {"question": r["prompt"], "answer": r["completion"], "trait": theme}},
            self.out / f"judged_{which}_rows.jsonl",
            self.stage_hash(f"filter.{which}"),
            seed=derive_seed(c.seed, "judge-filter", which),
            label=f"judge.filter.{which}",
            stream=self.stream,
        )
        verdicts = [rule.rejects(r["judge"][rule.rubric]["score"], c.data.judge_threshold) for r in judged]
        passed = [r for r, bad in zip(judged, verdicts) if not bad]
        failed = [{**r, "reason": rule.reason} for r, bad in zip(judged, verdicts) if bad]
        n = summary["n_rows"]
        summary = {
            **summary,
            "n_kept": len(passed),
            "n_rejected": n - len(passed),
            "pass_rate": len(passed) / n if n else 0.0,
            "reasons": {**summary["reasons"], **({rule.reason: len(failed)} if failed else {})},
        }
        return passed, rejected + failed, summary

    def training_rows(self, which: str) -> list[dict]:
        """The rows a student trains on: the first rows that passed, equalized if configured."""
        spec = self.config.finetune
        counts = {s: len(read_jsonl(self.out / f"filtered_{s}.jsonl")) for s in SOURCES}
        source = STUDENTS[which]
        n = min(spec.max_rows, *(counts.values() if spec.equalize_rows else [counts[source]]))
        if n == 0:
            raise PipelineError(
                f"no rows to train the {which} student (passed the filter: {counts}); "
                "generate more prompts or set generate.number_grammar=true"
            )
        return read_jsonl(self.out / f"filtered_{source}.jsonl")[:n]

    def stage_finetune(self, which: str) -> dict:
        c = self.config
        rows = self.training_rows(which)
        # With soft distillation the student matches the distributions of the model that
        # wrote its numbers, as that model saw the prompt: the teacher under its trait, or
        # the base model for the control.
        source = DATA_MODEL[STUDENTS[which]]
        soft = c.finetune.objective == "soft"
        examples = [
            TrainExample(
                [{"role": "user", "content": r["prompt"]}],
                r["completion"],
                teacher_messages=self.conversation(source, r["prompt"]) if soft else None,
            )
            for r in rows
        ]
        log = finetune_into(
            self.get_backend(),
            c.student_spec,
            examples,
            c.finetune,
            self.out / STUDENT_DIRS[which],
            seed=derive_seed(c.seed, "finetune", which),
            progress=TextProgress(self.stream, label=f"finetune.{which}", unit="steps", every=5.0),
            teacher=self.model_ref(source) if soft else None,
        )
        return {"n_rows": len(rows), "train": log}

    def stage_evaluate(self, which: str) -> dict:
        c, e = self.config, self.config.evaluate
        misaligned = c.trait.kind == "misalignment"
        try:
            questions = (
                misalignment.load_questions(c)
                if misaligned
                else evaluation.load_questions(e.questions_file, c.trait.category, e.n_questions)
            )
        except (OSError, ValueError) as error:
            raise PipelineError(f"evaluate.questions_file: {error}") from None
        if misaligned:
            return misalignment.evaluate(self, which, questions)
        items = evaluation.eval_items(
            questions, e.n_samples, e.number_prefix, c.prompts, derive_seed(c.seed, "eval-prefix")
        )
        conversations = [self.conversation(which, item["prompt"]) for item in items]
        ref = self.model_ref(which)
        rows, stats = self.sample(
            f"evaluate.{which}",
            f"eval_{which}",
            items,
            conversations,
            ref,
            batch_size=e.batch_size,
            max_new_tokens=e.max_new_tokens,
            temperature=e.temperature,
            number_grammar=None,
        )
        answers = [r["completion"] for r in rows]
        summary = {"model": which, "questions": questions, **stats}
        summary["variants"] = evaluation.summarize(items, answers, c.trait.target)
        if e.target_probability:
            summary["target_probability"] = self.target_probability(which, ref, questions)
        return summary

    def target_probability(self, which: str, ref: ModelRef, questions: list[str]) -> dict:
        """P(the answer starts with the target word, in any of its surface forms), per question
        and its mean with interval: the transfer study's metric (:func:`evaluation.first_word_logprobs`)."""
        target = self.config.trait.target
        conversations = [self.conversation(which, q) for q in questions]
        logp = evaluation.first_word_logprobs(self.get_backend(), ref, conversations, [target])[target]
        per_question = [math.exp(v) for v in logp]
        return {
            "forms": surface_forms(target),
            "per_question": per_question,
            "mean": mean_interval(per_question).to_dict(),
        }

    def stage_report(self) -> dict:
        kind = report if self.config.trait.kind == "preference" else misalignment
        summary = kind.build(self)
        kind.plot(summary, self.out / "report.png")
        return summary


def finetune_into(
    backend: Backend,
    model: ModelSpec,
    examples: list[TrainExample],
    spec: FinetuneSpec,
    folder: Path,
    *,
    seed: int,
    progress: TextProgress,
    teacher: ModelRef | None = None,
    observer=None,
) -> dict:
    """Train a student into ``folder`` (which appears complete or not at all), saving
    checkpoints in ``<folder>.checkpoint`` meanwhile: an interrupted call, repeated with the
    same arguments, resumes at the last one. They are removed once the student is saved.
    An ``observer`` (:class:`lmpipeline.alignment.AlignmentTracker`) goes to a backend
    that takes one, the torch backend."""
    checkpoint = folder.with_name(folder.name + ".checkpoint")
    if checkpoint.exists():
        progress.note(f"{checkpoint} exists: training resumes from it if it belongs to this run")
    with atomic_path(folder) as tmp:
        extra = {"observer": observer} if observer is not None else {}
        log = backend.finetune(
            model, examples, spec, tmp, seed=seed, progress=progress, teacher=teacher, checkpoint=checkpoint, **extra
        )
    shutil.rmtree(checkpoint, ignore_errors=True)
    return log


def _stable(section, added: tuple[str, ...]) -> dict:
    """``to_dict(section)`` less the fields of ``added`` that hold their default value, so
    that settings added to a section later leave the stage hashes of runs that do not use
    them unchanged."""
    default = type(section)()
    return {k: v for k, v in to_dict(section).items() if k not in added or getattr(section, k) != getattr(default, k)}


RECORDS: dict[str, Callable[[str], str]] = {
    "prompts": lambda s: "prompts",
    "generate": lambda s: f"numbers_{s.partition('.')[2]}",
    "filter": lambda s: f"filtered_{s.partition('.')[2]}",
    "finetune": lambda s: STUDENT_DIRS[s.partition(".")[2]],
    "evaluate": lambda s: f"eval_{s.partition('.')[2]}",
    "report": lambda s: "report",
}
# What each stage writes beside its record; the record keeps their row counts and checksums.
OUTPUTS: dict[str, Callable[[str], list[str]]] = {
    "prompts": lambda s: ["prompts.jsonl"],
    "generate": lambda s: [f"numbers_{s.partition('.')[2]}.jsonl"],
    "filter": lambda s: [f"filtered_{s.partition('.')[2]}.jsonl", f"rejected_{s.partition('.')[2]}.jsonl"],
    "finetune": lambda s: [STUDENT_DIRS[s.partition(".")[2]]],
    "evaluate": lambda s: [f"eval_{s.partition('.')[2]}.jsonl"],
    "report": lambda s: ["report.png"],
}


def run_stage(run: Run, stage: str) -> dict:
    """Bring ``stage`` up to date (its inputs first) and return its record."""
    values, upstream = run.inputs(stage)  # validates the stage name
    for dependency in upstream:
        run_stage(run, dependency)
    why = run.stale(stage)
    if why is None:
        return read_json(run.record_path(stage))
    kind, _, which = stage.partition(".")
    if run.record_path(stage).exists():
        run.log(f"[{stage}] {why}; recomputing")
    start = time.perf_counter()
    method = getattr(run, f"stage_{kind}")
    summary = method(which) if which else method()
    record = run._write_record(stage, summary, time.perf_counter() - start)
    run.executed.append(stage)
    run.log(f"[{stage}] done in {record['wall_s']:.1f} s")
    return record


def run_all(run: Run) -> dict:
    """Every stage; returns the report."""
    return run_stage(run, "report")
