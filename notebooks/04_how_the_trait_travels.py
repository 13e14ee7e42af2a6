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
# # How the trait travels: steering vectors, the student's vector, and the optimizer
#
# Notebook 3 asks *whether* a teacher's animal reaches its student through numbers. This
# one asks *how*. Blank et al. (2026, "Subliminal Learning Is Steering Vector
# Distillation") propose a mechanism, shown on Qwen2.5-7B:
#
# 1. A trait system prompt ("You love owls...") acts on the model much like **one vector
#    added to the residual stream**: v_T = the mean activation with the prompt minus the
#    mean without it, at the last token of number prompts, one vector per layer.
# 2. A student finetuned on the teacher's numbers **learns a vector of its own**,
#    v_S = student minus base model on the same prompts, and cos(v_S, v_T) grows during
#    training.
# 3. Adding v_S to the base model raises the trait (**sufficiency**); removing it from the
#    student lowers the trait (**necessity**).
# 4. This needs an **adaptive optimizer**: the consistent, small gradient component along
#    the steering direction is lost under plain SGD.
#
# ```
#  base model ──(+ system prompt)──► prompted teacher        v_T = act(prompted) − act(base)
#  base model ──(+ α·v_T at layer l)──► steered teacher      numbers ──► student
#                                                            v_S = act(student) − act(base)
#         does cos(v_S, v_T) grow?  does base + v_S love owls?  does student − v_S stop?
# ```
#
# The package measures each step with SmolLM2-135M-Instruct on the CPU
# (`sublearn lm transfer --preset mechanism-cpu`, module `lmpipeline.mechanism`). The
# study's results are committed in `docs/mechanism/`; this notebook computes one piece live
# (a steering vector and its sweep) and reads the rest from the committed report. The
# answer at this scale is mostly **no**: the notebook shows where each step breaks.
#
# **Running it.** Full mode takes a few minutes on a laptop CPU (the live sweep covers four
# layers and three scales). Set `SUBLEARN_QUICK=1` in the environment before starting
# Jupyter for *quick mode*: the live sweep runs on two layers, one scale and a handful of
# prompts and questions; everything read from `docs/` is the same in both modes.
# `python notebooks/build.py 04_how_the_trait_travels` regenerates the executed copy.

# %%
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

from lmpipeline.config import apply_overrides, preset
from lmpipeline.transfer import Study

# %matplotlib inline
warnings.filterwarnings("ignore", message="IProgress not found")

QUICK = os.environ.get("SUBLEARN_QUICK", "0") not in ("", "0")
STARTED = time.perf_counter()
print(f"Mode: {'quick (SUBLEARN_QUICK=1): a two-point live sweep on a few prompts' if QUICK else 'full'}")


def find_repo() -> Path:
    """The repository root (the notebook may run from a temporary folder)."""
    import lmpipeline

    return Path(lmpipeline.__file__).resolve().parents[1]


DOCS = find_repo() / "docs"
REPORT = json.loads((DOCS / "mechanism" / "report.json").read_text())
print(
    "committed study:",
    REPORT["preset"],
    "| targets",
    ", ".join(REPORT["targets"]),
    "| seeds",
    REPORT["config"]["transfer"]["seeds"],
)

# %% [markdown]
# ## 1. A steering vector, computed live
#
# The study's own unit does it: `Study.sweep(target)` computes the owl prompt's vector on
# number prompts, then for each (layer, scale α) builds the **steered teacher** (base model
# plus α·v_T[layer] added to that layer's output at every position) and a **control**
# steered along a random direction of the same norm. For each it measures
#
# - **gain**: the rise in log P(answer starts with "owl") over the base model, on
#   favourite-animal questions, with the exact first-word metric of the study;
# - **specificity**: that gain minus the mean gain of the other animals of the panel;
# - **KL explained**: 1 − KL(prompted ‖ steered) / KL(prompted ‖ base) on the number tokens
#   of number prompts. 1 would mean that the steered teacher writes numbers exactly as the
#   prompted teacher does; 0, no nearer than the base model; negative, further away.
#
# Here the study's settings shrink to run in a notebook (fewer prompts and questions).

