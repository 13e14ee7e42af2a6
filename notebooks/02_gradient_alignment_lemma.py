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
# # Why a student follows its teacher: the gradient-alignment lemma
#
# The MNIST notebook showed a student learning digits by imitating meaningless outputs on
# noise, but only when it shared its teacher's initialization. The paper explains this
# with a short result (Lemma 1 and Theorem 1 of *Subliminal Learning*, Cloud et al., 2025):
# **one small step of imitation moves a student toward its teacher, whatever the inputs,
# as long as both started from the same parameters.** This notebook
#
# 1. states the lemma;
# 2. derives it with sympy, rendered as LaTeX: why the zeroth-order term vanishes, what
#    the matrix $M$ is, and why it is positive semi-definite;
# 3. checks it numerically on the MNIST network, with the alignment plotted against the
#    teacher's step size;
# 4. shows what goes wrong when the initializations differ;
# 5. follows the alignment along whole training runs, and shows two curves of the atlas;
# 6. runs a small hypothesis property test over random networks.
#
# Everything calls the `theory` package (and `toymodels` for the MNIST network).
#
# **Running it.** Full mode takes a couple of minutes on a laptop CPU. Set
# `SUBLEARN_QUICK=1` in the environment before starting Jupyter for *quick mode*: the
# same checks on fewer seeds and hypothesis examples. `python notebooks/build.py
# 02_gradient_alignment_lemma` regenerates the executed copy.

# %%
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display
from hypothesis import HealthCheck, Phase, given, note, settings

from theory import SubsetSoftmaxCrossEntropy, check_alignment, convergence, symbolic, tolerances
from theory.cases import MLP, CaseSpec, build_case
from theory.numerical import RESOLUTION, tree_norm
from theory.strategies import case_specs
import toymodels
from toymodels import load_mnist
from toymodels.atlas import ATLAS, format_atlas
from toymodels.cli import format_trajectory
from toymodels.data import normalize
from toymodels.losses import digit_cross_entropy
from toymodels.model import MLPSpec, apply, init_params, perturb_params
from toymodels.noise import noise_images, noise_words

# %matplotlib inline

QUICK = os.environ.get("SUBLEARN_QUICK", "0") not in ("", "0")
STARTED = time.perf_counter()
print(f"Mode: {'quick (SUBLEARN_QUICK=1): fewer seeds and examples' if QUICK else 'full'}")

# %% [markdown]
# ## 1. The statement
#
# A model $f_\theta$ maps an input $x$ to outputs $z = f_\theta(x)$ (logits). Teacher and
# student both start at $\theta_0$.
#
# * The **teacher** takes a small step: $\theta_T = \theta_0 + \varepsilon\,\Delta\theta_T$,
#   for example one gradient step on its own loss, $\Delta\theta_T = -\nabla L_T(\theta_0)$.
# * The **student** takes one gradient step on imitating the teacher's outputs, on inputs
#   from *any* distribution $D$:
#   $$\Delta\theta_S = -\nabla_\theta\,\mathbb E_{x\sim D}\big[L_S(f_\theta(x),\, f_{\theta_T}(x))\big]\Big|_{\theta=\theta_0}.$$
#
# **Lemma.** If the imitation loss $L_S(z, y)$ is *proper* (for each target $y$ it is
# smallest at $z = y$; squared error and softmax cross-entropy are), then
# $$\Delta\theta_S\cdot\Delta\theta_T = \varepsilon\,\mathbb E_x\big[u^\top M\,u\big] + O(\varepsilon^2) \;\ge\; 0
#   \quad\text{to first order, where}\quad u = J\,\Delta\theta_T,\quad M = -\frac{\partial^2 L_S}{\partial y\,\partial z}\Big|_{z=y},$$
# $J$ is the Jacobian of the outputs with respect to the parameters at $\theta_0$, and $M$ is
# positive semi-definite.
#
# **Theorem.** When the teacher stepped down its loss ($\Delta\theta_T = -\nabla L_T$), the
# student's step does not increase the teacher's loss to first order:
# $L_T(\theta_0 + \alpha\Delta\theta_S) \le L_T(\theta_0)$.
#
# Nothing here depends on $D$: the student can imitate on noise images, or on number
# sequences, and its step still has a non-negative inner product with the teacher's.
# That is a statement about one direction in parameter space, to first order in
# $\varepsilon$: the student's step need not copy every trait of the teacher, but its
# component along $\Delta\theta_T$ is positive, and so, by the theorem, it lowers the
# teacher's loss $L_T$, which the imitation data never mentions. In the MNIST experiment,
# $L_T$ is the digit loss, $L_S$ is the cross-entropy over the three auxiliary logits and
# $D$ is noise.

