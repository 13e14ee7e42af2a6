"""The MNIST experiment's configuration: one dataclass whose defaults are the paper's setup.

Every field is a command-line option of ``sublearn mnist`` (``n_aux`` is ``--n-aux``), so a
sweep needs no new code. :data:`PAPER` is the published setup; :func:`tiny` is a
configuration small enough for one end-to-end run inside a unit test.

Example:
    >>> from toymodels.config import MnistConfig
    >>> cfg = MnistConfig(seeds=3, n_aux=5)
    >>> cfg.validate().student_epochs
    5
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from sublearn._common import ConfigError  # noqa: F401  (raised here; imported from here by the package)
from sublearn._common import field_docs as _field_docs
from sublearn._store import config_hash

OPTIMIZERS = ("adam", "adamw", "sgd", "signsgd")
NOISE_DISTRIBUTIONS = ("uniform", "gaussian")
# What the students see: generated noise, or MNIST training images (see toymodels.noise.student_inputs).
IMAGE_DATA = ("mnist", "shuffled", "inverted")
STUDENT_DATA = NOISE_DISTRIBUTIONS + IMAGE_DATA
STUDENT_LOSSES = ("kl", "mse")
PRECISIONS = ("float32", "bf16")


@dataclasses.dataclass(frozen=True)
class MnistConfig:
    """The MNIST auxiliary-logit experiment (paper Section 6), with the paper's values.

    Attributes:
        n_aux: auxiliary logits ``m`` appended to the ten digit logits.
        hidden: hidden-layer widths.
        init_scale: weights start as ``N(0, (init_scale / sqrt(d_in))^2)``; biases at zero.
        optimizer: the teacher's optimizer, and the students' unless ``student_optimizer``
            is set: ``adam``, ``adamw`` (weight decay 0.01), ``sgd`` (with ``momentum``;
            plain SGD by default) or ``signsgd`` (a step of ``learning_rate`` against the
            sign of every gradient coordinate).
        learning_rate: step size of ``optimizer``; also the students' unless
            ``student_learning_rate`` is set.
        student_optimizer: the students' own optimizer, one of ``optimizer``'s choices;
            None: the same as the teacher's (``optimizer``). The teacher's training does
            not depend on it.
        student_learning_rate: step size of the students' optimizer; None: ``learning_rate``.
        momentum: heavy-ball momentum of ``sgd`` wherever it is used (teacher or students),
            as in ``torch.optim.SGD``: ``b <- momentum * b + g``, ``theta <- theta - lr * b``;
            0, the default, is plain SGD.
        batch_size: examples per step, for the teacher and for the students.
        teacher_epochs: passes of the teacher over the training images (0: the teacher is
            its untrained initialization, the point where no trait exists to transfer).
        student_epochs: passes of each student over its noise images.
        n_noise: noise images per student (one fixed set per seed, reshuffled each epoch).
        student_data: the students' inputs. ``uniform`` noise on ``[-1, 1]`` (the paper),
            standard ``gaussian`` noise, or MNIST training images: ``mnist`` (as they are),
            ``shuffled`` (every image's pixels permuted by one fixed permutation per seed)
            or ``inverted`` (negated, white background). With images, student image ``i``
            is training image ``i``, so ``n_noise`` must not exceed ``n_train``. Called
            ``noise`` before MNIST images were an option; old results and checkpoints
            with that name still load and keep their fingerprint.
        student_loss: ``kl`` (``KL(teacher || student)`` of the softmaxes, the paper) or
            ``mse`` (squared error between the logits).
        temperature: softmax temperature of the KL loss.
        student_init_sigma: perturbs each student's starting point by Gaussian noise of
            this many init standard deviations (0: students start exactly at their init).
        precision: matmul precision of training, ``float32`` (the paper's arithmetic) or
            ``bf16`` (bfloat16 inputs, float32 accumulation; parameters, optimizer state,
            softmaxes and losses stay float32; see :mod:`toymodels.precision`).
            Accuracies are always evaluated in float32. Over the paper's 100 seeds ``bf16``
            left all six bars unchanged (paired differences within +-0.003, every interval
            containing 0) at about 0.6 of float32's cost on CPUs with bfloat16 matmuls.
            float32 stays the default: its numbers do not depend on how the seeds are
            spread over devices, while a bfloat16 CPU kernel's rounding does.
        track: every ``track`` steps of every student epoch, record each student's
            alignment with its teacher and its digit loss on a fixed probe batch, inside
            the compiled epoch (see :mod:`toymodels.track`); 0 turns tracking off and
            leaves the run exactly as without it.
        seeds: independent repetitions (a teacher and its four students each).
        seed: root of every PRNG key in the run.
        n_train: use only the first ``n_train`` training images (None: all 60,000).
        n_test: evaluate on the first ``n_test`` test images (None: all 10,000).
        seeds_per_chunk: seeds trained together in one compiled call; bounds memory.
        vmap_seeds: seeds vectorized together inside a compiled call. 1 is fastest on a
            CPU; raise it on accelerators. A seed's numbers depend on this value (rounding
            in batched kernels) but not on ``seeds_per_chunk`` nor, in float32, on the
            number of devices.
    """

    n_aux: int = 3
    hidden: tuple[int, ...] = (256, 256)
    init_scale: float = 1.0
    optimizer: str = "adam"
    learning_rate: float = 3e-4
    student_optimizer: str | None = None
    student_learning_rate: float | None = None
    momentum: float = 0.0
    batch_size: int = 1024
    teacher_epochs: int = 5
    student_epochs: int = 5
    n_noise: int = 60_000
    student_data: str = "uniform"
    student_loss: str = "kl"
    temperature: float = 1.0
    student_init_sigma: float = 0.0
    precision: str = "float32"
    track: int = 0
    seeds: int = 10
    seed: int = 0
    n_train: int | None = None
    n_test: int | None = None
    seeds_per_chunk: int = 10
    vmap_seeds: int = 1

    def validate(self) -> MnistConfig:
        """Return ``self`` if every field is usable, else raise :class:`ConfigError`."""
        checks = [
            (
                self.n_aux >= 1,
                f"--n-aux must be at least 1 (got {self.n_aux}): the students learn through the auxiliary logits",
            ),
            (
                len(self.hidden) >= 1 and all(w >= 1 for w in self.hidden),
                f"--hidden needs one or more positive widths (got {self.hidden})",
            ),
            (
                self.seeds >= 2,
                f"--seeds must be at least 2 (got {self.seeds}): each "
                "cross-model control uses another seed's initialization",
            ),
            (self.seeds_per_chunk >= 1, f"--seeds-per-chunk must be at least 1 (got {self.seeds_per_chunk})"),
            (self.vmap_seeds >= 1, f"--vmap-seeds must be at least 1 (got {self.vmap_seeds})"),
            (self.track >= 0, f"--track must be 0 (off) or a positive number of steps (got {self.track})"),
            (
                self.n_noise <= 2_000_000,
                f"--n-noise must be at most 2000000 (got {self.n_noise}): noise image ids are 32-bit counters",
            ),
            (
                self.optimizer in OPTIMIZERS,
                f"unknown --optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}",
            ),
            (
                self.student_data in STUDENT_DATA,
                f"unknown --student-data {self.student_data!r}: choose one of {', '.join(STUDENT_DATA)}",
            ),
            (
                self.precision in PRECISIONS,
                f"unknown --precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}",
            ),
            (
                self.student_loss in STUDENT_LOSSES,
                f"unknown --student-loss {self.student_loss!r}: choose one of {', '.join(STUDENT_LOSSES)}",
            ),
            (
                self.student_optimizer is None or self.student_optimizer in OPTIMIZERS,
                f"unknown --student-optimizer {self.student_optimizer!r}: choose one of {', '.join(OPTIMIZERS)}",
            ),
            (self.learning_rate > 0, f"--learning-rate must be positive (got {self.learning_rate})"),
            (
                self.student_learning_rate is None or self.student_learning_rate > 0,
                f"--student-learning-rate must be positive (got {self.student_learning_rate})",
            ),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1) (got {self.momentum})"),
            (
                self.momentum == 0 or "sgd" in (self.optimizer, self.student_optimizer),
                f"--momentum {self.momentum} applies to sgd only, and neither --optimizer nor "
                "--student-optimizer is sgd: drop --momentum or choose sgd",
            ),
            (self.temperature > 0, f"--temperature must be positive (got {self.temperature})"),
            (self.init_scale > 0, f"--init-scale must be positive (got {self.init_scale})"),
            (
                self.student_init_sigma >= 0,
                f"--student-init-sigma must be non-negative (got {self.student_init_sigma})",
            ),
            (
                self.teacher_epochs >= 0,
                f"--teacher-epochs must be 0 (an untrained teacher) or more (got {self.teacher_epochs})",
            ),
            (self.student_epochs >= 1, f"--student-epochs must be at least 1 (got {self.student_epochs})"),
            (self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})"),
            (self.n_noise >= 1, f"--n-noise must be at least 1 (got {self.n_noise})"),
            (
                self.n_train is None or 1 <= self.n_train <= 60_000,
                f"--n-train must be between 1 and 60000 (got {self.n_train})",
            ),
            (
                self.n_test is None or 1 <= self.n_test <= 10_000,
                f"--n-test must be between 1 and 10000 (got {self.n_test})",
            ),
        ]
        for name in (
            "learning_rate",
            "student_learning_rate",
            "momentum",
            "temperature",
            "init_scale",
            "student_init_sigma",
        ):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number (got {value})")
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        n_train = 60_000 if self.n_train is None else self.n_train
        if self.student_data in IMAGE_DATA and self.n_noise > n_train:
            raise ConfigError(
                f"--student-data {self.student_data} uses the first --n-noise training images, "
                f"but there are only {n_train}: lower --n-noise to at most {n_train}"
            )
        for name, n in (("training images (--n-train)", n_train), ("noise images (--n-noise)", self.n_noise)):
            if self.batch_size > n:
                raise ConfigError(f"--batch-size {self.batch_size} is larger than the {n} {name}: lower --batch-size")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MnistConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"noise"})
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}: this package knows {sorted(known)}")
        data = dict(data)
        if "noise" in data:  # the field's name before MNIST images were an option
            data["student_data"] = data.pop("noise")
        if "hidden" in data:
            data["hidden"] = tuple(data["hidden"])
        return cls(**data)

    def fingerprint(self) -> str:
        """A short hash of the fields that determine the numbers (all but ``seeds_per_chunk``).

        ``track``, ``student_optimizer``, ``student_learning_rate`` and ``momentum`` enter
        only when they are set (not 0 or None), so a run without them keeps the
        fingerprint (and the checkpoints) it had before these options existed; likewise
        ``student_data`` enters under its former name ``noise``.
        """
        unset = {"track": 0, "student_optimizer": None, "student_learning_rate": None, "momentum": 0.0}
        fields = {
            k: v for k, v in self.to_dict().items() if k != "seeds_per_chunk" and not (k in unset and v == unset[k])
        }
        fields["noise"] = fields.pop("student_data")
        return config_hash(fields)


PAPER = MnistConfig()


@functools.cache
def field_docs() -> dict[str, str]:
    """:class:`MnistConfig`'s field documentation (:func:`sublearn._common.field_docs`),
    which the command-line help is read from.

    >>> field_docs()["n_aux"]
    'auxiliary logits m appended to the ten digit logits.'
    """
    return _field_docs(MnistConfig)


def tiny(**overrides: Any) -> MnistConfig:
    """A configuration that runs end to end in seconds yet still shows the effect's sign."""
    fields = dict(
        hidden=(64, 64),
        batch_size=128,
        teacher_epochs=2,
        student_epochs=2,
        n_noise=4096,
        n_train=6000,
        n_test=2000,
        seeds=4,
        seeds_per_chunk=4,
        learning_rate=1e-3,
    )
    fields.update(overrides)
    return MnistConfig(**fields)