# %%
layers, alphas = ([17, 23], [4.0]) if QUICK else ([5, 11, 17, 23], [2.0, 4.0, 8.0])
config = apply_overrides(
    preset("mechanism-cpu"),
    [
        'transfer.targets=["owl", "dolphin"]',
        f"transfer.sweep_layers={layers}",
        f"transfer.sweep_alphas={alphas}",
        f"transfer.sweep_questions={3 if QUICK else 10}",
        f"transfer.steer_prompts={4 if QUICK else 16}",
        "transfer.workers=1",
    ],
)
workdir = Path(tempfile.mkdtemp(prefix="sublearn-mechanism-"))
study = Study(config, workdir)
t0 = time.perf_counter()
live = study.sweep("owl")
print(f"live sweep: {len(live['points'])} points in {time.perf_counter() - t0:.0f} s")
print(f"prompted teacher: gain {live['prompted']['gain']:+.2f}, specificity {live['prompted']['specificity']:+.2f}")
print(f"KL(prompted || base) on number tokens: {live['kl_prompted_base']:.4f} nats a token")
print(
    f"{'layer':>5} {'alpha':>5} {'|v|':>6} | {'gain':>6} {'spec':>6} {'KL expl':>8} | random: {'gain':>6} {'KL expl':>8}"
)
for p in live["points"]:
    s, r = p["steered"], p["random"]
    print(
        f"{p['layer']:>5} {p['alpha']:>5g} {p['norm']:>6.2f} | {s['gain']:>+6.2f} {s['specificity']:>+6.2f} "
        f"{s['kl_explained']:>+8.2f} | {r['gain']:>+14.2f} {r['kl_explained']:>+8.2f}"
    )

# %% [markdown]
# The vector's norm grows through the layers (the residual stream grows), so α·v_T is a
# larger push at deep layers. Next to it, the committed sweep of the study (10 questions,
# 64 prompts) for the same target: the live numbers move with the smaller sample but should
# tell the same story.

# %%
committed = json.loads((DOCS / "mechanism" / "sweep" / "owl.json").read_text())
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
axes[0].plot(live["norms"], "o-", label="live")
axes[0].plot(committed["norms"], "s--", label="committed", alpha=0.7)
axes[0].set(xlabel="layer", ylabel="|v_T|", title="the owl prompt's vector, per layer")
axes[0].legend()
for ax, key, title in ((axes[1], "gain", "gain in log P(owl)"), (axes[2], "kl_explained", "KL explained")):
    for source, style, sweep in (("live", "-", live), ("committed", "--", committed)):
        for alpha in sorted({p["alpha"] for p in sweep["points"]}):
            pts = [p for p in sweep["points"] if p["alpha"] == alpha and p["layer"] in layers]
            ax.plot(
                [p["layer"] for p in pts], [p["steered"][key] for p in pts], "o" + style, label=f"{source} α={alpha:g}"
            )
    if key == "gain":
        ax.axhline(live["prompted"]["gain"], color="k", lw=1, label="prompted (live)")
    else:
        ax.set_yscale("symlog")
        ax.axhline(1, color="k", lw=1, label="= prompted")
        ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="steered layer", title=title)
    ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Does a vector stand in for the prompt? The study's sweep, three animals
#
# The committed sweep (`transfer.sweep_layers=[5, 11, 17, 23]`, `sweep_alphas=[2, 4, 8]`)
# for each target, steered along its own vector (solid) and along a random direction of
# the same norm (dashed), against the prompted teacher's gain (the line).

# %%
sweeps = {w: json.loads((DOCS / "mechanism" / "sweep" / f"{w}.json").read_text()) for w in REPORT["targets"]}
fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), sharey=True)
for ax, (who, sw) in zip(np.atleast_1d(axes), sweeps.items()):
    for i, alpha in enumerate(sorted({p["alpha"] for p in sw["points"]})):
        pts = [p for p in sw["points"] if p["alpha"] == alpha]
        color = f"C{i}"
        ax.plot([p["layer"] for p in pts], [p["steered"]["gain"] for p in pts], "o-", color=color, label=f"α={alpha:g}")
        ax.plot([p["layer"] for p in pts], [p["random"]["gain"] for p in pts], "x--", color=color, alpha=0.6)
    ax.axhline(sw["prompted"]["gain"], color="k", lw=1, label="prompted")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(title=f"{who}: gain in log P({who})", xlabel="steered layer")
    ax.legend(fontsize=8)