# %% [markdown]
# ## 2. The derivation, symbolically
#
# The student's gradient step pulls the gradient of $L_S$ in the outputs back through
# $J^\top$; dotting it with $\Delta\theta_T$ gives, for one input, $a(\varepsilon) =
# -\nabla_z L_S(z, y)^\top u$ with the student's outputs $z = c$ and the teacher's $y = c +
# \varepsilon u + O(\varepsilon^2)$. Expand any smooth loss to second order around $z =
# y = c$ and read off the coefficients. `theory.symbolic` does this with sympy; each
# derivation lists its steps and the identities sympy verified exactly.

# %%
def show(derivation):
    """Render a derivation's LaTeX, then the claims sympy checked."""
    display(derivation)
    for claim, verified in derivation.checks.items():
        print(f"  [{'verified' if verified else 'FAILED'}] {claim}")


show(symbolic.alignment_expansion(2))

# %% [markdown]
# The zeroth-order term is $-g^\top u$, the gradient of the loss at $z = y$. A proper
# loss is minimised at $z = y$ for every $y$, so that gradient is zero: **the
# zeroth-order term vanishes**, and the first-order coefficient is $u^\top M u$ with $M$
# equal to the Hessian of $L_S$ in $z$ at its minimum, hence positive semi-definite.
#
# For the two losses used in practice, $M$ is explicit. Squared error gives $M = 2I$:

# %%
show(symbolic.squared_error(2))

# %% [markdown]
# Softmax cross-entropy (what the MNIST students and language-model finetuning use) gives
# $M = \operatorname{diag}(p) - pp^\top$ with $p = \operatorname{softmax}(y)$, the
# covariance matrix of a one-hot draw from $p$. The quadratic form is a $p$-weighted
# variance, $u^\top M u = \sum_i p_i (u_i - \bar u)^2 \ge 0$: positive semi-definite,
# and zero only along the constant direction, which does not change the softmax.

# %%
show(symbolic.softmax_cross_entropy(3))

# %% [markdown]
# The MNIST aux-only student imitates a *subset* of the logits. Then $M$ is the softmax
# covariance of that subset and zero elsewhere: still positive semi-definite, just with a
# larger null space (here logits 3 and 4 of 5 play the role of the auxiliary logits).

# %%
show(symbolic.subset_softmax_cross_entropy(5, (3, 4)))

# %% [markdown]
# Properness is what makes $M$ positive semi-definite. A loss that is stationary at $z = y$
# but not minimal there keeps the zeroth-order term at zero, yet its $M$ can have a
# negative eigenvalue, and then the student can move *against* the teacher:

# %%
show(symbolic.non_proper_loss())

# %% [markdown]
# ## 3. The numbers, on the MNIST network
#
# Now the real thing: the paper's MLP (784 → 256 → 256 → 10 + 3, ReLU), a teacher that
# steps down its digit cross-entropy on 256 MNIST images, and a student that imitates
# only the three auxiliary logits on 64 noise images. `check_alignment` computes the
# student's step, the alignment $\Delta\theta_S\cdot\Delta\theta_T$, its Taylor
# coefficients (by forward-mode differentiation, in float64), and the change of the
# teacher's loss after the student's step. It chooses $\varepsilon$ itself: the largest
# step at which the second-order terms are a tenth of the first-order ones, halved until
# the measured alignment and loss change follow their first-order predictions, but never
# so far that $\varepsilon A$ sinks toward float64 rounding (where every sign check would
# pass whatever the student did). A case that cannot meet both is reported as "not in
# the Taylor regime".

# %%
spec = MLPSpec(hidden=(256, 256), n_aux=3)


def mnist_mlp(params, x):
    return apply(spec, params, x)


mnist = load_mnist()
digits = jnp.asarray(normalize(mnist.train_images[:256]))
labels = jnp.asarray(mnist.train_labels[:256])
uniform_weights = jnp.full(256, 1 / 256)


def digit_loss(params):
    """The teacher's loss L_T: cross-entropy of the ten digit logits."""
    return digit_cross_entropy(mnist_mlp(params, digits), labels, uniform_weights)


