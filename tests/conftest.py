"""Shared test settings: strict numerics and the hypothesis profiles.

Hypothesis profiles (choose with ``SUBLEARN_HYPOTHESIS_PROFILE``):

- ``ci`` (default): derandomized, no deadline, a small fixed number of examples, so a
  run is reproducible and bounded in time.
- ``thorough``: randomized, many more examples, for hunting counterexamples locally.
"""

from __future__ import annotations

import os

import jax
from hypothesis import HealthCheck, settings

# Strict numerics: implicit rank promotion hides shape bugs, so make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=500,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("SUBLEARN_HYPOTHESIS_PROFILE", "ci"))
