"""The MNIST toy model of subliminal learning (paper Section 6), in JAX.

A teacher MLP with ``10 + m`` outputs learns MNIST through its ten digit logits. Students
that share its initialization imitate only its ``m`` auxiliary logits, on noise images,
and still learn to classify digits; students from another initialization do not.

Where things are:

- :mod:`toymodels.config`: :class:`MnistConfig`, every knob with the paper's defaults.
- :mod:`toymodels.model`: the MLP (Flax NNX) and its pure ``apply``.
- :mod:`toymodels.losses`: teacher cross-entropy and student imitation losses.
- :mod:`toymodels.train`: the compiled epochs (``scan`` over steps, ``vmap`` over seeds).
- :mod:`toymodels.conditions`: the six conditions, the paper's numbers, the derangement.
- :mod:`toymodels.experiment`: :func:`run_experiment`, the whole experiment, and its
  :class:`ExperimentResult` (``to_json``/``from_json``).
- :mod:`toymodels.track`: ``--track N``, the students' alignment with their teacher along training.
- :mod:`toymodels.figure`: the bar chart and the trajectory figure.
- :mod:`toymodels.data`: the bundled, checksum-verified MNIST files.
"""

from toymodels.conditions import CONDITIONS, PAPER_RESULTS
from toymodels.config import PAPER, ConfigError, MnistConfig, tiny
from toymodels.data import DataError, load_mnist
from toymodels.experiment import ExperimentResult, run_experiment
from toymodels.model import MLP, MLPSpec, apply, init_params

__all__ = [
    "CONDITIONS",
    "PAPER",
    "PAPER_RESULTS",
    "ConfigError",
    "DataError",
    "ExperimentResult",
    "MLP",
    "MLPSpec",
    "MnistConfig",
    "apply",
    "init_params",
    "load_mnist",
    "run_experiment",
    "tiny",
]