noise = noise_images(noise_words(jax.random.key(0)), jnp.arange(64), 784, "uniform")
aux_only = SubsetSoftmaxCrossEntropy((10, 11, 12))
theta0 = init_params(spec, jax.random.key(1))

result = check_alignment(mnist_mlp, theta0, noise, student_loss=aux_only, teacher_loss=digit_loss)
tol = tolerances(result)
print(f"teacher step eps (automatic)            {result.eps:.2e}   after {result.halvings} halvings")
print(f"zeroth-order term a_0                   {result.zeroth_order:+.1e}   (exactly 0 up to rounding)")
print(f"first-order coefficient A = E[u^T M u]  {result.A:+.3e}")
print(f"alignment  dtheta_S . dtheta_T          {result.alignment:+.3e}   (eps * A = {result.first_order:+.3e})")
print(f"cosine between the two steps            {result.cosine:+.3f}")
print(f"teacher's loss after the student's step {result.teacher_loss_change:+.2e}   (first order: {result.eps * result.teacher_loss_first:+.2e})")
print(f"eps * A over its rounding tolerance     {abs(result.first_order) / tol['alignment']:.1e}   (at least {RESOLUTION:.0e} required)")
print(f"claims violated                         {result.violations() or 'none'}")

# %% [markdown]
# The cosine is small (the student's step is mostly *not* along the teacher's: it only
# sees three outputs on noise), but it is positive, the alignment matches $\varepsilon A$,
# and that is enough for the student's digit loss to go down.
#
# The lemma is a statement about small $\varepsilon$. Sweeping $\varepsilon$ over many
# decades shows its two parts: the alignment grows like $\varepsilon$ (slope 1 on log
# axes) because the zeroth-order term is zero, and the error of the first-order
# prediction $\varepsilon A$ shrinks like $\varepsilon^2$ (slope 2) until it reaches
# float64 rounding. The right panel repeats this on a small smooth network (tanh, four
# inputs, a teacher stepping down cross-entropy on random labels) from `theory.cases`.
# The axes are logarithmic, so they show $|a(\varepsilon)|$; the sign is in the markers:
# a filled circle where the alignment is positive, a red cross where it is negative.

# %%
eps_grid = np.logspace(-12, 0, 13 if QUICK else 37)

tanh_case = build_case(
    CaseSpec(MLP((4, 16, 16, 5), "tanh"), init="normal", init_scale=1.0, bias_scale=0.0, inputs="normal",
             n_samples=32, student_loss="softmax_cross_entropy", teacher="cross_entropy", seed=0)
)
runs = {
    "MNIST MLP (ReLU), aux-only student on noise": convergence(
        mnist_mlp, theta0, noise, student_loss=aux_only, teacher_loss=digit_loss, eps_grid=eps_grid
    ),
    "small tanh MLP, softmax cross-entropy": convergence(
        tanh_case.model, tanh_case.params, tanh_case.inputs, eps_grid=eps_grid, **tanh_case.check_kwargs()
    ),
}

fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained", sharey=True)
for ax, (title, conv) in zip(axes, runs.items()):
    eps = np.asarray(conv.eps)
    alignment = np.asarray(conv.alignment)
    ax.loglog(eps, np.abs(alignment), "-", color="C0", label=r"$|\Delta\theta_S\cdot\Delta\theta_T|$")
    ax.loglog(eps[alignment > 0], alignment[alignment > 0], "o", color="C0", label="alignment > 0")
    ax.loglog(eps[alignment <= 0], -alignment[alignment <= 0], "x", color="red", ms=9, label="alignment <= 0")
    ax.loglog(eps, conv.residual, "s-", color="C1", label=r"error of $\varepsilon A$: $|a(\varepsilon) - \varepsilon A|$")
    mid = len(eps) // 2
    ax.loglog(eps, conv.alignment[mid] * eps / eps[mid], "k:", lw=1, label="slope 1")
    fitted = np.asarray(conv.fitted)
    if fitted.any():
        anchor = np.flatnonzero(fitted)[0]
        ax.loglog(eps, conv.residual[anchor] * (eps / eps[anchor]) ** 2, "k--", lw=1, label="slope 2")
        ax.loglog(eps[fitted], np.asarray(conv.residual)[fitted], "o", mfc="none", mec="k", ms=11, label="fitted")
    ax.axhline(conv.rounding, color="grey", lw=0.8, ls="-.", label="rounding level")
    ax.set_title(
        f"{title}\nfitted error order {conv.order:.2f} over {conv.n_fitted} points (predicted {conv.expected_order}); "
        f"error / |C| eps^2 = {conv.second_order_ratio:.2f}",
        fontsize=9,
    )
    ax.set_xlabel(r"teacher step $\varepsilon$")
    ax.set_ylim(1e-20, 1)