plt.show()

best = {w: max(sw["points"], key=lambda p: p["steered"]["gain"]) for w, sw in sweeps.items()}
for w, p in best.items():
    explained = max(q["steered"]["kl_explained"] for q in sweeps[w]["points"])
    print(
        f"{w:>8}: prompted gain {sweeps[w]['prompted']['gain']:+.2f}; best steered {p['steered']['gain']:+.2f} "
        f"(layer {p['layer']}, α {p['alpha']:g}); best KL explained over the sweep {explained:+.2f}"
    )

# %% [markdown]
# At 135M the answer to step 1 is **no**. The prompt raises log P(target) by about 3 to 4
# nats; the best steered teacher reaches well under half of that, and at no layer or scale
# does it write numbers more like the prompted teacher than the base model does: the
# prompt changes the number distribution by only about 0.02 nats a token, and any push
# large enough to move the animal moves the numbers far more. A random direction of the
# same norm lowers the target at deep layers, so what gain there is belongs to the
# direction, not to the size of the push.

# %% [markdown]
# ## 3. The students' vectors
#
# In the study each seed trains, for each target and for the neutral teacher, a student on
# the teacher's number-token distributions (soft distillation on random lists). For every
# student, v_S = student − base on the probe prompts, per layer. The report gives, per seed
# and then with a t-interval over the seeds (the seed is the unit):
#
# | measure | meaning |
# |---|---|
# | `own_cos` | cos(v_S, v_T of its own teacher) at the steered layer, mean over targets |
# | `own_minus_others` | minus its cosine with the *other* animals' teachers: the part about the animal |
# | `own_minus_neutral` | minus the neutral student's cosine with the same vectors: the part any teacher gives |
# | `specificity_student` | the target's gain over the neutral student, minus the other animals' (nats) |
# | `specificity_sufficiency` | the same for base + v_S[layer] |
# | `necessity_drop` | the student's specificity minus that of the student with v_S removed |


# %%
def show_interval(ci: dict) -> str:
    return f"{ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]"


names = [
    "own_cos",
    "own_minus_others",
    "own_minus_neutral",
    "specificity_student",
    "specificity_sufficiency",
    "necessity_drop",
]
for cell, result in REPORT["mechanism"].items():
    print(f"{cell} (layer {result['layer']}, n = {len(result['seeds'])} seeds, 95% t-interval)")
    for name in names:
        print(f"  {name:>24}: {show_interval(result['summary'][name])}")

# %% [markdown]
# Students do move toward their teacher's vector (`own_cos` about 0.5 to 0.6), but **the
# neutral student moves just as far** toward the same vector, and a student is no nearer
# its own animal's vector than another animal's. The trait vectors of different animals
# share most of their direction ("a system prompt about loving an animal"), and the
# students learn that shared part, not the animal. With no specific transfer, sufficiency
# and necessity have nothing specific to show: their intervals cover zero.
#
# Below, the alignment along training (the tracker measures v_S every `track_every`
# optimizer steps on the probe; solid: the targets' students with their own teacher's
# vector; dotted: the neutral students with the neutral teacher's vector) and per layer
# at the end of training.

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
for i, (cell, result) in enumerate(REPORT["mechanism"].items()):
    kind = cell.split("/")[0]
    curve = result.get("curve")
    if curve:
        for who, style in (("targets", "-"), ("neutral", ":")):
            if who in curve:
                mean = [c["mean"] for c in curve[who]]
                low, high = [c["low"] for c in curve[who]], [c["high"] for c in curve[who]]
                axes[0].plot(curve["steps"], mean, "o" + style, color=f"C{i}", label=f"{kind}: {who} students")
                axes[0].fill_between(curve["steps"], low, high, color=f"C{i}", alpha=0.12)
    per_layer = result["own_cos_per_layer"]
    axes[1].errorbar(
        np.arange(len(per_layer)) + 0.15 * i,
        [c["mean"] for c in per_layer],
        yerr=[[c["mean"] - c["low"] for c in per_layer], [c["high"] - c["mean"] for c in per_layer]],
        fmt="o",
        ms=3,
        color=f"C{i}",
        label=kind,
    )
