#!/usr/bin/env bash
# The paper's 100-seed MNIST figure in float32 and in bf16 on an accelerator, with timings.
#
# Runs from a checkout without installing it (jax, flax, optax, numpy, matplotlib, scipy,
# sympy, hypothesis and jaxtyping must be importable; the script checks them first and
# names the missing ones, exit 2), on whatever devices JAX sees:
#
#   bash benchmarks/accelerator_check.sh [OUT_DIR] [extra `sublearn mnist` options...]
#
# OUT_DIR (default results/accelerator_check) receives one folder per precision
# (results.json, figure) and summary.json with each precision's wall time, devices and
# six bars side by side. Seeds are vectorized VMAP_SEEDS at a time (default 25: a GPU is
# latency-bound on one seed's 1024 x 784 products) in chunks of SEEDS_PER_CHUNK (default
# 100: memory is a few hundred MB either way). SEEDS (default 100) sets the number of seeds.
# float32 runs as true float32 (the package asks for HIGHEST matmul precision, so no TF32).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/accelerator_check}
shift || true
seeds=${SEEDS:-100}
vmap=${VMAP_SEEDS:-25}
chunk=${SEEDS_PER_CHUNK:-100}
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"

# Every module the runs import, checked before any work: one line naming what is missing.
"$python" - <<'EOF'
import importlib, sys

def importable(module):
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True

needed = ["jax", "flax", "optax", "numpy", "matplotlib", "scipy", "sympy", "hypothesis", "jaxtyping"]
missing = [m for m in needed if not importable(m)]
if missing:
    print(f"accelerator_check.sh: {', '.join(missing)} not importable; install them "
          f"(`pip install {' '.join(missing)}`, jax with your accelerator's extra, e.g. jax[cuda12])", file=sys.stderr)
    sys.exit(2)
EOF
"$python" -c 'import jax; print("devices:", jax.devices())'
for precision in float32 bf16; do
  start=$(date +%s.%N)
  "$python" -m toymodels --seeds "$seeds" --vmap-seeds "$vmap" --seeds-per-chunk "$chunk" \
    --precision "$precision" --out "$out/$precision" --overwrite --quiet "$@"
  echo "$start $(date +%s.%N)" > "$out/$precision/wall_clock.txt"
done

"$python" - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
summary = {}
for precision in ("float32", "bf16"):
    result = json.loads((out / precision / "results.json").read_text())
    summary[precision] = {
        "command_wall_s": (lambda a, b: b - a)(*map(float, (out / precision / "wall_clock.txt").read_text().split())),
        "experiment_wall_s": result["timing"]["wall_s"],
        "devices": result["environment"]["devices"],
        "bars": {c: [s["mean"], s["ci95"]] for c, s in result["summary"].items()},
    }
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print("wall s:", {p: round(s["command_wall_s"], 1) for p, s in summary.items()}, "devices:", summary["float32"]["devices"])
EOF
"$python" -m toymodels.compare "$out/float32/results.json" "$out/bf16/results.json" --out "$out/comparison.json"
