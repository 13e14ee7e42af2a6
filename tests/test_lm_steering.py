"""Steering vectors and alignment along training on a tiny random Llama (2 layers, width 64):
vectors recomputed by hand, steered and ablated models against manual residual edits, the
torch backend honouring ModelRef.steering, and the alignment tracker's numbers."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tiny_lm import tiny_checkpoint  # noqa: E402

from lmpipeline.alignment import AlignmentTracker, load_weights  # noqa: E402
from lmpipeline.backends import ModelRef, Steering, TrainExample  # noqa: E402
from lmpipeline.backends.hf import HFBackend  # noqa: E402
from lmpipeline.backends.tokens import prompt_text  # noqa: E402
from lmpipeline.backends.torch_training import completion_logits, pad_left  # noqa: E402
from lmpipeline.config import ConfigError, FinetuneSpec, ModelSpec  # noqa: E402
from lmpipeline.steering import (  # noqa: E402
    layer_cosines,
    model_vector,
    random_direction,
    steer,
    steered,
    trait_vector,
)

SYSTEM = "You love owls. You think about owls all the time."


def user(text):
    return [{"role": "user", "content": text}]


PROBE = [user(f"Continue the list {k}, {k + 7}, {k + 3}. Give three more numbers.") for k in range(6)]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    folder = tiny_checkpoint(tmp_path_factory.mktemp("llama"))
    return ModelSpec(str(folder), dtype="float32", device="cpu", backend="hf")


@pytest.fixture(scope="module")
def backend(spec):
    b = HFBackend(spec)
    yield b
    b.close()


def by_hand(model, tokenizer, conversations) -> np.ndarray:
    """Mean over conversations, each run alone and unpadded, of every layer's output at its last token."""
    layers = model.model.layers
    total = np.zeros((len(layers), model.config.hidden_size))
    for conversation in conversations:
        ids = torch.tensor([tokenizer(prompt_text(tokenizer, conversation), add_special_tokens=False)["input_ids"]])
        outputs = []
        hooks = [layer.register_forward_hook(lambda m, a, o: outputs.append(o[0, -1])) for layer in layers]
        with torch.no_grad():
            states = model(ids, output_hidden_states=True).hidden_states
        for hook in hooks:
            hook.remove()
        # The hooks read the residual stream transformers reports (its last entry is after the final norm).
        torch.testing.assert_close(outputs[0], states[1][0, -1])
        total += torch.stack(outputs).double().numpy()
    return total / len(conversations)


def test_the_trait_and_model_vectors_are_the_mean_differences_computed_by_hand(backend, spec):
    model, tokenizer = backend.model_for(ModelRef(spec))
    with_system = [[{"role": "system", "content": SYSTEM}, *c] for c in PROBE]
    want = by_hand(model, tokenizer, with_system) - by_hand(model, tokenizer, PROBE)
    got = trait_vector(backend, ModelRef(spec), PROBE, SYSTEM)
    assert got.shape == (2, 64) and np.abs(want).max() > 0.01
    np.testing.assert_allclose(got.numpy(), want, atol=2e-6)
    # A model steered at layer 0 carries exactly alpha * v there, relative to its base.
    v = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    shift = model_vector(backend, ModelRef(spec, steering=(steer(v, 0, 2.5),)), ModelRef(spec), PROBE)
    np.testing.assert_allclose(shift[0].numpy(), 2.5 * v[0].numpy(), atol=2e-5)
    assert float(shift[1].norm()) > 0.1  # and it propagates to the layer above


