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
# # Subliminal learning on MNIST: digits learned from noise
#
# This notebook walks through the toy experiment of Section 6 of *Subliminal Learning:
# Language models transmit behavioral traits via hidden signals in data* (Cloud et al.,
# 2025). A small network learns to classify handwritten digits **without ever seeing a
# digit or a label**: it only imitates another network's outputs on random noise, and
# only outputs that have nothing to do with digits. The trick works when both networks
# started from the same random weights, and fails otherwise.
#
# You will
#
# 1. meet the teacher, the students and the controls;
# 2. see why the teacher's "meaningless" auxiliary outputs carry information about digits;
# 3. run a small version of the experiment live and compare it with the paper's numbers;
# 4. answer one question with a sweep: how close to the teacher's starting point must a
#    student start?
# 5. see two curves of the atlas (`sublearn atlas`): the effect against the students'
#    input data and against the teacher's training, next to the published numbers.
#
# **Running it.** Everything here calls the `toymodels` package. By default the notebook
# runs in *full mode* (a few minutes on a laptop CPU). Set the environment variable
# `SUBLEARN_QUICK=1` before starting Jupyter for *quick mode*, which runs the same code on
# fewer seeds, images and epochs (about a minute; the numbers get noisier). To regenerate
# the executed copy next to this file, run `python notebooks/build.py 01_mnist_toy_model`.
# If you have the results of a full paper-sized run (`sublearn mnist --out DIR`), point
# `SUBLEARN_MNIST_RESULTS` at its `results.json` and the notebook plots it too.

# %%
import json
import os
import time
import warnings
from pathlib import Path

import toymodels

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from toymodels import CONDITIONS, PAPER_RESULTS, ExperimentResult, load_mnist, run_experiment, tiny
from toymodels.atlas import ATLAS, format_atlas
from toymodels.config import PAPER
from toymodels.data import normalize
from toymodels.figure import plot_results
from toymodels.losses import digit_cross_entropy
from toymodels.model import MLPSpec, apply, init_params
from toymodels.noise import noise_images, noise_words
from toymodels.progress import BarProgress
from toymodels.sweep import plot_sweep, run_sweep

# %matplotlib inline
# Without ipywidgets, tqdm draws a text progress bar (all we need) and warns that it does.
warnings.filterwarnings("ignore", message="IProgress not found")

QUICK = os.environ.get("SUBLEARN_QUICK", "0") not in ("", "0")
STARTED = time.perf_counter()
print(f"Mode: {'quick (SUBLEARN_QUICK=1): small runs, noisy numbers' if QUICK else 'full'}")
print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores")

# %% [markdown]
# ## 1. The cast: one teacher, four students
#
# Every network is the same MLP: a flattened 28x28 image goes through two hidden layers of
# ReLUs to **10 + m outputs** (logits). The first ten are the usual digit logits. The
# other `m` (three in the paper) are *auxiliary logits*: no loss ever asks them to mean
# anything.
#
# * The **teacher** starts from random weights $\theta_0$ and is trained on MNIST with the
#   usual cross-entropy on its ten digit logits. Its auxiliary logits are never trained.
# * Each **student** is trained to imitate the teacher on **random noise images**, by
#   minimising the KL divergence between the softmaxes of their logits. Students never
#   see a digit or a label.
#
# The four students differ in where they start and which logits they imitate:
#
# | condition | starts from | imitates | what it tests |
# |---|---|---|---|
# | `student_aux` | the teacher's own $\theta_0$ | the $m$ auxiliary logits only | **subliminal learning** |
# | `student_all` | the teacher's own $\theta_0$ | all $10+m$ logits | ordinary distillation on noise |
# | `cross_aux` | another seed's $\theta_0$ | the $m$ auxiliary logits only | is a shared start needed? |
# | `cross_all` | another seed's $\theta_0$ | all $10+m$ logits | distillation without a shared start |
#
# Two more bars complete the picture: the **reference** (the untrained $\theta_0$, chance
# level) and the **teacher** itself. This is what the students see, next to what the
# teacher saw:

# %%
mnist = load_mnist()
words = noise_words(jax.random.key(0))
noise = np.asarray(noise_images(words, jnp.arange(6), 784, "uniform"))
digits = np.asarray(normalize(mnist.train_images[:6]))

fig, axes = plt.subplots(2, 6, figsize=(8, 3), layout="constrained")
for ax, image, label in zip(axes[0], digits, mnist.train_labels[:6]):
    ax.imshow(image.reshape(28, 28), cmap="gray", vmin=-1, vmax=1)
    ax.set_title(f"label {label}", fontsize=9)
for ax, image in zip(axes[1], noise):
    ax.imshow(image.reshape(28, 28), cmap="gray", vmin=-1, vmax=1)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
axes[0, 0].set_ylabel("teacher\ntrains on", fontsize=9)
axes[1, 0].set_ylabel("students\nimitate on", fontsize=9)
plt.show()

