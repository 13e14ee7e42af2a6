"""Shared test settings: strict numerics and the hypothesis profiles.

Hypothesis profiles (choose with ``SUBLEARN_HYPOTHESIS_PROFILE``):

- ``ci`` (default): derandomized, no deadline, a small fixed number of examples, so a
  run is reproducible and bounded in time.
- ``thorough``: randomized, many more examples, for hunting counterexamples locally.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
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


@pytest.fixture
def run_on_two_devices(tmp_path):
    """``run(config_expression)``: ``run_experiment`` in a subprocess that sees two CPU devices.

    The expression is evaluated there with ``tiny`` in scope; the result comes back as JSON.
    """

    def run(config_expression: str) -> dict:
        out = tmp_path / "two_devices.json"
        script = (
            "import json, jax; from toymodels.config import tiny; from toymodels.experiment import run_experiment;"
            f"assert len(jax.devices()) == 2; r = run_experiment({config_expression});"
            f"open({str(out)!r}, 'w').write(json.dumps(r.to_json()))"
        )
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
        subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=600)
        return json.loads(out.read_text())

    return run


@pytest.fixture
def folder_holder():
    """``hold(folder, command)``: a child process that holds ``folder`` for ``command``
    (:func:`sublearn._store.claim`) until the test ends; returns the child (its ``pid``)."""
    script = (
        "import sys\nfrom sublearn._store import claim\nwith claim(sys.argv[1], sys.argv[2]):\n"
        "    print('held', flush=True)\n    sys.stdin.read()\n"
    )
    children = []

    def hold(folder, command: str) -> subprocess.Popen:
        argv = [sys.executable, "-c", script, str(folder), command]
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "held"
        children.append(child)
        return child

    yield hold
    for child in children:
        if not child.stdin.closed:
            child.stdin.close()
        child.wait(timeout=30)