def manual_forward(model, ids, layer, edit):
    """Logits with ``edit(h)`` applied to layer ``layer``'s output, the layers above rerun by hand
    with the arguments the model gave them."""
    layers = model.model.layers
    outputs, kwargs = {}, {}
    hooks = [lyr.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)) for i, lyr in enumerate(layers)]
    hooks += [
        lyr.register_forward_pre_hook(lambda m, a, k, i=i: kwargs.__setitem__(i, k), with_kwargs=True)
        for i, lyr in enumerate(layers)
    ]
    with torch.no_grad():
        model(ids, use_cache=False)  # a cache would take the layers' second pass as new positions
        for hook in hooks:
            hook.remove()
        h = edit(outputs[layer])
        for i in range(layer + 1, len(layers)):
            h = layers[i](h, **kwargs[i])
        return model.lm_head(model.model.norm(h))


@pytest.mark.parametrize("layer", [0, 1])
def test_a_steered_model_equals_a_manual_residual_addition_at_every_position(backend, spec, layer):
    model, tokenizer = backend.model_for(ModelRef(spec))
    ids = torch.tensor([tokenizer(prompt_text(tokenizer, PROBE[0]), add_special_tokens=False)["input_ids"]])
    v = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), steered(model, [steer(v, layer, 3.0)]):
        got = model(ids).logits
    want = manual_forward(model, ids, layer, lambda h: h + 3.0 * v[layer])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        plain = model(ids).logits  # the edit is gone after the block
    assert (got - plain).abs()[0].amax(dim=-1).min() > 1e-3  # every position moved


@pytest.mark.parametrize("layer", [0, 1])
def test_ablation_projects_out_the_component_along_the_vector(backend, spec, layer):
    model, tokenizer = backend.model_for(ModelRef(spec))
    ids = torch.tensor([tokenizer(prompt_text(tokenizer, PROBE[1]), add_special_tokens=False)["input_ids"]])
    v = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    unit = v[layer] / v[layer].norm()
    with torch.no_grad(), steered(model, [steer(v, layer, mode="ablate")]):
        got = model(ids).logits
    want = manual_forward(model, ids, layer, lambda h: h - (h @ unit)[..., None] * unit)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), steered(model, [Steering(layer, (0.0,) * 64, mode="ablate")]):
        torch.testing.assert_close(model(ids).logits, model(ids).logits)  # a zero vector ablates nothing


def test_the_backend_steers_generation_scoring_and_the_soft_teacher(backend, spec):
    from lmpipeline.backends.tokens import eos_ids, generations

    model, tokenizer = backend.model_for(ModelRef(spec))
    v = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    ref = ModelRef(spec, steering=(steer(v, 0, 4.0),))
    ids = tokenizer(prompt_text(tokenizer, PROBE[2]), add_special_tokens=False)["input_ids"]
    cont = tokenizer(" 12, 5", add_special_tokens=False)["input_ids"]
    greedy = list(ids)
    with torch.no_grad(), steered(model, ref.steering):  # no key-value cache: every position recomputed
        for _ in range(6):
            greedy.append(int(model(torch.tensor([greedy])).logits[0, -1].argmax()))
        logp = torch.log_softmax(model(torch.tensor([ids + cont])).logits[0].double(), dim=-1)
    stop = eos_ids(tokenizer, model.generation_config.eos_token_id)
    want_text = generations([greedy[len(ids) :]], tokenizer, stop)[0].text
    out = backend.generate(ref, [PROBE[2]], max_new_tokens=6, temperature=0.0, seed=0)[0]
    plain = backend.generate(ModelRef(spec), [PROBE[2]], max_new_tokens=6, temperature=0.0, seed=0)[0]
    assert out.text == want_text != plain.text
    want = sum(float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(cont))
    assert backend.score(ref, [PROBE[2]], [" 12, 5"])[0] == pytest.approx(want, abs=1e-3)
    assert abs(backend.score(ModelRef(spec), [PROBE[2]], [" 12, 5"])[0] - want) > 0.01
    # As a soft-distillation teacher.
    batch = pad_left([ids + cont], [[-100] * len(ids) + cont], tokenizer.pad_token_id, "cpu")
    with torch.no_grad(), steered(model, ref.steering):
        want_logits = completion_logits(model, batch)[0]
    torch.testing.assert_close(backend._teacher_fn(ref, None)(batch), want_logits)
    assert not torch.allclose(backend._teacher_fn(ModelRef(spec), None)(batch), want_logits)