# %% [markdown]
# ## 2. Why the auxiliary logits are not meaningless
#
# The teacher's loss only involves its digit logits, so the weights that feed the
# auxiliary logits directly (the last layer's aux columns) get **exactly zero gradient**
# and stay at their initial values. But every hidden weight *is* trained, and the
# auxiliary logits read the last hidden layer. So the teacher's auxiliary logits do
# change during training: they are a fixed random projection of a representation that
# has learned about digits.
#
# A student that starts from the same $\theta_0$ has the *same* fixed projection. To
# reproduce the teacher's auxiliary logits it has to move its hidden layers the way the
# teacher moved them, and that drags its digit logits along. The next notebook proves the
# small-step version of this: when teacher and student share their initialization, a
# gradient step of imitation on *any* inputs moves the student toward the teacher. A
# student from another initialization has a different projection, and matching its
# auxiliary outputs tells it nothing useful.
#
# Here is the first half of that argument, checked on the paper's architecture: one
# gradient of the teacher's digit loss, on a batch of digits.

# %%
spec = MLPSpec(hidden=(256, 256), n_aux=3)
theta0 = init_params(spec, jax.random.key(1))
images = normalize(mnist.train_images[:512])
labels = jnp.asarray(mnist.train_labels[:512])
weights = jnp.full(512, 1 / 512)

grads = jax.grad(lambda p: digit_cross_entropy(apply(spec, p, images), labels, weights))(theta0)
last = max(grads["layers"])
aux_columns = grads["layers"][last]["kernel"][:, 10:]
print(f"gradient on the weights into the aux logits: max |g| = {float(jnp.max(jnp.abs(aux_columns))):.1e}")
print(f"gradient on the first hidden layer:          max |g| = {float(jnp.max(jnp.abs(grads['layers'][0]['kernel']))):.1e}")

step = jax.tree.map(lambda p, g: p - 0.5 * g, theta0, grads)
aux_before = apply(spec, theta0, noise)[:, 10:]
aux_after = apply(spec, step, noise)[:, 10:]
print(f"aux logits on noise, mean |change| after one step: {float(jnp.mean(jnp.abs(aux_after - aux_before))):.3f}")

# %% [markdown]
# The gradient into the auxiliary logits is exactly zero, yet one step on digits changes
# the auxiliary logits on noise images: the change comes entirely through the shared
# hidden layers. That change is the hidden signal the student picks up.
#
# ## 3. The experiment, live
#
# The paper trains each teacher for 5 epochs on all 60,000 training images and each
# student for 5 epochs on 60,000 noise images, with 100 seeds. That takes a while on a CPU
# (`sublearn mnist` runs it, with a resumable checkpoint), so here we run a narrower
# network on part of the data, for three epochs each, with a handful of seeds. The small
# configuration (`toymodels.tiny`) also changes the optimizer's settings, which lets such
# short training still learn: a learning rate of 1e-3 instead of 3e-4, and batches of 128
# instead of 1024. The cell prints every setting that differs from the paper's. Every
# seed has its own teacher, its own four students, and its own cross-model partner.

# %%
if QUICK:
    live_config = tiny(seeds=3, seeds_per_chunk=3)
else:
    live_config = tiny(
        hidden=(128, 128), seeds=5, seeds_per_chunk=5, teacher_epochs=3, student_epochs=3,
        n_train=20_000, n_noise=20_000, n_test=5_000,
    )
for field, value in live_config.to_dict().items():  # what differs from the published setup
    if value != getattr(PAPER, field):
        print(f"  {field:<16} {value!s:>12}   (paper: {getattr(PAPER, field)})")

result = run_experiment(live_config, data=mnist, progress=BarProgress())
print(f"{result.wall_s:.0f} s")

# %% [markdown]
# Each bar is this run's mean test accuracy over seeds, with a 95% confidence interval;
# the black diamonds are the paper's numbers (100 seeds, full-size network and data). The
# table below the figure gives the same numbers.

# %%
plot_results(result, title=f"This notebook's run ({live_config.seeds} seeds, smaller network) vs the paper")
plt.show()
for condition, s in result.summary.items():
    paper_mean, paper_ci = PAPER_RESULTS[condition]
    print(f"  {condition:<12} {s['mean']:.3f} +- {s['ci95']:.3f}   paper {paper_mean:.3f} +- {paper_ci:.3f}"
          f"   difference {s['mean'] - paper_mean:+.3f}")

# %% [markdown]
# What to look for:
#
# * **`student_aux` is well above chance (0.1) and `cross_aux` is not.** A student that
#   only ever matched three meaningless outputs on noise learned to read digits, but only
#   when it started from the teacher's initialization. That is subliminal learning.
# * Distilling all logits (`student_all`) works better, as expected: the digit logits
#   carry the answer directly. Even so, the shared start helps (`student_all` beats
#   `cross_all`).
# * The smaller network, the shorter training and the other optimizer settings do not
#   simply lower every bar. In full mode the teacher and the all-logits student end about
#   0.03 below the paper's (0.916 and 0.888 against 0.943 and 0.913), while the aux-only
#   student lands on the paper's value (0.523 against 0.528) and the cross-model
#   all-logits student above it (0.757 against 0.743). In quick mode the intervals are
#   wide.
#
# If a full paper-sized run is available, here it is next to the paper:

# %%
full_results = os.environ.get("SUBLEARN_MNIST_RESULTS")
if full_results and Path(full_results).is_file():
    full = ExperimentResult.from_json(json.loads(Path(full_results).read_text()))  # summaries recomputed
    plot_results(full, title=f"A full run ({full.config.seeds} seeds) vs the paper")
    plt.show()
else:
    print("No full run given (set SUBLEARN_MNIST_RESULTS to a results.json from `sublearn mnist`).")
    print("The paper's numbers (mean, 95% CI over 100 seeds):")
    for condition in CONDITIONS:
        mean, ci = PAPER_RESULTS[condition]
        print(f"  {condition:<12} {mean:.3f} +- {ci:.3f}")

# %% [markdown]
# ## 4. One question: how much must the starting points agree?
#
# The effect needs a shared initialization: `cross_aux` sits at chance. But is "shared"
# all or nothing? The config field `student_init_sigma` starts every student not at its
# $\theta_0$ but at $\theta_0$ plus Gaussian noise of `student_init_sigma` times each
# layer's initialization scale. At 0 the aux-only student starts exactly where the teacher
# started; at 1 the perturbation is as large as the weights themselves. The cross-model
# student gets the same perturbation of *its* (foreign) start, as a control.
#
# The sweep reruns the live configuration once per value (in quick mode, just two values).

# %%
sigmas = [0.0, 1.0] if QUICK else [0.0, 0.1, 0.3, 1.0, 3.0]
sweep = run_sweep(live_config, "student_init_sigma", sigmas, data=mnist, progress=BarProgress())
plot_sweep(sweep, conditions=("student_aux", "cross_aux", "student_all"))
plt.show()

# %% [markdown]
# The aux-only student keeps its accuracy under a small perturbation (0.1), loses some at
# 0.3 and is back near chance by 1, where the perturbation is as large as the initial
# weights themselves. The hidden signal can only be read by a network close to the one
# that wrote it. Distillation on all logits is far more robust; it only fails at 3, where
# the perturbed weights are three times their usual scale and the network is badly
# conditioned for any training. This is the toy-model counterpart of the language-model
# finding that traits transmit between a teacher and a student of the same base model,
# and not across model families.
#
# ## 5. The atlas: the same effect against each knob
#
# `sublearn atlas` moves one knob at a time away from the paper's setup (full network,
# all data, 5 + 5 epochs) and records the aux-only students with a 95% CI over seeds,
# next to numbers published by others. Its results ship with the package in
# `docs/atlas/`; here are two of its curves, loaded rather than recomputed (each took
# many CPU minutes). First, the students' input data: the paper's uniform noise,
# Gaussian noise, real MNIST training images, the same images with their pixels
# shuffled by one fixed permutation, and the images inverted.

# %%
ATLAS_DIR = Path(toymodels.__file__).resolve().parent.parent / "docs" / "atlas"


def show_atlas_curve(name):
    """Show the committed figure of one atlas curve and print its numbers from atlas.json."""
    if not (ATLAS_DIR / ATLAS).is_file():
        print(f"no atlas in {ATLAS_DIR} (run `sublearn atlas --out {ATLAS_DIR}`)")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.imshow(plt.imread(ATLAS_DIR / f"atlas_{name}.png"))
    ax.axis("off")
    plt.show()
    print(format_atlas(json.loads((ATLAS_DIR / ATLAS).read_text()), [name]))


show_atlas_curve("student_data")

# %% [markdown]
# On noise, uniform or Gaussian, the aux-only student learns digits; on the teacher's own
# training images it barely does, in line with the published replication's 15% against
# 55%. One reading: on real digits the teacher's auxiliary logits move with the digit
# features the student's own initialization already computes, so imitating them carries
# little of the teacher's *change*; noise probes the whole input space. Shuffling or
# inverting the digits does not bring the effect back. The cross-model control stays at
# chance for every kind of data.
#
# Second, the teacher's training: 0 epochs (the teacher is its own initialization, so
# there is nothing to transmit) up to 20.

# %%
show_atlas_curve("teacher_epochs")

# %% [markdown]
# An untrained teacher transmits nothing (its students stay at chance). One or two
# teacher epochs transmit the most, and more training lowers what the student picks up:
# an inverted U, like the published replication's (peak at 2 epochs, lower at 20),
# though ours falls less steeply. The printed numbers are means over the atlas's 4 seeds,
# whose level at the paper's setup is above the 100-seed mean (see the README).
#
# **Try next:** `sublearn atlas --preset tiny --out /tmp/atlas` runs every curve in
# miniature (about 100 s of CPU time; a few minutes on a shared laptop);
# `sublearn mnist --student-data shuffled` trains students on pixel-shuffled digits.

# %%
print(f"Notebook wall time: {time.perf_counter() - STARTED:.0f} s ({'quick' if QUICK else 'full'} mode)")
