"""Inverted dropout from 16-bit random draws: half the random-number work of `nn.Dropout`.

`flax.linen.Dropout` draws one 32-bit word (one threefry evaluation with JAX's partitionable
threefry) per element. Here each word gives two elements 16 bits each, so the threefry work
halves; on a CPU that work is ~10% of a BERT training step. The drop probability is `rate`
rounded to a multiple of 2**-16 (0.1 -> 0.100006). The draws keep the input's leading axes,
so they shard like the activations.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_LEVELS = 1 << 16


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """bool `shape`: True with probability 1 - round(rate * 2**16) / 2**16, independently."""
  last = shape[-1]
  words = jax.random.bits(key, (*shape[:-1], -(-last // 2)), jnp.uint32)  # [..., ceil(last/2)]
  draws = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)[..., :last]  # [..., last]
  return draws >= jnp.uint32(round(rate * _LEVELS))


class Dropout(nn.Module):
  """`nn.Dropout(rate)` with `keep_mask`'s draws; the "dropout" RNG stream."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = keep_mask(self.make_rng("dropout"), x.shape, self.rate)
    return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))