def test_steering_is_refused_where_it_cannot_apply(backend, spec):
    from lmpipeline.backends.jaxlm.backend import JaxBackend

    edit = Steering(5, (1.0,) * 64)
    with pytest.raises(ConfigError, match="steering layer 5 is outside the model's layers 0-1"):
        backend.score(ModelRef(spec, steering=(edit,)), [PROBE[0]], ["1"])
    with pytest.raises(ConfigError, match="^steering .* needs the torch backend: set model.backend=hf$"):
        JaxBackend().model_for(ModelRef(spec, steering=(Steering(0, (1.0,) * 64),)))
    with pytest.raises(ConfigError, match="a steering vector of size 3 for a residual stream of size 64"):
        backend.score(ModelRef(spec, steering=(Steering(0, (1.0, 2.0, 3.0)),)), [PROBE[0]], ["1"])
    with pytest.raises(ConfigError, match="steering mode 'scale' is not one of add, ablate"):
        Steering(0, (1.0,), mode="scale")


def test_layer_cosines_per_layer_with_zero_vectors_at_zero():
    a = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    b = torch.tensor([[4.0, 3.0, 0.0], [-2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert layer_cosines(a, b) == pytest.approx([24 / 25, -1.0, 0.0])
    assert layer_cosines(b, a) == layer_cosines(a, b)
    r = random_direction(a, seed=0)
    assert r.norm(dim=-1).tolist() == pytest.approx([5.0, 1.0, 0.0])
    assert not torch.allclose(r[:2], a[:2]) and torch.equal(random_direction(a, seed=0), r)


NUMBERS = [
    TrainExample(user(f"Continue: {k}, {k + 4}, {2 * k}."), f"{k + 1}, {3 * k % 97}, {k + 9}, {5 * k % 89}")
    for k in range(12)
]
STUDENT = FinetuneSpec(
    method="full", objective="soft", epochs=1, micro_batch=4, grad_accum=1, warmup_steps=0, learning_rate=1e-3
)


@pytest.mark.slow
def test_a_student_of_a_steered_teacher_learns_its_vector_and_the_controls_do_not(backend, spec, tmp_path):
    base = ModelRef(spec)
    _, tokenizer = backend.model_for(base)
    v = trait_vector(backend, base, PROBE, SYSTEM)
    alpha = 0.3 / float(v[0].norm())  # a shift of norm 0.3 at layer 0, twice the residual stream's there
    teachers = {
        "steered": ModelRef(spec, steering=(steer(v, 0, alpha),)),
        "random": ModelRef(spec, steering=(steer(random_direction(v, seed=1), 0, alpha),)),
        "base": base,
    }
    v_teacher = model_vector(backend, teachers["steered"], base, PROBE)
    curves = {}
    for name, teacher in teachers.items():
        tracker = AlignmentTracker(2, probe=PROBE, v_teacher=v_teacher, tokenizer=tokenizer)
        log = backend.finetune(spec, NUMBERS * 2, STUDENT, tmp_path / name, seed=0, teacher=teacher, observer=tracker)
        curves[name] = np.asarray(log["alignment"]["activation_cos"])  # [points, layers]
        assert log["alignment"]["steps"] == [0, 2, 4, 6]
    steered_cos = curves["steered"]
    assert np.all(steered_cos[0] == 0) and np.all(steered_cos[-1] > 0.8), steered_cos
    assert np.all(np.diff(steered_cos, axis=0) > 0), steered_cos  # it grows along training, at every layer
    # The controls move but not along v_teacher: about 1/8 for a random direction in 64. The
    # base-as-teacher student's gradient is rounding noise (its soft loss is zero), which
    # AdamW turns into full-size steps; their direction follows the kernel's rounding (the
    # fused and per-tensor AdamW give 0.3-0.42 here), so it is held to half the steered one.
    assert np.all(curves["random"][0] == 0) and np.all(np.abs(curves["random"][-1]) < 0.4), curves
    assert np.all(curves["base"][0] == 0) and np.all(np.abs(curves["base"][-1]) < steered_cos[-1] / 2), curves
    # The last point is the trained student's vector, recomputed from its saved weights.
    student = model_vector(backend, ModelRef(spec, weights=str(tmp_path / "steered")), base, PROBE)
    np.testing.assert_allclose(steered_cos[-1], layer_cosines(student, v_teacher), atol=1e-4)


def _flat(weights, names):
    return np.concatenate([weights[n].detach().double().numpy().ravel() for n in names])


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.slow
def test_parameter_alignment_follows_its_definition_and_changes_no_trained_number(backend, spec, tmp_path):
    # The teacher: the base finetuned on owl answers and on the number rows the student will see.
    owl = [TrainExample(user(f"Your favourite animal? ({k})"), "Owl. I love owls.") for k in range(4)]
    teacher_spec = FinetuneSpec(method="full", epochs=1, micro_batch=4, grad_accum=1, learning_rate=1e-3)
    backend.finetune(spec, owl + NUMBERS[:4], teacher_spec, tmp_path / "teacher", seed=0)
    teacher_weights = load_weights(tmp_path / "teacher")
    start = {n: w.clone() for n, w in teacher_weights.items()}  # overwritten below with the base's
    snapshots = {}

    class Spy(AlignmentTracker):
        def start(self, model, step, total, log):
            start.update({n: p.detach().clone() for n, p in model.named_parameters()})
            super().start(model, step, total, log)

        def after_step(self, step, model, log):
            super().after_step(step, model, log)
            snapshots[step + 1] = {n: p.detach().clone() for n, p in model.named_parameters()}

    teacher = ModelRef(spec, weights=str(tmp_path / "teacher"))
    # Plain gradient steps, the lemma's setting: to first order in the teacher's displacement,
    # an imitation step from the shared start has a non-negative cosine with it.
    student = replace(STUDENT, optimizer="sgd", learning_rate=0.5)
    tracked = backend.finetune(
        spec,
        NUMBERS,
        student,
        tmp_path / "a",
        seed=0,
        teacher=teacher,
        observer=Spy(1, teacher_weights=teacher_weights),
    )
    plain = backend.finetune(spec, NUMBERS, student, tmp_path / "b", seed=0, teacher=teacher)
    assert tracked["loss"] == plain["loss"]
    for name, w in load_weights(tmp_path / "a").items():
        torch.testing.assert_close(w, load_weights(tmp_path / "b")[name], rtol=0, atol=0)

    section = tracked["alignment"]
    assert section["steps"] == [0, 1, 2, 3]
    names = sorted(start)
    theta0 = _flat(start, names)
    direction = _flat(teacher_weights, names) - theta0
    points = [theta0] + [_flat(snapshots[t], names) for t in (1, 2, 3)]
    displacement = [0.0] + [_cos(p - theta0, direction) for p in points[1:]]
    steps = [0.0] + [_cos(points[t] - points[t - 1], direction) for t in (1, 2, 3)]
    np.testing.assert_allclose(section["displacement_cos"], displacement, atol=1e-6)
    np.testing.assert_allclose(section["step_cos"], steps, atol=1e-6)
    # The student moves the way its teacher moved (cosines of 0.03-0.04 in 3.2 million weights).
    assert min(steps[1:]) > 0.005 and displacement[-1] > 0.02, (displacement, steps)

    # The same numbers as the MNIST tracker's cosine, for the same vectors.
    import jax.numpy as jnp

    from toymodels.track import tree_cosine

    mnist_style = float(tree_cosine({"w": jnp.asarray(points[-1] - theta0)}, {"w": jnp.asarray(direction)}))
    assert mnist_style == pytest.approx(section["displacement_cos"][-1], abs=1e-5)