axes[0].set_ylabel("absolute value")
axes[0].legend(fontsize=8, loc="upper left")
plt.show()
for title, conv in runs.items():
    positive = int(np.sum(np.asarray(conv.alignment) > 0))
    print(f"{title}: alignment > 0 at {positive} of {len(conv.eps)} values of eps")

# %% [markdown]
# Both networks show slope 1 for the alignment and slope 2 for the error of the
# first-order prediction, down to rounding (around $10^{-18}$). The ReLU network's error
# jumps up around $\varepsilon \approx 10^{-3}$: there the teacher's step is large enough
# to flip some ReLU units on or off, the network stops being a smooth function of its
# parameters along the path, and the Taylor expansion only holds between such kinks.
# The circled points are the ones the order fit uses (`theory.numerical.Convergence`):
# from the smallest $\varepsilon$ whose error stands ten times above the rounding level
# (the dash-dotted line, the largest error over the grid's last two decades) up to where
# the second-order term $|C|\varepsilon^2$ stops accounting for the error, which on the
# ReLU network is where units start to flip.
# The markers carry the sign, which the logarithmic axes cannot: here the alignment is
# positive at every $\varepsilon$ of the grid, in both networks (the counts under the
# figure). The lemma itself promises that only for small enough $\varepsilon$; up to
# $\varepsilon = 1$ is an observation about these two networks.
#
# ## 4. Different initializations
#
# The derivation used two facts about the starting point. The student's outputs equal the
# teacher's initial outputs, so the imitation gradient at $\varepsilon = 0$ is zero; and
# the student's Jacobian is the teacher's, so the first-order term is a quadratic form. If
# the student starts elsewhere, both fail:
# $$a(\varepsilon) = a_0 + \varepsilon A_\times + O(\varepsilon^2),\qquad
#   A_\times = \mathbb E_x\big[(J_S\Delta\theta_T)^\top M\,(J_T\Delta\theta_T)\big].$$
#
# * The zeroth-order term $a_0 \neq 0$ is the pull toward the teacher's *initial* outputs:
#   it is there before the teacher has learned anything, does not depend on what it
#   learned, and for a small teacher step it dominates the alignment.
# * The cross term $A_\times$ is what the teacher's step adds. With $J_S \neq J_T$ it is
#   not a quadratic form, so nothing makes it non-negative.
#
# A negative alignment under different initializations is therefore no violation of the
# lemma, whose hypotheses do not hold there. `check_alignment` reports the three numbers
# apart: `zeroth_order` ($a_0$), `A` ($A_\times$ when `student_params` is given) and
# `eps_part` ($a(\varepsilon) - a_0$, which follows $\varepsilon A_\times$).
#
# First, students that start from an independent initialization (the cross-model
# control of the MNIST notebook), against students that share it, over many seeds:

# %%
n_seeds = 8 if QUICK else 40
eps_small = 1e-4
shared_cos, other_cos, shared_dl, other_dl = [], [], [], []
other_a0, other_cross, other_eps_part = [], [], []
for seed in range(n_seeds):
    teacher_init = init_params(spec, jax.random.fold_in(jax.random.key(10), seed))
    foreign_init = init_params(spec, jax.random.fold_in(jax.random.key(20), seed))
    kwargs = dict(student_loss=aux_only, teacher_loss=digit_loss, eps=eps_small)
    shared = check_alignment(mnist_mlp, teacher_init, noise, **kwargs)
    other = check_alignment(mnist_mlp, teacher_init, noise, student_params=foreign_init, **kwargs)
    shared_cos.append(shared.cosine)
    other_cos.append(other.cosine)
    shared_dl.append(shared.teacher_loss_change)
    other_dl.append(other.teacher_loss_change)
    other_a0.append(other.zeroth_order)
    other_cross.append(other.A)
    other_eps_part.append(other.eps_part)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
