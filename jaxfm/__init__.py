"""jaxfm: a JAX/Flax, TPU-first training stack for BERT-style encoders."""

import jax

# Random streams must not change when jax's default flips: pin the partitionable threefry.
jax.config.update("jax_threefry_partitionable", True)

__version__ = "0.1.0"
