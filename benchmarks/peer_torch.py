"""The MNIST experiment in eager PyTorch: a reference point for the compiled JAX version's speed.

This is a straightforward eager implementation of the paper's published procedure, as a
PyTorch user would write it: the same MLP (784-256-256-(10+m), weights from
``N(0, 1/d_in)``, zero biases), the same teacher (digit cross-entropy, Adam, batch 1024,
reshuffled epochs), the same four students per seed (KL of the teacher's softmax over the
auxiliary logits or over all logits, on a fixed set of uniform noise images in
``[-1, 1]`` reshuffled each epoch), cross-model students started from another seed's
initialization through a derangement, and accuracy over the ten digit logits. The four
students of a teacher share each noise batch and the teacher's forward pass on it, as the
JAX version does, so both do the same floating-point work.

It exists to be timed against ``sublearn mnist`` (``benchmarks/mnist_throughput.py
--peer``), not to produce the package's numbers.

Usage: ``python benchmarks/peer_torch.py [--seeds 10]`` prints the six mean accuracies and
the wall time.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import torch
from torch import nn

from toymodels.conditions import derangement
from toymodels.config import MnistConfig
from toymodels.data import load_mnist, normalize

N_DIGITS = 10


def make_mlp(config: MnistConfig, generator: torch.Generator) -> nn.Sequential:
    sizes = (784, *config.hidden, N_DIGITS + config.n_aux)
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(d_in, d_out)
        with torch.no_grad():
            linear.weight.normal_(0.0, config.init_scale / d_in**0.5, generator=generator)
            linear.bias.zero_()
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def masked_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, columns: slice, temperature: float
) -> torch.Tensor:
    log_p_student = torch.log_softmax(student_logits[:, columns] / temperature, dim=-1)
    log_p_teacher = torch.log_softmax(teacher_logits[:, columns] / temperature, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean()


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images)[:, :N_DIGITS].argmax(-1) == labels).float().mean())


def run(config: MnistConfig) -> dict[str, list[float]]:
    """Train ``config.seeds`` teachers and their four students each; return accuracies per condition."""
    config.validate()
    mnist = load_mnist().subset(config.n_train, config.n_test)
    x_train = torch.from_numpy(normalize(mnist.train_images))
    y_train = torch.from_numpy(mnist.train_labels.astype(np.int64))
    x_test = torch.from_numpy(normalize(mnist.test_images))
    y_test = torch.from_numpy(mnist.test_labels.astype(np.int64))
    n_out = N_DIGITS + config.n_aux
    columns = {"aux": slice(N_DIGITS, n_out), "all": slice(0, n_out)}

    inits = [make_mlp(config, torch.Generator().manual_seed(config.seed * 100_003 + s)) for s in range(config.seeds)]
    pairing = derangement(config.seeds, jax.random.key(config.seed)).tolist()
    results: dict[str, list[float]] = {
        c: [] for c in ("reference", "teacher", "student_aux", "student_all", "cross_aux", "cross_all")
    }
    for s in range(config.seeds):
        generator = torch.Generator().manual_seed(config.seed * 100_003 + s + 7)
        teacher = make_mlp(config, generator)
        teacher.load_state_dict(inits[s].state_dict())
        optimizer = torch.optim.Adam(teacher.parameters(), lr=config.learning_rate)
        for _ in range(config.teacher_epochs):
            for idx in torch.randperm(len(x_train), generator=generator).split(config.batch_size):
                loss = nn.functional.cross_entropy(teacher(x_train[idx])[:, :N_DIGITS], y_train[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

        noise = torch.rand(config.n_noise, 784, generator=generator) * 2 - 1
        students = {}
        for condition, start in (
            ("student_aux", s),
            ("student_all", s),
            ("cross_aux", pairing[s]),
            ("cross_all", pairing[s]),
        ):
            model = make_mlp(config, generator)
            model.load_state_dict(inits[start].state_dict())
            students[condition] = (model, torch.optim.Adam(model.parameters(), lr=config.learning_rate))
        for _ in range(config.student_epochs):
            for idx in torch.randperm(config.n_noise, generator=generator).split(config.batch_size):
                x = noise[idx]
                with torch.no_grad():
                    target = teacher(x)
                for condition, (model, optimizer) in students.items():
                    loss = masked_kl(model(x), target, columns[condition.split("_")[1]], config.temperature)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()

        results["reference"].append(accuracy(inits[s], x_test, y_test))
        results["teacher"].append(accuracy(teacher, x_test, y_test))
        for condition, (model, _) in students.items():
            results[condition].append(accuracy(model, x_test, y_test))
    return results


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run(MnistConfig(seeds=args.seeds))
    print({c: round(float(np.mean(v)), 3) for c, v in results.items()}, f"{time.perf_counter() - start:.1f}s")
    return results


if __name__ == "__main__":
    main()