bins = np.linspace(min(other_cos + shared_cos), max(other_cos + shared_cos), 25)
axes[0].hist(shared_cos, bins=bins, alpha=0.8, label="shared initialization", color="#1f77b4")
axes[0].hist(other_cos, bins=bins, alpha=0.8, label="independent initialization", color="#d62728")
axes[0].axvline(0, color="black", lw=0.8)
axes[0].set_xlabel(r"cosine between $\Delta\theta_S$ and $\Delta\theta_T$")
axes[0].set_ylabel("seeds")
axes[0].legend(fontsize=8)
axes[1].scatter(range(n_seeds), shared_dl, color="#1f77b4", label="shared", s=14)
axes[1].scatter(range(n_seeds), other_dl, color="#d62728", label="independent", s=14)
axes[1].axhline(0, color="black", lw=0.8)
axes[1].set_yscale("symlog", linthresh=1e-6)
axes[1].set_xlabel("seed")
axes[1].set_ylabel(r"$L_T(\theta_S) - L_T(\theta_{S0})$")
axes[1].set_title("change of the teacher's digit loss after one student step", fontsize=9)
axes[1].legend(fontsize=8)
plt.show()
print(f"shared initialization:      {np.mean(np.asarray(shared_cos) > 0):.0%} of {n_seeds} seeds aligned")
print(f"independent initialization: {np.mean(np.asarray(other_cos) > 0):.0%} of {n_seeds} seeds aligned")
print("independent initialization, how often each part is negative:")
print(f"  zeroth-order term a_0                  {np.sum(np.asarray(other_a0) < 0)}/{n_seeds}")
print(f"  cross term A_x                         {np.sum(np.asarray(other_cross) < 0)}/{n_seeds}")
print(f"  eps-dependent part a(eps) - a_0        {np.sum(np.asarray(other_eps_part) < 0)}/{n_seeds}   (eps = {eps_small:g})")
print(f"  median |a_0| / |a(eps) - a_0|          {np.median(np.abs(other_a0) / np.abs(other_eps_part)):.0f}")

# %% [markdown]
# Every shared-initialization student is aligned with its teacher and lowers the
# teacher's loss; independent students scatter around zero on both sides. The counts
# under the figure separate the three parts of the independent students' alignment. At
# $\varepsilon = 10^{-4}$ the zeroth-order term is typically thousands of times larger
# than the part the teacher's step adds (the median ratio is printed), so the
# alignment's sign is mostly $a_0$'s, a pull that has nothing to do with what the teacher
# learned. The part that does, $a(\varepsilon) -
# a_0 \approx \varepsilon A_\times$, is itself negative for a large fraction of seeds
# (about half in the full run): from an independent start, the teacher's step pulls the
# student's step away from it about as often as toward it.
#
# Between the two extremes, start the student at $\theta_0$ plus Gaussian noise of
# $\sigma$ times each layer's initialization scale (the `student_init_sigma` of the
# MNIST sweep). Then $a_0$ grows in proportion to the distance
# $\lVert\theta_{S0} - \theta_0\rVert$, while the useful term $\varepsilon A$ grows with
# the teacher's displacement $\varepsilon\lVert\Delta\theta_T\rVert$. So the natural,
# unit-free measure of "how far away" is the ratio of the two distances,
# $\lVert\theta_{S0} - \theta_0\rVert / (\varepsilon\lVert\Delta\theta_T\rVert)$: $\sigma$
# and $\varepsilon$ themselves are in different units ($\sigma$ in units of the init scale,
# $\varepsilon$ multiplies the gradient $\nabla L_T$), so comparing them directly means
# nothing. Plotted against the ratio, the curves for different teacher steps should fall
# on top of each other.

# %%
sigmas = np.logspace(-6, 0, 5 if QUICK else 13)
eps_values = [1e-4, 1e-2] if QUICK else [1e-5, 1e-3, 1e-1]
n_perturb = 6 if QUICK else 24
teacher_step_norm = float(tree_norm(result.dtheta_T))  # ||dtheta_T|| at theta0, from section 3
fraction_aligned = {eps: [] for eps in eps_values}
distance_ratio = {eps: [] for eps in eps_values}
for sigma in sigmas:
    starts = [perturb_params(spec, theta0, jax.random.fold_in(jax.random.key(30), k), sigma) for k in range(n_perturb)]
    offset = np.mean([float(tree_norm(jax.tree.map(jnp.subtract, s, theta0))) for s in starts])
    for eps in eps_values:
        aligned = [
            check_alignment(mnist_mlp, theta0, noise, student_loss=aux_only, teacher_loss=digit_loss, student_params=s, eps=eps).alignment > 0
            for s in starts
        ]
        fraction_aligned[eps].append(np.mean(aligned))
        distance_ratio[eps].append(offset / (eps * teacher_step_norm))

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained", sharey=True)
for eps in eps_values:
    axes[0].semilogx(sigmas, fraction_aligned[eps], "o-", label=rf"teacher step $\varepsilon$ = {eps:g}")
    axes[1].semilogx(distance_ratio[eps], fraction_aligned[eps], "o-", label=rf"$\varepsilon$ = {eps:g}")