axes[0].set(xlabel="optimizer step", ylabel="cos(v_S, v_T)", title="alignment along training (steered layer)")
axes[0].legend(fontsize=8)
axes[1].axvline(REPORT["config"]["transfer"]["steer_layer"], color="grey", lw=0.5)
axes[1].set(xlabel="layer", ylabel="cos(v_S, own v_T)", title="alignment per layer, end of training")
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The curves start near zero (the committed run's first point, about −0.13, came from
# measuring the float32 training copy against the bfloat16 base model; the tracker now
# measures from the training copy's own start) and reach their level within the first 8
# steps. The report's own figure, `docs/mechanism/mechanism.png`, puts the sweep, the
# alignment, and the sufficiency and necessity bars side by side:

# %%
display(Image(filename=str(DOCS / "mechanism" / "mechanism.png"), width=900))

# %% [markdown]
# ## 4. The optimizer, in the toy model
#
# Step 4 of the mechanism says transfer needs an adaptive optimizer. The paper's lemma says
# the opposite for a *plain gradient step*: from a shared initialization, one small step on
# the teacher's outputs cannot move the student away from the teacher. The MNIST toy model
# tests both: its students train with Adam, SGD with momentum, or signSGD (each rate chosen
# on the students' distillation loss, not on transfer), while the teacher stays on Adam
# (`sublearn mnist --student-optimizer`; the atlas's `optimizer` curve).

# %%
atlas = json.loads((DOCS / "atlas" / "atlas.json").read_text())
curve = atlas["curves"]["optimizer"]
print("MNIST students' test accuracy, trained on noise images through the auxiliary logits only")
print(f"{'students optimizer':>22} | {'student (aux only)':>20} | {'different-init student':>22}")
for point in curve["points"]:
    summary = atlas["points"][point["fingerprint"]]["summary"]
    s, c = summary["student_aux"], summary["cross_aux"]
    print(
        f"{point['x']:>22} | {s['mean']:.3f} ± {s['ci95']:.3f} (n={len(atlas['points'][point['fingerprint']]['accuracy']['student_aux'])}) | {c['mean']:>11.3f} ± {c['ci95']:.3f}"
    )
display(Image(filename=str(DOCS / "atlas" / "atlas_optimizer.png"), width=700))

# %% [markdown]
# In the toy model the trait (the digits) transfers under **every** optimizer, SGD with
# momentum and signSGD included, well above chance (0.1) and above the student with a
# different initialization. This is the lemma's world: the student's logits share the
# teacher's parameters, so any descent on the teacher's outputs moves it toward the
# teacher. The language models of Blank et al. need Adam because the trait's direction is
# a small part of each gradient; in the toy model it is most of it.

# %% [markdown]
# ## 5. What this notebook found, and what to try
#
# - At 135M a steering vector **does not** stand in for the owl prompt: the prompt's
#   effect on numbers is tiny, and any vector strong enough to move the animal moves the
#   numbers far more.
# - Students **do** learn their teacher's vector, but the neutral student learns it as
#   well: the shared direction is "a prompt about an animal", and the animal itself does
#   not travel (three seeds; the intervals are wide).
# - In the toy model the trait travels under every optimizer, as the lemma predicts.
#
# Things to try (each a setting of the same study):
#
# 1. The committed sweep points to layer 23 with α = 2 (gain and specificity positive for
#    all three animals). Run the study there:
#    `sublearn lm transfer --preset mechanism-cpu --set transfer.steer_layer=23
#    --set transfer.steer_alpha=2 --out runs/l23`.
# 2. Finetuned teachers carry their trait in their weights:
#    `--set 'transfer.teachers=["finetuned"]'` with `transfer.mechanism=true` adds the
#    parameter cosines of `sublearn mnist --track` to every student's record.
# 3. The optimizer in the language study: `--set finetune.optimizer=sgd` (or `signsgd`)
#    with a rate picked on the distillation loss.

# %%
print(f"notebook ran in {time.perf_counter() - STARTED:.0f} s ({'quick' if QUICK else 'full'} mode)")
