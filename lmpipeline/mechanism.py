r"""How the trait travels: steered teachers, the students' own vectors, sufficiency and
necessity, on the torch backend (``sublearn lm transfer --preset mechanism-cpu``).

Blank et al. (2026) account for subliminal learning as steering-vector distillation: a
trait system prompt acts on the teacher like one vector :math:`v_T` added to the residual
stream, and a student distilled on the teacher's numbers learns a vector of its own,
:math:`v_S`, that lines up with :math:`v_T` and carries the trait. This module measures
each part of that account with the transfer study's exact metric (log P of each animal as
the answer's first word) and its seed-as-unit statistics. Vectors are those of
:mod:`lmpipeline.steering`: mean residual streams at the last template token of number
prompts (the study's ``steer_prompts`` first prompts of each seed).

- **Steered teachers** (``transfer.teachers=["steered"]``): the base model plus
  :math:`\alpha\, v_T[\ell]` at layer :math:`\ell`, at every position, with :math:`v_T`
  the target's trait prompt's vector (:func:`lmpipeline.steering.trait_vector`); the neutral teacher is
  steered along the neutral prompt's vector, made the same way.
- **The sweep** (:func:`sweep`): for each layer and scale, the steered teacher's gain on
  its target over the base model, its specificity (that gain minus the mean gain of the
  other animals), and how much of the prompted teacher's next-token distribution on number
  completions it reproduces, :math:`1 - \mathrm{KL}(P \| S) / \mathrm{KL}(P \| B)` with
  :math:`P` the prompted teacher, :math:`S` the steered one and :math:`B` the base model
  (1: the steered teacher is the prompted one on numbers; 0: no closer than the base
  model). A direction of the same norm drawn at random is measured beside it.
- **The students' vectors** (``transfer.mechanism``, :func:`student_mechanism`):
  :math:`v_S = \bar h(S) - \bar h(B)` on the probe, its cosine per layer with its own
  teacher's vector and with every other teacher's of the seed, the cosine along training
  (:class:`lmpipeline.alignment.AlignmentTracker`), and
  - sufficiency: the metric under :math:`B + v_S[\ell]` (the student's vector added to
    the base model at layer :math:`\ell`, every position), and
  - necessity: the metric under the student with its component along :math:`v_S[\ell]`
    removed at layer :math:`\ell` (every position).
  :func:`summary` compares each with the neutral student treated the same way, per seed.

A finetuned teacher's vector is its :func:`~lmpipeline.steering.model_vector` (teacher
minus base on the probe); a prompted or steered teacher's is the trait prompt's
:func:`~lmpipeline.steering.trait_vector`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence

import torch

from lmpipeline.backends import Conversation, ModelRef, TrainExample
from lmpipeline.backends.tokens import training_rows
from lmpipeline.backends.torch_training import IGNORE, completion_logits, pad_left, soft_kl
from lmpipeline.config import NEUTRAL, FinetuneSpec
from lmpipeline.evaluation import first_word_logprobs
from lmpipeline.stats import mean_interval, one_sample_test
from lmpipeline.steering import activations, layer_cosines, random_direction, steer, steered, trait_vector


def to_rows(vector: torch.Tensor) -> list[list[float]]:
    """A ``[layers, hidden]`` vector as JSON-ready lists (float32 values)."""
    return [[float(x) for x in row] for row in vector.float()]


def from_rows(rows: Sequence[Sequence[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# -- distributions -----------------------------------------------------------------------
@torch.no_grad()
def completion_kl(backend, reference: ModelRef, other: ModelRef, examples: Sequence[TrainExample]) -> list[float]:
    r"""Per example, the mean over its completion positions of
    :math:`\mathrm{KL}(p_\text{reference} \| p_\text{other})` of the whole next-token
    distribution; ``reference`` reads each example's ``teacher_messages`` (say, with a
    system prompt) and ``other`` its ``messages``, both followed by the same completion."""
    rows_other, rows_ref = training_rows(
        backend.model_for(other)[1], examples, FinetuneSpec(objective="soft", max_seq_len=1024)
    )
    out = []
    for start in range(0, len(examples), 8):
        logits = {}
        for name, ref, rows in (("ref", reference, rows_ref), ("other", other, rows_other)):
            net, tokenizer = backend.model_for(ref)
            chunk = rows[start : start + 8]
            device = next(net.parameters()).device
            batch = pad_left(
                [r["input_ids"] for r in chunk], [r["labels"] for r in chunk], tokenizer.pad_token_id, device
            )
            with steered(net, ref.steering):
                logits[name], targets = completion_logits(net, batch)
        mask = (targets != IGNORE).float()
        for i in range(len(mask)):
            kl = soft_kl(logits["ref"][i : i + 1], logits["other"][i : i + 1], mask[i : i + 1])
            out.append(float(kl) / max(1.0, float(mask[i].sum())))
    return out


# -- teachers ----------------------------------------------------------------------------
def steered_ref(base: ModelRef, vector: torch.Tensor, layer: int, alpha: float) -> ModelRef:
    """``base`` plus ``alpha * vector[layer]`` at ``layer``'s output, every position (in
    place of any edits ``base`` had)."""
    return dataclasses.replace(base, steering=(steer(vector, layer, alpha),))


def _mean_logp(logp: dict[str, list[float]]) -> dict[str, float]:
    return {a: math.fsum(v) / len(v) for a, v in logp.items()}


def _gains(logp: dict[str, float], base: dict[str, float], target: str) -> dict[str, float]:
    gains = {a: logp[a] - base[a] for a in logp}
    others = [g for a, g in gains.items() if a != target]
    return {"gain": gains[target], "specificity": gains[target] - math.fsum(others) / len(others)}


def sweep(
    backend,
    base: ModelRef,
    *,
    target: str,
    system_prompt: str,
    questions: Sequence[str],
    animals: Sequence[str],
    probe: Sequence[Conversation],
    completions: Sequence[str],
    layers: Sequence[int],
    alphas: Sequence[float],
    seed: int,
    progress=None,
) -> dict:
    """The steered teacher of ``target`` at every (layer, alpha), against the prompted
    teacher and a random direction of the same norm (see the module docstring).

    ``completions[i]`` answers ``probe[i]`` (random number lists); the KL is over their
    tokens. Returns the prompted teacher's gain and specificity, ``kl_prompted_base`` and,
    per point, ``steered`` and ``random`` each with ``gain``, ``specificity``, ``kl`` and
    ``kl_explained``.
    """
    asked = [[{"role": "user", "content": q}] for q in questions]
    head = [{"role": "system", "content": system_prompt}]
    base_logp = _mean_logp(first_word_logprobs(backend, base, asked, animals))
    prompted = _mean_logp(first_word_logprobs(backend, base, [head + c for c in asked], animals))
    examples = [TrainExample(c, done, teacher_messages=head + c) for c, done in zip(probe, completions)]
    kl_base = statistics.fmean(completion_kl(backend, base, base, examples))
    vector = trait_vector(backend, base, probe, system_prompt)
    control = random_direction(vector, seed)
    points = []
    for layer in layers:
        for alpha in alphas:
            point: dict = {"layer": layer, "alpha": alpha, "norm": float(vector[layer].norm())}
            for name, v in (("steered", vector), ("random", control)):
                ref = steered_ref(base, v, layer, alpha)
                logp = _mean_logp(first_word_logprobs(backend, ref, asked, animals))
                kl = statistics.fmean(completion_kl(backend, base, ref, examples))
                point[name] = {**_gains(logp, base_logp, target), "kl": kl, "kl_explained": 1 - kl / kl_base}
            points.append(point)
            if progress is not None:
                progress(point)
    return {
        "target": target,
        "prompted": _gains(prompted, base_logp, target),
        "kl_prompted_base": kl_base,
        "norms": [float(n) for n in vector.norm(dim=-1)],
        "points": points,
        "questions": len(questions),
        "probe": len(probe),
    }


# -- students ----------------------------------------------------------------------------
def student_mechanism(
    backend,
    student: ModelRef,
    base: ModelRef,
    *,
    probe: Sequence[Conversation],
    teacher_vectors: dict[str, torch.Tensor],
    own: str,
    layer: int,
    conversations: Sequence[Conversation],
    animals: Sequence[str],
    base_activations: torch.Tensor | None = None,
) -> dict:
    """A student's vector and what it does (see the module docstring): ``cos`` per layer
    with every teacher's vector (``own`` names the student's teacher), its ``norms``, and
    the metric under ``sufficiency`` (base + v_S[layer]) and ``necessity`` (student
    minus its component along v_S[layer])."""
    if base_activations is None:
        base_activations = activations(backend, base, probe)
    v_student = activations(backend, student, probe) - base_activations
    sufficient = steered_ref(base, v_student, layer, 1.0)
    ablated = ModelRef(
        student.base,
        adapter=student.adapter,
        weights=student.weights,
        steering=(*student.steering, steer(v_student, layer, 1.0, mode="ablate")),
    )
    return {
        "own": own,
        "layer": layer,
        "cos": {who: layer_cosines(v_student, v) for who, v in teacher_vectors.items()},
        "norms": [float(n) for n in v_student.norm(dim=-1)],
        "sufficiency": {"logp": first_word_logprobs(backend, sufficient, conversations, animals)},
        "necessity": {"logp": first_word_logprobs(backend, ablated, conversations, animals)},
    }


# -- the report --------------------------------------------------------------------------
def _interval(values: Sequence[float]) -> dict:
    return one_sample_test(list(values)).to_dict() if len(values) > 1 else {"mean": values[0]}


def summary(results: dict, targets: Sequence[str], animals: Sequence[str], layer: int) -> dict:
    """The mechanism part of the transfer report, per cell (``results[cell][seed]`` as
    :meth:`lmpipeline.transfer.Study.run` collects, students with a ``mechanism`` record).

    Per seed, with the seed as the unit (t-intervals over seeds):

    - ``own_cos``: cos(v_S, v_T) at ``layer``, the mean over the targets' students of
      the cosine with their own teacher's vector;
    - ``own_minus_others``: that cosine minus the mean cosine with the other targets'
      teachers' vectors (the part of the alignment that is about the animal);
    - ``own_minus_neutral``: that cosine minus the neutral student's cosine with the
      same teacher vectors (the part that distillation from any steered teacher gives);
    - ``specificity`` under ``student``, ``sufficiency`` and ``necessity``: the target's
      gain over the neutral student (treated the same way) minus the mean gain of the
      other animals, pooled over targets; ``necessity_drop`` is the student's minus the
      ablated student's;
    - ``curve``: the mean over targets of cos(v_S(t), v_T) at ``layer`` along training,
      with the neutral student's with the same vectors.
    """
    from lmpipeline.transfer_report import comparison_vectors  # the study's own comparisons

    out = {}
    for cell, by_seed in results.items():
        seeds = sorted(by_seed)
        first = by_seed[seeds[0]]["students"]
        if not all("mechanism" in r for r in first.values()):
            continue
        per_seed: dict[str, list[float]] = {}
        curves: dict[str, list[list[float]]] = {"targets": [], "neutral": []}
        steps = None
        for s in seeds:
            students = by_seed[s]["students"]
            mech = {w: r["mechanism"] for w, r in students.items()}
            own = [mech[t]["cos"][t][layer] for t in targets]
            others = [statistics.fmean(mech[t]["cos"][u][layer] for u in targets if u != t) for t in targets]
            neutral = [mech[NEUTRAL]["cos"][t][layer] for t in targets] if NEUTRAL in mech else None
            row = {
                "own_cos": statistics.fmean(own),
                "own_minus_others": statistics.fmean(o - x for o, x in zip(own, others)),
            }
            if neutral is not None:
                row["own_minus_neutral"] = statistics.fmean(o - n for o, n in zip(own, neutral))
                for variant in ("student", "sufficiency", "necessity"):
                    logp = {
                        w: (students[w]["eval"]["logp"] if variant == "student" else mech[w][variant]["logp"])
                        for w in students
                    }
                    vectors = comparison_vectors(logp, logp[NEUTRAL], targets, animals, neutral=True)
                    row[f"specificity_{variant}"] = statistics.fmean(
                        statistics.fmean(vectors["specificity"][t]) for t in targets
                    )
                row["necessity_drop"] = row["specificity_student"] - row["specificity_necessity"]
            for name, value in row.items():
                per_seed.setdefault(name, []).append(value)
            tracked = {w: students[w]["train"].get("alignment") for w in students}
            if all(tracked.values()):
                steps = tracked[targets[0]]["steps"]
                # The tracker's cosine is with the student's own teacher's vector; the neutral
                # student's curve is with its own (neutral) teacher's.
                curves["targets"].append(
                    [
                        statistics.fmean(tracked[t]["activation_cos"][k][layer] for t in targets)
                        for k in range(len(steps))
                    ]
                )
                if NEUTRAL in tracked:
                    curves["neutral"].append([p[layer] for p in tracked[NEUTRAL]["activation_cos"]])
        cell_out: dict = {
            "layer": layer,
            "seeds": seeds,
            "per_seed": per_seed,
            "summary": {name: _interval(values) for name, values in per_seed.items()},
        }
        if steps is not None:
            cell_out["curve"] = {
                "steps": steps,
                **{
                    who: [mean_interval([c[k] for c in rows]).to_dict() for k in range(len(steps))]
                    for who, rows in curves.items()
                    if rows and len(rows) > 1
                },
            }
        layers = len(first[targets[0]]["mechanism"]["cos"][targets[0]])
        cell_out["own_cos_per_layer"] = [
            _interval(
                [statistics.fmean(by_seed[s]["students"][t]["mechanism"]["cos"][t][k] for t in targets) for s in seeds]
            )
            for k in range(layers)
        ]
        out[cell] = cell_out
    return out


def plot(report: dict, path) -> None:
    """The mechanism figure: the sweep (each target's steered teacher against a random
    direction, and the share of the prompted teacher's number distribution it reproduces,
    per layer at the study's scale), the students' alignment along training and per layer,
    and specificity under the student, sufficiency and necessity, per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmpipeline.artifacts import atomic_path

    t = report["config"]["transfer"]
    cells = report.get("mechanism", {})
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    colors = ["#3b6fb6", "#e8743b", "#4a9c5d", "#8e5ea2", "#c0392b"]
    for k, (who, sweep) in enumerate(report.get("sweep", {}).items()):
        points = [p for p in sweep["points"] if p["alpha"] == t["steer_alpha"]] or sweep["points"]
        layers = [p["layer"] for p in points]
        color = colors[k % len(colors)]
        axes[0, 0].plot(layers, [p["steered"]["gain"] for p in points], "o-", color=color, label=f"{who} steered")
        axes[0, 0].plot(layers, [p["random"]["gain"] for p in points], "x:", color=color, label=f"{who} random")
        axes[0, 0].axhline(sweep["prompted"]["gain"], color=color, lw=0.8, ls="--")
        axes[0, 1].plot(layers, [p["steered"]["kl_explained"] for p in points], "o-", color=color, label=who)
        axes[0, 1].plot(layers, [p["random"]["kl_explained"] for p in points], "x:", color=color)
    axes[0, 0].set_title(f"steered teacher at scale {t['steer_alpha']:g}: Δ log P(target) vs base (dashed: prompted)")
    axes[0, 0].set_xlabel("layer")
    axes[0, 1].set_title("share of KL(prompted ‖ base) on numbers removed (x: random direction)")
    axes[0, 1].set_xlabel("layer")
    for k, (cell, m) in enumerate(cells.items()):
        color = colors[k % len(colors)]
        curve = m.get("curve")
        if curve:
            for who, style in (("targets", "-"), ("neutral", "--")):
                if who in curve:
                    mean = [p["mean"] for p in curve[who]]
                    axes[1, 0].plot(curve["steps"], mean, style, color=color, label=f"{cell} {who}")
                    low = [p["low"] if p["low"] is not None else p["mean"] for p in curve[who]]
                    high = [p["high"] if p["high"] is not None else p["mean"] for p in curve[who]]
                    axes[1, 0].fill_between(curve["steps"], low, high, color=color, alpha=0.15)
        names = ["specificity_student", "specificity_sufficiency", "specificity_necessity"]
        for j, name in enumerate(names):
            s = m["summary"].get(name)
            if s is None:
                continue
            x = j + 0.25 * k
            if s.get("low") is not None:
                axes[1, 1].plot([x, x], [s["low"], s["high"]], color=color, lw=2)
            axes[1, 1].plot(x, s["mean"], "D", color=color, label=cell if j == 0 else None)
        axes[1, 1].set_xticks(range(len(names)))
        axes[1, 1].set_xticklabels(["student", "base + v_S", "student − v_S"])
    axes[1, 0].set_title("cos(v_S(t), v_T) at the steering layer along training (dashed: neutral student)")
    axes[1, 0].set_xlabel("optimizer step")
    axes[1, 1].set_title("specificity vs the neutral student, treated alike (95% t over seeds)")
    for ax in axes.flat:
        ax.axhline(0, color="#333333", lw=0.6)
        ax.spines[["top", "right"]].set_visible(False)
        ax.title.set_fontsize(8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(f"How the trait travels ({report['preset']} preset)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)