for ax in axes:
    ax.axhline(0.5, color="gray", ls=":", lw=1, label="coin flip")
    ax.set_ylim(0, 1.05)
axes[0].set_xlabel(r"student start perturbation $\sigma$ (in units of the init scale)")
axes[1].set_xlabel(r"$||\theta_{S0} - \theta_0||\;/\;(\varepsilon\,||\Delta\theta_T||)$: student offset over teacher displacement")
axes[0].set_ylabel(f"fraction of {n_perturb} starts aligned")
axes[0].legend(fontsize=8)
plt.show()
for eps in eps_values:
    ratios, fractions = np.asarray(distance_ratio[eps]), np.asarray(fraction_aligned[eps])
    below = ratios[fractions < 0.9]
    print(f"eps = {eps:g}: fewer than 90% of starts aligned once the distance ratio exceeds {below.min() if below.size else float('inf'):.2g}")

# %% [markdown]
# Against $\sigma$ (left) each teacher step has its own threshold, and where it lies in
# $\sigma$ depends on the units of $\sigma$ and $\varepsilon$. Against the distance ratio
# (right) the curves fall on top of each other: every student stays aligned while it
# starts within a few teacher displacements of $\theta_0$, alignment turns into a coin
# flip between about ten and a hundred (the printed thresholds), and stays one beyond. Over a whole training run the teacher moves a
# long way, so in the MNIST sweep the aux-only student survived perturbations up to
# about a tenth of the initialization scale. The lesson is the same at both scales: the
# hidden signal is only readable from (close to) the teacher's own starting point.
#
# ## 5. Beyond one step: whole training runs
#
# The lemma is about one infinitesimal step. `sublearn mnist --track 10` follows the
# students of the full MNIST experiment over all 295 steps of their training
# (`toymodels.track`): the cosine between the student's displacement and the teacher's,
# $\cos(\theta_S(t) - \theta_S(0),\ \theta_T - \theta_0)$, the same cosine for each
# single step, the teacher's loss $L_T$ at the student and its digit accuracy. The
# package ships such a run (10 seeds) in `docs/trajectory/`; it is loaded here, not
# recomputed.

# %%
DOCS = Path(toymodels.__file__).resolve().parent.parent / "docs"


def show_png(path, width=10.0):
    """Show a committed figure (a PNG under docs/) at its aspect ratio."""
    image = plt.imread(path)
    fig, ax = plt.subplots(figsize=(width, width * image.shape[0] / image.shape[1]))
    ax.imshow(image)
    ax.axis("off")
    plt.show()


trajectory_run = DOCS / "trajectory" / "results.json"
if trajectory_run.is_file():
    show_png(DOCS / "trajectory" / "trajectory.png")
    trajectory = json.loads(trajectory_run.read_text())["trajectory"]
    print(format_trajectory(trajectory))
    steps_cos = np.asarray(trajectory["conditions"]["student_aux"]["step_cos"]["values"])[:, 1:]
    print(f"shared-init aux-only students: per-step cosine > 0 at {np.mean(steps_cos > 0):.1%} of all tracked steps of all seeds")
else:
    print(f"no trajectory run in {trajectory_run.parent}")

# %% [markdown]
# The per-step cosine of the shared-initialization aux-only students stays positive along
# the run (the printed fraction counts the tracked steps where it is), so the
# displacement cosine accumulates; the cross-model students' cosines scatter around 0.
# This is an observation on this run, not a consequence of the lemma, which covers one
# small step from the shared start.
#
# The atlas (`sublearn atlas`, results in `docs/atlas/`) then asks how the end result
# depends on the knobs. Two of its curves bear on this notebook. The number of student
# epochs: the lemma's first step is followed by hundreds more, and the question is
# whether the effect keeps growing.

