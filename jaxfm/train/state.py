"""The train state: arrays only (no functions), so it checkpoints and shards like any pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes.

  `rng` is folded with `step` inside the step, so the dropout stream of step k
  is the same whether or not the run was resumed. `skipped_steps` counts
  updates dropped because the gradients were not finite;
  `consecutive_nonfinite` is the current streak of such steps.
  """

  step: jax.Array  # int32 []
  params: Any
  opt_state: Any
  rng: jax.Array  # typed PRNG key data, uint32 [2]
  skipped_steps: jax.Array  # int32 []
  consecutive_nonfinite: jax.Array  # int32 []


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """A fresh state for `params` (call under jit with out_shardings for sharded init)."""
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)),
                    skipped_steps=zero, consecutive_nonfinite=zero)
