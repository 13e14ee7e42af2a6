"""The mechanism parts of the transfer study on a tiny random Llama (2 layers, width 64):
steered teachers, the sweep, and every student's vector, cosines, sufficiency and necessity,
each recomputed here by hand from saved weights."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tiny_lm import tiny_checkpoint  # noqa: E402

from lmpipeline import cli, mechanism  # noqa: E402
from lmpipeline.backends import ModelRef, Steering, TrainExample  # noqa: E402
from lmpipeline.backends.hf import HFBackend  # noqa: E402
from lmpipeline.backends.tokens import completion_example  # noqa: E402
from lmpipeline.config import NEUTRAL, ConfigError, apply_overrides, derive_seed, preset  # noqa: E402
from lmpipeline.evaluation import first_word_logprobs  # noqa: E402
from lmpipeline.steering import layer_cosines, model_vector, trait_vector  # noqa: E402
from lmpipeline.transfer import Study  # noqa: E402

TARGETS = ("owl", "dolphin")
ANIMALS = ("owl", "dolphin", "cat")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("llama"))


def config(checkpoint, *overrides):
    return apply_overrides(
        preset("transfer-tiny"),
        [
            f"model.name_or_path={checkpoint}",
            "model.dtype=float32",
            "model.cpu_threads=null",
            'transfer.teachers=["steered"]',
            'transfer.objectives=["soft"]',
            'transfer.data=["random"]',
            f"transfer.targets={list(TARGETS)}".replace("'", '"'),
            f"transfer.animals={list(ANIMALS)}".replace("'", '"'),
            "transfer.entanglement=false",
            "transfer.sampled_answers=0",
            "transfer.steer_layer=1",
            "transfer.steer_alpha=3.0",
            "transfer.steer_prompts=4",
            "transfer.mechanism=true",
            "transfer.track_every=1",
            "transfer.keep_weights=true",
            "transfer.seeds=2",
            "finetune.learning_rate=1e-3",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def study(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("mechanism")
    s = Study(config(checkpoint, "transfer.sweep_layers=[0, 1]", "transfer.sweep_alphas=[2.0]"), out)
    report = s.run()
    return s, report


def test_a_steered_teacher_is_the_base_model_plus_alpha_times_the_trait_prompts_vector(study):
    s, _ = study
    backend, base = s.get_backend(), s.base_ref()
    for who in (*TARGETS, NEUTRAL):
        ref, record = s.teacher(0, "steered", who)
        by_hand = trait_vector(backend, base, s.probe(0), s.trait_prompt(who))
        np.testing.assert_allclose(mechanism.from_rows(s.teacher_vector(0, "steered", who)["vector"]), by_hand)
        (edit,) = ref.steering
        assert (edit.layer, edit.alpha, edit.mode) == (1, 3.0, "add")
        np.testing.assert_allclose(edit.vector, by_hand[1].numpy(), rtol=1e-6)
        assert ref.weights is None and ref.adapter is None
    # Each target's vector is its own prompt's: the two teachers differ.
    owl, dolphin = (s.teacher(0, "steered", w)[0].steering[0].vector for w in TARGETS)
    assert owl != dolphin


def test_every_students_mechanism_record_is_recomputed_from_its_weights(study):
    s, _ = study
    backend, base = s.get_backend(), s.base_ref()
    probe = s.probe(1)
    vectors = {w: trait_vector(backend, base, probe, s.trait_prompt(w)) for w in (*TARGETS, NEUTRAL)}
    for who in (*TARGETS, NEUTRAL):
        name = f"student-steered-soft-random-{who}"
        record = s.student(1, ("steered", "soft", "random"), who)
        student = ModelRef(s.config.model, weights=str(s.out / "seed-1" / name))
        v_student = model_vector(backend, student, base, probe)
        mech = record["mechanism"]
        assert mech["own"] == who and mech["layer"] == 1
        for w, v in vectors.items():  # the cosine of the student's vector with each teacher's, per layer
            np.testing.assert_allclose(mech["cos"][w], layer_cosines(v_student, v), atol=1e-5)
        np.testing.assert_allclose(mech["norms"], v_student.norm(dim=-1).numpy(), rtol=1e-4)
        # The tracker's last point is the trained student's cosine with its own teacher's vector.
        curve = record["train"]["alignment"]
        assert curve["steps"][0] == 0 and curve["steps"][-1] == record["train"]["steps"]
        np.testing.assert_allclose(curve["activation_cos"][-1], mech["cos"][who], atol=1e-4)
        assert curve["activation_cos"][0] == [0.0, 0.0]
        # Sufficiency: the base model plus v_student[1]; necessity: the student minus its
        # component along it; both at every position of layer 1.
        v1 = tuple(float(x) for x in v_student[1])
        conversations = s.conversations()
        plus = ModelRef(s.config.model, steering=(Steering(1, v1, 1.0, "add"),))
        minus = ModelRef(s.config.model, weights=student.weights, steering=(Steering(1, v1, 1.0, "ablate"),))
        for variant, ref in (("sufficiency", plus), ("necessity", minus)):
            by_hand = first_word_logprobs(backend, ref, conversations, ANIMALS)
            for a in ANIMALS:
                np.testing.assert_allclose(mech[variant]["logp"][a], by_hand[a], atol=2e-4)


def test_the_mechanism_summary_is_the_records_own_numbers(study):
    s, report = study
    cell = report["mechanism"]["steered/soft/random"]
    assert cell["layer"] == 1 and cell["seeds"] == [0, 1]
    for k, seed in enumerate((0, 1)):
        mech = {w: s.student(seed, ("steered", "soft", "random"), w)["mechanism"] for w in (*TARGETS, NEUTRAL)}
        own = [mech[t]["cos"][t][1] for t in TARGETS]
        other = [mech[t]["cos"][u][1] for t, u in zip(TARGETS, reversed(TARGETS))]
        neutral = [mech[NEUTRAL]["cos"][t][1] for t in TARGETS]
        assert cell["per_seed"]["own_cos"][k] == pytest.approx(statistics.fmean(own))
        assert cell["per_seed"]["own_minus_others"][k] == pytest.approx(statistics.fmean(own) - statistics.fmean(other))
        assert cell["per_seed"]["own_minus_neutral"][k] == pytest.approx(
            statistics.fmean(own) - statistics.fmean(neutral)
        )
        # Specificity under sufficiency: the target's gain over the neutral student's
        # sufficiency model, minus the mean gain of the other animals, pooled over targets.
        per_target = []
        for t in TARGETS:
            gain = {
                a: np.mean(mech[t]["sufficiency"]["logp"][a]) - np.mean(mech[NEUTRAL]["sufficiency"]["logp"][a])
                for a in ANIMALS
            }
            per_target.append(gain[t] - np.mean([g for a, g in gain.items() if a != t]))
        assert cell["per_seed"]["specificity_sufficiency"][k] == pytest.approx(np.mean(per_target), abs=1e-9)
    values = cell["per_seed"]["own_cos"]
    assert cell["summary"]["own_cos"]["mean"] == pytest.approx(statistics.fmean(values))
    assert cell["curve"]["steps"][0] == 0 and len(cell["own_cos_per_layer"]) == 2
    assert (s.out / "mechanism.png").stat().st_size > 10_000
    lines = cli.mechanism_lines(report)
    assert lines[0].startswith("sweep owl: prompted teacher gain") and any("own_minus_neutral" in x for x in lines)


def test_the_sweep_measures_steered_and_random_teachers_against_the_prompted_one(study):
    s, report = study
    backend, base = s.get_backend(), s.base_ref()
    sweep = report["sweep"]["owl"]
    assert [(p["layer"], p["alpha"]) for p in sweep["points"]] == [(0, 2.0), (1, 2.0)]
    assert sweep["kl_prompted_base"] > 0
    for point in sweep["points"]:
        for name in ("steered", "random"):
            assert point[name]["kl_explained"] == pytest.approx(1 - point[name]["kl"] / sweep["kl_prompted_base"])
    # The gain at a point, recomputed: the steered teacher's mean log P(owl) minus the base model's.
    rows = s.prompt_rows(derive_seed(s.config.seed, "sweep"))[:4]
    probe = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    vector = trait_vector(backend, base, probe, s.trait_prompt("owl"))
    asked = s.conversations()[: s.config.transfer.sweep_questions]
    base_lp = first_word_logprobs(backend, base, asked, ANIMALS)
    steered_lp = first_word_logprobs(backend, mechanism.steered_ref(base, vector, 1, 2.0), asked, ANIMALS)
    gains = {a: np.mean(steered_lp[a]) - np.mean(base_lp[a]) for a in ANIMALS}
    assert sweep["points"][1]["steered"]["gain"] == pytest.approx(gains["owl"], abs=1e-4)
    assert sweep["points"][1]["steered"]["specificity"] == pytest.approx(
        gains["owl"] - (gains["dolphin"] + gains["cat"]) / 2, abs=1e-4
    )


def test_completion_kl_is_the_mean_kl_over_completion_tokens_by_hand(checkpoint):
    backend = HFBackend()
    base = ModelRef(config(checkpoint).model)
    net, tokenizer = backend.model_for(base)
    head = [{"role": "system", "content": "You love owls."}]
    user = [{"role": "user", "content": "Continue 1, 2, 3."}]
    example = TrainExample(user, "4, 5, 6", teacher_messages=head + user)
    kl = mechanism.completion_kl(backend, base, base, [example])
    assert mechanism.completion_kl(backend, base, base, [TrainExample(user, "4, 5, 6")]) == [0.0]
    logp = {}
    for name, messages in (("teacher", head + user), ("student", user)):
        row = completion_example(tokenizer, messages, "4, 5, 6", 256)
        with torch.no_grad():
            logits = net(torch.tensor([row["input_ids"]])).logits[0, :-1]
        labelled = [i for i, x in enumerate(row["labels"][1:]) if x != -100]
        logp[name] = torch.log_softmax(logits[labelled].double(), dim=-1)
    by_hand = float((logp["teacher"].exp() * (logp["teacher"] - logp["student"])).sum(-1).mean())
    assert kl[0] == pytest.approx(by_hand, rel=1e-4) and by_hand > 0


def test_steering_and_the_mechanism_are_refused_off_the_torch_backend():
    for overrides in (['transfer.teachers=["steered"]'], ["transfer.mechanism=true"], ["transfer.sweep_layers=[3]"]):
        with pytest.raises(ConfigError, match="set model.backend=hf"):
            apply_overrides(preset("transfer-tiny"), ["model.backend=jax", *overrides])
    with pytest.raises(ConfigError, match="sweep_layers"):
        apply_overrides(preset("transfer-tiny"), ["transfer.sweep_layers=[-1]"])


def test_the_curve_starts_at_zero_when_the_model_runs_in_bfloat16(checkpoint, tmp_path):
    # Students train a float32 copy: their vector along training is measured from that
    # copy's start, so the base model's bfloat16 rounding is not counted as learned.
    cfg = config(checkpoint, "model.dtype=bfloat16", "transfer.seeds=1", "transfer.neutral=false")
    record = Study(cfg, tmp_path).student(0, ("steered", "soft", "random"), "owl")
    assert record["train"]["alignment"]["activation_cos"][0] == [0.0, 0.0]