# %%
atlas_file = DOCS / "atlas" / ATLAS
atlas = json.loads(atlas_file.read_text()) if atlas_file.is_file() else None
if atlas is not None:
    show_png(DOCS / "atlas" / "atlas_student_epochs.png", width=7.5)
    print(format_atlas(atlas, ["student_epochs"]))

# %% [markdown]
# The effect keeps growing long after the first step, fast over the first five epochs
# and slowly after twenty, while the cross-model control stays near chance. Published
# replications report 19.7% after 1 epoch and 77.2% after 40; the curve passes close to
# both.
#
# And the student's start perturbation $\sigma$ of section 4, now over a whole run of
# the full experiment rather than one step: the curve below is the end accuracy, the
# section-4 plot the sign of the first step.

# %%
if atlas is not None:
    show_png(DOCS / "atlas" / "atlas_student_init_sigma.png", width=7.5)
    print(format_atlas(atlas, ["student_init_sigma"]))

# %% [markdown]
# A perturbation of a hundredth or a tenth of the init scale changes little; at 0.4 the
# end accuracy has halved, and at 1 it is at chance, as for a foreign initialization.
# This matches the published 0.555 at sigma 0 and 0.26 at 0.4, and the one-step picture
# of section 4: the signal is readable only from close to the teacher's start.
#
# ## 6. A property test with hypothesis
#
# The lemma claims something for *every* network, initialization, input distribution,
# proper loss and teacher. `theory.strategies.case_specs` draws all of these at random
# (small MLPs with tanh, ReLU, GELU, softplus, sigmoid or no activation; normal, uniform
# or truncated-normal weights of random scale; five input distributions; squared error,
# softmax cross-entropy or a subset cross-entropy; a teacher that follows a random
# direction or the gradient of a random loss). The property: with a shared
# initialization, none of the lemma's and theorem's claims is violated beyond rounding,
# and each case was measured in the Taylor regime, with $\varepsilon A$ far above
# rounding (otherwise `violations()` says "not in the Taylor regime").

# %%
n_examples = 5 if QUICK else 40


@settings(max_examples=n_examples, deadline=None, derandomize=True, database=None)
@given(spec=case_specs())
def shared_initialization_never_misaligns(spec):
    case = build_case(spec)
    r = check_alignment(case.model, case.params, case.inputs, **case.check_kwargs(shared_init=True))
    note(f"A={r.A:.3e}, alignment={r.alignment:.3e}, eps={r.eps:.2e} after {r.halvings} halvings")
    assert not r.violations(), r.violations()


shared_initialization_never_misaligns()
print(f"passed on {n_examples} random cases")

# %% [markdown]
# With independent initializations the first-order claim itself is false: the cross
# term $A_\times$ can be negative, so the teacher's step can push the student's step away
# from it, not just fail to outweigh $a_0$. Hypothesis finds such a case quickly (it stops
# at the first one here rather than shrinking it, since every shrink step compiles a new
# network):

# %%
@settings(
    max_examples=40, deadline=None, derandomize=True, database=None,
    phases=[Phase.generate], suppress_health_check=[HealthCheck.too_slow],
)
@given(spec=case_specs())
def independent_initialization_never_misaligns(spec):
    case = build_case(spec)
    r = check_alignment(case.model, case.params, case.inputs, **case.check_kwargs(shared_init=False))
    assert r.A >= -1e-3 * (r.A_scale + r.jvp_scale), (
        f"cross term A_x = {r.A:.3e}; a(eps) - a_0 = {r.eps_part:.3e} at eps = {r.eps:.2e} "
        f"(eps A_x = {r.first_order:.3e}); zeroth-order term a_0 = {r.zeroth_order:.3e}"
    )


try:
    independent_initialization_never_misaligns()
    print("no counterexample found")
except AssertionError as failure:
    print("counterexample:", failure)
    for line in getattr(failure, "__notes__", []):
        print(" ", line)

# %% [markdown]
# **Try next:** `python -m theory --help` (or `sublearn theory`) runs these checks from the
# command line on many random cases; `symbolic.linear_model()` works the whole alignment
# out in closed form for a linear model.

# %%
print(f"Notebook wall time: {time.perf_counter() - STARTED:.0f} s ({'quick' if QUICK else 'full'} mode)")
