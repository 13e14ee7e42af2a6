"""The JAX backend: a Flax NNX decoder, its checkpoints, compiled sampling and optax training."""
